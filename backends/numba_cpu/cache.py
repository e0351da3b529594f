"""The kernel cache: every generated kernel compiles once per process and once per machine.

Each kernel module is written once, atomically, to ``<cache dir>/k_<hash>.py`` (the hash covers
the source and the graphc, Numba, llvmlite and Python versions and the optimisation level) and
imported under that name (registered in ``sys.modules``, or Numba's cache would be unloadable in
the next process). Its entry function is decorated with ``cache=True``, so Numba keeps the
compiled machine code in ``<cache dir>/__pycache__``; a second process loads it in milliseconds
instead of compiling.
Why so: Numba cannot cache a function compiled from a string given to exec() (no file to locate
it by); a module imported without its ``sys.modules`` entry leaves a cache the next process fails
to load; and Numba stamps its index with the file's mtime and size, not its text, so a module
file is never rewritten.

The cache directory is ``$GRAPHC_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphc``, else
``~/.cache/graphc``, used only when it is this user's alone (kernel_files.usable_cache_dir: a
private temporary directory otherwise). Every file of an entry is checked before it is loaded (the
module's text, the bytecode and Numba's pickled index and code against the entry's manifest,
kernel_manifest.py); an entry that does not match is rewritten and counted.

Kernels compile at opt_level.KERNEL_OPT_LEVEL; several missing from the disk cache compile
together in worker processes (compile_pool.py).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from typing import Any, Sequence

import llvmlite
import numba

from graphc.backends.kernel_files import (CacheStats, KernelFiles, default_cache_dir, hashed_key,
                                          package_version)

from .codegen_common import Call
from .compile_pool import BackgroundCompile, CompileTask, compile_with_workers, estimated_compile_seconds
from .compile_worker import draw_function_ids
from .loaded_code import release_linking_module
from .opt_level import KERNEL_OPT_LEVEL, kernel_optimization_level


# The modules whose functions generated kernels import and compile into themselves (Numba's
# cache does not track them): gemm.gemm and the BLAS binding it calls, intrinsics.nan_maximum.
LINKED_HELPERS = ("gemm.py", "blas.py", "intrinsics.py")


def _linked_helpers_digest() -> str:
    """A change to a module kernels compile in must not reuse their cache."""
    digest = hashlib.sha256()
    for name in LINKED_HELPERS:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


# A NUMBA_OPT set by the user replaces KERNEL_OPT_LEVEL, so it keys the cache too.
VERSION_TAG = (f"graphc {package_version('graphc')} (helpers {_linked_helpers_digest()}); numba "
               f"{numba.__version__}; llvmlite {llvmlite.__version__}; python {sys.version_info[:3]}; "
               f"opt {os.environ.get('NUMBA_OPT', KERNEL_OPT_LEVEL)}")


def cache_key(source: str) -> str:
    return hashed_key(VERSION_TAG, source)


class KernelCache(KernelFiles):
    """Loads (compiling when needed) generated kernels from one cache directory."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.stats = CacheStats()
        # folder -> (its mtime, the kernels it indexes) as last listed (_indexed_in)
        self._index_listings: dict[str, tuple[int, frozenset[str]]] = {}
        self._in_background: dict[str, BackgroundCompile] = {}  # cache key -> its compile

    def load(self, kernel: Call, signature: tuple, stats: CacheStats | None = None) -> Any:
        """The compiled entry function of `kernel`, specialised for `signature`."""
        return self.load_all([(kernel, signature)], stats)[0]

    def load_all(self, requests: list[tuple[Call, tuple]], stats: CacheStats | None = None) -> list[Any]:
        """`load` for each (kernel, signature), compiling what the disk cache lacks in parallel."""
        local = CacheStats()
        with self._lock:
            self._write_sources(requests, local)
            start = time.perf_counter()
            result: list[Any] = [None] * len(requests)
            compiled_elsewhere = self._compile_missing_with_workers(requests, result, local)
            self._listings.clear()  # the workers wrote there
            for i, (kernel, signature) in enumerate(requests):
                if result[i] is None:
                    key = cache_key(kernel.source)
                    result[i] = self._load_one(kernel, signature, local, key in compiled_elsewhere)
            if compiled_elsewhere:
                local.compile_seconds = time.perf_counter() - start
        self.stats.add(local)
        if stats is not None:
            stats.add(local)
        return result

    def _write_sources(self, requests: list[tuple[Call, tuple]], stats: CacheStats) -> None:
        """Each kernel's module file on disk and intact (`_check_source`) unless loaded here."""
        self._listings.clear()  # other processes may have written since the last load
        for kernel, _ in requests:
            key = cache_key(kernel.source)
            if key not in self._loaded:
                self._check_source(key, kernel.source, stats)

    def _load_one(self, kernel: Call, signature: tuple, stats: CacheStats, compiled_elsewhere: bool) -> Any:
        key = cache_key(kernel.source)
        dispatcher = self._loaded.get(key)
        if dispatcher is not None and signature in dispatcher.overloads:
            stats.reused += 1
            return dispatcher
        if dispatcher is None:
            dispatcher = self._import(key, kernel.entry)
        dispatcher = self._compile(key, kernel, dispatcher, signature, stats, compiled_elsewhere)
        self._loaded[key] = dispatcher
        return dispatcher

    def load_bound(self, module: Call, signature: tuple, names: dict[str, Any],
                   stats: CacheStats | None = None) -> Any:
        """`load` for a module whose module-level placeholders `names` sets before it compiles:
        a scan driver (driver.py) calls kernels that only this process holds as dispatchers. The
        module's text must identify what it binds (the key covers the text alone); compiled code
        from the disk cache needs none of them."""
        local = CacheStats()
        key = cache_key(module.source)
        with self._lock:
            self._listings.clear()
            self._check_source(key, module.source, local)
            dispatcher = self._loaded.get(key) or self._import(key, module.entry)
            vars(sys.modules[self.module_name(key)]).update(names)
            if signature in dispatcher.overloads:
                local.reused += 1
            else:
                dispatcher = self._compile(key, module, dispatcher, signature, local)
            self._loaded[key] = dispatcher
        self.stats.add(local)
        if stats is not None:
            stats.add(local)
        return dispatcher

    def compiled(self, sources: Sequence[str]) -> list[bool]:
        """For each kernel module source: is it loaded in this process, or compiled on disk (for
        some signature)? Loading it then costs milliseconds, compiling it up to seconds."""
        keys = [cache_key(source) for source in sources]
        with self._lock:
            loaded = [key in self._loaded for key in keys]
        if all(loaded):  # the disk's listing (~5 ms) only where it can tell
            return loaded
        on_disk = self._compiled_on_disk()
        return [was or self.module_name(key) in on_disk for was, key in zip(loaded, keys)]

    def _compiled_on_disk(self) -> frozenset[str]:
        """The module names for which Numba's cache holds compiled code (for some signature)."""
        folders = [os.path.join(self.directory, "__pycache__")]
        if numba.config.CACHE_DIR:
            folders += [root for root, _, _ in os.walk(numba.config.CACHE_DIR)]
        listings = [self._indexed_in(folder) for folder in folders]
        return listings[0] if len(listings) == 1 else frozenset().union(*listings)

    def _indexed_in(self, folder: str) -> frozenset[str]:
        """The module names Numba's index files in `folder` name. The folder holds every kernel
        ever cached (a listing: 5-30 ms), so it is listed again only when it has changed since
        (its mtime), or when it had changed within a second of the last listing: a change made
        after a listing but within the same tick of the file system's clock would not show."""
        try:
            changed = os.stat(folder).st_mtime_ns
            listed = time.time_ns()
            known = self._index_listings.get(folder)
            if known is not None and known[0] == changed:
                return known[1]
            entries = os.listdir(folder)
        except OSError:
            return frozenset()
        names = frozenset(e.split(".", 1)[0] for e in entries if e.startswith("k_") and e.endswith(".nbi"))
        if listed - changed > 1_000_000_000:
            self._index_listings[folder] = (changed, names)
        return names

    def _compile_missing_with_workers(self, requests: list[tuple[Call, tuple]], result: list[Any],
                                      stats: CacheStats) -> set[str]:
        """Compile the kernels missing from the disk cache here and in worker processes, longest
        first (compile_pool.py). Fills `result` for the requests compiled here; returns the cache
        keys the workers compiled (none when too few kernels are missing to pay a worker's start)."""
        missing, tasks = self._missing(requests)

        def compile_here(key: str) -> None:
            i = missing[key]
            result[i] = self._load_one(*requests[i], stats, False)
        return compile_with_workers(tasks, compile_here)

    def _missing(self, requests: list[tuple[Call, tuple]]) -> tuple[dict[str, int], list[CompileTask]]:
        """The kernels of `requests` neither loaded nor on disk (cache key -> the first request
        for it), and their compile tasks, longest first."""
        unloaded: dict[str, int] = {}
        for i, (kernel, _) in enumerate(requests):
            key = cache_key(kernel.source)
            if key not in self._loaded:
                unloaded.setdefault(key, i)
        on_disk = self._compiled_on_disk() if unloaded else set()  # the listing only where it can tell
        missing = {key: i for key, i in unloaded.items() if self.module_name(key) not in on_disk}
        order = sorted(missing, key=lambda key: -estimated_compile_seconds(requests[missing[key]][0]))
        tasks = [(key, self.path(key), self.module_name(key), requests[missing[key]][0].entry,
                  requests[missing[key]][1]) for key in order]
        return missing, tasks

    def compile_in_background(self, requests: list[tuple[Call, tuple]]) -> list[BackgroundCompile]:
        """Compile the kernels of `requests` that the disk cache lacks in a background worker
        (compile_pool.BackgroundCompile); `load_all` loads them in milliseconds once the returned
        compiles are done: the new one, and those of earlier calls that were compiling some of
        them already (a second batch size before the first one's kernels are ready). A kernel
        that no worker compiled (none could start: no writable temporary folder) `load_all`
        compiles here."""
        with self._lock:
            self._write_sources(requests, CacheStats())
            _, tasks = self._missing(requests)
            self._in_background = {key: c for key, c in self._in_background.items() if not c.done()}
            earlier = list({id(c): c for key, *_ in tasks if (c := self._in_background.get(key))}.values())
            tasks = [task for task in tasks if task[0] not in self._in_background]
            try:
                started = BackgroundCompile(tasks) if tasks else None
            except OSError:
                return earlier
            if started is not None:
                self._in_background.update((key, started) for key, *_ in tasks)
            return earlier + ([started] if started else [])

    def _compile(self, key: str, kernel: Call, dispatcher: Any, signature: tuple,
                 stats: CacheStats, compiled_elsewhere: bool = False) -> Any:
        """Load `signature` from Numba's disk cache (its files checked against the kernel's
        manifest first: a damaged entry is purged and rebuilt) or compile it, and record what
        Numba wrote. A kernel a worker process just compiled counts as a miss, not a hit."""
        compiled_in = dispatcher.stats.cache_path
        self._check_compiled(key, compiled_in, stats)
        start = time.perf_counter()
        hits_before = sum(dispatcher.stats.cache_hits.values())
        draw_function_ids()  # symbols apart from those of other processes' kernels (compile_worker)
        with kernel_optimization_level():
            dispatcher.compile(signature)
        elapsed = time.perf_counter() - start
        release_linking_module(dispatcher, signature)
        loaded = sum(dispatcher.stats.cache_hits.values()) > hits_before
        if not loaded:
            self._record_compiled(key, compiled_in)
        if loaded and not compiled_elsewhere:
            stats.hits += 1
            stats.load_seconds += elapsed
        else:
            stats.misses += 1
            stats.compiled += 1
            stats.in_workers += compiled_elsewhere
            stats.compile_seconds += elapsed
        return dispatcher


_CACHES: dict[str, KernelCache] = {}


def get_cache(directory: str | None = None) -> KernelCache:
    """The process-wide cache for `directory` (default: `default_cache_dir()`, read now)."""
    directory = directory or default_cache_dir()
    if directory not in _CACHES:
        _CACHES[directory] = KernelCache(directory)
    return _CACHES[directory]
