"""What a loaded kernel keeps: its machine code, not the compiler's copy of its LLVM module.

Numba keeps, with every compiled function, an LLVM module of its code for other jitted functions
to link against (`CodeLibrary._shared_module`): parsed from the bitcode in the disk cache on
every load, or the optimized module, cloned, when the function compiled in this process. Nothing
links against graphc's kernels: the executor calls their machine code, and a scan driver calls
them by symbol (driver.py), declaring them without their code. So a kernel drops that module
once it is loaded: about 150 KiB of LLVM's heap per kernel (measured training steps, 2 threads,
disk cache warm: lstm-28 139.8 -> 134.3 MiB, transformer-m 185.7 -> 178.9 MiB).
"""
from __future__ import annotations

from typing import Any


def release_linking_module(dispatcher: Any, signature: tuple) -> None:
    """Drop the LLVM module Numba keeps for linking `dispatcher`'s code for `signature` into other
    jitted functions (which graphc never does: a function that tried would be refused by Numba,
    'library unfit for linking', rather than run wrong code)."""
    dispatcher.overloads[signature].library._shared_module = None
