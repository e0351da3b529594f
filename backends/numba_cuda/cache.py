"""The on-disk cache of generated CUDA kernels, designed as the CPU backend's kernel cache.

Each kernel module is written once, atomically, to ``<cache dir>/k_<hash>.py`` (the hash covers
the source and the graphc, Numba, numba-cuda, llvmlite and Python versions; the directory is the
CPU backend's) and imported under that name, registered in ``sys.modules``.

On a GPU the kernels are ``@cuda.jit(cache=True)`` and compiled here, eagerly, for the argument
types the executor passes: numba-cuda keeps the compiled code in ``<cache dir>/__pycache__``,
its index stamped with the module file's mtime and size (so a module file is never rewritten).
A hit is a kernel whose compiled code numba-cuda loaded from there, after checking it against the
entry's manifest (kernel_manifest.py); an entry that does not match is purged and compiled afresh.

Under the simulator (NUMBA_ENABLE_CUDASIM=1) kernels run as Python and nothing is compiled:
the module files still go through the cache directory, a hit being an intact module file found
on disk and a miss one written, so that the files and counters are the ones a GPU uses.

Either way a module file whose text is not its kernel's, or whose bytecode is not the one its
manifest records, is deleted and rebuilt; the directory is used only when it is this user's alone
(kernel_files.usable_cache_dir).
"""
from __future__ import annotations

import sys
import time
from typing import Any

import llvmlite
import numba

from graphc.backends.kernel_files import CacheStats, KernelFiles, default_cache_dir, hashed_key, package_version

from .codegen import SIMULATED, CudaCall


VERSION_TAG = (f"graphc {package_version('graphc')}; numba {numba.__version__}; numba-cuda "
               f"{package_version('numba-cuda')}; llvmlite {llvmlite.__version__}; python {sys.version_info[:3]}")


def cache_key(source: str) -> str:
    return hashed_key(VERSION_TAG, source)


class CudaKernelCache(KernelFiles):
    """Loads generated kernels through one cache directory."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.stats = CacheStats()

    def load(self, call: CudaCall, signature: tuple, stats: CacheStats) -> Any:
        """The kernel of `call`, on a GPU compiled for `signature`."""
        key = cache_key(call.source)
        local = CacheStats()
        with self._lock:
            self._listings.clear()  # other processes may have written since the last load
            kernel = self._loaded.get(key)
            if kernel is not None and (SIMULATED or signature in kernel.overloads):
                local.reused += 1
            else:
                start = time.perf_counter()
                kernel, hit = self._build(key, call, kernel, signature, local)
                self._count(local, hit, time.perf_counter() - start)
                self._loaded[key] = kernel
        self.stats.add(local)
        stats.add(local)
        return kernel

    def _build(self, key: str, call: CudaCall, kernel: Any, signature: tuple,
               stats: CacheStats) -> tuple[Any, bool]:
        """Import the kernel (when not yet) and, on a GPU, compile it: it, and whether the
        cache had it (the module file under the simulator, the compiled code on a GPU)."""
        hit = False
        if kernel is None:
            hit = self._check_source(key, call.source, stats)
            kernel = self._import(key, call.entry)
        if SIMULATED:
            return kernel, hit
        return self._compile(key, call, kernel, signature, stats)

    @staticmethod
    def _count(stats: CacheStats, hit: bool, seconds: float) -> None:
        if hit:
            stats.hits += 1
            stats.load_seconds += seconds
        else:
            stats.misses += 1
            stats.compiled += 1
            stats.compile_seconds += seconds

    def _compile(self, key: str, call: CudaCall, kernel: Any, signature: tuple,
                 stats: CacheStats) -> tuple[Any, bool]:
        """(GPU) Load `signature` from numba-cuda's disk cache (its files checked against the
        kernel's manifest first: a damaged entry is purged and rebuilt) or compile it and record
        what numba-cuda wrote: the kernel and whether it was a hit."""
        compiled_in = kernel.stats.cache_path
        self._check_compiled(key, compiled_in, stats)
        hits = sum(kernel.stats.cache_hits.values())
        kernel.compile(signature)
        loaded = sum(kernel.stats.cache_hits.values()) > hits
        if not loaded:
            self._record_compiled(key, compiled_in)
        return kernel, loaded


_CACHES: dict[str, CudaKernelCache] = {}


def get_cache(directory: str | None = None) -> CudaKernelCache:
    """The process-wide cache for `directory` (default: the CPU backend's, read now)."""
    directory = directory or default_cache_dir()
    if directory not in _CACHES:
        _CACHES[directory] = CudaKernelCache(directory)
    return _CACHES[directory]
