"""Which index arrays a compiled graph checks, and when: shared by the Numba backends.

No kernel tests an index. Every array a kernel indexes memory with (class targets, embedding
ids, gather indices, the scatters of their gradients) is checked by `check_indices` before the
first kernel that reads it runs: two reductions over its N (labels) or N*T (token ids) values,
off the kernels' hot loops, and the error names the first bad index exactly (its value and
position), which a racing flag set inside a parallel loop could not. An array held by a graph
input is checked before any kernel runs, so a step with a bad label changes no parameter. So is
one that pointwise kernels and reductions compute from inputs alone (cross_entropy gathers with
where(label != ignore_index, label, 0)) where a kernel before its first reader writes a donated
buffer in place (BatchNorm's running statistics): computed again with NumPy for the check
(`ComputedIndexCheck`, some microseconds a call), and checked again where it is read (NumPy's
sums may round otherwise than the kernels'). Where a check must wait for a kernel's result, the
inputs written in place before it are copied first and put back if it fails
(`restore_on_failure`): a step stopped by a bad index changes nothing either.

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
from graphc.ir.interpret import evaluate
from graphc.ir.ops.indexing import NAMED_AFTER, check_indices, index_bounds
from graphc.ir.kernels import is_literal
from graphc.ir.memory import MemoryPlan
from graphc.ir.registry import SOURCE, get

# Kernels that may be evaluated again on the host for a check: they read memory at computed
# positions only by the index ops checked themselves, and draw no random numbers.
HOST_PATTERNS = ("elementwise", "shape", "view", "constant", "reduction")
HOST_CHAIN_LIMIT = 8  # kernels: an index computed by a longer chain is checked where it is read


@dataclass(frozen=True)
class IndexCheck:
    """Check that `indices` (a value of the fused graph) is valid for `op` at the user's `loc`."""

    indices: Value
    op: str
    size: int
    wrap_negative: bool
    loc: str | None

    @property
    def sources(self) -> tuple[Value, ...]:
        """The values whose arrays a call of the check takes, in order."""
        return (self.indices,)

    def __call__(self, array: np.ndarray) -> None:
        check_indices(self.op, array, self.size, self.wrap_negative, self.loc)


@dataclass(frozen=True)
class ComputedIndexCheck:
    """`check` of an index array that `kernels` (in order) compute from the arrays of `sources`
    (values held by graph inputs): evaluated on the host with the reference interpreter."""

    check: IndexCheck
    kernels: tuple[Node, ...]
    sources: tuple[Value, ...]

    def __call__(self, *arrays: np.ndarray) -> None:
        env = dict(zip(self.sources, arrays))
        for kernel in self.kernels:
            env.update(zip(kernel.outputs, evaluate(kernel.subgraph, [env[v] for v in kernel.inputs])))
        self.check(env[self.check.indices])


@dataclass
class IndexChecks:
    """`on_inputs`: checks of arrays held by or computed from graph inputs alone (`input_of`
    gives the input of each of their `sources`), run before any kernel; `before`: the others,
    keyed by the first kernel reading their array."""

    on_inputs: list[IndexCheck | ComputedIndexCheck] = field(default_factory=list)
    input_of: dict[IndexCheck | ComputedIndexCheck, tuple[int, ...]] = field(default_factory=dict)
    before: dict[Node, list[IndexCheck]] = field(default_factory=dict)
    # inputs donated in place that a kernel writes before a check in `before` runs: a call
    # keeps a copy of each and puts it back where that check fails, so the call changes nothing
    restore_on_failure: tuple[int, ...] = ()


def enabled() -> bool:
    return os.environ.get("GRAPHC_BOUNDS_CHECK", "1") != "0"


def plan_index_checks(fused: Graph, plan: MemoryPlan) -> IndexChecks:
    """The checks a call of `fused` (kernel nodes in `plan.schedule` order) runs: one per
    distinct (array, valid range), a gather and the scatter of its gradient sharing one, named
    after the gather (the op the user wrote, not its gradient)."""
    checks = IndexChecks()
    if not enabled():
        return checks
    inputs = {v: k for k, v in enumerate(fused.input_values)}
    position = {kernel: n for n, kernel in enumerate(plan.schedule)}
    found: dict[tuple[Value, int, bool], tuple[IndexCheck, Node]] = {}  # -> check, first reader run
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
                check_indices(NAMED_AFTER.get(member.op, member.op), indices.producer.attrs["value"],
                              size, wrap_negative, member.loc)
                continue
            if indices not in outer:
                raise AssertionError(f"{kernel.attrs['name']}: {member.op} reads indices computed in "
                                     f"the same kernel; they cannot be checked before it runs")
            key = (outer[indices], size, wrap_negative)
            named = IndexCheck(outer[indices], NAMED_AFTER.get(member.op, member.op), size,
                               wrap_negative, member.loc)
            if key in found:
                check, first = found[key]
                if get(check.op).indexed_load or not get(member.op).indexed_load:
                    named = check
                found[key] = (named, kernel if position[kernel] < position[first] else first)
            else:
                found[key] = (named, kernel)
    # the first kernel writing a donated input's buffer in place: a check after it is too late
    first_write = min((position.get(plan.root(fused.output_values[j]).producer, len(position))
                       for j in plan.donated_in_place.values()), default=len(position))
    for check, first_reader in found.values():
        root = plan.root(check.indices)
        if plan.locations[root].kind == "constant":
            check(np.asarray(root.producer.subgraph.nodes[0].attrs["value"]).reshape(check.indices.shape))
        elif root in inputs:
            checks.on_inputs.append(check)
            checks.input_of[check] = (inputs[root],)
        elif position[first_reader] > first_write and (
                computed := _computed_from_inputs(check, plan, inputs)) is not None:
            checks.on_inputs.append(computed)
            checks.input_of[computed] = tuple(inputs[plan.root(v)] for v in computed.sources)
            # and the array itself where it is read: NumPy may compute another index than the
            # kernels do (a float sum in another order), and memory safety must not rest on it
            checks.before.setdefault(first_reader, []).append(check)
        else:
            checks.before.setdefault(first_reader, []).append(check)
    last_check = max((position[reader] for reader in checks.before), default=-1)
    checks.restore_on_failure = tuple(
        k for k, j in plan.donated_in_place.items()
        if position.get(plan.root(fused.output_values[j]).producer, len(position)) < last_check)
    return checks


def _computed_from_inputs(check: IndexCheck, plan: MemoryPlan, inputs: dict[Value, int]
                          ) -> ComputedIndexCheck | None:
    """`check` on its array computed again from graph inputs, where HOST_PATTERNS kernels, at
    most HOST_CHAIN_LIMIT of them, compute it from those alone; None otherwise."""
    kernels: list[Node] = []
    sources: list[Value] = []
    pending = [check.indices]
    while pending:
        value = pending.pop()
        kernel = value.producer
        if plan.root(value) in inputs:
            sources.append(value)
            continue
        if kernel is None or kernel in kernels:
            continue
        if (kernel.subgraph is None or kernel.attrs.get("pattern") not in HOST_PATTERNS
                or len(kernels) == HOST_CHAIN_LIMIT
                or any(index_bounds(m) is not None or (get(m.op).kind == SOURCE and m.op != "constant")
                       for m in kernel.subgraph.nodes)):
            return None
        kernels.append(kernel)
        pending.extend(kernel.inputs)
    order = {kernel: n for n, kernel in enumerate(plan.schedule)}
    return ComputedIndexCheck(check, tuple(sorted(kernels, key=order.__getitem__)),
                              tuple(dict.fromkeys(sources)))
