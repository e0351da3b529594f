"""graphc.nn.utils: PyTorch's torch.nn.utils helpers that act on modules' parameters.

`weight_norm` reparametrises a weight as g * v / ||v|| (Salimans & Kingma, 2016) the way
torch.nn.utils.weight_norm does: the module's `weight` parameter becomes `weight_g` and
`weight_v` (the state-dict names PyTorch's checkpoints use), and `module.weight` is computed
from them wherever it is read: inside a trace (the forward), so gradients reach g and v, and
outside one, as the NumPy array of the present g and v.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from graphc.ir.errors import GraphcError, ShapeError

from .module import Module, Parameter


def _norm_axes(ndim: int, dim: int) -> tuple[int, ...]:
    """The axes norm_except_dim sums over: all but `dim`; all of them for dim -1, which PyTorch's
    weight_norm takes (as it takes None) to mean the norm of the whole tensor."""
    return tuple(range(ndim)) if dim == -1 else tuple(a for a in range(ndim) if a != dim)


def _norm_except_dim(array: np.ndarray, dim: int) -> np.ndarray:
    axes = _norm_axes(array.ndim, dim)
    keep = dim != -1  # PyTorch's g is 0-d for the whole tensor's norm, else keeps every dim
    return np.sqrt(np.sum(np.square(array, dtype=np.float64), axis=axes, keepdims=keep)
                   ).astype(array.dtype)


class WeightNorm:
    """`module.<name>` under weight_norm: g * v / ||v|| (the norm over every axis but `dim`)
    from the module's `<name>_g` and `<name>_v` parameters, traced Tensors or arrays."""

    def __init__(self, name: str, dim: int) -> None:
        self.name, self.dim = name, dim

    def __call__(self, module: Module) -> Any:
        g, v = getattr(module, self.name + "_g"), getattr(module, self.name + "_v")
        if isinstance(v, np.ndarray):
            return (v * (g / _norm_except_dim(v, self.dim))).astype(v.dtype)
        axes = _norm_axes(v.ndim, self.dim)
        # (no axes, a 1-D weight's own dim: each element's norm is its magnitude)
        squares = (v * v).sum(dim=axes, keepdim=self.dim != -1) if axes else v * v
        return v * (g / squares.sqrt())


def _derived(module: Module) -> dict[str, Any]:
    return module.__dict__.get("_derived_attributes") or {}


def weight_norm(module: Module, name: str = "weight", dim: int | None = 0) -> Module:
    """PyTorch's torch.nn.utils.weight_norm: replace parameter `name` by `name`_g (its norm over
    every axis but `dim`, kept as size-1 axes) and `name`_v (its direction, initially the
    weight itself); `module.<name>` is then g * v / ||v||, computed wherever it is read.
    `dim=None` (or -1, as in PyTorch) takes the norm of the whole tensor (g a scalar). Returns
    the module. Build the optimizer after this: it trains g and v, not the weight."""
    if not isinstance(module, Module):
        raise GraphcError(f"weight_norm: expects an nn.Module, got {type(module).__name__}")
    if isinstance(_derived(module).get(name), WeightNorm):
        raise GraphcError(f"weight_norm: {type(module).__name__}.{name} has weight norm already")
    weight = module._parameters.get(name)
    if weight is None:
        raise GraphcError(f"weight_norm: {type(module).__name__} has no parameter {name!r} "
                          f"(its parameters: {list(module._parameters)})")
    dim = -1 if dim is None else dim
    if not (isinstance(dim, int) and -weight.ndim <= dim < weight.ndim):
        raise ShapeError(f"weight_norm: dim must be an axis of {name} {weight.shape}, or -1 or "
                         f"None for the whole tensor's norm, got {dim!r}")
    if dim < -1:  # counted from the end, as PyTorch's transpose takes it (-1 alone is "all")
        dim += weight.ndim
    del module._parameters[name]
    module.register_parameter(name + "_g", Parameter(_norm_except_dim(weight, dim)))
    module.register_parameter(name + "_v", Parameter(weight.copy()))
    # a new dict: a compiled function holding the old one as a setting sees the change
    object.__setattr__(module, "_derived_attributes",
                       {**_derived(module), name: WeightNorm(name, dim)})
    return module


def remove_weight_norm(module: Module, name: str = "weight") -> Module:
    """Undo weight_norm: `name` becomes a parameter again, holding g * v / ||v|| of the present
    g and v. Returns the module."""
    if not isinstance(_derived(module).get(name), WeightNorm):
        raise GraphcError(f"remove_weight_norm: weight_norm of {name!r} not found in "
                          f"{type(module).__name__}")
    weight = getattr(module, name)
    object.__setattr__(module, "_derived_attributes",
                       {k: v for k, v in _derived(module).items() if k != name})
    del module._parameters[name + "_g"], module._parameters[name + "_v"]
    module.register_parameter(name, Parameter(weight))
    return module


def parameters_to_vector(parameters: Iterable[np.ndarray]) -> np.ndarray:
    """PyTorch's: the parameters flattened and concatenated, in order, into one new 1-D array."""
    arrays = [np.asarray(p) for p in parameters]
    if not arrays:
        raise GraphcError("parameters_to_vector: no parameters given")
    return np.concatenate([a.reshape(-1) for a in arrays])


def vector_to_parameters(vector: np.ndarray, parameters: Iterable[np.ndarray]) -> None:
    """PyTorch's: copy consecutive slices of the 1-D `vector` into the parameters, in place
    (models and optimizers holding them see the new values)."""
    vector = np.asarray(vector)
    arrays = list(parameters)
    total = sum(a.size for a in arrays)
    if vector.ndim != 1 or vector.size != total:
        raise ShapeError(f"vector_to_parameters: expects a 1-D vector of the parameters' {total} "
                         f"elements, got shape {vector.shape}")
    at = 0
    for array in arrays:
        array[...] = vector[at:at + array.size].reshape(array.shape)
        at += array.size
