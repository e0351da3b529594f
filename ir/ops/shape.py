"""Shape primitives: ops that move elements without arithmetic.

reshape, transpose, broadcast_to, expand_dims, squeeze, slice (with `slice_grad`, its
scatter-into-zeros adjoint), flip, concatenate and pad. A negative-step slice is a flip followed
by a positive-step slice, so `slice` keeps positive steps only.

Attributes have one canonical spelling. `canon` turns what a user may write (negative axes,
NumPy-style out-of-range slice bounds) into it, and the shape rules accept only that form, so
passes, backends and serialized graphs never meet two spellings of the same op.
Attribute values that are wrong whatever the operands (a negative dimension, a zero step)
raise AttributeSchemaError; attributes that do not fit the operands raise ShapeError.

The axis helpers at the top are shared with the reduction and indexing families.
"""
from __future__ import annotations

import builtins
from typing import Any, Sequence

import numpy as np

from ..errors import AttributeSchemaError
from ..registry import SHAPE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, broadcast_shapes


# -- attribute helpers -------------------------------------------------------------------------
def normalize_axis(axis: int, ndim: int) -> int:
    """Map an axis in [-ndim, ndim) to [0, ndim); raise OpTypeError outside that range."""
    if not -ndim <= axis < ndim:
        raise OpTypeError(f"axis {axis} is out of range for rank {ndim}")
    return axis % ndim


def normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
    """Sorted, unique, non-negative axes; an axis named twice (after normalising) is an error."""
    normal = [normalize_axis(a, ndim) for a in axes]
    if len(set(normal)) != len(normal):
        raise OpTypeError(f"duplicate axes in {tuple(axes)} for rank {ndim}")
    return tuple(sorted(normal))


def require_canonical(name: str, given: Any, canonical: Any) -> None:
    """Shape rules see attributes exactly as `canon` wrote them; anything else is a bug upstream."""
    if given != canonical:
        raise OpTypeError(f"{name} {given} is not in canonical form {canonical}; "
                          "build the op with Builder.bind, which canonicalises attributes")


def check_dims(op: str, shape: tuple[int, ...], hint: str = "") -> None:
    if any(d < 0 for d in shape):
        raise AttributeSchemaError(f"{op}: shape {shape} has a negative dimension{hint}")


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> tuple[int, ...]:
    """The shape left after reducing `axes` (kept as size 1 when `keepdims`)."""
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _copy(fn):
    """Reference impls return fresh C-contiguous arrays, never views aliasing an operand."""
    def run(*args, **kwargs):
        return np.array(fn(*args, **kwargs), copy=True, order="C")
    run.__name__ = getattr(fn, "__name__", "impl")
    return run


def _shape_op(name, infer, impl, vjp, attrs, canon=None, num_inputs=1, doc="", view=False):
    register(Primitive(name, SHAPE, infer, _copy(impl), vjp, attrs=attrs, canon=canon,
                       num_inputs=num_inputs, doc=doc, view=view))


# -- reshape --------------------------------------------------------------------------------
def _reshape_infer(x: TensorType, *, shape: tuple[int, ...]) -> TensorType:
    check_dims("reshape", shape, hint=" (the frontend resolves -1 before binding)")
    size = int(np.prod(shape, dtype=np.int64))
    if size != x.size:
        raise OpTypeError(f"cannot reshape {x.shape} ({x.size} elements) to {shape} ({size} elements)")
    return x.with_shape(shape)


_shape_op("reshape", _reshape_infer, lambda x, *, shape: x.reshape(shape),
          lambda b, g, x, *, out, shape: (b.reshape(g, shape=x.shape),),
          attrs={"shape": Attr("ints")}, view=True,
          doc="Same elements in C order, new shape of the same size.")


# -- transpose ------------------------------------------------------------------------------
def _check_perm_length(x: TensorType, perm: tuple[int, ...]) -> None:
    if len(perm) != x.ndim:
        raise OpTypeError(f"perm {perm} has {len(perm)} entries for rank {x.ndim}")


def _transpose_canon(types, attrs):
    (x,) = types
    _check_perm_length(x, attrs["perm"])
    return {"perm": tuple(normalize_axis(a, x.ndim) for a in attrs["perm"])}


def _transpose_infer(x: TensorType, *, perm: tuple[int, ...]) -> TensorType:
    _check_perm_length(x, perm)
    if sorted(perm) != list(range(x.ndim)):
        raise OpTypeError(f"perm {perm} is not a permutation of the axes 0..{x.ndim - 1}")
    return x.with_shape(tuple(x.shape[p] for p in perm))


def _transpose_vjp(b, g, x, *, out, perm):
    inverse = tuple(int(i) for i in np.argsort(perm))
    return (b.transpose(g, perm=inverse),)


_shape_op("transpose", _transpose_infer, lambda x, *, perm: np.transpose(x, perm), _transpose_vjp,
          attrs={"perm": Attr("ints")}, canon=_transpose_canon,
          doc="Output axis i is input axis perm[i].")


# -- broadcast_to ---------------------------------------------------------------------------
def _broadcast_to_infer(x: TensorType, *, shape: tuple[int, ...]) -> TensorType:
    check_dims("broadcast_to", shape)
    try:
        fits = len(shape) >= x.ndim and broadcast_shapes(x.shape, shape) == shape
    except ValueError:
        fits = False
    if not fits:
        raise OpTypeError(f"cannot broadcast {x.shape} to {shape}")
    return x.with_shape(shape)


_shape_op("broadcast_to", _broadcast_to_infer, lambda x, *, shape: np.broadcast_to(x, shape),
          lambda b, g, x, *, out, shape: (b.unbroadcast(g, x.shape),),
          attrs={"shape": Attr("ints")}, doc="NumPy broadcasting to an explicit shape.")


# -- expand_dims / squeeze --------------------------------------------------------------------
def _expand_dims_canon(types, attrs):
    (x,) = types
    return {"axes": normalize_axes(attrs["axes"], x.ndim + len(attrs["axes"]))}


def _expand_dims_infer(x: TensorType, *, axes: tuple[int, ...]) -> TensorType:
    require_canonical("axes", axes, normalize_axes(axes, x.ndim + len(axes)))
    shape = list(x.shape)
    for axis in axes:  # ascending, so each index already counts the earlier insertions
        shape.insert(axis, 1)
    return x.with_shape(tuple(shape))


def _squeeze_canon(types, attrs):
    (x,) = types
    return {"axes": normalize_axes(attrs["axes"], x.ndim)}


def _squeeze_infer(x: TensorType, *, axes: tuple[int, ...]) -> TensorType:
    require_canonical("axes", axes, normalize_axes(axes, x.ndim))
    for axis in axes:
        if x.shape[axis] != 1:
            raise OpTypeError(f"cannot squeeze axis {axis} of size {x.shape[axis]}")
    return x.with_shape(reduced_shape(x.shape, axes, keepdims=False))


_shape_op("expand_dims", _expand_dims_infer, lambda x, *, axes: np.expand_dims(x, axes),
          lambda b, g, x, *, out, axes: (b.squeeze(g, axes=axes),),
          attrs={"axes": Attr("ints")}, canon=_expand_dims_canon, view=True,
          doc="Insert size-1 axes; `axes` index the output, as in np.expand_dims.")
_shape_op("squeeze", _squeeze_infer, lambda x, *, axes: np.squeeze(x, axis=axes),
          lambda b, g, x, *, out, axes: (b.expand_dims(g, axes=axes),),
          attrs={"axes": Attr("ints")}, canon=_squeeze_canon, view=True,
          doc="Remove the named axes, each of which must have size 1.")


# -- slice and its adjoint slice_grad -----------------------------------------------------------
def _slice_bounds(op: str, shape: tuple[int, ...], starts: tuple[int, ...], stops: tuple[int, ...],
                  steps: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Canonical bounds: Python's slice semantics, then stop >= start (so empty is start:start)."""
    if not len(starts) == len(stops) == len(steps) == len(shape):
        raise OpTypeError(f"needs one start, stop and step per axis ({len(shape)}), "
                          f"got {len(starts)}, {len(stops)} and {len(steps)}")
    if any(step <= 0 for step in steps):
        raise AttributeSchemaError(f"{op}: steps must be positive, got {steps}")
    bounds = [builtins.slice(*args).indices(d) for *args, d in zip(starts, stops, steps, shape)]
    return {"starts": tuple(start for start, _, _ in bounds),
            "stops": tuple(max(start, stop) for start, stop, _ in bounds),
            "steps": tuple(steps)}


def _sliced_shape(op: str, shape: tuple[int, ...], starts, stops, steps) -> tuple[int, ...]:
    """Check that the bounds are canonical for `shape` and return the shape they select."""
    canonical = _slice_bounds(op, shape, starts, stops, steps)
    require_canonical("starts/stops/steps", (starts, stops, steps), tuple(canonical.values()))
    return tuple(len(range(*args)) for args in zip(starts, stops, steps))


def _index(starts, stops, steps) -> tuple[builtins.slice, ...]:
    return tuple(builtins.slice(*args) for args in zip(starts, stops, steps))


_SLICE_ATTRS = {"starts": Attr("ints"), "stops": Attr("ints"), "steps": Attr("ints")}


def _slice_canon(types, attrs):
    (x,) = types
    return _slice_bounds("slice", x.shape, attrs["starts"], attrs["stops"], attrs["steps"])


def _slice_infer(x: TensorType, *, starts, stops, steps) -> TensorType:
    return x.with_shape(_sliced_shape("slice", x.shape, starts, stops, steps))


def _slice_vjp(b, g, x, *, out, starts, stops, steps):
    return (b.slice_grad(g, shape=x.shape, starts=starts, stops=stops, steps=steps),)


_shape_op("slice", _slice_infer, lambda x, *, starts, stops, steps: x[_index(starts, stops, steps)],
          _slice_vjp, attrs=_SLICE_ATTRS, canon=_slice_canon,
          doc="x[start:stop:step, ...] with one positive-step slice per axis.")


def _slice_grad_canon(types, attrs):
    bounds = _slice_bounds("slice_grad", attrs["shape"], attrs["starts"], attrs["stops"], attrs["steps"])
    return {"shape": attrs["shape"], **bounds}


def _slice_grad_infer(g: TensorType, *, shape, starts, stops, steps) -> TensorType:
    check_dims("slice_grad", shape)
    selected = _sliced_shape("slice_grad", shape, starts, stops, steps)
    if g.shape != selected:
        raise OpTypeError(f"operand shape {g.shape} differs from the shape {selected} "
                          f"these bounds select from {shape}")
    return TensorType(shape, g.dtype)


def _slice_grad_impl(g, *, shape, starts, stops, steps):
    out = np.zeros(shape, g.dtype)
    out[_index(starts, stops, steps)] = g
    return out


# slice_grad's own VJP is the slice it inverts, which is what makes grad-of-grad work.
_shape_op("slice_grad", _slice_grad_infer, _slice_grad_impl,
          lambda b, g, x, *, out, shape, starts, stops, steps:
          (b.slice(g, starts=starts, stops=stops, steps=steps),),
          attrs={"shape": Attr("ints"), **_SLICE_ATTRS}, canon=_slice_grad_canon,
          doc="Zeros of `shape` with the operand written into the sliced positions.")


# -- flip ----------------------------------------------------------------------------------
def _flip_canon(types, attrs):
    (x,) = types
    return {"axes": normalize_axes(attrs["axes"], x.ndim)}


def _flip_infer(x: TensorType, *, axes: tuple[int, ...]) -> TensorType:
    require_canonical("axes", axes, normalize_axes(axes, x.ndim))
    return x


_shape_op("flip", _flip_infer, lambda x, *, axes: np.flip(x, axes),
          lambda b, g, x, *, out, axes: (b.flip(g, axes=axes),),
          attrs={"axes": Attr("ints")}, canon=_flip_canon,
          doc="Reverse the order of elements along `axes` (np.flip); its own adjoint.")


# -- concatenate ----------------------------------------------------------------------------
def _require_operands(types: Sequence[TensorType]) -> None:
    if not types:
        raise OpTypeError("needs at least one operand")


def _concatenate_canon(types, attrs):
    _require_operands(types)
    return {"axis": normalize_axis(attrs["axis"], types[0].ndim)}


def _concatenate_infer(*xs: TensorType, axis: int) -> TensorType:
    _require_operands(xs)
    first = xs[0]
    require_canonical("axis", axis, normalize_axis(axis, first.ndim))
    for x in xs[1:]:
        if x.dtype != first.dtype:
            raise OpTypeError(f"dtype mismatch {first.dtype} vs {x.dtype}; cast one operand first",
                              dtype=True)
        if x.ndim != first.ndim or reduced_shape(x.shape, (axis,), True) != reduced_shape(
                first.shape, (axis,), True):
            raise OpTypeError(f"shapes {first.shape} and {x.shape} differ outside axis {axis}")
    length = builtins.sum(x.shape[axis] for x in xs)
    return first.with_shape(first.shape[:axis] + (length,) + first.shape[axis + 1:])


def _concatenate_vjp(b, g, *xs, out, axis):
    cotangents = []
    offset = 0
    for x in xs:
        starts = tuple(offset if i == axis else 0 for i in range(g.type.ndim))
        stops = tuple(offset + x.shape[axis] if i == axis else d for i, d in enumerate(g.shape))
        cotangents.append(b.slice(g, starts=starts, stops=stops, steps=(1,) * len(starts)))
        offset += x.shape[axis]
    return tuple(cotangents)


_shape_op("concatenate", _concatenate_infer, lambda *xs, axis: np.concatenate(xs, axis=axis),
          _concatenate_vjp, attrs={"axis": Attr("int")}, canon=_concatenate_canon, num_inputs=None,
          doc="Join any number of operands along an existing axis.")


# -- pad ------------------------------------------------------------------------------------
def _representable(value: float, dtype: str) -> bool:
    if dtype == "bool":
        return value in (0.0, 1.0)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return value.is_integer() and info.min <= value <= info.max
    return True


def _pad_infer(x: TensorType, *, pads: tuple[tuple[int, int], ...], value: float) -> TensorType:
    if len(pads) != x.ndim:
        raise OpTypeError(f"needs one (before, after) pair per axis ({x.ndim}), got {len(pads)}")
    if any(width < 0 for pair in pads for width in pair):
        raise AttributeSchemaError(f"pad: pad widths must be non-negative, got {pads}")
    if not _representable(value, x.dtype):
        raise OpTypeError(f"pad value {value} is not representable in {x.dtype}", dtype=True)
    return x.with_shape(tuple(lo + d + hi for d, (lo, hi) in zip(x.shape, pads)))


def _pad_impl(x, *, pads, value):
    out = np.full(tuple(lo + d + hi for d, (lo, hi) in zip(x.shape, pads)), value, x.dtype)
    out[tuple(builtins.slice(lo, lo + d) for d, (lo, _) in zip(x.shape, pads))] = x
    return out


def _pad_vjp(b, g, x, *, out, pads, value):
    starts = tuple(lo for lo, _ in pads)
    stops = tuple(lo + d for d, (lo, _) in zip(x.shape, pads))
    return (b.slice(g, starts=starts, stops=stops, steps=(1,) * x.type.ndim),)


_shape_op("pad", _pad_infer, _pad_impl, _pad_vjp,
          attrs={"pads": Attr("pairs"), "value": Attr("float", 0.0)},
          doc="Constant padding: pads[i] = (before, after) widths of axis i, filled with `value`.")
