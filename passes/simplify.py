"""`simplify`: constant folding, algebraic identities, transposed products, transposes moved
across slices, sums of matrix products stacked into one product, CSE and DCE.

Identities are rewrite rules kept as data: (op, rule) pairs, where a rule looks at a node's
(already rewritten) operands and returns the value that replaces the node, or None.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphc.ir import Builder, Graph, Node, TensorType, Value
from graphc.ir.interpret import run_node
from graphc.ir.ops.control import SCAN_OP, make_scan
from graphc.ir.registry import SOURCE, get

FOLD_LIMIT = 1 << 16  # elements: larger constants stay computed, the graph stays small


def constant_of(v: Value) -> np.ndarray | None:
    node = v.producer
    return node.attrs["value"] if node is not None and node.op == "constant" else None


def _is_const(v: Value, number: float) -> bool:
    """Whether `v` is `number` everywhere: a constant, or one broadcast (a zero accumulator of a
    weight's gradient, too large to fold, that a scan's hoisted sum adds to)."""
    while v.producer is not None and v.producer.op == "broadcast_to":
        v = v.producer.inputs[0]
    c = constant_of(v)
    return c is not None and c.size > 0 and bool(np.all(c == number))


def _keeps_type(x: Value, node: Node) -> bool:
    """Replacing `node` by operand `x` is only sound when types agree (no broadcast lost)."""
    return x.type == node.output.type


Rule = Callable[[Node, tuple[Value, ...]], Value | None]


def _identity_operand(pos: int, number: float, other: int) -> Rule:
    """op(..x.., c) -> x when the operand at `pos` is the constant `number`."""
    def rule(node: Node, ins: tuple[Value, ...]) -> Value | None:
        x = ins[other]
        return x if _is_const(ins[pos], number) and _keeps_type(x, node) else None
    return rule


def _same_type_noop(node: Node, ins: tuple[Value, ...]) -> Value | None:
    return ins[0] if _keeps_type(ins[0], node) else None


def _inverse_of(op: str) -> Rule:
    def rule(node: Node, ins: tuple[Value, ...]) -> Value | None:
        inner = ins[0].producer
        return inner.inputs[0] if inner is not None and inner.op == op else None
    return rule


def _identity_transpose(node: Node, ins: tuple[Value, ...]) -> Value | None:
    return ins[0] if node.attrs["perm"] == tuple(range(len(node.attrs["perm"]))) else None


def _compose_transposes(node: Node, ins: tuple[Value, ...]) -> Value | None:
    """transpose(transpose(x, p), q) -> x when the composed permutation is the identity."""
    inner = ins[0].producer
    if inner is None or inner.op != "transpose":
        return None
    composed = tuple(inner.attrs["perm"][i] for i in node.attrs["perm"])
    return inner.inputs[0] if composed == tuple(range(len(composed))) else None


def _reshape_back(node: Node, ins: tuple[Value, ...]) -> Value | None:
    """reshape(reshape(x, s), x.shape) -> x, and so for the reshapes that expand_dims and
    squeeze are."""
    inner = ins[0].producer
    if (inner is not None and inner.op in ("reshape", "expand_dims", "squeeze")
            and _keeps_type(inner.inputs[0], node)):
        return inner.inputs[0]
    return None


def _slice_of_concatenate(node: Node, ins: tuple[Value, ...]) -> Value | None:
    """slice(concatenate(a, b, ...; axis), exactly b's span along axis) -> b: a gradient sums
    the cotangents of slices of one value into a concatenate, which the VJP of the sliced op
    slices apart again (a `moments` output's mean and variance)."""
    inner = ins[0].producer
    if inner is None or inner.op != "concatenate":
        return None
    axis, start = inner.attrs["axis"], 0
    if any(step != 1 for step in node.attrs["steps"]):
        return None
    for part in inner.inputs:
        stop = start + part.shape[axis]
        if node.attrs["starts"][axis] == start and node.attrs["stops"][axis] == stop:
            return part if _keeps_type(part, node) else None
        start = stop
    return None


# x + 0 is x but for x = -0.0 (the sum is +0.0): taken as x, as the zeros autodiff starts its
# sums from must go (the sign of a zero sum is the one IEEE result these rules do not keep).
RULES: list[tuple[str, Rule]] = [
    ("add", _identity_operand(1, 0, other=0)),
    ("add", _identity_operand(0, 0, other=1)),
    ("sub", _identity_operand(1, 0, other=0)),
    ("mul", _identity_operand(1, 1, other=0)),
    ("mul", _identity_operand(0, 1, other=1)),
    ("div", _identity_operand(1, 1, other=0)),
    ("pow", _identity_operand(1, 1, other=0)),
    ("neg", _inverse_of("neg")),
    ("reshape", _same_type_noop),
    ("reshape", _reshape_back),
    ("broadcast_to", _same_type_noop),
    ("slice", _slice_of_concatenate),
    ("slice_grad", _same_type_noop),  # scattering into zeros of its own shape: all of it
    ("cast", _same_type_noop),
    ("sum", lambda node, ins: ins[0] if node.attrs["axes"] == () and _keeps_type(ins[0], node) else None),
    ("transpose", _identity_transpose),
    ("transpose", _compose_transposes),
]
RULES_BY_OP: dict[str, list[Rule]] = {}
for _op, _rule in RULES:
    RULES_BY_OP.setdefault(_op, []).append(_rule)


def attrs_key(attrs: dict) -> tuple:
    """`attrs` as a hashable key (arrays by dtype, shape and bytes): equal keys, equal attributes."""
    return tuple((k, (v.dtype.name, v.shape, v.tobytes()) if isinstance(v, np.ndarray) else v)
                 for k, v in sorted(attrs.items()))


def _rebuild(graph: Graph, rewrite: Callable[[Builder, Node, tuple[Value, ...]], Value | None],
             on_clone: Callable[[Node], None] | None = None,
             body: Callable[[Graph], Graph] | None = None) -> Graph:
    """Copy `graph` node by node; `rewrite` may return a replacement for a node's output.
    `on_clone` sees every primitive node that is kept; `body`, when given, rewrites each scan's
    body graph."""
    new = Graph(graph.name)
    b = Builder(new)
    mapping = {i.value: new.add_input(i.value.type, i.name, i.role) for i in graph.inputs}
    for node in graph.nodes:
        ins = tuple(mapping[v] for v in node.inputs)
        b.at(node)
        replacement = rewrite(b, node, ins) if node.subgraph is None else None
        if replacement is None:
            subgraph = body(node.subgraph) if body is not None and node.op == SCAN_OP else node.subgraph
            clone = Node(node.op, ins, node.attrs, tuple(v.type for v in node.outputs), node.loc,
                         subgraph, node.module)
            new.nodes.append(clone)
            mapping.update(zip(node.outputs, clone.outputs))
            if on_clone is not None and node.subgraph is None:
                on_clone(clone)
        else:
            mapping[node.output] = replacement
    new.outputs = [(n, mapping[v]) for n, v in graph.outputs]
    return new


def rebuild_scans(graph: Graph,
                  rewrite: Callable[[Builder, Node, list[Value]], dict[Value, Value] | None]) -> Graph:
    """Copy `graph` node by node; for each scan node `rewrite(b, scan, operands)` may emit its
    replacement through `b` and return the new value of each of the scan's outputs still read
    (None: the scan is copied as it is)."""
    new = Graph(graph.name)
    b = Builder(new)
    mapping = {i.value: new.add_input(i.value.type, i.name, i.role) for i in graph.inputs}
    for node in graph.nodes:
        ins = [mapping[v] for v in node.inputs]
        b.at(node)
        replaced = rewrite(b, node, ins) if node.op == SCAN_OP else None
        if replaced is None:
            clone = node.clone(ins)
            new.nodes.append(clone)
            mapping.update(zip(node.outputs, clone.outputs))
        else:
            mapping.update(replaced)
    new.outputs = [(n, mapping[v]) for n, v in graph.outputs]
    return new


def fold_constants(graph: Graph) -> Graph:
    """Evaluate nodes whose operands are all small constants; apply the identity rules."""
    def rewrite(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
        prim = get(node.op)
        constants = [constant_of(v) for v in ins]
        # Fold only what does not grow: a broadcast constant stays a cheap scalar broadcast.
        if (prim.kind != SOURCE and ins and all(c is not None for c in constants)
                and node.output.type.size <= min(FOLD_LIMIT, max(c.size for c in constants))):
            probe = Node(node.op, ins, node.attrs, (node.output.type,), node.loc)  # errors name the line
            (value,) = run_node(probe, constants)
            return b.const(value, node.output.dtype)
        for rule in RULES_BY_OP.get(node.op, ()):
            probe = Node(node.op, ins, node.attrs, (node.output.type,))
            replacement = rule(probe, ins)
            if replacement is not None:
                return replacement
        return None
    return _rebuild(graph, rewrite)


def cse(graph: Graph) -> Graph:
    """Common-subexpression elimination: identical (op, operands, attrs) compute once.

    Random ops are deterministic functions of their key and stream, so they merge too."""
    seen: dict[tuple, Value] = {}

    def key(node: Node, ins: tuple[Value, ...]) -> tuple:
        return (node.op, tuple(id(v) for v in ins), attrs_key(node.attrs))

    def rewrite(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
        return seen.get(key(node, ins))

    def on_clone(clone: Node) -> None:
        seen.setdefault(key(clone, clone.inputs), clone.output)

    return _rebuild(graph, rewrite, on_clone)


def dce(graph: Graph) -> Graph:
    """Dead-code elimination: keep only nodes some output depends on (in place order)."""
    live = set(graph.output_values)
    kept = []
    for node in reversed(graph.nodes):
        if any(v in live for v in node.outputs):
            kept.append(node)
            live.update(node.inputs)
    new = Graph(graph.name)
    new.inputs = list(graph.inputs)
    new.nodes = kept[::-1]
    new.outputs = list(graph.outputs)
    return new


def _swap_last_two(rank: int) -> tuple[int, ...]:
    return (*range(rank - 2), rank - 1, rank - 2)


def transpose_products(graph: Graph) -> Graph:
    """transpose(a @ b) -> b.T @ a.T (last two axes) when nothing else reads a @ b.

    The matmul kernel reads transposed operands in place (BLAS flags), while a transpose of
    its result is a strided copy, or worse, a strided read in every kernel that consumes it:
    the gradient of a weight stored (out, in) comes out of autodiff as transpose(x.T @ dy),
    and the optimizer update that read it ran 5x slower than a contiguous one."""
    uses = {v: len(nodes) for v, nodes in graph.users().items()}
    for v in graph.output_values:
        uses[v] = uses.get(v, 0) + 1

    def swapped(b: Builder, v: Value) -> Value:
        inner = v.producer
        perm = _swap_last_two(len(v.shape))
        if inner is not None and inner.op == "transpose" and inner.attrs["perm"] == perm:
            return inner.inputs[0]
        return b.transpose(v, perm=perm)

    def rewrite(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
        product = ins[0].producer if node.op == "transpose" else None
        if product is None or product.op != "matmul" or uses[node.inputs[0]] != 1:
            return None
        x, y = product.inputs
        if min(len(x.shape), len(y.shape)) < 2 or node.attrs["perm"] != _swap_last_two(len(node.output.shape)):
            return None
        return b.matmul(swapped(b, y), swapped(b, x))
    return _rebuild(graph, rewrite)


def _permuted(values: tuple[int, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
    """`values` given per axis of transpose(x, perm), per axis of x instead."""
    result = [0] * len(perm)
    for axis, value in zip(perm, values):
        result[axis] = value
    return tuple(result)


class DerivedAttrs(dict):
    """Attributes a rewrite computed from other nodes' attributes: `derive(*sources)` (keyword
    arguments of the op) gave them. Rebatching (passes/rebatch.py) applies `derive` to the
    sources' attributes at the new batch size, as the rewrite would have: the attributes of a
    derived node name extents it could not otherwise tell from other ints."""

    __slots__ = ("derive", "sources")

    def __init__(self, attrs: dict[str, Any], derive: Callable[..., dict[str, Any]],
                 sources: tuple[dict[str, Any], ...]) -> None:
        super().__init__(attrs)
        self.derive, self.sources = derive, sources


def derived(b: Builder, op: str, operands: tuple[Value, ...], derive: Callable[..., dict[str, Any]],
            *sources: dict[str, Any]) -> Value:
    """`op(*operands, **derive(*sources))` emitted through `b` (`sources` are attribute dicts of
    other nodes), its attributes remembering how they were derived (DerivedAttrs)."""
    node = b.bind(op, *operands, **derive(*sources)).producer
    node.attrs = DerivedAttrs(node.attrs, derive, sources)  # a node of our own, not yet read
    return node.output


def _same_perm(transpose: dict[str, Any]) -> dict[str, Any]:
    return {"perm": transpose["perm"]}


def _slice_under_transpose(slice_: dict[str, Any], transpose: dict[str, Any]) -> dict[str, Any]:
    """The bounds of slice(transpose(x, p)) per axis of x."""
    perm = transpose["perm"]
    return {key: _permuted(slice_[key], perm) for key in ("starts", "stops", "steps")}


def _slice_grad_over_transpose(transpose: dict[str, Any], slice_grad: dict[str, Any]) -> dict[str, Any]:
    """The attributes of transpose(slice_grad(g), p) as a slice_grad of transpose(g, p)."""
    perm = transpose["perm"]
    return {key: tuple(slice_grad[key][axis] for axis in perm)
            for key in ("shape", "starts", "stops", "steps")}


def _slice_of_transpose(b: Builder, node: Node, transposed: Node) -> Value | None:
    """slice(transpose(x, p)) -> transpose(slice(x), p): the transpose moves the slice only.
    A batch-first LSTM's out[:, -1] transposed the whole (T, N, H) stack of its scan to keep
    one step of it."""
    if node.output.type.size >= transposed.output.type.size:
        return None
    part = derived(b, "slice", transposed.inputs[:1], _slice_under_transpose, node.attrs, transposed.attrs)
    return derived(b, "transpose", (part,), _same_perm, transposed.attrs)


def _transpose_of_slice_grad(b: Builder, node: Node, scattered: Node) -> Value | None:
    """transpose(slice_grad(g), p) -> slice_grad(transpose(g, p)): zeros are written once,
    already transposed, and only g moves (the gradient of out[:, -1] above was a zero-filled
    (N, T, H) array, transposed whole to (T, N, H))."""
    moved = derived(b, "transpose", scattered.inputs[:1], _same_perm, node.attrs)
    return derived(b, "slice_grad", (moved,), _slice_grad_over_transpose, node.attrs, scattered.attrs)


# (op, op of its operand): a rewrite of the two that moves a transpose to the smaller side of a
# slice or a slice's gradient. Applied only where the operand has no other reader, so the
# larger transpose goes.
TRANSPOSE_MOVES: dict[tuple[str, str], Callable[[Builder, Node, Node], Value | None]] = {
    ("slice", "transpose"): _slice_of_transpose,
    ("transpose", "slice_grad"): _transpose_of_slice_grad,
}


def _slice_between_inverse_transposes(b: Builder, node: Node, sliced: Node) -> Value | None:
    """transpose(slice(transpose(x, p)), q) -> slice(x) where q undoes p, whatever else reads
    the inner transpose: the backward loop of a folded recurrent step reads W_hh as the
    transposed slice of the transposed [W_ih, W_hh, b], copied twice a call."""
    inner = sliced.inputs[0].producer
    if inner is None or inner.op != "transpose":
        return None
    perm, undo = inner.attrs["perm"], node.attrs["perm"]
    if tuple(perm[axis] for axis in undo) != tuple(range(len(perm))):
        return None
    return derived(b, "slice", inner.inputs[:1], _slice_under_transpose, sliced.attrs, inner.attrs)


def move_transposes(graph: Graph) -> Graph:
    """Apply TRANSPOSE_MOVES where the inner node's result is read by the outer node alone, and
    drop transposes that undo each other around a slice."""
    pairs = {*TRANSPOSE_MOVES, ("transpose", "slice")}
    if not any((node.op, v.producer.op) in pairs
               for node in graph.nodes for v in node.inputs[:1] if v.producer is not None):
        return graph
    uses = {v: len(nodes) for v, nodes in graph.users().items()}
    for v in graph.output_values:
        uses[v] = uses.get(v, 0) + 1

    def rewrite(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
        inner = ins[0].producer if ins else None
        if inner is not None and (node.op, inner.op) == ("transpose", "slice"):
            return _slice_between_inverse_transposes(b, node, inner)
        move = TRANSPOSE_MOVES.get((node.op, inner.op)) if inner is not None else None
        if move is None or uses[node.inputs[0]] != 1:
            return None
        return move(b, Node(node.op, ins, node.attrs, (node.output.type,)), inner)
    return _rebuild(graph, rewrite)


def _matrix_product(node: Node | None) -> bool:
    return (node is not None and node.op == "matmul"
            and all(len(v.shape) == 2 for v in (*node.inputs, node.output)))


def stack_products(graph: Graph) -> Graph:
    """a_1.T @ b_1 + a_2.T @ b_2 + ... -> concatenate(a_i).T @ concatenate(b_i) (along axis 0) for
    a tree of 3 or more matrix products of one type summed by adds, each product and partial sum
    read by the tree alone. An unrolled recurrence's weight gradient is one product per step
    (an LSTM's W_hh: h_{t-1}.T @ g_t, contracting over the batch) and an add per step; stacked,
    one deep product replaces the kernels of both (lstm-28: 28 products of depth 64 and 27 adds
    become one product of depth 1792). Sums are reassociated, as BLAS does within a product."""
    if not any(_matrix_product(node) for node in graph.nodes):
        return graph
    readers = graph.users()
    uses = {v: len(nodes) for v, nodes in readers.items()}
    for v in graph.output_values:
        uses[v] = uses.get(v, 0) + 1
    # an add whose result is summed further on in the same tree: only the tree's root is rewritten
    inner_sums = {node.output for node in graph.nodes if node.op == "add" and uses.get(node.output) == 1
                  and node.output in readers and readers[node.output][0].op == "add"
                  and readers[node.output][0].output.type == node.output.type}

    def summed(old: tuple[Value, ...], new: tuple[Value, ...], sum_type: TensorType) -> list[Node] | None:
        """The products summed by the tree over `old`, in order, as nodes of the graph being
        built (where `new` are `old`), or None where the tree holds anything else. A loop, not
        a recursion: an unrolled recurrence of 400 steps sums 400 products."""
        products: list[Node] = []
        pending = list(zip(reversed(old), reversed(new)))  # the first operand on top
        while pending:
            value, built_value = pending.pop()
            node, built = value.producer, built_value.producer
            if node is None or built is None or built.op != node.op or value.type != sum_type:
                return None
            if node.op == "add" and value in inner_sums:
                pending.extend(zip(reversed(node.inputs), reversed(built.inputs)))
            elif _matrix_product(node) and uses[value] == 1:
                products.append(built)
            else:
                return None
        return products

    def untransposed(b: Builder, v: Value) -> Value:
        inner = v.producer
        if inner is not None and inner.op == "transpose" and inner.attrs["perm"] == (1, 0):
            return inner.inputs[0]
        return b.transpose(v, perm=(1, 0))

    def rewrite(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
        if node.op != "add" or node.output in inner_sums:
            return None
        products = summed(node.inputs, ins, node.output.type)
        if products is None or len(products) < 3:
            return None
        # (a product with a zero operand stays: 0 @ W is NaN where W holds a NaN, as PyTorch's)
        lhs = b.concatenate(*(untransposed(b, p.inputs[0]) for p in products), axis=0)
        rhs = b.concatenate(*(p.inputs[1] for p in products), axis=0)
        return b.matmul(b.transpose(lhs, perm=(1, 0)), rhs)
    return _rebuild(graph, rewrite)


def sliced_products(graph: Graph) -> Graph:
    """slice(a @ b) taking some columns of every row -> a @ slice(b): the product computes only
    the columns read. The VJP of [x_t, h] @ w in a folded recurrent step computes the
    cotangent of the whole concatenation and slices h's part out; the input's part, a fifth of
    the product for lstm-28, is never read. Run on scan bodies only, where `b` is a weight
    hoisted with its slice out of the loop: the new slice's bounds name the contraction's extent,
    which rebatching (passes/rebatch.py) could not derive from the old slice's."""
    users = graph.users()

    def rewrite(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
        product = node.inputs[0].producer if node.op == "slice" else None
        if (product is None or product.op != "matmul"
                or len(users[node.inputs[0]]) != 1 or node.inputs[0] in graph.output_values
                or any(len(v.shape) != 2 for v in product.inputs)
                or node.output.shape[0] != product.output.shape[0]):
            return None
        a, right = ins[0].producer.inputs
        _, start = node.attrs["starts"]
        _, stop = node.attrs["stops"]
        _, step = node.attrs["steps"]
        columns = b.slice(right, starts=(0, start), stops=(right.shape[0], stop), steps=(1, step))
        return b.matmul(a, columns)
    return _rebuild(graph, rewrite)


def simplify_bodies(graph: Graph) -> Graph:
    """Simplify each scan's body on its own: its inputs and outputs stay as they are (the scan
    node's operands and results), the nodes between them are folded, merged and pruned, and
    products of which only some columns are read compute those (`sliced_products`). The scan
    node itself is never merged or folded by the passes above (they skip nodes holding a
    subgraph), and DCE keeps it while any of its results is read."""
    if not any(node.op == SCAN_OP for node in graph.nodes):
        return graph
    return _rebuild(graph, lambda b, node, ins: None, body=lambda body: simplify(sliced_products(body)))


def prune_scans(graph: Graph) -> Graph:
    """Drop the per-step outputs of scans that nothing reads, then the body's nodes computing
    only them, then the stacked and loop-invariant operands the body no longer reads. (The
    carry stays whole: each step reads what the last one wrote.)"""
    read = set(graph.output_values) | {v for node in graph.nodes for v in node.inputs}
    if not any(node.op == SCAN_OP and (any(v not in read for v in node.outputs[node.attrs["num_carry"]:])
                                       or _unread_operands(node.subgraph, node))
               for node in graph.nodes):
        return graph
    def pruned(b: Builder, node: Node, ins: list[Value]) -> dict[Value, Value]:
        a, k = node.attrs, node.attrs["num_carry"]
        kept_outputs = [q for q, v in enumerate(node.outputs) if q < k or v in read]
        if not any(node.outputs[q] in read for q in kept_outputs):
            return {}  # a dead scan
        body = node.subgraph.copy()
        body.outputs = [body.outputs[q] for q in kept_outputs]
        body = dce(body)
        unread = _unread_operands(body, node)
        body.inputs = [inp for p, inp in enumerate(body.inputs) if p not in unread]
        consts = a["num_consts"] - sum(p < a["num_consts"] for p in unread)
        clone = make_scan([v for p, v in enumerate(ins) if p not in unread], body, a["length"],
                          a["reverse"], consts, k, node.loc, node.module)
        b.graph.nodes.append(clone)
        return dict(zip([node.outputs[q] for q in kept_outputs], clone.outputs))
    return rebuild_scans(graph, pruned)


def _unread_operands(body: Graph, node: Node) -> set[int]:
    """Positions of the consts and stacked inputs of scan `node` that `body` never reads."""
    read = set(body.output_values) | {v for n in body.nodes for v in n.inputs}
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    return {p for p, v in enumerate(body.input_values) if not c <= p < c + k and v not in read}


def hoist_invariants(graph: Graph) -> Graph:
    """Move the nodes of each scan's body that read only loop-invariant operands (and
    constants) out of the loop: computed once before it, they enter the body as new
    loop-invariant operands. A weight's transpose in a gradient's body is computed once, not at
    every step."""
    if not any(node.op == SCAN_OP and _invariant_nodes(node) for node in graph.nodes):
        return graph
    def hoisted(b: Builder, node: Node, ins: list[Value]) -> dict[Value, Value] | None:
        nodes = _invariant_nodes(node)
        if not nodes:
            return None
        clone = _hoisted_scan(b, node, ins, nodes)
        b.graph.nodes.append(clone)
        return dict(zip(node.outputs, clone.outputs))
    return rebuild_scans(graph, hoisted)


def _invariant_nodes(scan: Node) -> list[Node]:
    """The body nodes of `scan` computed from its loop-invariant operands and constants only."""
    body = scan.subgraph
    invariant = set(body.input_values[:scan.attrs["num_consts"]])
    found = []
    for node in body.nodes:
        if node.op == "constant":
            invariant.update(node.outputs)
        elif node.inputs and node.op != SCAN_OP and all(v in invariant for v in node.inputs):
            invariant.update(node.outputs)
            found.append(node)
    return found


def _hoisted_scan(b: Builder, scan: Node, ins: list[Value], hoisted: list[Node]) -> Node:
    """Emit `hoisted` (nodes of `scan`'s body) through `b` before the loop; returns the scan
    (not yet appended) reading their results as loop-invariant operands."""
    body = scan.subgraph
    c = scan.attrs["num_consts"]
    moved = set(hoisted)
    constants = {v for n in hoisted for v in n.inputs if v.producer is not None and v.producer.op == "constant"}
    outer = dict(zip(body.input_values[:c], ins[:c]))
    for node in body.nodes:
        if node in moved or node.op == "constant" and node.output in constants:
            clone = node.clone(outer[v] for v in node.inputs)
            b.graph.nodes.append(clone)
            outer.update(zip(node.outputs, clone.outputs))
    kept = [n for n in body.nodes if n not in moved]
    read = {v for n in kept for v in n.inputs} | set(body.output_values)
    crossing = [v for n in hoisted for v in n.outputs if v in read]

    new_body = Graph(body.name)
    mapping = {inp.value: new_body.add_input(inp.value.type, inp.name, inp.role) for inp in body.inputs[:c]}
    taken = {inp.name for inp in body.inputs}
    for v in crossing:
        name = next(f"hoisted{i}" for i in range(len(taken) + 1) if f"hoisted{i}" not in taken)
        taken.add(name)
        mapping[v] = new_body.add_input(v.type, name)
    mapping.update({inp.value: new_body.add_input(inp.value.type, inp.name, inp.role)
                    for inp in body.inputs[c:]})
    for node in kept:
        clone = node.clone(mapping[v] for v in node.inputs)
        new_body.nodes.append(clone)
        mapping.update(zip(node.outputs, clone.outputs))
    new_body.outputs = [(n, mapping[v]) for n, v in body.outputs]
    a = scan.attrs
    operands = [*ins[:c], *(outer[v] for v in crossing), *ins[c:]]
    return make_scan(operands, dce(new_body), a["length"], a["reverse"], c + len(crossing),
                     a["num_carry"], scan.loc, scan.module)


def simplify(graph: Graph) -> Graph:
    """Fold and rewrite to a fixed point (bounded), then CSE and DCE; scan bodies likewise. A
    scan's last step is read as its final carry, and scans lose the outputs nothing reads,
    compute their loop invariants once and sum their per-step matrix products after the loop
    (passes/scan_rewrites.py)."""
    from .scan_rewrites import hoist_accumulations, last_steps_from_carries
    graph = prune_scans(last_steps_from_carries(graph))
    graph = hoist_accumulations(hoist_invariants(simplify_bodies(graph)))
    for _ in range(4):
        before = len(graph.nodes)
        # pruning follows DCE: a scan's stacked output read only by dead nodes goes too
        graph = prune_scans(dce(cse(stack_products(move_transposes(transpose_products(fold_constants(graph)))))))
        if len(graph.nodes) == before:
            break
    return graph
