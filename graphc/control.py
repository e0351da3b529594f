"""`gc.scan`: a loop traced once into a body graph, with JAX's `lax.scan` semantics.

    def scan(f, init, xs):        # what it computes, step by step
        carry, ys = init, []
        for x in xs:              # xs[0], xs[1], ... (from the end with reverse=True)
            carry, y = f(carry, x)
            ys.append(y)
        return carry, stack(ys)

`f` runs once, on tensors standing for one step's carry and slices: whatever it computes from
them becomes the body of one `scan` node (ir/ops/control.py), so the graph, and the time to
compile it, do not grow with the number of steps. What `f` computes from other tensors only
(weights, their transposes, constants) does not change from step to step: it stays outside
the loop, computed once, and enters the body as a loop-invariant operand.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from graphc.ir import GraphcError, Value
from graphc.ir.errors import user_location
from graphc.ir.graph import Graph, GraphInput, Node
from graphc.ir.ops.control import make_scan
from graphc.tree import flatten, unflatten

from .tensor import Tensor, as_tensor, current_trace, is_tracing

_LITERAL = "constant"  # one-element constants are copied into the body rather than passed in


def scan(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any = None,
         length: int | None = None, reverse: bool = False) -> tuple[Any, Any]:
    """Loop `f(carry, x) -> (carry, y)` over the leading axis of `xs`, as `jax.lax.scan`.

    `init` and `xs` are pytrees (tuples, lists, dicts) of tensors; every leaf of `xs` is sliced
    along its leading axis, whose size is the trip count (`length`, required when `xs` is None).
    `f` must return a carry of `init`'s structure and types, and `y` a pytree of tensors (or
    None). Returns the last carry and the `y`s stacked along a new leading axis. With
    `reverse=True` the steps run from the last slice to the first (ys stay in slice order).

    Called outside a traced function, it traces and runs one on the reference backend.
    """
    if not is_tracing():
        from .api import jit
        staged = jit(lambda i, x: scan(f, i, x, length, reverse), backend="reference")
        staged.name = f"scan_{getattr(f, '__name__', 'f')}"
        return staged(init, xs)
    where = user_location()
    at = f" (at {where})" if where else ""
    init_leaves, _, init_tree = flatten(init)
    init_values = [as_tensor(leaf).value for leaf in init_leaves]
    x_leaves, x_paths, x_tree = flatten(xs)
    x_values = [as_tensor(leaf).value for leaf in x_leaves]
    steps = _trip_count(x_values, x_paths, length, at)

    t = current_trace()
    graph = t.builder.graph
    carry_in = [Value(v.type) for v in init_values]
    x_in = [Value(v.type.with_shape(v.shape[1:])) for v in x_values]
    first_node, first_stream = len(graph.nodes), t.next_stream
    updates = _identities(t.buffer_updates)
    t.scan_bodies.append((first_node, set(carry_in) | set(x_in)))
    try:
        result = f(unflatten(init_tree, [Tensor(v) for v in carry_in]),
                   unflatten(x_tree, [Tensor(v) for v in x_in]))
    finally:
        t.scan_bodies.pop()
    if t.next_stream != first_stream:
        raise GraphcError(f"gc.scan: the body draws random numbers (dropout, gc.random); random "
                          f"ops inside a scan are not supported yet{at}")
    if _identities(t.buffer_updates) != updates:
        raise GraphcError(f"gc.scan: the body updates a module buffer (batch-norm running "
                          f"statistics in training mode); that is not supported inside a scan{at}")
    if not isinstance(result, (tuple, list)) or len(result) != 2:
        raise GraphcError(f"gc.scan: f must return a pair (carry, y), got "
                          f"{type(result).__name__}{at}")
    carry_out_leaves, carry_paths, carry_tree = flatten(result[0])
    if carry_tree != init_tree:
        raise GraphcError(f"gc.scan: f returned a carry of structure {carry_tree}, the initial "
                          f"carry has structure {init_tree}{at}")
    carry_out = _tensor_values(carry_out_leaves, carry_paths, "the carry", at)
    for path, before, after in zip(carry_paths, init_values, carry_out):
        if before.type != after.type:
            raise GraphcError(f"gc.scan: carry{path} enters the body as {before.type} and "
                              f"leaves it as {after.type}; it must keep its type{at}")
    y_leaves, y_paths, y_tree = flatten(result[1])
    ys = _tensor_values(y_leaves, y_paths, "y", at)
    if not carry_out and not ys:
        raise GraphcError(f"gc.scan: f returns neither a carry nor outputs{at}")
    if steps == 0:  # as JAX: the carry as it came in, and no ys (the body traced for their types)
        graph.nodes[first_node:] = []
        empty = [as_tensor(np.zeros((0, *y.type.shape), y.type.dtype)) for y in ys]
        return (unflatten(init_tree, [Tensor(v) for v in init_values]),
                unflatten(y_tree, empty))

    body, consts = _carve_body(graph, first_node, carry_in, x_in, carry_out + ys)
    t.scan_body_values.update(body.input_values)
    t.scan_body_values.update(v for n in body.nodes for v in n.outputs)
    node = make_scan([*consts, *init_values, *x_values], body, steps, reverse, len(consts),
                     len(carry_in), where, t.builder.module)
    graph.nodes.append(node)
    outs = [Tensor(v) for v in node.outputs]
    return unflatten(init_tree, outs[:len(carry_in)]), unflatten(y_tree, outs[len(carry_in):])


def _identities(updates: dict | None) -> dict | None:
    """Buffer updates by the identity of their values (Tensors compare elementwise)."""
    return None if updates is None else {k: id(v) for k, v in updates.items()}


def _tensor_values(leaves: list[Any], paths: list[str], what: str, at: str) -> list[Value]:
    """The values of what the body returned: tensors, arrays or numbers, nothing else."""
    for leaf, path in zip(leaves, paths):
        if not isinstance(leaf, (Tensor, np.ndarray, np.generic, int, float)) or (
                isinstance(leaf, np.ndarray) and leaf.dtype.kind not in "biuf"):
            raise GraphcError(f"gc.scan: f returned {what}{path} = {leaf!r}, a "
                              f"{type(leaf).__name__}: every leaf of the carry and of y must be a "
                              f"tensor or a number{at}")
    return [as_tensor(leaf).value for leaf in leaves]


def _trip_count(xs: list[Value], paths: list[str], length: int | None, at: str) -> int:
    lengths = {v.shape[0] if v.shape else None for v in xs}
    if None in lengths:
        scalar = next(p for v, p in zip(xs, paths) if not v.shape)
        raise GraphcError(f"gc.scan: xs{scalar} is a scalar; every leaf of xs needs a leading "
                          f"axis to loop over{at}")
    if len(lengths) > 1:
        raise GraphcError(f"gc.scan: the leaves of xs have leading axes of different sizes "
                          f"{sorted(lengths)}{at}")
    if length is None:
        if not lengths:
            raise GraphcError(f"gc.scan: give length= when xs is None{at}")
        (length,) = lengths
    elif lengths and lengths != {length}:
        raise GraphcError(f"gc.scan: length={length} but xs has leading axis {lengths.pop()}{at}")
    if not isinstance(length, (int, np.integer)) or isinstance(length, (bool, np.bool_)):
        raise GraphcError(f"gc.scan: length must be an integer, got {length!r}{at}")
    if length < 0:
        raise GraphcError(f"gc.scan: length must be >= 0, got {length!r}{at}")
    return int(length)


def _carve_body(graph: Graph, first_node: int, carry_in: list[Value], x_in: list[Value],
                outputs: list[Value]) -> tuple[Graph, list[Value]]:
    """Move the nodes traced since `first_node` that depend on the step's carry or slices into
    a closed body graph; the others (loop invariants) stay in `graph`. Values the body reads
    from outside become its leading inputs: returns the body and those outer values."""
    traced, graph.nodes[first_node:] = graph.nodes[first_node:], []
    inner = set(carry_in) | set(x_in)
    body_nodes = []
    for node in traced:
        if any(v in inner for v in node.inputs):
            body_nodes.append(node)
            inner.update(node.outputs)
        else:
            graph.nodes.append(node)  # hoisted: computed once, before the loop

    body = Graph("body")
    captured: dict[Value, Value] = {}
    literals: list[Node] = []

    def inside(v: Value) -> Value:
        if v in inner:
            return v
        if v not in captured:
            producer = v.producer
            if producer is not None and producer.op == _LITERAL and v.type.size <= 1:
                literal = Node(_LITERAL, (), producer.attrs, (v.type,), producer.loc,
                               module=producer.module)
                literals.append(literal)
                captured[v] = literal.output
            else:
                captured[v] = Value(v.type)
        return captured[v]

    for node in body_nodes:
        node.inputs = tuple(inside(v) for v in node.inputs)
    body_outputs = [inside(v) for v in outputs]
    consts = [outer for outer, v in captured.items() if v.producer is None]
    body.inputs = [GraphInput(f"const{i}", "data", captured[v]) for i, v in enumerate(consts)]
    body.inputs += [GraphInput(f"carry{i}", "data", v) for i, v in enumerate(carry_in)]
    body.inputs += [GraphInput(f"x{i}", "data", v) for i, v in enumerate(x_in)]
    body.nodes = literals + body_nodes
    k = len(carry_in)
    body.outputs = [(f"carry{i}" if i < k else f"y{i - k}", v) for i, v in enumerate(body_outputs)]
    return body, consts


__all__ = ["scan"]
