"""Cumulative primitives: cumsum and cumprod along one axis, forward or reversed; argsort.

Each output element depends on a whole prefix (or suffix) of its line, so these are library
(opaque) ops, not elementwise ones: the Numba backends run one serial loop per line along the
axis. The output keeps the operand's dtype; PyTorch's promotion of integers to int64 is the
frontend's (graphc/functions.py).
"""
from __future__ import annotations

import numpy as np

from ..registry import OPAQUE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, is_float
from .shape import normalize_axis, require_canonical


def _cumulative_type(x: TensorType, *, axis: int, reverse: bool) -> TensorType:
    if x.dtype == "bool":
        raise OpTypeError("expects a numeric operand, got bool; cast it first", dtype=True)
    if x.ndim == 0:
        raise OpTypeError("expects an operand of rank 1 or more, got a 0-d one")
    require_canonical("axis", axis, normalize_axis(axis, x.ndim))
    return x


def _axis_canon(types, attrs):
    (x,) = types
    return {**attrs, "axis": normalize_axis(attrs["axis"], max(x.ndim, 1))}


def _along(fn):
    """The NumPy oracle of a cumulative op: `fn` along `axis`, on the flipped line if reversed."""
    def impl(x: np.ndarray, *, axis: int, reverse: bool) -> np.ndarray:
        if reverse:
            return np.ascontiguousarray(np.flip(fn(np.flip(x, axis), axis=axis, dtype=x.dtype), axis))
        return np.asarray(fn(x, axis=axis, dtype=x.dtype))
    impl.__name__ = fn.__name__
    return impl


def _cumsum_vjp(b, g, x, *, out, axis, reverse):
    """Each input element adds into every later output: its cotangent sums the later
    cotangents, a cumulative sum the other way."""
    if not is_float(x.dtype):
        return (None,)
    return (b.cumsum(g, axis=axis, reverse=not reverse),)


def _cumprod_vjp(b, g, x, *, out, axis, reverse):
    """dL/dx[j] = sum over outputs i that include x[j] of g[i] * prod_{k <= i, k != j} x[k].

    The products leaving x[j] out are taken directly, as a cumprod of x with x[j] replaced by
    one (an n x n array per line, n the axis length), never as out / x[j], so a zero in x gives
    the exact gradient instead of 0/0. Memory is O(n^2) per line along the axis."""
    if not is_float(x.dtype):
        return (None,)
    n, trailing = x.shape[axis], (1,) * (len(x.shape) - axis - 1)
    j, i = np.arange(n).reshape(n, 1), np.arange(n).reshape(1, n)
    # axis `axis` of the n x n arrays is j (the input differentiated), axis + 1 is i (or k).
    left_out = b.const((j == i).reshape((n, n) + trailing), "bool")
    included = b.const(((i <= j) if reverse else (i >= j)).reshape((n, n) + trailing), "bool")
    lines = b.where(left_out, b.scalar_like(1, x), b.expand_dims(x, axes=(axis,)))
    partial = b.cumprod(lines, axis=axis + 1, reverse=reverse)
    # selected, not masked by a product: an output x[j] does not reach sends it nothing, even
    # an infinite or NaN cotangent (inf * 0 would be NaN)
    weighted = b.where(included, b.mul(partial, b.expand_dims(g, axes=(axis,))), b.scalar_like(0, x))
    return (b.sum(weighted, axes=(axis + 1,), keepdims=False),)


_ATTRS = {"axis": Attr("int"), "reverse": Attr("bool", False)}

register(Primitive(
    "cumsum", OPAQUE, _cumulative_type, _along(np.cumsum), _cumsum_vjp, attrs=dict(_ATTRS),
    canon=_axis_canon, num_inputs=1,
    doc="Running sum along `axis` (from the end when `reverse`), in the operand's dtype."))

register(Primitive(
    "cumprod", OPAQUE, _cumulative_type, _along(np.cumprod), _cumprod_vjp, attrs=dict(_ATTRS),
    canon=_axis_canon, num_inputs=1,
    doc="Running product along `axis` (from the end when `reverse`); its VJP is exact at zeros."))


# -- argsort ----------------------------------------------------------------------------------
# Like the cumulative ops, each output element depends on its whole line: a library op of its
# own, run one line at a time. sort and topk are frontend composites: take_along_axis of the
# operand at these indices (and a slice of them), which differentiates through its scatter.
def _argsort_type(x: TensorType, *, axis: int, descending: bool) -> TensorType:
    return TensorType(_cumulative_type(x, axis=axis, reverse=False).shape, "int64")


def _argsort(x: np.ndarray, *, axis: int, descending: bool) -> np.ndarray:
    """Stable: equal elements keep their order, in both directions; NaN sorts as the largest
    (last ascending, first descending), as in PyTorch and NumPy. Descending is the ascending
    order of the line read backwards, read backwards: ties then come out in their own order."""
    if not descending:
        return np.argsort(x, axis=axis, kind="stable")
    n = x.shape[axis]
    backwards = np.argsort(np.flip(x, axis), axis=axis, kind="stable")
    return np.ascontiguousarray(n - 1 - np.flip(backwards, axis))


register(Primitive(
    "argsort", OPAQUE, _argsort_type, _argsort, lambda b, g, x, *, out, axis, descending: (None,),
    attrs={"axis": Attr("int"), "descending": Attr("bool", False)}, canon=_axis_canon, num_inputs=1,
    doc="The int64 positions that sort each line along `axis` (stable; NaN sorts as the largest)."))
