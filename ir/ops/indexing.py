"""Indexing primitives: gathers by integer indices, their accumulating adjoints, and one_hot.

- take_along_axis(x, indices, axis): np.take_along_axis, indices of x's rank broadcasting against
  x on the other axes. Adjoint: scatter_add_along_axis.
- gather(x, indices, axis): np.take (embedding lookup); indices of any shape replace `axis`.
  Adjoint: scatter_add.
- one_hot(indices, num_classes, dtype).

Indices are data, so every backend checks them before any kernel reads through them (see
`check_indices`): one outside the valid range raises IndexOutOfRangeError naming the op, the
value, its position and the user's line; nothing reads or writes memory for it (XLA clamps; we
refuse). The valid range of an axis of size n depends on the attribute `wrap_negative`:

- True (the default, NumPy's and JAX's take / take_along_axis): [-n, n), negative indices count
  from the end.
- False (PyTorch's gather, embedding lookups and class targets): [0, n); -1 is an error.

The scatters carry their gather's `wrap_negative` and accept exactly the same indices.
one_hot reads no memory through its indices (it compares them with each class), so it has no
range to enforce: as jax.nn.one_hot, any out-of-range index, negative included, gives an
all-zero row (PyTorch's F.one_hot refuses them instead).
The scatters accumulate (np.add.at), so repeated indices sum their contributions.
"""
from __future__ import annotations

import builtins

import numpy as np

from ..errors import AttributeSchemaError, IndexOutOfRangeError
from ..graph import Node
from ..registry import OPAQUE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, broadcast_shapes, is_float
from .shape import check_dims, normalize_axis, require_canonical


def _int_indices(indices: TensorType) -> None:
    if indices.dtype not in ("int32", "int64"):
        raise OpTypeError(f"indices must be int32 or int64, got {indices.dtype}", dtype=True)


def _numeric(g: TensorType) -> None:
    if g.dtype == "bool":
        raise OpTypeError("expects a numeric operand, got bool", dtype=True)


def _can_index(size: int, indices_shape: tuple[int, ...], axis: int) -> None:
    if size == 0 and 0 not in indices_shape:  # some index would point into an empty axis
        raise OpTypeError(f"cannot index axis {axis} of size 0")


def index_range(size: int, wrap_negative: bool) -> tuple[int, int]:
    """[low, high) of the indices valid for an axis of `size`."""
    return (-size if wrap_negative else 0), size


def check_indices(op: str, indices: np.ndarray, size: int, wrap_negative: bool,
                  loc: str | None = None) -> None:
    """Raise IndexOutOfRangeError for the first index (in C order) outside the valid range.

    Two reductions and no temporaries on the common, valid path: this runs before every
    kernel that indexes with data (a step's labels and token ids), so it must stay cheap."""
    low, high = index_range(size, wrap_negative)
    if indices.size == 0 or (low <= indices.min() and indices.max() < high):
        return
    bad = (indices < low) | (indices >= high)
    position = np.unravel_index(int(np.argmax(bad)), indices.shape)
    raise IndexOutOfRangeError(op, int(indices[position]), tuple(int(p) for p in position),
                               low, high, loc)


# A scatter's indices are those of the gather it differentiates: an error names the gather, the
# op the user wrote (t[i], x.gather), also where the gradient alone reads them
NAMED_AFTER = {"scatter_add": "gather", "scatter_add_along_axis": "take_along_axis"}


def index_bounds(node: Node) -> tuple[int, bool] | None:
    """For an op that reads memory at its operand 1's values: the size of the axis they index
    and `wrap_negative`; None for every other op (one_hot included: it only compares)."""
    if node.op not in _INDEXED_SIZE:
        return None
    return _INDEXED_SIZE[node.op](node), node.attrs["wrap_negative"]


def _axis_canon(rank_of):
    """canon that normalises `axis` against the rank `rank_of(types, attrs)` it indexes."""
    def canon(types, attrs):
        return {**attrs, "axis": normalize_axis(attrs["axis"], rank_of(types, attrs))}
    return canon


def _op(name, infer, impl, vjp, attrs, canon=None, num_inputs=2, doc="", indexed_load=False):
    register(Primitive(name, OPAQUE, infer, impl, vjp, attrs=attrs, canon=canon,
                       num_inputs=num_inputs, doc=doc, indexed_load=indexed_load))


# -- take_along_axis / scatter_add_along_axis ---------------------------------------------------
def _along_axis_shape(shape: tuple[int, ...], indices: TensorType, axis: int) -> tuple[int, ...]:
    """Output shape of take_along_axis: broadcast off `axis`, indices' length along it."""
    if indices.ndim != len(shape):
        raise OpTypeError(f"indices must have the operand's rank {len(shape)}, got rank {indices.ndim}")
    require_canonical("axis", axis, normalize_axis(axis, len(shape)))
    _can_index(shape[axis], indices.shape, axis)
    off_axis = [tuple(1 if i == axis else d for i, d in enumerate(s)) for s in (shape, indices.shape)]
    try:
        common = broadcast_shapes(*off_axis)
    except ValueError:
        raise OpTypeError(f"indices shape {indices.shape} does not broadcast against {shape} "
                          f"outside axis {axis}") from None
    return common[:axis] + (indices.shape[axis],) + common[axis + 1:]


def _take_along_axis_infer(x: TensorType, indices: TensorType, *, axis: int,
                           wrap_negative: bool) -> TensorType:
    _int_indices(indices)
    return x.with_shape(_along_axis_shape(x.shape, indices, axis))


def _take_along_axis_impl(x, indices, *, axis, wrap_negative):
    check_indices("take_along_axis", indices, x.shape[axis], wrap_negative)
    return np.take_along_axis(x, indices, axis=axis)


def _take_along_axis_vjp(b, g, x, indices, *, out, axis, wrap_negative):
    if not is_float(x.dtype):
        return (None, None)
    return (b.scatter_add_along_axis(g, indices, axis=axis, shape=x.shape,
                                     wrap_negative=wrap_negative), None)


# take_along_axis reads its indices at its output index, but declares no identity_reads: the
# indices stay a kernel input, because the backends check every index array before the kernel
# reading through it runs (backends/bounds.py).
_op("take_along_axis", _take_along_axis_infer, _take_along_axis_impl, _take_along_axis_vjp,
    attrs={"axis": Attr("int"), "wrap_negative": Attr("bool", True)},
    canon=_axis_canon(lambda types, attrs: types[0].ndim), indexed_load=True,
    doc="out[..., i, ...] = x[..., indices[..., i, ...], ...] along `axis` (np.take_along_axis); "
        "indices in [-n, n), or [0, n) without wrap_negative (PyTorch's gather).")


def _scatter_add_along_axis_infer(g: TensorType, indices: TensorType, *, axis: int,
                                  shape: tuple[int, ...], wrap_negative: bool) -> TensorType:
    _numeric(g)
    _int_indices(indices)
    check_dims("scatter_add_along_axis", shape)
    expected = _along_axis_shape(shape, indices, axis)
    if g.shape != expected:
        raise OpTypeError(f"operand shape {g.shape} differs from {expected}, the shape "
                          f"take_along_axis gives for {shape} and these indices")
    return TensorType(shape, g.dtype)


def _along_axis_index(shape, indices, axis, out_shape):
    """A NumPy fancy index that sends element i of a take_along_axis output to its source.

    Axes where `shape` has size 1 but the output does not were broadcast: all of them map to 0.
    """
    index = []
    for d, size in enumerate(shape):
        if d == axis:
            index.append(indices)
            continue
        positions = np.arange(size) if size == out_shape[d] else np.zeros(1, np.intp)
        index.append(positions.reshape([-1 if i == d else 1 for i in range(len(shape))]))
    return tuple(index)


def _scatter_add_along_axis_impl(g, indices, *, axis, shape, wrap_negative):
    check_indices(NAMED_AFTER["scatter_add_along_axis"], indices, shape[axis], wrap_negative)
    out = np.zeros(shape, g.dtype)
    np.add.at(out, _along_axis_index(shape, indices, axis, g.shape), g)
    return out


_op("scatter_add_along_axis", _scatter_add_along_axis_infer, _scatter_add_along_axis_impl,
    lambda b, g, x, indices, *, out, axis, shape, wrap_negative: (
        b.take_along_axis(g, indices, axis=axis, wrap_negative=wrap_negative), None),
    attrs={"axis": Attr("int"), "shape": Attr("ints"), "wrap_negative": Attr("bool", True)},
    canon=_axis_canon(lambda types, attrs: len(attrs["shape"])),
    doc="Zeros of `shape`, then each operand element added where take_along_axis read it.")


# -- gather / scatter_add -------------------------------------------------------------------
def _gather_infer(x: TensorType, indices: TensorType, *, axis: int, wrap_negative: bool) -> TensorType:
    _int_indices(indices)
    require_canonical("axis", axis, normalize_axis(axis, x.ndim))
    _can_index(x.shape[axis], indices.shape, axis)
    return x.with_shape(x.shape[:axis] + indices.shape + x.shape[axis + 1:])


def _gather_impl(x, indices, *, axis, wrap_negative):
    check_indices("gather", indices, x.shape[axis], wrap_negative)
    return np.take(x, indices, axis=axis)


def _gather_vjp(b, g, x, indices, *, out, axis, wrap_negative):
    if not is_float(x.dtype):
        return (None, None)
    return (b.scatter_add(g, indices, axis=axis, size=x.shape[axis], wrap_negative=wrap_negative),
            None)


_op("gather", _gather_infer, _gather_impl, _gather_vjp,
    attrs={"axis": Attr("int"), "wrap_negative": Attr("bool", True)},
    canon=_axis_canon(lambda types, attrs: types[0].ndim), indexed_load=True,
    doc="np.take(x, indices, axis): x.shape[:axis] + indices.shape + x.shape[axis+1:]; indices "
        "in [-n, n), or [0, n) without wrap_negative (PyTorch's embedding).")


def _scatter_rank(g: TensorType, indices: TensorType) -> int:
    rank = g.ndim - indices.ndim + 1
    if rank < 1:
        raise OpTypeError(f"operand of rank {g.ndim} cannot hold indices of rank {indices.ndim}")
    return rank


def _scatter_add_infer(g: TensorType, indices: TensorType, *, axis: int, size: int,
                       wrap_negative: bool) -> TensorType:
    _numeric(g)
    _int_indices(indices)
    if size < 0:
        raise AttributeSchemaError(f"scatter_add: size must be non-negative, got {size}")
    require_canonical("axis", axis, normalize_axis(axis, _scatter_rank(g, indices)))
    block = g.shape[axis:axis + indices.ndim]
    if block != indices.shape:
        raise OpTypeError(f"operand axes {axis}..{axis + indices.ndim - 1} have shape {block}, "
                          f"indices have shape {indices.shape}")
    _can_index(size, indices.shape, axis)
    return g.with_shape(g.shape[:axis] + (size,) + g.shape[axis + indices.ndim:])


def _scatter_add_impl(g, indices, *, axis, size, wrap_negative):
    check_indices(NAMED_AFTER["scatter_add"], indices, size, wrap_negative)
    out = np.zeros(g.shape[:axis] + (size,) + g.shape[axis + indices.ndim:], g.dtype)
    np.add.at(out, (builtins.slice(None),) * axis + (indices,), g)
    return out


def _scatter_add_canon(types, attrs):
    g, indices = types
    return {**attrs, "axis": normalize_axis(attrs["axis"], _scatter_rank(g, indices))}


_op("scatter_add", _scatter_add_infer, _scatter_add_impl,
    lambda b, g, x, indices, *, out, axis, size, wrap_negative: (
        b.gather(g, indices, axis=axis, wrap_negative=wrap_negative), None),
    attrs={"axis": Attr("int"), "size": Attr("int"), "wrap_negative": Attr("bool", True)},
    canon=_scatter_add_canon,
    doc="Adjoint of gather: zeros with `size` along `axis`, operand slices added at `indices`.")


# -- one_hot --------------------------------------------------------------------------------
def _one_hot_infer(indices: TensorType, *, num_classes: int, dtype: str) -> TensorType:
    _int_indices(indices)
    if num_classes < 0:
        raise AttributeSchemaError(f"one_hot: num_classes must be non-negative, got {num_classes}")
    return TensorType(indices.shape + (num_classes,), dtype)


_op("one_hot", _one_hot_infer,
    lambda indices, *, num_classes, dtype: (indices[..., None] == np.arange(num_classes)).astype(dtype),
    lambda b, g, indices, *, out, num_classes, dtype: (None,),  # integer input: no cotangent
    attrs={"num_classes": Attr("int"), "dtype": Attr("dtype", "float32")}, num_inputs=1, indexed_load=True,
    doc="indices.shape + (num_classes,), 1 at each index; out-of-range indices give zero rows.")


# The axis size each index-consuming op's operand 1 indexes (see index_bounds).
_INDEXED_SIZE = {
    "take_along_axis": lambda node: node.inputs[0].shape[node.attrs["axis"]],
    "gather": lambda node: node.inputs[0].shape[node.attrs["axis"]],
    "scatter_add_along_axis": lambda node: node.attrs["shape"][node.attrs["axis"]],
    "scatter_add": lambda node: node.attrs["size"],
}
