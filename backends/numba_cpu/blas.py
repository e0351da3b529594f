"""The BLAS that graphc's kernels call (scipy's OpenBLAS) runs single-threaded under graphc.

OpenBLAS synchronises its threads by spinning. When the cores are busy, whether with Numba's
own OpenMP workers still spinning after a parallel loop or with other processes, a
two-thread GEMM can run 20-40 times slower than a one-thread one (measured on 2 cores: a
64x36864 by 36864x288 product, 1.4 s against 34 ms). graphc therefore runs that library on one
thread and splits large GEMMs into row blocks across Numba's threads itself (codegen_library).
NumPy's own BLAS (a different library) is left alone.
"""
from __future__ import annotations

import os


def single_threaded_scipy_blas() -> bool:
    """Set scipy's BLAS libraries to one thread; False if threadpoolctl cannot find them."""
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library Numba binds to)
        import threadpoolctl
    except ImportError:
        return False
    root = os.path.dirname(scipy.__file__)
    found = False
    for lib in threadpoolctl.ThreadpoolController().lib_controllers:
        if lib.user_api == "blas" and os.path.realpath(lib.filepath).startswith((root, root + ".libs")):
            lib.set_num_threads(1)
            found = True
    return found
