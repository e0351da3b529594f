"""Library kernels: cumsum and cumprod along one axis; argsort.

The operand and the output are passed as (outer, n, inner) views, n the cumulated axis, so one
compiled function serves every rank and axis. Each step adds (multiplies) a whole contiguous
row of `inner` elements into the running one: the inner loop reads and writes memory in order.
The outer lines run in parallel when there are enough elements.
"""
from __future__ import annotations

from graphc.ir import Node
from graphc.ir.lowering import lowering
from graphc.ir.ops.softmax import lines_view  # (outer, n, inner) around one axis
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.source import Writer, size_of

from .codegen_common import TARGET, Call, library_call, loop_header, runs_parallel

_COMBINE = {"cumsum": "+", "cumprod": "*"}


@lowering(TARGET, "cumsum", "cumprod")
def _cumulative(node: Node, refs: Refs) -> tuple[list[Call], int]:
    x = node.inputs[0]
    axis, reverse = node.attrs["axis"], node.attrs["reverse"]
    view = lines_view(x.shape, axis)
    parallel = view[0] > 1 and runs_parallel(size_of(x.shape))
    combine = _COMBINE[node.op]

    def body(w: Writer) -> None:
        w.line("outer, n, inner = x.shape")
        with w.block(loop_header("o", "outer", parallel)):
            steps = "range(n - 1, -1, -1)" if reverse else "range(n)"
            first = "n - 1" if reverse else "0"
            previous = "i + 1" if reverse else "i - 1"
            with w.block(f"for i in {steps}:"):
                with w.block(f"if i == {first}:"):
                    with w.block("for k in range(inner):"):
                        w.line("y[o, i, k] = x[o, i, k]")
                with w.block("else:"):
                    with w.block("for k in range(inner):"):
                        w.line(f"y[o, i, k] = y[o, {previous}, k] {combine} x[o, i, k]")

    entry = node.op + ("_reverse" if reverse else "")
    call = library_call(entry, ["x", "y"], [refs[x], refs[node.output]], parallel, body)
    call.views = (view, view)
    return [call], size_of(x.shape)


@lowering(TARGET, "argsort")
def _argsort(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """Each line is copied into a contiguous buffer and sorted by NumPy's stable merge sort
    (Numba's, which orders NaN last as NumPy does); descending sorts the line read backwards and
    reads the order backwards, which keeps ties in their own order (ir/ops/cumulative.py)."""
    x = node.inputs[0]
    descending = node.attrs["descending"]
    view = lines_view(x.shape, node.attrs["axis"])
    parallel = view[0] > 1 and runs_parallel(size_of(x.shape))

    def body(w: Writer) -> None:
        w.line("outer, n, inner = x.shape")
        with w.block(loop_header("o", "outer", parallel)):
            w.line("line = np.empty(n, x.dtype)")
            with w.block("for k in range(inner):"):
                with w.block("for i in range(n):"):
                    w.line(f"line[i] = x[o, {'n - 1 - i' if descending else 'i'}, k]")
                w.line("order = np.argsort(line, kind='mergesort')")
                with w.block("for i in range(n):"):
                    w.line(f"y[o, i, k] = {'n - 1 - order[n - 1 - i]' if descending else 'order[i]'}")

    entry = "argsort" + ("_descending" if descending else "")
    call = library_call(entry, ["x", "y"], [refs[x], refs[node.output]], parallel, body, fastmath=False)
    call.views = (view, view)
    return [call], 0  # comparisons and moves, no arithmetic
