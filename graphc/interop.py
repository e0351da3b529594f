"""NumPy and PyTorch functions applied to graphc Tensors while tracing.

NumPy hands a ufunc or a NumPy function called on a Tensor to the Tensor (`__array_ufunc__`,
`__array_function__`): those with a graphc op trace as that op, so `np.exp(x)` in a model is
`gc.exp(x)`; any other raises a GraphcError naming the call and what to write instead.
PyTorch hands its functions to `__torch_function__` the same way; graphc cannot run them, so
they raise, naming graphc's equivalent. Without this, both failed deep inside NumPy or PyTorch
("'numpy.ndarray' object has no attribute 'value'", "must be Tensor, not Tensor").
"""
from __future__ import annotations

import inspect
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np

from graphc.ir.errors import INTERNAL_DIRS, GraphcError, ShapeError, user_location

from . import functions as gcf
from .tensor import FLOAT_MATH, Tensor, as_tensor, bind, float_math, normalize_axes

__all__ = ["array_ufunc", "array_function", "torch_function"]


# -- NumPy ufuncs -----------------------------------------------------------------------------
def _unary(op: str) -> Callable[[Tensor], Tensor]:
    return lambda x: float_math(op, x) if op in FLOAT_MATH else bind(op, x)


def _binary(op: str) -> Callable[[Any, Any], Tensor]:
    """As the Tensor operator: a Python or NumPy scalar takes the Tensor's dtype."""
    return lambda x, y: x._binary(op, y) if isinstance(x, Tensor) else y._binary(op, x, True)


def _power(x: Any, y: Any) -> Tensor:
    return x ** y if isinstance(x, Tensor) else y.__rpow__(x)


def _matmul(x: Any, y: Any) -> Tensor:
    return x @ y if isinstance(x, Tensor) else y.__rmatmul__(x)


UFUNCS: dict[np.ufunc, Callable[..., Tensor]] = {
    np.add: _binary("add"), np.subtract: _binary("sub"), np.multiply: _binary("mul"),
    np.true_divide: _binary("div"), np.power: _power, np.matmul: _matmul,
    np.maximum: gcf.maximum, np.minimum: gcf.minimum,
    np.less: _binary("lt"), np.less_equal: _binary("le"), np.greater: _binary("gt"),
    np.greater_equal: _binary("ge"), np.equal: _binary("eq"), np.not_equal: _binary("ne"),
    np.logical_and: _binary("logical_and"), np.logical_or: _binary("logical_or"),
    np.logical_not: _unary("logical_not"), np.negative: _unary("neg"), np.positive: lambda x: x,
    np.absolute: _unary("abs"), np.fabs: _unary("abs"), np.exp: _unary("exp"),
    np.log: _unary("log"), np.log1p: _unary("log1p"), np.sqrt: _unary("sqrt"),
    np.tanh: _unary("tanh"), np.square: _unary("square"), np.reciprocal: _unary("reciprocal"),
    np.sign: _unary("sign"), np.expm1: gcf.expm1, np.floor: gcf.floor, np.ceil: gcf.ceil,
    np.trunc: gcf.trunc, np.rint: gcf.round, np.fmod: gcf.fmod,
}

# What to write instead, for NumPy calls graphc has no single op for.
SUGGESTIONS: dict[str, str] = {
    "np.log2": "gc.log(x) / math.log(2)",
    "np.log10": "gc.log(x) / math.log(10)", "np.exp2": "gc.exp(x * math.log(2))",
    "np.add.reduce": "gc.sum(x, axis)", "np.maximum.reduce": "x.amax(axis)",
    "np.minimum.reduce": "x.amin(axis)", "np.linalg.norm": "x.norm(p, dim)",
}


def _unsupported(call: str) -> GraphcError:
    instead = SUGGESTIONS.get(call)
    name = call.rpartition(".")[2]
    if instead is None and name in gcf.__all__:  # same name, but arguments may differ
        instead = f"gc.{name}{_parameters(getattr(gcf, name))}"
    advice = (f"write {instead} instead" if instead else
              "graphc has no equivalent op; compute it outside the traced function, or build it "
              "from graphc ops")
    return GraphcError(f"{call} on a graphc Tensor: {advice} (at {user_location()})")


def _parameters(fn: Callable) -> str:
    """`fn`'s signature as a call is written: names and defaults, no annotations."""
    signature = inspect.signature(fn)
    return str(signature.replace(return_annotation=inspect.Signature.empty, parameters=[
        p.replace(annotation=inspect.Parameter.empty) for p in signature.parameters.values()]))


def _ufunc_rule(ufunc: np.ufunc) -> Callable[..., Tensor] | None:
    """The graphc op for a ufunc: from the table, or graphc's function of the same name for a
    one-operand, one-result ufunc (np.sin is gc.sin: graphc names its math as NumPy does)."""
    apply = UFUNCS.get(ufunc)
    if apply is None and ufunc.nin == 1 and ufunc.nout == 1 and ufunc.__name__ in gcf.__all__:
        apply = getattr(gcf, ufunc.__name__)
    return apply


def array_ufunc(ufunc: np.ufunc, method: str, inputs: tuple[Any, ...],
                kwargs: dict[str, Any]) -> Tensor:
    """`Tensor.__array_ufunc__`: the graphc op for the ufunc, or a GraphcError."""
    call = f"np.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
    if method != "__call__":
        raise _unsupported(call)
    apply = _ufunc_rule(ufunc)
    if apply is None:
        raise _unsupported(call)
    if kwargs:
        raise GraphcError(f"{call} on a graphc Tensor takes the operands only, got "
                          f"{', '.join(f'{k}=' for k in kwargs)} (a traced Tensor is a value: "
                          f"nothing is written in place) (at {user_location()})")
    return apply(*inputs)


# -- NumPy functions --------------------------------------------------------------------------
# NumPy's own positional order (np.var(a, 0, None) passes dtype=None, not ddof); `dtype`
# casts first, `out` (writing in place) has no meaning for a traced value.
def _in(a, dtype, out, call):
    if out is not None:
        raise GraphcError(f"np.{call} on a graphc Tensor takes no out= (a traced Tensor is a "
                          f"value: nothing is written in place) (at {user_location()})")
    a = as_tensor(a)
    return a if dtype is None else a.astype(np.dtype(dtype).name)


def _sum(a, axis=None, dtype=None, out=None, keepdims=False):
    return _in(a, dtype, out, "sum").sum(axis=axis, keepdims=keepdims)


def _prod(a, axis=None, dtype=None, out=None, keepdims=False):
    return _in(a, None, out, "prod").prod(axis=axis, keepdims=keepdims, dtype=dtype)


def _mean(a, axis=None, dtype=None, out=None, keepdims=False):
    return _in(a, dtype, out, "mean").mean(axis=axis, keepdims=keepdims)


def _var(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False):
    return _in(a, dtype, out, "var").var(axis=axis, correction=ddof, keepdim=keepdims)


def _std(a, axis=None, dtype=None, out=None, ddof=0, keepdims=False):
    return _in(a, dtype, out, "std").std(axis=axis, correction=ddof, keepdim=keepdims)


def _max(a, axis=None, out=None, keepdims=False): return _in(a, None, out, "max").amax(axis=axis, keepdims=keepdims)
def _min(a, axis=None, out=None, keepdims=False): return _in(a, None, out, "min").amin(axis=axis, keepdims=keepdims)


def _argmax(a, axis=None, out=None, *, keepdims=False):
    return _in(a, None, out, "argmax").argmax(axis, keepdims)


def _argmin(a, axis=None, out=None, *, keepdims=False):
    return _in(a, None, out, "argmin").argmin(axis, keepdims)
def _clip(a, a_min, a_max): return gcf.clip(a, a_min, a_max)
def _norm(x): return as_tensor(x).norm()  # the 2-norm of all entries; ord= and axis= refused


def _cumsum(a, axis=None):
    """NumPy's cumsum runs over the flattened array when no axis is given."""
    a = as_tensor(a)
    return a.reshape(-1).cumsum(0) if axis is None else a.cumsum(axis)


def _cumprod(a, axis=None):
    """NumPy's cumprod runs over the flattened array when no axis is given."""
    a = as_tensor(a)
    return a.reshape(-1).cumprod(0) if axis is None else a.cumprod(axis)


def _sort(a, axis=-1, kind=None):
    """np.sort: axis=None sorts the flattened array. Every `kind` is honoured: graphc's sort is
    stable, which is what 'stable' and 'mergesort' promise and the others allow."""
    a = as_tensor(a)
    if axis is not None and a.ndim == 0:
        raise ShapeError(f"np.sort: axis {axis} is out of bounds for a 0-d array (at {user_location()})")
    return a.reshape(-1).sort(0).values if axis is None else a.sort(axis).values


def _argsort(a, axis=-1, kind=None):
    """np.argsort, as np.sort."""
    a = as_tensor(a)
    return a.reshape(-1).argsort(0) if axis is None else a.argsort(axis)


def _concatenate(arrays, axis=0):  # axis=None joins the flattened arrays, as NumPy's
    return gcf.concatenate([as_tensor(a).reshape(-1) for a in arrays] if axis is None else arrays,
                           0 if axis is None else axis)
def _stack(arrays, axis=0): return gcf.stack(arrays, axis)
def _where(condition, x, y): return gcf.where(condition, x, y)
def _squeeze(a, axis=None):
    # NumPy's: a named axis must have length 1 (Tensor.squeeze, as PyTorch's, skips it)
    t = as_tensor(a)
    if axis is None:
        return t.squeeze()
    # a view of `a`, as NumPy's (writes through it reach `a`); the op checks the axes' lengths
    return t.reshape(bind("squeeze", t, axes=normalize_axes(axis, t.ndim)).shape)


def _expand_dims(a, axis):
    """NumPy's: one new axis or several (a tuple, positions in the result)."""
    a = as_tensor(a)
    axes = normalize_axes(axis, a.ndim + (len(axis) if isinstance(axis, (tuple, list)) else 1))
    if len(set(axes)) != len(axes):
        raise ShapeError(f"np.expand_dims: repeated axis in {axis} (at {user_location()})")
    return a.reshape(bind("expand_dims", a, axes=tuple(sorted(axes))).shape)  # a view of `a`, as NumPy's


def _broadcast_to(array, shape):  # an int shape is one axis, as NumPy's
    return as_tensor(array).broadcast_to((shape,) if isinstance(shape, (int, np.integer)) else shape)
def _take_along_axis(arr, indices, axis): return gcf.take_along_axis(arr, indices, axis)
def _shape(a): return as_tensor(a).shape
def _ndim(a): return as_tensor(a).ndim
def _size(a): return as_tensor(a).numel()
def _reshape(a, shape): return as_tensor(a).reshape(shape)


def _transpose(a, axes=None):
    a = as_tensor(a)
    return a.T if axes is None else a.permute(*axes)


def _rank(x: Any) -> int:
    return x.ndim if isinstance(x, Tensor) else np.ndim(x)


def _dot(a, b):
    """np.dot is matmul for operands of rank 1 and 2 (its rank > 2 rule differs), and a
    product when either is a scalar."""
    if _rank(a) == 0 or _rank(b) == 0:
        return _binary("mul")(a, b)
    a, b = as_tensor(a), as_tensor(b)
    if a.ndim > 2 or b.ndim > 2:
        raise ShapeError(f"np.dot on graphc Tensors of shapes {a.shape} and {b.shape}: only "
                         f"ranks 1 and 2 are supported; use gc.matmul or @ (batched matmul) "
                         f"(at {user_location()})")
    return gcf.matmul(a, b)


def _take(a, indices, axis=None):
    a = as_tensor(a)
    return gcf.gather(a.reshape(-1) if axis is None else a, indices, 0 if axis is None else axis)


def _pad(array, pad_width, mode="constant", constant_values=0):
    array = as_tensor(array)
    if mode != "constant" or np.ndim(constant_values) != 0:
        raise GraphcError(f"np.pad on a graphc Tensor: only mode='constant' with one scalar "
                          f"constant_values is supported, got mode={mode!r} "
                          f"(at {user_location()})")
    widths = np.broadcast_to(np.asarray(pad_width, dtype=np.int64), (array.ndim, 2))
    return gcf.pad(array, [tuple(map(int, w)) for w in widths], float(constant_values))


FUNCTIONS: dict[Callable, Callable] = {
    np.sum: _sum, np.mean: _mean, np.max: _max, np.amax: _max, np.argmax: _argmax,
    np.reshape: _reshape, np.transpose: _transpose, np.concatenate: _concatenate,
    np.stack: _stack, np.where: _where, np.dot: _dot, np.squeeze: _squeeze,
    np.expand_dims: _expand_dims, np.broadcast_to: _broadcast_to, np.take: _take,
    np.take_along_axis: _take_along_axis, np.pad: _pad, np.shape: _shape, np.ndim: _ndim,
    np.size: _size, np.min: _min, np.amin: _min, np.argmin: _argmin, np.var: _var,
    np.std: _std, np.clip: _clip, np.cumsum: _cumsum, np.cumprod: _cumprod, np.prod: _prod,
    np.linalg.norm: _norm, np.sort: _sort,
    np.argsort: _argsort,
}


def _numpy_name(func: Callable) -> str:
    module = getattr(func, "__module__", None) or "numpy"
    return module.replace("numpy", "np", 1) + "." + func.__name__


def array_function(func: Callable, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """`Tensor.__array_function__`: the graphc equivalent of the NumPy function, or a
    GraphcError."""
    call = _numpy_name(func)
    apply = FUNCTIONS.get(func)
    if apply is None:
        raise _unsupported(call)
    try:
        inspect.signature(apply).bind(*args, **kwargs)
    except TypeError:
        raise GraphcError(f"{call} on a graphc Tensor takes {call}{inspect.signature(apply)}; got "
                          f"{len(args)} positional argument(s) and keywords "
                          f"{sorted(kwargs) or 'none'} (at {user_location()})") from None
    return apply(*args, **kwargs)


# -- PyTorch ----------------------------------------------------------------------------------
# Python operators PyTorch names as functions (torch.add, Tensor.__radd__, add_).
TORCH_OPERATORS: dict[str, str] = {
    "add": "+", "sub": "-", "subtract": "-", "mul": "*", "multiply": "*", "div": "/",
    "divide": "/", "true_divide": "/", "pow": "**", "neg": "unary -", "negative": "unary -",
    "matmul": "@ (or gc.matmul)", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">",
    "ge": ">=",
}

# PyTorch names graphc spells differently; used when graphc has nothing of the same name.
TORCH_RENAMED: dict[str, str] = {
    "concat": "gc.cat", "concatenate": "gc.cat", "mm": "gc.matmul (or @)",
    "bmm": "gc.matmul (or @)", "clamp": "gc.minimum(gc.maximum(x, low), high)",
    "clip": "gc.minimum(gc.maximum(x, low), high)", "view": "x.reshape",
    "embedding": "gc.nn.Embedding", "layer_norm": "gc.nn.LayerNorm",
    "batch_norm": "gc.nn.BatchNorm1d/2d",
}


# PyTorch functions whose graphc namesake means something else.
TORCH_SAME_NAME_DIFFERENT: dict[str, str] = {
    "gather": "gc.take_along_axis(x, index, dim) (gc.gather is np.take: whole slices along an axis)",
}


def _torch_name(func: Callable) -> str:
    module = getattr(func, "__module__", None)
    if module is None or hasattr(func, "__objclass__"):  # a method of torch.Tensor
        return f"torch.Tensor.{func.__name__}"
    return {"torch._C._nn": "torch.nn.functional"}.get(module, module) + f".{func.__name__}"


def _graphc_equivalent(name: str) -> str | None:
    """What graphc offers for the PyTorch function `name`: an operator, a function of the same
    name (gc.nn.functional first, as PyTorch's own), a Tensor method, or a renamed one. Looked
    up when asked, so what graphc gains is suggested without a table to keep."""
    from .nn import functional as F

    bare = name.strip("_")  # __add__, add_ (in place) -> add
    if bare in TORCH_SAME_NAME_DIFFERENT:
        return TORCH_SAME_NAME_DIFFERENT[bare]
    if bare not in TORCH_OPERATORS and bare[1:] in TORCH_OPERATORS and bare[0] == "r":
        bare = bare[1:]  # __radd__ -> add
    if bare in TORCH_OPERATORS:
        return TORCH_OPERATORS[bare]
    if bare in F.__all__:
        return f"gc.nn.functional.{bare}"
    if bare in gcf.__all__:
        return f"gc.{bare}"
    if not bare.startswith("_") and callable(getattr(Tensor, bare, None)):
        return f"the Tensor method x.{bare}(...)"
    return TORCH_RENAMED.get(bare)


def torch_function(func: Callable) -> Any:
    """`Tensor.__torch_function__`: PyTorch cannot compute on a traced graphc Tensor; say what
    to write instead."""
    call = _torch_name(func)
    if call.startswith("torch.Tensor."):  # a PyTorch tensor's method (or operator) met ours
        advice = ("a PyTorch tensor cannot compute with a traced graphc Tensor: make it a NumPy "
                  "array (t.detach().numpy()), which graphc takes as a constant")
    else:
        instead = _graphc_equivalent(func.__name__)
        advice = (f"use {instead}" if instead else
                  "graphc has no equivalent op; build it from graphc ops (gc.*, gc.nn.functional)")
    raise GraphcError(f"{call} was called on a graphc Tensor: PyTorch functions and modules cannot "
                      f"run inside a graphc trace; {advice} (at {_caller_outside_torch()})")


def _caller_outside_torch() -> str | None:
    """The user's line that called into PyTorch: the innermost frame outside graphc and torch
    (a torch.nn module reaches __torch_function__ through its own code)."""
    skipped = (*INTERNAL_DIRS, os.path.dirname(sys.modules["torch"].__file__))
    frame = sys._getframe(1)
    while frame is not None:
        filename = frame.f_code.co_filename
        path = os.path.abspath(filename)
        if not filename.startswith("<") and not any(
                path == d or path.startswith(d + os.sep) for d in skipped):
            return f"{filename}:{frame.f_lineno}"
        frame = frame.f_back
    return None
