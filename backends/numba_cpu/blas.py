"""The BLAS that graphc's kernels call (scipy's OpenBLAS), loaded cheaply, its threads set.

OpenBLAS synchronises its threads by spinning. When the cores are busy, whether with Numba's
own OpenMP workers still spinning after a parallel loop or with other processes, a
two-thread GEMM can run 20-40 times slower than a one-thread one (measured on 2 cores: a
64x36864 by 36864x288 product, 1.4 s against 34 ms; an MLP step 16 ms against 2). So a graph
with parallel Numba code runs that library on one thread and splits large GEMMs into row
blocks across Numba's threads itself (codegen_library); a graph whose only parallel work is
GEMMs runs serial code around BLAS calls that BLAS threads itself (executor.py). NumPy's own
BLAS (a different library) is left alone.
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


_CONTROLLERS: list = []     # threadpoolctl's controllers of scipy's BLAS libraries, once found
_THREADS: list[int] = []    # the thread count last set through set_scipy_blas_threads


def set_scipy_blas_threads(count: int) -> bool:
    """Run scipy's BLAS (the one graphc's kernels call) on `count` threads; False if
    threadpoolctl cannot find it. Cheap when the count is already set: executables call this
    before every run, since graphs differ in who threads their GEMMs (see executor.py)."""
    if _THREADS == [count]:
        return True
    if not _CONTROLLERS:
        try:
            import threadpoolctl
        except ImportError:
            return False
        cython_blas()  # loads the library
        root = os.path.dirname(scipy.__file__)
        _CONTROLLERS.extend(
            lib for lib in threadpoolctl.ThreadpoolController().lib_controllers
            if lib.user_api == "blas" and os.path.realpath(lib.filepath).startswith((root, root + ".libs")))
        if not _CONTROLLERS:
            return False
    for lib in _CONTROLLERS:
        lib.set_num_threads(count)
    _THREADS[:] = [count]
    return True
