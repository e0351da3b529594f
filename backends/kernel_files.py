"""Generated kernel modules on disk, shared by the Numba CPU and CUDA kernel caches.

A kernel's module is written once, atomically, to ``<cache dir>/k_<key>.py`` and imported from
that path under its own name (registered in ``sys.modules``: Numba's on-disk cache locates a
function by its module's file, so ``exec`` of a string could not be cached). The JIT keeps the
compiled code beside it in ``__pycache__``. A module file whose text is not its kernel's is
deleted, with the compiled code, and written again.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import py_compile
import sys
import tempfile
import threading
import warnings
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numba
from numba import types

from graphc.backends.source_guard import check_source
from graphc.ir import TensorType


def package_version(package: str) -> str:
    """An installed package's version, for cache keys ('unknown' when not installed)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def hashed_key(version_tag: str, source: str) -> str:
    """A kernel's cache key: its source under the versions that compiled it."""
    return hashlib.sha256(f"{version_tag}\n{source}".encode()).hexdigest()[:32]


def signature_of(args: list[TensorType | int]) -> tuple:
    """The Numba types of a call's arguments: C-contiguous arrays and int64s."""
    return tuple(types.int64 if isinstance(a, int) else
                 types.Array(numba.from_dtype(a.np_dtype), a.ndim, "C") for a in args)


class KernelFiles:
    """The kernel modules of one cache directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._loaded: dict[str, Any] = {}  # cache key -> the loaded kernel (a dispatcher)
        self._lock = threading.Lock()
        os.makedirs(directory, exist_ok=True)

    def module_name(self, key: str) -> str:
        return f"k_{key}"

    def path(self, key: str) -> str:
        return os.path.join(self.directory, self.module_name(key) + ".py")

    def _write_source(self, key: str, source: str) -> None:
        """Atomically: a reader never sees half a file (temporary file, then rename). Byte-
        compiled at once (also atomically), since Python does not write bytecode on import where
        PYTHONDONTWRITEBYTECODE is set: every process would compile the module again. Nothing
        the source guard refuses reaches the disk."""
        check_source(source)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, self.path(key))
        try:
            py_compile.compile(self.path(key), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (py_compile.PyCompileError, OSError):
            pass  # imported from source then; a syntax error is raised there, naming the kernel

    def _check_source(self, key: str, source: str, stats: Any) -> bool:
        """Whether the kernel's module file was on disk, intact; written if not (a corrupt one
        is purged, counted in `stats.rebuilt`, and replaced)."""
        path = self.path(key)
        if os.path.exists(path):
            with open(path, "rb") as f:
                if f.read() == source.encode():
                    return True
            warnings.warn(f"graphc: kernel cache entry {path} is corrupt; rebuilding it")
            self._purge(key)
            stats.rebuilt += 1
        self._write_source(key, source)
        return False

    def _purge(self, key: str, compiled_in: str | None = None) -> None:
        """Delete an entry's module file and the JIT's index and code files for it (in the
        cache directory's __pycache__ and in `compiled_in`, where the JIT keeps them)."""
        name = self.module_name(key)
        for folder in {os.path.join(self.directory, "__pycache__"), compiled_in or ""} - {""}:
            for path in glob.glob(os.path.join(folder, name + ".*")):
                os.remove(path)
        if os.path.exists(self.path(key)):
            os.remove(self.path(key))
        sys.modules.pop(name, None)

    def _import(self, key: str, entry: str) -> Any:
        """The function `entry` of the kernel's module, imported from its file."""
        name = self.module_name(key)
        spec = importlib.util.spec_from_file_location(name, self.path(key))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return getattr(module, entry)

    def _compiled_files(self, key: str, compiled_in: str) -> list[str]:
        """The JIT's files for the entry in `compiled_in`."""
        return glob.glob(os.path.join(compiled_in, self.module_name(key) + ".*"))
