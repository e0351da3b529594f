"""Which index arrays a compiled graph checks, and when: shared by the Numba backends.

No kernel tests an index. Every array a kernel indexes memory with (class targets, embedding
ids, gather indices, the scatters of their gradients) is checked by `check_indices` before the
first kernel that reads it runs: two reductions over its N (labels) or N*T (token ids) values,
off the kernels' hot loops, and the error names the first bad index exactly (its value and
position), which a racing flag set inside a parallel loop could not. An array held by a graph
input is checked before any kernel runs, so a step with a bad label changes no parameter.

This needs every index array to be a kernel input, never a value computed inside the reading
kernel: fusion does not fuse an index's producer into its consumer (indexed-load ops declare
no identity reads in ir/ops/indexing.py), and the planner refuses a fused graph that does. Constant indices are checked once,
at compile time.

GRAPHC_BOUNDS_CHECK=0 at compile time drops the checks: only for measuring what they cost
(benchmarks/bounds_check_cost.py); kernels then read wherever a bad index points.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from graphc.ir import Graph, Node, Value
from graphc.ir.ops.indexing import check_indices, index_bounds
from graphc.ir.kernels import is_literal
from graphc.ir.memory import MemoryPlan


@dataclass(frozen=True)
class IndexCheck:
    """Check that `indices` (a value of the fused graph) is valid for `op` at the user's `loc`."""

    indices: Value
    op: str
    size: int
    wrap_negative: bool
    loc: str | None

    def __call__(self, array: np.ndarray) -> None:
        check_indices(self.op, array, self.size, self.wrap_negative, self.loc)


@dataclass
class IndexChecks:
    """`on_inputs`: checks of arrays held by graph inputs (`input_of` gives which), run before
    any kernel; `before`: the others, keyed by the first kernel reading their array."""

    on_inputs: list[IndexCheck] = field(default_factory=list)
    input_of: dict[IndexCheck, int] = field(default_factory=dict)
    before: dict[Node, list[IndexCheck]] = field(default_factory=dict)


def enabled() -> bool:
    return os.environ.get("GRAPHC_BOUNDS_CHECK", "1") != "0"


def plan_index_checks(fused: Graph, plan: MemoryPlan) -> IndexChecks:
    """The checks a call of `fused` (kernel nodes in `plan.schedule` order) runs: one per
    distinct (array, valid range), a gather and the scatter of its gradient sharing one."""
    checks = IndexChecks()
    if not enabled():
        return checks
    inputs = {v: k for k, v in enumerate(fused.input_values)}
    seen: set[tuple[Value, int, bool]] = set()
    for kernel in plan.schedule:
        if kernel.subgraph is None:
            continue
        outer = dict(zip(kernel.subgraph.input_values, kernel.inputs))
        for member in kernel.subgraph.nodes:
            bounds = index_bounds(member)
            if bounds is None:
                continue
            size, wrap_negative = bounds
            indices = member.inputs[1]
            if indices.producer is not None and is_literal(indices.producer):
                check_indices(member.op, indices.producer.attrs["value"], size, wrap_negative, member.loc)
                continue
            if indices not in outer:
                raise AssertionError(f"{kernel.attrs['name']}: {member.op} reads indices computed in "
                                     f"the same kernel; they cannot be checked before it runs")
            value = outer[indices]
            if (value, size, wrap_negative) in seen:
                continue
            seen.add((value, size, wrap_negative))
            check = IndexCheck(value, member.op, size, wrap_negative, member.loc)
            root = plan.root(value)
            if plan.locations[root].kind == "constant":
                check(np.asarray(root.producer.subgraph.nodes[0].attrs["value"]).reshape(value.shape))
            elif root in inputs:
                checks.on_inputs.append(check)
                checks.input_of[check] = inputs[root]
            else:
                checks.before.setdefault(kernel, []).append(check)
    return checks
