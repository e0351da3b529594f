"""Row blocks of a scan body: the body at a fraction of its batch, for running blocks of rows
through the whole loop side by side.

A recurrent layer's step computes row b of its new state from row b of its state and of its
input alone, and from weights every row shares: h' = f(x_t @ W + h @ U). Its loop can then run
as independent loops over blocks of rows, one per thread, with no synchronisation per step and
every row's data staying on the core that computes it (backends/numba_cpu/driver.py). Run as one
loop over the whole batch, each step's products and gates are parallel regions of their own, and
their results cross between the cores every step.

`row_block_body(body, num_consts, num_carry, rows)` proves that of a body and gives it retyped
with `rows` rows. The proof follows the batch axis (axis 0 of every carry and of every step's
input) through the body's ops: a value is *batched* (its row b belongs to row b of the batch) or
*shared* (read whole by every row: the scan's consts, constants, what is computed from them
alone). A const as tall as the batch is shared where that proves the split, else batched (each
block reads its rows of it: a bias broadcast to the batch before the loop). An op may read
batched values only as it keeps rows apart: elementwise (a shared operand broadcast along axis 0),
a batched matrix times a shared one, slices, concatenations, reshapes, transposes, reductions and
softmaxes that keep axis 0 as it is; a shared row broadcast to the batch is batched. Anything
else that reads a batched value (a reduction over the batch, a product contracting it, a gather)
refuses the split, as do a shared value aligned row by row with a batched one and a random draw.
Every carry and per-step output must come out batched.
"""
from __future__ import annotations

from typing import Any

from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.registry import ELEMENTWISE, PRIMITIVES, SOURCE, OpTypeError, get


class _Refused(Exception):
    """The body's rows are not independent (internal: row_block_body returns None)."""


def _axes(axes: Any, ndim: int) -> set[int]:
    return {a % ndim for a in (axes if isinstance(axes, tuple) else (axes,))} if ndim else set()


def _keeps_rows(node: Node, batched: list[bool], batch: int) -> tuple[bool, tuple[str, ...]]:
    """(whether `node`'s result is batched, the names of its attributes whose leading int is the
    batch's extent) where it keeps rows apart; else raises _Refused."""
    op, ins, attrs = node.op, node.inputs, node.attrs
    out = node.outputs[0]
    if not any(batched):
        if op == "broadcast_to" and attrs["shape"] and attrs["shape"][0] == batch and (
                len(ins[0].shape) < len(attrs["shape"]) or ins[0].shape[0] == 1):
            return True, ("shape",)  # the same row for every row of the batch
        if get(op).kind == SOURCE and op != "constant":
            raise _Refused  # a random draw over the batch's shape
        return False, ()
    rank = len(out.shape)
    if get(op).kind == ELEMENTWISE:
        for v, b in zip(ins, batched):
            if b and len(v.shape) != rank:
                raise _Refused
            if not b and len(v.shape) == rank and v.shape[0] != 1:
                raise _Refused  # a shared operand aligned with the rows
        return True, ()
    if op == "matmul":
        x, y = ins
        # x's leading axis stays the result's: x is a matrix or a stack, y no stack of more
        shared_y = len(y.shape) <= 2 or len(y.shape) < len(x.shape) or y.shape[0] == 1
        if batched[0] and not batched[1] and 2 <= len(x.shape) >= len(y.shape) and shared_y:
            return True, ()
        if all(batched) and len(x.shape) == len(y.shape) >= 3:
            return True, ()  # a batch of products
        raise _Refused
    if not all(batched):
        raise _Refused  # a shared operand concatenated or combined with rows
    x = ins[0]
    if op == "slice":
        if (attrs["starts"][0], attrs["stops"][0], attrs["steps"][0]) != (0, batch, 1):
            raise _Refused
        return True, ("stops",)
    if op == "slice_grad":
        if attrs["shape"][0] != batch or (attrs["starts"][0], attrs["stops"][0], attrs["steps"][0]) != (0, batch, 1):
            raise _Refused
        return True, ("shape", "stops")
    if op == "concatenate" and attrs["axis"] % rank != 0:
        return True, ()
    if op in ("reshape", "broadcast_to") and attrs["shape"][0] == batch and len(x.shape) >= 1:
        if op == "reshape" or len(x.shape) == rank:
            return True, ("shape",)
    if op == "transpose" and attrs["perm"][0] == 0:
        return True, ()
    if op in ("sum", "max") and 0 not in _axes(attrs["axes"], len(x.shape)):
        return True, ()
    if op == "argmax" and 0 not in _axes(attrs["axis"], len(x.shape)):
        return True, ()
    if op in ("softmax", "softmax_grad") and 0 not in _axes(attrs["axis"], rank):
        return True, ()
    if op == "expand_dims" and 0 not in _axes(attrs["axes"], rank):
        return True, ()
    if op == "squeeze" and 0 not in _axes(attrs["axes"], len(x.shape)):
        return True, ()
    if op == "cast":
        return True, ()
    raise _Refused


def _with_rows(attrs: dict[str, Any], keys: tuple[str, ...], rows: int) -> dict[str, Any]:
    """`attrs` with the leading int of each attribute `keys` names set to `rows`."""
    if not keys:
        return attrs
    new = dict(attrs)
    for key in keys:
        new[key] = (rows, *attrs[key][1:])
    return new


def row_block_body(body: Graph, num_consts: int, num_carry: int, rows: int) -> Graph | None:
    """`body` (a scan's body: consts, carries, step inputs) retyped for `rows` rows of its batch
    (fewer than it has), or None where its rows are not independent (see the module docstring)
    or where it has no batch (a carry or step input without axis 0 of one extent)."""
    carried = body.input_values[num_consts:]
    if not carried or any(not v.shape for v in carried):
        return None
    batch = carried[0].shape[0]
    if rows <= 0 or rows >= batch or any(v.shape[0] != batch for v in carried):
        return None
    # A const of the batch's extent may be rows too (a bias broadcast to the batch before the
    # loop) or a matrix every row reads whole (a weight as tall as the batch): shared first.
    for split_consts in (False, True):
        try:
            return _retyped(body, num_consts, batch, rows, split_consts)
        except (_Refused, OpTypeError):
            continue
    return None


def _retyped(body: Graph, num_consts: int, batch: int, rows: int, split_consts: bool) -> Graph:
    new = Graph(body.name)
    batched: dict[Value, bool] = {}
    mapping: dict[Value, Value] = {}
    for i, inp in enumerate(body.inputs):
        t = inp.value.type
        rowed = i >= num_consts or (split_consts and bool(t.shape) and t.shape[0] == batch)
        batched[inp.value] = rowed
        mapping[inp.value] = new.add_input(TensorType((rows, *t.shape[1:]), t.dtype) if rowed else t,
                                           inp.name, inp.role)
    for node in body.nodes:
        if node.subgraph is not None or len(node.outputs) != 1:
            raise _Refused
        flags = [batched[v] for v in node.inputs]
        out_batched, keys = _keeps_rows(node, flags, batch)
        attrs = _with_rows(node.attrs, keys, rows)
        ins = tuple(mapping[v] for v in node.inputs)
        out = PRIMITIVES[node.op].infer(*(v.type for v in ins), **attrs)
        old = node.outputs[0].type
        if out != (TensorType((rows, *old.shape[1:]), old.dtype) if out_batched else old):
            raise _Refused
        clone = Node(node.op, ins, attrs, (out,), node.loc, None, node.module)
        new.nodes.append(clone)
        batched[node.outputs[0]] = out_batched
        mapping[node.outputs[0]] = clone.outputs[0]
    if not all(batched[v] for v in body.output_values):
        raise _Refused
    new.outputs = [(name, mapping[v]) for name, v in body.outputs]
    return new


__all__ = ["row_block_body"]
