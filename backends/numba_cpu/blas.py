"""The BLAS that graphc's kernels call (scipy's OpenBLAS), loaded cheaply, run single-threaded.

OpenBLAS synchronises its threads by spinning. When the cores are busy, whether with Numba's
own OpenMP workers still spinning after a parallel loop or with other processes, a
two-thread GEMM can run 20-40 times slower than a one-thread one (measured on 2 cores: a
64x36864 by 36864x288 product, 1.4 s against 34 ms). graphc therefore runs that library on one
thread and splits large GEMMs into row blocks across Numba's threads itself (codegen_matmul).
NumPy's own BLAS (a different library) is left alone.

Some of OpenBLAS's kernel sets (SkylakeX and its successors, which it also picks on AVX-512
AMD cores) compute a small sgemm, at most 100^3 multiply-adds, in a "small-matrix" kernel that
reads the operands in place instead of packing them; gemm.py tiles larger products to use it
(`small_sgemm_limit`).
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import sys
from types import ModuleType

import scipy

_CYTHON_BLAS = "scipy.linalg.cython_blas"


def cython_blas() -> ModuleType:
    """scipy.linalg.cython_blas, whose capsules hold the BLAS routines' addresses.

    Loaded straight from its extension file when scipy.linalg is not imported yet: the package's
    __init__ imports all of scipy.linalg (~0.2 s of every process's first compile, measured),
    and this module needs none of it. Registered under its own name, so a later
    `import scipy.linalg` (Numba's np.dot does one) finds and keeps this same module."""
    if _CYTHON_BLAS in sys.modules:
        return sys.modules[_CYTHON_BLAS]
    paths = glob.glob(os.path.join(os.path.dirname(scipy.__file__), "linalg", "cython_blas.*"))
    spec = importlib.util.spec_from_file_location(_CYTHON_BLAS, paths[0]) if paths else None
    if spec is None:  # an unusual layout: the ordinary import
        import scipy.linalg.cython_blas as module
        return module
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[_CYTHON_BLAS] = module
    return module


@functools.cache
def _scipy_blas_controllers() -> tuple:
    """threadpoolctl's controllers of scipy's BLAS libraries (none without threadpoolctl)."""
    try:
        import threadpoolctl
    except ImportError:
        return ()
    cython_blas()  # loads the library
    root = os.path.dirname(scipy.__file__)
    return tuple(lib for lib in threadpoolctl.ThreadpoolController().lib_controllers
                 if lib.user_api == "blas" and os.path.realpath(lib.filepath).startswith((root, root + ".libs")))


def single_threaded_scipy_blas() -> bool:
    """Set scipy's BLAS libraries to one thread; False if threadpoolctl cannot find them."""
    controllers = _scipy_blas_controllers()
    for lib in controllers:
        lib.set_num_threads(1)
    return bool(controllers)


# OpenBLAS kernel sets with the small-matrix sgemm kernels (kernel/x86_64/KERNEL.SKYLAKEX and
# those that include it), and the largest M * N * K they take (sgemm_small_kernel_permit_skylakex.c).
_SMALL_SGEMM_CORES = ("skylakex", "cooperlake", "sapphirerapids")
_SMALL_SGEMM_MNK = 100 ** 3


def small_sgemm_limit() -> int:
    """The largest M * N * K that scipy's BLAS computes with its unpacked small-matrix kernel
    when A is not transposed (BLAS's column-major view), or 0 where it has none (another BLAS,
    another kernel set, threadpoolctl missing)."""
    for lib in _scipy_blas_controllers():
        if lib.internal_api == "openblas" and str(lib.architecture).lower() in _SMALL_SGEMM_CORES:
            return _SMALL_SGEMM_MNK
    return 0
