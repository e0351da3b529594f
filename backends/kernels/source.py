"""Writing generated kernel source: an indented writer, names, literals, indices, and the
comment naming where a kernel's ops came from. Nothing here depends on the target."""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from typing import Iterator

import numpy as np

from graphc.ir import Node
from graphc.ir.graph import safe_module_path
from graphc.ir.printer import short_loc

_COMMENT_UNSAFE = re.compile(r"[^A-Za-z0-9_.:-]")
_ORIGINS_SHOWN = 16


def origin_comment(kernel: Node) -> str:
    """One comment line naming where the kernel's ops came from: "# ops from: features.0 @
    model.py:12, features.1 @ model.py:13"; empty when nothing is known. Paths and lines may
    come from a loaded file: only [A-Za-z0-9_.:-] of them reaches the source (a line break in
    a comment would be code)."""
    origins: dict[str, None] = {}
    for node in kernel.subgraph.nodes:
        if node.op == "constant":  # literals are shared between kernels: not this one's ops
            continue
        module = safe_module_path(node.module) if node.module else ""
        loc = _COMMENT_UNSAFE.sub("_", short_loc(node.loc))[-80:] if node.loc else ""
        if module or loc:
            origins[" @ ".join(part for part in (module, loc) if part)] = None
    if not origins:
        return ""
    shown = list(origins)[:_ORIGINS_SHOWN]
    more = f", and {len(origins) - len(shown)} more" if len(origins) > len(shown) else ""
    return f"# ops from: {', '.join(shown)}{more}"



class Writer:
    """Indented source lines."""

    def __init__(self, depth: int = 0) -> None:
        self.lines: list[str] = []
        self.depth = depth

    def line(self, text: str = "") -> None:
        self.lines.append("    " * self.depth + text if text else "")

    def extend(self, other: Writer) -> None:
        self.lines.extend("    " * self.depth + ln if ln else "" for ln in other.lines)

    @contextmanager
    def block(self, header: str) -> Iterator[None]:
        self.line(header)
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"



def entry_name(kernel_name: str) -> str:
    """The function name: the kernel name without its position prefix ('k12_'), so that the
    same kernel in two graphs has the same source and shares one cache entry; prefixed, so
    that it never shadows a builtin its body calls (abs, max)."""
    return "kernel_" + re.sub(r"^k\d+_", "", kernel_name)


def np_type(dtype: str) -> str:
    return "np.bool_" if dtype == "bool" else f"np.{dtype}"


def cast(expr: str, dtype: str) -> str:
    """Round an expression to `dtype`: each op's result has its declared dtype, as in the
    reference (Numba would otherwise widen float32 mixed with Python literals to float64)."""
    if dtype == "bool" or expr.startswith(np_type(dtype) + "("):
        return expr
    return f"{np_type(dtype)}({expr})"


def literal(value: object, dtype: str) -> str:
    """Source text for a scalar of `dtype`."""
    if dtype == "bool":
        return "True" if bool(value) else "False"
    if np.issubdtype(np.dtype(dtype), np.integer):
        return f"np.{dtype}({int(value)})"
    v = float(value)  # type: ignore[arg-type]
    if math.isnan(v):
        text = "np.nan"
    elif math.isinf(v):
        text = "np.inf" if v > 0 else "-np.inf"
    else:
        text = repr(v)
    return f"np.{dtype}({text})"


def lowest(dtype: str) -> str:
    """The identity of max: -inf, or the smallest integer."""
    if np.issubdtype(np.dtype(dtype), np.integer):
        return literal(np.iinfo(dtype).min, dtype)
    return literal(-math.inf, dtype)



def index_text(index: tuple[str, ...]) -> str:
    return ", ".join(index) if index else "()"



def size_of(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64))
