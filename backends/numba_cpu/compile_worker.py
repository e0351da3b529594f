"""A kernel compile worker, run as a script by compile_pool.py: ``python compile_worker.py``.

Reads a pickled (claims folder, tasks, niceness) from stdin, each task (cache key, module path,
module name, entry, Numba signature), longest first. Lowers its priority by `niceness`, compiles
every task it can claim (see `claim`: the parent and the other workers take from the same list)
into Numba's disk cache (the kernels are decorated ``cache=True``), and writes a pickled {cache key: None or an error message} of its
claims to stdout. A plain script, not a multiprocessing child: it must not import the user's
program (``__main__``) again.
"""
import importlib.util
import itertools
import os
import pickle
import secrets
import sys

PACKAGES = ("graphc", "graphc.backends", "graphc.backends.numba_cpu")


def register_packages_without_running_them() -> None:
    """Kernels import graphc.backends.numba_cpu.gemm; importing it normally runs the __init__ of
    each package above it, which import all of graphc (the IR, the passes, the front end): 0.7 s of
    each worker's start, for modules no kernel uses. Registered unexecuted, the packages still
    find their submodules."""
    for name in PACKAGES:
        if name not in sys.modules:
            sys.modules[name] = importlib.util.module_from_spec(importlib.util.find_spec(name))


def claim(folder: str, key: str) -> bool:
    """Whether this process is the first to claim `key` in `folder`: creating a file
    exclusively is atomic, so exactly one process of those compiling together gets it."""
    try:
        os.close(os.open(os.path.join(folder, key), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def compile_file(path: str, name: str, entry: str, signature: tuple) -> None:
    """Compile into the disk cache and record the files in the kernel's manifest (the parent
    checks them against it before loading them). The parent has checked the module and its
    bytecode, and found no compiled code for it."""
    from graphc.backends import kernel_manifest  # here: the packages are registered by now

    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # or Numba's cache entry could not be loaded by name later
    spec.loader.exec_module(module)
    dispatcher = getattr(module, entry)
    dispatcher.compile(signature)
    kernel_manifest.record(path, dispatcher.stats.cache_path)


_IDS_DRAWN_IN = 0  # the process that last drew its function ids (a fork inherits the draw)


def draw_function_ids() -> None:
    """Start Numba's count of compiled functions at a random point, once per process (again in a
    fork). The count is part of every compiled symbol's name, and the only part that tells apart
    the bodies of two parallel loops with the same argument types: Numba names such a body after
    the id() of a Python object, in module '<dynamic>'. A forked worker, with this process's
    memory and count, named its loop bodies as this process named its own, so a kernel compiled
    there and one compiled here could call one body: two transposes of one test graph swapped
    results, in 2 of 5 runs under nice. A start drawn from 2^48 leaves a collision between two
    processes' few thousand compiles a chance of about 1e-8."""
    global _IDS_DRAWN_IN
    if _IDS_DRAWN_IN != os.getpid():
        from numba.core.bytecode import FunctionIdentity
        FunctionIdentity._unique_ids = itertools.count(secrets.randbits(48))
        _IDS_DRAWN_IN = os.getpid()


def compile_claimed(claims: str, tasks: list[tuple]) -> dict[str, str | None]:
    """Compile every task this process claims; {cache key: None or the error} of its claims."""
    draw_function_ids()
    results: dict[str, str | None] = {}
    for key, *task in tasks:
        try:
            if not claim(claims, key):
                continue
        except FileNotFoundError:  # the parent removed the folder: it stopped compiling
            break
        try:
            compile_file(*task)
            results[key] = None
        except Exception as exc:  # reported to the parent, which compiles the kernel itself
            results[key] = f"{type(exc).__name__}: {exc}"
    return results


def main() -> None:
    register_packages_without_running_them()
    claims, tasks, niceness = pickle.load(sys.stdin.buffer)
    os.nice(niceness)
    pickle.dump(compile_claimed(claims, tasks), sys.stdout.buffer)


if __name__ == "__main__":
    main()
