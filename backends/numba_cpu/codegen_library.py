"""Library kernels: matmul, conv2d and its gradients, pooling, scatters; each with an epilogue.

A library kernel is a short sequence of calls. The library op writes its whole result into its
own output array (fusion always gives it one); then, if the kernel has an epilogue (bias add,
ReLU, an optimizer update), an ordinary generated elementwise loop reads that result and
writes the kernel's other outputs.

The library functions depend only on what shapes their loops (window geometry, which operands
are transposed, the dtype); sizes come from the arrays. Every layer with the same geometry, in
every graph, shares one compiled function, which then comes from the disk cache.

matmul is a BLAS GEMM (gemm.py; single-threaded BLAS, see blas.py), split into row blocks
across threads when large, or one per batch element. conv2d and its gradients work
image by image, the batch split into one chunk per thread: an image's receptive fields are
copied into the thread's (C*kh*kw, Ho*Wo) column matrix (im2col), which one GEMM per group
then multiplies straight into NCHW. The column matrix stays in cache between the two (a whole
batch's, 40 MB for the MNIST CNN, went through memory twice and ran 1.5x slower). A layer's
forward and weight gradient, which both im2col its input, are two modes of one function. 3x3
stride-1 layers with enough channels run as Winograd F(2x2, 3x3) instead (codegen_winograd.py).
Pooling loops over each image plane's windows, planes in parallel; the scatters loop over
their operand, in parallel over an axis on which they cannot collide.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numba

from graphc.ir import Node, Value
from graphc.ir.kernels import bounded_label, op_class
from graphc.ir.lowering import lowering, lowering_for, register_lowering
from graphc.backends.kernels.library import Refs, epilogue_graph
from graphc.backends.kernels.pointwise import argument_names, broadcast_index, members_of
from graphc.backends.kernels.source import Writer, index_text, size_of

from .codegen_common import (HELPER_DECORATOR, HELPER_OPTIONS, PARALLEL_MIN_ELEMENTS, TARGET, Call, KernelSource,
                             decorator, loop_header, module)
from .codegen_elementwise import elementwise_call, elementwise_flops
from .codegen_winograd import (ENTRY, FORWARD, INPUT_GRAD, WEIGHT_GRAD, winograd_applies,
                               winograd_scratch, winograd_source)


def _call(entry: str, params: list[str], args: list[str | int], parallel: bool,
          write_body: Callable[[Writer], None], fastmath: bool = True) -> Call:
    """A call of a hand-written library function `entry(*params)` with these `args`."""
    w = Writer()
    w.line(decorator(parallel, fastmath))
    with w.block(f"def {entry}({', '.join(params)}):"):
        write_body(w)
    return Call(module(entry, w), entry, tuple(args), parallel=parallel)


def _per_plane(entry: str, params: list[str], args: list[str], constants: dict[str, int],
               plane_params: list[str], plane_args: str, plane_body: Callable[[Writer], None],
               parallel: bool, planes_of: str, preamble: tuple[str, ...] = ()) -> Call:
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
        for line in preamble:
            w.line(line)
        with w.block(loop_header("nc", "N * C", parallel)):
            w.line("n, c = nc // C, nc % C")
            w.line(f"plane({plane_args})")
    return Call(module(entry, w, [geometry, helper.text()]), entry, tuple(args), parallel=parallel)


# -- matmul ---------------------------------------------------------------------------------------
@lowering(TARGET, "matmul")
def _matmul(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """A plain product is one (row-blocked) GEMM; a batched one loops over the (broadcast) batch
    index, one GEMM per batch element, the outer batch axis in parallel when large. Operands
    transposed by the prologue are read as they are stored: BLAS takes a transpose flag."""
    x, y = node.inputs
    (a, a_t), (b, b_t) = refs.operand(x), refs.operand(y)
    out = node.output.shape
    flops = 2 * size_of(out) * x.shape[-1]
    if len(out) == 2:
        return [_gemm("matmul", [a, b, refs[node.output]], flops, a_t, b_t)], flops
    batch = out[:-2]
    index = tuple(f"b{d}" for d in range(len(batch)))
    parallel = flops >= GEMM_PARALLEL_MIN_FLOPS and batch[0] > 1

    def part(name: str, shape: tuple[int, ...]) -> str:
        sub = broadcast_index(index, shape[:-2], batch)
        return f"{name}[{', '.join(sub)}]" if sub else name

    def body(w: Writer) -> None:
        w.line(f"M, N, K = out.shape[-2], out.shape[-1], a.shape[{-2 if a_t else -1}]")
        for d, i in enumerate(index):
            w.line(loop_header(i, f"out.shape[{d}]", parallel and d == 0))
            w.depth += 1
        w.line(f"av, bv, ov = {part('a', x.shape)}, {part('b', y.shape)}, {part('out', out)}")
        w.line(_gemm_call(a_t, b_t, "M", "N", "K", "av", "0", "bv", "0", "0.0", "ov", "0"))

    call = _call("batched_matmul", ["a", "b", "out"], [a, b, refs[node.output]], parallel, body,
                 fastmath=False)
    return [call], flops


def _gemm_call(transpose_a: bool | str, transpose_b: bool | str, m: str, n: str, k: str, a: str, a_at: str,
               b: str, b_at: str, beta: str, c: str, c_at: str, lda: str | None = None,
               ldb: str | None = None, ldc: str | None = None) -> str:
    """Source of a gemm.gemm call; leading dimensions default to the stored rows' lengths (the
    matrix's own columns: `a.shape[-1]` for a 2-D view)."""
    lda = lda or f"{a}.shape[-1]"
    ldb = ldb or f"{b}.shape[-1]"
    ldc = ldc or f"{c}.shape[-1]"
    return (f"gemm({transpose_a}, {transpose_b}, {m}, {n}, {k}, {a}, {a_at}, {lda}, "
            f"{b}, {b_at}, {ldb}, {beta}, {c}, {c_at}, {ldc})")


def _gemm_body(parallel: bool) -> Callable[[Writer], None]:
    """out = op(a) @ op(b), the transposes `ta`, `tb` being arguments: one compiled function
    serves the forward product and both gradient products (a parallel one took ~1 s to compile,
    each). The parallel variant splits out into T blocks of rows, or of columns when it has more
    columns than rows, one BLAS call each (BLAS itself runs single-threaded: see blas.py). Each
    call then packs only its own part of the larger operand: the MNIST CNN's 64 x 9216 by
    9216 x 128 product took 2.0 ms in row blocks, 1.6 ms in column blocks (2 threads). A block of
    a transposed operand's rows (columns) is a block of its stored columns (rows), at offset lo."""
    def body(w: Writer) -> None:
        w.line("M, N, K = out.shape[0], out.shape[1], a.shape[0] if ta else a.shape[1]")
        if not parallel:
            w.line(_gemm_call("ta", "tb", "M", "N", "K", "a", "0", "b", "0", "0.0", "out", "0"))
            return
        w.line("by_columns = N > M")
        w.line("size = N if by_columns else M")
        w.line("blocks = max(1, min(T, size))")
        w.line("step = -(-size // blocks)")
        with w.block("for task in prange(blocks):"):
            w.line("lo = task * step")
            w.line("hi = min(size, lo + step)")
            with w.block("if lo < hi:"):
                with w.block("if by_columns:"):
                    w.line("m, n, a_at, b_at, c_at = M, hi - lo, 0, lo * b.shape[1] if tb else lo, lo")
                with w.block("else:"):
                    w.line("m, n, a_at, b_at, c_at = hi - lo, N, lo if ta else lo * a.shape[1], 0, lo * N")
                w.line(_gemm_call("ta", "tb", "m", "n", "K", "a", "a_at", "b", "b_at", "0.0", "out", "c_at",
                                  ldc="N"))
    return body


# Below this many flops a GEMM is one BLAS call; above, row blocks run on Numba's threads.
GEMM_PARALLEL_MIN_FLOPS = 1 << 22


def _gemm(entry: str, operands: list[str], flops: int, transpose_a: bool = False,
          transpose_b: bool = False) -> Call:
    """out = a @ b for the matrices named by operands [a, b, out], read transposed as flagged."""
    parallel = flops >= GEMM_PARALLEL_MIN_FLOPS and numba.config.NUMBA_NUM_THREADS > 1
    params, args = ["a", "b", "out", "ta", "tb"], list(operands) + [int(transpose_a), int(transpose_b)]
    if parallel:
        params.append("T")
        args.append(numba.config.NUMBA_NUM_THREADS)
    return _call(entry, params, args, parallel, _gemm_body(parallel), fastmath=False)


# -- convolution ----------------------------------------------------------------------------------
def _conv_geometry(node: Node, kernel: tuple[int, int]) -> dict[str, int]:
    (sh, sw), (ph, pw), (dh, dw) = node.attrs["stride"], node.attrs["padding"], node.attrs["dilation"]
    return dict(KH=kernel[0], KW=kernel[1], SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


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


def _im2col_plane(w: Writer) -> None:
    """col[row0 + (i, j), p] = x[input position output p reads at kernel cell (i, j)] for one
    image plane x (zero in the padding). The copies run over views with indices counting from
    0, so Numba's negative-index wraparound folds away and LLVM vectorises them (3x faster than
    indexing the whole row, and Numba's slice assignment is slower still on rows this short)."""
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


def _zero_plane(w: Writer, plane: str) -> None:
    """A loop, not `plane[:, :] = 0`: Numba's slice fill costs several times more on planes
    this small (measured on 24x24)."""
    with w.block(f"for ih in range({plane}.shape[0]):"), w.block(f"for iw in range({plane}.shape[1]):"):
        w.line(f"{plane}[ih, iw] = 0")


def _col2im_plane(w: Writer) -> None:
    """dx[ih, iw] = sum of dcol over the cells that read (ih, iw), for one image plane: the
    adjoint of im2col, with the same views counting from 0."""
    w.line("H, W = dx.shape")
    _output_size(w)
    _zero_plane(w, "dx")
    with w.block("for i in range(KH):"), w.block("for j in range(KW):"):
        w.line("src = dcol[row0 + i * KW + j]")
        _columns_inside(w)
        with w.block("for oh in range(OH):"):
            w.line("ih = oh * SH - PH + i * DH")
            with w.block("if 0 <= ih and ih < H:"):
                w.line("row, dst = src[oh * OW + lo:oh * OW + hi], dx[ih, lo * SW + start:]")
                with w.block("for q in range(hi - lo):"):
                    w.line("dst[q * SW] += row[q]")


def _conv_module(entry: str, params: list[str], node: Node, kernel: tuple[int, int],
                 plane_body: Callable[[Writer], None], plane_params: str,
                 body: Callable[[Writer], None], parallel: bool, helpers: tuple[str, ...] = ()) -> str:
    """A conv module: the window geometry as constants, the serial per-plane helper (im2col or
    col2im) and any other `helpers`, and the entry, which loops over the batch in T chunks
    (`prange` over chunks)."""
    geometry = "\n".join(f"{k} = {v}" for k, v in _conv_geometry(node, kernel).items())
    helper = Writer()
    helper.line(HELPER_DECORATOR)
    with helper.block(f"def plane({plane_params}):"):
        plane_body(helper)
    w = Writer()
    w.line(decorator(parallel, fastmath=False))
    with w.block(f"def {entry}({', '.join(params)}):"):
        body(w)
    return module(entry, w, [geometry, helper.text(), *helpers])


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
    """Bind K (the columns of one group: in-channels/G * kh * kw) and og (its out-channels)."""
    w.line(f"O, K = {matrix}.shape[0], {matrix}.shape[1] * KH * KW")
    w.line("og = O // G")


def _scratch_per_chunk(refs: Refs, images: int, rows: int, positions: int,
                       dtype: str) -> tuple[str, int]:
    """One (C*kh*kw, Ho*Wo) column matrix per thread (one thread for small convolutions): an
    image's receptive fields stay in cache between im2col and its GEMM, instead of a whole
    batch's going through memory. Returns the scratch and the number of threads."""
    threads = max(1, numba.config.NUMBA_NUM_THREADS)
    if images * rows * positions < PARALLEL_MIN_ELEMENTS:
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

    source = _conv_module(entry, params + ["G"], node, (kh, kw), plane[0], plane[1], body,
                          threads > 1)
    flops = _conv_flops(weight.shape, n * positions)
    return [Call(source, entry, tuple(args) + (node.attrs["groups"],), parallel=threads > 1)], flops


# Helpers of the im2col module's weight gradient: loops in a parallel entry, even simple ones,
# add about a second to its compile time (each becomes a parfor or is optimised with it).
_ZERO_MATRIX = f"""@njit({HELPER_OPTIONS})
def zero(a):
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            a[i, j] = 0"""
_ADD_PARTIALS = f"""@njit({HELPER_OPTIONS})
def add_partials(partial, dw):
    \"\"\"dw (O, K) = the sum over threads t of partial[t].\"\"\"
    T, O, K = partial.shape
    dwm = dw.reshape((O, K))
    for o in range(O):
        for j in range(K):
            total = partial[0, o, j]
            for t in range(1, T):
                total += partial[t, o, j]
            dwm[o, j] = total"""


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
            w.line("plane(x[n, ch], col, ch * KH * KW)")
        with w.block("for g in range(G):"):
            with w.block("if grad:"):
                w.line(_gemm_call(False, True, "og", "K", "P", "b", "(n * O + g * og) * P", "col",
                                  "g * K * P", "1.0", "partial", "(t * O + g * og) * K", "P", "P", "K"))
            with w.block("else:"):
                w.line(_gemm_call(False, False, "og", "P", "K", "b", "g * og * K", "col", "g * K * P",
                                  "0.0", "c", "(n * O + g * og) * P", "K", "P", "P"))
        _close(w, 2)
        with w.block("if grad:"):
            w.line("add_partials(partial, c)")

    entry = "conv2d_im2col"
    source = _conv_module(entry, ["x", "b", "c", "scratch", "partial", "G", "grad"], node, (kh, kw),
                          _im2col_plane, "x, col, row0", body, threads > 1,
                          helpers=(_ZERO_MATRIX, _ADD_PARTIALS))
    args = (refs[x], refs[b], refs[c], col, partial, node.attrs["groups"], grad)
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
            w.line(_gemm_call(True, False, "K", "P", "og", "w", "g * og * K", "dy", "(n * O + g * og) * P",
                              "0.0", "col", "g * K * P", "K", "P", "P"))
        with w.block("for c in range(C):"):
            w.line("plane(col, dx[n, c], c * KH * KW)")

    return _per_image_conv("conv2d_input_grad", node, refs, {"dy": dy, "w": weight, "dx": node.output},
                           "dy", weight, (node.output.shape[1], _plane_size(dy.shape)),
                           "dx.shape[1], dy.shape[2] * dy.shape[3]",
                           (_col2im_plane, "dcol, dx, row0"), steps)


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
    dw) as Winograd F(2x2, 3x3) (codegen_winograd). FLOPs counted as the direct convolution's,
    so that GFLOP/s compare with the im2col kernels."""
    planes = b if mode == WEIGHT_GRAD else c  # the planes the 2x2 tiles cover
    threads, shapes = winograd_scratch(a.shape[0], a.shape[1], planes.shape[1], planes.shape[2:], mode)
    scratch = [refs.new_scratch(shape, c.dtype) for shape in shapes]
    args = (refs[a], refs[b], refs[c], *scratch, *padding, mode)
    weight = c if mode == WEIGHT_GRAD else b
    positions = _plane_size(a.shape if mode == INPUT_GRAD else planes.shape)
    flops = _conv_flops(weight.shape, a.shape[0] * positions)
    return [Call(winograd_source(threads > 1), ENTRY, args, parallel=threads > 1)], flops


def _conv_flops(weight_shape: tuple[int, ...], positions: int) -> int:
    """2 * (weights) * (output positions of the batch): every weight meets every column once."""
    return 2 * size_of(weight_shape) * positions


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
    """Each window's cotangent goes to its first maximum in row-major order (a NaN counts as
    the maximum). A padding cell (-inf) wins only if it comes first and every real cell is
    -inf; the cotangent is then dropped, as in the reference."""
    w.line("(H, W), (OH, OW) = x.shape, dy.shape")
    _zero_plane(w, "dx")
    _window_loops(w)
    _first_maximum_search(w, "i0", "j0", "i1", "j1")
    with w.block("if not (best == -np.inf and (i0 > 0 or j0 > 0)):"):
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


def _tiled_max_pool_grad_plane(kh: int, kw: int) -> Callable[[Writer], None]:
    """The max-pool gradient when the windows tile the plane (stride = window, no padding), as
    in the usual 2x2/2 pooling: every cell lies in at most one window, so each is written once,
    with no zeroing pass and no accumulation. The first maximum is found without data-dependent
    branches: the maximum, then a flag per cell for "equals it, and no earlier cell did", the
    cotangent times that flag. On random activations the searching loop's branches mispredict;
    this ran 1.5x faster on the MNIST CNN's 64x64x24x24 (9.3 -> 6.1 ms on one thread).
    A window holding a NaN, or a non-finite cotangent (inf * 0 would be NaN), takes the
    general search. A cell that is not the maximum gets g * 0, which is -0.0 for a negative g."""
    cells = [(i, j) for i in range(kh) for j in range(kw)]

    def body(w: Writer) -> None:
        w.line("(H, W), (OH, OW) = x.shape, dy.shape")
        # cells no window covers (H or W not a multiple of the window) get no cotangent
        with w.block("for ih in range(OH * KH, H):"), w.block("for iw in range(W):"):
            w.line("dx[ih, iw] = 0")
        with w.block("for ih in range(OH * KH):"), w.block("for iw in range(OW * KW, W):"):
            w.line("dx[ih, iw] = 0")
        with w.block("for oh in range(OH):"):
            w.line("ih0 = oh * KH")
            with w.block("for ow in range(OW):"):
                w.line("iw0 = ow * KW")
                w.line("g = dy[oh, ow]")
                for k, (i, j) in enumerate(cells):
                    w.line(f"v{k} = x[ih0 + {i}, iw0 + {j}]")
                finite = " or ".join([f"v{k} != v{k}" for k in range(len(cells))] + ["g != g", "abs(g) == np.inf"])
                with w.block(f"if not ({finite}):"):
                    w.line(f"top = max({', '.join(f'v{k}' for k in range(len(cells)))})")
                    for k in range(len(cells) - 1):
                        w.line(f"k{k} = v{k} == top" + (" and not seen" if k else ""))
                        w.line("seen = k0" if k == 0 else f"seen = seen or k{k}")
                    w.line(f"k{len(cells) - 1} = not seen")
                    for k, (i, j) in enumerate(cells):
                        w.line(f"dx[ih0 + {i}, iw0 + {j}] = g * k{k}")
                with w.block("else:"):
                    with w.block("for i in range(KH):"), w.block("for j in range(KW):"):
                        w.line("dx[ih0 + i, iw0 + j] = 0")
                    _first_maximum_search(w, "0", "0", "KH", "KW")
                    w.line("dx[ih0 + best_i, iw0 + best_j] = g")
    return body


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
    _zero_plane(w, "dx")
    _window_loops(w)
    _divisor(w)
    w.line("share = dy[oh, ow] / divisor")
    with w.block("for i in range(i0, i1):"), w.block("for j in range(j0, j1):"):
        w.line("dx[ih0 + i, iw0 + j] += share")


def _pool(entry: str, operands: list[str], plane_body: Callable[[Writer], None],
          tiled_body: Callable[[int, int], Callable[[Writer], None]] | None = None):
    """Lowering of a pooling op whose operands are named `operands`, its output last; with
    `tiled_body`, windows that tile the plane (stride = window, no padding, few cells) get
    the plane body it makes for their size."""
    def lower(node: Node, refs: Refs) -> tuple[list[Call], int]:
        values = list(node.inputs) + [node.output]
        a = node.attrs
        (kh, kw), (sh, sw), (ph, pw) = a["kernel"], a["stride"], a["padding"]
        geometry = dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw)
        if "count_include_pad" in a:
            geometry["INCLUDE_PAD"] = int(a["count_include_pad"])
        tiled = (sh, sw, ph, pw) == (kh, kw, 0, 0) and 2 <= kh * kw <= TILED_POOL_MAX_CELLS
        body = tiled_body(kh, kw) if tiled and tiled_body is not None else plane_body
        parallel = max(size_of(v.shape) for v in values) >= PARALLEL_MIN_ELEMENTS
        plane_args = ", ".join(f"{name}[n, c]" for name in operands)
        call = _per_plane(entry, operands, [refs[v] for v in values], geometry, operands,
                          plane_args, body, parallel, operands[0])
        # one comparison or addition per window cell of every pooled element
        return [call], min(size_of(v.shape) for v in values) * kh * kw
    return lower


# -- scatters -------------------------------------------------------------------------------------
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
                and size_of(g.shape) >= PARALLEL_MIN_ELEMENTS)

    def body(w: Writer) -> None:
        w.line("out[...] = 0")
        index = _scatter_loops(w, len(g.shape), 0 if parallel else None)
        target = list(broadcast_index(index, shape, g.shape))
        target[axis] = f"indices[{index_text(broadcast_index(index, indices.shape, g.shape))}]"
        w.line(f"out[{index_text(tuple(target))}] += g[{index_text(index)}]")

    call = _call("scatter_add_along_axis", ["g", "indices", "out"],
                 [refs[g], refs[indices], refs[node.output]], parallel, body)
    return [call], size_of(g.shape)


@lowering(TARGET, "scatter_add")
def _scatter_add(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """out[pre, indices[mid], post] += g[pre, mid, post]; parallel over the first pre axis."""
    g, indices = node.inputs
    axis = node.attrs["axis"]
    rank = indices.type.ndim
    parallel = axis > 0 and size_of(g.shape) >= PARALLEL_MIN_ELEMENTS

    def body(w: Writer) -> None:
        w.line("out[...] = 0")
        index = _scatter_loops(w, len(g.shape), 0 if parallel else None)
        target = index[:axis] + (f"indices[{index_text(index[axis:axis + rank])}]",) + index[axis + rank:]
        w.line(f"out[{index_text(target)}] += g[{index_text(index)}]")

    call = _call("scatter_add", ["g", "indices", "out"], [refs[g], refs[indices], refs[node.output]],
                 parallel, body)
    return [call], size_of(g.shape)


for _op, _lowering in {
        "max_pool2d": _pool("max_pool2d", ["x", "y"], _max_pool_plane),
        "max_pool2d_grad": _pool("max_pool2d_grad", ["x", "dy", "dx"], _max_pool_grad_plane,
                                 _tiled_max_pool_grad_plane),
        "avg_pool2d": _pool("avg_pool2d", ["x", "y"], _avg_pool_plane),
        "avg_pool2d_grad": _pool("avg_pool2d_grad", ["dy", "dx"], _avg_pool_grad_plane)}.items():
    register_lowering(TARGET, _op, _lowering)


# -- the kernel -----------------------------------------------------------------------------------
def generate_library(kernel: Node) -> KernelSource:
    sub = kernel.subgraph
    members = members_of(sub)
    at = next(i for i, m in enumerate(members) if op_class(m.op) == "library")
    prologue, anchor, epilogue = members[:at], members[at], members[at + 1:]
    refs = Refs(argument_names(sub), prologue)
    calls, flops = lowering_for(TARGET, anchor.op)(anchor, refs)
    if epilogue:
        calls.append(_epilogue_call(kernel, anchor, epilogue, refs.names))
    return KernelSource(kernel.attrs["name"], kernel.attrs["pattern"], calls, tuple(refs.scratch),
                        flops + elementwise_flops(epilogue))


def _epilogue_call(kernel: Node, anchor: Node, epilogue: list[Node], names: dict[Value, str]) -> Call:
    """The epilogue as an elementwise kernel of its own: it reads the library result (an
    output of this kernel) and the kernel inputs it needs, and writes the other outputs. It is
    named after its own ops, so that the same epilogue after different library ops (a ReLU
    mask after a pooling or a convolution gradient) is one compiled function."""
    part, refs = epilogue_graph(kernel, anchor, epilogue, names)
    call = elementwise_call("epilogue_" + bounded_label([m.op for m in epilogue]), part)
    translate = dict(zip(argument_names(part).values(), refs))
    return replace(call, args=tuple(translate.get(a, a) for a in call.args))


