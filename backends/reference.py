"""The reference backend: a NumPy interpreter that runs any verified graph op by op.

It is the oracle every other backend is tested against, and the engine of the NaN locator.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from graphc.ir import Graph, IndexOutOfRangeError, Node
from graphc.ir.registry import get

NodeHook = Callable[[Node, list[np.ndarray]], None]


def run_node(node: Node, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Evaluate one node (a primitive, or a fused kernel through its subgraph)."""
    if node.subgraph is not None:
        return evaluate(node.subgraph, args)
    try:
        out = get(node.op).impl(*args, **node.attrs)
    except IndexOutOfRangeError as error:  # the impl knows the op, the node knows the user's line
        raise error.at(node.loc) from None
    expected = node.output.type
    out = np.asarray(out, dtype=expected.dtype)
    if out.shape != expected.shape:
        raise AssertionError(f"{node.op}: reference produced shape {out.shape}, type says {expected}")
    return [out]


def evaluate(graph: Graph, args: Sequence[np.ndarray], on_node: NodeHook | None = None
             ) -> list[np.ndarray]:
    """Run `graph` on NumPy arrays (one per input, already of the input's type)."""
    env = dict(zip(graph.input_values, args))
    for node in graph.nodes:
        outs = run_node(node, [env[v] for v in node.inputs])
        env.update(zip(node.outputs, outs))
        if on_node is not None:
            on_node(node, outs)
    return [env[v] for v in graph.output_values]


class ReferenceExecutable:
    """Runs a graph through the interpreter; donated inputs receive their outputs in place."""

    def __init__(self, graph: Graph, donate: dict[int, int] | None = None) -> None:
        self.graph = graph
        self.donate = dict(donate or {})

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]:
        from .signature import prepare_inputs

        arrays = prepare_inputs(self.graph, args, donated=tuple(self.donate))
        outs = evaluate(self.graph, arrays)
        for i, o in self.donate.items():
            np.copyto(arrays[i], outs[o])
            outs[o] = arrays[i]
        return outs


def compile_graph(graph: Graph, donate: dict[int, int] | None = None) -> ReferenceExecutable:
    return ReferenceExecutable(graph, donate)
