"""The numba-cuda backend: fused kernels generated as numba.cuda source, run on an NVIDIA GPU
(or, with NUMBA_ENABLE_CUDASIM=1 set before numba is imported, on Numba's CUDA simulator).

    compile_graph(graph, donate=None) -> Executable

See codegen.py (one generator per fusion pattern) and executor.py (device arena, calls).
"""
from __future__ import annotations

import os

from graphc.ir import Graph


def _problem() -> str | None:
    """Why this backend cannot run here, or None."""
    try:
        from .executor import _cuda
        cuda = _cuda()
    except ImportError as exc:
        return f"numba-cuda is not installed ({exc}); pip install numba-cuda"
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return None
    if not cuda.is_available():
        return "no CUDA GPU/driver found (set NUMBA_ENABLE_CUDASIM=1 to use Numba's simulator)"
    return None


def is_available() -> bool:
    return _problem() is None


def unavailable_reason() -> str:
    return _problem() or ""


def compile_graph(graph: Graph, donate: dict[int, int] | None = None):
    from .executor import compile_graph as compile_for_cuda
    return compile_for_cuda(graph, donate)


__all__ = ["compile_graph", "is_available", "unavailable_reason"]
