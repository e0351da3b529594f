"""A kernel compile worker, run as a script by cache.py: ``python compile_worker.py``.

Reads a pickled list of (module path, module name, entry, Numba signature) from stdin, compiles
each entry into Numba's disk cache (the kernels are decorated ``cache=True``), and writes a
pickled list with None or an error message per task to stdout. A plain script, not a
multiprocessing child: it must not import the user's program (``__main__``) again.
"""
import importlib.util
import pickle
import sys


def compile_file(path: str, name: str, entry: str, signature: tuple) -> None:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # or Numba's cache entry could not be loaded by name later
    spec.loader.exec_module(module)
    getattr(module, entry).compile(signature)


def main() -> None:
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
