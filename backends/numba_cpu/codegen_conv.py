"""Library kernels: conv2d and its gradients, image by image, the batch split into one chunk per
thread: an image's receptive fields are copied into the thread's (C*kh*kw, Ho*Wo) column
matrix (im2col), which one GEMM per group then multiplies straight into NCHW. The column
matrix stays in cache between the two (a whole batch's, 40 MB for the MNIST CNN, went through
memory twice and ran 1.5x slower). A layer's forward and weight gradient, which both im2col
its input, are two modes of one function. 3x3 stride-1 layers with enough channels run as
Winograd F(2x2, 3x3) instead (codegen_winograd.py).
"""
from __future__ import annotations

from typing import Callable

import numba

from graphc.ir import Node, Value
from graphc.ir.lowering import lowering
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.source import Writer, size_of

from .codegen_common import (HELPER_DECORATOR, HELPER_OPTIONS, TARGET, Call,
                             decorator, module, runs_parallel)
from .codegen_matmul import gemm_call
from .codegen_winograd import (ENTRY, FORWARD, INPUT_GRAD, WEIGHT_GRAD, winograd_applies, winograd_scratch,
                               winograd_source, winograd_tile)


# A convolution's geometry is integer arguments of its kernel, so that one compiled module serves
# layers of many shapes (resnet-m compiled conv2d_im2col three times and conv2d_input_grad twice,
# ~1 s each on one thread, 4.7 s parallel; now twice and once): the window size comes from the
# filters' shape, row stride, padding and dilation are GEOMETRY. The column stride SW stays a
# module constant: it picks the plane helper (at stride 1 a copy per row, which vectorises;
# otherwise one strided 2-D copy per kernel cell), and the row copies run fast only when it is
# known (as an argument, behind an `if SW == 1` or with a second plane helper compiled for
# stride 1, the MNIST CNN's first layer ran 12-30% slower, a 1x1 stride-2 projection 12-24%;
# with SW alone constant, resnet-m's im2col kernels take 31.2 ms a step against 30.3).
GEOMETRY = ("SH", "PH", "PW", "DH", "DW")


def _geometry_args(node: Node) -> tuple[int, ...]:
    """The values of GEOMETRY for this conv node."""
    (sh, _), (ph, pw), (dh, dw) = node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"]
    return sh, ph, pw, dh, dw


def _unpack_geometry(w: Writer) -> None:
    """Bind KH, KW, SH, ... from the `geometry` tuple the entry passes to its plane helper."""
    w.line(f"KH, KW, {', '.join(GEOMETRY)} = geometry")


def _output_size(w: Writer) -> None:
    """Bind OH, OW: the conv output size for an H x W input plane."""
    w.line("OH = (H + 2 * PH - DH * (KH - 1) - 1) // SH + 1")
    w.line("OW = (W + 2 * PW - DW * (KW - 1) - 1) // SW + 1")


def _columns_inside(w: Writer) -> None:
    """Bind `start`, `lo`, `hi`: output columns lo..hi-1 read input columns ow*SW + start that
    lie inside the image (the others read padding), so the inner loops need no tests."""
    w.line("start = j * DW - PW")
    w.line("lo = min(OW, max(0, -(start // SW)))")
    w.line("hi = max(lo, min(OW, (W - 1 - start) // SW + 1))")


def _rows_inside(w: Writer) -> None:
    """Bind `top`, `first`, `last`: output rows first..last-1 read input rows oh*SH + top that
    lie inside the image, for kernel row i."""
    w.line("top = i * DH - PH")
    w.line("first = min(OH, max(0, -(top // SH)))")
    w.line("last = max(first, min(OH, (H - 1 - top) // SH + 1))")


def _im2col_rows(w: Writer) -> None:
    """col[row0 + (i, j), p] = x[input position output p reads at kernel cell (i, j)] for one
    image plane x (zero in the padding), for column stride 1: a copy per output row, over views
    with indices counting from 0, so Numba's negative-index wraparound folds away and LLVM
    vectorises them (3x faster than indexing the whole row, and Numba's slice assignment is
    slower still on rows this short)."""
    w.line("H, W = x.shape")
    _output_size(w)
    with w.block("for i in range(KH):"), w.block("for j in range(KW):"):
        w.line("dst = col[row0 + i * KW + j]")
        _columns_inside(w)
        with w.block("for oh in range(OH):"):
            w.line("ih = oh * SH - PH + i * DH")
            w.line("out = dst[oh * OW:(oh + 1) * OW]")
            with w.block("if ih < 0 or ih >= H:"):
                with w.block("for q in range(OW):"):
                    w.line("out[q] = 0")
                w.line("continue")
            with w.block("for q in range(lo):"):
                w.line("out[q] = 0")
            w.line("src, inside = x[ih, lo * SW + start:], out[lo:hi]")
            with w.block("for q in range(hi - lo):"):
                w.line("inside[q] = src[q * SW]")
            with w.block("for q in range(hi, OW):"):
                w.line("out[q] = 0")


def _im2col_strided(w: Writer) -> None:
    """_im2col_rows for a column stride over 1: per kernel cell, one copy between 2-D views (the
    column row as OH x OW, the cells it reads as a strided view of x) whose indices count from
    0. The strided copies do not vectorise either way, and a view per output row cost more than
    its copy on these small planes (resnet-m's 3x3 stride-2 convolution of 32 x 32 x 32 images,
    one thread: forward 5.7 -> 4.4 ms, input gradient 6.5 -> 4.3, weight gradient 6.6 -> 5.5;
    its 1x1 stride-2 projection 1.4 -> 0.5 ms forward). At stride 1 the row copies vectorise
    and stay faster (the stem 0.75 against 0.95 ms)."""
    w.line("H, W = x.shape")
    _output_size(w)
    with w.block("for i in range(KH):"):
        _rows_inside(w)
        with w.block("for j in range(KW):"):
            w.line("dst = col[row0 + i * KW + j].reshape((OH, OW))")
            _columns_inside(w)
            with w.block("for oh in range(OH):"):
                with w.block("if oh < first or oh >= last:"):
                    with w.block("for q in range(OW):"):
                        w.line("dst[oh, q] = 0")
                with w.block("else:"):
                    with w.block("for q in range(lo):"):
                        w.line("dst[oh, q] = 0")
                    with w.block("for q in range(hi, OW):"):
                        w.line("dst[oh, q] = 0")
            w.line("src, inside = x[first * SH + top::SH, lo * SW + start::SW], dst[first:last, lo:hi]")
            with w.block("for a in range(last - first):"):
                with w.block("for q in range(hi - lo):"):
                    w.line("inside[a, q] = src[a, q]")


def zero_plane(w: Writer, plane: str) -> None:
    """A loop, not `plane[:, :] = 0`: Numba's slice fill costs several times more on planes
    this small (measured on 24x24)."""
    with w.block(f"for ih in range({plane}.shape[0]):"), w.block(f"for iw in range({plane}.shape[1]):"):
        w.line(f"{plane}[ih, iw] = 0")


def _col2im_rows(w: Writer) -> None:
    """dx[ih, iw] = sum of dcol over the cells that read (ih, iw), for one image plane: the
    adjoint of _im2col_rows, with the same views counting from 0."""
    w.line("H, W = dx.shape")
    _output_size(w)
    zero_plane(w, "dx")
    with w.block("for i in range(KH):"), w.block("for j in range(KW):"):
        w.line("src = dcol[row0 + i * KW + j]")
        _columns_inside(w)
        with w.block("for oh in range(OH):"):
            w.line("ih = oh * SH - PH + i * DH")
            with w.block("if 0 <= ih and ih < H:"):
                w.line("row, dst = src[oh * OW + lo:oh * OW + hi], dx[ih, lo * SW + start:]")
                with w.block("for q in range(hi - lo):"):
                    w.line("dst[q * SW] += row[q]")


def _col2im_strided(w: Writer) -> None:
    """_col2im_rows for a column stride over 1: the adjoint of _im2col_strided, with the same
    2-D views."""
    w.line("H, W = dx.shape")
    _output_size(w)
    zero_plane(w, "dx")
    with w.block("for i in range(KH):"):
        _rows_inside(w)
        with w.block("for j in range(KW):"):
            _columns_inside(w)
            w.line("src = dcol[row0 + i * KW + j].reshape((OH, OW))[first:last, lo:hi]")
            w.line("dst = dx[first * SH + top::SH, lo * SW + start::SW]")
            with w.block("for a in range(last - first):"):
                with w.block("for q in range(hi - lo):"):
                    w.line("dst[a, q] += src[a, q]")


def _plane_copy(node: Node, rows: Callable[[Writer], None],
                strided: Callable[[Writer], None]) -> Callable[[Writer], None]:
    """The im2col (or col2im) plane body for this node's column stride, a module constant."""
    return rows if node.attrs["stride"][1] == 1 else strided


def _conv_module(entry: str, params: list[str], node: Node, plane_body: Callable[[Writer], None],
                 plane_params: str, body: Callable[[Writer], None], parallel: bool,
                 helpers: tuple[str, ...] = ()) -> str:
    """A conv module: the column stride as a constant, the serial per-plane helper (im2col or
    col2im, taking the rest of the geometry as one tuple) and any other `helpers`, and the entry
    `entry(*params)`, which loops over the batch in T chunks (`prange` over chunks) and calls
    the GEMM helper."""
    helper = Writer()
    helper.line(HELPER_DECORATOR)
    with helper.block(f"def plane({plane_params}, geometry):"):
        _unpack_geometry(helper)
        plane_body(helper)
    w = Writer()
    w.line(decorator(parallel, fastmath=False))
    with w.block(f"def {entry}({', '.join(params)}):"):
        body(w)
    column_stride = f"SW = {int(node.attrs['stride'][1])}"
    return module(entry, w, [column_stride, helper.text(), *helpers], gemm=True, fastmath=True)


def _batch(w: Writer, images: str) -> None:
    """Bind N (images), T (threads: one column matrix each) and chunk (images per thread)."""
    w.line(f"N, T = {images}.shape[0], scratch.shape[0]")
    w.line("chunk = -(-N // T)")


def _image_chunks(w: Writer, before_images: Callable[[Writer], None] | None = None) -> None:
    """Open `for t in prange(T)` and, inside it, the loop over chunk t's images `n`;
    `before_images` writes what each thread does first."""
    w.line("for t in prange(T):")
    w.depth += 1
    w.line("col = scratch[t]")
    if before_images is not None:
        before_images(w)
    w.line("for n in range(t * chunk, min(N, (t + 1) * chunk)):")
    w.depth += 1


def _close(w: Writer, levels: int) -> None:
    w.depth -= levels


def _group_rows(w: Writer, matrix: str) -> None:
    """Bind KH, KW (the window), `geometry` (what the plane helper takes), K (the columns of one
    group: in-channels/G * KH * KW) and og (its out-channels) from the filters `matrix`."""
    w.line(f"KH, KW = {matrix}.shape[2], {matrix}.shape[3]")
    w.line(f"geometry = (KH, KW, {', '.join(GEOMETRY)})")
    w.line(f"O, K = {matrix}.shape[0], {matrix}.shape[1] * KH * KW")
    w.line("og = O // G")


def _scratch_per_chunk(refs: Refs, images: int, rows: int, positions: int,
                       dtype: str) -> tuple[KernelArray, int]:
    """One (C*kh*kw, Ho*Wo) column matrix per thread (one thread for small convolutions): an
    image's receptive fields stay in cache between im2col and its GEMM, instead of a whole
    batch's going through memory. Returns the scratch and the number of threads."""
    threads = max(1, numba.config.NUMBA_NUM_THREADS)
    if not runs_parallel(images * rows * positions):
        threads = 1
    return refs.new_scratch((threads, rows, positions), dtype), threads


def _per_image_conv(entry: str, node: Node, refs: Refs, operands: dict[str, Value], images: str,
                    weight: Value, columns: tuple[int, int], sizes: str,
                    plane: tuple[Callable[[Writer], None], str],
                    steps: Callable[[Writer], None]) -> tuple[list[Call], int]:
    """A conv op as one function over image chunks (see `_image_chunks`). `operands` maps its
    array parameters to values, `images` names the batched one; `columns` is (channels,
    positions) of the column matrix, `sizes` the source binding C and P; `steps` writes the body
    run for image n, `plane` is the per-plane helper (body, parameters)."""
    n = operands[images].shape[0]
    (kh, kw), (channels, positions) = weight.shape[2:], columns
    col, threads = _scratch_per_chunk(refs, n, channels * kh * kw, positions, weight.dtype)
    params, args = list(operands) + ["scratch"], [refs[v] for v in operands.values()] + [col]

    def body(w: Writer) -> None:
        _batch(w, images)
        _group_rows(w, next(name for name, v in operands.items() if v is weight))
        w.line(f"C, P = {sizes}")
        _image_chunks(w)
        steps(w)
        _close(w, 2)

    source = _conv_module(entry, params + [*GEOMETRY, "G"], node, plane[0], plane[1], body, threads > 1)
    flops = _conv_flops(weight.shape, n * positions)
    args = (*args, *_geometry_args(node), node.attrs["groups"])
    return [Call(source, entry, args, parallel=threads > 1)], flops


# Helpers of the im2col module's weight gradient: loops in a parallel entry, even simple ones,
# add about a second to its compile time (each becomes a parfor or is optimised with it).
_ZERO_MATRIX = f"""@njit({HELPER_OPTIONS})
def zero(a):
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            a[i, j] = 0"""
_ADD_PARTIALS = f"""@njit({HELPER_OPTIONS})
def add_partials(partial, dw):
    \"\"\"dw (O, K) = the sum over threads t of partial[t], a thread's whole array at a time (a
    loop that vectorises, where an inner loop over the threads did not).\"\"\"
    T = partial.shape[0]
    flat = partial.reshape((T, partial[0].size))
    out = dw.reshape(flat.shape[1])
    for i in range(out.size):
        out[i] = flat[0, i]
    for t in range(1, T):
        for i in range(out.size):
            out[i] += flat[t, i]"""


def _im2col_conv(node: Node, refs: Refs, x: Value, b: Value, c: Value, weight: Value,
                 grad: bool) -> tuple[list[Call], int]:
    """conv2d (x, b = w -> c = out) or its weight gradient (x, b = dy -> c = dw) through
    im2col: one compiled function for both, `grad` choosing (they share the im2col of x, and
    a parallel function takes seconds to compile: the MNIST CNN's first layer compiled in 5.8-6.3
    s as two functions, 4.0 s as one). Per image: im2col of x[n] into this thread's column
    matrix, then per group either out[n] = w @ col (written straight into NCHW: the GEMM's rows
    are the output channels), or dw += dy[n] @ col.T into this thread's own partial dw (BLAS's
    beta = 1), the partials added at the end. The forward's `partial` is a single element."""
    n, (kh, kw) = x.shape[0], weight.shape[2:]
    positions = _plane_size(b.shape if grad else c.shape)
    col, threads = _scratch_per_chunk(refs, n, x.shape[1] * kh * kw, positions, weight.dtype)
    partial_shape = (threads, weight.shape[0], size_of(weight.shape[1:])) if grad else (1, 1, 1)
    partial = refs.new_scratch(partial_shape, weight.dtype)

    def zero_own_partial(w: Writer) -> None:
        with w.block("if grad:"):
            w.line("zero(partial[t])")

    def body(w: Writer) -> None:
        _batch(w, "x")
        w.line("w, y = (c, b) if grad else (b, c)  # the filters; the output planes or their cotangent")
        _group_rows(w, "w")
        w.line("C, P = x.shape[1], y.shape[2] * y.shape[3]")
        _image_chunks(w, zero_own_partial)
        with w.block("for ch in range(C):"):
            w.line("plane(x[n, ch], col, ch * KH * KW, geometry)")
        with w.block("for g in range(G):"):
            with w.block("if grad:"):
                w.line(gemm_call(False, True, "og", "K", "P", "b", "(n * O + g * og) * P", "col",
                                 "g * K * P", "1.0", "partial", "(t * O + g * og) * K", "P", "P", "K"))
            with w.block("else:"):
                w.line(gemm_call(False, False, "og", "P", "K", "b", "g * og * K", "col", "g * K * P",
                                 "0.0", "c", "(n * O + g * og) * P", "K", "P", "P"))
        _close(w, 2)
        with w.block("if grad:"):
            w.line("add_partials(partial, c)")

    entry = "conv2d_im2col"
    source = _conv_module(entry, ["x", "b", "c", "scratch", "partial", *GEOMETRY, "G", "grad"], node,
                          _plane_copy(node, _im2col_rows, _im2col_strided), "x, col, row0", body, threads > 1,
                          helpers=(_ZERO_MATRIX, _ADD_PARTIALS))
    args = (refs[x], refs[b], refs[c], col, partial, *_geometry_args(node), node.attrs["groups"], grad)
    return [Call(source, entry, args, parallel=threads > 1)], _conv_flops(weight.shape, n * positions)


def _plane_size(shape: tuple[int, ...]) -> int:
    return shape[2] * shape[3]


@lowering(TARGET, "conv2d")
def _conv2d(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """im2col (see `_im2col_conv`); 3x3 filters with enough channels: Winograd instead."""
    x, weight = node.inputs
    if winograd_applies(node, weight.shape, weight.dtype):
        return _winograd(node, refs, x, weight, node.output, node.attrs["padding"], FORWARD)
    return _im2col_conv(node, refs, x, weight, node.output, weight, grad=False)


@lowering(TARGET, "conv2d_input_grad")
def _conv2d_input_grad(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """Per image: dcol = w.T @ dy[n] per group into this thread's column matrix, then col2im
    into dx[n]. 3x3 filters with enough channels: Winograd instead (dx is the correlation of dy,
    padded by 2 - padding, with the filters turned 180 degrees)."""
    dy, weight = node.inputs
    if winograd_applies(node, weight.shape, weight.dtype):
        padding = tuple(2 - p for p in node.attrs["padding"])
        return _winograd(node, refs, dy, weight, node.output, padding, INPUT_GRAD)

    def steps(w: Writer) -> None:
        with w.block("for g in range(G):"):
            w.line(gemm_call(True, False, "K", "P", "og", "w", "g * og * K", "dy", "(n * O + g * og) * P",
                             "0.0", "col", "g * K * P", "K", "P", "P"))
        with w.block("for c in range(C):"):
            w.line("plane(col, dx[n, c], c * KH * KW, geometry)")

    return _per_image_conv("conv2d_input_grad", node, refs, {"dy": dy, "w": weight, "dx": node.output},
                           "dy", weight, (node.output.shape[1], _plane_size(dy.shape)),
                           "dx.shape[1], dy.shape[2] * dy.shape[3]",
                           (_plane_copy(node, _col2im_rows, _col2im_strided), "dcol, dx, row0"), steps)


@lowering(TARGET, "conv2d_weight_grad")
def _conv2d_weight_grad(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """im2col (see `_im2col_conv`); 3x3 filters with enough channels: Winograd instead."""
    x, dy = node.inputs
    if winograd_applies(node, node.output.shape, node.output.dtype):
        return _winograd(node, refs, x, dy, node.output, node.attrs["padding"], WEIGHT_GRAD)
    return _im2col_conv(node, refs, x, dy, node.output, node.output, grad=True)


def _winograd(node: Node, refs: Refs, a: Value, b: Value, c: Value, padding: tuple[int, int],
              mode: int) -> tuple[list[Call], int]:
    """conv2d (a: x, b: w, c: out), its input gradient (dy, w, dx) or its weight gradient (x, dy,
    dw) as Winograd F(2x2, 3x3) or, on larger planes, F(4x4, 3x3) (codegen_winograd). FLOPs
    counted as the direct convolution's, so that GFLOP/s compare with the im2col kernels."""
    planes = b if mode == WEIGHT_GRAD else c  # the planes the output tiles cover
    tile = winograd_tile(planes.shape[2:])
    threads, group, shapes = winograd_scratch(a.shape[0], a.shape[1], planes.shape[1], planes.shape[2:],
                                              mode, tile)
    scratch = [refs.new_scratch(shape, c.dtype) for shape in shapes]
    args = (refs[a], refs[b], refs[c], *scratch, *padding, mode, group)
    weight = c if mode == WEIGHT_GRAD else b
    positions = _plane_size(a.shape if mode == INPUT_GRAD else planes.shape)
    flops = _conv_flops(weight.shape, a.shape[0] * positions)
    return [Call(winograd_source(threads > 1, tile), ENTRY, args, parallel=threads > 1)], flops


def _conv_flops(weight_shape: tuple[int, ...], positions: int) -> int:
    """2 * (weights) * (output positions of the batch): every weight meets every column once."""
    return 2 * size_of(weight_shape) * positions
