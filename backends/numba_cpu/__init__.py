"""The numba-cpu backend: fused kernels generated as Python source, compiled by Numba.

    lower(fused) -> LoweredGraph;  compile_plan(lowered, plan, memory_of=None) -> Executable
    row_blocks(batch) -> int;  row_block_driver(scan, block body, blocks, compile_part) -> a scan run
    as blocks of its rows side by side (graphc/scan_lowering.py);  splits_rows() -> bool: whether
    any batch may (graphc/nn/recurrent.py then keeps short loops as scans)

See executor.py (the executable and its memory), codegen_*.py (one generator per kernel
pattern) and cache.py (the on-disk kernel cache).
"""
from __future__ import annotations

from .cache import CacheStats, default_cache_dir, get_cache
from .codegen import unlowered_primitives
from .driver import row_block_driver, row_blocks, splits_rows
from .executor import CompiledKernel, Executable, ProfileReport, compile_plan, lower


def _missing_dependency() -> str | None:
    for module in ("numba", "scipy"):  # the GEMMs call scipy's BLAS
        try:
            __import__(module)
        except ImportError:
            return module
    return None


def is_available() -> bool:
    return _missing_dependency() is None


def unavailable_reason() -> str:
    missing = _missing_dependency()
    return f"the {missing!r} package is not installed" if missing else ""


__all__ = ["CacheStats", "CompiledKernel", "Executable", "ProfileReport", "compile_plan",
           "default_cache_dir", "get_cache", "is_available", "lower", "row_block_driver", "row_blocks",
           "splits_rows", "unavailable_reason", "unlowered_primitives"]
