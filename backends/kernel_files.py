"""Generated kernel modules on disk, shared by the Numba CPU and CUDA kernel caches.

A kernel's module is written once, atomically, to ``<cache dir>/k_<key>.py`` and imported from
that path under its own name (registered in ``sys.modules``: Numba's on-disk cache locates a
function by its module's file, so ``exec`` of a string could not be cached). The JIT keeps the
compiled code beside it in ``__pycache__``. Every file of an entry is checked before it is
loaded (the module's text against its kernel's, the bytecode and compiled code against the
entry's manifest, kernel_manifest.py); an entry that does not match is deleted, counted in
`rebuilt`, and built again.

The cache directory is only used when it is this user's alone (`usable_cache_dir`).
"""
from __future__ import annotations

import atexit
import hashlib
import importlib.util
import os
import py_compile
import shutil
import stat
import sys
import tempfile
import threading
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import numba
import numpy as np
from numba import types

from graphc.backends import kernel_manifest
from graphc.backends.source_guard import check_source
from graphc.ir import TensorType
from graphc.ir.errors import GraphcError


@dataclass
class CacheStats:
    """Counters over kernel loads. `hits`: compiled code found on disk; `misses`: not found,
    so compiled (`compiled` counts the compilations, `in_workers` those done by worker
    processes, `compile_seconds` the wall time); `reused`: an identical kernel already loaded
    by this process; `rebuilt`: corrupt entries replaced."""

    hits: int = 0
    misses: int = 0
    compiled: int = 0
    in_workers: int = 0
    reused: int = 0
    rebuilt: int = 0
    compile_seconds: float = 0.0
    load_seconds: float = 0.0

    def add(self, other: CacheStats) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def __str__(self) -> str:
        workers = f", {self.in_workers} of them by workers" if self.in_workers else ""
        return (f"{self.hits} disk hits, {self.misses} misses ({self.compiled} compiled in "
                f"{self.compile_seconds:.2f} s{workers}), {self.reused} reused in process, "
                f"{self.rebuilt} rebuilt")


def default_cache_dir() -> str:
    explicit = os.environ.get("GRAPHC_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "graphc")


def package_version(package: str) -> str:
    """An installed package's version, for cache keys ('unknown' when not installed)."""
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def hashed_key(version_tag: str, source: str) -> str:
    """A kernel's cache key: its source under the versions that compiled it."""
    return hashlib.sha256(f"{version_tag}\n{source}".encode()).hexdigest()[:32]


def signature_of(args: list[TensorType | int | np.floating]) -> tuple:
    """The Numba types of a call's arguments: C-contiguous arrays, int64s and float scalars of
    their own dtype."""
    return tuple(types.int64 if isinstance(a, int) else
                 numba.from_dtype(a.dtype) if isinstance(a, np.floating) else
                 types.Array(numba.from_dtype(a.np_dtype), a.ndim, "C") for a in args)


# The trust boundary. Python runs a cached .pyc as it finds it and Numba unpickles its index
# and code files: whoever can write into the cache directory runs code in every process that
# compiles through it. So, as ssh does with ~/.ssh, graphc uses a cache directory only when it
# is this user's alone: the directory and its __pycache__ owned by this user, no symbolic link,
# writable by nobody else (the kernel manifests cannot help there: they live in the same place).
# Directories graphc creates are made 0700 and files 0600 whatever the umask, so what passes
# the check stays private. Anyone else able to write there could run code as this user without
# graphc anyway; a directory that fails the check is not touched, and kernels compile into a
# private temporary directory instead.
PRIVATE_DIR_MODE = 0o700
BYTECODE_FOLDER = "__pycache__"


class KernelCacheWarning(UserWarning):
    """The kernel cache directory is not used, or one of its entries was damaged and rebuilt."""


class CacheDirectoryError(GraphcError, OSError):
    """No directory graphc could compile kernels into."""


_USABLE: dict[str, str] = {}  # requested cache directory -> the one used (warned about once)
_USABLE_LOCK = threading.Lock()
_fallback_dir: str | None = None


def usable_cache_dir(requested: str) -> str:
    """`requested` if it is private to this user and writable (created, 0700, if missing); else,
    with one warning per process, a private temporary directory removed at exit."""
    with _USABLE_LOCK:
        if requested not in _USABLE:
            try:
                reason = _not_usable(requested)
            except OSError as exc:
                reason = f"it cannot be created or written ({exc.strerror or exc})"
            _USABLE[requested] = requested if reason is None else _private_temporary_dir(requested, reason)
        return _USABLE[requested]


def _not_usable(root: str) -> str | None:
    """Why `root` may not hold the kernel cache, or None. Creates what is missing of it and its
    __pycache__ (and of the folder NUMBA_CACHE_DIR would hold its compiled code in); raises
    OSError where it cannot (a file in the way, a read-only file system)."""
    bytecode = os.path.join(root, BYTECODE_FOLDER)
    folders = [root, bytecode]
    compiled = numba_cache_folder(root)
    if compiled is not None:  # Numba then keeps the pickled code there, not in __pycache__
        folders.append(compiled)
    for folder in folders:
        for path in _make_private_dirs(folder) + [folder]:
            reason = _not_private(path)
            if reason is not None:
                return f"{path} {reason}"
        reason = _parents_not_safe(folder)
        if reason is not None:
            return reason
    os.remove(tempfile.mkstemp(dir=bytecode)[1])  # writable (root can be refused: a read-only fs)
    return None


def numba_cache_folder(root: str) -> str | None:
    """Where Numba keeps the compiled code of modules in `root` when NUMBA_CACHE_DIR is set
    (its UserProvidedCacheLocator's folder: a name anyone can predict), else None."""
    if not numba.config.CACHE_DIR:
        return None
    from numba.core.caching import _CacheLocator
    subpath = _CacheLocator.get_suitable_cache_subpath(os.path.join(root, "k.py"))
    return os.path.join(os.path.abspath(numba.config.CACHE_DIR), subpath)


def _parents_not_safe(path: str) -> str | None:
    """Why another user could replace `path` by renaming it away (as ssh's StrictModes asks of
    ~/.ssh's parents), or None: every folder above it must be this user's or root's, and writable
    by nobody else unless sticky (/tmp: others cannot rename what they do not own)."""
    parent = os.path.dirname(os.path.realpath(path))
    while True:
        info = os.stat(parent)
        if info.st_uid not in (0, os.geteuid()):
            return (f"{path} lies in {parent}, owned by another user (uid {info.st_uid}), who could "
                    "replace it")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not info.st_mode & stat.S_ISVTX:
            return (f"{path} lies in {parent}, which others can write to (mode "
                    f"{stat.S_IMODE(info.st_mode):04o}, not sticky): they could replace it")
        above = os.path.dirname(parent)
        if above == parent:
            return None
        parent = above


def _make_private_dirs(path: str) -> list[str]:
    """Create `path` and its missing parents, each 0700: the directories created (a directory
    someone else made meanwhile included, to be checked like the rest)."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for path in reversed(missing):
        try:
            os.mkdir(path, PRIVATE_DIR_MODE)
        except FileExistsError:
            continue
        os.chmod(path, PRIVATE_DIR_MODE)  # mkdir's mode passes through the umask
    return missing[::-1]


def _not_private(path: str) -> str | None:
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a directory"
    if info.st_uid != os.geteuid():
        return f"is owned by another user (uid {info.st_uid}; you are uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by others (mode {stat.S_IMODE(info.st_mode):04o}; `chmod go-w` it)"
    return None


def _private_temporary_dir(requested: str, reason: str) -> str:
    """This process's private kernel directory (made once, removed at exit), and the warning."""
    global _fallback_dir
    if _fallback_dir is None:
        try:
            _fallback_dir = tempfile.mkdtemp(prefix="graphc-kernels-")  # 0700
            os.mkdir(os.path.join(_fallback_dir, BYTECODE_FOLDER), PRIVATE_DIR_MODE)
            compiled = numba_cache_folder(_fallback_dir)  # its name is as random as the folder's
            if compiled is not None:
                _make_private_dirs(compiled)
                unsafe = _not_private(compiled) or _parents_not_safe(compiled)
                if unsafe is not None:
                    raise OSError(f"NUMBA_CACHE_DIR's {compiled}: {unsafe}")
        except OSError as exc:
            raise CacheDirectoryError(
                f"graphc: cannot use the kernel cache {requested}: {reason}; and no private "
                f"temporary directory could be made ({exc}). Set GRAPHC_CACHE_DIR to a directory "
                f"only you can write to.") from exc
        atexit.register(shutil.rmtree, _fallback_dir, ignore_errors=True)
    warnings.warn(f"graphc: not using the kernel cache {requested}: {reason}. Kernels compile into "
                  f"{_fallback_dir} (removed at exit); set GRAPHC_CACHE_DIR to a directory only "
                  f"you can write to.", KernelCacheWarning)
    return _fallback_dir


class KernelFiles:
    """The kernel modules of one cache directory (`usable_cache_dir` of the one requested)."""

    def __init__(self, directory: str) -> None:
        self.directory = usable_cache_dir(directory)
        self._loaded: dict[str, Any] = {}  # cache key -> the loaded kernel (a dispatcher)
        self._lock = threading.Lock()
        # folder -> its file names, listed once per load while this process writes nothing there
        self._listings: dict[str, list[str]] = {}

    def module_name(self, key: str) -> str:
        return f"k_{key}"

    def path(self, key: str) -> str:
        return os.path.join(self.directory, self.module_name(key) + ".py")

    def _write_source(self, key: str, source: str) -> None:
        """Atomically: a reader never sees half a file (temporary file, then rename). Byte-
        compiled at once (also atomically), since Python does not write bytecode on import where
        PYTHONDONTWRITEBYTECODE is set: every process would compile the module again. The
        manifest then records the bytecode. Nothing the source guard refuses reaches the disk."""
        check_source(source)
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")  # mode 0600
        except FileNotFoundError:  # the folder was removed while this process ran: made again
            reason = _not_usable(self.directory)
            if reason is not None:
                raise CacheDirectoryError(f"graphc: the kernel cache {self.directory} was removed, "
                                          f"and cannot be made again: {reason}") from None
            fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, self.path(key))
        try:
            py_compile.compile(self.path(key), doraise=True,
                               invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
        except (py_compile.PyCompileError, OSError):
            pass  # imported from source then; a syntax error is raised there, naming the kernel
        kernel_manifest.record(self.path(key), None)

    def _check_source(self, key: str, source: str, stats: Any) -> bool:
        """Whether the kernel's module file was on disk, intact, with the bytecode its manifest
        records; written if not (a damaged entry is purged, counted in `stats.rebuilt`, and
        replaced)."""
        path = self.path(key)
        if os.path.lexists(path):
            if kernel_manifest.file_bytes(path) == source.encode() and kernel_manifest.bytecode_intact(path):
                return True
            # Rewritten in place, not deleted first: another process (an MPI rank, a compile
            # worker) may be writing this very entry, and every write is an atomic rename of the
            # same bytes. The JIT's files for it go (the new manifest lists none), and whatever
            # is not a file.
            self._rebuilding(path)
            self._purge_compiled(key, os.path.join(self.directory, BYTECODE_FOLDER))
            for file in (path, kernel_manifest.bytecode_path(path), kernel_manifest.manifest_path(path)):
                kernel_manifest.discard_if_not_a_file(file)
            sys.modules.pop(self.module_name(key), None)
            stats.rebuilt += 1
        self._write_source(key, source)
        return False

    def _check_compiled(self, key: str, compiled_in: str, stats: Any) -> None:
        """Before the JIT loads the kernel's compiled files (pickles) from `compiled_in`: delete
        them, counted in `stats.rebuilt`, unless they are the ones its manifest records."""
        if compiled_in not in self._listings and os.path.isdir(compiled_in):
            self._listings[compiled_in] = os.listdir(compiled_in)
        if not kernel_manifest.compiled_intact(self.path(key), compiled_in, self._listings.get(compiled_in)):
            self._rebuilding(self.path(key))
            self._purge_compiled(key, compiled_in)
            stats.rebuilt += 1

    def _record_compiled(self, key: str, compiled_in: str) -> None:
        """After the JIT wrote the kernel's compiled files: record them in its manifest."""
        self._listings.clear()
        kernel_manifest.record(self.path(key), compiled_in)

    def _rebuilding(self, path: str) -> None:
        """Warn of a damaged entry; one whose files predate manifests is rebuilt silently."""
        if os.path.exists(kernel_manifest.manifest_path(path)):
            warnings.warn(f"graphc: kernel cache entry {path} is damaged; rebuilding it",
                          KernelCacheWarning)

    def _purge_compiled(self, key: str, compiled_in: str) -> None:
        self._listings.clear()
        for file in kernel_manifest.compiled_files(self.path(key), compiled_in):
            try:
                os.remove(file)
            except FileNotFoundError:
                pass  # another process purged it first
            except IsADirectoryError:
                kernel_manifest.discard_if_not_a_file(file)

    def _import(self, key: str, entry: str) -> Any:
        """The function `entry` of the kernel's module, imported from its file."""
        name = self.module_name(key)
        spec = importlib.util.spec_from_file_location(name, self.path(key))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        function = getattr(module, entry)
        _best_effort_saves(function)
        return function


def _best_effort_saves(dispatcher: Any) -> None:
    """Saving compiled code to the cache is an optimisation: a full disk or a path past the
    system's limit warns (the next process compiles again) where it failed every compile."""
    cache = getattr(dispatcher, "_cache", None)
    save = getattr(cache, "save_overload", None)
    if save is None:
        return

    def save_overload(signature: Any, data: Any) -> None:
        try:
            save(signature, data)
        except OSError as exc:
            warnings.warn(f"graphc: could not save a compiled kernel to the cache ({exc.strerror or exc}); "
                          "the next process compiles it again", KernelCacheWarning)
    cache.save_overload = save_overload
