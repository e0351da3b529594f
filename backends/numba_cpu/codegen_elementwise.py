"""Elementwise and shape kernels: loop nests around the shared pointwise expression engine
(backends/kernels/pointwise.py), whose rules are registered here as this backend's lowerings.

A kernel whose members read their operands only at the loop index, or whole-array scalars, is
*flat*: it loops over one 1-D index and the executor passes 1-D views, so the same kernel (and
cache entry) serves every shape and rank.
"""
from __future__ import annotations

from typing import Mapping

from graphc.ir import Graph, Node, Value
from graphc.ir.kernels import is_literal
from graphc.ir.registry import ELEMENTWISE, get
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.pointwise import (RANDOM_OPS, Domain, PointwiseEmitter, kernel_arrays, members_of,
                                               register_pointwise_lowerings)
from graphc.backends.kernels.source import Writer, entry_name, index_text, size_of

from .codegen_common import (CPU, IEEE_FASTMATH_FLAGS, TARGET, Call, KernelSource, decorator,
                             loop_header, module, runs_parallel)

register_pointwise_lowerings(TARGET)


# -- the elementwise / shape kernel -------------------------------------------------------------
def is_flat(members: list[Node]) -> bool:
    """Can these members run over one flat index? Every operand is read at the output index or
    is a one-element array; random ops only need the flat index itself."""
    for m in members:
        if m.op in RANDOM_OPS:
            continue
        if get(m.op).kind != ELEMENTWISE:
            return False
        if any(v.shape != m.output.shape and v.type.size != 1 for v in m.inputs):
            return False
    return True


def collapsed_axes(shape: tuple[int, ...], operand_shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """Runs of adjacent axes of `shape` that every operand (broadcast to `shape`) reads alike:
    along all of them or along none. Each run can loop as one axis over reshaped views; a bias
    add over (N, C, H, W) becomes (N, C, H*W). Axes of extent 1 join any run."""
    rank = len(shape)

    def varies(operand: tuple[int, ...], axis: int) -> bool:
        lead = rank - len(operand)
        return axis >= lead and operand[axis - lead] != 1

    runs: list[list[int]] = []
    signature = None  # of the current run; None while it holds only axes of extent 1
    for axis, extent in enumerate(shape):
        reads = tuple(varies(s, axis) for s in operand_shapes)
        if runs and (extent == 1 or signature in (None, reads)):
            runs[-1].append(axis)
        else:
            runs.append([axis])
            signature = None
        if extent != 1:
            signature = reads
    return runs


def _collapsed_views(members: list[Node], sub: Graph) -> dict[Value, tuple[int, ...]] | None:
    """Each array's (and each member's) shape over the collapsed axes, when collapsing the
    loop nest drops an axis and every member is an elementwise op at the common shape."""
    shape = members[0].output.shape
    if any(m.op not in ("broadcast_to", *RANDOM_OPS) and get(m.op).kind != ELEMENTWISE
           or m.output.shape != shape for m in members):
        return None
    keys = {m.inputs[0] for m in members if m.op in RANDOM_OPS}  # read whole, not broadcast
    arrays = [v for v in [*sub.input_values, *sub.output_values] if v not in keys]
    runs = collapsed_axes(shape, [v.shape for v in arrays])
    if len(runs) == len(shape):
        return None

    def view(v: Value) -> tuple[int, ...]:
        padded = (1,) * (len(shape) - len(v.shape)) + v.shape
        return tuple(size_of(tuple(padded[a] for a in run)) for run in runs)
    # Every value a member reads is indexed over the collapsed axes, literals included: a
    # gradient's seed is a rank-n literal of ones broadcast to the loss's operand.
    literals = [n.output for n in sub.nodes if is_literal(n)]
    return {v: view(v) for v in [*arrays, *literals, *(m.output for m in members)]}


def _parallel_rows(loop: Writer, domain: Domain) -> None:
    """Open a parallel loop over all axes but the last as one index `k` (one prange over
    N*C rows instead of prange(N) around range(C): an inner loop fewer in the parallel
    function, whose loop nests LLVM compiles several times over), each axis index from `k`,
    then the loop over the last axis."""
    *outer, last = domain.index
    *extents, last_extent = domain.dims
    loop.line(loop_header("k", " * ".join(extents), True))
    loop.depth += 1
    for d, i in enumerate(outer):
        inner = " * ".join(extents[d + 1:])  # the rows one step of axis d spans
        quotient = "k" if not inner else f"k // ({inner})" if "*" in inner else f"k // {inner}"
        loop.line(f"{i} = {quotient}" if d == 0 else f"{i} = {quotient} % {extents[d]}")
    loop.line(loop_header(last, last_extent, False))
    loop.depth += 1


# The side of the square tiles a transpose is copied in: with constant trip counts LLVM unrolls
# an 8 x 8 tile and transposes it in vector registers (1792 x 512 float32, 1 thread: 2.8 ms row
# by row, 0.37 ms in 8 x 8 tiles with the input in cache; 16 x 16 tiles took 0.55 ms, two-level
# 64 / 8 tilings no less than 8 x 8 alone).
TRANSPOSE_TILE = 8


def _moved_last_axis(members: list[Node], sub: Graph, shape: tuple[int, ...]) -> int | None:
    """The output axis a transposed kernel input's last (contiguous) axis moves to, when it
    moves: looping over the output's last axis innermost then reads that input with a stride
    of a whole row per element."""
    inputs = set(sub.input_values)
    for m in members:
        if m.op == "transpose" and m.inputs[0] in inputs and m.output.shape == shape:
            axis = m.attrs["perm"].index(len(shape) - 1)
            if axis != len(shape) - 1:
                return axis
    return None


def _tiled_loops(loop: Writer, domain: Domain, axis: int, parallel: bool, body: Writer) -> None:
    """`body` at every index of `domain`, the output's last axis and `axis` in square tiles
    (the other axes outside): one loop over the other axes and the rows of tiles (prange where
    `parallel`), full tiles with constant trip counts, the ragged edges apart."""
    *outer_index, last = domain.index
    *outer_dims, last_extent = domain.dims
    side = TRANSPOSE_TILE
    tiled, tiled_extent = outer_index[axis], outer_dims[axis]
    rows = [(i, n) for i, n in zip(outer_index, outer_dims) if i != tiled]
    tile_rows = f"(({tiled_extent} + {side - 1}) // {side})"
    loop.line(loop_header("k", " * ".join([n for _, n in rows] + [tile_rows]), parallel))
    loop.depth += 1
    loop.line(f"tile0 = (k % {tile_rows}) * {side}" if rows else f"tile0 = k * {side}")
    spans = tile_rows
    for i, n in reversed(rows):
        loop.line(f"{i} = (k // ({spans})) % {n}")
        spans = f"{spans} * {n}"
    with loop.block(f"for tile1 in range(0, {last_extent}, {side}):"):
        with loop.block(f"if tile0 + {side} <= {tiled_extent} and tile1 + {side} <= {last_extent}:"):
            with loop.block(f"for u0 in range({side}):"), loop.block(f"for u1 in range({side}):"):
                loop.line(f"{tiled} = tile0 + u0")
                loop.line(f"{last} = tile1 + u1")
                loop.extend(body)
        with loop.block("else:"):
            with loop.block(f"for {tiled} in range(tile0, min(tile0 + {side}, {tiled_extent})):"), \
                    loop.block(f"for {last} in range(tile1, min(tile1 + {side}, {last_extent})):"):
                loop.extend(body)


def _concatenation_call(entry: str, sub: Graph, members: list[Node],
                        in_place: Mapping[KernelArray, KernelArray]) -> Call | None:
    """A kernel that only concatenates its inputs, as row copies: each array viewed as
    (the output's extent before the axis, the rest), each input's rows copied into its columns
    of the output's rows, one loop over (row, input) pairs, each copy between two 1-D rows (a
    loop LLVM vectorises; indexing the 2-D arrays in it, it did not). The pointwise form picks
    the input at every element through a chain of selects: lstm-28's 27 gate gradients (four
    64 x 128 blocks each), one thread, 26 -> 8 us each, the step 10.3 -> 9.5 ms. None for any
    other kernel."""
    if in_place or len(members) != 1 or members[0].op != "concatenate":
        return None
    node = members[0]
    if sub.output_values != [node.output] or any(
            v not in sub.input_values or v.dtype != node.output.dtype for v in node.inputs):
        return None
    arrays = kernel_arrays(sub)
    axis, shape = node.attrs["axis"], node.output.shape
    rows, parts = size_of(shape[:axis]), len(node.inputs)
    if rows == 0 or node.output.type.size == 0:
        return None
    parallel = runs_parallel(node.output.type.size)
    names = [arrays[v].name for v in node.inputs]
    out = arrays[node.output].name
    body = Writer()
    body.line(decorator(parallel, fastmath=False))
    params = [a.name for a in arrays.values()]
    with body.block(f"def {entry}({', '.join(params)}):"):
        body.line("at0 = 0")
        for i, name in enumerate(names[:-1]):
            body.line(f"at{i + 1} = at{i} + {name}.shape[1]")
        with body.block(loop_header("k", f"{out}.shape[0] * {parts}", parallel)):
            body.line(f"r, part = k // {parts}, k % {parts}")
            if parts == 1:
                body.line(f"src, at = {names[0]}[r], at0")
            for i, name in enumerate(names if parts > 1 else []):
                with body.block("else:" if i == parts - 1 else f"{'el' if i else ''}if part == {i}:"):
                    body.line(f"src, at = {name}[r], at{i}")
            body.line(f"dst = {out}[r, at:at + src.size]")
            with body.block("for j in range(src.size):"):
                body.line("dst[j] = src[j]")
    views = tuple((rows, v.type.size // rows) for v in arrays)
    return Call(module(entry, body), entry, tuple(arrays.values()), parallel=parallel, views=views)


def elementwise_flops(members: list[Node]) -> int:
    return sum(m.output.type.size for m in members if get(m.op).kind == ELEMENTWISE)


def elementwise_call(entry: str, sub: Graph, in_place: Mapping[KernelArray, KernelArray] | None = None) -> Call:
    """One loop nest computing every member of `sub` at each index of their common shape.
    Its parameters are named after `sub`'s inputs and outputs (x0.., y0..), then the extents.

    `in_place` maps an output of `sub` to the input whose buffer the memory plan gives it: the
    output is no parameter then, its elements are stored through the input's. The two would be
    one array anyway, but through two parameters LLVM must assume they might overlap: it checks
    at run time, finds they do, and runs its unvectorised loop instead (the MNIST CNN's dropout
    gradient, 590k elements in place: 1059 -> 197 us)."""
    in_place = in_place or {}
    members = members_of(sub)
    concatenation = _concatenation_call(entry, sub, members, in_place)
    if concatenation is not None:
        return concatenation
    shape = members[0].output.shape
    flat = is_flat(members)
    size = size_of(shape)
    parallel = runs_parallel(size)
    arrays = kernel_arrays(sub)
    params = {v: array for v, array in arrays.items() if array not in in_place}
    names = {v: in_place.get(array, array).name for v, array in arrays.items()}
    views = None if flat else _collapsed_views(members, sub)
    emitter = PointwiseEmitter(sub, names, CPU, flat, views)
    if flat:
        dims, domain = (size,), Domain(("i",), ("n",), flat=True)
    else:
        dims = views[members[0].output] if views else shape
        domain = Domain(tuple(f"i{d}" for d in range(len(dims))),
                        tuple(f"n{d}" for d in range(len(dims))))

    tiled_axis = None if flat or views else _moved_last_axis(members, sub, shape)
    loop = Writer(depth=1)
    point = Writer() if tiled_axis is not None else loop
    if tiled_axis is None and parallel and len(dims) > 2:
        _parallel_rows(loop, domain)
    elif tiled_axis is None:
        for d, (i, n) in enumerate(zip(domain.index, domain.dims)):
            loop.line(loop_header(i, n, parallel and d == 0))
            loop.depth += 1
    for m in members:
        emitter.emit(point, m, domain)
    for v in sub.output_values:
        point.line(f"{names[v]}[{index_text(domain.index)}] = {emitter.locals[v]}")
    if tiled_axis is not None:  # around the body, which they repeat for the ragged edges
        _tiled_loops(loop, domain, tiled_axis, parallel, point)

    scalars = emitter.arguments
    body = Writer()
    body.line(decorator(parallel))
    names = [a.name for a in params.values()] + list(domain.dims) + list(scalars)
    with body.block(f"def {entry}({', '.join(names)}):"):
        body.extend(emitter.prelude)
    body.extend(loop)
    passed = tuple(views.get(v) for v in params) + (None,) * (len(dims) + len(scalars)) if views else ()
    return Call(module(entry, body, emitter.helpers, fastmath=IEEE_FASTMATH_FLAGS), entry,
                tuple(params.values()) + tuple(dims) + tuple(scalars.values()),
                flat=flat, parallel=parallel, views=passed)


def generate_elementwise(kernel: Node, in_place: Mapping[KernelArray, KernelArray] | None = None) -> KernelSource:
    """The kernel as one loop nest; `in_place` as for `elementwise_call` (the kernel's arrays)."""
    call = elementwise_call(entry_name(kernel.attrs["name"]), kernel.subgraph, in_place)
    return KernelSource(kernel.attrs["name"], kernel.attrs["pattern"], [call],
                        flops=elementwise_flops(members_of(kernel.subgraph)))
