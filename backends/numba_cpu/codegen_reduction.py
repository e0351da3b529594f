"""Reduction kernels: sum, max and argmax with a fused body and epilogue.

The loop nest runs the kept axes outside (the first one in parallel for large outputs) and the
reduced axes inside. The body (the elementwise producers of the operand) is evaluated in the
innermost loop and its values that leave the kernel are stored there; the epilogue (pointwise
consumers of the reduced value) runs once per output element after the inner loops.

A reduction to a single element of a large operand splits its first axis into per-iteration
partial results computed in parallel, then combines them.

float32 sums accumulate in float64: more accurate than the reference's pairwise float32 sum,
so the two agree to float32 rounding.
"""
from __future__ import annotations

from graphc.ir import Node

from .codegen_common import (PARALLEL_MIN_ELEMENTS, Call, KernelSource, Writer, cast, decorator,
                             entry_name, index_text, literal, loop_header, lowest, module, size_of)
from .codegen_elementwise import (Domain, PointwiseEmitter, argument_names, elementwise_flops,
                                  members_of)


REDUCTION_OPS = ("sum", "max", "argmax")


def _accumulator_dtype(op: str, dtype: str) -> str:
    if op == "sum":
        return "float64" if dtype in ("float32", "float64") else "int64"
    return dtype


class _Reduction:
    """How one reduction op initialises, updates and finishes its accumulator."""

    def __init__(self, node: Node) -> None:
        self.op = node.op
        self.dtype = node.inputs[0].dtype
        self.acc_dtype = _accumulator_dtype(node.op, self.dtype)
        self.axes = (node.attrs["axis"],) if node.op == "argmax" else node.attrs["axes"]

    def init(self, w: Writer, acc: str = "acc") -> None:
        if self.op == "sum":
            w.line(f"{acc} = {literal(0, self.acc_dtype)}")
        else:
            w.line(f"{acc} = {lowest(self.dtype)}")
        if self.op == "argmax":
            w.line("arg = np.int64(0)")

    def update(self, w: Writer, value: str, position: str = "", acc: str = "acc") -> None:
        """Fold `value` (at reduced-axis `position`, for argmax) into the accumulator. max keeps a
        NaN once seen; argmax keeps the first maximum, a NaN counting as the maximum."""
        if self.op == "sum":
            w.line(f"{acc} += {value}")
        elif self.op == "max":
            with w.block(f"if {value} > {acc} or {value} != {value}:"):
                w.line(f"{acc} = {value}")
        else:
            with w.block(f"if {value} > {acc} or ({value} != {value} and {acc} == {acc}):"):
                w.line(f"{acc} = {value}")
                w.line(f"arg = {position}")

    @property
    def result(self) -> str:
        return "arg" if self.op == "argmax" else "acc"


def generate_reduction(kernel: Node) -> KernelSource:
    sub = kernel.subgraph
    members = members_of(sub)
    anchor_at = next(i for i, m in enumerate(members) if m.op in REDUCTION_OPS)
    body, anchor, epilogue = members[:anchor_at], members[anchor_at], members[anchor_at + 1:]
    reduction = _Reduction(anchor)
    shape = anchor.inputs[0].shape
    rank = len(shape)
    keepdims = anchor.attrs["keepdims"]
    kept = [d for d in range(rank) if d not in reduction.axes]

    arrays = argument_names(sub)
    emitter = PointwiseEmitter(sub, arrays)
    index = tuple(f"i{d}" for d in range(rank))
    dims = tuple(f"n{d}" for d in range(rank))
    full = Domain(index, dims)
    if keepdims:
        reduced = Domain(tuple("0" if d in reduction.axes else index[d] for d in range(rank)),
                         tuple("1" if d in reduction.axes else dims[d] for d in range(rank)))
    else:
        reduced = Domain(tuple(index[d] for d in kept), tuple(dims[d] for d in kept))
    outputs = {v: arrays[v] for v in sub.output_values}
    body_outputs = [v for v in outputs if v.producer in body]

    large = size_of(shape) >= PARALLEL_MIN_ELEMENTS
    split = large and not kept and rank > 0 and reduction.op != "argmax"
    parallel = large and (bool(kept) or split)

    def inner(w: Writer, reduced_axes: list[int], acc: str = "acc") -> None:
        """Loops over `reduced_axes`: the body, its stores, the accumulator update."""
        for d in reduced_axes:
            w.line(loop_header(index[d], dims[d], False))
            w.depth += 1
        for m in body:
            emitter.emit(w, m, full)
        for v in body_outputs:
            w.line(f"{outputs[v]}[{index_text(index)}] = {emitter.locals[v]}")
        operand = emitter.load(anchor.inputs[0], index)
        if reduction.op != "sum" and operand not in emitter.locals.values():
            w.line(f"v = {operand}")  # max and argmax read it more than once
            operand = "v"
        position = index[reduction.axes[0]] if reduction.op == "argmax" else ""
        reduction.update(w, operand, position, acc)
        w.depth -= len(reduced_axes)

    def finish(w: Writer) -> None:
        """The reduced value, the epilogue, and the stores at the output index."""
        emitter.locals[anchor.output] = name = emitter.fresh("t")
        w.line(f"{name} = {cast(reduction.result, anchor.output.dtype)}  # {anchor.op}")
        for m in epilogue:
            emitter.emit(w, m, reduced)
        for v, array in outputs.items():
            if v not in body_outputs:
                w.line(f"{array}[{index_text(reduced.index)}] = {emitter.locals[v]}")

    code = Writer(depth=1)
    if split:
        _split_reduction(code, reduction, index, dims, inner)
    else:
        for k, d in enumerate(kept):
            code.line(loop_header(index[d], dims[d], parallel and k == 0))
            code.depth += 1
        reduction.init(code)
        inner(code, list(reduction.axes))
    finish(code)

    entry = entry_name(kernel.attrs["name"])
    source = Writer()
    source.line(decorator(parallel))
    with source.block(f"def {entry}({', '.join(list(arrays.values()) + list(dims))}):"):
        source.extend(emitter.prelude)
    source.extend(code)
    flops = size_of(shape) + elementwise_flops(body) + elementwise_flops(epilogue)
    call = Call(module(entry, source, emitter.helpers), entry, tuple(arrays.values()) + shape,
                parallel=parallel)
    return KernelSource(kernel.attrs["name"], kernel.attrs["pattern"], [call], flops=flops)


def _split_reduction(code: Writer, reduction: _Reduction, index, dims, inner) -> None:
    """Full reduction in parallel: one partial result per step of axis 0, then combined."""
    acc_type = f"np.{reduction.acc_dtype}"
    code.line(f"partial = np.empty({dims[0]}, {acc_type})")
    with code.block(loop_header(index[0], dims[0], True)):
        reduction.init(code, "part")
        inner(code, list(range(1, len(index))), "part")
        code.line(f"partial[{index[0]}] = part")
    reduction.init(code)
    with code.block(loop_header(index[0], dims[0], False)):
        reduction.update(code, f"partial[{index[0]}]")

