"""Numerics debugging: which op made the NaN?

The graph is rerun on the reference interpreter node by node, and the first primitive that
makes a NaN or an infinity is reported with its operands, the module path it came from and the
user's source line (as JAX's debug_nans). An op makes a NaN where none of its operands holds
one, an infinity where all its operands are finite. So an infinity written on purpose (the
-inf of an attention mask, a constant; the -inf a max pool's padding is filled with, an
attribute) and the ops it flows through are not reported, but the NaN a fully masked row's
softmax makes of it is. The compiled step's own state is not touched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from graphc.backends.reference import evaluate
from graphc.ir import Graph, Node


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


class _Found(Exception):
    def __init__(self, report: NonFiniteReport) -> None:
        self.report = report


def _describe(array: np.ndarray) -> str:
    text = f"{array.dtype.name}{list(array.shape)}"
    if array.size and array.dtype.kind == "f":
        finite = array[np.isfinite(array)]
        bad = array.size - finite.size
        span = f" in [{finite.min():.3g}, {finite.max():.3g}]" if finite.size else ""
        text += span + (f", {bad} non-finite" if bad else "")
    return text


def find_nonfinite(graph: Graph, args: Sequence[Any]) -> NonFiniteReport | None:
    """The first node of `graph` that makes a NaN or an infinity (see the module docstring),
    or None. A non-finite input (e.g. weights already corrupted by an earlier step) is
    reported as such."""
    for inp, arg in zip(graph.inputs, args):
        arg = np.asarray(arg)
        if arg.dtype.kind == "f" and not np.all(np.isfinite(arg)):
            kind = "NaN" if np.isnan(arg).any() else "Inf"
            return NonFiniteReport(f"input {inp.name!r}", None, -1, kind, [_describe(arg)])
    env: dict = dict(zip(graph.input_values, args))
    position = {node: i for i, node in enumerate(graph.nodes)}

    def check(node: Node, outs: list[np.ndarray]) -> None:
        env.update(zip(node.outputs, outs))
        made = [kind for out in outs if out.dtype.kind == "f" and not np.all(np.isfinite(out))
                for kind in ("NaN", "Inf") if _holds(out, kind)]
        if not made:
            return
        operands = [np.asarray(env[v]) for v in node.inputs]
        operands = [a for a in operands if a.dtype.kind == "f"]
        if "NaN" in made and not any(_holds(a, "NaN") for a in operands):
            kind = "NaN"
        elif ("Inf" in made and node.inputs and not _infinite_attribute(node)
              and all(np.all(np.isfinite(a)) for a in operands)):
            kind = "Inf"
        else:
            return  # carried from an operand, or an infinity given as a constant
        inputs = [_describe(np.asarray(env[v])) for v in node.inputs]
        raise _Found(NonFiniteReport(node.op, node.loc, position[node], kind, inputs, node.module))

    try:
        with np.errstate(all="ignore"):
            evaluate(graph, [np.array(a, copy=True) for a in args], on_node=check)
    except _Found as found:
        return found.report
    return None
