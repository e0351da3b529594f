"""A kernel compile worker, run as a script by cache.py: ``python compile_worker.py``.

Reads a pickled list of (module path, module name, entry, Numba signature) from stdin, compiles
each entry into Numba's disk cache (the kernels are decorated ``cache=True``), and writes a
pickled list with None or an error message per task to stdout. A plain script, not a
multiprocessing child: it must not import the user's program (``__main__``) again.
"""
import importlib.util
import pickle
import sys

PACKAGES = ("graphc", "graphc.backends", "graphc.backends.numba_cpu")


def register_packages_without_running_them() -> None:
    """Kernels import graphc.backends.numba_cpu.gemm; importing it normally runs the __init__ of
    each package above it, which import all of graphc (networkx, the IR, the passes): 0.7 s of
    each worker's start, for modules no kernel uses. Registered unexecuted, the packages still
    find their submodules."""
    for name in PACKAGES:
        if name not in sys.modules:
            sys.modules[name] = importlib.util.module_from_spec(importlib.util.find_spec(name))


def compile_file(path: str, name: str, entry: str, signature: tuple) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # or Numba's cache entry could not be loaded by name later
    spec.loader.exec_module(module)
    getattr(module, entry).compile(signature)


def main() -> None:
    register_packages_without_running_them()
    results = []
    for task in pickle.load(sys.stdin.buffer):
        try:
            compile_file(*task)
            results.append(None)
        except Exception as exc:  # reported to the parent, which compiles the kernel itself
            results.append(f"{type(exc).__name__}: {exc}")
    pickle.dump(results, sys.stdout.buffer)


if __name__ == "__main__":
    main()
