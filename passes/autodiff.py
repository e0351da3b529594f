"""Reverse-mode differentiation of a graph into a graph.

The forward nodes are copied, then each node's VJP rule (from the op registry) is emitted in
reverse order. Cotangents are summed where a value fans out, and only nodes that lie on a path
from a requested input to the differentiated output get a rule. Gradients are ordinary IR, so
the result can itself be differentiated (grad of grad).

A scan's VJP is a scan running the other way (`_scan_vjp`); its body is the VJP of the forward
body, so a scan's gradient can be differentiated again like any other graph.
"""
from __future__ import annotations

from typing import Sequence

from graphc.ir import Builder, Graph, Node, Value
from graphc.ir.errors import GraphcError
from graphc.ir.ops.control import SCAN_OP, make_scan, split_inputs
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


def _active_nodes(graph: Graph, sources: set[Value], targets: set[Value]) -> tuple[list[Node], set[Value]]:
    """Nodes whose output depends on a source and on which a target depends, in reverse
    topological order; and the values that depend on a source."""
    depends = set(sources)
    for node in graph.nodes:
        if any(v in depends for v in node.inputs):
            depends.update(node.outputs)
    needed = set(targets)
    active = []
    for node in reversed(graph.nodes):
        if any(v in needed for v in node.outputs) and any(v in depends for v in node.outputs):
            active.append(node)
            needed.update(node.inputs)
    return active, depends


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
    from .scan_rewrites import last_steps_from_carries
    indices = _resolve_inputs(graph, wrt)
    out_name = output if output is not None else graph.outputs[0][0]
    # before the VJP, which then seeds a last step read as a final carry's cotangent directly
    new = last_steps_from_carries(graph).copy()
    new.name = f"grad_{graph.name}"
    target = new.output(out_name)
    if not is_float(target.dtype):
        raise GraphcError(f"autodiff: output {out_name!r} has dtype {target.dtype}; it must be floating")
    b = Builder(new)
    if cotangent:
        seed = b.add_input(target.type, "cotangent")
    elif target.shape != ():
        raise GraphcError(f"autodiff: output {out_name!r} has shape {target.shape}; grad needs a "
                          "scalar: reduce it, e.g. with .sum(); for a vector-Jacobian product "
                          "differentiate (y * cotangent).sum()")
    else:
        b.at(target.producer)
        seed = b.const(1, target.dtype)

    sources = {new.inputs[i].value for i in indices}
    cts = _backprop(b, new, sources, {target: [seed]})
    if not keep_outputs:
        new.outputs = []
    b.at(None)
    taken = {name for name, _ in new.outputs}
    for i in indices:
        inp = new.inputs[i]
        parts = cts.get(inp.value)
        name = f"grad_{inp.name}"
        for k in range(2, len(indices) + 2):  # an input asked for twice (argnums=(0, 0))
            if name not in taken:
                break
            name = f"grad_{inp.name}_{k}"
        taken.add(name)
        new.add_output(name, _sum_cotangents(b, parts) if parts else b.zeros_like(inp.value))
    from .simplify import dce
    return dce(new)


def _backprop(b: Builder, graph: Graph, sources: set[Value], seeds: dict[Value, list[Value]]
              ) -> dict[Value, list[Value]]:
    """Emit the VJP rules of the nodes between `sources` and the seeded values, last node
    first; returns the contributions to each remaining value's cotangent."""
    # Contributions are kept apart until the value's cotangent is needed, so that slices of
    # one tensor (RNN time steps, gate splits) are joined instead of summed as full-size zeros.
    cts = {v: list(parts) for v, parts in seeds.items()}
    active, depends = _active_nodes(graph, sources, set(seeds))
    for node in active:
        if not any(v in cts for v in node.outputs):
            continue
        b.at(node)  # gradient nodes point at the user line and module of the forward op
        if node.op == SCAN_OP:
            gs = [_sum_cotangents(b, cts.pop(v)) if v in cts else None for v in node.outputs]
            input_cts = _scan_vjp(b, node, gs, [v in depends for v in node.inputs])
        else:
            g = _sum_cotangents(b, cts.pop(node.output))
            rule = get(node.op).vjp
            if rule is None:
                raise GraphcError(f"autodiff: op {node.op!r} has no differentiation rule"
                                  + (f" (used at {node.loc})" if node.loc else ""))
            input_cts = rule(b, g, *node.inputs, out=node.output, **node.attrs)
        for x, ct in zip(node.inputs, input_cts):
            if ct is not None and is_float(x.dtype):
                cts.setdefault(x, []).append(ct)
    return cts


def vjp_graph(graph: Graph, wrt: Sequence[int], seeded: Sequence[int]) -> Graph:
    """The vector-Jacobian product of `graph`: its inputs, then one cotangent input per output
    in `seeded` (output indices; the others count as zero), returning the cotangent of each
    input in `wrt` (input indices)."""
    new = graph.copy()
    new.name = f"vjp_{graph.name}"
    b = Builder(new)
    seeds: dict[Value, list[Value]] = {}
    named: dict[int, int] = {}
    for i in seeded:  # an output listed twice gets both cotangents; an input returned as it
        value = new.outputs[i][1]  # is gets its seed directly
        repeat = named[i] = named.get(i, -1) + 1
        name = f"ct_{i}" if repeat == 0 else f"ct_{i}_{repeat}"
        seeds.setdefault(value, []).append(b.add_input(value.type, name))
    cts = _backprop(b, new, {new.inputs[i].value for i in wrt}, seeds)
    b.at(None)
    grads = []
    for i in wrt:
        parts = cts.get(new.inputs[i].value)
        grads.append(_sum_cotangents(b, parts) if parts else b.zeros_like(new.inputs[i].value))
    new.outputs = [(f"ct_in{i}", g) for i, g in zip(wrt, grads)]
    from .simplify import dce
    return dce(new)


def _inline(b: Builder, graph: Graph, args: Sequence[Value],
            given: dict[Value, Value] | None = None) -> list[Value]:
    """Copy `graph`'s nodes into `b`'s graph, reading its inputs from `args`; its outputs. The
    values in `given` are read from there instead of being computed again."""
    mapping = dict(zip(graph.input_values, args))
    mapping.update(given or {})
    for node in graph.nodes:
        if all(v in mapping for v in node.outputs):
            continue
        clone = node.clone(mapping[v] for v in node.inputs)
        b.graph.nodes.append(clone)
        mapping.update(zip(node.outputs, clone.outputs))
    return [mapping[v] for v in graph.output_values]


# Ops whose results the backward body reads from a stack the forward scan writes rather than
# computing them again: one (N, M) matrix saved per step costs far less than a matrix product per
# step, and a concatenation (an RNN's [x_t, h] before its product) is stacked by the forward as it
# is written, where the backward would copy it again and emit it for the weight's gradient.
# Elementwise work is recomputed from them (cheaper than storing every activation).
SAVED_OPS = frozenset({"matmul", "concatenate"})
# Activations whose VJP reads their output only. A product read only through them (an LSTM's
# gates: slices of one product, each through a sigmoid or a tanh) is saved as those outputs
# instead: as many numbers, and the backward computes none of the transcendentals again.
SAVED_ACTIVATIONS = frozenset({"sigmoid", "tanh"})


def _recomputed_products(vjp: Graph, primal_inputs: int, num_consts: int) -> list[Value]:
    """The values of `vjp` (the VJP of a scan's body) that recompute an expensive forward node:
    results of SAVED_OPS computed from the body's own inputs only (its first `primal_inputs`),
    reading at least one that changes per step (what reads only the first `num_consts`, the
    loop-invariant ones, is hoisted out of the loop instead). A product whose only reader is an
    `add` (of a bias or of the step's projected input: the gates' pre-activations) is saved as
    that sum: the backward then recomputes neither, and needs no other operand of the add. One
    read only through SAVED_ACTIVATIONS is saved as their results (`_activations_of`)."""
    primal = set(vjp.input_values[:primal_inputs])
    invariant = set(vjp.input_values[:num_consts])
    found = []
    for node in vjp.nodes:
        if node.subgraph is None and all(v in primal for v in node.inputs):
            primal.update(node.outputs)
            if all(v in invariant for v in node.inputs):
                invariant.update(node.outputs)
            elif node.op in SAVED_OPS:
                found.append(node.output)
    users = vjp.users()
    for n, value in enumerate(found):
        readers = users.get(value, [])
        if (len(readers) == 1 and readers[0].op == "add" and readers[0].output.type == value.type
                and all(v in primal for v in readers[0].inputs)):
            found[n] = readers[0].output
    saved = []
    for value in dict.fromkeys(found):  # two products one add sums are saved once
        saved.extend(_activations_of(value, users, primal) or [value])
    return list(dict.fromkeys(saved))


def _activations_of(value: Value, users: dict[Value, list[Node]], primal: set[Value]) -> list[Value] | None:
    """The SAVED_ACTIVATIONS results that are the only readers of `value`, directly or through
    slices and adds of other forward values (a bias), holding no more numbers than it; None
    where anything else reads it on the way."""
    found, path = [], [value]
    for v in path:
        readers = users.get(v, [])
        if not readers:
            return None
        for node in readers:
            if node.op == "slice" or (node.op == "add" and node.output.type == v.type
                                      and all(u in primal for u in node.inputs)):
                path.append(node.output)
            elif node.op in SAVED_ACTIVATIONS:
                found.append(node.output)
            else:
                return None
    if sum(v.type.size for v in found) > value.type.size:
        return None
    return found


def _save_residuals(graph: Graph, node: Node, carries: list[int], products: list[Value],
                    vjp: Graph) -> list[Value]:
    """Stacks the forward scan `node` writes for its VJP: the carry entering each step (for the
    carry indices in `carries`), then each value of `products` (values of `vjp`, computed from its
    first inputs, the body's). Where the scan does not output them yet, it is replaced in place
    by one with the extra outputs, its own outputs kept (the same Values), so nothing that reads
    them changes; a product the body computes already is read from there, not computed twice."""
    from .simplify import attrs_key
    a = node.attrs
    c, k = a["num_consts"], a["num_carry"]
    body = node.subgraph
    extended = Graph(body.name)  # the body's nodes and values, plus what the VJP needs
    extended.inputs, extended.nodes, extended.outputs = list(body.inputs), list(body.nodes), list(body.outputs)
    known = {(n.op, tuple(id(v) for v in n.inputs), attrs_key(n.attrs)): n for n in body.nodes
             if n.subgraph is None}
    mapping = dict(zip(vjp.input_values, body.input_values))
    needed = set(products)
    for vnode in reversed(vjp.nodes):
        if any(v in needed for v in vnode.outputs):
            needed.update(vnode.inputs)
    for vnode in vjp.nodes:
        if not any(v in needed for v in vnode.outputs):
            continue
        ins = tuple(mapping[v] for v in vnode.inputs)
        key = (vnode.op, tuple(id(v) for v in ins), attrs_key(vnode.attrs))
        if key not in known:
            known[key] = vnode.clone(ins)
            extended.nodes.append(known[key])
        mapping.update(zip(vnode.outputs, known[key].outputs))
    names = {body.input_values[c + i]: f"saved_carry{i}" for i in carries}
    wanted = list(names) + [mapping[v] for v in products]

    stacked_at = {v: k + j for j, v in enumerate(body.output_values[k:])}
    missing = list(dict.fromkeys(v for v in wanted if v not in stacked_at))
    if missing:  # a scan differentiated before (grad of grad) stacks some of them already
        taken = set(body.output_names)
        for v in missing:
            name = names.get(v, "saved")
            while name in taken:
                name += "_"
            taken.add(name)
            extended.add_output(name, v)
        saving = make_scan(node.inputs, extended, a["length"], a["reverse"], c, k, node.loc, node.module)
        saving.outputs = (*node.outputs, *saving.outputs[len(node.outputs):])
        for v in node.outputs:
            v.producer = saving
        graph.nodes[graph.nodes.index(node)] = saving
        stacked_at.update({v: len(node.outputs) + n for n, v in enumerate(missing)})
        node = saving
    return [node.outputs[stacked_at[v]] for v in wanted]


def _scan_vjp(b: Builder, node: Node, gs: list[Value | None], wanted: Sequence[bool]) -> list[Value | None]:
    """The VJP of a scan: a scan over the same steps in the opposite order, giving the
    cotangents of the carries and of the consts and stacked inputs `wanted` says depend on what
    is differentiated (not of a constant, such as a column of ones, nor of the data).

    Residuals: the backward body is the VJP of the forward body, which reads the forward's
    values at step t. The forward scan stacks the results of its matrix products (SAVED_OPS) and
    the carries entering each step that the VJP reads, and nothing else; the backward body
    recomputes the forward's elementwise work from them (rematerialisation, as JAX's
    checkpointed scans). A product recomputed per step would cost as much as the forward's; an
    activation saved per step would cost memory for each of them, where they are cheap to
    recompute from the product they come from. But where a product's only readers are sigmoids
    and tanhs (an LSTM's gates), their results are saved instead: as many numbers, and no
    transcendental function computed twice.

    Backward loop: carry = (cotangent of the carry, running sum of the consts' cotangents),
    per step = (xs[t], the saved carry[t], the saved products[t], cotangent of ys[t]), outputs
    per step = the cotangent of xs[t]. (`hoist_accumulations` in passes/scan_rewrites.py takes
    the running sums that are sums of matrix products out of the loop.)"""
    a = node.attrs
    consts, carry, xs = split_inputs(node, node.inputs)
    c, k = a["num_consts"], a["num_carry"]
    body = node.subgraph
    n_ys = len(body.outputs) - k
    float_consts = [i for i in range(c) if is_float(consts[i].dtype) and wanted[i]]
    # a carry's cotangent runs through the steps even where its initial value is a constant
    float_carry = [i for i in range(k) if is_float(carry[i].dtype)]
    float_xs = [i for i in range(len(xs)) if is_float(xs[i].dtype) and wanted[c + k + i]]
    seeded_ys = [j for j in range(n_ys) if gs[k + j] is not None and is_float(node.outputs[k + j].dtype)]
    vjp = vjp_graph(body, [*float_consts, *(c + i for i in float_carry), *(c + k + i for i in float_xs)],
                    [*float_carry, *(k + j for j in seeded_ys)])
    products = _recomputed_products(vjp, len(body.inputs), c)

    back = Builder("body")
    inputs = body.input_values
    b_consts = [back.add_input(v.type, f"const{i}") for i, v in enumerate(inputs[:c])]
    b_ct_carry = [back.add_input(carry[i].type, f"ct_carry{i}") for i in float_carry]
    b_acc = [back.add_input(consts[i].type, f"ct_const{i}") for i in float_consts]
    b_xs = [back.add_input(v.type, f"x{i}") for i, v in enumerate(inputs[c + k:])]
    b_carry = [back.add_input(v.type, f"carry{i}") for i, v in enumerate(inputs[c:c + k])]
    b_products = [back.add_input(v.type, f"saved{i}") for i, v in enumerate(products)]
    b_ct_ys = [back.add_input(body.output_values[k + j].type, f"ct_y{j}") for j in seeded_ys]
    back.at(node)
    grads = _inline(back, vjp, [*b_consts, *b_carry, *b_xs, *b_ct_carry, *b_ct_ys],
                    dict(zip(products, b_products)))
    g_consts = grads[:len(float_consts)]
    g_carry = grads[len(float_consts):len(float_consts) + len(float_carry)]
    g_xs = grads[len(float_consts) + len(float_carry):]
    for i, g in enumerate(g_carry):
        back.add_output(f"ct_carry{i}", g)
    for i, (acc, g) in enumerate(zip(b_acc, g_consts)):
        back.add_output(f"ct_const{i}", back.add(acc, g))
    for i, g in enumerate(g_xs):
        back.add_output(f"ct_x{i}", g)
    from .simplify import dce
    back_body = dce(back.graph)
    read = {v for n in back_body.nodes for v in n.inputs} | set(back_body.output_values)
    saved_carries = [i for i, v in enumerate(b_carry) if v in read]
    unread = {v for i, v in enumerate(b_carry) if i not in saved_carries}
    back_body.inputs = [inp for inp in back_body.inputs if inp.value not in unread]
    saved = _save_residuals(b.graph, node, saved_carries, products, vjp)

    ct_carry_init = [gs[i] if gs[i] is not None else b.zeros_like(node.outputs[i]) for i in float_carry]
    acc_init = [b.zeros_like(consts[i]) for i in float_consts]
    ct_ys = [gs[k + j] for j in seeded_ys]
    backward = make_scan([*consts, *ct_carry_init, *acc_init, *xs, *saved, *ct_ys], back_body,
                         a["length"], not a["reverse"], c, len(float_carry) + len(float_consts),
                         node.loc, node.module)
    b.graph.nodes.append(backward)
    outs = backward.outputs
    result: list[Value | None] = [None] * len(node.inputs)
    for n, i in enumerate(float_carry):
        result[c + i] = outs[n]
    for n, i in enumerate(float_consts):
        result[i] = outs[len(float_carry) + n]
    for n, i in enumerate(float_xs):
        result[c + k + i] = outs[len(float_carry) + len(float_consts) + n]
    return result
