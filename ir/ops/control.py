"""Structured control flow: `scan`, a loop whose body is a graph.

A scan node is not a registry primitive: it has several outputs and holds a body graph, as a
fused kernel does (`Node.subgraph`), so it is checked, evaluated and differentiated from here
and from passes/autodiff.py rather than through a `Primitive` entry.

    consts..., carry..., xs...  ->  scan[length, reverse, num_consts, num_carry]  ->  carry..., ys...

The body is closed: its inputs are, in order, the loop-invariant operands (`num_consts`, read
whole at every step: weights), the carry (`num_carry`) and one slice of each stacked input
(`xs`, the leading axis of length `length` removed); its outputs are the new carry (same types
as the carry) and one slice of each stacked output (`ys`). Step t reads xs[t] and writes ys[t];
with `reverse` the steps run from `length - 1` down to 0 (JAX's `lax.scan`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from ..errors import VerificationError
from ..graph import Graph, Node
from ..types import TensorType

SCAN_OP = "scan"
SCAN_ATTRS = ("length", "reverse", "num_consts", "num_carry")
# Scans nest (an RNN cell over time inside a loop over layers); a document or a pass making
# bodies deeper than this is refused rather than recursed into without bound.
MAX_BODY_DEPTH = 8


def scan_attrs(length: int, reverse: bool, num_consts: int, num_carry: int) -> dict[str, Any]:
    return {"length": int(length), "reverse": bool(reverse), "num_consts": int(num_consts),
            "num_carry": int(num_carry)}


def stacked(t: TensorType, length: int) -> TensorType:
    """The type of `length` values of type `t` stacked along a new leading axis."""
    return TensorType((length, *t.shape), t.dtype)


def scan_output_types(body: Graph, length: int, num_carry: int) -> tuple[TensorType, ...]:
    """The node's output types: the carry's, then each per-step output stacked `length` times."""
    outs = [v.type for v in body.output_values]
    return (*outs[:num_carry], *(stacked(t, length) for t in outs[num_carry:]))


def make_scan(inputs: Sequence[Any], body: Graph, length: int, reverse: bool, num_consts: int,
              num_carry: int, loc: str | None = None, module: str | None = None) -> Node:
    """A scan node over `body` (not appended to any graph)."""
    return Node(SCAN_OP, tuple(inputs), scan_attrs(length, reverse, num_consts, num_carry),
                scan_output_types(body, length, num_carry), loc, body, module)


def split_inputs(node: Node, values: Sequence[Any]) -> tuple[list, list, list]:
    """`values` (one per node input) as (consts, carry, xs)."""
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    return list(values[:c]), list(values[c:c + k]), list(values[c + k:])


def verify_scan(node: Node, label: str, verify_graph: Callable[[Graph], None], depth: int) -> None:
    """Check a scan node's attributes and that its body's types match its operands."""
    body = node.subgraph
    if body is None:
        raise VerificationError(f"{label}: a scan node needs a body graph")
    if depth >= MAX_BODY_DEPTH:
        raise VerificationError(f"{label}: scan bodies nest more than {MAX_BODY_DEPTH} deep")
    if sorted(node.attrs) != sorted(SCAN_ATTRS):
        raise VerificationError(f"{label}: scan attributes are {sorted(SCAN_ATTRS)}, not {sorted(node.attrs)}")
    length, c, k = (node.attrs[a] for a in ("length", "num_consts", "num_carry"))
    if not all(type(n) is int and n >= 0 for n in (length, c, k)) or type(node.attrs["reverse"]) is not bool:
        raise VerificationError(f"{label}: length, num_consts and num_carry must be non-negative "
                                "ints and reverse a bool")
    if length < 1:
        raise VerificationError(f"{label}: a scan runs at least one step (length {length})")
    if c + k > len(node.inputs):
        raise VerificationError(f"{label}: {c} consts and {k} carries but only {len(node.inputs)} inputs")
    verify_graph(body)
    consts, carry, xs = split_inputs(node, [v.type for v in node.inputs])
    if any(x.shape[:1] != (length,) for x in xs):
        raise VerificationError(f"{label}: every stacked input needs leading axis {length}, got "
                                f"{[str(x) for x in xs]}")
    expected_in = consts + carry + [x.with_shape(x.shape[1:]) for x in xs]
    if [v.type for v in body.input_values] != expected_in:
        raise VerificationError(
            f"{label}: body inputs {[str(v.type) for v in body.input_values]} do not match the "
            f"consts, carry and per-step slices {[str(t) for t in expected_in]}")
    body_out = [v.type for v in body.output_values]
    if body_out[:k] != carry:
        raise VerificationError(f"{label}: body returns carry {[str(t) for t in body_out[:k]]}, "
                                f"the scan carries {[str(t) for t in carry]}")
    if [v.type for v in node.outputs] != list(scan_output_types(body, length, k)):
        raise VerificationError(f"{label}: output types do not match the body's outputs stacked "
                                f"{length} times")


def evaluate_scan(node: Node, args: Sequence[np.ndarray],
                  evaluate: Callable[[Graph, list[np.ndarray]], list[np.ndarray]]) -> list[np.ndarray]:
    """The reference semantics: run the body once per step, writing ys in place."""
    consts, carry, xs = split_inputs(node, list(args))
    length, k = node.attrs["length"], node.attrs["num_carry"]
    ys = [np.empty(v.shape, v.dtype) for v in node.outputs[k:]]
    steps = range(length - 1, -1, -1) if node.attrs["reverse"] else range(length)
    for t in steps:
        outs = evaluate(node.subgraph, [*consts, *carry, *(x[t] for x in xs)])
        carry = outs[:k]
        for y, out in zip(ys, outs[k:]):
            y[t] = out
    return [np.array(c, dtype=v.dtype) for c, v in zip(carry, node.outputs)] + ys
