"""NumPy-style functions on traced tensors (gc.exp, gc.where, gc.concatenate, ...)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from graphc.ir.errors import GraphcError, ShapeError, user_location

from .tensor import (Tensor, ValuesIndices, _normalize_axes, as_tensor, bind, current_trace,
                     matmul)

__all__ = ["exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "sign", "square",
           "reciprocal", "maximum", "minimum", "where", "sum", "mean", "max", "amax", "argmax", "matmul",
           "concatenate", "cat", "stack", "split", "chunk", "flip", "masked_fill", "numel",
           "pad", "gather", "take_along_axis", "one_hot", "stop_gradient",
           "cast", "uniform", "bernoulli", "logsumexp"]


def _unary(op: str):
    def fn(x: Tensor) -> Tensor:
        return bind(op, as_tensor(x))
    fn.__name__ = op
    fn.__doc__ = f"Elementwise {op}."
    return fn


exp, log, log1p, sqrt, rsqrt, tanh, sigmoid, abs, sign, square, reciprocal, stop_gradient = (
    _unary(op) for op in ("exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "abs",
                          "sign", "square", "reciprocal", "stop_gradient"))


def _pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Both operands as Tensors; a Python or NumPy number takes the other operand's dtype (an
    array operand, a NumPy constant included, sets it, not only a traced Tensor)."""
    if _is_number(x) and not _is_number(y):
        y = as_tensor(y)
        return as_tensor(x, like=y), y
    x = as_tensor(x)
    return x, as_tensor(y, like=x)


def _is_number(v: Any) -> bool:
    return isinstance(v, (bool, int, float, np.number))


def maximum(x: Any, y: Any) -> Tensor:
    return bind("maximum", *_pair(x, y))


def minimum(x: Any, y: Any) -> Tensor:
    return bind("minimum", *_pair(x, y))


def where(cond: Tensor, x: Any, y: Any) -> Tensor:
    x, y = _pair(x, y)
    return bind("where", as_tensor(cond), x, y)


def cast(x: Tensor, dtype: Any) -> Tensor:
    return as_tensor(x).astype(dtype)


# Reductions take PyTorch's `dim`/`keepdim` and NumPy's `axis`/`keepdims` alike.
def sum(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
        axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).sum(dim, keepdim, axis=axis, keepdims=keepdims)


def mean(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
         axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).mean(dim, keepdim, axis=axis, keepdims=keepdims)


def max(x: Tensor, dim: Any = None, keepdim: bool = False, *, axis: Any = None,
        keepdims: bool = False) -> Tensor | ValuesIndices:
    """torch.max, as Tensor.max: over one axis the named tuple (values, indices), so that
    `_, predicted = gc.max(logits, 1)` ported from PyTorch means what it did there; without an
    axis or over several, the values; with a tensor, the elementwise maximum. (np.max applied
    to a Tensor keeps NumPy's meaning: the values.)"""
    return as_tensor(x).max(dim, keepdim, axis=axis, keepdims=keepdims)


def amax(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
         axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    """The maximum over one axis, several or all: values only (torch.amax, np.max)."""
    return as_tensor(x).amax(dim, keepdim, axis=axis, keepdims=keepdims)


def argmax(x: Tensor, dim: int | None = None, keepdim: bool = False, *, axis: int | None = None,
           keepdims: bool = False) -> Tensor:
    return as_tensor(x).argmax(dim, keepdim, axis=axis, keepdims=keepdims)


def logsumexp(x: Tensor, dim: int | Sequence[int] = -1, keepdim: bool = False, *,
              axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x))) computed stably: the maximum is factored out (and not differentiated)."""
    x = as_tensor(x)
    axes = _normalize_axes(dim if axis is None else axis, x.ndim)
    m = stop_gradient(x.amax(axes, keepdim=True))
    out = (x - m).exp().sum(axes, keepdim=True).log() + m
    return out if keepdim or keepdims else out.squeeze(axes)


def concatenate(xs: Sequence[Tensor], axis: int = 0, *, dim: int | None = None) -> Tensor:
    tensors = [as_tensor(x) for x in xs]
    if not tensors:
        raise GraphcError(f"concatenate/cat needs at least one tensor (at {user_location()})")
    (axis,) = _normalize_axes(axis if dim is None else dim, tensors[0].ndim)
    return tensors[0] if len(tensors) == 1 else bind("concatenate", *tensors, axis=axis)


def cat(tensors: Sequence[Tensor], dim: int = 0, *, axis: int | None = None) -> Tensor:
    """torch.cat: join tensors along an existing axis `dim`."""
    return concatenate(tensors, dim if axis is None else axis)


def stack(xs: Sequence[Tensor], axis: int = 0, *, dim: int | None = None) -> Tensor:
    """Join tensors of one shape along a new axis (`dim`, PyTorch's name, or `axis`)."""
    tensors = [as_tensor(x) for x in xs]
    if not tensors:
        raise GraphcError(f"stack needs at least one tensor (at {user_location()})")
    axis = axis if dim is None else dim
    if not -tensors[0].ndim - 1 <= axis <= tensors[0].ndim:
        raise ShapeError(f"stack: axis {axis} is out of range for tensors of rank "
                         f"{tensors[0].ndim} (at {user_location()})")
    axis %= tensors[0].ndim + 1
    return concatenate([t.unsqueeze(axis) for t in tensors], axis)


def split(x: Tensor, split_size_or_sections: int | Sequence[int], dim: int = 0) -> tuple[Tensor, ...]:
    """torch.split: see Tensor.split."""
    return as_tensor(x).split(split_size_or_sections, dim)


def chunk(x: Tensor, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
    """torch.chunk: see Tensor.chunk."""
    return as_tensor(x).chunk(chunks, dim)


def flip(x: Tensor, dims: int | Sequence[int]) -> Tensor:
    """torch.flip / np.flip: the elements in reverse order along `dims`."""
    return as_tensor(x).flip(dims)


def masked_fill(x: Tensor, mask: Any, value: Any) -> Tensor:
    return as_tensor(x).masked_fill(mask, value)


def numel(x: Tensor) -> int:
    return as_tensor(x).numel()


def pad(x: Tensor, pad_width: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    return bind("pad", as_tensor(x), pads=tuple(tuple(p) for p in pad_width), value=value)


def gather(x: Tensor, indices: Any, axis: int = 0) -> Tensor:
    """np.take: pick slices of `x` along `axis` (embedding lookup)."""
    x = as_tensor(x)
    (axis,) = _normalize_axes(axis, x.ndim)
    return bind("gather", x, as_tensor(indices), axis=axis)


def take_along_axis(x: Tensor, indices: Any, axis: int) -> Tensor:
    x = as_tensor(x)
    (axis,) = _normalize_axes(axis, x.ndim)
    return bind("take_along_axis", x, as_tensor(indices), axis=axis)


def one_hot(indices: Any, num_classes: int, dtype: str = "float32") -> Tensor:
    return bind("one_hot", as_tensor(indices), num_classes=num_classes, dtype=dtype)


def uniform(shape: Sequence[int], dtype: str = "float32") -> Tensor:
    """Uniform [0, 1) numbers from the call's counter-based key (see gc.manual_seed)."""
    key, stream = current_trace().random_key()
    return Tensor(current_trace().builder.bind("random_uniform", key, shape=tuple(shape),
                                               dtype=dtype, stream=stream))


def bernoulli(p: float, shape: Sequence[int]) -> Tensor:
    """Booleans that are True with probability p, from the call's counter-based key."""
    key, stream = current_trace().random_key()
    return Tensor(current_trace().builder.bind("random_bernoulli", key, p=float(p),
                                               shape=tuple(shape), stream=stream))
