"""Library kernels: `moments`, the mean and biased variance of each kept line in one pass, and
`layer_norm` / `layer_norm_grad`, a row each (see the end of the file).

The operand is passed as a (before, kept, after) view and the output as (2, kept), so one
compiled function serves layer norm's rows (before = 1) and batch norm's channels. Each kept
index accumulates x - x0 and its square, x0 its first element: shifting by a value of the data
keeps the variance's digits when the mean is large against the spread. Rows of up to 4096
elements are summed in x's dtype and the rows' sums in float64, which keeps the digits over
many rows. With after = 1 (batch norm over (N, C)), the channels are
contiguous, so the kernel walks the rows and accumulates every channel at once.
"""
from __future__ import annotations

from typing import Callable

from graphc.ir import Node
from graphc.ir.lowering import lowering
from graphc.ir.ops.norm import lines_view, rows_view
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.source import Writer, literal, np_type, size_of

from .codegen_common import TARGET, Call, library_call, loop_header, runs_parallel


# Rows up to this long are summed in x's own dtype, each row's sum then joining the float64
# total: float32 partial sums vectorise twice as wide and need no conversions (a batch norm's
# 32 x 64 x 256 operand, one thread: 41 us against 70 us in float64 throughout). Longer rows
# sum in float64. (Splitting rows into runs of fixed length kept LLVM from vectorising the
# loop: 280 us.)
LONGEST_ROW_IN_OWN_DTYPE = 4096


def _write_statistics(w: Writer, c: str, shift: str, total: str, squares: str) -> None:
    w.line(f"mean = {total} / n")
    w.line(f"out[0, {c}] = {shift} + mean")
    w.line(f"out[1, {c}] = max({squares} / n - mean * mean, 0.0)")


@lowering(TARGET, "moments")
def _moments(node: Node, refs: Refs) -> tuple[list[Call], int]:
    x = node.inputs[0]
    view = lines_view(x.shape, node.attrs["axes"])
    parallel = view[1] > 1 and runs_parallel(size_of(x.shape))

    def body(w: Writer) -> None:
        w.line("before, kept, after = x.shape")
        w.line("n = before * after")
        with w.block("if after == 1:"):  # the kept axis is innermost: rows at a time
            w.line("shift = np.empty(kept, np.float64)")
            w.line("total = np.zeros(kept, np.float64)")
            w.line("squares = np.zeros(kept, np.float64)")
            with w.block("for c in range(kept):"):
                w.line("shift[c] = x[0, c, 0]")
            with w.block("for a in range(before):"):
                with w.block("for c in range(kept):"):
                    w.line("d = np.float64(x[a, c, 0]) - shift[c]")
                    w.line("total[c] += d")
                    w.line("squares[c] += d * d")
            with w.block("for c in range(kept):"):
                _write_statistics(w, "c", "shift[c]", "total[c]", "squares[c]")
            w.line("return")
        with w.block(loop_header("c", "kept", parallel)):
            w.line("shift = x[0, c, 0]")
            w.line("total = 0.0")
            w.line("squares = 0.0")
            with w.block("for a in range(before):"):
                with w.block(f"if after <= {LONGEST_ROW_IN_OWN_DTYPE}:"):
                    w.line("part = shift - shift")  # zero in x's dtype
                    w.line("part_squares = shift - shift")
                    with w.block("for k in range(after):"):
                        w.line("d = x[a, c, k] - shift")
                        w.line("part += d")
                        w.line("part_squares += d * d")
                    w.line("total += np.float64(part)")
                    w.line("squares += np.float64(part_squares)")
                with w.block("else:"):
                    with w.block("for k in range(after):"):
                        w.line("d = np.float64(x[a, c, k]) - np.float64(shift)")
                        w.line("total += d")
                        w.line("squares += d * d")
            _write_statistics(w, "c", "np.float64(shift)", "total", "squares")

    call = library_call("moments", ["x", "out"], [refs[x], refs[node.output]], parallel, body)
    call.views = (view, (2, view[1]))
    return [call], 3 * size_of(x.shape)


# -- layer_norm, layer_norm_grad: one row per iteration, the rows in parallel -------------------
# The operand and the output are passed as (rows, row length) views. A row is read a few times
# (its mean, its variance, then the output); at layer norm's row lengths it stays in L1 between
# the passes, so recomputing the statistics costs less than storing them. Two passes, as the
# reference takes them, so a mean large against the spread keeps the variance's digits. Rows up
# to LONGEST_ROW_IN_OWN_DTYPE are summed in x's dtype, as `moments` does: float32 sums and
# arithmetic halve the kernel's time (transformer-m's 1024 x 128 rows, one thread: 30 us against
# 61 us in float64).
def _accumulator(node: Node) -> str:
    """The dtype a row's sums and arithmetic are in: numpy's name for the constructor."""
    x = node.inputs[-1]
    short = rows_view(x.shape, node.attrs["axes"])[1] <= LONGEST_ROW_IN_OWN_DTYPE
    return np_type(x.dtype if short else "float64")


def _write_row_statistics(w: Writer, acc: str, epsilon: str) -> None:
    w.line(f"total = {acc}(0.0)")
    with w.block("for k in range(n):"):
        w.line(f"total += {acc}(x[r, k])")
    w.line(f"mean = {acc}(total / n)")
    w.line(f"squares = {acc}(0.0)")
    with w.block("for k in range(n):"):
        w.line(f"d = {acc}(x[r, k]) - mean")
        w.line("squares += d * d")
    w.line(f"rstd = {acc}(1.0 / np.sqrt(squares / n + {epsilon}))")


def _row_call(node: Node, refs: Refs, params: list[str],
              write_row: Callable[[Writer, str], None]) -> tuple[list[Call], int]:
    x = node.inputs[-1]
    view = rows_view(x.shape, node.attrs["axes"])
    parallel = view[0] > 1 and runs_parallel(size_of(x.shape))
    acc = _accumulator(node)

    def body(w: Writer) -> None:
        w.line("rows, n = x.shape")
        with w.block(loop_header("r", "rows", parallel)):
            _write_row_statistics(w, acc, literal(node.attrs["epsilon"], "float64"))
            write_row(w, acc)

    args = [refs[v] for v in node.inputs] + [refs[node.output]]
    call = library_call(node.op, params, args, parallel, body)
    call.views = (view,) * len(args)
    return [call], 4 * size_of(x.shape)


@lowering(TARGET, "layer_norm")
def _layer_norm(node: Node, refs: Refs) -> tuple[list[Call], int]:
    def write_row(w: Writer, acc: str) -> None:
        with w.block("for k in range(n):"):
            w.line(f"out[r, k] = ({acc}(x[r, k]) - mean) * rstd")

    return _row_call(node, refs, ["x", "out"], write_row)


@lowering(TARGET, "layer_norm_grad")
def _layer_norm_grad(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), xhat = (x - mean) rstd. The sums take g
    less its row's first element g0, which changes neither g - mean(g) nor, as xhat sums to
    zero, mean(g xhat): an offset in g then costs no digits, as the mean's does not in x."""
    def write_row(w: Writer, acc: str) -> None:
        w.line(f"g0 = {acc}(g[r, 0])")
        w.line(f"g_total = {acc}(0.0)")
        w.line(f"g_dot_centred = {acc}(0.0)")
        with w.block("for k in range(n):"):
            w.line(f"gk = {acc}(g[r, k]) - g0")
            w.line("g_total += gk")
            w.line(f"g_dot_centred += gk * ({acc}(x[r, k]) - mean)")
        w.line(f"g_mean = {acc}(g_total / n)")
        w.line(f"g_normalised_mean = {acc}(g_dot_centred * rstd / n)")
        with w.block("for k in range(n):"):
            w.line(f"normalised = ({acc}(x[r, k]) - mean) * rstd")
            w.line(f"out[r, k] = rstd * ({acc}(g[r, k]) - g0 - g_mean - normalised * g_normalised_mean)")

    return _row_call(node, refs, ["g", "x", "out"], write_row)
