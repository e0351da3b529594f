"""Rewrites of scan nodes that move per-step work out of the loop.

`hoist_accumulations`: a carry that only sums a matrix product or a reduction per step,

    acc' = acc + transpose(a_t) @ b_t        (or acc + a_t @ b_t, or acc + sum(x_t, axes))

is what a scan's VJP makes of a loop-invariant weight's gradient (passes/autodiff.py). Inside
the loop it is one small GEMM per step plus a read-modify-write of the whole accumulator; after
the loop it is one GEMM over the stacked (T*N, .) operands, with the whole contraction for a
blocked GEMM to work on. (Measured on lstm-112 at 1 thread: the backward loop went from 33.6
to 19.7 ms and the work after it from 5.5 to 20.0 ms, no gain yet: numba-cpu's GEMM at that size
runs at 0.7x NumPy's.) The body emits the operands per step instead (a stacked input or output of the loop is
read as it is, not emitted again), and the carry leaves the loop: its final value is init + the product of
the stacks. The sum is taken in another order, so the result differs by rounding only.

`last_steps_from_carries`: the last step of a per-step output that is the carry itself (an
LSTM's `out[:, -1]`) is the scan's final carry (its `h_n`). Read from there, the stack of
outputs may go unread (prune_scans drops it), and the gradient enters the backward loop as the
final carry's cotangent, not as a stack of zeros with one step set that the loop reads each step.
"""
from __future__ import annotations

from graphc.ir import Builder, Graph, Node, Value
from graphc.ir.ops.control import SCAN_OP, make_scan

from .simplify import _rebuild, dce, rebuild_scans


def _accumulated_term(body: Graph, scan: Node, i: int) -> Node | None:
    """The node whose result carry `i` of `scan` adds to itself each step (a matmul of two
    matrices or a sum), when the carry is read by nothing else; else None."""
    c = scan.attrs["num_consts"]
    acc, new = body.input_values[c + i], body.output_values[i]
    users = body.users()
    add = new.producer
    if (add is None or add.op != "add" or acc not in add.inputs or users.get(acc) != [add]
            or users.get(new) or body.output_values.count(new) != 1 or acc in body.output_values):
        return None
    term = add.inputs[1] if add.inputs[0] is acc else add.inputs[0]
    node = term.producer
    if term is acc or term.type != acc.type or node is None or len(users.get(term, [])) != 1:
        return None
    if node.op == "matmul" and all(len(v.shape) == 2 for v in node.inputs):
        return node
    if node.op == "sum":
        return node
    return None


def _hoistable(scan: Node) -> dict[int, Node]:
    body = scan.subgraph
    terms = {i: _accumulated_term(body, scan, i) for i in range(scan.attrs["num_carry"])}
    return {i: t for i, t in terms.items() if t is not None}


def hoist_accumulations(graph: Graph) -> Graph:
    """Take each scan's carries that accumulate a per-step matrix product or sum out of the
    loop: one product (or reduction) over the stacked operands after it, added to the carry's
    initial value."""
    if not any(node.op == SCAN_OP and _hoistable(node) for node in graph.nodes):
        return graph
    return rebuild_scans(graph, lambda b, node, ins: (_hoisted_scan(b, node, ins, terms)
                                                      if (terms := _hoistable(node)) else None))


def _hoisted_scan(b: Builder, scan: Node, ins: list[Value], terms: dict[int, Node]
                  ) -> dict[Value, Value]:
    """Emit the scan without the carries in `terms` and, after it, their sums; returns the
    values replacing the scan's outputs."""
    a, body = scan.attrs, scan.subgraph
    c, k, length = a["num_consts"], a["num_carry"], a["length"]
    stacked_inputs = dict(zip(body.input_values[c + k:], ins[c + k:]))  # slice -> its stack
    operands: dict[int, list[Value]] = {}  # per hoisted carry: the per-step values it needs
    for i, node in terms.items():
        if node.op == "matmul":
            left, right = node.inputs
            transposed = left.producer is not None and left.producer.op == "transpose"
            operands[i] = [left.producer.inputs[0] if transposed else left, right]
        else:
            operands[i] = [node.inputs[0]]
    outputs_at = {v: q for q, v in enumerate(body.output_values[k:])}  # stacked already
    emitted = list(dict.fromkeys(v for vs in operands.values() for v in vs
                                 if v not in stacked_inputs and v not in outputs_at))

    kept = [i for i in range(k) if i not in terms]
    new_body = Graph(body.name)
    new_body.inputs = [inp for p, inp in enumerate(body.inputs) if not (c <= p < c + k and p - c in terms)]
    new_body.nodes = list(body.nodes)
    taken = set(body.output_names)
    new_body.outputs = [body.outputs[i] for i in kept] + body.outputs[k:]
    for n, v in enumerate(emitted):
        name = f"step_operand{n}"
        while name in taken:
            name += "_"
        taken.add(name)
        new_body.add_output(name, v)
    loop = make_scan([v for p, v in enumerate(ins) if not (c <= p < c + k and p - c in terms)],
                     dce(new_body), length, a["reverse"], c, len(kept), scan.loc, scan.module)
    b.graph.nodes.append(loop)

    n_ys = len(body.outputs) - k
    stacks = dict(stacked_inputs)
    stacks.update({v: loop.outputs[len(kept) + q] for v, q in outputs_at.items()})
    stacks.update(zip(emitted, loop.outputs[len(kept) + n_ys:]))
    replaced = {scan.outputs[i]: loop.outputs[n] for n, i in enumerate(kept)}
    replaced.update(zip(scan.outputs[k:], loop.outputs[len(kept):len(kept) + n_ys]))
    for i, node in terms.items():
        replaced[scan.outputs[i]] = b.add(ins[c + i], _summed_over_steps(b, node, [stacks[v] for v in operands[i]]))
    return replaced


def _summed_over_steps(b: Builder, node: Node, stacks: list[Value]) -> Value:
    """The sum over all steps of `node`'s per-step result, from its operands' stacks."""
    if node.op == "sum":
        (stack,) = stacks
        axes = (0, *(axis + 1 for axis in node.attrs["axes"]))
        total = b.sum(stack, axes=axes, keepdims=False)
        return total if total.shape == node.output.shape else b.reshape(total, shape=node.output.shape)
    left, right = stacks
    steps = left.shape[0]
    if node.inputs[0].producer is not None and node.inputs[0].producer.op == "transpose":
        # sum_t a_t^T b_t = A^T B with A, B the (T*N, .) stacks of a_t and b_t
        rows = b.reshape(left, shape=(steps * left.shape[1], left.shape[2]))
        left_all = b.transpose(rows, perm=(1, 0))
    else:  # sum_t a_t b_t = [a_0 a_1 ...] [b_0; b_1; ...]
        side_by_side = b.transpose(left, perm=(1, 0, 2))
        left_all = b.reshape(side_by_side, shape=(left.shape[1], steps * left.shape[2]))
    right_all = b.reshape(right, shape=(steps * right.shape[1], right.shape[2]))
    return b.matmul(left_all, right_all)


__all__ = ["hoist_accumulations"]


def last_steps_from_carries(graph: Graph) -> Graph:
    """slice(ys)[last step], directly or under a transpose, -> the final carry, where the scan's
    body returns that carry (the same value) as the per-step output ys."""
    if not any(node.op == SCAN_OP for node in graph.nodes):
        return graph
    return _rebuild(graph, _final_carry_for_last_step)


def _final_carry_for_last_step(b: Builder, node: Node, ins: tuple[Value, ...]) -> Value | None:
    if node.op != "slice":
        return None
    stacked, perm, new_stacked = node.inputs[0], None, ins[0]
    if stacked.producer is not None and stacked.producer.op == "transpose":
        perm = stacked.producer.attrs["perm"]
        stacked, new_stacked = stacked.producer.inputs[0], new_stacked.producer.inputs[0]
    scan = stacked.producer
    if scan is None or scan.op != SCAN_OP:
        return None
    k, length = scan.attrs["num_carry"], scan.attrs["length"]
    q = scan.outputs.index(stacked)
    returned = scan.subgraph.output_values
    carries = [i for i in range(k) if returned[i] is returned[q]] if q >= k else []
    step_axis = perm.index(0) if perm is not None else 0
    last = 0 if scan.attrs["reverse"] else length - 1
    a = node.attrs
    if not carries or node.output.shape[step_axis] != 1 or a["starts"][step_axis] != last:
        return None
    final = new_stacked.producer.outputs[carries[0]]
    if perm is not None:  # transpose(expand_dims(x, 0), perm) = expand_dims(transpose(x, rest), step_axis)
        rest = tuple(p - 1 for p in perm if p != 0)
        if rest != tuple(range(len(rest))):
            final = b.transpose(final, perm=rest)
    one_step = b.expand_dims(final, axes=(step_axis,))
    if one_step.type == node.output.type:
        return one_step

    def bounds(name: str, at_step: int) -> tuple[int, ...]:
        return tuple(at_step if axis == step_axis else bound for axis, bound in enumerate(a[name]))
    return b.slice(one_step, starts=bounds("starts", 0), stops=bounds("stops", 1), steps=bounds("steps", 1))
