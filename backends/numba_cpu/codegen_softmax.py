"""Library kernels: `softmax` and `softmax_grad` (ir/ops/softmax.py), one line at a time.

Operand and result are passed as (before, n, after) views, the line running along the middle
axis, and the lines (before * after of them) are split across threads when the tensor is
large. A softmax line is read three times while it is in cache: its max (through nan_maximum,
which vectorises where Python's max kept the loop scalar), then its shifted exponentials
(written out) and their sum, then the scaling. float32 exponentials go through exp_float32
(backends/kernels/pointwise.py), which vectorises where libm's expf keeps the loop scalar: 4096
rows of 64, one thread, 255 us against 760 us with np.exp.
"""
from __future__ import annotations

from graphc.ir import Node
from graphc.ir.lowering import lowering
from graphc.ir.ops.softmax import lines_view
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.pointwise import float32_math_helpers
from graphc.backends.kernels.source import Writer, size_of

from .codegen_common import CPU, TARGET, Call, decorator, loop_header, module, runs_parallel
from .codegen_reduction import INTRINSICS_IMPORT


def _line_loop(w: Writer, parallel: bool) -> None:
    """Open the loop over lines: `a`, `k` index a line of the (before, n, after) view."""
    w.line("before, n, after = y.shape")
    w.line(loop_header("line", "before * after", parallel))
    w.depth += 1
    w.line("a, k = line // after, line % after")


def _call(entry: str, params: list[str], node: Node, refs: Refs, write_body, float32: bool) -> Call:
    view = lines_view(node.output.shape, node.attrs["axis"])
    parallel = runs_parallel(size_of(node.output.shape)) and view[0] * view[2] > 1
    w = Writer()
    w.line(decorator(parallel))
    with w.block(f"def {entry}({', '.join(params)}):"):
        _line_loop(w, parallel)
        write_body(w)
    helpers = [INTRINSICS_IMPORT] + ([float32_math_helpers(CPU)] if float32 else [])
    args = tuple(refs[v] for v in node.inputs) + (refs[node.output],)
    return Call(module(entry, w, helpers, fastmath=True), entry, args, parallel=parallel,
                views=(view,) * len(args))


@lowering(TARGET, "softmax")
def _softmax(node: Node, refs: Refs) -> tuple[list[Call], int]:
    float32 = node.output.dtype == "float32"
    exp = "exp_float32" if float32 else "np.exp"
    zero_masked_rows = node.attrs["zero_masked_rows"]
    zero = "np.float32(0.0)" if float32 else "0.0"

    def body(w: Writer) -> None:
        w.line("peak = x[a, 0, k]")
        with w.block("for j in range(1, n):"):
            w.line("peak = nan_maximum(peak, x[a, j, k])")
        if zero_masked_rows:  # every entry -inf: exponentials of x - 0 are all 0, and so is y
            with w.block("if peak == -np.inf:"):
                w.line(f"peak = {zero}")
        w.line(f"total = {zero}")
        with w.block("for j in range(n):"):
            w.line(f"e = {exp}(x[a, j, k] - peak)")
            w.line("y[a, j, k] = e")
            w.line("total += e")
        w.line(f"scale = 1 / total if total > 0 else {zero}" if zero_masked_rows else "scale = 1 / total")
        with w.block("for j in range(n):"):
            w.line("y[a, j, k] *= scale")

    call = _call("softmax", ["x", "y"], node, refs, body, float32)
    return [call], 4 * size_of(node.output.shape)


@lowering(TARGET, "softmax_grad")
def _softmax_grad(node: Node, refs: Refs) -> tuple[list[Call], int]:
    zero = "np.float32(0.0)" if node.output.dtype == "float32" else "0.0"

    def body(w: Writer) -> None:
        w.line(f"total = {zero}")
        with w.block("for j in range(n):"):
            w.line("total += g[a, j, k] * p[a, j, k]")
        with w.block("for j in range(n):"):
            w.line("y[a, j, k] = p[a, j, k] * (g[a, j, k] - total)")

    call = _call("softmax_grad", ["g", "p", "y"], node, refs, body, float32=False)
    return [call], 4 * size_of(node.output.shape)
