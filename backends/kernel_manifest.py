"""Integrity records of the kernel cache: a SHA-256 manifest per kernel module.

Python runs a hash-checked ``.pyc`` as it finds it, and Numba unpickles its index (``.nbi``)
and code files (``.nbc``) as it finds them: a truncated file, two swapped ``.nbc`` files or a
half-copied cache make every later load fail (``EOFError``, ``KeyError``) or, worse, load the
wrong code. So whoever compiles a kernel (this process or a compile worker) records the digests
of its files in ``k_<key>.manifest.json`` beside the module, and a file is only loaded after its
digest is checked against that record; an entry that does not match is deleted and rebuilt.

The manifest protects against damage, not against people: it lives in the same directory as
the files it covers, so the directory itself must be writable by this user alone
(kernel_files.usable_cache_dir checks that). It is JSON, which reading cannot run code.

Imported by the compile worker without the rest of graphc: standard library only.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile

PRIVATE_FILE_MODE = 0o600


def manifest_path(module_path: str) -> str:
    return module_path[: -len(".py")] + ".manifest.json"


def bytecode_path(module_path: str) -> str:
    return importlib.util.cache_from_source(module_path)


def compiled_files(module_path: str, compiled_in: str | None, names: list[str] | None = None) -> list[str]:
    """The JIT's index and code files for the module in `compiled_in` (its bytecode, the
    bytecode's temporaries (`.pyc.<n>`, another process writing it) and the JIT's half-written
    temporary files aside). `names`: the folder's listing, when the caller
    has a fresh one (it holds every kernel ever cached: one listing serves a whole graph)."""
    if not compiled_in or not os.path.isdir(compiled_in):
        return []
    prefix = os.path.basename(module_path)[: -len(".py")] + "."
    bytecode = os.path.basename(bytecode_path(module_path))
    return sorted(os.path.join(compiled_in, name) for name in (os.listdir(compiled_in) if names is None else names)
                  if name.startswith(prefix) and not name.startswith(bytecode) and ".tmp." not in name)


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def _read(module_path: str) -> dict | None:
    try:
        with open(manifest_path(module_path)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def record(module_path: str, compiled_in: str | None) -> None:
    """Record the digests of the module's bytecode and of its compiled files in `compiled_in`
    (made private to this user first: the JIT creates them under the process's umask)."""
    files = compiled_files(module_path, compiled_in)
    bytecode = bytecode_path(module_path)
    for path in [module_path, bytecode, *files]:
        try:
            os.chmod(path, PRIVATE_FILE_MODE)
        except FileNotFoundError:
            pass  # no bytecode (it could not be written), or purged meanwhile by another process
    manifest = {"bytecode": _digest(bytecode),  # by name: a cache moved elsewhere stays valid
                "compiled": {os.path.basename(p): _digest(p) for p in files}}
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(module_path), suffix=".tmp")  # mode 0600
    with os.fdopen(fd, "w") as f:
        json.dump(manifest, f)
    os.replace(tmp, manifest_path(module_path))


def bytecode_intact(module_path: str) -> bool:
    """Whether the module's bytecode (or its absence) is the one recorded."""
    manifest = _read(module_path)
    return manifest is not None and manifest.get("bytecode") == _digest(bytecode_path(module_path))


def compiled_intact(module_path: str, compiled_in: str | None, names: list[str] | None = None) -> bool:
    """Whether the module's compiled files in `compiled_in`, if any, are exactly those recorded
    (no file changed, missing, swapped or added)."""
    files = compiled_files(module_path, compiled_in, names)
    if not files:
        return True  # nothing the JIT could load: it compiles
    manifest = _read(module_path)
    return (manifest is not None
            and manifest.get("compiled") == {os.path.basename(p): _digest(p) for p in files})
