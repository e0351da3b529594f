"""The numba-cuda backend: fused kernels generated as numba.cuda source, run on an NVIDIA GPU
(or, with NUMBA_ENABLE_CUDASIM=1 set before numba is imported, on Numba's CUDA simulator).

    lower(fused) -> LoweredGraph;  compile_plan(lowered, plan, memory_of=None) -> Executable

See codegen.py (one generator per fusion pattern) and executor.py (device arena, calls).
"""
from __future__ import annotations

import os
from typing import Any

from graphc.backends import LoweredGraph
from graphc.ir import Graph
from graphc.ir.memory import MemoryPlan


def _problem() -> str | None:
    """Why this backend cannot run here, or None."""
    try:
        from .executor import numba_cuda_module
        cuda = numba_cuda_module()
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


# numba.cuda is imported when a graph is lowered, not when graphc looks for backends.
def lower(fused: Graph) -> LoweredGraph:
    from .executor import lower as lower_for_cuda
    return lower_for_cuda(fused)


def compile_plan(lowered: LoweredGraph, plan: MemoryPlan, memory_of: Any = None):
    """Every executable has a device arena of its own (`memory_of` shares none): device memory
    is not paged in by its first use, as a CPU arena is."""
    from .executor import compile_plan as compile_for_cuda
    return compile_for_cuda(lowered, plan)


__all__ = ["compile_plan", "is_available", "lower", "unavailable_reason"]
