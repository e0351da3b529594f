"""The kernel cache: every generated kernel compiles once per process and once per machine.

Each kernel module is written once, atomically, to ``<cache dir>/k_<hash>.py`` (the hash covers
the source and the graphc, Numba, llvmlite and Python versions) and imported under that name
(registered in ``sys.modules``, or Numba's cache would be unloadable in the next process). Its
entry function is decorated with ``cache=True``, so Numba keeps the compiled machine code in
``<cache dir>/__pycache__``; a second process loads it in milliseconds instead of compiling.
Why so: Numba cannot cache a function compiled from a string given to exec() (no file to locate
it by); a module imported without its ``sys.modules`` entry leaves a cache the next process fails
to load; and Numba stamps its index with the file's mtime and size, not its text, so a module
file is never rewritten.

The cache directory is ``$GRAPHC_CACHE_DIR``, else ``$XDG_CACHE_HOME/graphc``, else
``~/.cache/graphc``, used only when it is this user's alone (kernel_files.usable_cache_dir: a
private temporary directory otherwise). Every file of an entry is checked before it is loaded (the
module's text, the bytecode and Numba's pickled index and code against the entry's manifest,
kernel_manifest.py); an entry that does not match is deleted, rebuilt and counted.

Numba compiles one function at a time per process, so when a graph brings several kernels the
disk cache lacks, `load_all` compiles them together with worker processes
(``$GRAPHC_COMPILE_WORKERS``, by default one per idle core besides this one: on a busy machine a
worker only slows the others down). A worker is a fork of this process while no thread but its
own runs here (as before the first parallel kernel ran: forking after OpenMP is unsafe), else a
fresh interpreter running compile_worker.py (multiprocessing's spawn would import the user's
script again). Every process takes the longest kernel (by estimate) that nobody has claimed yet,
so a misjudged estimate costs at most the last kernel's time; this process then loads the
workers' kernels from the disk cache in milliseconds.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import llvmlite
import numba
from numba.core.compiler_lock import global_compiler_lock
from numba.core.registry import cpu_target


from graphc.backends.kernel_files import CacheStats, KernelFiles, default_cache_dir, hashed_key, package_version

from .codegen_common import Call
from .compile_worker import claim, compile_claimed


def _linked_helpers_digest() -> str:
    """Kernels have gemm.gemm compiled into them: a change to it must not reuse their cache."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemm.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


# LLVM's -O2 instead of Numba's default -O3 for generated kernels: the same speed, measured
# kernel by kernel (Adam update, bias+ReLU, max-pool gradient, the Winograd convolutions: within
# the noise of alternating runs), and ~25% less compile time (the Winograd module 11.4-11.9 s ->
# 8.7-9.9 s). A NUMBA_OPT set by the user is kept (and keys the cache).
KERNEL_OPT_LEVEL = 2
VERSION_TAG = (f"graphc {package_version('graphc')} (gemm {_linked_helpers_digest()}); numba "
               f"{numba.__version__}; llvmlite {llvmlite.__version__}; python {sys.version_info[:3]}; "
               f"opt {os.environ.get('NUMBA_OPT', KERNEL_OPT_LEVEL)}")


def cache_key(source: str) -> str:
    return hashed_key(VERSION_TAG, source)


class KernelCache(KernelFiles):
    """Loads (compiling when needed) generated kernels from one cache directory."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.stats = CacheStats()

    def load(self, kernel: Call, signature: tuple, stats: CacheStats | None = None) -> Any:
        """The compiled entry function of `kernel`, specialised for `signature`."""
        return self.load_all([(kernel, signature)], stats)[0]

    def load_all(self, requests: list[tuple[Call, tuple]], stats: CacheStats | None = None) -> list[Any]:
        """`load` for each (kernel, signature), compiling what the disk cache lacks in parallel."""
        local = CacheStats()
        with self._lock:
            self._listings.clear()  # other processes may have written since the last load
            for kernel, _ in requests:
                key = cache_key(kernel.source)
                if key not in self._loaded:
                    self._check_source(key, kernel.source, local)
            start = time.perf_counter()
            result: list[Any] = [None] * len(requests)
            compiled_elsewhere = self._compile_with_workers(requests, result, local)
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

    # -- compiling in worker processes ------------------------------------------------------
    def _compiled_on_disk(self) -> set[str]:
        """The module names for which Numba's cache holds compiled code (for some signature).
        One scan per load: the index folder holds every kernel ever cached."""
        folders = [os.path.join(self.directory, "__pycache__")]
        if numba.config.CACHE_DIR:
            folders += [root for root, _, _ in os.walk(numba.config.CACHE_DIR)]
        names: set[str] = set()
        for folder in folders:
            try:
                entries = os.listdir(folder)
            except OSError:
                continue
            names.update(e.split(".", 1)[0] for e in entries if e.startswith("k_") and e.endswith(".nbi"))
        return names

    def _compile_with_workers(self, requests: list[tuple[Call, tuple]], result: list[Any],
                              stats: CacheStats) -> set[str]:
        """Compile the kernels missing from the disk cache here and in worker processes, each
        process claiming the longest one left (a claim: a file created exclusively in a folder
        of this call). Fills `result` for the requests compiled here; returns the cache keys
        the workers compiled (none when too few kernels are missing to pay a worker's start)."""
        missing: dict[str, int] = {}  # cache key -> the first request for it
        on_disk = self._compiled_on_disk()
        for i, (kernel, _) in enumerate(requests):
            key = cache_key(kernel.source)
            if key not in self._loaded and key not in missing and self.module_name(key) not in on_disk:
                missing[key] = i
        count = _worker_count() if len(missing) >= WORKER_MIN_KERNELS else 0
        if count <= 0:
            return set()
        order = sorted(missing, key=lambda key: -_estimated_seconds(requests[missing[key]][0]))
        tasks = [(key, self.path(key), self.module_name(key), requests[missing[key]][0].entry,
                  requests[missing[key]][1]) for key in order]
        try:
            claims = tempfile.mkdtemp(prefix="graphc-claims-")
        except OSError:  # no writable temporary folder: compile everything here
            return set()
        workers = [_Worker(claims, tasks) for _ in range(count)]
        try:
            for key in order:
                if claim(claims, key):
                    i = missing[key]
                    result[i] = self._load_one(*requests[i], stats, False)
            return set().union(*(worker.finish() for worker in workers))
        finally:
            for worker in workers:
                worker.stop()
            shutil.rmtree(claims, ignore_errors=True)

    def _compile(self, key: str, kernel: Call, dispatcher: Any, signature: tuple,
                 stats: CacheStats, compiled_elsewhere: bool = False) -> Any:
        """Load `signature` from Numba's disk cache (its files checked against the kernel's
        manifest first: a damaged entry is purged and rebuilt) or compile it, and record what
        Numba wrote. A kernel a worker process just compiled counts as a miss, not a hit."""
        compiled_in = dispatcher.stats.cache_path
        self._check_compiled(key, compiled_in, stats)
        start = time.perf_counter()
        hits_before = sum(dispatcher.stats.cache_hits.values())
        with kernel_optimization_level():
            dispatcher.compile(signature)
        elapsed = time.perf_counter() - start
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


# A fresh worker pays ~1.3 s to start (Python, Numba's initialisation), a fork ~0.5 s (the
# initialisation, in this process): not worth it for a few kernels.
WORKER_MIN_KERNELS = 4
# Estimated compile seconds (measured on 2 cores), to take the longest kernels first: a serial
# kernel, a parallel one, per source character on top (the Winograd module, 8.7k characters,
# takes 10-13 s; a 0.6k elementwise loop ~1 s).
SERIAL_COMPILE_S, PARALLEL_COMPILE_S = 0.1, 0.3
SERIAL_S_PER_CHAR, PARALLEL_S_PER_CHAR = 1 / 4000, 1 / 1000


def _estimated_seconds(kernel: Call) -> float:
    if kernel.parallel:
        return PARALLEL_COMPILE_S + len(kernel.source) * PARALLEL_S_PER_CHAR
    return SERIAL_COMPILE_S + len(kernel.source) * SERIAL_S_PER_CHAR


WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_worker.py")


def _worker_count() -> int:
    """$GRAPHC_COMPILE_WORKERS, else the idle cores, this process's own aside."""
    text = os.environ.get("GRAPHC_COMPILE_WORKERS")
    if text:
        return int(text)
    cores = os.cpu_count() or 1
    # the most idle of up to three short windows: a burst of this process's own threads
    # (measured: one core busy for one 50 ms window just before a cold compile) must not cost
    # the worker; the first window showing every other core idle ends the search
    count = 0
    for _ in range(3):
        count = max(count, min(cores - 1, round(_idle_cores(cores)) - 1))
        if count == cores - 1:
            break
    return count


def _idle_cores(cores: int, interval: float = 0.05) -> float:
    """Cores idle right now, from two samples of /proc/stat `interval` seconds apart. The load
    average lags by a minute: just after another compile or benchmark finished it still counts
    those cores as busy. Elsewhere, fall back to it."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return cores - os.getloadavg()[0]
    return cores * (idle1 - idle0) / max(1, total1 - total0)


class _Worker:
    """A process compiling, into the disk cache, the `tasks` it claims first: a fork of this one
    where that is safe (it starts at once, with Numba loaded and initialised: ~1 s sooner than a
    fresh interpreter on 2 cores), else a fresh interpreter running compile_worker.py."""

    def __init__(self, claims: str, tasks: list[tuple]) -> None:
        self.forked_pid = 0
        self.script: subprocess.Popen | None = None
        if not (_can_fork() and self._fork(claims, tasks)):
            self.script = subprocess.Popen([sys.executable, WORKER_SCRIPT], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           env=worker_environment())
            self.script.stdin.write(pickle.dumps((claims, tasks)))
            self.script.stdin.close()
            self.output = self.script.stdout

    def _fork(self, claims: str, tasks: list[tuple]) -> bool:
        """Start the worker as a fork; False if the system refuses one (out of memory)."""
        _initialise_numba()  # here, once, instead of in each child
        read_end, write_end = os.pipe()
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns of any other thread; the only ones here are native pools
                # that handle fork themselves (OpenBLAS's, re-created after it)
                warnings.simplefilter("ignore", DeprecationWarning)
                self.forked_pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            return False
        if self.forked_pid == 0:
            _run_forked_worker(read_end, write_end, claims, tasks)
        os.close(write_end)
        self.output = os.fdopen(read_end, "rb")
        return True

    def finish(self) -> set[str]:
        """Wait for the worker; the keys it compiled. A kernel it claimed but failed on (or
        left when it died) is compiled, and any genuine error reported, by this process."""
        output = self.output.read()
        self.stop()
        try:
            results = pickle.loads(output)
        except Exception:
            return set()
        return {key for key, error in results.items() if error is None}

    def stop(self) -> None:
        """Kill the worker (exited already, unless this process's own compile raised); reap it."""
        if self.script is not None:
            self.script.kill()
            self.script.wait()
        elif self.forked_pid:
            try:
                os.kill(self.forked_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.forked_pid, 0)
            self.forked_pid = 0
        self.output.close()


def _can_fork() -> bool:
    """Forking is safe while this process runs no threads but its own: no other Python thread
    (one could hold a lock the child needs) and no Numba thread pool yet (once OpenMP has run,
    GNU OpenMP kills a forked child that runs a parallel kernel). Linux only: elsewhere system
    libraries forbid it; and not in an MPI rank, whose library may not survive a fork (pinned
    network memory)."""
    if not sys.platform.startswith("linux") or threading.active_count() > 1:
        return False
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        return False
    try:
        numba.threading_layer()
    except ValueError:  # "not initialized": no parallel kernel has run in this process
        return True
    return False


def _run_forked_worker(read_end: int, write_end: int, claims: str, tasks: list[tuple]) -> None:
    """The forked child: compile its claims, write {key: error} to the pipe, and exit without
    running anything the parent registered to run at exit. Its output goes nowhere, as a fresh
    worker's does: the parent reports what matters (it compiles a failed kernel again)."""
    status = 1
    try:
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with kernel_optimization_level():
            results = compile_claimed(claims, tasks)
        with os.fdopen(write_end, "wb") as pipe:
            pickle.dump(results, pipe)
        status = 0
    finally:
        os._exit(status)


def _initialise_numba() -> None:
    """Load Numba's typing and lowering registries (0.4-0.6 s, once per process; a no-op after)."""
    cpu_target.typing_context.refresh()
    cpu_target.target_context.refresh()


_CACHES: dict[str, KernelCache] = {}


def get_cache(directory: str | None = None) -> KernelCache:
    """The process-wide cache for `directory` (default: `default_cache_dir()`, read now)."""
    directory = directory or default_cache_dir()
    if directory not in _CACHES:
        _CACHES[directory] = KernelCache(directory)
    return _CACHES[directory]
