"""Reduction primitives: sum, max and argmax over some axes of one operand.

`canon` normalises `axes` (negative to non-negative, sorted, unique); the shape rules accept only
that form. The output keeps the operand's dtype (an int32 sum stays int32, unlike NumPy's
default), except argmax, which returns int64. mean is a frontend composite (sum * 1/n).
"""
from __future__ import annotations

import numpy as np

from ..registry import REDUCTION, Attr, OpTypeError, Primitive, register
from ..types import TensorType, is_float
from .shape import normalize_axes, normalize_axis, reduced_shape, require_canonical


def _numeric(x: TensorType) -> None:
    if x.dtype == "bool":
        raise OpTypeError("expects a numeric operand, got bool; cast it first", dtype=True)


def _nonempty(x: TensorType, axes: tuple[int, ...], what: str) -> None:
    for axis in axes:
        if x.shape[axis] == 0:
            raise OpTypeError(f"cannot take the {what} over axis {axis} of size 0")


def _reduced_type(x: TensorType, axes: tuple[int, ...], keepdims: bool) -> TensorType:
    _numeric(x)
    require_canonical("axes", axes, normalize_axes(axes, x.ndim))
    return x.with_shape(reduced_shape(x.shape, axes, keepdims))


def _sum_infer(x: TensorType, *, axes: tuple[int, ...], keepdims: bool) -> TensorType:
    return _reduced_type(x, axes, keepdims)  # an empty axis sums to zero


def _max_infer(x: TensorType, *, axes: tuple[int, ...], keepdims: bool) -> TensorType:
    out = _reduced_type(x, axes, keepdims)
    _nonempty(x, axes, "max")
    return out


def _axes_canon(types, attrs):
    (x,) = types
    return {**attrs, "axes": normalize_axes(attrs["axes"], x.ndim)}


def _with_kept_dims(b, v, in_shape, axes):
    """Reshape a reduction's output (or cotangent) to the keepdims shape, ready to broadcast."""
    kept = reduced_shape(in_shape, axes, keepdims=True)
    return v if v.shape == kept else b.reshape(v, shape=kept)


def _sum_vjp(b, g, x, *, out, axes, keepdims):
    g = _with_kept_dims(b, g, x.shape, axes)
    return (g if g.shape == x.shape else b.broadcast_to(g, shape=x.shape),)


def _max_vjp(b, g, x, *, out, axes, keepdims):
    """Ties share the cotangent evenly: g * mask / count, with mask = (x == max); where the
    maximum is NaN, the NaNs are its ties (PyTorch's rule: they would equal nothing)."""
    if not is_float(x.dtype):
        return (None,)
    top = _with_kept_dims(b, out, x.shape, axes)
    nan_ties = b.logical_and(b.ne(x, x), b.ne(top, top))
    mask = b.cast(b.logical_or(b.eq(x, top), nan_ties), dtype=x.dtype)
    count = b.sum(mask, axes=axes, keepdims=True)
    return (b.mul(mask, b.div(_with_kept_dims(b, g, x.shape, axes), count)),)


_AXES_ATTRS = {"axes": Attr("ints"), "keepdims": Attr("bool", False)}

register(Primitive(
    "sum", REDUCTION, _sum_infer,
    lambda x, *, axes, keepdims: np.asarray(np.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)),
    _sum_vjp, attrs=_AXES_ATTRS, canon=_axes_canon, num_inputs=1,
    doc="Sum over `axes` (may be empty), keeping the operand's dtype."))

register(Primitive(
    "max", REDUCTION, _max_infer,
    lambda x, *, axes, keepdims: np.asarray(np.max(x, axis=axes, keepdims=keepdims)),
    _max_vjp, attrs=_AXES_ATTRS, canon=_axes_canon, num_inputs=1,
    doc="Maximum over `axes` (NaN propagates); the VJP splits the cotangent among ties."))


# -- argmax ---------------------------------------------------------------------------------
def _argmax_canon(types, attrs):
    (x,) = types
    return {**attrs, "axis": normalize_axis(attrs["axis"], x.ndim)}


def _argmax_infer(x: TensorType, *, axis: int, keepdims: bool) -> TensorType:
    _numeric(x)
    require_canonical("axis", axis, normalize_axis(axis, x.ndim))
    _nonempty(x, (axis,), "argmax")
    return TensorType(reduced_shape(x.shape, (axis,), keepdims), "int64")


register(Primitive(
    "argmax", REDUCTION, _argmax_infer,
    lambda x, *, axis, keepdims: np.asarray(np.argmax(x, axis=axis, keepdims=keepdims)),
    lambda b, g, x, *, out, axis, keepdims: (None,),  # piecewise constant: no cotangent
    attrs={"axis": Attr("int"), "keepdims": Attr("bool", False)}, canon=_argmax_canon, num_inputs=1,
    doc="Index (int64) of the first maximum along `axis` (a NaN counts as the maximum)."))
