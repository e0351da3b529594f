"""Reading files graphc did not make, within limits fixed before the first byte is read.

Every loader (exports, checkpoints, IDX data) opens its file here: only regular files are read
(a FIFO or a device is refused at once, never waited on), nothing is read past a byte budget
the caller computes from what the file should hold, and zip members are decompressed in
chunks, counted against both the size the archive declares and the budget. Every failure is a
`LoadError` naming the file and the member.
"""
from __future__ import annotations

import fcntl
import os
import stat
import zipfile
import zlib
from typing import BinaryIO

from graphc.ir.errors import LoadError
from graphc.ir.serialize import JSONDepthError, load_json

CHUNK = 1 << 20
MAX_MEMBERS = 4096  # far more than an export holds; bounds the work on a forged directory

_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
          stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def open_regular(path: str) -> BinaryIO:
    """`path` opened for reading if it is a regular file. Opened non-blocking, so that a FIFO
    with no writer cannot hang the open, and checked with fstat (the file opened, not a path
    that may have changed since)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise LoadError(path, "no such file") from None
    except OSError as exc:
        raise LoadError(path, f"cannot open it ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _KINDS.items() if test(mode)), "not a file")
        raise LoadError(path, f"is {kind}, not a regular file: graphc loads regular files only")
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    return os.fdopen(fd, "rb")


def read_at_most(stream: BinaryIO, limit: int, path: str, member: str | None = None) -> bytes:
    """All of `stream`, refused once it passes `limit` bytes (read in chunks: an oversized
    stream costs at most `limit` plus one chunk of memory)."""
    parts, total = [], 0
    while True:
        chunk = stream.read(min(CHUNK, limit + 1 - total))
        if not chunk:
            return b"".join(parts)
        total += len(chunk)
        if total > limit:
            raise LoadError(path, f"holds more than the {limit:,} bytes it may", member)
        parts.append(chunk)


def parse_json(data: bytes, path: str, member: str) -> object:
    """A JSON document of a file, its nesting and element count checked before it is parsed."""
    try:
        return load_json(data)
    except UnicodeDecodeError as exc:
        raise LoadError(path, f"is not UTF-8 text ({exc.reason} at byte {exc.start})", member) from None
    except JSONDepthError as exc:
        raise LoadError(path, str(exc), member) from None
    except ValueError as exc:
        raise LoadError(path, f"is not valid JSON ({exc})", member) from None


class ZipMembers:
    """The members of a zip archive, each read whole only within a byte limit."""

    def __init__(self, path: str, what: str = "zip archive") -> None:
        self.path = path
        self._file = open_regular(path)
        try:
            self._zip = zipfile.ZipFile(self._file)
            infos = self._zip.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError,
                NotImplementedError) as exc:
            self._file.close()
            raise LoadError(path, f"not a readable {what} ({exc})") from None
        if len(infos) > MAX_MEMBERS:
            self.close()
            raise LoadError(path, f"the archive lists {len(infos):,} members (at most {MAX_MEMBERS})")
        self.infos = {info.filename: info for info in infos}
        if len(self.infos) != len(infos):
            self.close()
            raise LoadError(path, "the archive holds two members of the same name")

    def __enter__(self) -> ZipMembers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()
        self._file.close()

    def declared_size(self, name: str) -> int:
        return self.infos[name].file_size

    def read(self, name: str, limit: int) -> bytes:
        """Member `name`, decompressed in chunks; refused if the archive declares more than
        `limit` bytes for it, or if decompressing yields more than it declares."""
        info = self.infos[name]
        if info.file_size > limit:
            raise LoadError(self.path, f"declares {info.file_size:,} bytes, more than the "
                            f"{limit:,} it may hold", name)
        try:
            with self._zip.open(info) as stream:
                return read_at_most(stream, min(limit, info.file_size), self.path, name)
        except LoadError:
            raise
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
                NotImplementedError) as exc:  # RuntimeError: an encrypted member
            raise LoadError(self.path, f"cannot be decompressed ({exc})", name) from None
