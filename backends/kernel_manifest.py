"""Integrity records of the kernel cache: a SHA-256 manifest per kernel module.

Python runs a hash-checked ``.pyc`` as it finds it, and Numba unpickles its index (``.nbi``)
and code files (``.nbc``) as it finds them: a truncated file, two swapped ``.nbc`` files or a
half-copied cache make every later load fail (``EOFError``, ``KeyError``) or, worse, load the
wrong code. So whoever compiles a kernel (this process or a compile worker) records the digests
of its files in ``k_<key>.manifest.json`` beside the module, and a file is only loaded after its
digest is checked against that record; an entry that does not match is deleted and rebuilt.

Something other than a regular file in an entry's place (a folder, a FIFO, a device) counts as
damage too, found without reading it: a FIFO would block its reader for ever.

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
import shutil
import stat
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


NOT_A_FILE = "not a regular file"  # the digest of a folder, FIFO or device in a file's place


def file_bytes(path: str) -> bytes | None:
    """The contents of the regular file at `path` (a link to one included); None where there is
    none or something else is there. Opened without blocking: a FIFO is seen, not waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def discard_if_not_a_file(path: str) -> None:
    """Remove what is at `path` where it is not a regular file (or a link to one): a write's
    atomic rename cannot replace a folder, and a reader would hang on a FIFO."""
    if not os.path.lexists(path) or file_bytes(path) is not None:
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass  # another process removed it first


def _digest(path: str) -> str | None:
    data = file_bytes(path)
    if data is None:
        return NOT_A_FILE if os.path.lexists(path) else None
    return hashlib.sha256(data).hexdigest()


def _read(module_path: str) -> dict | None:
    data = file_bytes(manifest_path(module_path))
    try:
        manifest = json.loads(data) if data is not None else None
    except (ValueError, RecursionError):  # damaged (nested past Python's stack too): rebuilt
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
    discard_if_not_a_file(manifest_path(module_path))
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
