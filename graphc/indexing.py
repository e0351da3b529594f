"""Indexing a traced Tensor: `x[index]` and `x[index] = value`, NumPy's and PyTorch's rules.

x[index] is built from view-like steps on x (flip, slice, squeeze, expand_dims, and gather /
take_along_axis for integer arrays), each taking the previous step's result as operand 0.
x[index] = v scatters v back through the adjoints of those steps (_scatter_back).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.ir.errors import DTypeError, GraphcError, ShapeError, user_location
from graphc.ir.registry import get
from graphc.ir.types import TensorType, is_float

from .tensor import Tensor, as_tensor, bind, current_trace


class MaskShapeError(ShapeError, IndexError):
    """A constant boolean mask whose shape differs from the axes it indexes (an IndexError, as
    NumPy and PyTorch raise)."""


def getitem(x: Tensor, index: Any) -> Tensor:
    """NumPy's and PyTorch's indexing: ints, slices (any step), None, Ellipsis, integer arrays
    (lists, NumPy arrays or int tensors, broadcast together as NumPy does), constant boolean
    masks and bools (a 0-d mask: True adds an axis of length 1, False one of length 0). A traced
    boolean mask would give a shape known only from the data: refused."""
    index = _expand_index(x, index if isinstance(index, tuple) else (index,))
    arrays = [item for item in index if _is_array_index(item)]
    if arrays and any(item is None or _is_bool(item) for item in index):
        raise GraphcError(f"None or a bool (a new axis) together with integer-array indices is "
                          f"not supported; unsqueeze the result instead (at {user_location()})")
    out = _basic_index(x, tuple(slice(None) if _is_array_index(item) else item for item in index))
    if arrays:
        # As in PyTorch (not NumPy), an int beside the arrays is a plain index: its axis is
        # gone before the arrays pick along the axes that remain. So is a 0-d array or tensor,
        # an int whose value is data.
        remaining = [item for item in index if not isinstance(item, (int, np.integer))]
        scalars = [k for k, item in enumerate(remaining) if _is_array_index(item) and item.ndim == 0]
        for k in reversed(scalars):
            item = remaining[k]
            out = bind("gather", out, as_tensor(item if isinstance(item, Tensor) else item.astype(np.int64)),
                       axis=k)
        remaining = [item for k, item in enumerate(remaining) if k not in scalars]
        axes = [k for k, item in enumerate(remaining) if _is_array_index(item)]
        if axes:
            out = _array_index(out, axes, [remaining[k] for k in axes])
    return out


def view_strides(x: Tensor, index: Any) -> tuple[int, ...] | None:
    """PyTorch's strides (in elements) of x[index] where it is a view of x: an index of ints
    (0-d arrays and tensors included), slices, None and Ellipsis; None where it copies (integer
    arrays, masks)."""
    strides, out, axis = x.strides, [], 0
    for item in _expand_index(x, index if isinstance(index, tuple) else (index,)):
        if item is None or _is_bool(item):
            out.append(0)  # a new axis of length 1 (or 0)
        elif isinstance(item, slice):
            out.append(strides[axis] * item.indices(x.shape[axis])[2])
            axis += 1
        elif _is_array_index(item) and (item.ndim != 0 or item.dtype == "bool"):
            return None
        else:  # an int: the axis goes
            axis += 1
    return tuple(out)


def _is_array_index(item: Any) -> bool:
    return isinstance(item, (Tensor, np.ndarray))


def _is_bool(item: Any) -> bool:
    return isinstance(item, (bool, np.bool_))


def _expand_index(x: Tensor, index: tuple) -> tuple:
    """The index with lists as arrays, constant boolean masks as the integer arrays they stand
    for (np.nonzero), and Ellipsis and the missing trailing axes as full slices."""
    items = [_checked_item(item) for item in index]
    ellipses = [k for k, i in enumerate(items) if i is Ellipsis]  # `is`: items hold arrays
    if len(ellipses) > 1:
        raise ShapeError(f"an index can only have a single ellipsis (at {user_location()})")
    explicit = sum(_axes_indexed(i) for i in items)
    if explicit > x.ndim:
        raise ShapeError(f"too many indices for a tensor of shape {x.shape} (at {user_location()})")
    fill = [slice(None)] * (x.ndim - explicit)
    if ellipses:
        items = items[:ellipses[0]] + fill + items[ellipses[0] + 1:]
    else:
        items += fill
    expanded: list[Any] = []
    axis = 0
    for item in items:
        if isinstance(item, np.ndarray) and item.dtype == np.bool_:
            _check_mask(item, x.shape, axis)
            expanded.extend(np.nonzero(item))
        else:
            expanded.append(item)
        axis += _axes_indexed(item)
    return tuple(expanded)


def _checked_item(item: Any) -> Any:
    """One index item, lists as arrays and 0-d boolean arrays as bools, or an error saying why
    graphc cannot index with it."""
    if isinstance(item, Tensor) and item.dtype == "bool":
        raise GraphcError(
            f"x[mask] with a traced boolean mask has a shape known only from the mask's "
            f"values; graphc needs static shapes: use gc.where(mask, x, other) or "
            f"x.masked_fill(~mask, value) to keep the shape, or (x * mask).sum() to reduce "
            f"(at {user_location()})")
    if _is_bool(item):  # before the ints: bool is an int to Python
        return bool(item)
    if isinstance(item, (list, np.ndarray)):
        if isinstance(item, np.ndarray):  # a module's attribute array: traced again if it changes
            current_trace().note_array(item)
        item = np.asarray(item)
        if item.dtype == np.bool_:
            return bool(item) if item.ndim == 0 else item
        if item.size == 0:
            item = item.astype(np.int64)
        if not np.issubdtype(item.dtype, np.integer):
            raise GraphcError(f"an array index must hold integers or booleans, got "
                              f"{item.dtype} (at {user_location()})")
    elif isinstance(item, Tensor) and item.dtype not in ("int32", "int64"):
        raise DTypeError(f"a tensor index must be int32, int64 or bool, got {item.dtype} "
                         f"(at {user_location()})")
    elif not (item is None or item is Ellipsis or isinstance(item, (Tensor, slice, int,
                                                                    np.integer))):
        raise GraphcError(f"unsupported index {item!r} (at {user_location()})")
    return item


def _axes_indexed(item: Any) -> int:
    """How many axes of the indexed tensor `item` consumes."""
    if item is None or item is Ellipsis or _is_bool(item):
        return 0
    if isinstance(item, np.ndarray) and item.dtype == np.bool_:
        return item.ndim
    return 1


def _check_mask(mask: np.ndarray, shape: tuple[int, ...], axis: int) -> None:
    """A boolean mask must have the shape of the axes it indexes, from `axis` on."""
    for k, size in enumerate(mask.shape):
        if size != shape[axis + k]:
            raise MaskShapeError(
                f"boolean index of shape {mask.shape} did not match the indexed tensor of shape "
                f"{shape} along axis {axis + k}: size of axis is {shape[axis + k]} but size of "
                f"corresponding boolean axis is {size} (at {user_location()})")


def _basic_index(x: Tensor, index: tuple) -> Tensor:
    """Ints, slices, None and bools, one item per axis of x (None and bools aside): a flip for
    the axes sliced with a negative step, one slice, then the squeeze and expand_dims, and a
    slice emptying the new axes of False."""
    flips, starts, stops, steps, drop, new_axes, empty_axes = [], [], [], [], [], [], []
    axis = out_axis = 0
    for item in index:
        if item is None or _is_bool(item):
            new_axes.append(out_axis)
            if item is False:
                empty_axes.append(out_axis)
            out_axis += 1
            continue
        dim = x.shape[axis]
        if isinstance(item, slice):
            try:
                start, stop, step = item.indices(dim)
            except (TypeError, ValueError) as error:  # a step of 0, bounds that are not ints
                raise ShapeError(f"the slice {_index_text((item,))[2:-1]} of axis {axis}: {error} "
                                 f"(at {user_location()})") from None
            count = len(range(start, stop, step))
            if step < 0:  # position i of x is dim - 1 - i of flip(x), where the step is positive
                flips.append(axis)
                start, step = dim - 1 - start, -step
            starts.append(start), stops.append(start + (count - 1) * step + 1 if count else start)
            steps.append(step)
            out_axis += 1
        else:
            if not -dim <= item < dim:
                raise ShapeError(f"index {item} is out of bounds for axis {axis} with size {dim} "
                                 f"(at {user_location()})")
            start = int(item) % dim
            starts.append(start), stops.append(start + 1), steps.append(1), drop.append(axis)
        axis += 1
    out = bind("flip", x, axes=tuple(flips)) if flips else x
    if (tuple(starts), tuple(stops), tuple(steps)) != ((0,) * x.ndim, x.shape, (1,) * x.ndim):
        out = bind("slice", out, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))
    if drop:
        out = bind("squeeze", out, axes=tuple(drop))
    if new_axes:
        out = bind("expand_dims", out, axes=tuple(new_axes))
    if empty_axes:
        out = bind("slice", out, starts=(0,) * out.ndim, steps=(1,) * out.ndim,
                   stops=tuple(0 if a in empty_axes else n for a, n in enumerate(out.shape)))
    return out


def _array_index(x: Tensor, axes: list[int], arrays: list[Any]) -> Tensor:
    """x indexed along `axes` by integer arrays broadcast together (NumPy's advanced indexing):
    the broadcast shape replaces those axes where they are adjacent, and leads otherwise."""
    indices = [as_tensor(a if isinstance(a, Tensor) else a.astype(np.int64)) for a in arrays]
    try:
        common = tuple(np.broadcast_shapes(*(i.shape for i in indices)))
    except ValueError:
        raise ShapeError(f"index arrays of shapes {[i.shape for i in indices]} do not broadcast "
                         f"together (at {user_location()})") from None
    if len(axes) == 1:
        return bind("gather", x, indices[0].broadcast_to(common), axis=axes[0])
    rest = [a for a in range(x.ndim) if a not in axes]
    out = x.permute(axes + rest) if axes != list(range(len(axes))) else x
    out = bind("gather", out, indices[0].broadcast_to(common), axis=0)
    lead = len(common)
    for index in indices[1:]:  # pair each next axis with the elements already picked
        trailing = (1,) * (out.ndim - lead)
        picked = bind("take_along_axis", out, index.broadcast_to(common).reshape(common + trailing),
                      axis=lead)
        out = bind("squeeze", picked, axes=(lead,))
    if axes == list(range(axes[0], axes[0] + len(axes))) and axes[0] > 0:
        # Adjacent: the indexed dimensions take the place of the axes they replace.
        before = list(range(lead, lead + axes[0]))
        out = out.permute(before + list(range(lead)) + list(range(lead + axes[0], out.ndim)))
    return out


def setitem(x: Tensor, index: Any, value: Any) -> Tensor:
    """x with `value` written at `index`: where(region, value scattered back, x)."""
    index_tuple = index if isinstance(index, tuple) else (index,)
    masks = [i for i in index_tuple if isinstance(i, Tensor) and i.dtype == "bool"]
    if masks:
        return _masked_assign(x, index_tuple, value)
    region = getitem(x, index)
    if isinstance(value, float) and not is_float(x.dtype) and x.dtype != "bool" and np.isfinite(value):
        value = int(value)  # truncated toward zero, as PyTorch and NumPy store it
    update = as_tensor(value, like=region).astype(x.dtype)
    while update.ndim > region.ndim and update.shape[0] == 1:  # leading axes of one, as NumPy drops
        update = update.reshape(update.shape[1:])
    try:
        update = update.broadcast_to(region.shape)
    except ShapeError:
        raise ShapeError(f"cannot assign a value of shape {update.shape} to the region of shape "
                         f"{region.shape} that {_index_text(index_tuple)} selects from "
                         f"{x.shape} (at {user_location()})") from None
    if region.value is x.value:  # the whole tensor
        return update
    steps = _steps_from(x, region)
    carrier = "int32" if x.dtype == "bool" else x.dtype  # the scatters add: no bools
    update = update.astype(carrier)
    # the scatters add: where an integer-array index names a position twice, only the last
    # write keeps its value (NumPy's and PyTorch's last write wins; x[[1, 1]] += 1 adds 1)
    last = _last_writes(x, steps, region.shape)
    if last is not None:
        update = bind("where", last, update, as_tensor(np.zeros((), carrier)))
    written = _scatter_back(steps, update)
    ones = current_trace().builder.full(1, TensorType(region.shape, carrier))
    covered = _scatter_back(steps, Tensor(ones))
    return bind("where", covered != 0, written.astype(x.dtype), x)


def _last_writes(x: Tensor, steps: list, shape: tuple[int, ...]) -> Tensor | None:
    """A bool of the region's `shape`, True at each element of the region that is the last (in
    C order) to name its position of x; None where no position is named twice."""
    gathers = [node for node in steps if node.op in ("gather", "take_along_axis")]
    if not gathers or int(np.prod(shape)) == 0:
        return None  # slices, flips and squeezes name every position once
    positions = np.arange(int(np.prod(x.shape)), dtype=np.int64).reshape(x.shape)
    if all(node.inputs[1].producer is not None and node.inputs[1].producer.op == "constant"
           for node in gathers):  # known now: the region's positions, from NumPy
        for node in reversed(steps):
            constants = [v.producer.attrs["value"] for v in node.inputs[1:]]
            positions = get(node.op).impl(positions, *constants, **node.attrs)
        flat = np.asarray(positions).reshape(-1)
        _, first_from_the_end = np.unique(flat[::-1], return_index=True)
        if len(first_from_the_end) == flat.size:
            return None
        last = np.zeros(flat.size, bool)
        last[flat.size - 1 - first_from_the_end] = True
        return as_tensor(last.reshape(shape))
    # traced indices: the positions sorted (stably), each the last of its run
    b, v = current_trace().builder, as_tensor(positions).value
    for node in reversed(steps):
        v = b.bind(node.op, v, *node.inputs[1:], **node.attrs)
    flat = Tensor(v).reshape(-1)
    order = flat.argsort(0)
    ordered = flat[order]
    runs_end = ordered[1:] != ordered[:-1]
    last_in_order = bind("concatenate", runs_end, as_tensor(np.ones(1, bool)), axis=0)
    return last_in_order[order.argsort(0)].reshape(shape)


def _masked_assign(x: Tensor, index: tuple, value: Any) -> Tensor:
    """x[mask] = value with a traced boolean mask over x's leading axes: a where."""
    mask = index[0]
    if len(index) != 1 or mask.shape != x.shape[:mask.ndim]:
        raise GraphcError(f"assignment through a boolean mask takes one mask of the tensor's "
                          f"leading shape (x[mask] = v with mask of shape {x.shape[:1]}..."
                          f"{x.shape}); use gc.where(mask, v, x) for anything else "
                          f"(at {user_location()})")
    update = as_tensor(value, like=x).astype(x.dtype)
    rest = x.shape[mask.ndim:]
    try:
        fits = update.ndim <= len(rest) and np.broadcast_shapes(update.shape, rest) == rest
    except ValueError:
        fits = False
    if not fits:
        raise ShapeError(f"x[mask] = v needs v to be one value or broadcast to {rest}, the shape "
                         f"of each masked element, got {update.shape}: the number of masked "
                         f"elements is known only from the data (at {user_location()})")
    selected = mask.reshape(mask.shape + (1,) * len(rest))
    return bind("where", selected, update, x)


def _steps_from(x: Tensor, region: Tensor) -> list:
    """The nodes that made `region` from `x`, last first (see getitem)."""
    steps, value = [], region.value
    while value is not x.value:
        steps.append(value.producer)
        value = value.producer.inputs[0]
    return steps


def _scatter_back(steps: list, update: Tensor) -> Tensor:
    """`update`, shaped like the indexed region, placed where each step read it from: the
    adjoints of the steps, zeros elsewhere."""
    b, v = current_trace().builder, update.value
    for node in steps:
        source, attrs = node.inputs[0], node.attrs
        if node.op == "slice":
            v = b.slice_grad(v, shape=source.shape, **attrs)
        elif node.op == "flip":
            v = b.flip(v, **attrs)
        elif node.op == "squeeze":
            v = b.expand_dims(v, **attrs)
        elif node.op == "expand_dims":
            v = b.squeeze(v, **attrs)
        elif node.op == "transpose":
            v = b.transpose(v, perm=tuple(int(i) for i in np.argsort(attrs["perm"])))
        elif node.op == "gather":
            v = b.scatter_add(v, node.inputs[1], size=source.shape[attrs["axis"]], **attrs)
        elif node.op == "take_along_axis":
            v = b.scatter_add_along_axis(v, node.inputs[1], shape=source.shape, **attrs)
        else:  # getitem makes no other op
            raise AssertionError(f"no scatter for the indexing step {node.op}")
    return Tensor(v)


def _index_text(index: tuple) -> str:
    def item(i: Any) -> str:
        if isinstance(i, slice):
            return ":".join("" if p is None else str(p) for p in (i.start, i.stop, i.step)
                            ).rstrip(":") or ":"
        return "..." if i is Ellipsis else repr(i)
    return f"x[{', '.join(item(i) for i in index)}]"
