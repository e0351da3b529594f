"""Rebatching: the optimized and fused graphs of a program traced again at another batch size,
derived from those of an earlier compilation instead of running simplify and fusion again.

The program is always traced again (user code may branch on shapes). `match_extents` then
proves that the new traced graph is the old one with only its batch extents scaled: the same ops
in the same order reading the same operands, the same attributes but for ints scaled like the
extents, and constants of the same types (a mean over the batch multiplies by 1/B). `rebatch`
gives an optimized or fused graph of the old compilation renamed so: each node's attributes
(constants' values included) are the new trace's where the node came from it (simplify and
fusion share a copied node's attribute dict with the traced node), a rewrite's node whose
attributes it computed from others' (simplify.DerivedAttrs: a slice moved across a transpose)
has them computed again from those renamed, and every type is inferred again by the op's own
rule from the renamed inputs.

Why the renamed graphs are what the passes would give: simplify and fusion look at shapes only
to compare them with each other and extents with 1 (a broadcast, a type kept, an operand read at
its output's shape, a one-element literal), and constant folding computes from constants alone.
The match checks that all of that reads the same in both traces:
- around each node (its results, operands and their operands: what a rewrite or a fusion of
  it compares) the types equal in one trace are the equal ones in the other (a batch of 32
  beside 32 channels is fine; x (32, 32) @ w (32, 32) that becomes (17, 32) @ (32, 32) is not);
- an extent or attribute int that changes is scaled by one ratio (the new batch over the old:
  a flattened batch of tokens, B*T, with B), and never is or becomes 0 or 1;
- a node simplify folds (computed from constants alone) does so in both traces; its value is
  computed here in both, and a folded constant of the old compilation takes the new value of
  its old one (simplify makes it a node of its own);
- constants (traced or folded) equal in one trace are equal in the other, and one that changes
  is never 0 or 1 (simplify drops x * 1 and x + 0);
- nodes of one op reading the same operands with equal attributes in one trace have equal ones
  in the other (CSE merges them).
One rewrite adds extents in its test (a slice of exactly one part of a concatenate): the parts'
extents along the axis must stay, and no changed int may equal one of their sums. Graphs with
scans (their own rewrites) and whatever else does not match are compiled afresh by the caller.
A changed one-element constant is a literal in its kernel's source: that kernel is new code.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Container

import numpy as np

from graphc.ir import Builder, Graph, Node, TensorType, Value
from graphc.ir.errors import GraphcError
from graphc.ir.interpret import run_node
from graphc.ir.ops.control import SCAN_OP
from graphc.ir.registry import PRIMITIVES, SOURCE, OpTypeError, get

from .simplify import FOLD_LIMIT, DerivedAttrs, attrs_key, derived


@dataclass(frozen=True)
class ExtentMatch:
    """How a new trace renames an old one: every extent that changed scaled by `ratio` (new
    batch / old batch); `changed` the old extents and attribute ints that changed somewhere;
    `attrs` maps id() of an old traced node's attribute dict to the new node's attributes (kept
    alive by the old traced graph, which the caller holds); `constants` the new value of each
    constant value (by `_value_key`) that changed, folded ones included: a folded constant is a
    node of its own, made by simplify; `input_types` are the new graph's input types."""

    ratio: Fraction
    changed: frozenset[int]
    attrs: dict[int, dict[str, Any]]
    constants: dict[tuple, np.ndarray]
    input_types: tuple[TensorType, ...]


class _Mismatch(Exception):
    """The new trace is not the old one renamed (internal: match_extents returns None)."""


def _same_constant(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Matcher:
    def __init__(self) -> None:
        self.ratio: Fraction | None = None
        self.scaled: dict[int, int] = {}  # each int that changed, old to new
        self.sums: set[int] = set()  # bounds of concatenated parts (_fixed_concatenation)

    def ints(self, old: tuple[int, ...], new: tuple[int, ...]) -> None:
        """Position by position equal, or scaled by the one ratio, never from or to 0 or 1."""
        if len(old) != len(new):
            raise _Mismatch
        if old != new:
            for o, n in zip(old, new):
                if o != n and self.scaled.get(o) != n:
                    self._scale(o, n)

    def _scale(self, old: int, new: int) -> None:
        if old in (0, 1) or new in (0, 1):
            raise _Mismatch
        if self.ratio is None:
            self.ratio = Fraction(new, old)
        elif new * self.ratio.denominator != old * self.ratio.numerator:
            raise _Mismatch
        self.scaled[old] = new

    def type(self, old: TensorType, new: TensorType) -> None:
        if old.dtype != new.dtype:
            raise _Mismatch
        self.ints(old.shape, new.shape)

    def attr(self, old: Any, new: Any) -> None:
        """Equal attributes, or ints / tuples of ints differing only by the ratio."""
        if isinstance(old, np.ndarray) or isinstance(new, np.ndarray):
            if not (isinstance(old, np.ndarray) and isinstance(new, np.ndarray)
                    and _same_constant(old, new)):
                raise _Mismatch
        elif type(old) is not type(new):
            raise _Mismatch
        elif old == new:
            return
        elif _is_int(old):
            self.ints((old,), (new,))
        elif isinstance(old, tuple) and all(_is_int(x) for x in (*old, *new)):
            self.ints(old, new)
        else:
            raise _Mismatch

    def result(self, attrs: dict[int, dict[str, Any]], constants: dict[tuple, tuple],
               input_types: tuple[TensorType, ...]) -> ExtentMatch:
        if self.ratio is None or self.scaled.keys() & self.sums:
            raise _Mismatch
        changed = {old: _constant(new) for old, new in constants.items() if old != new}
        return ExtentMatch(self.ratio, frozenset(self.scaled), attrs, changed, input_types)


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
    retyped: set[Value] = set()  # values of the old trace whose type changed
    for a, b in zip(old.inputs, new.inputs):
        if a.name != b.name or a.role != b.role:
            raise _Mismatch
        m.type(a.value.type, b.value.type)
        values[a.value] = b.value
        if a.value.type != b.value.type:
            retyped.add(a.value)
    attrs: dict[int, dict[str, Any]] = {}
    # CSE merges nodes of one op reading the same operands by their attributes
    siblings: dict[tuple, list[tuple[dict, dict]]] = {}
    position = {v: p for p, v in enumerate(old.input_values)}
    constants = _Bijection()   # constant values, old to new, traced or folded (by value key)
    folded: dict[Value, tuple[np.ndarray, np.ndarray]] = {}  # old and new values of folded nodes
    folded_new: set[Value] = set()  # the new trace's values that are folded
    for a, b in zip(old.nodes, new.nodes):
        if (a.op != b.op or a.op == SCAN_OP or a.subgraph is not None or b.subgraph is not None
                or len(a.inputs) != len(b.inputs) or len(a.outputs) != len(b.outputs)
                or a.attrs.keys() != b.attrs.keys()):
            raise _Mismatch
        if any(values.get(v) is not w for v, w in zip(a.inputs, b.inputs)):
            raise _Mismatch
        if a.op != "constant":
            for key, value in a.attrs.items():
                m.attr(value, b.attrs[key])
        for v, w in zip(a.outputs, b.outputs):
            m.type(v.type, w.type)
            values[v] = w
            if v.type != w.type:
                retyped.add(v)
        folds = a.op != "constant" and _folds(a, folded)
        if a.op == "constant":
            folded[a.output] = _constant_pair(constants, a.attrs["value"], b.attrs["value"])
            folded_new.add(b.output)
        elif folds != _folds(b, folded_new):
            raise _Mismatch
        elif folds:  # simplify computes its value: so here, for both traces
            old_value = _fold(a, [folded[v][0] for v in a.inputs])
            new_value = _fold(b, [folded[v][1] for v in a.inputs])
            folded[a.output] = _constant_pair(constants, old_value, new_value)
            folded_new.add(b.output)
        if a.op == "concatenate":
            _fixed_concatenation(m, a, b)
        around = _neighbourhood(a)
        if (not retyped.isdisjoint(around)  # else every type there is the same in both
                and _equal_types(around) != _equal_types([values[v] for v in around])):
            raise _Mismatch
        siblings.setdefault((a.op, tuple(position[v] for v in a.inputs)), []).append((a.attrs, b.attrs))
        position.update((v, len(position) + q) for q, v in enumerate(a.outputs))
        shared = attrs.setdefault(id(a.attrs), b.attrs)  # nodes copied from one: one renaming
        if shared is not b.attrs and attrs_key(shared) != attrs_key(b.attrs):
            raise _Mismatch
    if any(values[v] is not w for v, w in zip(old.output_values, new.output_values)):
        raise _Mismatch
    for group in siblings.values():
        if len(group) > 1:
            same = _Bijection()
            for old_attrs, new_attrs in group:
                same.pair(attrs_key(old_attrs), attrs_key(new_attrs))
    return m.result(attrs, constants.forward, tuple(i.value.type for i in new.inputs))


class _Bijection:
    """Pairs of keys, old to new, that must map one to one."""

    def __init__(self) -> None:
        self.forward: dict[Any, Any] = {}
        self.backward: dict[Any, Any] = {}

    def pair(self, old: Any, new: Any) -> None:
        if self.forward.setdefault(old, new) != new or self.backward.setdefault(new, old) != old:
            raise _Mismatch


def _value_key(value: np.ndarray) -> tuple:
    return value.dtype.name, value.shape, value.tobytes()


def _constant(key: tuple) -> np.ndarray:
    dtype, shape, data = key
    value = np.frombuffer(data, dtype=dtype).reshape(shape).copy()
    value.setflags(write=False)  # attributes are immutable
    return value


def _constant_pair(constants: _Bijection, old: np.ndarray, new: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`old` and `new`, the values of one constant in both traces: equal constants in one trace
    equal in the other; of one dtype, and either of one shape, never 0 or 1 where they differ
    (simplify drops a product with 1 and a sum with 0), or filled with one value (zeros of the
    batch's shape: an initial state)."""
    if old.dtype != new.dtype:
        raise _Mismatch
    old_key, new_key = _value_key(old), _value_key(new)
    if old.shape != new.shape:
        if not (old.size and new.size and _filled(old) and _filled(new) and old.flat[0] == new.flat[0]):
            raise _Mismatch
    elif old_key != new_key and (old.size == 0 or any(np.any(c == k) for c in (old, new) for k in (0, 1))):
        raise _Mismatch
    constants.pair(old_key, new_key)
    return old, new


def _filled(value: np.ndarray) -> bool:
    return bool(np.all(value == value.flat[0]))


def _fold(node: Node, operands: list[np.ndarray]) -> np.ndarray:
    """The constant simplify folds `node` to; a fold that fails is the whole pipeline's to
    report (with the user's line)."""
    try:
        (value,) = run_node(node, operands)
    except Exception:
        raise _Mismatch from None
    return value


def _folds(node: Node, folded: Container[Value]) -> bool:
    """Whether simplify's constant folding replaces primitive `node`, its operands in `folded`
    (the size limit of fold_constants)."""
    return (bool(node.inputs) and get(node.op).kind != SOURCE and all(v in folded for v in node.inputs)
            and node.output.type.size <= min(FOLD_LIMIT, max(v.type.size for v in node.inputs)))


def _neighbourhood(node: Node) -> list[Value]:
    """The values a rewrite of `node` compares types among: its results, its operands and
    theirs (simplify looks two producers back; fusion compares a node with its operands)."""
    around = [*node.outputs, *node.inputs]
    for v in node.inputs:
        if v.producer is not None:
            around.extend(v.producer.inputs)
    return around


def _equal_types(values: list[Value]) -> list[int]:
    """For each value, the position of the first of `values` with its type."""
    first: dict[TensorType, int] = {}
    return [first.setdefault(v.type, i) for i, v in enumerate(values)]


def _fixed_concatenation(m: _Matcher, old: Node, new: Node) -> None:
    """simplify takes a slice of a concatenate as the part it spans by adding up the parts'
    extents along the axis: those must stay, and no slice bound that changes may equal one of
    their sums (checked once all are known)."""
    axis, start = old.attrs["axis"], 0
    for v, w in zip(old.inputs, new.inputs):
        if v.shape[axis] != w.shape[axis]:
            raise _Mismatch
        start += v.shape[axis]
        m.sums.add(start)


def rebatch(graph: Graph, match: ExtentMatch) -> Graph | None:
    """`graph` (optimized or fused from the old trace of `match`) with its extents renamed, or
    None when a node cannot be renamed with certainty: one neither copied from the traced graph
    nor derived from renamed attributes (DerivedAttrs) whose attributes name an extent that
    changed, or whose type rule refuses the new types."""
    try:
        return _rebatch(graph, match, match.input_types, {})
    except (_Mismatch, OpTypeError, GraphcError):
        return None


def _rebatch(graph: Graph, match: ExtentMatch, input_types: tuple[TensorType, ...],
             renamed: dict[int, dict[str, Any]]) -> Graph:
    """`renamed` maps id() of each old attribute dict renamed so far (kernel bodies included) to
    its new attributes: what a derived node's sources are looked up in."""
    new = Graph(graph.name)
    mapping = {inp.value: new.add_input(t, inp.name, inp.role)
               for inp, t in zip(graph.inputs, input_types, strict=True)}
    for node in graph.nodes:
        ins = tuple(mapping[v] for v in node.inputs)
        if node.subgraph is not None:
            if node.op == SCAN_OP:
                raise _Mismatch
            body = _rebatch(node.subgraph, match, tuple(v.type for v in ins), renamed)
            clone = Node(node.op, ins, node.attrs, tuple(v.type for v in body.output_values),
                         node.loc, body, node.module)
            new.nodes.append(clone)
        elif isinstance(node.attrs, DerivedAttrs) and id(node.attrs) not in match.attrs:
            sources = tuple(_renamed_source(s, match, renamed) for s in node.attrs.sources)
            b = Builder(new)
            b.at(node)
            clone = derived(b, node.op, ins, node.attrs.derive, *sources).producer
        else:
            attrs = match.attrs.get(id(node.attrs))
            if attrs is None and node.op == "constant":  # folded by simplify: by its value
                value = match.constants.get(_value_key(node.attrs["value"]))
                attrs = node.attrs if value is None else {"value": value}
            elif attrs is None:
                attrs = node.attrs
                if _names_extent(attrs, match.changed):
                    raise _Mismatch
            out = PRIMITIVES[node.op].infer(*(v.type for v in ins), **attrs)
            clone = Node(node.op, ins, attrs, (out,), node.loc, None, node.module)
            new.nodes.append(clone)
        renamed[id(node.attrs)] = clone.attrs
        mapping.update(zip(node.outputs, clone.outputs))
    new.outputs = [(n, mapping[v]) for n, v in graph.outputs]
    return new


def _renamed_source(attrs: dict[str, Any], match: ExtentMatch,
                    renamed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The attributes at the new sizes of a node a derived node's attributes were computed from:
    a traced node's (the new trace's), a node's renamed above, or attributes that name no extent
    that changed (the same at every size). Otherwise the renaming is unknown."""
    new = match.attrs.get(id(attrs), renamed.get(id(attrs)))
    if new is not None:
        return new
    if isinstance(attrs, DerivedAttrs) or _names_extent(attrs, match.changed):
        raise _Mismatch
    return attrs


def _names_extent(attrs: dict[str, Any], changed: frozenset[int]) -> bool:
    """Whether an int in `attrs` equals an extent that changed (it might be one)."""
    for value in attrs.values():
        if _is_int(value) and value in changed:
            return True
        if isinstance(value, tuple) and any(_is_int(x) and x in changed for x in value):
            return True
    return False
