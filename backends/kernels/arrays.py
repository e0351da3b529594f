"""The arrays a generated kernel function is passed, named by what they are rather than by text.

A lowering refers to a kernel node's input `i` as ``KernelArray(INPUT, i)``, its output `j` as
``KernelArray(OUTPUT, j)`` and the `k`-th scratch array it asks for as ``KernelArray(SCRATCH,
k)`` (placed in the arena by the memory plan). Executors read `kind` and `index` to find the
buffer; `name` ('x0', 'y1', 's0') is what generated source calls the array, so it is part of
the source text and therefore of the kernel-cache key.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Sequence, TypeVar

T = TypeVar("T")


class ArrayKind(Enum):
    """Whose array it is; the value is the prefix of its name in generated source."""

    INPUT = "x"
    OUTPUT = "y"
    SCRATCH = "s"


INPUT, OUTPUT, SCRATCH = ArrayKind.INPUT, ArrayKind.OUTPUT, ArrayKind.SCRATCH


@dataclass(frozen=True)
class KernelArray:
    """Input, output or scratch array `index` of one kernel node."""

    kind: ArrayKind
    index: int

    @property
    def name(self) -> str:
        """The array's name in generated source: 'x0', 'y1', 's0'."""
        return f"{self.kind.value}{self.index}"

    def pick(self, inputs: Sequence[T], outputs: Sequence[T], scratch: Sequence[T]) -> T:
        """This array's entry among a kernel's inputs, outputs and scratch (values, buffers or
        types: whatever the caller keeps per array)."""
        table = {INPUT: inputs, OUTPUT: outputs, SCRATCH: scratch}[self.kind]
        return table[self.index]

    def __repr__(self) -> str:
        return f"KernelArray({self.name})"
