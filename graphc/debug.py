"""Numerics debugging: which op made the NaN?

The graph is rerun on the reference interpreter and its first non-finite result (the loss, or
else a state the step updates) is followed back, through the operands holding the same kind of
value where the result holds it (the taken side of a `where`), to the op that made it: one
whose operands hold no such value there. It is reported with its operands, the module path it
came from and the user's source line (as JAX's debug_nans); inside a scan, the body's op and
the step, followed back through the carry to earlier steps. So an infinity written on purpose
(the -inf of an attention mask, an input or a constant) that the result does not hold is not
reported, but the NaN a fully masked row's softmax makes of it is; nor is a NaN no result keeps
(`where(x > 0, log(x), 0)`). The compiled step's own state is not touched.
"""
from __future__ import annotations

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
                return _origin(graph, env, value, kind)
    return None


def _mask(array: np.ndarray, kind: str) -> np.ndarray:
    return np.isnan(array) if kind == "NaN" else np.isinf(array)


def _source(node: Node, env: dict[Value, np.ndarray], value: Value, kind: str) -> Value | None:
    """The operand of `node` its output `value` took its `kind` values from, or None where the
    node made them: of the operands holding such values, one holding them where the output
    does (the taken side of a `where`, not the discarded one); an operand of another shape
    than the output (a reduction's) where none lines up."""
    out = _mask(np.asarray(env[value]), kind)
    unknown = None
    for operand in node.inputs:
        array = np.asarray(env[operand])
        if array.dtype.kind != "f" or not _holds(array, kind):
            continue
        try:
            if np.any(np.broadcast_to(_mask(array, kind), out.shape) & out):
                return operand
        except ValueError:  # another shape: it may be where the output's came from
            unknown = unknown or operand
    return unknown


def _walk(env: dict[Value, np.ndarray], value: Value, kind: str) -> tuple[Node | None, Value]:
    """Back from `value` through the operands its `kind` values came from: (the node that made
    them, its output followed), or (None, the graph input they came in by)."""
    while value.producer is not None:
        source = _source(value.producer, env, value, kind)
        if source is None:
            return value.producer, value
        value = source
    return None, value


def _origin(graph: Graph, env: dict[Value, np.ndarray], value: Value, kind: str) -> NonFiniteReport:
    """The op of `graph` that made the `kind` values `value` holds, or the input they came in by."""
    node, value = _walk(env, value, kind)
    if node is None:
        name = next(i.name for i in graph.inputs if i.value is value)
        return NonFiniteReport(f"input {name!r}", None, -1, kind, [_describe(np.asarray(env[value]))])
    return _made_by(graph, env, node, value, kind, [])


def _made_by(graph: Graph, env: dict[Value, np.ndarray], node: Node, output: Value, kind: str,
             scans: list[str]) -> NonFiniteReport:
    """`node` of `graph` (inside `scans`, outermost first), which made the `kind` values of its
    `output`, as the report; for a scan, the op of its body that made them."""
    if node.op == SCAN_OP and node.subgraph is not None:
        label = f"scan{f' at {node.loc}' if node.loc else ''}"
        inner = _scan_origin(node, env, node.outputs.index(output), kind, [*scans, label])
        if inner is not None:
            return inner
    inputs = [_describe(np.asarray(env[v])) for v in node.inputs]
    where = f" (in the body of {' in '.join(reversed(scans))})" if scans else ""
    return NonFiniteReport(node.op + where, node.loc, graph.nodes.index(node), kind, inputs, node.module)


def _scan_origin(node: Node, env: dict[Value, np.ndarray], output: int, kind: str,
                 scans: list[str]) -> NonFiniteReport | None:
    """Where in the body of scan `node` its output `output` came to hold `kind` values: the
    body rerun step by step, then followed back from the step that produced them (a stacked
    output's first step holding them, a carry's last step), into earlier steps through the
    carry; None where they came in by the scan's operands."""
    consts, carry, xs = split_inputs(node, [env[v] for v in node.inputs])
    c, k, body = node.attrs["num_consts"], node.attrs["num_carry"], node.subgraph
    steps = list(range(node.attrs["length"] - 1, -1, -1) if node.attrs["reverse"] else range(node.attrs["length"]))
    envs: list[dict[Value, np.ndarray]] = []
    for t in steps:
        step_env = dict(zip(body.input_values, [*consts, *carry, *(x[t] for x in xs)]))
        with np.errstate(all="ignore"):
            outs = evaluate(body, [np.array(a, copy=True) for a in step_env.values()],
                            on_node=lambda n, o, e=step_env: e.update(zip(n.outputs, o)))
        envs.append(step_env)
        carry = outs[:k]
    value = body.output_values[output]
    if output < k:  # the final carry: the last step's
        at = len(envs) - 1 if envs else None
    else:
        at = next((i for i, e in enumerate(envs) if _holds(np.asarray(e[value]), kind)), None)
    while at is not None:
        made, value = _walk(envs[at], value, kind)
        if made is not None:
            return _made_by(body, envs[at], made, value, kind, [*scans[:-1], f"{scans[-1]}, step {steps[at]}"])
        index = body.input_values.index(value)
        if not c <= index < c + k or at == 0:  # a const, a step's slice, or the initial carry
            return None
        at, value = at - 1, body.output_values[index - c]  # the carry the step before returned
    return None
