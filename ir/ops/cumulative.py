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
    """dL/dx[j] = sum over outputs i that include x[j] of g[i] * prod_{k <= i, k != j} x[k],
    in O(n) memory per line: `_exclusive_products`."""
    if not is_float(x.dtype):
        return (None,)
    return (_exclusive_products(b, g, x, out, axis, reverse, differentiable_after_zero=True),)


def _exclusive_products(b, g, x, out, axis, reverse, differentiable_after_zero):
    """cumprod's VJP, positions counted in the direction of the product:

    - before the line's first zero, suffix_sum(g * out)[j] / x[j] (x[j] is not zero);
    - at the first zero z, the products leaving x[z] out are the cumprod of the line with x[z]
      replaced by one (x'): suffix_sum(g * cumprod(x'))[z], never 0/0;
    - after it, every product includes x[z]: x[z] times the same sums over x' (this rule's first
      two cases on x'), which is 0 but differentiates to those sums, so that second-order
      gradients are exact at zeros too (`differentiable_after_zero`; else a constant 0).

    Each case is selected, not masked by a product, and the divisor is one where the first is
    not taken: no inf * 0 or 0/0 reaches the gradient, nor the gradient's own VJP."""
    zero = b.eq(x, b.scalar_like(0, x))
    zeros_so_far = b.cumsum(b.cast(zero, dtype="int32"), axis=axis, reverse=reverse)
    before_zero = b.eq(zeros_so_far, b.scalar_like(0, zeros_so_far))
    first_zero = b.logical_and(zero, b.eq(zeros_so_far, b.scalar_like(1, zeros_so_far)))
    one, nothing = b.scalar_like(1, x), b.scalar_like(0, x)
    before = b.div(b.cumsum(b.mul(g, out), axis=axis, reverse=not reverse), b.where(before_zero, x, one))
    skipping = b.where(first_zero, one, x)
    skipping_out = b.cumprod(skipping, axis=axis, reverse=reverse)
    at_zero = b.cumsum(b.mul(g, skipping_out), axis=axis, reverse=not reverse)
    after = nothing
    if differentiable_after_zero:
        others = _exclusive_products(b, g, skipping, skipping_out, axis, reverse, False)
        first = b.sum(b.where(first_zero, x, nothing), axes=(axis,), keepdims=True)  # 0
        after = b.mul(first, b.where(b.eq(b.sub(others, others), nothing), others, nothing))
    return b.where(before_zero, before, b.where(first_zero, at_zero, after))


_ATTRS = {"axis": Attr("int"), "reverse": Attr("bool", False)}

register(Primitive(
    "cumsum", OPAQUE, _cumulative_type, _along(np.cumsum), _cumsum_vjp, attrs=dict(_ATTRS),
    canon=_axis_canon, num_inputs=1,
    doc="Running sum along `axis` (from the end when `reverse`), in the operand's dtype."))

register(Primitive(
    "cumprod", OPAQUE, _cumulative_type, _along(np.cumprod), _cumprod_vjp, attrs=dict(_ATTRS),
    canon=_axis_canon, num_inputs=1,
    doc="Running product along `axis` (from the end when `reverse`); its VJP is exact at zeros "
        "and takes O(n) memory per line."))


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
