"""The on-disk cache of generated CUDA kernels, with the CPU backend's design (numba_cpu/cache.py).

Each kernel module is written once, atomically, to ``<cache dir>/k_<hash>.py`` (the hash covers
the source and the graphc, Numba, numba-cuda, llvmlite and Python versions; the directory is the
CPU backend's) and imported under that name, registered in ``sys.modules``.

On a GPU the kernels are ``@cuda.jit(cache=True)`` and compiled here, eagerly, for the argument
types the executor passes: numba-cuda keeps the compiled code in ``<cache dir>/__pycache__``,
its index stamped with the module file's mtime and size (so a module file is never rewritten).
A hit is a kernel whose compiled code numba-cuda loaded from there; an entry that fails to load
is purged and compiled afresh.

Under the simulator (NUMBA_ENABLE_CUDASIM=1) kernels run as Python and nothing is compiled:
the module files still go through the cache directory, a hit being an intact module file found
on disk and a miss one written, so that the files and counters are the ones a GPU uses.

Either way a module file whose text is not its kernel's is deleted and rebuilt.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
import time
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import llvmlite
import numba
from numba import types

from graphc.backends.numba_cpu import CacheStats, default_cache_dir
from graphc.ir import TensorType

from .codegen import SIMULATED, CudaCall


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


VERSION_TAG = (f"graphc {_version('graphc')}; numba {numba.__version__}; numba-cuda "
               f"{_version('numba-cuda')}; llvmlite {llvmlite.__version__}; python {sys.version_info[:3]}")


def cache_key(source: str) -> str:
    return hashlib.sha256(f"{VERSION_TAG}\n{source}".encode()).hexdigest()[:32]


def signature_of(args: list[TensorType | int]) -> tuple:
    """The types numba-cuda sees at launch: C-contiguous device arrays and int64s."""
    return tuple(types.int64 if isinstance(a, int) else
                 types.Array(numba.from_dtype(a.np_dtype), a.ndim, "C") for a in args)


class CudaKernelCache:
    """Loads generated kernels through one cache directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.stats = CacheStats()
        self._loaded: dict[str, Any] = {}  # cache key -> kernel (dispatcher)
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)

    def load(self, call: CudaCall, signature: tuple, stats: CacheStats) -> Any:
        """The kernel of `call`, on a GPU compiled for `signature`."""
        key = cache_key(call.source)
        local = CacheStats()
        with self._lock:
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

    # -- files -------------------------------------------------------------------------------
    def module_name(self, key: str) -> str:
        return f"k_{key}"

    def path(self, key: str) -> str:
        return os.path.join(self.directory, self.module_name(key) + ".py")

    def _write_source(self, key: str, source: str) -> None:
        """Atomically: a reader never sees half a file (temporary file, then rename)."""
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, self.path(key))

    def _check_source(self, key: str, source: str, stats: CacheStats) -> bool:
        """Whether the kernel's module file was on disk, intact; written if not (a corrupt
        one is replaced and counted)."""
        path = self.path(key)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() == source.encode():
                    return True
            warnings.warn(f"graphc: CUDA kernel cache entry {path} is corrupt; rebuilding it")
            self._purge(key)
            stats.rebuilt += 1
        self._write_source(key, source)
        return False

    def _purge(self, key: str, compiled_in: str | None = None) -> None:
        """Delete an entry's module file and numba-cuda's index and code files for it."""
        name = self.module_name(key)
        for folder in {os.path.join(self.directory, "__pycache__"), compiled_in or ""} - {""}:
            for path in glob.glob(os.path.join(folder, name + ".*")):
                os.remove(path)
        if os.path.exists(self.path(key)):
            os.remove(self.path(key))
        sys.modules.pop(name, None)

    def _import(self, key: str, entry: str) -> Any:
        name = self.module_name(key)
        spec = importlib.util.spec_from_file_location(name, self.path(key))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # else numba-cuda's cache could not be loaded next time
        spec.loader.exec_module(module)
        return getattr(module, entry)

    def _compile(self, key: str, call: CudaCall, kernel: Any, signature: tuple,
                 stats: CacheStats) -> tuple[Any, bool]:
        """(GPU) Load `signature` from numba-cuda's disk cache or compile it: the kernel and
        whether it was a hit. An entry numba-cuda fails to load is purged and compiled afresh."""
        hits = sum(kernel.stats.cache_hits.values())
        try:
            kernel.compile(signature)
        except Exception:
            compiled_in = kernel.stats.cache_path
            if not glob.glob(os.path.join(compiled_in, self.module_name(key) + ".*")):
                raise  # nothing cached: a genuine compile error
            warnings.warn(f"graphc: compiled CUDA kernel cache for {call.entry} is corrupt; rebuilding it")
            self._purge(key, compiled_in)
            stats.rebuilt += 1
            self._write_source(key, call.source)
            kernel = self._import(key, call.entry)
            kernel.compile(signature)
            return kernel, False
        return kernel, sum(kernel.stats.cache_hits.values()) > hits


_CACHES: dict[str, CudaKernelCache] = {}


def get_cache(directory: str | None = None) -> CudaKernelCache:
    """The process-wide cache for `directory` (default: the CPU backend's, read now)."""
    directory = directory or default_cache_dir()
    if directory not in _CACHES:
        _CACHES[directory] = CudaKernelCache(directory)
    return _CACHES[directory]
