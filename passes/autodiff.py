"""Reverse-mode differentiation of a graph into a graph.

The forward nodes are copied, then each node's VJP rule (from the op registry) is emitted in
reverse order. Cotangents are summed where a value fans out, and only nodes that lie on a path
from a requested input to the differentiated output get a rule. Gradients are ordinary IR, so
the result can itself be differentiated (grad of grad).
"""
from __future__ import annotations

from typing import Sequence

from graphc.ir import Builder, Graph, Value
from graphc.ir.errors import GraphcError
from graphc.ir.registry import get
from graphc.ir.types import is_float


def _resolve_inputs(graph: Graph, wrt: Sequence[int | str]) -> list[int]:
    names = [i.name for i in graph.inputs]
    indices = []
    for w in wrt:
        index = names.index(w) if isinstance(w, str) and w in names else w
        if not isinstance(index, int) or not 0 <= index < len(names):
            raise GraphcError(f"autodiff: no input {w!r} in graph {graph.name!r} (inputs: {names})")
        if not is_float(graph.inputs[index].value.dtype):
            raise GraphcError(f"autodiff: input {names[index]!r} has dtype "
                              f"{graph.inputs[index].value.dtype}; only floating inputs have gradients")
        indices.append(index)
    return indices


def _active_nodes(graph: Graph, sources: set[Value], target: Value) -> list:
    """Nodes whose output depends on a source and on which the target depends."""
    depends = set(sources)
    for node in graph.nodes:
        if any(v in depends for v in node.inputs):
            depends.update(node.outputs)
    needed = {target}
    active = []
    for node in reversed(graph.nodes):
        if any(v in needed for v in node.outputs) and any(v in depends for v in node.outputs):
            active.append(node)
            needed.update(node.inputs)
    return active  # in reverse topological order


def _joinable_slices(parts: list[Value]) -> tuple[int, list[Value]] | None:
    """Unit-step slice_grad contributions that differ along exactly one axis, without overlap:
    returns (axis, parts sorted along it) or None."""
    nodes = [p.producer for p in parts]
    if len(parts) < 2 or any(n is None or n.op != "slice_grad" for n in nodes):
        return None
    first = nodes[0].attrs
    if any(n.attrs["shape"] != first["shape"] or set(n.attrs["steps"]) != {1} for n in nodes):
        return None
    differing = {axis for n in nodes for axis in range(len(first["shape"]))
                 if (n.attrs["starts"][axis], n.attrs["stops"][axis]) !=
                 (first["starts"][axis], first["stops"][axis])}
    if len(differing) != 1:
        return None
    (axis,) = differing
    ordered = sorted(parts, key=lambda p: p.producer.attrs["starts"][axis])
    spans = [(p.producer.attrs["starts"][axis], p.producer.attrs["stops"][axis]) for p in ordered]
    if any(stop > start for (_, stop), (start, _) in zip(spans, spans[1:])):
        return None  # overlapping regions must be summed
    return axis, ordered


def _merge_same_region(b: Builder, slices: list[Value]) -> list[Value]:
    """slice_grad(a, R) + slice_grad(c, R) -> slice_grad(a + c, R): sum at the slice's size."""
    groups: dict[tuple, list[Value]] = {}
    for p in slices:
        a = p.producer.attrs
        groups.setdefault((a["shape"], a["starts"], a["stops"], a["steps"]), []).append(p)
    merged = []
    for (shape, starts, stops, steps), members in groups.items():
        if len(members) == 1:
            merged.append(members[0])
            continue
        total = members[0].producer.inputs[0]
        for p in members[1:]:
            total = b.add(total, p.producer.inputs[0])
        merged.append(b.slice_grad(total, shape=shape, starts=starts, stops=stops, steps=steps))
    return merged


def _sum_cotangents(b: Builder, parts: list[Value]) -> Value:
    """Sum the contributions to one value's cotangent; adjacent slices become one concatenate."""
    slices = [p for p in parts if p.producer is not None and p.producer.op == "slice_grad"]
    if len(slices) > 1:
        others = [p for p in parts if p not in slices]
        slices = _merge_same_region(b, slices)
        parts = others + slices
    joined = _joinable_slices(slices)
    if joined is not None:
        axis, ordered = joined
        attrs = ordered[0].producer.attrs
        pieces, cursor = [], ordered[0].producer.attrs["starts"][axis]
        for p in ordered:
            start, stop = p.producer.attrs["starts"][axis], p.producer.attrs["stops"][axis]
            if start > cursor:  # a gap no slice covered: zeros
                gap = list(p.producer.inputs[0].shape)
                gap[axis] = start - cursor
                pieces.append(b.full(0, p.type.with_shape(tuple(gap))))
            pieces.append(p.producer.inputs[0])
            cursor = stop
        block = b.concatenate(*pieces, axis=axis) if len(pieces) > 1 else pieces[0]
        starts = list(attrs["starts"])
        stops = list(attrs["stops"])
        starts[axis], stops[axis] = ordered[0].producer.attrs["starts"][axis], cursor
        parts = [p for p in parts if p not in slices] + [
            b.slice_grad(block, shape=attrs["shape"], starts=tuple(starts), stops=tuple(stops),
                         steps=attrs["steps"])]
    total = parts[0]
    for p in parts[1:]:
        total = b.add(total, p)
    return total


def autodiff(graph: Graph, wrt: Sequence[int | str], output: str | None = None,
             cotangent: bool = False, keep_outputs: bool = True) -> Graph:
    """Return a graph computing the gradients of `output` w.r.t. the inputs in `wrt`.

    The result's outputs are the original outputs (when `keep_outputs`) followed by
    ``grad_<input name>`` for each requested input. `output` must be a float scalar unless
    `cotangent` is set, in which case an extra input ``cotangent`` seeds the VJP.
    """
    indices = _resolve_inputs(graph, wrt)
    out_name = output if output is not None else graph.outputs[0][0]
    new = graph.copy()
    new.name = f"grad_{graph.name}"
    target = new.output(out_name)
    if not is_float(target.dtype):
        raise GraphcError(f"autodiff: output {out_name!r} has dtype {target.dtype}; it must be floating")
    b = Builder(new)
    if cotangent:
        seed = b.add_input(target.type, "cotangent")
    elif target.shape != ():
        raise GraphcError(f"autodiff: output {out_name!r} has shape {target.shape}; grad needs a "
                          "scalar (reduce it, e.g. with .sum(), or use vjp with a cotangent)")
    else:
        b.at(target.producer)
        seed = b.const(1, target.dtype)

    sources = {new.inputs[i].value for i in indices}
    # Contributions are kept apart until the value's cotangent is needed, so that slices of
    # one tensor (RNN time steps, gate splits) are joined instead of summed as full-size zeros.
    cts: dict[Value, list[Value]] = {target: [seed]}
    for node in _active_nodes(new, sources, target):
        if node.output not in cts:
            continue
        b.at(node)  # gradient nodes point at the user line and module of the forward op
        g = _sum_cotangents(b, cts.pop(node.output))
        rule = get(node.op).vjp
        if rule is None:
            raise GraphcError(f"autodiff: op {node.op!r} has no differentiation rule"
                              + (f" (used at {node.loc})" if node.loc else ""))
        for x, ct in zip(node.inputs, rule(b, g, *node.inputs, out=node.output, **node.attrs)):
            if ct is not None and is_float(x.dtype):
                cts.setdefault(x, []).append(ct)

    if not keep_outputs:
        new.outputs = []
    b.at(None)
    for i in indices:
        inp = new.inputs[i]
        parts = cts.get(inp.value)
        new.add_output(f"grad_{inp.name}", _sum_cotangents(b, parts) if parts else b.zeros_like(inp.value))
    from .simplify import dce
    return dce(new)
