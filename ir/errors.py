"""graphc's error types and the user-source locations they point at."""
from __future__ import annotations

import os
import sys
import types

_IR_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_IR_DIR)
# graphc's own code: ir/, and its sibling packages whether installed as graphc/{ir,passes,...}
# or mapped from the top-level folders of a source checkout.
INTERNAL_DIRS = tuple(
    sorted({_IR_DIR} | {os.path.join(_ROOT, n) for n in ("graphc", "passes", "backends")}
           | ({_ROOT} if os.path.basename(_ROOT) == "graphc" else set()))
)


class GraphcError(Exception):
    """Base class of every error graphc raises on purpose."""


class ShapeError(GraphcError, ValueError):
    """Operand shapes an op cannot accept."""


class DTypeError(GraphcError, TypeError):
    """Operand dtypes an op cannot accept."""


class AttributeSchemaError(GraphcError, TypeError):
    """A missing, unknown or ill-typed op attribute."""


class VerificationError(GraphcError, ValueError):
    """A graph that breaks the IR's invariants."""


class InputError(GraphcError, TypeError):
    """Arguments given to a traced or compiled function that it cannot take."""


class TracedValueError(GraphcError, TypeError):
    """A traced Tensor asked for its value (float(x), np.asarray(x), x.item(), if x: ...): it
    has none until the compiled graph runs. A TypeError, as Python's own conversions raise."""


class SerializationError(GraphcError, ValueError):
    """A file or document graphc cannot read back."""


class LoadError(SerializationError):
    """A file (export, checkpoint, data file) refused while loading: names the file, the part of
    it at fault (a zip member, a tensor) and what is wrong with it."""

    def __init__(self, path: str, what: str, member: str | None = None) -> None:
        self.path, self.member, self.what = path, member, what
        super().__init__(f"{path}: {member}: {what}" if member else f"{path}: {what}")

    def __reduce__(self):  # rebuilt from its parts when it crosses a process boundary
        return type(self), (self.path, self.what, self.member)


class IndexOutOfRangeError(GraphcError, IndexError):
    """An index read from data (a class target, an embedding id, a gather index) outside the
    axis it indexes. Names the op, the value, its position in the index array, the valid range
    [low, high) and the user's line (`loc`); no backend reads or writes memory for it."""

    def __init__(self, op: str, value: int, position: tuple[int, ...], low: int, high: int,
                 loc: str | None = None) -> None:
        self.op, self.value, self.position, self.low, self.high = op, value, position, low, high
        self.loc = loc
        where = position[0] if len(position) == 1 else position
        message = (f"{op}: index {value} at position {where} of its indices is out of range: "
                   f"valid indices are [{low}, {high})")
        super().__init__(message + (f" (at {loc})" if loc else ""))

    def at(self, loc: str | None) -> IndexOutOfRangeError:
        """The same error pointing at the user's line `loc`."""
        return IndexOutOfRangeError(self.op, self.value, self.position, self.low, self.high, loc)

    def __reduce__(self):  # pickles through compile workers and multiprocessing like the others
        return IndexOutOfRangeError, (self.op, self.value, self.position, self.low, self.high, self.loc)


_INTERNAL_ABSOLUTE: dict[str, bool] = {}  # tracing asks for every frame of every op traced


def is_internal_file(filename: str) -> bool:
    """Is `filename` part of graphc (so not the user's code a location should name)?"""
    known = _INTERNAL_ABSOLUTE.get(filename)
    if known is not None:
        return known
    path = os.path.abspath(filename)
    internal = any(path == d or path.startswith(d + os.sep) for d in INTERNAL_DIRS)
    if os.path.isabs(filename):  # a relative name may mean another file after a chdir
        _INTERNAL_ABSOLUTE[filename] = internal
    return internal


def user_location(skip_internal: bool = True) -> str | None:
    """`file:line` of the innermost frame outside graphc (the user's line being traced)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (skip_internal and is_internal_file(filename)) and not filename.startswith("<frozen"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def without_internal_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Rebuild a traceback keeping only frames outside graphc, so errors show the user's code."""
    kept = []
    while tb is not None:
        if not is_internal_file(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(kept):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result
