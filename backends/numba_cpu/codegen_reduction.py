"""Reduction kernels: sum, max and argmax with a fused body and epilogue.

The loop nest runs the kept axes outside (the first one in parallel for large outputs) and the
reduced axes inside. The body (the elementwise producers of the operand) is evaluated in the
innermost loop and its values that leave the kernel are stored there; the epilogue (pointwise
consumers of the reduced value) runs once per output element after the inner loops.

A reduction over leading axes (a column sum) runs the other way round: rows outside, the kept
axes innermost over a row of accumulators, so reads are contiguous; in parallel, blocks of rows
each fill their own row of partial sums, combined before the epilogue.

A reduction to a single element of a large operand splits its first axis into per-iteration
partial results computed in parallel, then combines them.

float32 sums accumulate in float64: more accurate than the reference's pairwise float32 sum,
so the two agree to float32 rounding.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Callable

from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.lowering import register_lowering
from graphc.ir.registry import ELEMENTWISE, REDUCTION, get
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.pointwise import kernel_arrays
from graphc.backends.kernels.reduction import REDUCTION_OPS, Reduction, ReductionKernel
from graphc.backends.kernels.source import Writer, entry_name, index_text, size_of

from .codegen_common import (CPU, IEEE_FASTMATH_FLAGS, TARGET, Call, KernelSource, decorator,
                             loop_header, module, runs_parallel)
from .codegen_elementwise import elementwise_flops


# A float max folds with `nan_maximum` (intrinsics.py): NaN-propagating without a branch, so
# the loop vectorises. The shared lowering's `if v > acc or v != v` compiled to a scalar loop: the
# transformer's row max over its (1024, 513) logits took 741 us, this 28 us. A float sum adds
# through `reassociable_add`, the one instruction of the kernel LLVM may reorder, so that the sum
# vectorises while the fused body keeps its written order.
INTRINSICS_IMPORT = "from graphc.backends.numba_cpu.intrinsics import nan_maximum, reassociable_add"


class CpuReduction(Reduction):
    """A float max through `nan_maximum`, a float sum through `reassociable_add`; other dtypes
    and argmax as the shared lowering."""

    def __init__(self, node: Node) -> None:
        super().__init__(node)
        self.branch_free = self.op in ("sum", "max") and self.dtype in ("float32", "float64")

    def update(self, w: Writer, value: str, position: str = "", acc: str = "acc") -> None:
        if not self.branch_free:
            super().update(w, value, position, acc)
        elif self.op == "max":
            w.line(f"{acc} = nan_maximum({acc}, {value})")
        else:
            w.line(f"{acc} = reassociable_add({acc}, {value})")


for op in REDUCTION_OPS:
    register_lowering(TARGET, op, CpuReduction)


def generate_reduction(kernel: Node) -> KernelSource:
    collapsed = collapse_reduced_axes(kernel)
    source = _generate(collapsed[0] if collapsed else kernel)
    if collapsed:
        call = source.calls[0]
        views = tuple(collapsed[1].get(a) if isinstance(a, KernelArray) else None for a in call.args)
        source.calls[0] = replace(call, views=views)
    return source


def _generate(kernel: Node) -> KernelSource:
    parts = ReductionKernel(kernel, CPU)
    reduction, shape, kept = parts.reduction, parts.shape, parts.kept
    index, dims, arrays, emitter = parts.index, parts.dims, parts.arrays, parts.emitter
    if isinstance(reduction, CpuReduction) and reduction.branch_free:
        emitter.require_helper(INTRINSICS_IMPORT)
    large = runs_parallel(size_of(shape))
    split = large and not kept and len(shape) > 0 and reduction.op != "argmax"
    parallel = large and (bool(kept) or split)

    def inner(w: Writer, reduced_axes: list[int], acc: str = "acc") -> None:
        """Loops over `reduced_axes` around the accumulation."""
        for d in reduced_axes:
            w.line(loop_header(index[d], dims[d], False))
            w.depth += 1
        parts.accumulate(w, acc)
        w.depth -= len(reduced_axes)

    code = Writer(depth=1)
    if split:
        _split_reduction(code, reduction, index, dims, inner)
        parts.finish(code)
    elif _leading_reduction(reduction, len(shape)):
        if parallel and len(kept) == 1:
            _parallel_column_reduction(code, parts)
        else:
            _column_reduction(code, parts, parallel)
    else:
        for k, d in enumerate(kept):
            code.line(loop_header(index[d], dims[d], parallel and k == 0))
            code.depth += 1
        reduction.init(code)
        inner(code, list(reduction.axes))
        parts.finish(code)

    entry = entry_name(kernel.attrs["name"])
    scalars = emitter.arguments
    source = Writer()
    source.line(decorator(parallel))
    with source.block(f"def {entry}({', '.join([a.name for a in arrays.values()] + list(dims) + list(scalars))}):"):
        source.extend(emitter.prelude)
    source.extend(code)
    flops = size_of(shape) + elementwise_flops(parts.body) + elementwise_flops(parts.epilogue)
    call = Call(module(entry, source, emitter.helpers, fastmath=IEEE_FASTMATH_FLAGS), entry,
                tuple(arrays.values()) + shape + tuple(scalars.values()), parallel=parallel)
    return KernelSource(kernel.attrs["name"], kernel.attrs["pattern"], [call], flops=flops)


def _split_reduction(code: Writer, reduction: Reduction, index, dims, inner) -> None:
    """Full reduction in parallel: axis 0 in blocks of ROW_BLOCK_ELEMENTS operand elements at
    least, one partial result per block, then combined. (One partial per step of axis 0, which
    the collapsed axes of a full sum make one per element, took a float64 array as large as the
    operand: a 2 GiB bool mask's count needed 17 GiB.) The blocks depend on the extents only."""
    acc_type = f"np.{reduction.acc_dtype}"
    rest = " * ".join(dims[1:]) or "1"
    code.line(f"block_rows = max(1, {ROW_BLOCK_ELEMENTS} // max(1, {rest}))")
    code.line(f"blocks = ({dims[0]} + block_rows - 1) // block_rows")
    code.line(f"partial = np.empty(blocks, {acc_type})")
    with code.block(loop_header("block", "blocks", True)):
        reduction.init(code, "part")
        start = "block * block_rows"
        with code.block(f"for {index[0]} in range({start}, min({dims[0]}, {start} + block_rows)):"):
            inner(code, list(range(1, len(index))), "part")
        code.line("partial[block] = part")
    reduction.init(code)
    with code.block("for block in range(blocks):"):
        reduction.update(code, "partial[block]")


def _leading_reduction(reduction: Reduction, rank: int) -> bool:
    """Whether the reduced axes are the leading ones (one at least), with at least one kept axis
    after them."""
    axes = sorted(reduction.axes)
    return reduction.op != "argmax" and axes == list(range(len(axes))) and 0 < len(axes) < rank


def _column_reduction(code: Writer, parts: ReductionKernel, parallel: bool = False) -> None:
    """Leading axes reduced, trailing ones kept (a bias gradient sums (batch, features) over
    the batch): the kept axes run innermost, over a row of accumulators, so every read is
    contiguous. Reading down the columns instead took 60-66 us for 128 x 256, this 16-18 us. Each
    column still adds its elements in the same order. In parallel (two kept axes at least) the
    first kept axis runs outermost in parallel, and each of its steps sums its own rows:
    (16, 64, 256) summed over 16 took 344 us down the columns, 149 us in blocks of rows, this
    31 us."""
    reduction, index, dims = parts.reduction, parts.index, parts.dims
    reduced, kept = sorted(reduction.axes), parts.kept
    outer, inner = (kept[:1], kept[1:]) if parallel else ([], kept)
    accs = f"accs[{index_text(tuple(index[d] for d in kept))}]"
    shape = ", ".join(dims[d] for d in kept)
    code.line(f"accs = np.empty(({shape},), np.{reduction.acc_dtype})")

    def loops(axes: list[int], emit: Callable[[], None]) -> None:
        for d in axes:
            code.line(loop_header(index[d], dims[d], d in outer))
            code.depth += 1
        emit()
        code.depth -= len(axes)

    def finish() -> None:
        code.line(f"acc = {accs}")
        parts.finish(code)

    def phases() -> None:
        loops(inner, lambda: reduction.init(code, accs))
        _accumulate_rows(code, parts, reduced + inner, accs)
        loops(inner, finish)

    loops(outer, phases)


def _accumulate_rows(code: Writer, parts: ReductionKernel, axes: list[int], acc: str) -> None:
    """Serial loops over `axes` around the accumulation into `acc`. Where the body concatenates
    kernel inputs along the innermost axis (a qkv bias gradient sums its q, k and v cotangents
    concatenated), that loop runs once per part and reads the part directly: the select chain
    of the concatenation rule, its three arrays read at `i - offset` (an index Numba must wrap
    if negative), kept LLVM from vectorising ((16, 64, 3 x 128) summed over 16 x 64: 226 us
    that way, 50 us per part)."""
    concat = _innermost_concatenation(parts, axes)
    for d in axes[:-1] if concat else axes:
        code.line(loop_header(parts.index[d], parts.dims[d], False))
        code.depth += 1
    if not concat:
        parts.accumulate(code, acc)
    else:
        _accumulate_parts(code, parts, concat, acc)
    code.depth -= len(axes) - 1 if concat else len(axes)


def _innermost_concatenation(parts: ReductionKernel, axes: list[int]) -> Node | None:
    """The body's concatenation along the innermost of `axes`, kept and the operand's last, of
    inputs the kernel reads from arrays; None if there is none."""
    last = len(parts.shape) - 1
    if not axes or axes[-1] != last or last in parts.reduction.axes:
        return None
    return next((m for m in parts.body if m.op == "concatenate" and m.attrs["axis"] == last
                 and all(v in parts.arrays and v.producer not in parts.body for v in m.inputs)), None)


def _accumulate_parts(code: Writer, parts: ReductionKernel, concat: Node, acc: str) -> None:
    """The innermost loop split at the concatenation's parts: in part k, `j` runs over input
    k's extent, the full index is its offset + j and the concatenation reads input k at j. The
    offset is clamped at 0 in the loop (LLVM hoists it), as `integer_argument` explains: knowing
    the index is not negative, LLVM drops Numba's wrap-around of it, even in an outlined
    parallel loop."""
    emitter, index = parts.emitter, parts.index
    axis = len(index) - 1
    offset = "0"
    without_concat = copy.copy(parts)
    without_concat.body = [m for m in parts.body if m is not concat]
    for k, x in enumerate(concat.inputs):
        extent = emitter.extent(x, axis)
        with code.block(f"for j in range({extent}):"):
            code.line(f"{index[axis]} = max({offset}, 0) + j" if offset != "0" else f"{index[axis]} = j")
            value = emitter.load(x, index[:axis] + ("j",))
            emitter.locals[concat.output] = name = emitter.fresh("t")
            code.line(f"{name} = {value}  # concatenate, part {k}")
            without_concat.accumulate(code, acc)
        if k + 1 < len(concat.inputs):
            previous = "" if offset == "0" else f"{offset} + "
            offset = emitter.fresh("part_offset")
            emitter.prelude.line(f"{offset} = {previous}{extent}")


# elements of the operand (at least) in one row block of a parallel column reduction: enough rows
# that combining the blocks' partial sums costs little beside summing the rows (1/32 of it)
ROW_BLOCK_ELEMENTS = 1 << 15
# and at most this many blocks: rows wider than ROW_BLOCK_ELEMENTS made a block of every row,
# partial sums as large as the operand (a 2048 x 50257 logits' column sum: 785 MiB more)
MOST_ROW_BLOCKS = 16


def _parallel_column_reduction(code: Writer, parts: ReductionKernel) -> None:
    """The column reduction of one kept axis split into blocks of rows run in parallel, each
    summing its rows into its own row of partial sums, which a parallel loop over the kept axis
    then combines before the epilogue. Parallel over the kept axes instead, each thread read down its columns
    with a stride of a whole row (an LSTM's (T*N, 4H) bias gradient, 1792 x 512: 0.12 GFLOP/s).
    The blocks depend on the extents only, never on the thread count: the result does too."""
    reduction, index, dims = parts.reduction, parts.index, parts.dims
    reduced, kept = sorted(reduction.axes), parts.kept
    first = reduced[0]
    row = " * ".join(dims[d] for d in range(len(dims)) if d != first)
    kept_index = index_text(tuple(index[d] for d in kept))
    partial = f"partial[block, {kept_index}]"
    code.line(f"block_rows = max(1, {ROW_BLOCK_ELEMENTS} // max(1, {row}), "
              f"({dims[first]} + {MOST_ROW_BLOCKS - 1}) // {MOST_ROW_BLOCKS})")
    code.line(f"blocks = ({dims[first]} + block_rows - 1) // block_rows")
    code.line(f"partial = np.empty((blocks, {', '.join(dims[d] for d in kept)}), np.{reduction.acc_dtype})")

    def loops(axes: list[int], emit: Callable[[], None], parallel: bool = False) -> None:
        for k, d in enumerate(axes):
            code.line(loop_header(index[d], dims[d], parallel and k == 0))
            code.depth += 1
        emit()
        code.depth -= len(axes)

    with code.block(loop_header("block", "blocks", True)):
        loops(kept, lambda: reduction.init(code, partial))
        start = "block * block_rows"
        with code.block(f"for {index[first]} in range({start}, min({dims[first]}, {start} + block_rows)):"):
            _accumulate_rows(code, parts, reduced[1:] + kept, partial)

    def combine() -> None:
        reduction.init(code)
        with code.block("for block in range(blocks):"):
            reduction.update(code, partial)
        parts.finish(code)

    loops(kept, combine, parallel=True)


# -- merging adjacent reduced axes ------------------------------------------------------------
def collapse_reduced_axes(kernel: Node) -> tuple[Node, dict[KernelArray, tuple[int, ...]]] | None:
    """The reduction kernel with each run of adjacent reduced axes merged into one, and the
    shape each changed kernel array is viewed as; None when no run merges.

    A conv bias gradient sums (N, C, H, W) over N, H and W: its innermost loop ran over W's 24
    elements; over H*W's 576 it vectorises, 4x faster (0.93 -> 0.23 ms on 64x64x24x24). Only
    kernels whose members are all elementwise qualify (shape ops carry shapes in their attrs),
    and every array read over the merged axes must span them fully or not at all."""
    sub = kernel.subgraph
    members = [n for n in sub.nodes if n.op != "constant"]
    anchor = next(n for n in members if get(n.op).kind == REDUCTION)
    if anchor.op == "argmax" or any(get(m.op).kind != ELEMENTWISE for m in members if m is not anchor):
        return None
    full = anchor.inputs[0].shape
    axes = sorted(anchor.attrs["axes"])
    runs = _runs(axes)
    if not any(len(run) > 1 for run in runs):
        return None
    keepdims = anchor.attrs["keepdims"]
    at = members.index(anchor)
    body_values = {v for m in members[:at] for v in (*m.inputs, *m.outputs)} | {anchor.inputs[0]}
    reduced_values = {v for m in members[at + 1:] for v in (*m.inputs, *m.outputs)} | {anchor.output}
    if not keepdims and any(v.type.size > 1 for v in body_values & reduced_values):
        return None  # one array read at both the full and the reduced index

    # the full domain's axes in groups: each run of reduced axes, each other axis alone
    groups = [run for run in runs] + [[a] for a in range(len(full)) if a not in axes]
    groups.sort()

    def merged(shape: tuple[int, ...]) -> tuple[int, ...] | None:
        """`shape` (broadcast against the full domain, aligned right) with each group merged;
        None when a group is partly 1 and partly spanned."""
        offset = len(full) - len(shape)
        out = []
        for group in groups:
            dims = [shape[a - offset] for a in group if a >= offset]
            if not dims:
                continue
            if all(d == 1 for d in dims):
                out.append(1)
            elif dims == [full[a] for a in group]:
                out.append(size_of(tuple(dims)))
            else:
                return None
        return tuple(out)

    def new_type(v: Value) -> TensorType | None:
        if v in reduced_values and not keepdims:
            return v.type
        shape = merged(v.shape)
        return None if shape is None else TensorType(shape, v.dtype)

    types = {v: new_type(v) for v in (*sub.input_values, *(o for n in sub.nodes for o in n.outputs))}
    if any(t is None for t in types.values()):
        return None
    graph = Graph(sub.name)
    mapping = {inp.value: graph.add_input(types[inp.value], inp.name, inp.role) for inp in sub.inputs}
    for node in sub.nodes:
        attrs = node.attrs
        if node is anchor:
            attrs = {**attrs, "axes": tuple(run[0] - sum(len(r) - 1 for r in runs if r[0] < run[0])
                                            for run in runs)}
        clone = Node(node.op, tuple(mapping[v] for v in node.inputs), attrs,
                     tuple(types[v] for v in node.outputs), node.loc, module=node.module)
        mapping.update(zip(node.outputs, clone.outputs))
        graph.nodes.append(clone)
    for name, v in sub.outputs:
        graph.add_output(name, mapping[v])
    arrays = kernel_arrays(sub)
    views = {arrays[v]: types[v].shape for v in arrays if types[v].shape != v.shape}
    collapsed = Node(kernel.op, kernel.inputs, kernel.attrs, tuple(v.type for v in kernel.outputs),
                     kernel.loc, graph)
    return collapsed, views


def _runs(axes: list[int]) -> list[list[int]]:
    """Sorted axes as runs of consecutive ones: [0, 2, 3] -> [[0], [2, 3]]."""
    runs: list[list[int]] = []
    for a in axes:
        if runs and runs[-1][-1] == a - 1:
            runs[-1].append(a)
        else:
            runs.append([a])
    return runs
