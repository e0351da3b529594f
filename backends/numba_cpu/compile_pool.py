"""Compiling several kernels at once: this process and worker processes take from one list.

Numba compiles one function at a time per process, so when a graph brings several kernels the
disk cache lacks, the kernel cache (cache.py) compiles them together with worker processes
(``$GRAPHC_COMPILE_WORKERS``, by default one per idle core besides this one: on a busy machine a
worker only slows the others down). A worker is a fork of this process while no thread but its
own runs here (as before the first parallel kernel ran: forking after OpenMP is unsafe), else a
fresh interpreter running compile_worker.py (multiprocessing's spawn would import the user's
script again). Every process takes the longest kernel (by estimate) that nobody has claimed yet,
so a misjudged estimate costs at most the last kernel's time; this process then loads the
workers' kernels from the disk cache in milliseconds. A BackgroundCompile is one such worker that
this process does not wait for: it compiles an executable's parallel kernels while serial
stand-ins run (executor.serial_stand_ins).
"""
from __future__ import annotations

import os
import pickle
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from typing import Callable

import numba
from numba.core.registry import cpu_target

from .codegen_common import Call
from .compile_worker import claim, compile_claimed
from .opt_level import kernel_optimization_level, worker_environment

# What a worker compiles: (cache key, module path, module name, entry function, Numba signature).
CompileTask = tuple[str, str, str, str, tuple]

# A fresh worker pays ~1.3 s to start (Python, Numba's initialisation), a fork ~0.5 s (the
# initialisation, in this process): not worth it for a few kernels.
WORKER_MIN_KERNELS = 4
# Estimated compile seconds (measured on 2 cores), to take the longest kernels first: a serial
# kernel, a parallel one, per source character on top (the Winograd module, 8.7k characters,
# takes 10-13 s; a 0.6k elementwise loop ~1 s).
SERIAL_COMPILE_S, PARALLEL_COMPILE_S = 0.1, 0.3
SERIAL_S_PER_CHAR, PARALLEL_S_PER_CHAR = 1 / 4000, 1 / 1000

# A background compile (BackgroundCompile) yields to the program's own threads and processes.
BACKGROUND_NICENESS = 10

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_worker.py")


def estimated_compile_seconds(kernel: Call) -> float:
    if kernel.parallel:
        return PARALLEL_COMPILE_S + len(kernel.source) * PARALLEL_S_PER_CHAR
    return SERIAL_COMPILE_S + len(kernel.source) * SERIAL_S_PER_CHAR


def compile_with_workers(tasks: list[CompileTask], compile_here: Callable[[str], None]) -> set[str]:
    """Compile `tasks` (longest first) into the disk cache, here and in worker processes, each
    process claiming the longest one left (a claim: a file created exclusively in a folder of
    this call); `compile_here(key)` compiles a task this process claimed. Returns the cache keys
    the workers compiled; none, and nothing compiled here, when too few tasks are given to pay a
    worker's start or no worker can start."""
    count = min(_worker_count(), len(tasks)) if len(tasks) >= WORKER_MIN_KERNELS else 0
    if count <= 0:
        return set()
    try:
        claims = tempfile.mkdtemp(prefix="graphc-claims-")
    except OSError:  # no writable temporary folder: the caller compiles everything
        return set()
    workers = [_Worker(claims, tasks) for _ in range(count)]
    try:
        for key, *_ in tasks:
            if claim(claims, key):
                compile_here(key)
        return set().union(*(worker.finish() for worker in workers))
    finally:
        for worker in workers:
            worker.stop()
        shutil.rmtree(claims, ignore_errors=True)


def _worker_count() -> int:
    """$GRAPHC_COMPILE_WORKERS, else the idle cores, this process's own aside."""
    text = os.environ.get("GRAPHC_COMPILE_WORKERS")
    cores = os.cpu_count() or 1
    if text:
        try:
            asked = int(text)
        except ValueError:
            raise ValueError(f"GRAPHC_COMPILE_WORKERS={text!r} is not an integer (the worker "
                             "processes that compile kernels; 0: none)") from None
        if asked < 0:
            raise ValueError(f"GRAPHC_COMPILE_WORKERS={text!r} must be >= 0 (0: no workers)")
        return min(asked, 4 * cores)  # one process each: never thousands
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

    def __init__(self, claims: str, tasks: list[CompileTask], niceness: int = 0) -> None:
        self.forked_pid = 0
        self.script: subprocess.Popen | None = None
        if not (_can_fork() and self._fork(claims, tasks, niceness)):
            self.script = subprocess.Popen([sys.executable, WORKER_SCRIPT], stdin=subprocess.PIPE,
                                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                           env=worker_environment())
            self.script.stdin.write(pickle.dumps((claims, tasks, niceness)))
            self.script.stdin.close()
            self.output = self.script.stdout

    def done(self) -> bool:
        """Whether the worker has finished (its results, or the end of its output, are there)."""
        return bool(select.select([self.output], [], [], 0)[0])

    def _fork(self, claims: str, tasks: list[CompileTask], niceness: int) -> bool:
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
            _run_forked_worker(read_end, write_end, claims, tasks, niceness)
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


class BackgroundCompile:
    """`tasks` compiled into the disk cache by one worker process while this one goes on: the
    parallel kernels of an executable that runs serial stand-ins meanwhile (executor.py). The
    worker runs at BACKGROUND_NICENESS, so the program's own work comes first. `stop` (also at
    exit, or when the executable is dropped) kills it; the kernels it finished stay cached."""

    def __init__(self, tasks: list[CompileTask]) -> None:
        self.keys = frozenset(key for key, *_ in tasks)
        self._claims = tempfile.mkdtemp(prefix="graphc-claims-")
        try:
            self._worker: _Worker | None = _Worker(self._claims, tasks, BACKGROUND_NICENESS)
        except BaseException:
            shutil.rmtree(self._claims, ignore_errors=True)
            raise

    def done(self) -> bool:
        return self._worker is None or self._worker.done()

    def finish(self) -> set[str]:
        """Wait for the worker; the cache keys it compiled."""
        worker, self._worker = self._worker, None
        try:
            return worker.finish() if worker is not None else set()
        finally:
            shutil.rmtree(self._claims, ignore_errors=True)

    def stop(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.stop()
        shutil.rmtree(self._claims, ignore_errors=True)


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


def _run_forked_worker(read_end: int, write_end: int, claims: str, tasks: list[CompileTask],
                       niceness: int) -> None:
    """The forked child: compile its claims, write {key: error} to the pipe, and exit without
    running anything the parent registered to run at exit. Its output goes nowhere, as a fresh
    worker's does: the parent reports what matters (it compiles a failed kernel again)."""
    status = 1
    try:
        os.close(read_end)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        os.nice(niceness)
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
