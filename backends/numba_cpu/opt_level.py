"""The LLVM optimisation level generated kernels compile at.

LLVM's -O2 instead of Numba's default -O3: the same speed, measured kernel by kernel (Adam
update, bias+ReLU, max-pool gradient, the Winograd convolutions: within the noise of alternating
runs), and ~25% less compile time (the Winograd module 11.4-11.9 s -> 8.7-9.9 s). A NUMBA_OPT set
by the user is kept (and keys the kernel cache, cache.py).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import numba
from numba.core.compiler_lock import global_compiler_lock

KERNEL_OPT_LEVEL = 2


@contextmanager
def kernel_optimization_level() -> Iterator[None]:
    """Compile under KERNEL_OPT_LEVEL: Numba reads `config.OPT` for every module it optimizes.
    (Its code generator, already made by the kernel's dispatcher, keeps the process's level.)
    Numba's compiler lock is held meanwhile, so no other thread's compile sees the switch."""
    if "NUMBA_OPT" in os.environ:
        yield
        return
    with global_compiler_lock:  # re-entrant: the compile inside takes it again
        saved = numba.config.OPT
        numba.config.OPT = type(saved)(KERNEL_OPT_LEVEL)
        try:
            yield
        finally:
            numba.config.OPT = saved


def worker_environment() -> dict[str, str]:
    """A compile worker compiles nothing but kernels: the whole process at KERNEL_OPT_LEVEL."""
    return {"NUMBA_OPT": str(KERNEL_OPT_LEVEL), **os.environ}
