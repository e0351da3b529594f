"""The BLAS that graphc's kernels call (scipy's OpenBLAS), loaded cheaply, run single-threaded.

OpenBLAS synchronises its threads by spinning. When the cores are busy, whether with Numba's
own OpenMP workers still spinning after a parallel loop or with other processes, a
two-thread GEMM can run 20-40 times slower than a one-thread one (measured on 2 cores: a
64x36864 by 36864x288 product, 1.4 s against 34 ms). graphc therefore runs that library on one
thread and splits large GEMMs into row blocks across Numba's threads itself (codegen_matmul).
NumPy's own BLAS (a different library) is left alone.
"""
from __future__ import annotations

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


def single_threaded_scipy_blas() -> bool:
    """Set scipy's BLAS libraries to one thread; False if threadpoolctl cannot find them."""
    try:
        import threadpoolctl
    except ImportError:
        return False
    cython_blas()  # loads the library
    root = os.path.dirname(scipy.__file__)
    found = False
    for lib in threadpoolctl.ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and os.path.realpath(lib.filepath).startswith((root, root + ".libs")):
            lib.set_num_threads(1)
            found = True
    return found
