"""Rebatching: the optimized and fused graphs of a program traced again at another batch size,
derived from those of an earlier compilation instead of running simplify and fusion again.

The program is always traced again (user code may branch on shapes). `match_extents` then
proves that the new traced graph is the old one with only its extents renamed: the same ops in
the same order reading the same operands, the same attributes and constants, and every extent
that differs renamed by one map. `rebatch` gives an optimized or fused graph of the old
compilation with that renaming applied: each node's attributes are the new trace's where the
node came from it (simplify and fusion share a copied node's attribute dict with the traced
node), every type is inferred again by the op's own rule from the renamed inputs.

Why the renamed graphs are what the passes would give: simplify and fusion look at extents only
to compare them with each other and with 1 (a broadcast, a type kept, an operand read at its
output's shape, a one-element literal), and constant folding computes from constants alone. The
map preserves all of that, because it is checked to be
- injective, never to or from 0 or 1, never onto an extent that stays (equal stays equal),
- proportional to the batch: every renamed extent scales by the same ratio (a flattened batch
  of tokens, B*T, with B), so sums and products of batch extents keep their relations,
and a node computed from constants only keeps its type and attributes. One rewrite adds
extents in its test (a slice of exactly one part of a concatenate); a graph in which both a
concatenate and a slice change is compiled afresh. So are graphs with scans (their own
rewrites), differing constants (a mean over the batch scales by 1/B: a new literal in a kernel)
and anything else that does not match: the caller runs the whole pipeline then.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from graphc.ir import Graph, Node, TensorType
from graphc.ir.ops.control import SCAN_OP
from graphc.ir.registry import PRIMITIVES, OpTypeError
from graphc.ir.errors import GraphcError


@dataclass(frozen=True)
class ExtentMatch:
    """How a new trace renames an old one: `extents` old -> new for every extent that changed;
    `attrs` maps id() of an old traced node's attribute dict to the new node's attributes
    (kept alive by the old traced graph, which the caller holds); `input_types` are the new
    graph's input types."""

    extents: dict[int, int]
    attrs: dict[int, dict[str, Any]]
    input_types: tuple[TensorType, ...]


class _Mismatch(Exception):
    """The new trace is not the old one renamed (internal: match_extents returns None)."""


def _same_constant(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


class _Matcher:
    def __init__(self) -> None:
        self.renamed: dict[int, int] = {}
        self.kept: set[int] = set()

    def extents(self, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        if len(old) != len(new):
            raise _Mismatch
        for o, n in zip(old, new):
            if o == n:
                self.kept.add(o)
            elif self.renamed.setdefault(o, n) != n:
                raise _Mismatch

    def type(self, old: TensorType, new: TensorType) -> None:
        if old.dtype != new.dtype:
            raise _Mismatch
        self.extents(old.shape, new.shape)

    def attr(self, old: Any, new: Any) -> bool:
        """Whether `new` differs from `old`: equal attributes, or ints / tuples of ints differing
        only in renamed extents."""
        if isinstance(old, np.ndarray) or isinstance(new, np.ndarray):
            if not (isinstance(old, np.ndarray) and isinstance(new, np.ndarray)
                    and _same_constant(old, new)):
                raise _Mismatch
            return False
        if type(old) is not type(new):
            raise _Mismatch
        if old == new:
            return False
        if isinstance(old, int) and not isinstance(old, bool):
            self.extents((old,), (new,))
        elif isinstance(old, tuple) and all(isinstance(x, int) and not isinstance(x, bool)
                                            for x in (*old, *new)):
            self.extents(old, new)
        else:
            raise _Mismatch
        return True

    def checked_map(self) -> dict[int, int]:
        renamed = self.renamed
        if not renamed:
            return {}
        images = list(renamed.values())
        if (self.kept & renamed.keys() or self.kept & set(images) or len(set(images)) != len(images)
                or {0, 1} & (renamed.keys() | set(images))):
            raise _Mismatch
        ratios = {Fraction(n, o) for o, n in renamed.items()}
        if len(ratios) != 1:
            raise _Mismatch
        return renamed


def match_extents(old: Graph, new: Graph) -> ExtentMatch | None:
    """The renaming of extents that turns traced graph `old` into `new`, or None when `new` is
    not `old` renamed so (see the module docstring for what is checked)."""
    try:
        return _match(old, new)
    except _Mismatch:
        return None


def _match(old: Graph, new: Graph) -> ExtentMatch:
    if (len(old.nodes) != len(new.nodes) or len(old.inputs) != len(new.inputs)
            or old.output_names != new.output_names):
        raise _Mismatch
    m = _Matcher()
    values = {}
    for a, b in zip(old.inputs, new.inputs):
        if a.name != b.name or a.role != b.role:
            raise _Mismatch
        m.type(a.value.type, b.value.type)
        values[a.value] = b.value
    attrs: dict[int, dict[str, Any]] = {}
    from_constants = set()  # old values computed from constants only: folded, so they must stay
    for a, b in zip(old.nodes, new.nodes):
        if (a.op != b.op or a.op == SCAN_OP or a.subgraph is not None or b.subgraph is not None
                or len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs)
                or a.attrs.keys() != b.attrs.keys()):
            raise _Mismatch
        if any(values.get(v) is not w for v, w in zip(a.inputs, b.inputs)):
            raise _Mismatch
        changed = False
        for key, value in a.attrs.items():
            changed |= m.attr(value, b.attrs[key])
        for v, w in zip(a.outputs, b.outputs):
            m.type(v.type, w.type)
            changed |= v.type != w.type
            values[v] = w
        if all(v in from_constants for v in a.inputs):  # constants, and what folds from them
            if changed:
                raise _Mismatch
            from_constants.update(a.outputs)
        if a.op == "concatenate":
            _fixed_concatenation(m, a, b)
        shared = attrs.setdefault(id(a.attrs), b.attrs)  # one dict for several nodes: one renaming
        if shared is not b.attrs and any(_Matcher().attr(shared[k], b.attrs[k]) for k in shared):
            raise _Mismatch
    if any(values[v] is not w for v, w in zip(old.output_values, new.output_values)):
        raise _Mismatch
    return ExtentMatch(m.checked_map(), attrs, tuple(i.value.type for i in new.inputs))


def _fixed_concatenation(m: _Matcher, old: Node, new: Node) -> None:
    """simplify takes a slice of a concatenate as the part it spans by adding up the parts'
    extents along the axis: those must stay, and so must their sums (no slice bound that
    changes may equal one: recorded as extents kept)."""
    axis, start = old.attrs["axis"], 0
    for v, w in zip(old.inputs, new.inputs):
        if v.shape[axis] != w.shape[axis]:
            raise _Mismatch
        start += v.shape[axis]
        m.kept.add(start)


def rebatch(graph: Graph, match: ExtentMatch) -> Graph | None:
    """`graph` (optimized or fused from the old trace of `match`) with its extents renamed, or
    None when a node cannot be renamed with certainty: one not copied from the traced graph
    whose attributes name an extent that changed, or whose type rule refuses the new types."""
    try:
        return _rebatch(graph, match, match.input_types)
    except (_Mismatch, OpTypeError, GraphcError):
        return None


def _rebatch(graph: Graph, match: ExtentMatch, input_types: tuple[TensorType, ...]) -> Graph:
    new = Graph(graph.name)
    mapping = {inp.value: new.add_input(t, inp.name, inp.role)
               for inp, t in zip(graph.inputs, input_types, strict=True)}
    renamed = match.extents
    for node in graph.nodes:
        ins = tuple(mapping[v] for v in node.inputs)
        if node.subgraph is not None:
            if node.op == SCAN_OP:
                raise _Mismatch
            body = _rebatch(node.subgraph, match, tuple(v.type for v in ins))
            clone = Node(node.op, ins, node.attrs, tuple(v.type for v in body.output_values),
                         node.loc, body, node.module)
        else:
            attrs = match.attrs.get(id(node.attrs))
            if attrs is None:
                attrs = node.attrs
                if renamed and _names_extent(attrs, renamed):
                    raise _Mismatch
            out = PRIMITIVES[node.op].infer(*(v.type for v in ins), **attrs)
            clone = Node(node.op, ins, attrs, (out,), node.loc, None, node.module)
        new.nodes.append(clone)
        mapping.update(zip(node.outputs, clone.outputs))
    new.outputs = [(n, mapping[v]) for n, v in graph.outputs]
    return new


def _names_extent(attrs: dict[str, Any], renamed: dict[int, int]) -> bool:
    """Whether an int in `attrs` equals an extent that changed (it might be one)."""
    for value in attrs.values():
        if isinstance(value, int) and not isinstance(value, bool):
            if value in renamed:
                return True
        elif isinstance(value, tuple):
            if any(isinstance(x, int) and x in renamed for x in value):
                return True
    return False
