"""Library kernels: `moments`, the mean and biased variance of each kept line in one pass, and
`normalize` / `normalize_grad`, a line each (see the end of the file).

The operand is passed as a (before, kept, after) view and the output as (2, kept), so one
compiled function serves layer norm's rows (before = 1) and batch norm's channels. Each kept
index is read twice: first for its mean (the sum of x - x0, x0 its first element), then for the
sums of x - mean and its square, from which the variance comes with its digits whatever the
mean (one pass over x - x0 and its square lost three digits where x0 lay far from the mean: an
activation of 300 among ones, a transformer's massive activation). Rows of up to 4096 elements
are summed in x's dtype and the rows' sums in float64, which keeps the digits over many rows.
With after = 1 (batch norm over (N, C)), the channels are contiguous, so the kernel walks the
rows and accumulates every channel at once, in float64, shifted by the first row.
"""
from __future__ import annotations

from typing import Callable

from graphc.ir import Node
from graphc.ir.lowering import lowering
from graphc.ir.ops.norm import lines_view
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
    """The mean and variance from the sums of d = x - shift and of d^2: exact where shift is
    the mean but for rounding (the mean of d is then only that rounding's residue)."""
    w.line(f"mean = {total} / n")
    w.line(f"out[0, {c}] = {shift} + mean")
    w.line(f"out[1, {c}] = max({squares} / n - mean * mean, 0.0)")


@lowering(TARGET, "moments")
def _moments(node: Node, refs: Refs) -> tuple[list[Call], int]:
    x = node.inputs[0]
    view = lines_view(x.shape, node.attrs["axes"])
    parallel = view[1] > 1 and runs_parallel(size_of(x.shape))
    acc = np_type(x.dtype if view[2] <= LONGEST_ROW_IN_OWN_DTYPE else "float64")

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
            w.line(f"x0 = {acc}(x[0, c, 0])")
            _write_centre(w, acc, {}, [])
            _write_statistics(w, "c", "np.float64(centre)", "c_total", "c_squares")

    call = library_call("moments", ["x", "out"], [refs[x], refs[node.output]], parallel, body)
    call.views = (view, (2, view[1]))
    return [call], 5 * size_of(x.shape)


# -- normalize, normalize_grad: one line per iteration, the lines in parallel -------------------
# Arrays are passed as (before, kept, after) views, as `moments`'s operand: a kept index c is a
# line (a row of layer norm's, a channel of batch norm's). Each kernel reads its line three
# times: for the mean (the sum of x - x0), for the sums of x - mean and its square (as `moments`
# takes them), then to write the output; the line is still in cache for the later passes. Runs
# of up to LONGEST_ROW_IN_OWN_DTYPE are summed and normalised in x's dtype: float32 sums and
# arithmetic vectorise twice as wide (transformer-m's 1024 x 128 rows, one thread: 30 us against
# 61 us in float64).
def _write_line_sums(w: Writer, acc: str, terms: dict[str, str], setup: list[str]) -> None:
    """A float64 sum over the line of each term (named by its key), each run of `after` summed
    in `acc` first; the `setup` lines bind what the terms read."""
    for name in terms:
        w.line(f"{name} = 0.0")
    with w.block("for a in range(before):"):
        for name in terms:
            w.line(f"{name}_run = {acc}(0.0)")
        with w.block("for k in range(after):"):
            for line in setup:
                w.line(line)
            for name, term in terms.items():
                w.line(f"{name}_run += {term}")
        for name in terms:
            w.line(f"{name} += np.float64({name}_run)")


def _write_centre(w: Writer, acc: str, sums: dict[str, str], setup: list[str]) -> None:
    """`centre`, the line's mean to a rounding (from the sum of x - x0, x0 its first element),
    then the sums over the line of d = x - centre and d^2 (c_total, c_squares) and of `sums`
    more, whose terms may read d and what `setup` binds."""
    _write_line_sums(w, acc, {"shifted": "d"}, [f"d = {acc}(x[a, c, k]) - x0"])
    w.line(f"centre = {acc}(x0 + shifted / n)")
    _write_line_sums(w, acc, {"c_total": "d", "c_squares": "d * d", **sums},
                     [f"d = {acc}(x[a, c, k]) - centre", *setup])


def _write_statistics_from_sums(w: Writer, acc: str, epsilon: str) -> None:
    """mean and rstd from the sums of d = x - centre and of d^2 (`_write_centre`); residual, the
    mean of d, is centre's rounding error."""
    w.line("residual = c_total / n")
    w.line(f"mean = {acc}(centre + residual)")
    w.line(f"rstd = {acc}(1.0 / np.sqrt(max(c_squares / n - residual * residual, 0.0) + {epsilon}))")


def _line_call(node: Node, refs: Refs, params: list[str],
               write_line: Callable[[Writer, str, str], None]) -> tuple[list[Call], int]:
    x = node.inputs[-1]
    view = lines_view(x.shape, node.attrs["axes"])
    parallel = view[1] > 1 and runs_parallel(size_of(x.shape))
    acc = np_type(x.dtype if view[2] <= LONGEST_ROW_IN_OWN_DTYPE else "float64")

    def body(w: Writer) -> None:
        w.line("before, kept, after = x.shape")
        w.line("n = before * after")
        with w.block(loop_header("c", "kept", parallel)):
            w.line(f"x0 = {acc}(x[0, c, 0])")
            write_line(w, acc, literal(node.attrs["epsilon"], "float64"))

    args = [refs[v] for v in node.inputs] + [refs[node.output]]
    call = library_call(node.op, params, args, parallel, body)
    call.views = (view,) * len(args)
    return [call], 6 * size_of(x.shape)


@lowering(TARGET, "normalize")
def _normalize(node: Node, refs: Refs) -> tuple[list[Call], int]:
    def write_line(w: Writer, acc: str, epsilon: str) -> None:
        _write_centre(w, acc, {}, [])
        _write_statistics_from_sums(w, acc, epsilon)
        with w.block("for a in range(before):"):
            with w.block("for k in range(after):"):
                w.line(f"out[a, c, k] = ({acc}(x[a, c, k]) - mean) * rstd")

    return _line_call(node, refs, ["x", "out"], write_line)


@lowering(TARGET, "normalize_grad")
def _normalize_grad(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """dx = rstd (g - mean(g) - xhat mean(g xhat)), xhat = (x - mean) rstd. The sums take
    e = g - g0, g0 the line's first element, which changes neither g - mean(g) nor, as xhat sums
    to zero, mean(g xhat): an offset in g then costs no digits, as the mean's does not in x.
    <e, x - mean> is sum(e d) - sum(e) residual, d = x - centre (`_write_centre`)."""
    def write_line(w: Writer, acc: str, epsilon: str) -> None:
        w.line(f"g0 = {acc}(g[0, c, 0])")
        _write_centre(w, acc, {"e_total": "e", "e_dot_d": "e * d"}, [f"e = {acc}(g[a, c, k]) - g0"])
        _write_statistics_from_sums(w, acc, epsilon)
        w.line(f"e_mean = {acc}(e_total / n)")
        w.line(f"g_normalised_mean = {acc}((e_dot_d - e_total * residual) * rstd / n)")
        with w.block("for a in range(before):"):
            with w.block("for k in range(after):"):
                w.line(f"normalised = ({acc}(x[a, c, k]) - mean) * rstd")
                w.line(f"out[a, c, k] = rstd * ({acc}(g[a, c, k]) - g0 - e_mean"
                       " - normalised * g_normalised_mean)")

    return _line_call(node, refs, ["g", "x", "out"], write_line)
