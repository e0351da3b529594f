"""The reference backend: the IR's NumPy interpreter (ir/interpret.py) run op by op over a graph.

It is the oracle every other backend is tested against, and the engine of the NaN locator.
"""
from __future__ import annotations

import numpy as np

from graphc.ir import Graph
from graphc.ir.interpret import evaluate, run_node


class ReferenceExecutable:
    """Runs a graph through the interpreter; donated inputs receive their outputs in place. The
    other outputs are arrays of their own, as a compiled backend's: never an input (the
    identity, a reshape) nor another output (two outputs merged as one value)."""

    def __init__(self, graph: Graph, donate: dict[int, int] | None = None) -> None:
        self.graph = graph
        self.donate = dict(donate or {})

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]:
        from .signature import prepare_inputs, store_donated, unaliased

        arrays = prepare_inputs(self.graph, args, donated=tuple(self.donate))
        outs = evaluate(self.graph, arrays)
        store_donated(arrays, outs, self.donate)
        return unaliased(outs, arrays, set(self.donate.values()))


def compile_graph(graph: Graph, donate: dict[int, int] | None = None) -> ReferenceExecutable:
    return ReferenceExecutable(graph, donate)


__all__ = ["ReferenceExecutable", "compile_graph", "evaluate", "run_node"]
