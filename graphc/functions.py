"""NumPy-style functions on traced tensors (gc.exp, gc.where, gc.concatenate, ...)."""
from __future__ import annotations

import functools
import string
from typing import Any, Sequence

import numpy as np

from graphc.ir import TensorType
from graphc.ir.errors import DTypeError, GraphcError, ShapeError, user_location
from graphc.ir.types import is_float

from .tensor import (FLOAT_MATH, Tensor, ValuesIndices, _is_number, normalize_axes, promote_types,
                     reduction_axes, scalar_reduced_as_vector, as_tensor, bind,
                     current_trace, dtype_name, float_math, matmul, promoted)

__all__ = ["exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "abs", "sign", "square",
           "reciprocal", "maximum", "minimum", "where", "sum", "prod", "mean", "max", "amax", "argmax", "matmul",
           "concatenate", "cat", "stack", "split", "chunk", "flip", "flatten", "masked_fill", "numel",
           "pad", "gather", "take_along_axis", "one_hot", "stop_gradient",
           "cast", "uniform", "bernoulli", "logsumexp", "expm1", "floor", "ceil", "trunc", "round",
           "floor_divide", "remainder", "fmod"]


def _unary(op: str):
    def fn(x: Tensor) -> Tensor:
        return float_math(op, x) if op in FLOAT_MATH else bind(op, as_tensor(x))
    fn.__name__ = op
    fn.__doc__ = f"Elementwise {op}."
    return fn


exp, log, log1p, sqrt, rsqrt, tanh, sigmoid, abs, sign, square, reciprocal, stop_gradient = (
    _unary(op) for op in ("exp", "log", "log1p", "sqrt", "rsqrt", "tanh", "sigmoid", "abs",
                          "sign", "square", "reciprocal", "stop_gradient"))


expm1 = _unary("expm1")


def _rounding(op: str):
    def fn(x: Tensor) -> Tensor:
        x = as_tensor(x)
        return bind(op, x) if is_float(x.dtype) else x  # integers are whole already, as in PyTorch
    fn.__name__ = op
    fn.__doc__ = f"Elementwise {op} (no gradient: the function is piecewise constant)."
    return fn


floor, ceil, trunc = _rounding("floor"), _rounding("ceil"), _rounding("trunc")


def round(x: Tensor, decimals: int = 0) -> Tensor:
    """To the nearest integer, halves to the even one (NumPy's and PyTorch's rule); with
    `decimals`, to that many decimal places (scaled by an exact power of ten, rounded, scaled
    back, as PyTorch does)."""
    x = as_tensor(x)
    if not decimals or not is_float(x.dtype):
        return _rounding("round")(x)
    # PyTorch's: by an exact power of ten (10**-3 has no exact float: 1234.5 gave 999.99994)
    if decimals < 0:
        scale = 10.0 ** -decimals
        return _rounding("round")(x / scale) * scale
    scale = 10.0 ** decimals
    return _rounding("round")(x * scale) / scale


def _pair(x: Any, y: Any) -> tuple[Tensor, Tensor]:
    """Both operands as Tensors of one dtype, promoted as PyTorch does (see
    tensor.result_dtype): a Python number never widens a tensor's dtype of its own kind."""
    x, y = promoted(x, y)
    return x, y


def maximum(x: Any, y: Any) -> Tensor:
    x, y = _pair(x, y)
    return bind("logical_or" if x.dtype == "bool" else "maximum", x, y)  # booleans: True > False


def minimum(x: Any, y: Any) -> Tensor:
    x, y = _pair(x, y)
    return bind("logical_and" if x.dtype == "bool" else "minimum", x, y)


def floor_divide(x: Any, y: Any) -> Tensor:
    """x // y rounded down, as Python, NumPy and PyTorch (an integer divided by 0 gives 0)."""
    return bind("floor_divide", *promoted(x, y))


def remainder(x: Any, y: Any) -> Tensor:
    """x % y with the divisor's sign, as Python, NumPy and PyTorch."""
    return bind("remainder", *promoted(x, y))


def fmod(x: Any, y: Any) -> Tensor:
    """C's fmod, as PyTorch's torch.fmod and NumPy's np.fmod: the remainder of x / y truncated
    toward zero, with the dividend's sign (an integer divided by 0 gives 0, as in NumPy)."""
    x, y = promoted(x, y)
    if is_float(x.dtype):
        return bind("fmod", x, y)
    r = remainder(x, y)  # the divisor's sign: one divisor off where the signs differ
    return where((r != 0) & ((r < 0) != (x < 0)), r - y, r)


def where(cond: Tensor, x: Any, y: Any) -> Tensor:
    x, y = _pair(x, y)
    return bind("where", as_tensor(cond), x, y)


def cast(x: Tensor, dtype: Any) -> Tensor:
    return as_tensor(x).astype(dtype)


# Reductions take PyTorch's `dim`/`keepdim` and NumPy's `axis`/`keepdims` alike.
def sum(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
        axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    return as_tensor(x).sum(dim, keepdim, axis=axis, keepdims=keepdims)


def prod(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
         axis: int | Sequence[int] | None = None, keepdims: bool = False, dtype: Any = None) -> Tensor:
    """The product over `dim` (all axes by default); see Tensor.prod."""
    return as_tensor(x).prod(dim, keepdim, axis=axis, keepdims=keepdims, dtype=dtype)


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


@scalar_reduced_as_vector
def logsumexp(x: Tensor, dim: int | Sequence[int] = -1, keepdim: bool = False, *,
              axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
    """log(sum(exp(x))) computed stably: the maximum is factored out (and not differentiated).
    Where the maximum is infinite, 0 is factored out instead (inf - inf would be NaN): a line
    of -inf gives -inf and one holding +inf gives +inf, and an empty line -inf, as in PyTorch
    and SciPy."""
    x = as_tensor(x)
    axes = normalize_axes(dim if axis is None else axis, x.ndim)
    if any(x.shape[a] == 0 for a in axes):  # the log of an empty sum, as PyTorch's: -inf
        out = x.sum(axis=axes, keepdims=True).log()
        return out if keepdim or keepdims else out.squeeze(axes)
    m = stop_gradient(x.amax(axis=axes, keepdims=True))
    # m - m is 0 exactly where m is finite (no inf constant for check_numerics to flag)
    shift = where(m - m == 0, m, 0.0)
    out = (x - shift).exp().sum(axis=axes, keepdims=True).log() + shift
    return out if keepdim or keepdims else out.squeeze(axes)


def concatenate(xs: Sequence[Tensor], axis: int = 0, *, dim: int | None = None) -> Tensor:
    tensors = [as_tensor(x) for x in xs]
    if not tensors:
        raise GraphcError(f"concatenate/cat needs at least one tensor (at {user_location()})")
    (axis,) = normalize_axes(axis if dim is None else dim, tensors[0].ndim)
    dtype = functools.reduce(promote_types, (t.dtype for t in tensors))  # as torch.cat promotes
    tensors = [t.astype(dtype) for t in tensors]
    # one tensor: a copy, as torch.cat makes (writing it in place leaves the input)
    return tensors[0].clone() if len(tensors) == 1 else bind("concatenate", *tensors, axis=axis)


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


def flatten(x: Tensor, start_dim: int = 0, end_dim: int = -1) -> Tensor:
    """torch.flatten: axes start_dim..end_dim merged into one (`gc.flatten(x, 1)` keeps the
    batch axis)."""
    return as_tensor(x).flatten(start_dim, end_dim)


def pad(x: Tensor, pad_width: Sequence[tuple[int, int]], value: float = 0.0) -> Tensor:
    return bind("pad", as_tensor(x), pads=tuple(tuple(p) for p in pad_width), value=value)


def gather(x: Tensor, indices: Any, axis: int = 0) -> Tensor:
    """np.take: pick slices of `x` along `axis` (embedding lookup). PyTorch's gather(x, dim,
    index) is gc.take_along_axis(x, index, dim), or x.gather(dim, index)."""
    x = as_tensor(x)
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, (bool, np.bool_)):
        raise GraphcError(f"gather: axis must be an integer, got {type(axis).__name__}: gc.gather "
                          "is NumPy's take(x, indices, axis); for PyTorch's gather(x, dim, index) "
                          f"use gc.take_along_axis(x, index, dim) (at {user_location()})")
    (axis,) = normalize_axes(axis, x.ndim)
    return bind("gather", x, as_tensor(indices), axis=axis)


def take_along_axis(x: Tensor, indices: Any, axis: int) -> Tensor:
    x = as_tensor(x)
    (axis,) = normalize_axes(axis, x.ndim)
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


__all__ += ["rand", "rand_like", "randn", "randn_like", "randint", "mm", "bmm", "addmm", "baddbmm",
            "finfo", "iinfo"]


def mm(input: Tensor, mat2: Any) -> Tensor:
    """torch.mm: the product of two matrices (no broadcasting)."""
    return as_tensor(input).mm(mat2)


def bmm(input: Tensor, mat2: Any) -> Tensor:
    """torch.bmm: the products of two batches of matrices, (b, n, m) @ (b, m, p)."""
    return as_tensor(input).bmm(mat2)


def addmm(input: Tensor, mat1: Any, mat2: Any, *, beta: float = 1, alpha: float = 1) -> Tensor:
    """torch.addmm: beta * input + alpha * (mat1 @ mat2) (a linear layer's bias and product)."""
    return as_tensor(input).addmm(mat1, mat2, beta=beta, alpha=alpha)


def baddbmm(input: Tensor, batch1: Any, batch2: Any, *, beta: float = 1, alpha: float = 1) -> Tensor:
    """torch.baddbmm: beta * input + alpha * (batch1 @ batch2) over a batch of matrices."""
    return as_tensor(input).baddbmm(batch1, batch2, beta=beta, alpha=alpha)


def finfo(dtype: Any = "float32") -> np.finfo:
    """torch.finfo: eps, max, min, tiny of a float dtype (NumPy's finfo; gc.finfo(x.dtype))."""
    return np.finfo(dtype_name(dtype))


def iinfo(dtype: Any) -> np.iinfo:
    """torch.iinfo: max and min of an integer dtype (NumPy's iinfo)."""
    return np.iinfo(dtype_name(dtype))


def rand(*size: Any, dtype: Any = "float32") -> Tensor:
    """torch.rand: uniform [0, 1) numbers of `size` (as gc.uniform), from the call's key."""
    return uniform(_shape_argument(size), dtype_name(dtype))


def rand_like(x: Tensor, *, dtype: Any = None) -> Tensor:
    x = as_tensor(x)
    return uniform(x.shape, dtype_name(dtype) if dtype is not None else x.dtype)


def randn(*size: Any, dtype: Any = "float32") -> Tensor:
    """torch.randn: standard normal numbers of `size`, from the call's key (Box-Muller over two
    uniform draws: sqrt(-2 log u) cos(2 pi v), u in (0, 1])."""
    shape, dtype = _shape_argument(size), dtype_name(dtype)
    radius = (log(1.0 - uniform(shape, dtype)) * -2.0).sqrt()
    return radius * cos(uniform(shape, dtype) * (2 * np.pi))


def randn_like(x: Tensor, *, dtype: Any = None) -> Tensor:
    """torch.randn_like (a VAE's reparametrisation noise: mu + std * randn_like(std))."""
    x = as_tensor(x)
    return randn(x.shape, dtype=dtype_name(dtype) if dtype is not None else x.dtype)


def randint(*args: Any, low: int | None = None, high: int | None = None, size: Any = None,
            dtype: Any = "int64") -> Tensor:
    """torch.randint(high, size) or (low, high, size), by position or keyword: integers uniform
    in [low, high)."""
    if size is None and args and not isinstance(args[-1], (int, np.integer)):
        *args, size = args
    args = [a for a in (low, *args, high) if a is not None] if (low, high) != (None, None) else args
    if size is None or len(args) not in (1, 2) or not all(isinstance(a, (int, np.integer)) for a in args):
        raise GraphcError(f"randint: takes (high, size) or (low, high, size) with integer bounds "
                          f"(at {user_location()})")
    low, high = (0, *args) if len(args) == 1 else args
    if high <= low:
        raise GraphcError(f"randint: expects low < high, got [{low}, {high}) (at {user_location()})")
    # float64 draws: float32's 24 bits would leave most of a wide range never drawn
    drawn = (uniform(_shape_argument((size,)), "float64") * float(high - low)).floor()
    return (drawn.astype("int64").clip(0, high - low - 1) + low).astype(dtype_name(dtype))


# -- math with PyTorch's names, keywords and dtypes ---------------------------------------------
sin, cos, erf = (_unary(op) for op in ("sin", "cos", "erf"))

__all__ += ["sin", "cos", "erf", "clamp", "clip", "cumsum", "cumprod", "argsort", "sort", "topk",
            "var", "std", "min", "amin", "argmin", "norm", "einsum", "triu", "tril", "arange",
            "zeros", "ones", "full", "zeros_like", "ones_like", "full_like"]


def clamp(x: Tensor, min: Any = None, max: Any = None) -> Tensor:
    """Each element limited to [min, max]; either bound may be None, a number or a tensor
    (broadcasting). As in PyTorch, NaN stays NaN, min > max gives max, and the gradient flows
    where min <= x <= max."""
    x = as_tensor(x)
    if min is None and max is None:
        raise GraphcError(f"clamp: give min, max or both (at {user_location()})")
    # PyTorch's values: min(max(x, min), max), and max wherever max < min (NaN included).
    # Its gradient: x's where min <= x <= max, min's where x < min < max, max's where x > max
    # or max < min; no operand's elsewhere (NaN, min == max above x): selected by where, which
    # gives each selected operand its cotangent, from a value that gives none.
    value = x if min is None else maximum(x, min)
    value = value if max is None else minimum(value, max)
    inside, below, above = None, None, None
    if min is not None:
        inside, below = x >= min, x < min
    if max is not None:
        inside = x <= max if inside is None else inside & (x <= max)
        above = x > max
    if min is not None and max is not None:
        crossed, ordered = (b if isinstance(b, Tensor) else as_tensor(np.bool_(b)) for b in (max < min, min < max))
        below, above = below & ordered, above | crossed
        value = where(crossed & (x == x), max, value)
    out = where(inside, x, stop_gradient(value))
    if below is not None:
        out = where(below, min, out)
    if above is None:
        return out
    # a NaN x stays NaN where max < min, as in PyTorch, whose gradient still goes to max there
    nan = where(x == x, 0, stop_gradient(x)) if is_float(x.dtype) else 0
    return where(above, max + nan if min is not None else max, out)


clip = clamp


def _cumulative(op: str, x: Any, dim: int | None, axis: int | None, dtype: Any) -> Tensor:
    x = as_tensor(x)
    dim = reduction_axes(dim, axis, op)
    if dim is None:  # NumPy's: over the flattened array (PyTorch requires dim)
        x, dim = x.reshape(-1), 0
    # PyTorch and NumPy accumulate integers and booleans in int64; PyTorch accumulates float32
    # in float64 (a running sum of 1e6 terms keeps its digits, 1e30 * 1e30 * 0 is 0, not
    # inf * 0), then rounds to float32
    target = dtype_name(dtype) if dtype is not None else x.dtype if is_float(x.dtype) else "int64"
    if target == "float32":
        return _cumulative(op, x.astype("float64"), dim, None, None).astype("float32")
    if x.dtype != target:
        x = x.astype(target)
    if x.ndim == 0:
        normalize_axes(dim, 1)
        return bind(op, x.reshape(1), axis=0).reshape(())
    (dim,) = normalize_axes(dim, x.ndim)
    return bind(op, x, axis=dim)


def cumsum(x: Tensor, dim: int | None = None, *, axis: int | None = None, dtype: Any = None) -> Tensor:
    """Running sum along `dim`; float32 sums in float64, integers and booleans in int64, unless
    `dtype` says otherwise (as PyTorch)."""
    return _cumulative("cumsum", x, dim, axis, dtype)


def cumprod(x: Tensor, dim: int | None = None, *, axis: int | None = None, dtype: Any = None) -> Tensor:
    """Running product along `dim` (float32 in float64, as cumsum); its gradient is exact where
    elements are zero."""
    return _cumulative("cumprod", x, dim, axis, dtype)


def argsort(x: Tensor, dim: int = -1, descending: bool = False, stable: bool = False, *,
            axis: int | None = None) -> Tensor:
    """The int64 positions that sort `x` along `dim` (torch.argsort, np.argsort). Always stable:
    equal elements keep their order, which `stable=True` asks for. NaN sorts as the largest."""
    x = as_tensor(x)
    if x.ndim == 0:
        return argsort(x.reshape(1), 0, descending).reshape(())
    (dim,) = normalize_axes(dim if axis is None else axis, x.ndim)
    return bind("argsort", x, axis=dim, descending=descending)


def sort(x: Tensor, dim: int = -1, descending: bool = False, stable: bool = False, *,
         axis: int | None = None) -> ValuesIndices:
    """torch.sort: (values, indices) along `dim`, stable. The values are x gathered at the
    indices, so they differentiate: each one's gradient goes back to its position in x."""
    x = as_tensor(x)
    indices = argsort(x, dim, descending, stable, axis=axis)
    if x.ndim == 0:
        return ValuesIndices(x, indices)
    return ValuesIndices(take_along_axis(x, indices, dim if axis is None else axis), indices)


def topk(x: Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True) -> ValuesIndices:
    """torch.topk: the `k` largest (smallest with largest=False) elements along `dim` and their
    positions, largest first (smallest first); ties keep their order, NaN counts as the largest.
    The values differentiate as sort's do. `sorted=False` leaves the order open in PyTorch;
    here they come sorted all the same."""
    x = as_tensor(x)
    (axis,) = normalize_axes(dim, x.ndim or 1)  # (a 0-d x has one element)
    size = x.shape[axis] if x.ndim else 1
    if not 0 <= k <= size:
        raise ShapeError(f"topk: k={k} is out of range for dim {dim} of size {size} (shape "
                         f"{tuple(x.shape)}); it must lie in [0, {size}] (at {user_location()})")
    values, indices = sort(x, axis, descending=largest)
    if x.ndim == 0:
        return ValuesIndices(values, indices)
    first_k = (slice(None),) * axis + (slice(0, k),)
    return ValuesIndices(values[first_k], indices[first_k])


@scalar_reduced_as_vector
def var(x: Tensor, dim: int | Sequence[int] | None = None, unbiased: bool | None = None,
        keepdim: bool = False, *, correction: float | None = None, axis: Any = None,
        keepdims: bool = False, ddof: float | None = None) -> Tensor:
    """Variance over `dim` (all axes by default), sum((x - mean)^2) / (N - correction), with
    PyTorch's default correction=1 (`unbiased=False` or NumPy's `ddof=0` for the population
    variance). N - correction <= 0 divides by zero, giving nan or inf as in PyTorch."""
    x = as_tensor(x)
    if isinstance(dim, bool):  # torch.var(x, False): the legacy positional `unbiased`
        dim, unbiased = None, dim
    given = [name for name, v in (("unbiased", unbiased), ("correction", correction), ("ddof", ddof))
             if v is not None]
    if len(given) > 1:
        raise GraphcError(f"var/std: give one of unbiased, correction and ddof, not "
                          f"{' and '.join(given)} (at {user_location()})")
    if not is_float(x.dtype):
        raise DTypeError(f"var/std: expects a floating-point tensor, got {x.dtype}; cast it "
                         f"with .float() (at {user_location()})")
    if correction is None:
        correction = ddof if ddof is not None else (0 if unbiased is False else 1)
    axes = normalize_axes(reduction_axes(dim, axis, "var"), x.ndim)
    count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    # The mean rounded to x's dtype is off by up to half its last place alike for every element:
    # where the mean is large against the spread, that error squared and counted N times swamps
    # the variance (3e7 + 4 N(0, 1) in float32: 21% off). Centring on the float64 mean split in
    # two parts of x's dtype, (x - high) - low, keeps it out; the reduction kernels compute that
    # in its written order (only their sum's own addition reassociates).
    mean = x.astype("float64").mean(axis=axes, keepdims=True)
    high = mean.astype(x.dtype)
    centered = x - high
    if x.dtype != "float64":
        centered = centered - (mean - high.astype("float64")).astype(x.dtype)
    squares = centered.square().sum(axis=axes, keepdims=keepdim or keepdims)
    return squares / float(count - correction if count > correction else 0)


def std(x: Tensor, dim: int | Sequence[int] | None = None, unbiased: bool | None = None,
        keepdim: bool = False, *, correction: float | None = None, axis: Any = None,
        keepdims: bool = False, ddof: float | None = None) -> Tensor:
    """Standard deviation: the square root of `var` (same arguments, correction=1 by default).
    Where the variance is 0 (a constant line) its gradient is 0, as PyTorch's, not the NaN of
    sqrt's infinite slope times the variance's zero one."""
    variance = var(x, dim, unbiased, keepdim, correction=correction, axis=axis, keepdims=keepdims,
                   ddof=ddof)
    nonzero = variance != 0  # NaN and inf (too few elements) stay as sqrt gives them
    return where(nonzero, where(nonzero, variance, 1.0).sqrt(), 0.0)


def min(x: Tensor, dim: Any = None, keepdim: bool = False, *, axis: Any = None,
        keepdims: bool = False) -> Tensor | ValuesIndices:
    """torch.min, as Tensor.min: see `max`."""
    return as_tensor(x).min(dim, keepdim, axis=axis, keepdims=keepdims)


def amin(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
         axis: Any = None, keepdims: bool = False) -> Tensor:
    """The minimum over one axis, several or all: values only (torch.amin, np.min)."""
    return as_tensor(x).amin(dim, keepdim, axis=axis, keepdims=keepdims)


def argmin(x: Tensor, dim: int | None = None, keepdim: bool = False, *, axis: int | None = None,
           keepdims: bool = False) -> Tensor:
    return as_tensor(x).argmin(dim, keepdim, axis=axis, keepdims=keepdims)


def norm(x: Tensor, p: float | str | None = "fro", dim: int | Sequence[int] | None = None,
         keepdim: bool = False, *, axis: Any = None, keepdims: bool = False) -> Tensor:
    """torch.norm over `dim` (all axes by default): p = 'fro' or 2 (the Euclidean norm), 1,
    inf, -inf, 0 (the count of non-zeros) or any other number (sum(|x|^p)^(1/p)); the gradient
    at a zero vector is 0, as in PyTorch."""
    x = as_tensor(x)
    axes = normalize_axes(reduction_axes(dim, axis, "norm"), x.ndim)
    keep = keepdim or keepdims
    if p is None or p == "fro" or p == 2:
        squares = x.square().sum(axis=axes, keepdims=keep)
        nonzero = squares != 0  # sqrt's derivative is infinite at 0: route zero vectors around it
        # (only them: `> 0` would route a NaN around too, and report 0)
        return where(nonzero, where(nonzero, squares, 1).sqrt(), 0)
    if isinstance(p, str):
        raise GraphcError(f"norm: p={p!r} is not supported; use 'fro', 1, 2, inf, -inf, 0 or "
                          f"another number (at {user_location()})")
    if p == 1:
        return x.abs().sum(axis=axes, keepdims=keep)
    if p == np.inf:
        return bind("max", x.abs(), axes=axes, keepdims=keep)
    if p == -np.inf:
        return x.abs().amin(axis=axes, keepdims=keep)
    if p == 0:
        return (x != 0).astype(x.dtype).sum(axis=axes, keepdims=keep)
    magnitude = x.abs()
    if 0 < p < 1:  # |x|^p's slope is infinite at 0: zero elements get gradient 0, as in PyTorch
        nonzero_element = magnitude != 0
        powers = where(nonzero_element, where(nonzero_element, magnitude, 1) ** float(p), 0)
    else:
        powers = magnitude ** float(p)
    total = powers.sum(axis=axes, keepdims=keep)
    nonzero = total != 0  # the root's derivative is infinite at 0: route zero vectors around it
    return where(nonzero, where(nonzero, total, 1) ** (1.0 / float(p)), 0)


def triu(x: Tensor, diagonal: int = 0) -> Tensor:
    """The upper triangle of the last two axes: elements with column - row >= diagonal."""
    return _triangle(x, diagonal, upper=True)


def tril(x: Tensor, diagonal: int = 0) -> Tensor:
    """The lower triangle of the last two axes: elements with column - row <= diagonal."""
    return _triangle(x, diagonal, upper=False)


def _triangle(x: Any, diagonal: int, upper: bool) -> Tensor:
    x = as_tensor(x)
    if isinstance(diagonal, (bool, np.bool_)) or not isinstance(diagonal, (int, np.integer)):
        raise TypeError(f"{'triu' if upper else 'tril'}: diagonal must be an int, got "
                        f"{diagonal!r} (at {user_location()})")
    if x.ndim < 2:
        raise ShapeError(f"{'triu' if upper else 'tril'}: expects at least two dimensions, got "
                         f"shape {x.shape} (at {user_location()})")
    rows, cols = x.shape[-2:]
    offset = np.arange(cols)[None, :] - np.arange(rows)[:, None]
    keep = offset >= diagonal if upper else offset <= diagonal
    return where(keep, x, np.zeros((), x.dtype))  # zeros of x's own dtype: a bool x stays bool


# -- einsum ---------------------------------------------------------------------------------------
def einsum(equation: str, *operands: Any) -> Tensor:
    """np.einsum / torch.einsum for one or more operands, contracted left to right: each pair
    becomes transposes, reshapes and one batched matmul (labels on both sides and in the output
    are the batch, labels on both sides only are summed by the product); a label on one side
    only and not in the output is summed first. Without '->' the output is '...' then the labels
    used once, in alphabetical order. '...' stands for the same axes in every operand, aligned
    from the right and broadcast, as do labels of size 1; axes of '...' the output leaves out are
    summed, as in PyTorch. A label repeated within one operand takes its diagonal ('ii->i')."""
    if not isinstance(equation, str):  # the sublist form: einsum(a, [0, 1], b, [1, 2], [0, 2])
        equation, operands = _sublist_equation((equation, *operands))
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])  # torch.einsum(eq, [a, b])
    tensors = [as_tensor(x) for x in operands]
    if tensors:  # of one dtype, as PyTorch promotes them
        common = functools.reduce(promote_types, (t.dtype for t in tensors))
        tensors = [t.astype(common) for t in tensors]
    inputs, output, spread = _parse_einsum(equation, tensors)
    sizes: dict[str, int] = {}
    for labels, t in zip(inputs, tensors):
        for label, n in zip(labels, t.shape):
            if sizes.setdefault(label, n) == 1:
                sizes[label] = n
            elif n not in (1, sizes[label]):
                what = (f"the axes '...' covers do not broadcast: {sizes[label]} and {n}" if label in spread
                        else f"label {label!r} has sizes {sizes[label]} and {n}")
                raise ShapeError(f"einsum {equation!r}: {what} (at {user_location()})")
    # an axis of size 1 against a longer one is constant along its label: the operand does not
    # depend on that label, so it loses the axis (broadcast out, it would be copied in full)
    inputs, tensors = zip(*(_without_broadcast_axes(labels, t, sizes) for labels, t in zip(inputs, tensors)))
    inputs, tensors = zip(*(_diagonals(labels, t) for labels, t in zip(inputs, tensors)))
    labels, result = inputs[0], tensors[0]
    for k in range(1, len(tensors)):
        later = set(output).union(*inputs[k + 1:])
        labels, result = _contract_pair(labels, result, inputs[k], tensors[k], later)
    result = _sum_labels(labels, result, keep=set(output))
    labels = "".join(l for l in labels if l in output)
    perm = tuple(labels.index(l) for l in output)
    return result if perm == tuple(range(len(perm))) else result.permute(perm)


def _parse_einsum(equation: str, tensors: list[Tensor]) -> tuple[list[str], str, str]:
    """The operands' labels and the output's, one letter per axis: '...' written out as letters
    the equation does not use (the third result), as many as the operand's axes it covers
    (aligned from the right)."""
    at = f"(at {user_location()})"
    spec = equation.replace(" ", "")
    lhs, arrow, output = spec.partition("->")
    inputs = lhs.split(",")
    if len(inputs) != len(tensors):
        raise ShapeError(f"einsum {equation!r}: {len(inputs)} operand specs for {len(tensors)} "
                         f"operands {at}")
    for labels in inputs + [output]:
        if labels.replace("...", "", 1) and not labels.replace("...", "", 1).isalpha():
            raise GraphcError(f"einsum {equation!r}: labels must be letters, with at most one '...' "
                              f"each, got {labels!r} {at}")
    # the most axes '...' covers in an operand (an operand naming too many fails below)
    widest = sorted([0] + [t.ndim - (len(labels) - 3) for labels, t in zip(inputs, tensors)
                           if "..." in labels])[-1]
    unused = [l for l in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" if l not in spec]
    if widest > len(unused):
        raise GraphcError(f"einsum {equation!r}: '...' covers more axes than there are letters the "
                          f"equation does not use {at}")
    spread = "".join(unused[:widest])
    for k, (labels, t) in enumerate(zip(inputs, tensors)):
        named = len(labels) - 3 if "..." in labels else len(labels)
        if t.ndim < named or ("..." not in labels and t.ndim != named):
            raise ShapeError(f"einsum {equation!r}: {labels!r} names {named} axes of an operand of "
                             f"shape {t.shape} {at}")
        inputs[k] = labels.replace("...", spread[len(spread) - (t.ndim - named):])
    if not arrow:
        counts = "".join(inputs)
        output = spread + "".join(sorted(l for l in set(counts) if counts.count(l) == 1 and l not in spread))
    output = output.replace("...", spread)
    unknown = sorted(set(output) - set("".join(inputs)))
    if unknown or len(set(output)) != len(output):
        raise GraphcError(f"einsum {equation!r}: the output {output!r} must name distinct labels of "
                          f"the operands {at}")
    return inputs, output, spread


def _sublist_equation(arguments: tuple) -> tuple[str, tuple]:
    """NumPy's and PyTorch's sublist form (operand, [axis ids], operand, [ids], ..., [output
    ids]; an id is an int in [0, 52) or Ellipsis) as an equation and its operands."""
    def labels(ids: Any) -> str:
        if not isinstance(ids, (list, tuple)) or not all(
                i is Ellipsis or (isinstance(i, (int, np.integer)) and 0 <= i < 52) for i in ids):
            raise GraphcError(f"einsum: the equation must be a string, or the sublist form "
                              f"einsum(x, [0, 1], y, [1, 2], [0, 2]) whose axis ids are ints in "
                              f"[0, 52) or ...; got {ids!r} (at {user_location()})")
        return "".join("..." if i is Ellipsis else string.ascii_letters[i] for i in ids)
    operands, specs = arguments[0:len(arguments) - len(arguments) % 2:2], arguments[1::2]
    output = "->" + labels(arguments[-1]) if len(arguments) % 2 else ""
    return ",".join(labels(ids) for ids in specs) + output, operands


def _without_broadcast_axes(labels: str, x: Tensor, sizes: dict[str, int]) -> tuple[str, Tensor]:
    """x without its axes of size 1 whose label is longer elsewhere (broadcast), and those labels."""
    gone = tuple(k for k, l in enumerate(labels) if x.shape[k] == 1 and sizes[l] != 1)
    if not gone:
        return labels, x
    return "".join(l for k, l in enumerate(labels) if k not in gone), bind("squeeze", x, axes=gone)


def _diagonals(labels: str, x: Tensor) -> tuple[str, Tensor]:
    """x's diagonal over each label it repeats, that label kept once: the elements off the
    diagonal are selected away (not multiplied by zero, which would keep an infinity's NaN)."""
    for label in dict.fromkeys(labels):
        while labels.count(label) > 1:
            first, second = labels.index(label), labels.index(label, labels.index(label) + 1)
            n = x.shape[first]
            shape = [1] * x.ndim
            shape[first] = shape[second] = n
            # one element of each line is kept: its sum is that element, in x's own dtype
            # (a bool's or an int32's sum would widen to int64)
            x = where(as_tensor(np.eye(n, dtype=bool).reshape(shape)), x, 0).sum(second).astype(x.dtype)
            labels = labels[:second] + labels[second + 1:]
    return labels, x


def _sum_labels(labels: str, x: Tensor, keep: set[str]) -> Tensor:
    gone = tuple(i for i, l in enumerate(labels) if l not in keep)
    return x.sum(gone) if gone else x


def _contract_pair(a_labels: str, a: Tensor, b_labels: str, b: Tensor, later: set[str]
                   ) -> tuple[str, Tensor]:
    """a and b contracted into (batch, a's free, b's free) labels, keeping what `later` needs."""
    a = _sum_labels(a_labels, a, set(b_labels) | later)
    a_labels = "".join(l for l in a_labels if l in set(b_labels) | later)
    b = _sum_labels(b_labels, b, set(a_labels) | later)
    b_labels = "".join(l for l in b_labels if l in set(a_labels) | later)
    batch = [l for l in a_labels if l in b_labels and l in later]
    summed = [l for l in a_labels if l in b_labels and l not in later]
    a_free = [l for l in a_labels if l not in b_labels]
    b_free = [l for l in b_labels if l not in a_labels]

    def arranged(labels: str, x: Tensor, order: list[str], groups: list[list[str]]) -> Tensor:
        perm = tuple(labels.index(l) for l in order)
        x = x.permute(perm) if perm != tuple(range(x.ndim)) else x
        return x.reshape(tuple(int(np.prod([x.shape[order.index(l)] for l in g], dtype=np.int64))
                               for g in groups))

    left = arranged(a_labels, a, batch + a_free + summed, [batch, a_free, summed])
    right = arranged(b_labels, b, batch + summed + b_free, [batch, summed, b_free])
    if is_float(left.dtype):
        product = bind("matmul", left, right)
    else:  # integers (no integer GEMM): the products broadcast over (batch, a's, summed, b's), summed
        product = (left.unsqueeze(3) * right.unsqueeze(1)).sum(2).astype(left.dtype)
    shape = tuple(a.shape[a_labels.index(l)] for l in batch + a_free) + tuple(
        b.shape[b_labels.index(l)] for l in b_free)
    return "".join(batch + a_free + b_free), product.reshape(shape)


# -- constants ------------------------------------------------------------------------------------
def _default_dtype(*values: Any) -> str:
    """PyTorch's dtype for a tensor made from Python numbers: bool, int64, or float32."""
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return "bool"
    if all(isinstance(v, (int, np.integer)) for v in values):
        return "int64"
    return "float32"


def _filled(shape: Sequence[int], value: Any, dtype: str) -> Tensor:
    tensor_type = TensorType(tuple(int(d) for d in shape), dtype_name(dtype))
    return Tensor(current_trace().builder.full(value, tensor_type))


def _shape_argument(size: tuple[Any, ...]) -> tuple[int, ...]:
    return tuple(size[0]) if len(size) == 1 and not isinstance(size[0], (int, np.integer)) else size


def arange(start: float, end: float | None = None, step: float = 1, *, dtype: Any = None) -> Tensor:
    """torch.arange: start, start + step, ... below end (int64 from integers, else float32)."""
    if end is None:
        start, end = 0, start
    if step == 0:
        raise GraphcError(f"arange: step must be non-zero (at {user_location()})")
    dtype = dtype_name(dtype) if dtype is not None else _default_dtype(start, end, step)
    return as_tensor(np.arange(start, end, step).astype(dtype))


def full(size: Sequence[int], fill_value: Any, *, dtype: Any = None) -> Tensor:
    """A tensor of `size` holding `fill_value` (its dtype by PyTorch's rule unless given)."""
    return _filled(size, fill_value, dtype or _default_dtype(fill_value))


def zeros(*size: Any, dtype: Any = "float32") -> Tensor:
    return _filled(_shape_argument(size), 0, dtype)


def ones(*size: Any, dtype: Any = "float32") -> Tensor:
    return _filled(_shape_argument(size), 1, dtype)


def full_like(x: Tensor, fill_value: Any, *, dtype: Any = None) -> Tensor:
    x = as_tensor(x)
    return _filled(x.shape, fill_value, dtype or x.dtype)


def zeros_like(x: Tensor, *, dtype: Any = None) -> Tensor:
    return full_like(x, 0, dtype=dtype)


def ones_like(x: Tensor, *, dtype: Any = None) -> Tensor:
    return full_like(x, 1, dtype=dtype)


# -- PyTorch's and NumPy's compositions of the ops above ----------------------------------------
__all__ += ["isnan", "isinf", "isfinite", "logical_and", "logical_or", "logical_xor", "logical_not",
            "index_select", "narrow", "select", "unbind", "roll", "repeat_interleave", "outer",
            "lerp", "eye", "linspace"]


def _truth(x: Any) -> Tensor:
    """`x` as bool: nonzero is True, as PyTorch's and NumPy's logical functions read numbers."""
    x = as_tensor(x)
    return x if x.dtype == "bool" else x != 0


def isnan(x: Any) -> Tensor:
    """True where x is NaN (never for integers and bools)."""
    x = as_tensor(x)
    return x != x if is_float(x.dtype) else zeros_like(x, dtype="bool")


def isinf(x: Any) -> Tensor:
    """True where x is +inf or -inf."""
    x = as_tensor(x)
    return abs(x) == np.inf if is_float(x.dtype) else zeros_like(x, dtype="bool")


def isfinite(x: Any) -> Tensor:
    """True where x is neither infinite nor NaN (NaN < inf is False)."""
    x = as_tensor(x)
    return abs(x) < np.inf if is_float(x.dtype) else ones_like(x, dtype="bool")


def logical_and(x: Any, y: Any) -> Tensor: return bind("logical_and", _truth(x), _truth(y))
def logical_or(x: Any, y: Any) -> Tensor: return bind("logical_or", _truth(x), _truth(y))
def logical_xor(x: Any, y: Any) -> Tensor: return bind("ne", _truth(x), _truth(y))
def logical_not(x: Any) -> Tensor: return bind("logical_not", _truth(x))


def _axis(x: Tensor, dim: Any, op: str) -> int:
    """`dim` as an axis of x, counted from 0 (this module's `max` and `abs` are graphc's)."""
    if type(dim) is bool or not isinstance(dim, (int, np.integer)) or not -x.ndim <= dim < x.ndim:
        raise ShapeError(f"{op}: dim {dim!r} is not an axis of a tensor of shape {x.shape} "
                         f"(at {user_location()})")
    return int(dim) % x.ndim


def _along(x: Tensor, dim: int, index: Any) -> Tensor:
    return x[(slice(None),) * dim + (index,)]


def index_select(x: Any, dim: int, index: Any) -> Tensor:
    """torch.index_select: the entries of x at the positions `index` (1-D integers) along `dim`;
    as in PyTorch, a negative index is refused, not counted from the end."""
    x = as_tensor(x)
    axis = _axis(x, dim, "index_select")
    index = as_tensor(index)
    if index.ndim > 1 or is_float(index.dtype) or index.dtype == "bool":
        raise ShapeError(f"index_select: the index must be a 0-d or 1-D integer tensor, got "
                         f"{index.dtype}{list(index.shape)} (at {user_location()})")
    return bind("gather", x, index.reshape(-1), axis=axis, wrap_negative=False)


def narrow(x: Any, dim: int, start: int, length: int) -> Tensor:
    """torch.narrow: `length` entries from `start` along `dim` (a view, as x[..., start:start+length])."""
    x = as_tensor(x)
    axis = _axis(x, dim, "narrow")
    size = x.shape[axis]
    first = start + size if start < 0 else start
    if not (-size <= start <= size and 0 <= length <= size - first):
        raise ShapeError(f"narrow: start {start} (in [-{size}, {size}]) and length {length} do not "
                         f"fit axis {dim} of size {size} (at {user_location()})")
    return _along(x, axis, slice(first, first + length))


def select(x: Any, dim: int, index: int) -> Tensor:
    """torch.select: the slice at `index` along `dim`, that axis removed."""
    x = as_tensor(x)
    return _along(x, _axis(x, dim, "select"), index)


def unbind(x: Any, dim: int = 0) -> tuple[Tensor, ...]:
    """torch.unbind: the slices along `dim`, that axis removed from each."""
    x = as_tensor(x)
    axis = _axis(x, dim, "unbind")
    return tuple(_along(x, axis, i) for i in range(x.shape[axis]))


def roll(x: Any, shifts: int | Sequence[int], dims: int | Sequence[int] | None = None) -> Tensor:
    """torch.roll: entries shifted by `shifts` along `dims`, those pushed past the end coming
    back at the start; without dims, over the flattened tensor, shape kept."""
    x = as_tensor(x)
    if dims is None:
        if not isinstance(shifts, (int, np.integer)):
            raise ShapeError(f"roll: without dims, shifts must be one int, got {shifts!r} "
                             f"(at {user_location()})")
        return roll(x.reshape(-1), shifts, 0).reshape(x.shape)
    shift_list = [shifts] if isinstance(shifts, (int, np.integer)) else list(shifts)
    dim_list = [dims] if isinstance(dims, (int, np.integer)) else list(dims)
    if len(shift_list) != len(dim_list):
        raise ShapeError(f"roll: {len(shift_list)} shifts for {len(dim_list)} dims "
                         f"(at {user_location()})")
    rolled = x
    for shift, dim in zip(shift_list, dim_list):
        axis = _axis(rolled, dim, "roll")
        size = rolled.shape[axis]
        cut = size - int(shift) % size if size else 0
        if 0 < cut < size:
            rolled = concatenate([_along(rolled, axis, slice(cut, None)),
                                  _along(rolled, axis, slice(0, cut))], axis)
    return rolled.clone() if rolled is x else rolled  # a copy even where nothing moves


def repeat_interleave(x: Any, repeats: int, dim: int | None = None) -> Tensor:
    """torch.repeat_interleave with an int: each entry `repeats` times in a row along `dim`
    (over the flattened tensor without dim). Repeats given as a tensor would make the shape
    depend on values, which a static graph cannot hold."""
    x = as_tensor(x)
    if type(repeats) is bool or not isinstance(repeats, (int, np.integer)) or repeats < 0:
        raise ShapeError(f"repeat_interleave: repeats must be an int >= 0, got {repeats!r}; a "
                         f"tensor of repeats gives a shape that depends on values "
                         f"(at {user_location()})")
    if dim is None:
        x, dim = x.reshape(-1), 0
    axis = _axis(x, dim, "repeat_interleave")
    shape = x.shape
    spread = x.unsqueeze(axis + 1).expand(*shape[:axis + 1], int(repeats), *shape[axis + 1:])
    # a copy, never a view of x (one repeat would be one)
    return spread.reshape(*shape[:axis], shape[axis] * int(repeats), *shape[axis + 1:]).clone()


def outer(x: Any, y: Any) -> Tensor:
    """The outer product of two vectors: out[i, j] = x[i] * y[j]."""
    x, y = as_tensor(x), as_tensor(y)
    if x.ndim != 1 or y.ndim != 1:
        raise ShapeError(f"outer: both operands must be 1-D, got shapes {x.shape} and {y.shape} "
                         f"(at {user_location()})")
    return x.reshape(-1, 1) * y.reshape(1, -1)


def lerp(start: Any, end: Any, weight: Any) -> Tensor:
    """torch.lerp: start + weight * (end - start), computed as PyTorch's: from the nearer end
    (end - (end - start) * (1 - weight) from weight 0.5 on), so that weight 1 gives `end` exactly
    however far apart the two are."""
    start = as_tensor(start)
    if not is_float(start.dtype):
        raise DTypeError(f"lerp: expects floating-point tensors, got {start.dtype}, as PyTorch "
                         f"(at {user_location()})")
    difference = end - start
    if _is_number(weight):
        return start + weight * difference if -0.5 < weight < 0.5 else end - difference * (1 - weight)
    weight = as_tensor(weight)
    return where(abs(weight) < 0.5, start + weight * difference, end - difference * (1 - weight))


def eye(n: int, m: int | None = None, *, dtype: Any = "float32") -> Tensor:
    """An n x m matrix with ones on its diagonal (m = n by default)."""
    return as_tensor(np.eye(n, n if m is None else m, dtype=np.dtype(dtype_name(dtype))))


def linspace(start: float, end: float, steps: int, *, dtype: Any = "float32") -> Tensor:
    """torch.linspace: `steps` evenly spaced values from start to end, both included."""
    if type(steps) is bool or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ShapeError(f"linspace: steps must be an int >= 0, got {steps!r} (at {user_location()})")
    return as_tensor(np.linspace(start, end, steps).astype(dtype_name(dtype)))
