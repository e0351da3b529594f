"""GEMM for generated kernels: BLAS's sgemm/dgemm called directly from Numba code.

Numba's `np.dot` validates and copies its operands, and makes a parallel kernel around it
compile ~0.8 s slower (1.5-1.9 s against 0.7-1.0 s measured). Calling BLAS directly also takes
sub-matrices by pointer and leading dimension, so a block of rows of a transposed operand needs
no copy, and it accumulates (beta = 1) into its output.

The BLAS is scipy's, the library Numba's own `np.dot` binds (run single-threaded by graphc: see
blas.py), reached through the function pointers scipy.linalg.cython_blas exports. They are
registered with LLVM under fixed symbol names, so that compiled kernels calling them can be
cached on disk and linked again by another process.
"""
from __future__ import annotations

import ctypes

import llvmlite.binding as llvm
import numpy as np
from numba import njit, types

from .blas import cython_blas


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


@njit(cache=True, error_model="numpy", no_cfunc_wrapper=True)
def gemm(transpose_a, transpose_b, m, n, k, a, a_at, lda, b, b_at, ldb, beta, c, c_at, ldc):
    """C = op(A) @ op(B) + beta * C for row-major matrices inside flat float32/float64 arrays:
    C is m x n starting at element `c_at` of `c` with rows `ldc` elements apart, op(A) is m x k
    (A itself k x m when `transpose_a`) at `a_at` with row stride `lda`, op(B) k x n likewise.

    BLAS is column-major: a row-major matrix is its column-major transpose, so this computes
    C.T = op(B).T @ op(A).T."""
    if m == 0 or n == 0:
        return
    if k == 0:  # an empty sum (BLAS would reject lda = 0)
        for i in range(m):
            for j in range(n):
                at = c_at + i * ldc + j
                c.flat[at] = 0 if beta == 0 else c.flat[at] * beta
        return
    ints = np.empty(6, np.int32)
    ints[0], ints[1], ints[2], ints[3], ints[4], ints[5] = n, m, k, ldb, lda, ldc
    scalars = np.empty(2, c.dtype)
    scalars[0], scalars[1] = 1, beta
    flags = np.empty(2, np.uint8)
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
