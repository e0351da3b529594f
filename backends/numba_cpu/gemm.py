"""GEMM for generated kernels: BLAS's sgemm/dgemm called directly from Numba code.

Numba's `np.dot` validates and copies its operands, and makes a parallel kernel around it
compile ~0.8 s slower (1.5-1.9 s against 0.7-1.0 s measured). Calling BLAS directly also takes
sub-matrices by pointer and leading dimension, so a block of rows of a transposed operand needs
no copy, and it accumulates (beta = 1) into its output.

The BLAS is scipy's, the library Numba's own `np.dot` binds (run single-threaded by graphc: see
blas.py), reached through the function pointers scipy.linalg.cython_blas exports. They are
registered with LLVM under fixed symbol names, so that compiled kernels calling them can be
cached on disk and linked again by another process.

Where that BLAS has a small-matrix sgemm kernel (blas.py), a float32 product too large for it is
computed as tiles that fit it: unpacked, they ran 1.1-1.6x as fast as one packed call on the
products of an LSTM, an MLP and im2col convolutions (one thread).
"""
from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types

from .blas import cython_blas, small_sgemm_limit


def _exported_function(name: str) -> int:
    """The address of cython_blas's `name` (a Fortran BLAS routine)."""
    capsule = cython_blas().__pyx_capi__[name]
    get_name = ctypes.pythonapi.PyCapsule_GetName
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get_pointer(capsule, get_name(capsule))


llvm.add_symbol("graphc_sgemm", _exported_function("sgemm"))
llvm.add_symbol("graphc_dgemm", _exported_function("dgemm"))
# Fortran calling convention: every argument by reference.
_FORTRAN_GEMM = types.void(*[types.voidptr] * 13)
_sgemm = types.ExternalFunction("graphc_sgemm", _FORTRAN_GEMM)
_dgemm = types.ExternalFunction("graphc_dgemm", _FORTRAN_GEMM)

_N, _T = 78, 84  # ord("N"), ord("T"): BLAS's transpose flags


# The largest product (M * N * K) that BLAS computes in its small-matrix kernel, 0 where it has
# none (blas.py). Of the tile shapes measured (one thread, float32), 64 columns of C, at most 256
# of K and as many rows (a multiple of 16) as fit were the fastest: against one packed call,
# 64 x 128 by 128 x 512 1.32x, 32 x 300 by 300 x 1024 1.64x, 1792 x 28 by 28 x 512 1.27x,
# 28 x 1792 by 1792 x 512 1.49x, 128 x 900 by 900 x 512 1.16x, 512^3 1.02-1.04x; 16 or 48 columns
# were slower than 64. Numba freezes
# the limit into compiled (and cached) code; its cache is keyed by the CPU, which picks BLAS's kernels.
_SMALL_MNK = small_sgemm_limit()
_TILE_COLUMNS = 64
_TILE_ROWS_MULTIPLE = 16
_TILE_DEPTH = 256
# Up to this size of C, a tiled product runs one slice of K at a time over all of C's tiles (a
# block of columns of lstm-28's weight gradient, 157 x 256 by K = 1792, after the loop wrote its
# operands: 136-151 GFLOP/s on 2 threads from memory, 173-204 so); a larger C would itself be
# read again for every slice.
_DEPTH_OUTER_BYTES = 256 * 1024


@njit(cache=True, error_model="numpy", no_cfunc_wrapper=True, no_cpython_wrapper=True)
def _blas_gemm(transpose_a, transpose_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc,
               ints, scalars, flags):
    """One BLAS call; `ints`, `scalars`, `flags` are scratch for the by-reference arguments."""
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = n, m, k, ldb, lda, ldc
    scalars[0], scalars[1] = 1, beta
    flags[0] = _T if transpose_b else _N
    flags[1] = _T if transpose_a else _N
    size = c.itemsize
    p, s, f = ints.ctypes.data, scalars.ctypes.data, flags.ctypes.data
    args = (f, f + 1, p, p + 4, p + 8, s, b.ctypes.data + size * b_at, p + 12,
            a.ctypes.data + size * a_at, p + 16, s + size, c.ctypes.data + size * c_at, p + 20)
    if size == 4:
        _sgemm(*args)
    else:
        _dgemm(*args)


@njit(cache=True, error_model="numpy", no_cfunc_wrapper=True)
def gemm(transpose_a, transpose_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc):
    """C = op(A) @ op(B) + beta * C for row-major matrices inside flat float32/float64 arrays:
    C is m x n starting at element `c_at` of `c` with rows `ldc` elements apart, op(A) is m x k
    (A itself k x m when `transpose_a`) at `a_at` with row stride `lda`, op(B) k x n likewise.

    BLAS is column-major: a row-major matrix is its column-major transpose, so this computes
    C.T = op(B).T @ op(A).T. A float32 product too large for BLAS's small-matrix kernel is
    computed in tiles that fit it, where BLAS has one (`_SMALL_MNK`) and B is not transposed
    (its kernel for B transposed, A not, takes only tiles of C up to 1200 elements)."""
    if m == 0 or n == 0:
        return
    if k == 0:  # an empty sum (BLAS would reject lda = 0)
        for i in range(m):
            for j in range(n):
                at = c_at + i * ldc + j
                c.flat[at] = 0 if beta == 0 else c.flat[at] * beta
        return
    ints = np.empty(6, np.int32)
    scalars = np.empty(2, c.dtype)
    flags = np.empty(2, np.uint8)
    rows, depth = _tiles(m, n, k, transpose_b, c.itemsize)
    if rows == 0:
        _blas_gemm(transpose_a, transpose_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc,
                   ints, scalars, flags)
        return
    if m * n * c.itemsize <= _DEPTH_OUTER_BYTES:
        # C stays in cache while each slice of K is read once: the slices of A and B that one
        # depth needs fit in L2 together, where tile by tile they were read again for every tile
        for p in range(0, k, depth):
            for i in range(0, m, rows):
                for j in range(0, n, _TILE_COLUMNS):
                    _tile(transpose_a, i, j, p, rows, depth, m, n, k, a, a_at, lda, b, b_at, ldb, beta,
                          c, c_at, ldc, ints, scalars, flags)
        return
    for i in range(0, m, rows):
        for j in range(0, n, _TILE_COLUMNS):
            for p in range(0, k, depth):  # a deep product sums its slices of K into the tile
                _tile(transpose_a, i, j, p, rows, depth, m, n, k, a, a_at, lda, b, b_at, ldb, beta,
                      c, c_at, ldc, ints, scalars, flags)


@njit(cache=True, error_model="numpy", no_cfunc_wrapper=True, no_cpython_wrapper=True)
def _tile(transpose_a, i, j, p, rows, depth, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc,
          ints, scalars, flags):
    """C's tile at row i, column j += its product over K's slice at p (= when p is 0: times beta)."""
    _blas_gemm(transpose_a, False, min(rows, m - i), min(_TILE_COLUMNS, n - j), min(depth, k - p),
               a, a_at + (i if transpose_a else i * lda) + (p * lda if transpose_a else p), lda,
               b, b_at + p * ldb + j, ldb, beta if p == 0 else 1.0, c, c_at + i * ldc + j, ldc,
               ints, scalars, flags)


@njit(cache=True, error_model="numpy", no_cfunc_wrapper=True)
def _tiles(m, n, k, transpose_b, itemsize):
    """(rows, depth) of the tiles (of _TILE_COLUMNS columns, at most _TILE_DEPTH deep) a product
    is computed in so that each fits BLAS's small-matrix kernel, or (0, k) for one BLAS call:
    where it fits already or where BLAS has no such kernel for it."""
    if _SMALL_MNK == 0 or itemsize != 4 or transpose_b or m * n * k <= _SMALL_MNK:
        return 0, k
    depth = min(k, _TILE_DEPTH)
    if m * min(n, _TILE_COLUMNS) * depth <= _SMALL_MNK:
        return m, depth
    return _SMALL_MNK // (_TILE_COLUMNS * depth) // _TILE_ROWS_MULTIPLE * _TILE_ROWS_MULTIPLE, depth
