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


class SerializationError(GraphcError, ValueError):
    """A file or document graphc cannot read back."""


def _is_internal(filename: str) -> bool:
    path = os.path.abspath(filename)
    return any(path == d or path.startswith(d + os.sep) for d in INTERNAL_DIRS)


def user_location(skip_internal: bool = True) -> str | None:
    """`file:line` of the innermost frame outside graphc (the user's line being traced)."""
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        if not (skip_internal and _is_internal(filename)) and not filename.startswith("<frozen"):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def without_internal_frames(tb: types.TracebackType | None) -> types.TracebackType | None:
    """Rebuild a traceback keeping only frames outside graphc, so errors show the user's code."""
    kept = []
    while tb is not None:
        if not _is_internal(tb.tb_frame.f_code.co_filename):
            kept.append(tb)
        tb = tb.tb_next
    result = None
    for entry in reversed(kept):
        result = types.TracebackType(result, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return result
