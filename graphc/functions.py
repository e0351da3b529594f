"""NumPy-style functions on traced tensors (gc.exp, gc.where, gc.concatenate, ...)."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .tensor import Tensor, _normalize_axes, as_tensor, bind, current_trace, matmul

__all__ = ["exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "sign", "square",
           "reciprocal", "maximum", "minimum", "where", "sum", "mean", "max", "argmax", "matmul",
           "concatenate", "stack", "pad", "gather", "take_along_axis", "one_hot", "stop_gradient",
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


def sum(x: Tensor, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).sum(axis, keepdims)


def mean(x: Tensor, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).mean(axis, keepdims)


def max(x: Tensor, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).max(axis, keepdims)


def argmax(x: Tensor, axis: int | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).argmax(axis, keepdims)


def logsumexp(x: Tensor, axis: int | Sequence[int] = -1, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x))) computed stably: the maximum is factored out (and not differentiated)."""
    m = stop_gradient(x.max(axis, keepdims=True))
    out = (x - m).exp().sum(axis, keepdims=True).log() + m
    return out if keepdims else out.squeeze(_normalize_axes(axis, x.ndim))


def concatenate(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    tensors = [as_tensor(x) for x in xs]
    (axis,) = _normalize_axes(axis, tensors[0].ndim)
    return bind("concatenate", *tensors, axis=axis)


def stack(xs: Sequence[Tensor], axis: int = 0) -> Tensor:
    tensors = [as_tensor(x) for x in xs]
    axis = axis % (tensors[0].ndim + 1)
    return concatenate([t.unsqueeze(axis) for t in tensors], axis)


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
