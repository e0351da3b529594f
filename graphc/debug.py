"""Numerics debugging: which op made the NaN?

The graph is rerun on the reference interpreter and its first non-finite result (the loss, or
else a state the step updates) is followed back, through the operands holding the same kind of
value, to the op that made it: an op makes a NaN where none of its operands holds one, an
infinity where all its operands are finite. It is reported with its operands, the module path
it came from and the user's source line (as JAX's debug_nans); inside a scan, the body's op and
the step. So an infinity written on purpose (the -inf of an attention mask, an input or a
constant; the -inf a max pool's padding is filled with, an attribute) and the ops it flows
through are not reported, but the NaN a fully masked row's softmax makes of it is; nor is a
NaN no result keeps (`where(x > 0, log(x), 0)`). The compiled step's own state is not touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from graphc.backends.reference import evaluate
from graphc.ir import Graph, Node, Value
from graphc.ir.ops.control import SCAN_OP, split_inputs


@dataclass
class NonFiniteReport:
    op: str
    loc: str | None
    index: int
    kind: str  # "NaN" or "Inf"
    inputs: list[str]
    module: str | None = None  # the module path the op came from ("features.0")

    def __str__(self) -> str:
        if self.index < 0:
            return f"{self.op} already holds {self.kind} ({self.inputs[0]})"
        where = f" in module {self.module}" if self.module else ""
        where += f" at {self.loc}" if self.loc else ""
        return (f"first non-finite value: {self.op}{where} (node {self.index}) produced {self.kind}; "
                f"operands: {'; '.join(self.inputs) or 'none'}")


def _infinite_attribute(node: Node) -> bool:
    """Whether `node` writes an infinity it is given as an attribute (a pad's -inf fill)."""
    return any(isinstance(value, (float, np.floating)) and math.isinf(value)
               for value in node.attrs.values())


def _holds(array: np.ndarray, kind: str) -> bool:
    return bool(np.isnan(array).any() if kind == "NaN" else np.isinf(array).any())


def _describe(array: np.ndarray) -> str:
    text = f"{array.dtype.name}{list(array.shape)}"
    if array.size and array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        bad = array.size - finite.size
        span = f" in [{finite.min():.3g}, {finite.max():.3g}]" if finite.size else ""
        text += span + (f", {bad} non-finite" if bad else "")
    return text


def find_nonfinite(graph: Graph, args: Sequence[Any]) -> NonFiniteReport | None:
    """Where the first non-finite result of `graph` (its loss, or else a state it updates)
    comes from, or None when all are finite: from that result back through the operands holding
    the same kind of value, the op that made it of operands that held none (see the module
    docstring), inside a scan's body where the scan made it. A NaN an op made that no result
    keeps (the discarded side of a `where`) is not reported; a non-finite input the result
    comes from (weights corrupted by an earlier step) is reported as such."""
    env: dict[Value, np.ndarray] = {}

    def record(node: Node, outs: list[np.ndarray]) -> None:
        env.update(zip(node.outputs, outs))

    arrays = [np.array(a, copy=True) for a in args]
    env.update(zip(graph.input_values, arrays))
    with np.errstate(all="ignore"):
        outputs = evaluate(graph, [a.copy() for a in arrays], on_node=record)
    for value, out in zip(graph.output_values, outputs):
        for kind in ("NaN", "Inf"):
            if _holds(np.asarray(out), kind):
                return _origin(graph, env, value, kind, [])
    return None


def _origin(graph: Graph, env: dict[Value, np.ndarray], value: Value, kind: str,
            scans: list[str]) -> NonFiniteReport:
    """The op of `graph` that made the `kind` value `value` holds, following its operands back
    (`scans`: the scans, outermost first, whose bodies `graph` is inside)."""
    position = {node: i for i, node in enumerate(graph.nodes)}
    while value.producer is not None:
        node = value.producer
        carried = [v for v in node.inputs if _holds(np.asarray(env[v]), kind)]
        if carried and not (kind == "Inf" and _infinite_attribute(node)):
            value = carried[0]
            continue
        if node.op == SCAN_OP and node.subgraph is not None:
            inner = _scan_origin(node, env, node.outputs.index(value), kind,
                                 [*scans, f"scan{f' at {node.loc}' if node.loc else ''}"])
            if inner is not None:
                return inner
        inputs = [_describe(np.asarray(env[v])) for v in node.inputs]
        where = f" (in the body of {' in '.join(reversed(scans))})" if scans else ""
        return NonFiniteReport(node.op + where, node.loc, position[node], kind, inputs, node.module)
    name = next(i.name for i in graph.inputs if i.value is value)
    return NonFiniteReport(f"input {name!r}", None, -1, kind, [_describe(np.asarray(env[value]))])


def _scan_origin(node: Node, env: dict[Value, np.ndarray], output: int, kind: str,
                 scans: list[str]) -> NonFiniteReport | None:
    """Where in the body of scan `node` its output `output` came to hold `kind`: the body rerun
    step by step to the first step whose result there holds it, then followed back in it."""
    consts, carry, xs = split_inputs(node, [env[v] for v in node.inputs])
    k, body = node.attrs["num_carry"], node.subgraph
    steps = range(node.attrs["length"] - 1, -1, -1) if node.attrs["reverse"] else range(node.attrs["length"])
    for t in steps:
        step_env: dict[Value, np.ndarray] = {}
        step_args = [*consts, *carry, *(x[t] for x in xs)]
        step_env.update(zip(body.input_values, step_args))
        with np.errstate(all="ignore"):
            outs = evaluate(body, [np.array(a, copy=True) for a in step_args],
                            on_node=lambda n, o: step_env.update(zip(n.outputs, o)))
        # (the body's outputs are the scan's, carries first: the output itself, or a carry that
        # will bring the value to it in a later step)
        held = [i for i in (output, *range(k)) if _holds(np.asarray(outs[i]), kind)]
        if held:
            return _origin(body, step_env, body.output_values[held[0]], kind,
                           [*scans[:-1], f"{scans[-1]}, step {t}"])
        carry = outs[:k]
    return None
