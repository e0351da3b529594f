"""Winograd F(2x2, 3x3): 3x3 convolutions (stride 1) with 2.25x fewer multiplies than im2col.

Each 4x4 input tile d (2x2 output positions) becomes V = B^T d B, each 3x3 filter g becomes
U = G g G^T, and the 2x2 outputs are A^T (U * V) A, the product elementwise. Summed over input
channels, the 16 elementwise products are 16 GEMMs: M_k = U_k (O x C) @ V_k (C x tiles), one
per cell k of the 4x4 tile. An image at a time per thread, as the im2col kernels do, so V and M
stay in cache between the transforms and the GEMMs.

The input gradient is a 3x3 correlation too (of dy, padded by 2 - padding, with each filter
turned 180 degrees and the channel roles swapped). The filters' gradient runs the tiles
backwards: dU_k^T = V_k @ dM_k^T summed over tiles, with dM = A dY A^T, then G^T dU G. All three
are modes of one compiled function.

Measured in the MNIST CNN's training step (its 32 -> 64 channel convolution of 26x26 planes,
batch 64, 2 threads), against im2col + GEMM: forward 15.2 -> 10.3 ms, weight gradient 13.6 ->
9.4 ms, input gradient 13.8 -> 13.6 ms (its transformed tiles, 64 channels of 13x13, outgrow the
L2 cache); the step 56.6 -> 48.5 ms. The rows of V_k and M_k are padded past a multiple of
4 KiB: the 16 streams the transforms read or write would otherwise fall on the same cache sets
(M_k rows 9 x 4 KiB apart in that layer; output transform 5.9 ms, 1.9 ms padded). The results
differ from the direct sum by rounding only (float32 against float64 on that layer: 4e-7 of the
largest value, im2col 3e-7). No fastmath: the transforms only add and subtract, and the flags
tripled one helper's compile time (a parallel module of this size takes seconds to compile).

Planes of at least MIN_SIDE_4X4 on both sides take F(4x4, 3x3) instead (end of the file): 6x6
input tiles, 36 GEMMs, 2.25 multiplies an output instead of 4. One thread, alternated with
F(2x2) in one process: the MNIST CNN's layer forward 10.7 -> 9.5 ms, weight gradient 13.4 ->
10.4, input gradient (26x26, 7x7 tiles covering 28x28) 13.3 -> 13.3; resnet-m's 32x32 layers
(32 channels, batch 32) 5.6 -> 5.1, 6.0 -> 5.7, 5.7 -> 5.1 ms, its 16x16 ones (64 channels)
4.2 -> 3.9, 5.1 -> 4.3, 4.2 -> 3.9 ms. Its rounding is coarser: 5e-6 to 9e-6 of the largest
value off F(2x2)'s on those layers. The module takes half as long again to compile (9.3 s
against 6.2 s serial), once for every model with such planes.

The filters' gradient stores dM_k transposed (tiles as rows: BLAS's small-matrix sgemm kernel
takes no transposed right operand; a product with V_k^T ran at 80 GFLOP/s against 102 for
128 x 128 by 16 untransposed) and sums the tiles of MIN_GRADIENT_DEPTH / tiles images in one
product (one image's 16 tiles re-read and rewrote the whole partial dU_k every 16 columns).
One thread, resnet-m's weight gradients (profile, against the transposed product one image at
a time): 8x8 planes 6.0 -> 5.5 ms, 16x16 4.8-5.0 -> 4.0-4.2 ms, 32x32 5.6-6.0 -> 5.3-5.6 ms;
its step 198.0 -> 191.2 ms (medians of 5 alternated runs); the MNIST CNN's 47.4 -> 47.0 ms. The
F(4x4) module compiles in 7.0 s against 6.3 s (serial, cold). F(4x4)'s input transform then ran
B^T d over whole rows first (transform_tiles): the step 190.5 -> 181.9 ms, compile time
unchanged. Its three data transforms then let LLVM contract a * b + c into FMA (fastmath
'contract' alone; the full flags are what cost compile time): their multiplies by 2, 4, 5 and 8
fold into the adds. Batch of 32, resnet-m's 32x32 planes: untransform_tiles 1.04 -> 0.80 ms,
transform_gradients 0.90 -> 0.81, transform_tiles 1.51 -> 1.44; the step 181.9 -> 176.9 ms;
compile time (7.1 s) and the error against float64 on such a layer (4.1e-6 to 4.9e-6 of the
largest value) unchanged. Tried and dropped: F(2x2)'s input transform by rows first (0.53 ->
0.78 ms on 8x8 planes), F(4x4)'s output transform in two passes (0.53 -> 0.64 ms on 16x16),
groups of images in the forward products (within 3%), F(4x4) on 8x8 planes with such groups
(forward 4.1 -> 4.9 ms).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from contextvars import ContextVar
from fractions import Fraction
from typing import Iterator

import numba

from graphc.ir import Node

from .codegen_common import ENTRY_OPTIONS, HELPER_OPTIONS, runs_parallel

ENTRY = "conv3x3_winograd"
FORWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2  # its modes
# Below this many channels on either side the GEMMs are too thin to gain from the transforms
# (the MNIST CNN's first layer, 1 -> 32 channels, stays with im2col).
MIN_CHANNELS = 16
_ROW_ALIGN = 32  # elements: rows of V_k and M_k start 128 bytes past a multiple of this
# The weight gradient's products dU_k^T += V_k @ dM_k^T sum over the tiles of enough images
# together to be at least this many tiles deep: one image's 16 tiles (8x8 planes in F(2x2),
# 16x16 in F(4x4)) re-read and rewrote the whole C x O partial sum every 16 columns of V_k. 32, 48
# and 64 ran alike (8x8 planes, 128 channels: 4.23 ms one image a product, 3.93-4.04 grouped);
# 128 and more slower (V_k and dM_k outgrow the cache). 48 keeps 128 x 128 by 48 in the
# small-matrix kernel's limit.
MIN_GRADIENT_DEPTH = 48
# The filter transforms compute this many filters (a cache line of float32) before writing their
# cells to u (copy_filter_block).
FILTER_BLOCK = 16
# Output planes at least this wide on both sides take F(4x4, 3x3) (see the end of the file);
# smaller ones F(2x2, 3x3).
MIN_SIDE_4X4 = 16

def _shared_functions(tile: int, parallel: str, filter_gradient: str) -> str:
    """The source both modules end with, for output tiles of side `tile` ((tile + 2)^2 cells, one
    GEMM each): `zero`, the filters' gradient summed over the threads' partial sums and then
    untransformed by `filter_gradient` (source lines at 12 spaces), and the entry."""
    cells, side = (tile + 2) ** 2, tile + 2
    return f'''@njit({HELPER_OPTIONS})
def copy_filter_block(block, u, a, b0, width):
    """u[k, a, b0 + q] = block[k, q] for q < width: whole cache lines of each row u[k], whose
    rows lie a multiple of 4 KiB apart (the same cache sets): a filter's {cells} cells written
    straight into u took 0.80 ms for 128 x 128 filters, 0.35 through blocks."""
    for k in range({cells}):
        for q in range(width):
            u[k, a, b0 + q] = block[k, q]


@njit({HELPER_OPTIONS})
def zero(a):
    """In a helper: loops in the parallel entry cost seconds of compile time."""
    flat = a.reshape(a.size)
    for i in range(flat.size):
        flat[i] = 0


@njit({HELPER_OPTIONS})
def untransform_filter_gradients(partial, dw, first, last):
    """dw[o, c] = G^T X G for the input channels c in [first, last), X the {side}x{side} sum over
    threads of partial[t, {side} * i + j, c, o]. The threads' sums are added into partial[0]
    first, whole rows at a time (a loop that vectorises): one thread summing element by element
    took 1.4 ms for 2 threads' 128 x 128 filters (the gradient 3.34 ms; 1.96 ms now)."""
    T, O = partial.shape[0], dw.shape[0]
    for t in range(1, T):
        for k in range({cells}):
            for c in range(first, last):
                for o in range(O):
                    partial[0, k, c, o] += partial[t, k, c, o]
    total = partial[0]
    x = np.empty({cells}, partial.dtype)
    for c in range(first, last):
        for o in range(O):  # along partial's rows
            for k in range({cells}):
                x[k] = total[k, c, o]
{filter_gradient}


@njit(parallel={parallel}, {ENTRY_OPTIONS}, cache=True)
def conv3x3_winograd(a, b, c, u, v, m, pad, partial, PH, PW, mode, group):
    """One entry for three ops (a parallel entry takes seconds to compile):
      mode 0, the convolution: c[n] = the 3x3 correlation of a[n] (zero-padded by PH, PW) with
        the filters b: M_k = U_k @ V_k per image, then its tiles' outputs A^T M A;
      mode 1, its input gradient: the same with b's filters turned (see transform_filters);
      mode 2, its filters' gradient c for the cotangent b (a: the input): each thread sums
        dU_k^T += V_k @ dM_k^T over its images, dM = A dY A^T, the tiles of `group` images side
        by side in V_k and dM_k^T (one product sums over all their tiles); then each filter is
        G^T dU G. dM_k^T, not dM_k: BLAS's small-matrix kernel takes no transposed right operand.
    Images in T chunks, one per thread, each with its own v, m, pad (and partial dU)."""
    N, C = a.shape[0], a.shape[1]
    grad = mode == 2
    y = b if grad else c  # the planes the tiles cover: the output, or its cotangent
    O, OH, OW = y.shape[1], y.shape[2], y.shape[3]
    TH, TW = (OH + {tile - 1}) // {tile}, (OW + {tile - 1}) // {tile}
    L, T = TH * TW, v.shape[0]
    chunk = -(-N // T)
    if not grad:
        transform_filters(b, u, mode == 1)
    u2 = u.reshape((u.shape[0], u.shape[1] * u.shape[2]))  # 2-D as all operands: one gemm
    for t in prange(T):
        vt, mt = v[t], m[t]
        pt = partial[t].reshape((partial.shape[1], partial.shape[2] * partial.shape[3]))
        if grad:
            zero(pt)
        end = min(N, (t + 1) * chunk)
        for n in range(t * chunk, end, group if grad else 1):
            if grad:
                images = min(group, end - n)
                for i in range(images):
                    transform_tiles(a[n + i], vt, pad[t], PH, PW, TH, TW, group * L, i * L)
                    transform_gradients(b[n + i], mt, TH, TW, i * L)
                for k in range({cells}):
                    gemm(False, False, C, O, images * L, vt, k * vt.shape[1], group * L,
                         mt, k * mt.shape[1], O, 1.0, pt, k * C * O, O)
            else:
                # np.int64(0), not 0: a literal argument compiles a second transform_tiles
                # (Numba specialises on it), ~0.9 s of the F(4x4) module's cold compile
                transform_tiles(a[n], vt, pad[t], PH, PW, TH, TW, L, np.int64(0))
                for k in range({cells}):
                    gemm(False, False, O, L, C, u2, k * O * C, C, vt, k * vt.shape[1], L, 0.0,
                         mt, k * mt.shape[1], L)
                untransform_tiles(mt, c[n], TH, TW)
    if grad:
        for t in prange(T):  # the threads' slices of the input channels
            untransform_filter_gradients(partial, c, t * C // T, (t + 1) * C // T)
'''


# (G^T X) G for F(2x2)'s 4x4 X, written out
_FILTER_GRADIENT_2X2 = '''            for j in range(4):  # column j of G^T X
                z0 = x[j] + 0.5 * (x[4 + j] + x[8 + j])
                z1 = 0.5 * (x[4 + j] - x[8 + j])
                z2 = 0.5 * (x[4 + j] + x[8 + j]) + x[12 + j]
                x[j], x[4 + j], x[8 + j] = z0, z1, z2
            for i in range(3):  # row i of (G^T X) G
                z0, z1, z2, z3 = x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]
                dw[o, c, i, 0] = z0 + 0.5 * (z1 + z2)
                dw[o, c, i, 1] = 0.5 * (z1 - z2)
                dw[o, c, i, 2] = 0.5 * (z1 + z2) + z3'''

SOURCE = f'''"""Generated by graphc (numba-cpu backend): {ENTRY} (Winograd F(2x2, 3x3))."""
import numpy as np
from numba import njit, prange
from graphc.backends.numba_cpu.gemm import gemm


@njit({HELPER_OPTIONS})
def transform_filters(w, u, turned):
    """u[k, a, b] = (G g G^T)[k // 4, k % 4] for the filter g from input channel b to output
    channel a: w[a, b], or w[b, a] turned 180 degrees when `turned` (the input gradient).
    {FILTER_BLOCK} filters at a time into `block`, then copied to u (copy_filter_block)."""
    A, B = u.shape[1], u.shape[2]
    block = np.empty((16, {FILTER_BLOCK}), u.dtype)
    for a in range(A):
        for b0 in range(0, B, {FILTER_BLOCK}):
            width = min({FILTER_BLOCK}, B - b0)
            for q in range(width):
                b = b0 + q
                g = w[b, a, ::-1, ::-1] if turned else w[a, b]
                for j in range(4):  # column j of g G^T, then G (g G^T)
                    if j == 0:
                        c0, c1, c2 = g[0, 0], g[1, 0], g[2, 0]
                    elif j == 3:
                        c0, c1, c2 = g[0, 2], g[1, 2], g[2, 2]
                    else:
                        s = 1 if j == 1 else -1
                        c0 = 0.5 * (g[0, 0] + s * g[0, 1] + g[0, 2])
                        c1 = 0.5 * (g[1, 0] + s * g[1, 1] + g[1, 2])
                        c2 = 0.5 * (g[2, 0] + s * g[2, 1] + g[2, 2])
                    block[j, q] = c0
                    block[4 + j, q] = 0.5 * (c0 + c1 + c2)
                    block[8 + j, q] = 0.5 * (c0 - c1 + c2)
                    block[12 + j, q] = c2
            copy_filter_block(block, u, a, b0, width)


@njit({HELPER_OPTIONS})
def transform_tiles(x, v, pad, PH, PW, TH, TW, stride, offset):
    """v[k, c * stride + offset + tile] = (B^T d B)[k // 4, k % 4] for every 4x4 tile d (2 apart)
    of image x's channel c, zero-padded by PH, PW: copied into `pad` first, whose border stays zero."""
    C, H, W = x.shape
    for r in range(pad.shape[0]):
        for q in range(pad.shape[1]):
            pad[r, q] = 0
    for c in range(C):
        for r in range(H):
            for q in range(W):
                pad[r + PH, q + PW] = x[c, r, q]
        for th in range(TH):
            p0, p1, p2, p3 = pad[2 * th], pad[2 * th + 1], pad[2 * th + 2], pad[2 * th + 3]
            row = c * stride + offset + th * TW
            for tw in range(TW):
                j, s = 2 * tw, row + tw
                e00 = p0[j] - p2[j]; e01 = p0[j + 1] - p2[j + 1]; e02 = p0[j + 2] - p2[j + 2]; e03 = p0[j + 3] - p2[j + 3]
                e10 = p1[j] + p2[j]; e11 = p1[j + 1] + p2[j + 1]; e12 = p1[j + 2] + p2[j + 2]; e13 = p1[j + 3] + p2[j + 3]
                e20 = p2[j] - p1[j]; e21 = p2[j + 1] - p1[j + 1]; e22 = p2[j + 2] - p1[j + 2]; e23 = p2[j + 3] - p1[j + 3]
                e30 = p1[j] - p3[j]; e31 = p1[j + 1] - p3[j + 1]; e32 = p1[j + 2] - p3[j + 2]; e33 = p1[j + 3] - p3[j + 3]
                v[0, s] = e00 - e02; v[1, s] = e01 + e02; v[2, s] = e02 - e01; v[3, s] = e01 - e03
                v[4, s] = e10 - e12; v[5, s] = e11 + e12; v[6, s] = e12 - e11; v[7, s] = e11 - e13
                v[8, s] = e20 - e22; v[9, s] = e21 + e22; v[10, s] = e22 - e21; v[11, s] = e21 - e23
                v[12, s] = e30 - e32; v[13, s] = e31 + e32; v[14, s] = e32 - e31; v[15, s] = e31 - e33


@njit({HELPER_OPTIONS})
def untransform_tiles(m, out, TH, TW):
    """out[o] = A^T M A for every tile of M = m[:, o * TH * TW + tile] (a plane with an odd side
    leaves its last tile's second row or column unwritten)."""
    O, OH, OW = out.shape
    L = TH * TW
    for o in range(O):
        for th in range(TH):
            oh, row = 2 * th, o * L + th * TW
            for tw in range(TW):
                ow, s = 2 * tw, row + tw
                r0 = m[0, s] + m[4, s] + m[8, s]; r1 = m[1, s] + m[5, s] + m[9, s]
                r2 = m[2, s] + m[6, s] + m[10, s]; r3 = m[3, s] + m[7, s] + m[11, s]
                q0 = m[4, s] - m[8, s] - m[12, s]; q1 = m[5, s] - m[9, s] - m[13, s]
                q2 = m[6, s] - m[10, s] - m[14, s]; q3 = m[7, s] - m[11, s] - m[15, s]
                if oh + 1 < OH and ow + 1 < OW:
                    out[o, oh, ow] = r0 + r1 + r2; out[o, oh, ow + 1] = r1 - r2 - r3
                    out[o, oh + 1, ow] = q0 + q1 + q2; out[o, oh + 1, ow + 1] = q1 - q2 - q3
                else:
                    out[o, oh, ow] = r0 + r1 + r2
                    if ow + 1 < OW:
                        out[o, oh, ow + 1] = r1 - r2 - r3
                    if oh + 1 < OH:
                        out[o, oh + 1, ow] = q0 + q1 + q2
                        if ow + 1 < OW:
                            out[o, oh + 1, ow + 1] = q1 - q2 - q3


@njit({HELPER_OPTIONS})
def transform_gradients(dy, dm, TH, TW, offset):
    """dm[k, (offset + tile) * O + o] = (A dY A^T)[k // 4, k % 4] for every 2x2 tile dY of dy[o]
    (zero past an odd side): the cotangent of the tile's M, whose outputs are A^T M A. Tiles
    are rows, as the right operand of dU_k^T += V_k @ dM_k^T (see the entry)."""
    O, OH, OW = dy.shape
    zero = np.zeros(1, dy.dtype)[0]
    for th in range(TH):  # o innermost: the writes, a tile's row of dm each, run contiguous
        oh, row = 2 * th, offset + th * TW
        for tw in range(TW):
            ow, at = 2 * tw, (row + tw) * O
            for o in range(O):
                s = at + o
                y00 = dy[o, oh, ow]
                y01 = dy[o, oh, ow + 1] if ow + 1 < OW else zero
                y10 = dy[o, oh + 1, ow] if oh + 1 < OH else zero
                y11 = dy[o, oh + 1, ow + 1] if oh + 1 < OH and ow + 1 < OW else zero
                a0, b0 = y00 + y10, y01 + y11  # rows of A dY: (y00, y01), (a0, b0), (a1, b1), (-y10, -y11)
                a1, b1 = y00 - y10, y01 - y11
                dm[0, s] = y00; dm[1, s] = y00 + y01; dm[2, s] = y00 - y01; dm[3, s] = -y01
                dm[4, s] = a0; dm[5, s] = a0 + b0; dm[6, s] = a0 - b0; dm[7, s] = -b0
                dm[8, s] = a1; dm[9, s] = a1 + b1; dm[10, s] = a1 - b1; dm[11, s] = -b1
                dm[12, s] = -y10; dm[13, s] = -y10 - y11; dm[14, s] = y11 - y10; dm[15, s] = y11


''' + _shared_functions(2, "PARALLEL", _FILTER_GRADIENT_2X2)


_IM2COL_ONLY: ContextVar[bool] = ContextVar("im2col_only", default=False)


@contextmanager
def im2col_only() -> Iterator[None]:
    """Convolutions generated inside run as im2col and GEMM wherever Winograd would apply: the
    serial stand-ins that run while the final kernels compile (executor.serial_stand_ins) must
    compile fast, and a serial F(4x4) module takes ~5 s against ~1 s for im2col."""
    token = _IM2COL_ONLY.set(True)
    try:
        yield
    finally:
        _IM2COL_ONLY.reset(token)


def winograd_applies(node: Node, weight_shape: tuple[int, ...], dtype: str) -> bool:
    """Whether a conv2d node or one of its gradients runs as Winograd (F(2x2, 3x3), or F(4x4, 3x3)
    on large planes: winograd_tile): a 3x3 filter, stride and dilation 1, one group, padding at
    most 2 (the input gradient pads by 2 - padding), a floating dtype and at least MIN_CHANNELS
    channels in and out; never inside im2col_only()."""
    out_channels, in_channels = weight_shape[:2]
    return (not _IM2COL_ONLY.get() and tuple(weight_shape[2:]) == (3, 3) and node.attrs["groups"] == 1
            and tuple(node.attrs["stride"]) == (1, 1) and tuple(node.attrs["dilation"]) == (1, 1)
            and all(0 <= p <= 2 for p in node.attrs["padding"])
            and dtype in ("float32", "float64")
            and min(out_channels, in_channels) >= MIN_CHANNELS)


def winograd_tile(plane: tuple[int, int]) -> int:
    """The side of the output tiles for output planes `plane`: 4 (F(4x4, 3x3)) from MIN_SIDE_4X4
    on, else 2. On smaller planes F(4x4) loses: resnet-m's 8x8 planes (128 channels, batch 32,
    one thread) ran the forward in 5.7 ms against 4.2."""
    return 4 if min(plane) >= MIN_SIDE_4X4 else 2


def winograd_source(parallel: bool, tile: int) -> str:
    """The module for output tiles of side `tile` (winograd_tile)."""
    if tile == 4:
        return _source_4x4(parallel)
    return SOURCE.replace("parallel=PARALLEL", f"parallel={parallel}")


def winograd_scratch(images: int, channels_in: int, channels_out: int, plane: tuple[int, int],
                     mode: int, tile: int) -> tuple[int, int, list[tuple[int, ...]]]:
    """The thread count, the images per product of the weight gradient (1 for the other modes)
    and the scratch shapes (u, v, m, pad, partial) for `images` images of `channels_in` channels
    whose output (or, for the weight gradient, cotangent) planes are `channels_out` x `plane`, in
    output tiles of side `tile`. Each mode leaves one unused: a single element of it."""
    cells = (tile + 2) ** 2  # of an input tile: the number of GEMMs
    high, wide = -(-plane[0] // tile), -(-plane[1] // tile)
    tiles = high * wide
    threads = max(1, numba.config.NUMBA_NUM_THREADS)
    if not runs_parallel(images * channels_in * cells * tiles):
        threads = 1

    def padded_row(elements: int) -> int:
        return -(-elements // _ROW_ALIGN) * _ROW_ALIGN + _ROW_ALIGN

    grad = mode == WEIGHT_GRAD
    # images per product: at least one (an empty batch runs no product, but its loop steps by it)
    group = max(1, min(-(-MIN_GRADIENT_DEPTH // tiles), -(-images // threads))) if grad else 1
    return threads, group, [(1, 1, 1) if grad else (cells, channels_out, channels_in),
                            (threads, cells, padded_row(channels_in * tiles * group)),
                            (threads, cells, padded_row(channels_out * tiles * group)),
                            (threads, tile * high + 2, tile * wide + 2),
                            (threads, cells, channels_in, channels_out) if grad else (threads, 1, 1, 1)]


# -- Winograd F(4x4, 3x3) ------------------------------------------------------------------------
# 6x6 input tiles, 4 apart, give 4x4 outputs through 36 GEMMs: 2.25 multiplies an output against
# F(2x2)'s 4, for transforms a third dearer an output. Lavin and Gray's points 0, 1, -1, 2, -2, inf:
#   B^T = [4 0 -5 0 1 0; 0 -4 -4 1 1 0; 0 4 -4 -1 1 0; 0 -2 -1 2 1 0; 0 2 -1 -2 1 0; 0 4 0 -5 0 1]
#   A^T = [1 1 1 1 1 0; 0 1 -1 2 -2 0; 0 1 1 4 4 0; 0 1 -1 8 -8 1], and G below.
# The data transforms (B^T d B, A^T M A, A dY A^T) are written out with their common sums taken
# once (written as sums of the matrices' terms they ran 10-20% slower), each coefficient a power
# of two or 5 in the data's dtype; the filter transforms run once a call, in float64.
_G = ((Fraction(1, 4), 0, 0),
      (Fraction(-1, 6), Fraction(-1, 6), Fraction(-1, 6)),
      (Fraction(-1, 6), Fraction(1, 6), Fraction(-1, 6)),
      (Fraction(1, 24), Fraction(1, 12), Fraction(1, 6)),
      (Fraction(1, 24), Fraction(-1, 12), Fraction(1, 6)),
      (0, 0, 1))


def _combination(coefficients: tuple, terms: list[str]) -> str:
    """sum(c * t) as source, without the zero terms, the coefficients as float literals."""
    parts = []
    for c, t in zip(coefficients, terms):
        if c == 0:
            continue
        sign = "-" if c < 0 else "+"
        magnitude = abs(c)
        parts.append((sign, t if magnitude == 1 else f"{float(magnitude)!r} * {t}"))
    text = ("-" if parts[0][0] == "-" else "") + parts[0][1]
    for sign, term in parts[1:]:
        text += f" {sign} {term}"
    return text


def _input_transform(d: list[str], out: str) -> list[str]:
    """out0..out5 = B^T d for a column d0..d5, with its common sums taken once."""
    d0, d1, d2, d3, d4, d5 = d
    return [f"{out}_s = {d3} + {d4}", f"{out}_t = {d1} + {d2}", f"{out}_u = {d4} - {d3}",
            f"{out}_v = {d1} - {d2}", f"{out}_w = {d4} - {d2}", f"{out}_x = {d3} - {d1}",
            f"{out}0 = c4 * {d0} - c5 * {d2} + {d4}",
            f"{out}1 = {out}_s - c4 * {out}_t", f"{out}2 = {out}_u + c4 * {out}_v",
            f"{out}3 = {out}_w + c2 * {out}_x", f"{out}4 = {out}_w - c2 * {out}_x",
            f"{out}5 = c4 * {d1} - c5 * {d3} + {d5}"]


def _output_transform(m: list[str], out: str) -> list[str]:
    """out0..out3 = A^T m for a column m0..m5."""
    m0, m1, m2, m3, m4, m5 = m
    return [f"{out}_s = {m1} + {m2}", f"{out}_d = {m1} - {m2}", f"{out}_t = {m3} + {m4}",
            f"{out}_e = {m3} - {m4}",
            f"{out}0 = {m0} + {out}_s + {out}_t", f"{out}1 = {out}_d + c2 * {out}_e",
            f"{out}2 = {out}_s + c4 * {out}_t", f"{out}3 = {out}_d + c8 * {out}_e + {m5}"]


def _gradient_transform(y: list[str], out: str) -> list[str]:
    """out0..out5 = A y for a column y0..y3 (the adjoint of _output_transform)."""
    y0, y1, y2, y3 = y
    return [f"{out}_a = {y0} + {y2}", f"{out}_b = {y1} + {y3}", f"{out}_c = {y0} + c4 * {y2}",
            f"{out}_d = c2 * {y1} + c8 * {y3}",
            f"{out}0 = {y0}", f"{out}1 = {out}_a + {out}_b", f"{out}2 = {out}_a - {out}_b",
            f"{out}3 = {out}_c + {out}_d", f"{out}4 = {out}_c - {out}_d", f"{out}5 = {y3}"]


def _lines(*rows: str, indent: int) -> str:
    """Source lines at one indentation."""
    return "\n".join(" " * indent + r for r in rows)


@functools.cache
def _source_4x4(parallel: bool) -> str:
    """The F(4x4, 3x3) module: the F(2x2) module's functions with 36 cells a tile."""
    G = _G
    GT = tuple(tuple(G[i][r] for i in range(6)) for r in range(3))  # 3 x 6

    def k(i: int, j: int) -> int:
        return 6 * i + j

    # transform_tiles: e = B^T d for every column of a row of tiles, then each row of e times B
    columns = _input_transform([f"p{i}[j]" for i in range(6)], "e") + [f"e[{r}, j] = e{r}" for r in range(6)]
    tiles = []
    for r in range(6):
        tiles += _input_transform([f"e[{r}, j + {q}]" for q in range(6)], f"f{r}_")
        tiles += [f"v[{k(r, t)}, s] = f{r}_{t}" for t in range(6)]
    # untransform_tiles: A^T M column by column, then each row times A
    loads = [f"m{i} = m[{i}, s]" for i in range(36)]
    untile = [line for q in range(6) for line in _output_transform([f"m{k(i, q)}" for i in range(6)], f"t{q}_")]
    for r in range(4):
        untile += _output_transform([f"t{q}_{r}" for q in range(6)], f"y{r}_")
    full_writes = [f"out[o, oh + {r}, ow + {t}] = y{r}_{t}" for r in range(4) for t in range(4)]
    edge_writes = []
    for r in range(4):
        for t in range(4):
            edge_writes += [f"if oh + {r} < OH and ow + {t} < OW:", f"    out[o, oh + {r}, ow + {t}] = y{r}_{t}"]
    # transform_gradients: t = A dY (6 x 4), dm = t A^T (6 x 6)
    full_loads = [f"y{r}{t} = dy[o, oh + {r}, ow + {t}]" for r in range(4) for t in range(4)]
    edge_loads = [f"y{r}{t} = dy[o, oh + {r}, ow + {t}] if oh + {r} < OH and ow + {t} < OW else zero"
                  for r in range(4) for t in range(4)]
    gradients = [line for t in range(4) for line in _gradient_transform([f"y{r}{t}" for r in range(4)], f"t{t}_")]
    for i in range(6):
        gradients += _gradient_transform([f"t{t}_{i}" for t in range(4)], f"g{i}_")
        gradients += [f"dm[{k(i, j)}, s] = g{i}_{j}" for j in range(6)]
    # transform_filters: h = g G^T (3 x 6), u = G h (6 x 6)
    filters = [f"h{r}{j} = {_combination(G[j], [f'g[{r}, {c}]' for c in range(3)])}"
               for r in range(3) for j in range(6)]
    filters += [f"block[{k(i, j)}, q] = {_combination(G[i], [f'h{r}{j}' for r in range(3)])}"
                for i in range(6) for j in range(6)]
    # untransform_filter_gradients: z = G^T X (3 x 6), dw = z G (3 x 3)
    filter_grads = [f"z{r}{j} = {_combination(GT[r], [f'x[{k(i, j)}]' for i in range(6)])}"
                    for r in range(3) for j in range(6)]
    filter_grads += [f"dw[o, c, {r}, {q}] = "
                     f"{_combination([G[j][q] for j in range(6)], [f'z{r}{j}' for j in range(6)])}"
                     for r in range(3) for q in range(3)]

    def consts(array: str, indent: int) -> str:
        """The coefficients of the data transforms, in the dtype of `array`."""
        return _lines(f"one = np.ones(1, {array}.dtype)[0]", "c2 = one + one", "c4 = c2 + c2",
                      "c5 = c4 + one", "c8 = c4 + c4", indent=indent)

    return f'''"""Generated by graphc (numba-cpu backend): {ENTRY} (Winograd F(4x4, 3x3))."""
import numpy as np
from numba import njit, prange
from graphc.backends.numba_cpu.gemm import gemm


@njit({HELPER_OPTIONS})
def transform_filters(w, u, turned):
    """u[k, a, b] = (G g G^T)[k // 6, k % 6] for the filter g from input channel b to output
    channel a: w[a, b], or w[b, a] turned 180 degrees when `turned` (the input gradient).
    {FILTER_BLOCK} filters at a time into `block`, then copied to u (copy_filter_block)."""
    A, B = u.shape[1], u.shape[2]
    block = np.empty((36, {FILTER_BLOCK}), u.dtype)
    for a in range(A):
        for b0 in range(0, B, {FILTER_BLOCK}):
            width = min({FILTER_BLOCK}, B - b0)
            for q in range(width):
                b = b0 + q
                g = w[b, a, ::-1, ::-1] if turned else w[a, b]
{_lines(*filters, indent=16)}
            copy_filter_block(block, u, a, b0, width)


@njit(fastmath={{'contract'}}, {HELPER_OPTIONS})
def transform_tiles(x, v, pad, PH, PW, TH, TW, stride, offset):
    """v[k, c * stride + offset + tile] = (B^T d B)[k // 6, k % 6] for every 6x6 tile d (4 apart)
    of image x's channel c, zero-padded by PH, PW: copied into `pad` first, whose border stays zero.
    B^T d runs over whole rows of the plane first, a loop that vectorises and shares the columns
    that neighbouring tiles overlap on. Tile by tile, a batch of resnet-m's 32 channels of 32x32
    took 2.2 ms against 1.5, of its 64 channels of 16x16 1.1 against 0.8 (one thread)."""
    C, H, W = x.shape
    e = np.empty((6, pad.shape[1]), v.dtype)
{consts("v", 4)}
    for r in range(pad.shape[0]):
        for q in range(pad.shape[1]):
            pad[r, q] = 0
    for c in range(C):
        for r in range(H):
            for q in range(W):
                pad[r + PH, q + PW] = x[c, r, q]
        for th in range(TH):
            p0, p1, p2, p3 = pad[4 * th], pad[4 * th + 1], pad[4 * th + 2], pad[4 * th + 3]
            p4, p5 = pad[4 * th + 4], pad[4 * th + 5]
            for j in range(4 * TW + 2):
{_lines(*columns, indent=16)}
            row = c * stride + offset + th * TW
            for tw in range(TW):
                j, s = 4 * tw, row + tw
{_lines(*tiles, indent=16)}


@njit(fastmath={{'contract'}}, {HELPER_OPTIONS})
def untransform_tiles(m, out, TH, TW):
    """out[o] = A^T M A for every tile of M = m[:, o * TH * TW + tile] (a plane whose side is
    not a multiple of 4 leaves the rest of its last tiles unwritten)."""
    O, OH, OW = out.shape
    L = TH * TW
{consts("m", 4)}
    for o in range(O):
        for th in range(TH):
            oh, row = 4 * th, o * L + th * TW
            for tw in range(TW):
                ow, s = 4 * tw, row + tw
{_lines(*loads, *untile, indent=16)}
                if oh + 3 < OH and ow + 3 < OW:
{_lines(*full_writes, indent=20)}
                else:
{_lines(*edge_writes, indent=20)}


@njit(fastmath={{'contract'}}, {HELPER_OPTIONS})
def transform_gradients(dy, dm, TH, TW, offset):
    """dm[k, (offset + tile) * O + o] = (A dY A^T)[k // 6, k % 6] for every 4x4 tile dY of dy[o]
    (zero past the plane's edge): the cotangent of the tile's M, whose outputs are A^T M A. Tiles
    are rows, as the right operand of dU_k^T += V_k @ dM_k^T (see the entry)."""
    O, OH, OW = dy.shape
    zero = np.zeros(1, dy.dtype)[0]
{consts("dm", 4)}
    for th in range(TH):  # o innermost: the writes, a tile's row of dm each, run contiguous
        oh, row = 4 * th, offset + th * TW
        for tw in range(TW):
            ow, at = 4 * tw, (row + tw) * O
            for o in range(O):
                s = at + o
                if oh + 3 < OH and ow + 3 < OW:
{_lines(*full_loads, indent=20)}
                else:
{_lines(*edge_loads, indent=20)}
{_lines(*gradients, indent=16)}


''' + _shared_functions(4, str(parallel), _lines(*filter_grads, indent=12))
