"""Library kernels: max and average pooling and their gradients, looping over each image
plane's windows, planes in parallel.
"""
from __future__ import annotations

from typing import Callable

from graphc.ir import Node
from graphc.ir.lowering import register_lowering
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.source import Writer, size_of

from .codegen_common import (HELPER_DECORATOR, TARGET, Call, decorator, loop_header,
                             module, runs_parallel)
from .codegen_conv import zero_plane


def _per_plane(entry: str, params: list[str], args: list[KernelArray], constants: dict[str, int],
               plane_params: list[str], plane_args: str, plane_body: Callable[[Writer], None],
               parallel: bool, planes_of: str, helpers: tuple[str, ...] = ()) -> Call:
    """entry(*params) calls plane(*plane_args) for every image plane (n, c) of `planes_of`, the
    planes in parallel when `parallel`. The loops live in `plane`, a serial helper, because
    Numba optimises loop nests inside a parallel loop's body far worse (3-5x slower measured).
    The window geometry is module constants, so the loops over a 2x2 window are unrolled."""
    geometry = "\n".join(f"{name} = {value}" for name, value in constants.items())
    helper = Writer()
    helper.line(HELPER_DECORATOR)
    with helper.block(f"def plane({', '.join(plane_params)}):"):
        plane_body(helper)
    w = Writer()
    w.line(decorator(parallel))
    with w.block(f"def {entry}({', '.join(params)}):"):
        w.line(f"N, C = {planes_of}.shape[0], {planes_of}.shape[1]")
        with w.block(loop_header("nc", "N * C", parallel)):
            w.line("n, c = nc // C, nc % C")
            w.line(f"plane({plane_args})")
    return Call(module(entry, w, [geometry, *helpers, helper.text()], fastmath=True), entry, tuple(args),
                parallel=parallel)


# -- pooling --------------------------------------------------------------------------------------
def _window_loops(w: Writer) -> None:
    """Open the loops over output positions; bind the window's cells inside the image: rows
    i0..i1-1 and columns j0..j1-1 of the kernel (the others are padding). Without padding
    every window lies inside: the bounds are then the constants 0 and KH (KW), and the window
    loops unroll (max-pool forward on 2x2 windows: 3.2 -> 0.9 ms for the MNIST CNN)."""
    w.line("for oh in range(OH):")
    w.depth += 1
    w.line("ih0 = oh * SH - PH")
    w.line("i0, i1 = (0, KH) if PH == 0 else (max(0, -ih0), min(KH, H - ih0))")
    w.line("for ow in range(OW):")
    w.depth += 1
    w.line("iw0 = ow * SW - PW")
    w.line("j0, j1 = (0, KW) if PW == 0 else (max(0, -iw0), min(KW, W - iw0))")


def _max_pool_plane(w: Writer) -> None:
    """Padding is -inf, which never raises a maximum: only real cells are read."""
    w.line("(H, W), (OH, OW) = x.shape, y.shape")
    _window_loops(w)
    w.line("best = -np.inf")
    with w.block("for i in range(i0, i1):"), w.block("for j in range(j0, j1):"):
        w.line("v = x[ih0 + i, iw0 + j]")
        with w.block("if v > best or v != v:"):  # a NaN, once seen, stays
            w.line("best = v")
    w.line("y[oh, ow] = best")


def _max_pool_grad_plane(w: Writer) -> None:
    """Each window's cotangent goes to its first maximum in row-major order among its real
    cells (a NaN counts as the maximum; padding never takes it), as in PyTorch."""
    w.line("(H, W), (OH, OW) = x.shape, dy.shape")
    zero_plane(w, "dx")
    _window_loops(w)
    _first_maximum_search(w, "i0", "j0", "i1", "j1")
    w.line("dx[ih0 + best_i, iw0 + best_j] += dy[oh, ow]")


def _first_maximum_search(w: Writer, i0: str, j0: str, i1: str, j1: str) -> None:
    """Bind best, best_i, best_j: the window's first maximum, a NaN counting as the maximum."""
    w.line(f"best, best_i, best_j = x[ih0 + {i0}, iw0 + {j0}], {i0}, {j0}")
    with w.block(f"for i in range({i0}, {i1}):"), w.block(f"for j in range({j0}, {j1}):"):
        w.line("v = x[ih0 + i, iw0 + j]")
        with w.block("if v > best or (v != v and best == best):"):
            w.line("best, best_i, best_j = v, i, j")


# Windows of up to this many cells are unrolled by the tiled max-pool gradient.
TILED_POOL_MAX_CELLS = 16


def _tiled_max_pool_grad_plane(kh: int, kw: int) -> tuple[Callable[[Writer], None], str]:
    """The max-pool gradient when the windows tile the plane (stride = window, no padding), as
    in the usual 2x2/2 pooling: every cell lies in at most one window, so each is written once,
    with no zeroing pass and no accumulation. Returns the plane body and its row helper.

    A row of windows is one branch-free loop (`window_row`): the maximum, then a flag per cell
    for "equals it, and no earlier cell did", the cotangent times that flag. The window's rows
    of x and dx are separate arguments, so the loop vectorises (a loop storing to two rows of
    one array does not): the MNIST CNN's 64x64x24x24 gradient takes 3.0 ms on one thread, 4.8 ms
    with a branch per window (alternated in one process). A row holding a NaN, or a non-finite
    cotangent (inf * 0 would be NaN), is then redone by the general search. A cell that is not
    the maximum gets g * 0, which is -0.0 for a negative g."""
    cells = [(i, j) for i in range(kh) for j in range(kw)]
    rows = ", ".join([f"x{i}" for i in range(kh)] + ["g"] + [f"d{i}" for i in range(kh)])
    helper = Writer()
    helper.line(HELPER_DECORATOR)
    with helper.block(f"def window_row({rows}):"):
        helper.line('"""The windows of one row (see _tiled_max_pool_grad_plane); whether one needs the search."""')
        helper.line("needs_search = False")
        with helper.block("for ow in range(g.shape[0]):"):
            helper.line("iw0 = ow * KW")
            helper.line("gv = g[ow]")
            for k, (i, j) in enumerate(cells):
                helper.line(f"v{k} = x{i}[iw0 + {j}]")
            values = ", ".join(f"v{k}" for k in range(len(cells)))
            helper.line(f"top = max({values})")
            for k in range(len(cells) - 1):
                helper.line(f"k{k} = v{k} == top" + (" and not seen" if k else ""))
                helper.line("seen = k0" if k == 0 else f"seen = seen or k{k}")
            helper.line(f"k{len(cells) - 1} = not seen")
            for k, (i, j) in enumerate(cells):
                helper.line(f"d{i}[iw0 + {j}] = gv * k{k}")
            nan = " | ".join(f"(v{k} != v{k})" for k in range(len(cells)))
            helper.line(f"needs_search |= {nan} | (gv != gv) | (abs(gv) == np.inf)")
        helper.line("return needs_search")

    def body(w: Writer) -> None:
        w.line("(H, W), (OH, OW) = x.shape, dy.shape")
        # cells no window covers (H or W not a multiple of the window) get no cotangent
        with w.block("for ih in range(OH * KH, H):"), w.block("for iw in range(W):"):
            w.line("dx[ih, iw] = 0")
        with w.block("for ih in range(OH * KH):"), w.block("for iw in range(OW * KW, W):"):
            w.line("dx[ih, iw] = 0")
        with w.block("for oh in range(OH):"):
            w.line("ih0 = oh * KH")
            arguments = ([f"x[ih0 + {i}]" for i in range(kh)] + ["dy[oh]"]
                         + [f"dx[ih0 + {i}]" for i in range(kh)])
            with w.block(f"if window_row({', '.join(arguments)}):"):
                with w.block("for ow in range(OW):"):
                    w.line("iw0 = ow * KW")
                    with w.block("for i in range(KH):"), w.block("for j in range(KW):"):
                        w.line("dx[ih0 + i, iw0 + j] = 0")
                    _first_maximum_search(w, "0", "0", "KH", "KW")
                    w.line("dx[ih0 + best_i, iw0 + best_j] = dy[oh, ow]")
    return body, helper.text()


def _divisor(w: Writer) -> None:
    """The kernel area, or (without INCLUDE_PAD) the real cells the window covers."""
    w.line("divisor = KH * KW if INCLUDE_PAD else (i1 - i0) * (j1 - j0)")


def _avg_pool_plane(w: Writer) -> None:
    w.line("(H, W), (OH, OW) = x.shape, y.shape")
    _window_loops(w)
    w.line("total = 0.0")
    with w.block("for i in range(i0, i1):"), w.block("for j in range(j0, j1):"):
        w.line("total += x[ih0 + i, iw0 + j]")
    _divisor(w)
    w.line("y[oh, ow] = total / divisor")


def _avg_pool_grad_plane(w: Writer) -> None:
    w.line("(H, W), (OH, OW) = dx.shape, dy.shape")
    zero_plane(w, "dx")
    _window_loops(w)
    _divisor(w)
    w.line("share = dy[oh, ow] / divisor")
    with w.block("for i in range(i0, i1):"), w.block("for j in range(j0, j1):"):
        w.line("dx[ih0 + i, iw0 + j] += share")


def _pool(entry: str, operands: list[str], plane_body: Callable[[Writer], None],
          tiled_body: Callable[[int, int], tuple[Callable[[Writer], None], str]] | None = None):
    """Lowering of a pooling op whose operands are named `operands`, its output last; with
    `tiled_body`, windows that tile the plane (stride = window, no padding, few cells) get
    the plane body and helper it makes for their size."""
    def lower(node: Node, refs: Refs) -> tuple[list[Call], int]:
        values = list(node.inputs) + [node.output]
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        geometry = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw)
        if "count_include_pad" in a:
            geometry["INCLUDE_PAD"] = int(a["count_include_pad"])
        tiled = (sh, sw, ph, pw) == (kh, kw, 0, 0) and 2 <= kh * kw <= TILED_POOL_MAX_CELLS
        body, helpers = plane_body, ()
        if tiled and tiled_body is not None:
            body, helper = tiled_body(kh, kw)
            helpers = (helper,)
        parallel = runs_parallel(max(size_of(v.shape) for v in values))
        plane_args = ", ".join(f"{name}[n, c]" for name in operands)
        call = _per_plane(entry, operands, [refs[v] for v in values], geometry, operands,
                          plane_args, body, parallel, operands[0], helpers)
        # one comparison or addition per window cell of every pooled element
        return [call], min(size_of(v.shape) for v in values) * kh * kw
    return lower


for _op, _lowering in {
        "max_pool2d": _pool("max_pool2d", ["x", "y"], _max_pool_plane),
        "max_pool2d_grad": _pool("max_pool2d_grad", ["x", "dy", "dx"], _max_pool_grad_plane,
                                 _tiled_max_pool_grad_plane),
        "avg_pool2d": _pool("avg_pool2d", ["x", "y"], _avg_pool_plane),
        "avg_pool2d_grad": _pool("avg_pool2d_grad", ["dy", "dx"], _avg_pool_grad_plane)}.items():
    register_lowering(TARGET, _op, _lowering)
