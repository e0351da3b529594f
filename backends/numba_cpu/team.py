"""Running a few compiled calls at once, one per thread: the row blocks of a scan
(driver.RowBlockDriver), each a loop that releases the GIL.

Under GNU OpenMP, Numba's threading layer here, they run on OpenMP's own team, through
GOMP_parallel. Its worker threads keep spinning for a while after each parallel kernel: a Python
thread given a block right after one shares its core with a spinning worker (lstm-64's forward
loop, 2 threads: 11.9 ms a call against 7.7 ms with the workers told to sleep). Given to the
worker itself, the block runs at once, and no compiled parallel launcher is needed (Numba's
parallel compile of one took 0.6-0.9 s a scan). Under another threading layer, where the
library lacks GNU's entry points, or in a process forked from one (GNU OpenMP's team does not
survive fork: GOMP_parallel never returns in the child), the calls run on Python threads.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading
from typing import Any, Callable, Sequence

import numba

Job = tuple[Callable[..., Any], tuple]

_MEMBER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_LOCK = threading.Lock()  # one team at a time: its jobs and errors are these lists
_jobs: list[Job] = []
_errors: list[BaseException] = []
_PROCESS = os.getpid()  # the team's process, not a child forked from it
# The process that started GNU OpenMP's thread team, by a parallel kernel (executor) or a
# GOMP_parallel here (None: none has). A child forked from it is killed by GNU OpenMP at its
# first parallel region ("fork() called from a process already using GNU OpenMP"), and a Pool
# waiting on it hangs: executor refuses the child's parallel kernels.
OPENMP_PROCESS: list[int | None] = [None]


def run_side_by_side(jobs: Sequence[Job]) -> None:
    """Call every (function, arguments) of `jobs` at once, one per thread, the caller's among
    them; return when all have returned, raising the first error any raised."""
    team = _openmp() if os.getpid() == _PROCESS else None
    with _LOCK:
        _jobs[:], _errors[:] = jobs, []
        try:
            if team is not None:
                library, member = team
                if OPENMP_PROCESS[0] is None:
                    OPENMP_PROCESS[0] = os.getpid()
                library.GOMP_parallel(member, None, len(jobs), 0)
            else:
                _on_python_threads()
            errors = list(_errors)
        finally:
            _jobs.clear()
            _errors.clear()
    if errors:
        raise errors[0]


def _run_share(thread: int, threads: int) -> None:
    """Thread `thread` of `threads` runs every threads-th job from its own (all of them, should
    the team be smaller than asked)."""
    for function, arguments in _jobs[thread::threads]:
        try:
            function(*arguments)
        except BaseException as error:  # raised by the caller, on its own thread
            _errors.append(error)


def _on_python_threads() -> None:
    others = [threading.Thread(target=_run_share, args=(t, len(_jobs))) for t in range(1, len(_jobs))]
    for thread in others:
        thread.start()
    _run_share(0, len(_jobs))
    for thread in others:
        thread.join()


@functools.cache
def _openmp() -> tuple[ctypes.CDLL, Any] | None:
    """(the OpenMP library Numba's kernels run on, the team members' entry point) when Numba runs
    its OpenMP layer; else None."""
    numba.get_num_threads()  # starts Numba's threading layer, if no kernel has yet
    try:
        layer = numba.threading_layer()
    except ValueError:
        return None
    pool = sys.modules.get("numba.np.ufunc.omppool")
    if layer != "omp" or pool is None:
        return None
    # Looked up through Numba's own pool, the symbols are those of the OpenMP library it loaded,
    # not of another copy in the process (PyTorch's wheels bring their own libgomp).
    library = ctypes.CDLL(pool.__file__)
    try:
        library.omp_get_thread_num.restype = library.omp_get_num_threads.restype = ctypes.c_int
        library.GOMP_parallel.argtypes = [_MEMBER, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    except AttributeError:  # an OpenMP without GNU's entry points
        return None
    library.GOMP_parallel.restype = None

    def member(_: Any) -> None:
        _run_share(library.omp_get_thread_num(), library.omp_get_num_threads())
    return library, _MEMBER(member)


__all__ = ["run_side_by_side"]
