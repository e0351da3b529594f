"""Library kernels: the scatters loop over their operand, in parallel over an axis on which
they cannot collide.
"""
from __future__ import annotations

from graphc.ir import Node
from graphc.ir.lowering import lowering
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.pointwise import broadcast_index
from graphc.backends.kernels.source import Writer, index_text, size_of

from .codegen_common import TARGET, Call, library_call, loop_header, runs_parallel


def _scatter_loops(w: Writer, rank: int, parallel_axis: int | None) -> tuple[str, ...]:
    index = tuple(f"i{d}" for d in range(rank))
    for d, i in enumerate(index):
        w.line(loop_header(i, f"g.shape[{d}]", d == parallel_axis))
        w.depth += 1
    return index


@lowering(TARGET, "scatter_add_along_axis")
def _scatter_add_along_axis(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """out[..., indices[i], ...] += g[i]. Parallel over axis 0 when each iteration owns its own
    slice of the output (not the scattered axis, not a broadcast one)."""
    g, indices = node.inputs
    axis = node.attrs["axis"]
    shape = node.output.shape
    parallel = (axis != 0 and shape[0] == g.shape[0]
                and runs_parallel(size_of(g.shape)))

    def body(w: Writer) -> None:
        w.line("out[...] = 0")
        index = _scatter_loops(w, len(g.shape), 0 if parallel else None)
        target = list(broadcast_index(index, shape, g.shape))
        target[axis] = f"indices[{index_text(broadcast_index(index, indices.shape, g.shape))}]"
        w.line(f"out[{index_text(tuple(target))}] += g[{index_text(index)}]")

    call = library_call("scatter_add_along_axis", ["g", "indices", "out"],
                        [refs[g], refs[indices], refs[node.output]], parallel, body)
    return [call], size_of(g.shape)


@lowering(TARGET, "scatter_add")
def _scatter_add(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """out[pre, indices[mid], post] += g[pre, mid, post]; parallel over the first pre axis."""
    g, indices = node.inputs
    axis = node.attrs["axis"]
    rank = indices.type.ndim
    parallel = axis > 0 and runs_parallel(size_of(g.shape))

    def body(w: Writer) -> None:
        w.line("out[...] = 0")
        index = _scatter_loops(w, len(g.shape), 0 if parallel else None)
        target = index[:axis] + (f"indices[{index_text(index[axis:axis + rank])}]",) + index[axis + rank:]
        w.line(f"out[{index_text(target)}] += g[{index_text(index)}]")

    call = library_call("scatter_add", ["g", "indices", "out"], [refs[g], refs[indices], refs[node.output]],
                        parallel, body)
    return [call], size_of(g.shape)
