"""The NumPy interpreter of the IR: every node evaluated by its registry entry's `impl`.

It lives with the IR because more than one layer evaluates nodes: the reference backend runs
whole graphs on it (the oracle every other backend is tested against, and the engine of the NaN
locator), and constant folding runs single nodes on it at compile time.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from .errors import IndexOutOfRangeError
from .graph import Graph, Node
from .ops.control import SCAN_OP, evaluate_scan
from .registry import get

NodeHook = Callable[[Node, list[np.ndarray]], None]


def run_node(node: Node, args: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Evaluate one node (a primitive, a scan, or a fused kernel through its subgraph)."""
    if node.op == SCAN_OP:
        return evaluate_scan(node, args, evaluate)
    if node.subgraph is not None:
        return evaluate(node.subgraph, args)
    try:
        with np.errstate(all="ignore"):  # an overflow to inf is a value, as in the compiled kernels
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
