"""Operator fusion: partition a primitive graph into kernels.

The result is a graph whose nodes are all ``kernel`` nodes (``ir.verify.KERNEL_OP``), each
holding the subgraph it computes and attrs ``{"name": str, "pattern": str}``. Patterns:

- ``elementwise`` / ``shape``: one loop nest over a *domain* (the common output shape of every
  member). Members are pointwise ops: elementwise arithmetic, and index-mapping ops (transpose,
  slice, pad, concatenate, broadcast_to, gather-like and random ops) that read their operands
  at a computed index. A member may read a value computed inside the kernel only at the loop
  index itself (an *identity read*); everything else is loaded from a kernel input.
- ``reduction``: one reduction (the *anchor*), the elementwise members that produce its operand
  (the *body*, evaluated inside the reduction loop) and pointwise consumers of the reduced value
  (the *epilogue*). In the subgraph the body comes first, then the anchor, then the epilogue.
- ``library``: an opaque op (matmul, conv, pooling, scatter) with an elementwise epilogue over
  its output (bias add, ReLU). An op declaring ``transposed_operands`` (matmul) also absorbs
  transposes of its operands (swapping the last two axes, read by nothing else): BLAS reads them
  transposed for free, except the right operand (B) of a large float32 product
  (`_stores_right_operand`). A transpose only such ops read, several of them, is first copied
  for each (`_transpose_per_product`), unless several read it as B. In the subgraph the
  prologue transposes come first, then the anchor, then the epilogue.
- ``view``: an op declaring ``view`` (reshape, expand_dims, squeeze) of a contiguous buffer: a
  zero-cost alias.

Fusion reads what it needs of an op from its registry entry (``view``, ``indexed_load``,
``identity_reads``, ``transposed_operands``, the kind), never from its name.
- ``constant``: a constant tensor, materialised once by the backend.
- ``scan``: a scan node alone (ir/ops/control.py), never fused with its neighbours; its body
  is left unfused here (the backends that will run it compile the body themselves).

Scalar constants (one element) are not kernels: every kernel that reads one copies it into its
subgraph, where the code generator emits it as a literal.

A merge must keep the kernel graph acyclic; it is checked on the contracted group graph.

Once the groups are formed, *rematerialisation* (``_Rematerialiser``) lets a kernel compute again
a cheap elementwise value of another kernel instead of loading it: a training step's backward
kernels read GELU's tanh term, its products and the pre-activation, and recomputing the first
ones from the pre-activation (which the backward kernel reads anyway) spares the forward kernel a
store of each and the arena a buffer live from forward to backward. A value is recomputed only
from values its reader loads anyway, so no buffer lives longer for it, or from one value it then
loads instead of two or more.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from graphc.ir import Graph, Node, Value
from graphc.ir.kernels import KERNEL_OP, bounded_label, is_literal, op_class
from graphc.ir.ops.control import SCAN_OP
from graphc.ir.registry import ELEMENTWISE, PRIMITIVES, SHAPE, get

from .dag import DiGraph

ANCHORED_PATTERNS = ("reduction", "library")


# -- op classification -----------------------------------------------------------------------
def fusion_class(node: Node) -> str:
    """op_class, with one-element constants told apart as 'literal' and scans as 'scan'."""
    if node.op == SCAN_OP:
        return "scan"
    return "literal" if is_literal(node) else op_class(node.op)


def swaps_last_two_axes(node: Node) -> bool:
    perm = node.attrs.get("perm", ())
    rank = len(perm)
    return node.op == "transpose" and rank >= 2 and perm == tuple(range(rank - 2)) + (rank - 1, rank - 2)


def reads_at_identity(node: Node, position: int) -> bool:
    """Does the pointwise `node` read operand `position` only at its own output index?"""
    if node.inputs[position].shape != node.output.shape:
        return False
    return get(node.op).reads_at_identity(position)


# -- groups under construction -----------------------------------------------------------------
@dataclass(eq=False)
class _Group:
    key: int
    pattern: str                     # 'elementwise', 'reduction', 'library', 'view', 'constant'
    domain: tuple[int, ...]          # the shape a joining pointwise node reads at identity
    body: list[Node] = field(default_factory=list)      # evaluated before/inside the anchor
    anchor: Node | None = None
    epilogue: list[Node] = field(default_factory=list)  # evaluated over the anchor's output
    open_values: set[Value] = field(default_factory=set)  # readable at identity by joiners

    @property
    def anchored(self) -> bool:
        return self.pattern in ANCHORED_PATTERNS

    @property
    def members(self) -> list[Node]:
        return self.body + ([self.anchor] if self.anchor is not None else []) + self.epilogue


# Nodes one fused kernel may hold. Real models' largest kernels hold a few dozen; Numba's
# compile time grows about quadratically with a kernel's length, so a graph of thousands of
# chained elementwise ops (a crafted export) would otherwise take minutes and gigabytes to load.
MAX_KERNEL_NODES = 128


class _Partitioner:
    """Greedy producer-into-consumer grouping over the nodes in topological order."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self.order = {node: i for i, node in enumerate(graph.nodes)}
        self.group_of: dict[Value, _Group] = {}
        self.literals: dict[Value, Node] = {}
        self.groups: dict[int, _Group] = {}
        self.dag: DiGraph[int] = DiGraph()  # group keys; edge producer -> consumer
        self._next_key = 0
        self.users: dict[Value, list[Node]] = {}
        for node in graph.nodes:
            for v in node.inputs:
                self.users.setdefault(v, []).append(node)
        self.graph_outputs = set(graph.output_values)

    def run(self) -> list[_Group]:
        for node in self.graph.nodes:
            cls = fusion_class(node)
            if cls == "literal":
                self.literals[node.output] = node
            elif cls == "pointwise":
                self._add_pointwise(node)
            elif cls == "reduction":
                self._add_reduction(node)
            elif cls == "library":
                self._add_library(node)
            else:
                self._new_group(node, cls)
        self._materialise_literals()
        first = {k: min(self.order[m] for m in g.members) for k, g in self.groups.items()}
        return [self.groups[k] for k in self.dag.topological_order(key=first.__getitem__)]

    # -- bookkeeping -------------------------------------------------------------------------
    def _new_group(self, node: Node, pattern: str, anchored: bool = False) -> _Group:
        group = _Group(self._next_key, pattern, node.outputs[0].shape, open_values=set(node.outputs))
        self._next_key += 1
        if anchored:
            group.anchor = node
        else:
            group.body.append(node)
        self.groups[group.key] = group
        self.dag.add_node(group.key)
        self._attach(node, group)
        return group

    def _attach(self, node: Node, group: _Group) -> None:
        """Record `node`'s outputs as produced by `group`, and the edges from its producers."""
        for v in node.outputs:
            self.group_of[v] = group
        for v in node.inputs:
            producer = self.group_of.get(v)
            if producer is not None and producer is not group:
                self.dag.add_edge(producer.key, group.key)

    def _absorb(self, survivor: _Group, other: _Group) -> None:
        """Move the (elementwise) members of `other` into `survivor`, contracting the DAG."""
        if survivor.anchored:
            survivor.epilogue.extend(other.body)
        else:
            survivor.body.extend(other.body)
        survivor.open_values |= other.open_values
        for m in other.body:
            for v in m.outputs:
                self.group_of[v] = survivor
        for p in self.dag.predecessors(other.key):
            if p != survivor.key:
                self.dag.add_edge(p, survivor.key)
        for s in self.dag.successors(other.key):
            if s != survivor.key:
                self.dag.add_edge(survivor.key, s)
        self.dag.remove_node(other.key)
        del self.groups[other.key]

    def _creates_cycle(self, keys: set[int], extra_preds: set[int]) -> bool:
        """Would contracting `keys` (plus a new node fed by `extra_preds`) close a cycle?"""
        preds = set(extra_preds)
        for k in keys:
            preds.update(self.dag.predecessors(k))
        preds -= keys
        return any(self.dag.has_path(k, p) for k in keys for p in preds)

    # -- pointwise nodes -----------------------------------------------------------------------
    def _add_pointwise(self, node: Node) -> None:
        joinable, blocked = self._joinable_groups(node)
        if self._feeds_only_later_kernels(node, joinable):
            self._new_group(node, "elementwise")
            return
        input_groups = {self.group_of[v].key for v in node.inputs if v in self.group_of}
        union: list[_Group] = []
        # Anchored groups first: an epilogue saves a full write and re-read of their output.
        for group in sorted(joinable, key=lambda g: (not g.anchored, g.key)):
            if group.key in blocked or (group.anchored and any(g.anchored for g in union)):
                continue
            if sum(len(g.members) for g in union) + len(group.members) >= MAX_KERNEL_NODES:
                continue
            if not all(_shares_loop(group, other) for other in union):
                continue
            if self._creates_cycle({g.key for g in union} | {group.key}, input_groups):
                continue
            union.append(group)
        if not union:
            self._new_group(node, "elementwise")
            return
        survivor = next((g for g in union if g.anchored), union[0])
        for group in union:
            if group is not survivor:
                self._absorb(survivor, group)
        (survivor.epilogue if survivor.anchored else survivor.body).append(node)
        survivor.open_values.add(node.output)
        self._attach(node, survivor)

    def _feeds_only_later_kernels(self, node: Node, joinable: list[_Group]) -> bool:
        """Should elementwise `node`, a function of one group's values, start a group of its
        own? Yes when its value (through a chain of elementwise ops) only reaches nodes that
        must run after that group: joined to it, the group would store the value for them;
        deferred, their kernel computes it from its inputs instead. For the ReLU gradient's mask
        (out > 0) this spares a forward kernel storing the mask: the backward kernel reads
        `out`, which it keeps anyway for the next layer."""
        if len(joinable) != 1 or get(node.op).kind != ELEMENTWISE:
            return False
        group = joinable[0]
        if any(self.group_of.get(v) not in (None, group) for v in node.inputs):
            return False
        return self._reaches_only_later(node.output, group.key, depth=4)

    def _reaches_only_later(self, value: Value, key: int, depth: int) -> bool:
        """Does every use of `value`, following single-input elementwise chains up to `depth`
        ops, read another input computed after group `key` (so it cannot join that group)?"""
        users = self.users.get(value, [])
        if not users or value in self.graph_outputs or depth == 0:
            return False
        for user in users:
            if user.op == SCAN_OP:
                return False
            others = [v for v in user.inputs if v is not value
                      and not (v.producer is not None and is_literal(v.producer))]
            if not others:
                if get(user.op).kind != ELEMENTWISE or not self._reaches_only_later(user.output, key, depth - 1):
                    return False
                continue
            groups = [self.group_of.get(v) for v in others]
            if not any(g is not None and g.key != key and self.dag.has_path(key, g.key) for g in groups):
                return False
        return True

    def _joinable_groups(self, node: Node) -> tuple[list[_Group], set[int]]:
        """Groups `node` may join, and groups it must not join (it reads them off-index)."""
        joinable: dict[int, _Group] = {}
        blocked: set[int] = set()
        for pos, v in enumerate(node.inputs):
            group = self.group_of.get(v)
            if group is None:
                continue
            if (group.pattern in ("elementwise",) + ANCHORED_PATTERNS
                    and group.domain == node.output.shape and v in group.open_values
                    and reads_at_identity(node, pos)):
                joinable[group.key] = group
            else:
                blocked.add(group.key)
        return list(joinable.values()), blocked

    # -- reductions ----------------------------------------------------------------------------
    def _add_reduction(self, node: Node) -> None:
        """A reduction absorbs the elementwise group producing its operand, as its body."""
        operand = node.inputs[0]
        group = self.group_of.get(operand)
        if (len(node.inputs) == 1 and group is not None and group.pattern == "elementwise"
                and operand in group.open_values and group.domain == operand.shape):
            group.pattern = "reduction"
            group.anchor = node
            group.domain = node.output.shape
            group.open_values = {node.output}
            self._attach(node, group)
            return
        self._new_group(node, "reduction", anchored=True)

    # -- library calls -------------------------------------------------------------------------
    def _add_library(self, node: Node) -> None:
        group = self._new_group(node, "library", anchored=True)
        if not get(node.op).transposed_operands:
            return
        for v in set(node.inputs):
            producer = self.group_of.get(v)
            if v is node.inputs[-1] and _stores_right_operand(node):
                continue
            if (producer is not None and producer.pattern == "elementwise" and len(producer.body) == 1
                    and swaps_last_two_axes(producer.body[0]) and v not in self.graph_outputs
                    and producer.body[0].inputs[0] not in self.literals
                    and all(u is node for u in self.users[v])):
                self._absorb_prologue(group, producer)

    def _absorb_prologue(self, group: _Group, producer: _Group) -> None:
        """Move the single transpose of `producer` (read only by `group`'s anchor) into `group`."""
        (transpose,) = producer.body
        group.body.append(transpose)
        self.group_of[transpose.output] = group
        for p in self.dag.predecessors(producer.key):
            self.dag.add_edge(p, group.key)
        self.dag.remove_node(producer.key)
        del self.groups[producer.key]

    # -- literals ------------------------------------------------------------------------------
    def _materialise_literals(self) -> None:
        """Literals read by an anchor, a view or a graph output become constant kernels."""
        needed = {v for v in self.graph.output_values if v in self.literals}
        for group in self.groups.values():
            if group.anchor is not None:
                needed.update(v for v in group.anchor.inputs if v in self.literals)
            if group.pattern == "view":
                needed.update(v for v in group.body[0].inputs if v in self.literals)
        for v in sorted(needed, key=lambda v: self.order[self.literals[v]]):
            self._new_group(self.literals.pop(v), "constant")
        for group in list(self.groups.values()):
            for m in group.members:
                self._attach(m, group)


def _shares_loop(a: _Group, b: _Group) -> bool:
    """May groups `a` and `b` run in one loop nest? Each may read the other only at identity,
    and only from epilogue or elementwise members (never from a body or an anchor)."""
    if a.domain != b.domain:
        return False
    for reader, source in ((a, b), (b, a)):
        produced = {v for m in source.members for v in m.outputs}
        readers = reader.epilogue if reader.anchored else reader.body
        for m in reader.members:
            for pos, v in enumerate(m.inputs):
                if v not in produced:
                    continue
                if m not in readers or v not in source.open_values or not reads_at_identity(m, pos):
                    return False
    return True


# -- rematerialisation -------------------------------------------------------------------------
# Weighted operations a kernel may spend per element recomputing other kernels' values. A store
# and a reload of a float32 array cost more than a dozen vectorised arithmetic operations; the
# code generators evaluate exp, tanh, sigmoid and erf as vectorised polynomials (a few times an
# arithmetic operation). GELU's tanh form recomputed from its pre-activation costs 11.
RECOMPUTE_BUDGET = 16
REMAT_CONSUMERS = ("elementwise", "reduction", "library")


def _elementwise(node: Node) -> bool:
    """Is `node` an elementwise primitive (not a scan, a literal or an index-mapping op)?"""
    return fusion_class(node) == "pointwise" and get(node.op).kind == ELEMENTWISE


def recompute_cost(node: Node) -> int:
    """Cost of evaluating elementwise `node` once more per element (its primitive says)."""
    return get(node.op).recompute_cost


class _Rematerialiser:
    """Chooses the values of one kernel that a kernel reading them computes again instead.

    Values are visited from the last to the first. A value qualifies when it is an elementwise
    member's (not an anchor's, not a graph output), and every other kernel reading it reads it
    at identity, in one section of its loop (an elementwise body, a reduction's body or
    epilogue, a library call's epilogue), and can compute it from values it loads anyway (its
    other inputs) and literals, through elementwise members of the producer read at identity,
    within RECOMPUTE_BUDGET in all. The producer then stops writing the value, and every reader
    stops loading it; a value recomputed earlier from it is recomputed further back.

    Then one load may replace several: when a kernel is the only other reader of two or more
    such values of one producer and all of them are computed from one value of that producer
    (exact GELU's x/2 and x/sqrt(2), both of the pre-activation x), it loads that value instead
    and computes them. The new load is one buffer for several, of the same size.
    """

    def __init__(self, partitioner: _Partitioner, groups: list[_Group]) -> None:
        self.partitioner = partitioner
        self.group_of_node = {m: g for g in groups for m in g.members}
        self.loads = {g.key: _external_reads(g) for g in groups}
        self.recompute: dict[int, set[Node]] = {}     # consumer group -> producer members it runs
        self.section: dict[int, str] = {}             # consumer group -> 'body' or 'epilogue'
        self.recomputed: set[tuple[int, Value]] = set()  # (consumer group, value) pairs
        self.new_loads: set[Value] = set()  # values a producer stores for recomputation only

    def run(self) -> None:
        self._recompute_from_loaded_values()
        self._share_one_load()

    def _commit(self, consumer: _Group, section: str, chain: set[Node], values: Iterable[Value]) -> None:
        self.recompute.setdefault(consumer.key, set()).update(chain)
        self.section[consumer.key] = section
        for value in values:
            self.loads[consumer.key].discard(value)
            self.recomputed.add((consumer.key, value))

    def _recompute_from_loaded_values(self) -> None:
        graph_outputs = self.partitioner.graph_outputs
        for node in reversed(self.partitioner.graph.nodes):
            group = self.group_of_node.get(node)
            if group is None or not _elementwise(node) or node.output in graph_outputs:
                continue
            consumers = self._consumers(node.output, group)
            if not consumers:
                continue
            chains = {}
            for consumer, section in consumers.items():
                chain = self._chain(node.output, group, consumer)
                if chain is None:
                    break
                chains[consumer] = (chain, section)
            else:
                for consumer, (chain, section) in chains.items():
                    self._commit(consumer, section, chain, [node.output])

    def _share_one_load(self) -> None:
        graph_outputs = self.partitioner.graph_outputs
        # (producer, its only other reader, the section reading) -> values still loaded
        shared: dict[tuple[_Group, _Group, str], list[Value]] = {}
        for node in self.partitioner.graph.nodes:
            producer = self.group_of_node.get(node)
            if producer is None or not _elementwise(node) or node.output in graph_outputs:
                continue
            consumers = self._consumers(node.output, producer)
            if len(consumers) == 1:
                ((consumer, section),) = consumers.items()
                if node.output in self.loads[consumer.key]:
                    shared.setdefault((producer, consumer, section), []).append(node.output)
        for (producer, consumer, section), values in shared.items():
            if len(values) < 2 or self.section.get(consumer.key, section) != section:
                continue
            cut = self._single_source(values, producer, consumer)
            if cut is not None:
                source, chain = cut
                self._commit(consumer, section, chain, values)
                self.loads[consumer.key].add(source)
                self.new_loads.add(source)

    def _single_source(self, values: list[Value], producer: _Group, consumer: _Group
                       ) -> tuple[Value, set[Node]] | None:
        """The one value of `producer` that `values` are computed from (with what `consumer`
        loads besides them and literals), and the members computing them; None when there are
        several or it would exceed the budget."""
        loads = self.loads[consumer.key] - set(values)
        literals = self.partitioner.literals
        chain: set[Node] = set()
        sources: set[Value] = set()
        pending = [v.producer for v in values]
        while pending:
            node = pending.pop()
            if node in chain:
                continue
            if not (self.group_of_node.get(node) is producer and _elementwise(node) and all(
                    v in literals or reads_at_identity(node, k) and (
                        v in loads or self.group_of_node.get(v.producer) is producer)
                    for k, v in enumerate(node.inputs))):
                sources.add(node.output)  # computed no further back than this in the consumer
                continue
            chain.add(node)
            pending.extend(v.producer for v in node.inputs if v not in literals and v not in loads)
        if len(sources) != 1:
            return None
        (source,) = sources
        stored_by = source.producer
        if self.group_of_node.get(stored_by) is not producer or not (
                stored_by is producer.anchor or _elementwise(stored_by)):
            return None
        already = self.recompute.get(consumer.key, set())
        if sum(recompute_cost(n) for n in chain | already) > RECOMPUTE_BUDGET:
            return None
        return source, chain

    def _consumers(self, value: Value, producer: _Group) -> dict[_Group, str]:
        """The groups reading `value` besides `producer`, each with the section of its loop that
        reads it; empty when one of them cannot compute it itself."""
        sections: dict[_Group, set[str]] = {}
        for user in self.partitioner.users.get(value, ()):
            group = self.group_of_node[user]
            if group is producer:
                continue
            if _pattern_of(group) not in REMAT_CONSUMERS or user is group.anchor:
                return {}
            if user in group.epilogue:
                section = "epilogue"
            elif group.pattern == "library":  # a transpose its call absorbed
                return {}
            else:
                section = "body"
            if not all(reads_at_identity(user, k) for k, v in enumerate(user.inputs) if v is value):
                return {}
            sections.setdefault(group, set()).add(section)
        result = {}
        for group, found in sections.items():
            # recomputed nodes run in one section: a reduction's body and epilogue are two loops
            section = found.pop()
            if found or self.section.get(group.key, section) != section:
                return {}
            result[group] = section
        return result

    def _chain(self, value: Value, producer: _Group, consumer: _Group) -> set[Node] | None:
        """Members of `producer` that `consumer` would run to compute `value` from what it loads
        anyway and literals, or None when that needs another load or exceeds the budget."""
        loads = self.loads[consumer.key] - {value}
        literals = self.partitioner.literals
        chain: set[Node] = set()
        pending = [value.producer]
        while pending:
            node = pending.pop()
            if node in chain:
                continue
            if self.group_of_node.get(node) is not producer or not _elementwise(node):
                return None
            chain.add(node)
            for k, v in enumerate(node.inputs):
                if v in literals:
                    continue
                if not reads_at_identity(node, k):
                    return None
                if v not in loads:
                    pending.append(v.producer)
        already = self.recompute.get(consumer.key, set())
        if sum(recompute_cost(n) for n in chain | already) > RECOMPUTE_BUDGET:
            return None
        return chain


def _external_reads(group: _Group) -> set[Value]:
    """The values `group`'s members read from outside it."""
    produced = {v for m in group.members for v in m.outputs}
    return {v for m in group.members for v in m.inputs if v not in produced}


# -- building the kernel graph ------------------------------------------------------------------
def _pattern_of(group: _Group) -> str:
    if group.pattern == "elementwise" and all(
            get(m.op).kind == SHAPE or get(m.op).indexed_load for m in group.body):
        return "shape"
    return group.pattern


def _kernel_name(index: int, pattern: str, members: list[Node]) -> str:
    ops: list[str] = []
    for m in members:
        if m.op not in ops and m.op != "constant":
            ops.append(m.op)
    return f"k{index}_{bounded_label(ops[:4]) if ops else pattern}"


class _KernelBuilder:
    """Turns finished groups into kernel nodes of a new graph."""

    def __init__(self, graph: Graph, partitioner: _Partitioner, remat: _Rematerialiser) -> None:
        self.graph = graph
        self.remat = remat
        self.group_of = partitioner.group_of
        self.literals = partitioner.literals
        self.order = partitioner.order
        self.out = Graph(graph.name)
        self.mapping: dict[Value, Value] = {}
        self.users = partitioner.users
        self.graph_outputs = partitioner.graph_outputs

    def build(self, groups: list[_Group]) -> Graph:
        for inp in self.graph.inputs:
            self.mapping[inp.value] = self.out.add_input(inp.value.type, inp.name, inp.role)
        for index, group in enumerate(groups):
            self._emit(index, group)
        for name, v in self.graph.outputs:
            self.out.add_output(name, self.mapping[v])
        return self.out

    def _members(self, group: _Group) -> list[Node]:
        """The group's members in evaluation order, with the nodes of other groups it computes
        again (rematerialisation) in the section of its loop that reads them."""
        def by_order(nodes: Iterable[Node]) -> list[Node]:
            return sorted(nodes, key=self.order.__getitem__)
        recompute = self.remat.recompute.get(group.key, set())
        body, epilogue = set(group.body), set(group.epilogue)
        (epilogue if self.remat.section.get(group.key) == "epilogue" else body).update(recompute)
        anchor = [group.anchor] if group.anchor is not None else []
        return by_order(body) + anchor + by_order(epilogue)

    def _is_output(self, value: Value, members: set[Node]) -> bool:
        """Is `value`, computed by `members`, a graph output or read by a kernel that does not
        compute it again?"""
        if value in self.graph_outputs or value in self.remat.new_loads:
            return True
        recomputed = self.remat.recomputed
        return any(u not in members and (self.group_of[u.outputs[0]].key, value) not in recomputed
                   for u in self.users.get(value, ()))

    def _emit(self, index: int, group: _Group) -> None:
        members = self._members(group)
        own = set(group.members)
        produced = {v for m in members for v in m.outputs}
        inputs, literals = [], []
        for m in members:
            for v in m.inputs:
                if v in produced or v in inputs or v in literals:
                    continue
                (literals if v in self.literals else inputs).append(v)
        outputs = [v for m in members if m in own for v in m.outputs if self._is_output(v, own)]
        if group.pattern == "library" and group.anchor.output not in outputs:
            # The library call writes its result whole before the epilogue reads it, so it
            # needs a buffer of its own (never one shared with an epilogue input).
            outputs.insert(0, group.anchor.output)
        pattern = _pattern_of(group)
        sub = Graph(_kernel_name(index, pattern, members))
        local = {v: sub.add_input(v.type, f"x{i}") for i, v in enumerate(inputs)}
        for v in literals:
            lit = self.literals[v]
            clone = Node(lit.op, (), lit.attrs, (v.type,), lit.loc)
            sub.nodes.append(clone)
            local[v] = clone.output
        for m in members:
            clone = m.clone(local[v] for v in m.inputs)
            sub.nodes.append(clone)
            local.update(zip(m.outputs, clone.outputs))
        for i, v in enumerate(outputs):
            sub.add_output(f"y{i}", local[v])
        kernel = Node(KERNEL_OP, tuple(self.mapping[v] for v in inputs),
                      {"name": sub.name, "pattern": pattern},
                      tuple(v.type for v in outputs), members[-1].loc, sub)
        self.out.nodes.append(kernel)
        self.mapping.update(zip(outputs, kernel.outputs))


def _live_nodes(graph: Graph) -> Graph:
    """`graph` without the nodes no output depends on (they would become dead kernels)."""
    needed = set(graph.output_values)
    live = []
    for node in reversed(graph.nodes):
        if any(v in needed for v in node.outputs):
            live.append(node)
            needed.update(node.inputs)
    if len(live) == len(graph.nodes):
        return graph
    pruned = Graph(graph.name)
    pruned.inputs, pruned.outputs = graph.inputs, graph.outputs
    pruned.nodes = live[::-1]
    return pruned


# A transpose that this many products or more read as their right operand (B) is stored once,
# whatever their size: a weight read at every step of an unrolled recurrence. numba-cpu computes
# large float32 products as tiles that fit OpenBLAS's small-matrix sgemm kernel, which reads
# only B untransposed (backends/numba_cpu/gemm.py): 64 x 128 by 128 x 512, one thread, 72.8 us
# against 98.5 us with B transposed, so 28 such products repay one 128 x 512 copy many times
# over (lstm-28, h @ W_hh.T at each step: one thread 11.3 -> 10.5 ms a training step, two
# threads 7.0 -> 6.6 ms).
SHARED_RIGHT_OPERAND_READERS = 3


# A float32 product of at least this many multiply-adds reads a transposed right operand stored,
# not absorbed, even alone: numba-cpu computes it in tiles for that small-matrix kernel, which
# takes B untransposed only. Every Linear's forward product (x @ W.T), one thread, alternated:
# transformer-m's step 64.1 -> 63.1 ms (its forward products 71-79 GFLOP/s transposed, 87-108
# untransposed), the MLP's (128 rows) 1.698 -> 1.687 ms. Below it, BLAS reads B transposed at no
# cost. The copy costs a pass over B whatever the rows of A, the product gains per row: so only
# from STORE_RIGHT_FROM_ROWS rows on. The MNIST CNN's fc layer (64 rows by a 9216 x 128 weight)
# stored it in 1.3 ms and gained 0.4 ms in its product; reading it transposed, its step at 2
# threads went 22.2 -> 21.5 ms (medians of 5 alternated runs).
STORE_RIGHT_FROM_MACS = 1 << 20
STORE_RIGHT_FROM_ROWS = 128


def _stores_right_operand(product: Node) -> bool:
    """Whether matrix product `product` reads its right operand faster stored than transposed."""
    a, b, out = product.inputs[0].type, product.inputs[1].type, product.output.type
    if out.dtype != "float32" or len(a.shape) < 2:
        return False
    # a weight (2-D B) multiplies every row of a batched A: the rows of all its matrices
    rows = math.prod(a.shape[:-1]) if len(b.shape) == 2 else a.shape[-2]
    return rows >= STORE_RIGHT_FROM_ROWS and rows * a.shape[-1] * out.shape[-1] >= STORE_RIGHT_FROM_MACS


def _transpose_per_product(graph: Graph) -> Graph:
    """`graph` where a transpose of the last two axes read only by matrix products, several of
    them, is read by each through a copy of its own: each product then absorbs its copy (BLAS
    reads the operand transposed for free) instead of all of them reading one materialised
    transpose (x.T of a 1792 x 512 float32 x read by two products: a 0.4-2.9 ms copy). One that
    SHARED_RIGHT_OPERAND_READERS products or more read as B, or a product that stores its B
    (`_stores_right_operand`), stays one stored transpose."""
    users = graph.users()
    outputs = set(graph.output_values)

    def shared_transpose(node: Node) -> bool:
        if not swaps_last_two_axes(node):  # first: other nodes may have several outputs (scan)
            return False
        readers = set(users.get(node.output, []))
        source = node.inputs[0].producer if node.inputs else None
        # (a scan reading it is no registered op: it keeps the one transpose)
        if not all(u.op in PRIMITIVES and get(u.op).transposed_operands for u in readers):
            return False
        # a product reading it as B that would store its copy anyway gains nothing from one
        right = [u for u in readers if len(u.inputs) > 1 and u.inputs[-1] is node.output]
        return (node.output not in outputs and len(readers) > 1
                and len(right) < SHARED_RIGHT_OPERAND_READERS
                and not any(_stores_right_operand(u) for u in right)
                and not (source is not None and is_literal(source)))

    shared = {node.output: node for node in graph.nodes if shared_transpose(node)}
    if not shared:
        return graph
    copied = Graph(graph.name)
    copied.inputs = graph.inputs
    renamed: dict[Value, Value] = {}
    moved = set(shared.values())
    for node in graph.nodes:
        if node in moved:
            continue
        inputs = [renamed.get(v, v) for v in node.inputs]
        for v in dict.fromkeys(node.inputs):
            if v in shared:
                transpose = shared[v].clone([renamed.get(u, u) for u in shared[v].inputs])
                copied.nodes.append(transpose)
                inputs = [transpose.output if u is v else w for u, w in zip(node.inputs, inputs)]
        if any(new is not old for new, old in zip(inputs, node.inputs)):
            clone = node.clone(inputs)
            renamed.update(zip(node.outputs, clone.outputs))
            node = clone
        copied.nodes.append(node)
    copied.outputs = [(name, renamed.get(v, v)) for name, v in graph.outputs]
    return copied


def fuse(graph: Graph, rematerialise: bool = True) -> Graph:
    """Partition `graph` (primitive nodes) into kernel nodes; see the module docstring.
    `rematerialise=False` stores every value read by another kernel instead of recomputing
    cheap ones there."""
    if any(node.op == KERNEL_OP for node in graph.nodes):
        raise ValueError(f"fuse: graph {graph.name!r} is already fused")
    graph = _transpose_per_product(_live_nodes(graph))
    partitioner = _Partitioner(graph)
    groups = partitioner.run()
    remat = _Rematerialiser(partitioner, groups)
    if rematerialise:
        remat.run()
    return _KernelBuilder(graph, partitioner, remat).build(groups)


# -- queries used by memory planning and the backends -----------------------------------------
def anchor_index(kernel: Node) -> int | None:
    """Position of the reduction/library node in a kernel's subgraph (None if it has none)."""
    for i, node in enumerate(kernel.subgraph.nodes):
        if fusion_class(node) in ANCHORED_PATTERNS:
            return i
    return None


def inplace_pairs(kernel: Node) -> set[tuple[int, int]]:
    """(input position, output position) pairs that may share one buffer: every read of the
    input's element i that follows the first write of the output happens in the loop iteration
    writing the output's element i, before that write. True for inputs that elementwise or
    epilogue members read at identity, for outputs written by the epilogue (or the reduced
    value). A library call may read the input too: it completes before the epilogue writes."""
    pattern = kernel.attrs["pattern"]
    if pattern not in ("elementwise", "shape", "reduction", "library"):
        return set()
    sub = kernel.subgraph
    anchor_at = anchor_index(kernel)
    readers = sub.nodes if anchor_at is None else sub.nodes[anchor_at + 1:]
    writers = set(readers) | ({sub.nodes[anchor_at]} if pattern == "reduction" else set())
    early = set(sub.nodes[:anchor_at + 1]) if pattern == "library" else set()
    pairs = set()
    for p, value in enumerate(sub.input_values):
        uses = [(n, k) for n in sub.nodes for k, v in enumerate(n.inputs) if v is value]
        late = [(n, k) for n, k in uses if n not in early]
        if not uses or not all(n in readers and reads_at_identity(n, k) for n, k in late):
            continue
        pairs.update((p, q) for q, out in enumerate(sub.output_values)
                     if out.producer in writers and out.shape == value.shape)
    return pairs
