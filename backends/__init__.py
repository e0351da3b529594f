"""graphc.backends: turn an optimized graph into something that runs.

Each backend module exposes ``compile_graph(graph, donate=None) -> executable``; executables are
called with NumPy arrays (one per graph input) and return a list of arrays (one per output).
`donate` maps input index -> output index: that output is written into the input's buffer.
"""
from __future__ import annotations

import importlib
from typing import Any

from graphc.ir import Graph
from graphc.ir.errors import GraphcError

_MODULES = {
    "reference": "graphc.backends.reference",
    "numba-cpu": "graphc.backends.numba_cpu",
    "numba-cuda": "graphc.backends.numba_cuda",
}


def _usable(name: str) -> bool:
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError:
        return False
    return getattr(mod, "is_available", lambda: True)()


def available_backends() -> list[str]:
    return [name for name in _MODULES if _usable(name)]


def default_backend() -> str:
    """numba-cpu when it loads, else the reference (probing only those two: asking CUDA costs
    most of a second)."""
    return "numba-cpu" if _usable("numba-cpu") else "reference"


def get_backend(name: str | None = None) -> Any:
    name = name or default_backend()
    if name not in _MODULES:
        raise GraphcError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise GraphcError(f"backend {name!r} cannot be loaded ({exc}); available: "
                          f"{', '.join(available_backends())}") from None
    if not getattr(mod, "is_available", lambda: True)():
        raise GraphcError(f"backend {name!r} is not usable on this machine: "
                          f"{getattr(mod, 'unavailable_reason', lambda: '')()}; available: "
                          f"{', '.join(available_backends())}")
    return mod


def compile_graph(graph: Graph, backend: str | None = None, donate: dict[int, int] | None = None) -> Any:
    return get_backend(backend).compile_graph(graph, donate)
