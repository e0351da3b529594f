"""The memory plan of a fused graph: what memory planning (passes/memplan.py) produces and a
backend's executor runs by. Every value of the fused graph has a `Location`:

- ``input``: the caller's array for graph input `index`;
- ``output``: a fresh array allocated per call for graph output `index` (the caller keeps it);
- ``donated``: the caller's array for graph input `index`, written in place (JAX's donation);
- ``constant``: a buffer filled once when the graph is compiled;
- ``arena``: storage `index` of the arena, at its offset (intermediates and kernel scratch);
- ``view``: an alias (reshape) of another value's buffer, `base`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from .graph import Graph, Node, Value
from .types import TensorType

ALIGNMENT = 64  # bytes: a cache line, and enough for any SIMD load


@dataclass(frozen=True)
class Location:
    kind: str                   # input, output, donated, constant, arena, view
    index: int | None = None    # input index, output index or arena storage slot
    base: Value | None = None   # for views: the aliased value


@dataclass(eq=False)
class Storage:
    """One arena allocation; several values share it when a kernel updates in place."""

    slot: int
    nbytes: int
    start: int                  # schedule index of the first writer
    end: int                    # schedule index of the last reader
    values: list[Value] = field(default_factory=list)
    offset: int = 0
    scratch_of: Node | None = None  # set for a kernel's private workspace

    def overlaps_in_time(self, other: Storage) -> bool:
        return self.start <= other.end and other.start <= self.end

    def overlaps_in_space(self, other: Storage) -> bool:
        return self.offset < other.offset + other.nbytes and other.offset < self.offset + self.nbytes


@dataclass
class MemoryPlan:
    graph: Graph
    schedule: list[Node]
    locations: dict[Value, Location]
    storages: list[Storage]
    scratch: dict[Node, list[tuple[Storage, TensorType]]]
    lifetimes: dict[Value, tuple[int, int]]    # arena values: (first writer, last reader)
    inplace: list[tuple[Node, Value, Value]]   # (kernel, input dying there or its library
                                               #  result, output reusing its storage)
    donated_in_place: dict[int, int]           # input index -> output index, written in place
    donated_by_copy: dict[int, int]            # input index -> output index, copied at the end
    output_copies: list[int]                   # outputs copied from another buffer at the end
    peak_bytes: int = 0
    naive_bytes: int = 0

    def slot_of(self, value: Value) -> int | None:
        """Arena storage of `value` (following views), or None if it lives outside the arena.
        A kernel subgraph's output counts as the kernel output it becomes (for DOT colours);
        values internal to a kernel have no buffer."""
        value = self._kernel_output_of.get(value, value)
        if value not in self.locations:
            return None
        loc = self.locations[self.root(value)]
        return loc.index if loc.kind == "arena" else None

    @cached_property
    def _kernel_output_of(self) -> dict[Value, Value]:
        return {inner: outer for node in self.schedule if node.subgraph is not None
                for inner, outer in zip(node.subgraph.output_values, node.outputs)}

    def root(self, value: Value) -> Value:
        """The value owning the buffer `value` is stored in (itself unless it is a view)."""
        while self.locations[value].kind == "view":
            value = self.locations[value].base
        return value

    def buffer_of(self, value: Value) -> tuple[str, int] | None:
        """The buffer `value` lives in, ("arena", storage) or ("input", index), following views;
        None for a fresh output array or a constant."""
        location = self.locations[self.root(value)]
        if location.kind == "arena":
            return ("arena", location.index)
        if location.kind in ("input", "donated"):
            return ("input", location.index)
        return None

    def written_in_place(self, kernel: Node) -> set[tuple[int, int]]:
        """(input position, output position) pairs of `kernel` that are one buffer: outputs
        that reuse a dying input's storage or update a donated input."""
        buffers = [self.buffer_of(v) for v in kernel.outputs]
        return {(p, q) for p, v in enumerate(kernel.inputs) for q, buffer in enumerate(buffers)
                if buffer is not None and self.buffer_of(v) == buffer}

    def to_dict(self) -> dict:
        """A JSON-ready description: totals and every arena buffer's offset, size and lifetime."""
        return {"peak_bytes": self.peak_bytes, "naive_bytes": self.naive_bytes,
                "buffers": [{"slot": st.slot, "offset": st.offset, "nbytes": st.nbytes,
                             "first": st.start, "last": st.end, "values": len(st.values),
                             "scratch": st.scratch_of is not None} for st in self.storages],
                "donated_in_place": {str(k): v for k, v in self.donated_in_place.items()},
                "donated_by_copy": {str(k): v for k, v in self.donated_by_copy.items()}}

    def summary(self) -> str:
        saved = 1 - self.peak_bytes / self.naive_bytes if self.naive_bytes else 0.0
        return (f"arena {self.peak_bytes} bytes for {len(self.storages)} buffers "
                f"(naive {self.naive_bytes} bytes, {saved:.0%} saved; {len(self.inplace)} in place, "
                f"{len(self.donated_in_place)} donated in place, {len(self.donated_by_copy)} by copy)")
