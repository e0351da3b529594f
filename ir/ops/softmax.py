"""Softmax along one axis, and its gradient, as primitives.

Composed from max, subtract, exp, sum and divide, softmax is four kernels that each read a row
of scores again (the max, the shifted exponentials and their sum, the division), and its
gradient is built from the VJPs of all four. As one op each backend computes a row in one pass
over it (numba-cpu: max, then exponentials and their sum, then the scaling, all while the row is
in cache), and the VJP is one op too: `softmax_grad(g, y) = y * (g - sum(g * y))` along the
axis. `softmax_grad` is linear in g and its own VJP is written in the same two ops, so
gradients of gradients work.

`zero_masked_rows`: a row whose entries are all -inf (attention to no key at all) gives zeros
instead of the NaN that -inf - -inf makes. PyTorch's F.softmax gives NaN (the default here),
its scaled_dot_product_attention zeros.
"""
from __future__ import annotations

import numpy as np

from ..registry import OPAQUE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, is_float
from .shape import normalize_axis, require_canonical


def lines_view(shape: tuple[int, ...], axis: int) -> tuple[int, int, int]:
    """The operand viewed as (before, n, after): the softmax runs along the middle axis."""
    size = lambda dims: int(np.prod(dims, dtype=np.int64))
    return size(shape[:axis]), shape[axis], size(shape[axis + 1:])


def _check_operand(x: TensorType, axis: int, role: str) -> None:
    if not is_float(x.dtype):
        raise OpTypeError(f"expects a floating-point {role}, got {x.dtype}; cast it first", dtype=True)
    require_canonical("axis", axis, normalize_axis(axis, x.ndim))
    if x.shape[axis] == 0:
        raise OpTypeError(f"cannot normalise along axis {axis} of size 0 (shape {x.shape})")


def _softmax_type(x: TensorType, *, axis: int, zero_masked_rows: bool) -> TensorType:
    _check_operand(x, axis, "operand")
    return x


def _softmax_grad_type(g: TensorType, y: TensorType, *, axis: int) -> TensorType:
    _check_operand(y, axis, "softmax output")
    if g != y:
        raise OpTypeError(f"the cotangent {g} must have the softmax output's type {y}")
    return y


def _axis_canon(types, attrs):
    return {**attrs, "axis": normalize_axis(attrs["axis"], types[-1].ndim)}


def _softmax(x: np.ndarray, *, axis: int, zero_masked_rows: bool) -> np.ndarray:
    peak = np.max(x, axis=axis, keepdims=True)
    if zero_masked_rows:
        peak = np.where(peak == -np.inf, 0, peak)
    with np.errstate(invalid="ignore"):  # -inf - -inf: NaN on a line of -inf, as asked
        e = np.exp(x - peak)
    total = np.sum(e, axis=axis, keepdims=True)
    if zero_masked_rows:
        total = np.where(total == 0, 1, total)
    return (e / total).astype(x.dtype)


def _softmax_grad(g: np.ndarray, y: np.ndarray, *, axis: int) -> np.ndarray:
    return (y * (g - np.sum(g * y, axis=axis, keepdims=True))).astype(y.dtype)


def _softmax_vjp(b, g, x, *, out, axis, zero_masked_rows):
    return (b.softmax_grad(g, out, axis=axis),)


def _softmax_grad_vjp(b, h, g, y, *, out, axis):
    """dx = y (g - s) with s = sum(g y): linear in g, whose cotangent is softmax_grad(h, y) (the
    Jacobian is symmetric); y's is h (g - s) - g sum(h y)."""
    row_sum = lambda v: b.sum(v, axes=(axis,), keepdims=True)
    d_g = b.softmax_grad(h, y, axis=axis)
    d_y = b.sub(b.mul(h, b.sub(g, row_sum(b.mul(g, y)))), b.mul(g, row_sum(b.mul(h, y))))
    return d_g, d_y


register(Primitive(
    "softmax", OPAQUE, _softmax_type, _softmax, _softmax_vjp,
    attrs={"axis": Attr("int"), "zero_masked_rows": Attr("bool", False)},
    canon=_axis_canon, num_inputs=1,
    doc="exp(x - max) / sum(exp(x - max)) along `axis`; with `zero_masked_rows`, a row of -inf "
        "gives zeros rather than NaN."))

register(Primitive(
    "softmax_grad", OPAQUE, _softmax_grad_type, _softmax_grad, _softmax_grad_vjp,
    attrs={"axis": Attr("int")}, canon=_axis_canon, num_inputs=2,
    doc="The softmax VJP: y * (g - sum(g * y, axis)) for cotangent g and softmax output y."))
