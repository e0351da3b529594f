"""Neural-network functions with PyTorch's names and conventions (NCHW, weight (out, in))."""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np

from graphc.ir.errors import DTypeError, GraphcError, InputError, ShapeError, user_location

from ..functions import (bernoulli, concatenate, logsumexp, maximum, minimum, ones_like, stop_gradient,
                         where)
from ..tensor import Tensor, as_tensor, bind, float_math, scalar_reduced_as_vector
from . import normalization
from .ctc import ctc_loss  # noqa: F401  (F.ctc_loss)
from . import sparse as sparse_layers

__all__ = ["relu", "sigmoid", "tanh", "softmax", "log_softmax", "logsumexp", "linear", "conv2d",
           "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "conv1d",
           "dropout", "one_hot", "pad", "scaled_dot_product_attention", "layer_norm", "embedding",
           "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
           "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div",
           "conv_transpose2d", "interpolate", "group_norm", "prelu", "hardtanh", "relu6",
           "dropout1d", "dropout2d", "instance_norm"]


def _is_integer(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def size_argument(v: Any, count: int, what: str) -> tuple[int, ...]:
    """A size for `count` spatial axes: one integer (NumPy's too) for all, or one per axis;
    `what` names the argument ("conv2d: stride") in the error for anything else (a float, a
    string, a bool, another count)."""
    values = (v,) * count if _is_integer(v) else tuple(v) if isinstance(v, (tuple, list)) else ()
    if len(values) != count or not all(map(_is_integer, values)):
        form = "a pair of ints" if count == 2 else f"{count} ints" if count > 1 else "a 1-tuple"
        raise ValueError(f"{what} must be one int or {form}, got {v!r} (at {user_location()})")
    return tuple(int(a) for a in values)


def pair_argument(v: Any, what: str) -> tuple[int, int]:
    """`size_argument` for the two axes of an image."""
    return size_argument(v, 2, what)  # type: ignore[return-value]


def _result(x: Any, result: Tensor, inplace: bool) -> Tensor:
    """PyTorch's `inplace=True`: the input Tensor object takes the result's value and is
    returned, so code relying on the input changing sees it change (as with `x[i] = v`, a
    tensor viewed from `x` earlier keeps its old value). Anything else gets `result`."""
    if inplace and isinstance(x, Tensor):  # keeping x's shape and dtype, as += does
        return x._in_place(result, "inplace=True", "the call without inplace=True")
    return result


def relu(input: Tensor, inplace: bool = False) -> Tensor:
    return _result(input, bind("relu", as_tensor(input)), inplace)


def sigmoid(input: Tensor) -> Tensor:
    return float_math("sigmoid", input)  # an integer tensor in float32, as PyTorch's


def tanh(input: Tensor) -> Tensor:
    return float_math("tanh", input)


# -- activations: PyTorch's formulas, defaults and gradients (at 0 too) ---------------------------
__all__ += ["gelu", "silu", "leaky_relu", "elu", "softplus", "normalize"]


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x), Phi the standard normal CDF: exact through erf, or PyTorch's tanh
    approximation with `approximate="tanh"`."""
    input = as_tensor(input)
    if approximate == "none":
        return input * 0.5 * (1 + bind("erf", input * (1 / math.sqrt(2))))
    if approximate == "tanh":
        inner = (input + 0.044715 * input * input * input) * math.sqrt(2 / math.pi)
        return 0.5 * input * (1 + bind("tanh", inner))
    raise GraphcError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r} "
                      f"(at {user_location()})")


def _float_activation(op: str, x: Any) -> Tensor:
    """`x` as a Tensor, refused unless floating point, as PyTorch's NN functions refuse one."""
    t = as_tensor(x)
    if t.dtype not in ("float32", "float64"):
        raise DTypeError(f"{op}: takes a floating-point tensor, got {t.dtype}: cast it first "
                         f"(x.float()) (at {user_location()})")
    return t


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """x * sigmoid(x) (swish)."""
    t = _float_activation("silu", input)
    return _result(input, t * bind("sigmoid", t), inplace)


def leaky_relu(input: Tensor, negative_slope: float = 0.01, inplace: bool = False) -> Tensor:
    """x where x > 0, else negative_slope * x (the slope's gradient at 0, as in PyTorch)."""
    t = as_tensor(input)
    return _result(input, where(t > 0, t, t * negative_slope), inplace)


def elu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """x where x > 0, else alpha * (exp(x) - 1), computed as expm1 (as PyTorch does): exp(x) - 1
    keeps few right digits of a small x, none below the dtype's epsilon."""
    t = as_tensor(input)
    # expm1 of the clamped value: the branch not taken must not overflow, or its zero
    # cotangent times an infinite derivative would be NaN
    return _result(input, where(t > 0, t, alpha * t.clamp(max=0).expm1()), inplace)


def softplus(input: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """log(1 + exp(beta * x)) / beta, and x itself where beta * x > threshold."""
    if beta == 0:
        raise ValueError(f"softplus: beta divides the result: it must not be 0 (at {user_location()})")
    input = as_tensor(input)
    scaled = input * beta
    smooth = bind("log1p", scaled.clamp(max=threshold).exp()) * (1 / beta)
    return where(scaled > threshold, input, smooth)


def normalize(input: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """x divided by its p-norm along `dim`, the norm kept at least `eps`."""
    input = as_tensor(input)
    return input / input.norm(p, dim, keepdim=True).clamp(min=eps)


__all__ += ["logsigmoid", "hardsigmoid", "hardswish", "mish", "selu", "celu", "softsign",
            "tanhshrink", "glu", "softmin", "cosine_similarity", "pairwise_distance"]


def logsigmoid(input: Tensor) -> Tensor:
    """log(sigmoid(x)): -log1p(exp(-x)) from 0 up, x - log1p(exp(x)) below, so that neither
    overflows nor loses the small term (each branch reads x clamped to its side: the branch not
    taken stays finite, and its zero cotangent does not turn into NaN)."""
    t = _float_activation("logsigmoid", input)
    above = -bind("log1p", (-t.clamp(min=0)).exp())
    below = t - bind("log1p", t.clamp(max=0).exp())
    return where(t >= 0, above, below)


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """0 at or below -3, 1 at or above 3, x / 6 + 1/2 between (its gradient 0 at ±3, as PyTorch's)."""
    t = _float_activation("hardsigmoid", input)
    return _result(input, where(t <= -3, 0.0, where(t >= 3, 1.0, t * (1 / 6) + 0.5)), inplace)


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """x * hardsigmoid(x); its gradient x / 3 + 1/2 strictly between -3 and 3, as PyTorch's."""
    t = _float_activation("hardswish", input)
    inner = t.clamp(-3, 3)  # the branch not taken stays finite: no 0 * inf in its gradient
    return _result(input, where(t <= -3, 0.0, where(t >= 3, t, inner * (inner + 3) * (1 / 6))), inplace)


def mish(input: Tensor, inplace: bool = False) -> Tensor:
    """x * tanh(softplus(x))."""
    t = _float_activation("mish", input)
    return _result(input, t * bind("tanh", softplus(t)), inplace)


_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def selu(input: Tensor, inplace: bool = False) -> Tensor:
    """scale * elu(x, alpha) with the self-normalising constants of Klambauer et al."""
    return _result(input, _SELU_SCALE * elu(_float_activation("selu", input), _SELU_ALPHA), inplace)


def celu(input: Tensor, alpha: float = 1.0, inplace: bool = False) -> Tensor:
    """x where x > 0, else alpha * (exp(x / alpha) - 1)."""
    if alpha == 0:
        raise ValueError(f"celu: alpha divides x: it must not be 0 (at {user_location()})")
    t = _float_activation("celu", input)
    return _result(input, where(t > 0, t, alpha * (t.clamp(max=0) * (1 / alpha)).expm1()), inplace)


def softsign(input: Tensor) -> Tensor:
    """x / (1 + |x|)."""
    t = _float_activation("softsign", input)
    return t / (1 + t.abs())


def tanhshrink(input: Tensor) -> Tensor:
    """x - tanh(x)."""
    t = _float_activation("tanhshrink", input)
    return t - bind("tanh", t)


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """The gated linear unit: the first half of x along `dim` times the sigmoid of the second."""
    t = _float_activation("glu", input)
    if type(dim) is bool or not isinstance(dim, (int, np.integer)) or not -t.ndim <= dim < t.ndim:
        raise ShapeError(f"glu: dim {dim!r} is not an axis of x, of shape {t.shape} "
                         f"(at {user_location()})")
    if t.shape[dim] % 2:
        raise ShapeError(f"glu: halves x along dim {dim}, whose size must be even; x has shape "
                         f"{t.shape} (at {user_location()})")
    first, second = t.chunk(2, dim)
    return first * bind("sigmoid", second)


def softmin(input: Tensor, dim: int | None = None) -> Tensor:
    """softmax(-x) along `dim` (PyTorch's implicit dim without one)."""
    t = as_tensor(input)
    return softmax(-t, implicit_softmax_dim("softmin", t.ndim) if dim is None else dim)


def cosine_similarity(x1: Tensor, x2: Tensor, dim: int = 1, eps: float = 1e-8) -> Tensor:
    """The cosine of the angle between x1 and x2 along `dim` (they broadcast), each divided by
    its norm first (kept at least `eps`), as PyTorch's: the result stays within [-1, 1]."""
    a, b = _float_activation("cosine_similarity", x1), _float_activation("cosine_similarity", x2)
    a, b = a * ones_like(b), b * ones_like(a)  # broadcast both, as PyTorch's expand_outplace
    return (normalize(a, 2.0, dim, eps) * normalize(b, 2.0, dim, eps)).sum(dim)


def pairwise_distance(x1: Tensor, x2: Tensor, p: float = 2.0, eps: float = 1e-6,
                      keepdim: bool = False) -> Tensor:
    """The p-norm of x1 - x2 + eps along the last axis, as PyTorch's."""
    a, b = _float_activation("pairwise_distance", x1), _float_activation("pairwise_distance", x2)
    return (a - b + eps).norm(p, -1, keepdim=keepdim)


def implicit_softmax_dim(op: str, ndim: int) -> int:
    """PyTorch's dim for a softmax given none (deprecated there, and warned of here too): 0 for
    0-, 1- and 3-D inputs, else 1 (a batch of (N, C) scores, or (N, C, H, W) maps)."""
    dim = 0 if ndim in (0, 1, 3) else 1
    warnings.warn(f"{op}: no dim given: PyTorch's implicit choice, dim={dim} for a {ndim}-D input, "
                  f"is taken; give dim explicitly (at {user_location()})", UserWarning, stacklevel=2)
    return dim


@scalar_reduced_as_vector
def softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
    """exp(x) / sum(exp(x)) along `dim`, as one `softmax` op (ir/ops/softmax.py): NaN along a
    line of -inf, as PyTorch's. Without `dim`, PyTorch's implicit one (implicit_softmax_dim).
    `dtype`: x cast to it first, as PyTorch's."""
    input = as_tensor(input) if dtype is None else as_tensor(input).astype(dtype)
    if dim is None:
        return softmax(input, implicit_softmax_dim("softmax", input.ndim))
    if input.numel() == 0:  # nothing to normalise (the op refuses an empty axis): as PyTorch, empty
        return input * 1.0
    return bind("softmax", input, axis=dim)


@scalar_reduced_as_vector
def log_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: Any = None) -> Tensor:
    """x - logsumexp(x) along `dim`; without it, PyTorch's implicit one (implicit_softmax_dim).
    Computed as PyTorch does, (x - max) - log(sum(exp(x - max))): x - logsumexp(x) cancels in
    float32 where the logits are large (1e4 lost 4 digits). A row holding +inf, or only -inf,
    is NaN, as PyTorch's. `dtype`: x cast to it first, as PyTorch's."""
    input = as_tensor(input) if dtype is None else as_tensor(input).astype(dtype)
    if dim is None:
        return log_softmax(input, implicit_softmax_dim("log_softmax", input.ndim))
    if input.ndim and input.shape[dim] == 0:  # nothing to normalise, and no maximum to shift by
        return input - logsumexp(input, dim, keepdims=True)
    shifted = input - stop_gradient(input.amax(axis=dim, keepdims=True))
    return shifted - shifted.exp().sum(axis=dim, keepdims=True).log()


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias, with weight of shape (out_features, in_features)."""
    input, weight = as_tensor(input), as_tensor(weight)
    if weight.ndim != 2 or input.ndim == 0 or input.shape[-1] != weight.shape[1]:
        raise ShapeError(f"linear: weight {weight.shape} (out_features, in_features) takes inputs "
                         f"of {weight.shape[-1] if weight.ndim else '?'} features on the last "
                         f"axis, got input of shape {input.shape} (at {user_location()})")
    out = input @ weight.T
    if bias is not None and as_tensor(bias).shape not in ((), (weight.shape[0],)):
        raise ShapeError(f"linear: bias must have shape ({weight.shape[0]},), one per output "
                         f"feature, got {as_tensor(bias).shape} (at {user_location()})")
    return out + bias if bias is not None else out


def _plus_channel_bias(op: str, out: Tensor, bias: Any) -> Tensor:
    """`out` (N, C, ...) plus a (C,) `bias` along its channels."""
    if bias is None:
        return out
    bias = as_tensor(bias)
    if bias.shape != (out.shape[1],):
        raise ShapeError(f"{op}: bias must have shape ({out.shape[1]},), one per output channel, "
                         f"got {bias.shape} (at {user_location()})")
    return out + bias.reshape(1, -1, *([1] * (out.ndim - 2)))


CONV_PADDING_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate",
                      "circular": "circular"}  # PyTorch's padding_mode -> F.pad's mode


def check_conv_arguments(layer: str, kernel: Sequence[int], stride: Sequence[int],
                         dilation: Sequence[int], groups: Any) -> None:
    """Refuse, as PyTorch does, a convolution layer's sizes below 1 and groups that are no
    positive integer (they failed later as divisions by zero)."""
    if not isinstance(groups, (int, np.integer)) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"{layer}: groups must be a positive integer, got {groups!r}")
    for name, sizes in (("kernel_size", kernel), ("stride", stride), ("dilation", dilation)):
        if min(sizes) < 1:
            raise ValueError(f"{layer}: {name} must be positive, got {tuple(sizes)}")


def conv_padding(op: str, padding: Any, kernel: Sequence[int], stride: Sequence[int],
                 dilation: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """(before, after) widths per spatial axis for PyTorch's `padding`: an int or one per axis,
    'valid' (none) or 'same' (stride 1: the output keeps the input's size; an odd total puts the
    extra cell after, as PyTorch does)."""
    if not isinstance(padding, str):
        widths = size_argument(padding, len(kernel), f"{op}: padding")
        if min(widths) < 0:
            raise ShapeError(f"{op}: padding must be one non-negative int or {len(kernel)} of them, "
                             f"got {padding!r} (at {user_location()})")
        return tuple((p, p) for p in widths)
    if padding == "valid":
        return ((0, 0),) * len(kernel)
    if padding != "same":
        raise ValueError(f"{op}: padding must be an int, a tuple, 'valid' or 'same', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ShapeError(f"{op}: padding='same' needs stride 1, got stride {tuple(stride)} "
                         f"(at {user_location()})")
    totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
    return tuple((t // 2, t - t // 2) for t in totals)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """PyTorch's F.conv2d over (N, C, H, W) or one unbatched (C, H, W) input; `padding` may be
    'valid' or 'same', and `padding_mode` (as Conv2d's) fills the padding by reflecting,
    replicating or wrapping the input instead of with zeros."""
    input, weight = as_tensor(input), as_tensor(weight)
    if input.ndim == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                      padding_mode).squeeze(0)
    if padding_mode not in CONV_PADDING_MODES:
        raise ValueError(f"conv2d: padding_mode must be one of {sorted(CONV_PADDING_MODES)}, "
                         f"got {padding_mode!r}")
    stride = pair_argument(stride, "conv2d: stride")
    dilation = pair_argument(dilation, "conv2d: dilation")
    (top, bottom), (left, right) = conv_padding("conv2d", padding, weight.shape[-2:], stride, dilation)
    if padding_mode != "zeros" or top != bottom or left != right:  # the op pads evenly, with zeros
        input = pad(input, (left, right, top, bottom), mode=CONV_PADDING_MODES[padding_mode])
        top = left = 0
    out = bind("conv2d", input, weight, stride=stride, padding=(top, left), dilation=dilation,
               groups=groups)
    return _plus_channel_bias("conv2d", out, bias)


def conv_transpose2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
                     padding: Any = 0, output_padding: Any = 0, groups: int = 1,
                     dilation: Any = 1) -> Tensor:
    """PyTorch's F.conv_transpose2d, weight (C_in, C_out/groups, kH, kW): the gradient of a
    convolution with that weight, taken with respect to its input, whose height is
    (H - 1) stride - 2 padding + dilation (kH - 1) + output_padding + 1 (and likewise the width)."""
    input, weight = as_tensor(input), as_tensor(weight)
    if input.ndim == 3:  # one unbatched (C_in, H, W) input, as PyTorch takes
        return conv_transpose2d(input.unsqueeze(0), weight, bias, stride, padding, output_padding,
                                groups, dilation).squeeze(0)
    _same_float_dtype("conv_transpose2d", input, weight)
    stride, padding, dilation, output_padding = (
        pair_argument(v, f"conv_transpose2d: {name}") for v, name in (
            (stride, "stride"), (padding, "padding"), (dilation, "dilation"),
            (output_padding, "output_padding")))
    check_conv_arguments("conv_transpose2d", weight.shape[-2:], stride, dilation, groups)
    if min(padding + output_padding) < 0:
        raise ValueError(f"conv_transpose2d: padding {padding} and output_padding "
                         f"{output_padding} must not be negative (at {user_location()})")
    if input.ndim != 4 or weight.ndim != 4 or weight.shape[0] != input.shape[1] or input.shape[1] % groups:
        raise ShapeError(f"conv_transpose2d: expects input (N, C_in, H, W) and weight (C_in, "
                         f"C_out/groups, kH, kW) with C_in divisible by groups={groups}, got "
                         f"{input.shape} and {weight.shape} (at {user_location()})")
    if any(o >= max(s, d) for o, s, d in zip(output_padding, stride, dilation)):
        raise ShapeError(f"conv_transpose2d: output_padding {output_padding} must be smaller than "
                         f"the stride {stride} or the dilation {dilation} (at {user_location()})")
    size = tuple((n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o
                 in zip(input.shape[2:], stride, padding, dilation, weight.shape[2:], output_padding))
    if min(size) < 1:
        raise ShapeError(f"conv_transpose2d: the output would be {size[0]} x {size[1]} per "
                         f"channel for input {input.shape}, weight {weight.shape}, stride {stride} "
                         f"and padding {padding}: too small (at {user_location()})")
    if any(o >= s for o, s in zip(output_padding, stride)):
        # Past the stride (allowed under a larger dilation), the convolution's gradient has no
        # input of that size: the whole transposed result (padding 0), cropped by `padding` at
        # the start and extended to the size asked at the end, where no input reaches (zeros).
        full = conv_transpose2d(input, weight, None, stride, 0, 0, groups, dilation)
        (top, left), (bottom, right) = padding, output_padding
        out = pad(full, (-left, right - left, -top, bottom - top))
    else:
        out = bind("conv2d_input_grad", input, weight,
                   input_shape=(input.shape[0], weight.shape[1] * groups, *size),
                   stride=stride, padding=padding, dilation=dilation, groups=groups)
    return _plus_channel_bias("conv_transpose2d", out, bias)


def interpolate(input: Tensor, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                align_corners: bool | None = None, recompute_scale_factor: bool | None = None,
                antialias: bool = False) -> Tensor:
    """PyTorch's F.interpolate over the last one or two axes of (N, C, L) or (N, C, H, W) input:
    'nearest' (output cell i copies input cell floor(i * scale), scale = in / out, or
    1 / scale_factor when that is given), 'linear' / 'bilinear' (each axis in turn, between the
    two nearest input cells; with `align_corners` the corner cells' centres line up). With
    `recompute_scale_factor` the scale factor only sizes the output (floor(size *
    scale_factor)), which is then sampled as for that size, as PyTorch's. `antialias=True`
    (a low-pass filter before downsampling) is not supported."""
    if antialias:
        raise GraphcError(f"interpolate: antialias=True is not supported (at {user_location()})")
    if recompute_scale_factor and size is not None:  # as PyTorch refuses both
        raise ValueError(f"interpolate: recompute_scale_factor is not meaningful with an explicit "
                         f"size (at {user_location()})")
    x = as_tensor(input)
    if recompute_scale_factor and scale_factor is not None:
        spatial = x.shape[2:]
        scales = (scale_factor if isinstance(scale_factor, (tuple, list))
                  else [scale_factor] * len(spatial))
        size = [math.floor(n * s) for n, s in zip(spatial, scales)]
        scale_factor = None
    spatial = x.ndim - 2
    linear = {"linear": 1, "bilinear": 2}
    if spatial not in (1, 2) or (mode != "nearest" and linear.get(mode) != spatial):
        raise GraphcError(f"interpolate: supports mode 'nearest' on (N, C, L) or (N, C, H, W) "
                          f"input, 'linear' on (N, C, L) and 'bilinear' on (N, C, H, W); got "
                          f"mode={mode!r} and shape {input.shape} (at {user_location()})")
    if mode != "nearest" and x.dtype not in ("float32", "float64"):
        raise DTypeError(f"interpolate: mode {mode!r} expects floating-point input (its weights are "
                         f"fractions), got {input.dtype}; cast it with .float() (at {user_location()})")
    if align_corners is not None and mode == "nearest":
        raise ValueError("interpolate: align_corners only applies to the linear modes")
    if (size is None) == (scale_factor is None):
        raise ValueError("interpolate: give exactly one of size and scale_factor")
    given = size if size is not None else scale_factor
    values = [given] * spatial if np.isscalar(given) else list(given)
    if len(values) != spatial:
        raise ValueError(f"interpolate: {'size' if size is not None else 'scale_factor'} needs one "
                         f"value per spatial axis ({spatial} for input {input.shape}), got {given!r}")
    # PyTorch's arithmetic, for the same source cells: its scale (input cells per output cell) and
    # positions in the input's float type
    real = np.float32 if x.dtype == "float32" else np.float64
    if size is not None:
        sizes = [int(v) for v in values]
        steps = [real(n_in) / real(max(n_out, 1)) for n_out, n_in in zip(sizes, x.shape[2:])]
    else:
        factors = [float(v) for v in values]
        if min(factors) <= 0:
            raise ValueError(f"interpolate: scale_factor must be positive, got {scale_factor}")
        sizes = [int(np.floor(n * f)) for n, f in zip(x.shape[2:], factors)]
        steps = [real(1.0 / f) for f in factors]
    if min(sizes) < 1:
        raise ShapeError(f"interpolate: the output of input {input.shape} would be {tuple(sizes)}; every "
                         f"size must be at least 1 (at {user_location()})")
    for axis, (n_in, n_out, step) in enumerate(zip(x.shape[2:], sizes, steps)):
        at = 2 + axis
        if mode == "nearest":
            # floored as float32 whatever the input's type (PyTorch's floorf)
            positions = (np.arange(n_out, dtype=real) * step).astype(np.float32)
            sources = np.minimum(np.floor(positions).astype(np.int64), n_in - 1)
            # PyTorch copies an axis of the same size, and its 2-D kernel halves the positions
            # of one twice the size, whatever scale_factor gave those sizes
            if n_out == n_in and (size is not None or spatial == 2):
                sources = np.arange(n_in)
            elif n_out == 2 * n_in and spatial == 2:
                sources = np.arange(n_out) // 2
            if not np.array_equal(sources, np.arange(n_in)):
                x = bind("gather", x, as_tensor(sources), axis=at, wrap_negative=False)
            continue
        if n_out == n_in:  # PyTorch copies an axis of the same size
            continue
        if align_corners:
            corners = real(n_in - 1) / real(n_out - 1) if n_out > 1 else real(0)
            position = np.arange(n_out, dtype=real) * corners
        else:
            position = np.maximum((np.arange(n_out, dtype=real) + real(0.5)) * step - real(0.5), real(0))
        low = np.minimum(np.floor(position).astype(np.int64), n_in - 1)
        high = np.minimum(low + 1, n_in - 1)
        weight = (position - low).astype(x.dtype).reshape((n_out,) + (1,) * (x.ndim - 1 - at))
        below = bind("gather", x, as_tensor(low), axis=at, wrap_negative=False)
        above = bind("gather", x, as_tensor(high), axis=at, wrap_negative=False)
        x = below + (above - below) * as_tensor(weight)
    return x


def _pool_windows(op: str, x: Tensor, kernel_size: Any, stride: Any, padding: Any,
                  ceil_mode: bool) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int],
                                             tuple[int, int]]:
    """(kernel, stride, padding, extra): `extra` the cells past the bottom and right edges that
    PyTorch's `ceil_mode` adds for a last, partial window (0, 0 without it). Its outputs number
    ceil((size + 2 padding - kernel) / stride) + 1 along an axis, one fewer where that last window
    would start in the padding after the edge."""
    kernel = pair_argument(kernel_size, f"{op}: kernel_size")
    stride = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else\
        pair_argument(stride, f"{op}: stride")
    padding = pair_argument(padding, f"{op}: padding")
    if min(kernel) < 1 or min(stride) < 1 or min(padding) < 0:
        raise ShapeError(f"{op}: kernel and stride must be positive and padding non-negative, got "
                         f"kernel {kernel}, stride {stride}, padding {padding} (at {user_location()})")
    if ceil_mode and (x.ndim < 2 or any(2 * p > k for k, p in zip(kernel, padding))):
        raise ShapeError(f"{op}: ceil_mode needs padding at most half the kernel and a plane to "
                         f"pool, got input {x.shape}, kernel {kernel}, padding {padding} "
                         f"(at {user_location()})")
    extra = [0, 0]
    for axis, (size, k, s, p) in enumerate(zip(x.shape[-2:], kernel, stride, padding)):
        if ceil_mode:  # PyTorch's rule holds a window even where the kernel outgrows the plane
            outputs = -(-(size + 2 * p - k) // s) + 1
            if (outputs - 1) * s >= size + p:
                outputs -= 1
            extra[axis] = max(0, (outputs - 1) * s + k - (size + 2 * p))
    return kernel, stride, padding, (extra[0], extra[1])


def _window_sizes(size: int, kernel: int, stride: int, padding: int, extra: int,
                  count_include_pad: bool) -> np.ndarray:
    """How many cells each window along an axis averages over with ceil_mode, as PyTorch counts
    them: the padding before and after the edge (when `count_include_pad`), never the cells past
    it that ceil_mode adds."""
    outputs = (size + 2 * padding + extra - kernel) // stride + 1
    starts = np.arange(outputs) * stride - padding
    ends = np.minimum(starts + kernel, size + padding)
    if not count_include_pad:
        starts, ends = np.maximum(starts, 0), np.minimum(ends, size)
    return ends - starts


def _unbatched_plane(op: str, x: Tensor) -> bool:
    """Whether `x` is one sample's (C, H, W), which 2-D pools take as PyTorch's do; refuses
    ranks other than 3 and 4."""
    if x.ndim not in (3, 4):
        raise ShapeError(f"{op}: expects an (N, C, H, W) or (C, H, W) input, got shape {x.shape} "
                         f"(at {user_location()})")
    return x.ndim == 3


def max_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> Tensor:
    """PyTorch's F.max_pool2d over the last two axes of (N, C, H, W) or (C, H, W) input
    (dilation 1, without indices)."""
    input = as_tensor(input)
    if input.dtype not in ("float32", "float64"):  # before padding with -inf names the pad instead
        raise DTypeError(f"max_pool2d: expects a floating-point operand, got {input.dtype} (at "
                         f"{user_location()})")
    dilated = pair_argument(dilation, "max_pool2d: dilation") != (1, 1)
    unsupported = ([f"dilation {dilation} (use 1)"] if dilated else []) + (
        ["return_indices=True"] if return_indices else [])
    if unsupported:
        raise GraphcError(f"max_pool2d: {' and '.join(unsupported)} "
                          f"{'are' if len(unsupported) > 1 else 'is'} not supported "
                          f"(at {user_location()})")
    if _unbatched_plane("max_pool2d", input):
        return max_pool2d(input.unsqueeze(0), kernel_size, stride, padding, dilation, ceil_mode).squeeze(0)
    kernel, stride, padding, extra = _pool_windows("max_pool2d", input, kernel_size, stride, padding, ceil_mode)
    if any(extra):  # cells no window's maximum can come from
        input = _pad_constant(input, {input.ndim - 2: (0, extra[0]), input.ndim - 1: (0, extra[1])}, -np.inf)
    return bind("max_pool2d", input, kernel=kernel, stride=stride, padding=padding)


def avg_pool2d(input: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """PyTorch's F.avg_pool2d over the last two axes of (N, C, H, W) or (C, H, W) input."""
    input = as_tensor(input)
    if divisor_override is not None and (isinstance(divisor_override, bool) or not _is_integer(divisor_override)
                                         or divisor_override == 0):
        raise ValueError(f"avg_pool2d: divisor_override must be a nonzero int, got "
                         f"{divisor_override!r} (at {user_location()})")
    if _unbatched_plane("avg_pool2d", input):
        return avg_pool2d(input.unsqueeze(0), kernel_size, stride, padding, ceil_mode, count_include_pad,
                          divisor_override).squeeze(0)
    kernel, stride, padding, extra = _pool_windows("avg_pool2d", input, kernel_size, stride, padding, ceil_mode)
    if not any(extra) and divisor_override is None:
        return bind("avg_pool2d", input, kernel=kernel, stride=stride, padding=padding,
                    count_include_pad=count_include_pad)
    padded = _pad_constant(input, {input.ndim - 2: (0, extra[0]), input.ndim - 1: (0, extra[1])}, 0.0)
    # the windows' sums, then PyTorch's divisor for each window
    sums = bind("avg_pool2d", padded, kernel=kernel, stride=stride, padding=padding,
                count_include_pad=True) * float(kernel[0] * kernel[1])
    if divisor_override is not None:
        return sums / float(divisor_override)
    rows, columns = (_window_sizes(size, k, s, p, e, count_include_pad)
                     for size, k, s, p, e in zip(input.shape[-2:], kernel, stride, padding, extra))
    return sums / as_tensor(np.outer(rows, columns).astype(input.dtype))


def prelu(input: Tensor, weight: Tensor) -> Tensor:
    """x where positive, else weight * x: one weight, or one per channel (axis 1)."""
    input, weight = as_tensor(input), as_tensor(weight)
    if int(np.prod(weight.shape)) > 1:
        if input.ndim < 2 or weight.shape != (input.shape[1],):
            raise ShapeError(f"prelu: {weight.shape[0]} weights need input with that many channels "
                             f"on axis 1, got shape {input.shape} (at {user_location()})")
        weight = weight.reshape(1, -1, *([1] * (input.ndim - 2)))
    return where(input > 0, input, weight * input)


def hardtanh(input: Tensor, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> Tensor:
    """x limited to [min_val, max_val]. As PyTorch's, the gradient flows strictly inside the
    bounds only (clamp's flows at them too): relu6's is 0 at 0, as relu's."""
    if min_val > max_val:
        raise ValueError(f"hardtanh: min_val ({min_val}) cannot be greater than max_val ({max_val}) "
                         f"(at {user_location()})")
    t = as_tensor(input)
    if t.dtype in ("int32", "int64") and float(min_val).is_integer() and float(max_val).is_integer():
        min_val, max_val = int(min_val), int(max_val)  # integers stay integers, as in PyTorch
    return _result(input, where(t <= min_val, min_val, where(t >= max_val, max_val, t)), inplace)


def relu6(input: Tensor, inplace: bool = False) -> Tensor:
    return hardtanh(input, 0.0, 6.0, inplace)


def check_dropout_probability(op: str, p: float) -> None:
    """Refuse a probability outside [0, 1], with PyTorch's rule (nn.Dropout checks it when built)."""
    if not 0 <= p <= 1:
        raise ValueError(f"{op}: probability has to be between 0 and 1, got {p}")


def dropout1d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Zero whole channels (axis 1 of (N, C, L) or axis 0 of (C, L)) with probability p and
    scale the rest by 1/(1-p), while training."""
    return _channel_dropout("dropout1d", input, p, training, inplace, spatial=1)


def dropout2d(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Zero whole channels (axis 1 of (N, C, H, W)) with probability p and scale the rest by
    1/(1-p), while training. A 3-D input is (N, C, L), as PyTorch still reads it (with its
    warning): channels of a batch, not one (C, H, W) image."""
    if as_tensor(input).ndim == 3 and training and p:
        warnings.warn("dropout2d: a 3-D input is read as (N, C, L), as PyTorch does, dropping "
                      "channels of each sample; use dropout1d to say so, or add a batch axis to "
                      "an image (C, H, W)", stacklevel=2)
        return _channel_dropout("dropout2d", input, p, training, inplace, spatial=1)
    return _channel_dropout("dropout2d", input, p, training, inplace, spatial=2)


def _channel_dropout(op: str, x: Tensor, p: float, training: bool, inplace: bool,
                     spatial: int) -> Tensor:
    """Dropout of whole channels: one draw per channel over its last `spatial` axes."""
    check_dropout_probability(op, p)
    t = as_tensor(x)
    if t.ndim not in (spatial + 1, spatial + 2):  # in eval mode too: a model run only there
        layouts = {1: "(N, C, L) or (C, L)", 2: "(N, C, H, W)"}[spatial]
        raise ShapeError(f"{op}: expects {layouts} input, got shape {t.shape} "
                         f"(at {user_location()})")
    if not training or p == 0:
        return x
    if p == 1:
        return _result(x, t * 0.0, inplace)
    keep = bernoulli(1 - p, t.shape[:-spatial] + (1,) * spatial)
    return _result(x, where(keep, t * (1.0 / (1 - p)), 0), inplace)


def one_hot(tensor: Any, num_classes: int = -1) -> Tensor:
    """PyTorch's: int64, with a 1 at each index along a new last axis; an index outside
    [0, num_classes) is an IndexOutOfRangeError, checked at run time as every index is.
    (gc.one_hot is JAX's: float32 by default, a row of zeros for an index out of range.)"""
    if (isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer))
            or num_classes < 1):
        raise GraphcError(f"one_hot: num_classes={num_classes!r}: give the number of classes "
                          "(PyTorch's default, the largest index + 1, depends on the values, which "
                          f"tracing does not know) (at {user_location()})")
    indices = as_tensor(tensor)
    if indices.dtype not in ("int32", "int64"):
        raise DTypeError(f"one_hot: takes integer class indices, got {indices.dtype} (at {user_location()})")
    # a gather from num_classes zeros checks each index, as PyTorch's one_hot does
    checked = bind("gather", as_tensor(np.zeros(int(num_classes), np.int64)), indices, axis=0,
                   wrap_negative=False)
    return bind("one_hot", indices, num_classes=int(num_classes), dtype="int64") + checked[..., None]


def _dropped(op: str, input: Tensor, p: float, training: bool, inplace: bool,
             apply: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """`apply(x, keep)` with keep a draw of elements kept with probability 1 - p, while training
    (p = 1 zeroes all, as PyTorch's: x * 0, so NaN stays NaN)."""
    check_dropout_probability(op, p)
    if not training or p == 0:
        return input
    t = as_tensor(input)
    if p == 1:
        return _result(input, t * 0.0, inplace)
    return _result(input, apply(t, bernoulli(1 - p, t.shape)), inplace)


def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p), while training."""
    return _dropped("dropout", input, p, training, inplace,
                    lambda t, keep: where(keep, t * (1.0 / (1 - p)), 0))


__all__ += ["alpha_dropout"]

# SELU's negative saturation value, -scale * alpha: where alpha dropout puts a dropped element
SELU_SATURATION = -1.0507009873554805 * 1.6732632423543772


def alpha_dropout(input: Tensor, p: float = 0.5, training: bool = False,
                  inplace: bool = False) -> Tensor:
    """PyTorch's: while training, set each element with probability p to SELU's saturation
    value, then an affine map under which a zero-mean, unit-variance input keeps its mean and
    variance (SELU networks stay self-normalising). PyTorch's default here is training=False."""
    alpha = -SELU_SATURATION
    scale = 1.0 / math.sqrt((alpha * alpha * p + 1) * (1 - p)) if 0 <= p < 1 else 0.0
    # kept: scale * x + alpha * scale * p; dropped: scale * (saturation) + alpha * scale * p
    return _dropped("alpha_dropout", input, p, training, inplace,
                    lambda t, keep: where(keep, t * scale, -alpha * scale) + alpha * scale * p)


# -- 1-D pools: the 2-D ones over (N, C, 1, L), their arguments checked in the 1-D terms ----------
__all__ += ["max_pool1d", "avg_pool1d"]


def _pool1d_arguments(op: str, x: Tensor, kernel_size: Any, stride: Any, padding: Any
                      ) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a 1-D pool over (N, C, L) or (C, L), checked here so an
    error names the 1-D op and the user's own shapes, not the 2-D pool computing it."""
    if x.ndim not in (2, 3):
        raise ShapeError(f"{op}: expects an (N, C, L) or (C, L) input, got shape {x.shape} "
                         f"(at {user_location()})")
    kernel = size_argument(kernel_size, 1, f"{op}: kernel_size")[0]
    step = kernel if stride is None or (isinstance(stride, (tuple, list)) and not stride) else\
        size_argument(stride, 1, f"{op}: stride")[0]
    pad_by = size_argument(padding, 1, f"{op}: padding")[0]
    if kernel < 1 or step < 1 or not 0 <= 2 * pad_by <= kernel:
        raise ShapeError(f"{op}: kernel and stride must be positive and padding at most half the "
                         f"kernel, got kernel {kernel}, stride {step}, padding {pad_by} "
                         f"(at {user_location()})")
    if x.shape[-1] + 2 * pad_by < kernel:
        raise ShapeError(f"{op}: input {x.shape} padded by {pad_by} on each side is shorter than "
                         f"the kernel {kernel} (at {user_location()})")
    return kernel, step, pad_by


def max_pool1d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
               dilation: Any = 1, ceil_mode: bool = False, return_indices: bool = False) -> Tensor:
    """PyTorch's F.max_pool1d over the last axis of (N, C, L) or (C, L) input (dilation 1,
    without indices)."""
    x = as_tensor(input)
    kernel, step, pad_by = _pool1d_arguments("max_pool1d", x, kernel_size, stride, padding)
    unsupported = ([f"dilation {dilation} (use 1)"]
                   if size_argument(dilation, 1, "max_pool1d: dilation") != (1,) else []) + (
        ["return_indices=True"] if return_indices else [])
    if unsupported:
        raise GraphcError(f"max_pool1d: {' and '.join(unsupported)} "
                          f"{'are' if len(unsupported) > 1 else 'is'} not supported "
                          f"(at {user_location()})")
    return max_pool2d(x.unsqueeze(-2), (1, kernel), (1, step), (0, pad_by), 1,
                      ceil_mode).squeeze(-2)


def avg_pool1d(input: Any, kernel_size: Any, stride: Any = None, padding: Any = 0,
               ceil_mode: bool = False, count_include_pad: bool = True) -> Tensor:
    """PyTorch's F.avg_pool1d over the last axis of (N, C, L) or (C, L) input."""
    x = as_tensor(input)
    kernel, step, pad_by = _pool1d_arguments("avg_pool1d", x, kernel_size, stride, padding)
    return avg_pool2d(x.unsqueeze(-2), (1, kernel), (1, step), (0, pad_by), ceil_mode,
                      count_include_pad).squeeze(-2)


# -- pixel shuffle: channels to space and back, as reshapes and one transpose --------------------
__all__ += ["pixel_shuffle", "pixel_unshuffle"]


def _shuffle_factor(op: str, factor: Any) -> int:
    if not _is_integer(factor) or factor < 1:
        raise ValueError(f"{op}: the factor must be a positive int, got {factor!r} "
                         f"(at {user_location()})")
    return int(factor)


def pixel_shuffle(input: Any, upscale_factor: int) -> Tensor:
    """(*, C r^2, H, W) -> (*, C, H r, W r): each group of r^2 channels becomes an r x r block of
    one channel (sub-pixel convolution's upsampling)."""
    x, r = as_tensor(input), _shuffle_factor("pixel_shuffle", upscale_factor)
    if x.ndim < 3 or x.shape[-3] % (r * r):
        raise ShapeError(f"pixel_shuffle: expects (*, C, H, W) input with C divisible by "
                         f"upscale_factor^2 = {r * r}, got shape {input.shape} (at {user_location()})")
    *batch, channels, height, width = x.shape
    n = len(batch)
    blocks = x.reshape(*batch, channels // (r * r), r, r, height, width)
    order = (*range(n), n, n + 3, n + 1, n + 4, n + 2)  # (*, C, H, r, W, r)
    return blocks.permute(*order).reshape(*batch, channels // (r * r), height * r, width * r)


def pixel_unshuffle(input: Any, downscale_factor: int) -> Tensor:
    """(*, C, H r, W r) -> (*, C r^2, H, W): pixel_shuffle undone."""
    x, r = as_tensor(input), _shuffle_factor("pixel_unshuffle", downscale_factor)
    if x.ndim < 3 or x.shape[-2] % r or x.shape[-1] % r:
        raise ShapeError(f"pixel_unshuffle: expects (*, C, H, W) input with H and W divisible by "
                         f"downscale_factor = {r}, got shape {input.shape} (at {user_location()})")
    *batch, channels, height, width = x.shape
    n = len(batch)
    blocks = x.reshape(*batch, channels, height // r, r, width // r, r)
    order = (*range(n), n, n + 2, n + 4, n + 1, n + 3)  # (*, C, r, r, H, W)
    return blocks.permute(*order).reshape(*batch, channels * r * r, height // r, width // r)


# -- layers as functions ---------------------------------------------------------------------
def _same_float_dtype(op: str, x: Tensor, weight: Tensor) -> None:
    """A convolution's input and weight in one floating dtype, checked in the user's op's name
    (the op computing it would name its own shapes: 4-D ones for a 1-D convolution)."""
    if x.dtype != weight.dtype or x.dtype not in ("float32", "float64"):
        raise DTypeError(f"{op}: input and weight must share a floating dtype, got {x.dtype} and "
                         f"{weight.dtype}: cast the input (x.to(weight.dtype)) "
                         f"(at {user_location()})")


def _single(v: Any, name: str) -> int:
    return size_argument(v, 1, f"conv1d: {name}")[0]


def conv1d(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """PyTorch's F.conv1d: input (N, C_in, L) or (C_in, L), weight (C_out, C_in/groups, K);
    `padding` and `padding_mode` as conv2d's."""
    x, weight = as_tensor(input), as_tensor(weight)
    if x.ndim not in (2, 3) or weight.ndim != 3:
        raise ShapeError(f"conv1d: expects input (N, C, L) or (C, L) and weight (C_out, C_in/"
                         f"groups, K), got {input.shape} and {weight.shape} (at {user_location()})")
    batched = x.ndim == 3
    x = x if batched else x.unsqueeze(0)
    _same_float_dtype("conv1d", x, weight)
    # checked here, in the user's terms: conv2d would name its own 4-D shapes
    if x.shape[1] != weight.shape[1] * groups:
        raise ShapeError(f"conv1d: weight {weight.shape} with groups={groups} expects "
                         f"{weight.shape[1] * groups} input channels, got input {as_tensor(input).shape} "
                         f"(at {user_location()})")
    if not isinstance(padding, str):
        span = _single(dilation, "dilation") * (weight.shape[2] - 1) + 1
        pad = _single(padding, "padding")
        if x.shape[2] + 2 * pad < span:
            raise ShapeError(f"conv1d: input {as_tensor(input).shape} padded by {pad} on each side "
                             f"is shorter than the kernel's span {span} (at {user_location()})")
    out = conv2d(x.unsqueeze(2), weight.unsqueeze(2), bias, stride=(1, _single(stride, "stride")),
                 padding=padding if isinstance(padding, str) else (0, _single(padding, "padding")),
                 dilation=(1, _single(dilation, "dilation")), groups=groups,
                 padding_mode=padding_mode).squeeze(2)
    return out if batched else out.squeeze(0)


__all__ += ["conv_transpose1d"]


def conv_transpose1d(input: Any, weight: Any, bias: Any = None, stride: Any = 1, padding: Any = 0,
                     output_padding: Any = 0, groups: int = 1, dilation: Any = 1) -> Tensor:
    """PyTorch's F.conv_transpose1d: input (N, C_in, L) or (C_in, L), weight (C_in, C_out/groups,
    K); computed as conv_transpose2d over (N, C_in, 1, L)."""
    x, weight = as_tensor(input), as_tensor(weight)
    if x.ndim not in (2, 3) or weight.ndim != 3:
        raise ShapeError(f"conv_transpose1d: expects input (N, C_in, L) or (C_in, L) and weight "
                         f"(C_in, C_out/groups, K), got {input.shape} and {weight.shape} "
                         f"(at {user_location()})")
    stride, padding, output_padding, dilation = (
        size_argument(v, 1, f"conv_transpose1d: {name}")[0] for v, name in (
            (stride, "stride"), (padding, "padding"), (output_padding, "output_padding"),
            (dilation, "dilation")))
    if x.shape[-2] != weight.shape[0]:
        raise ShapeError(f"conv_transpose1d: weight {weight.shape} expects {weight.shape[0]} input "
                         f"channels, got input {input.shape} (at {user_location()})")
    _same_float_dtype("conv_transpose1d", x, weight)
    # checked here, in the 1-D terms: conv_transpose2d would name its own 4-D shapes and pairs
    check_conv_arguments("conv_transpose1d", weight.shape[-1:], (stride,), (dilation,), groups)
    if x.shape[-2] % groups:
        raise ShapeError(f"conv_transpose1d: {input.shape[-2]} input channels are not divisible by "
                         f"groups={groups} (at {user_location()})")
    if min(padding, output_padding) < 0 or output_padding >= max(stride, dilation):
        raise ShapeError(f"conv_transpose1d: padding {padding} and output_padding {output_padding} "
                         f"must not be negative, and output_padding must be smaller than the "
                         f"stride {stride} or the dilation {dilation} (at {user_location()})")
    length = ((x.shape[-1] - 1) * stride - 2 * padding + dilation * (weight.shape[-1] - 1)
              + output_padding + 1)
    if length < 1:
        raise ShapeError(f"conv_transpose1d: the output would have length {length} for input "
                         f"{input.shape}, weight {weight.shape}, stride {stride} and padding {padding}: "
                         f"too short (at {user_location()})")
    out_channels = weight.shape[1] * groups
    if bias is not None and as_tensor(bias).shape != (out_channels,):
        raise ShapeError(f"conv_transpose1d: bias must have shape ({out_channels},), one per output "
                         f"channel, got {as_tensor(bias).shape} (at {user_location()})")
    out = conv_transpose2d(x.unsqueeze(-2), weight.unsqueeze(2), bias, (1, stride), (0, padding),
                           (0, output_padding), groups, (1, dilation))
    return out.squeeze(-2)


# -- adaptive pooling: output cell i of an axis of size n pooled to m covers input positions
# [floor(i*n/m), ceil((i+1)*n/m)), as PyTorch's. When m divides n the windows tile the axis and
# the pool is one ordinary pooling op; otherwise windows vary in size (and may overlap), and the
# pool reduces one slice per output row, then per output column: max and mean over a rectangle
# are the same reduction over its rows, then over its columns.
def _output_size(op: str, x: Tensor, output_size: Any) -> tuple[int, int]:
    """(out_h, out_w); None in `output_size` keeps that input size."""
    if x.ndim not in (3, 4):
        raise ShapeError(f"{op}: expects an (N, C, H, W) or (C, H, W) input, got shape {x.shape} "
                         f"(at {user_location()})")
    sizes = (output_size, output_size) if _is_integer(output_size) or output_size is None\
        else tuple(output_size) if isinstance(output_size, (tuple, list)) else ()
    if len(sizes) != 2 or not all(s is None or _is_integer(s) for s in sizes):
        raise ValueError(f"{op}: output_size must be an int or a pair (of ints or None), got "
                         f"{output_size!r}")
    out = tuple(x.shape[-2 + i] if s is None else int(s) for i, s in enumerate(sizes))
    if min(out) <= 0:
        raise ValueError(f"{op}: output sizes must be positive, got {out}")
    return out  # type: ignore[return-value]


def _adaptive_pool2d(op: str, x: Any, output_size: Any, average: bool) -> Tensor:
    x = as_tensor(x)
    out_h, out_w = _output_size(op, x, output_size)
    if not x.dtype.startswith("float"):  # whichever way the windows fall, as PyTorch refuses
        raise DTypeError(f"{op}: expects a floating-point input, got {x.dtype}; cast it first "
                         f"(at {user_location()})")
    batched = x.ndim == 4
    x = x if batched else x.unsqueeze(0)
    height, width = x.shape[2:]
    if height % out_h == 0 and width % out_w == 0:  # equal windows tiling the input
        kernel = (height // out_h, width // out_w)
        pooled = avg_pool2d(x, kernel) if average else max_pool2d(x, kernel)
    else:
        pooled = _pool_axis(_pool_axis(x, 2, out_h, average), 3, out_w, average)
    return pooled if batched else pooled.squeeze(0)


def _pool_axis(x: Tensor, axis: int, out_size: int, average: bool) -> Tensor:
    """Each of `out_size` windows of `axis` reduced to one position (kept as size 1)."""
    size = x.shape[axis]
    if size == out_size:
        return x
    cells = []
    for i in range(out_size):
        start, stop = (i * size) // out_size, -(-(i + 1) * size // out_size)
        window = x[(slice(None),) * axis + (slice(start, stop),)]
        cells.append(window.mean(axis, keepdims=True) if average
                     else window.amax(axis, keepdim=True))
    return concatenate(cells, axis)


def adaptive_avg_pool2d(input: Any, output_size: Any) -> Tensor:
    """The mean over each of PyTorch's adaptive windows (see the module docstring)."""
    return _adaptive_pool2d("adaptive_avg_pool2d", input, output_size, average=True)


def adaptive_max_pool2d(input: Any, output_size: Any, return_indices: bool = False) -> Tensor:
    """The maximum over each of PyTorch's adaptive windows (see the comment above). Where the
    output size does not divide the input's, a window's tied maxima share its gradient equally
    (PyTorch gives it all to the first); the gradient summed over them is the same."""
    if return_indices:
        raise NotImplementedError("adaptive_max_pool2d: return_indices=True is not supported")
    return _adaptive_pool2d("adaptive_max_pool2d", input, output_size, average=False)


def pad(input: Tensor, pad: Sequence[int], mode: str = "constant", value: float | None = None) -> Tensor:
    """PyTorch's F.pad: `pad` lists (before, after) widths from the last dimension backwards,
    (left, right, top, bottom, ...). Modes: 'constant' (filled with `value`, default 0),
    'reflect' (mirrored without repeating the edge), 'replicate' (the edge repeated) and
    'circular' (wrapped around). In every mode a negative width crops, as in PyTorch: reflect
    and replicate mirror or repeat the input's own edges, circular wraps the cropped axis."""
    x = as_tensor(input)
    if not all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) for w in pad):
        raise TypeError(f"pad: widths must be integers, got {tuple(pad)} (at {user_location()})")
    widths = [int(w) for w in pad]
    if len(widths) % 2 or len(widths) // 2 > x.ndim:
        raise ShapeError(f"pad: expects an even number of widths, two per padded dimension and "
                         f"at most {2 * input.ndim} for a rank-{input.ndim} input, got {tuple(widths)} "
                         f"(at {user_location()})")
    per_axis = {x.ndim - 1 - i: (widths[2 * i], widths[2 * i + 1]) for i in range(len(widths) // 2)}
    if mode == "constant":
        return _pad_constant(x, per_axis, 0.0 if value is None else value)
    if mode not in ("reflect", "replicate", "circular"):
        raise ValueError(f"pad: mode must be 'constant', 'reflect', 'replicate' or 'circular', "
                         f"got {mode!r}")
    if value:
        raise ValueError(f"pad: a fill value ({value}) only applies to mode='constant'")
    for axis, (before, after) in per_axis.items():
        problem = _pad_width_problem(mode, x.shape[axis], before, after)
        if problem:
            raise ShapeError(f"pad: {mode} padding of ({before}, {after}) for dimension {axis} of "
                             f"input shape {input.shape}: {problem} (at {user_location()})")
        if before or after:
            x = bind("gather", x, as_tensor(_pad_source_indices(mode, x.shape[axis], before, after)),
                     axis=axis, wrap_negative=False)
    return x


def _pad_constant(x: Tensor, per_axis: dict[int, tuple[int, int]], value: float) -> Tensor:
    """Negative widths crop (a slice), positive ones pad (the pad op)."""
    for axis, (before, after) in per_axis.items():
        if max(-before, 0) + max(-after, 0) > x.shape[axis]:
            raise ShapeError(f"pad: widths ({before}, {after}) crop more than the {x.shape[axis]} "
                             f"elements of dimension {axis} of shape {x.shape} "
                             f"(at {user_location()})")
    crop = tuple(slice(max(-before, 0), x.shape[axis] - max(-after, 0)) if axis in per_axis
                 else slice(None) for axis, (before, after)
                 in ((a, per_axis.get(a, (0, 0))) for a in range(x.ndim)))
    if any(min(w) < 0 for w in per_axis.values()):
        x = x[crop]
    widths = tuple((max(per_axis.get(a, (0, 0))[0], 0), max(per_axis.get(a, (0, 0))[1], 0))
                   for a in range(x.ndim))
    if not any(before or after for before, after in widths):
        return x
    return bind("pad", x, pads=widths, value=float(value))


def _pad_width_problem(mode: str, size: int, before: int, after: int) -> str | None:
    """What is wrong with these widths of a reflect, replicate or circular pad (PyTorch's
    limits), or None."""
    if size + before + after < (0 if mode == "circular" else 1):  # PyTorch's limits
        return f"the {size} elements less the crop leave no output"
    if mode == "reflect" and max(before, after) >= size:
        return f"reflection needs widths below the dimension's size {size}"
    kept = size + min(before, 0) + min(after, 0)  # circular wraps what the crop leaves
    if mode == "circular" and max(before, after) > kept:
        return f"circular padding wraps at most once: widths up to {kept} (the elements left after the crop)"
    return None


def _pad_source_indices(mode: str, size: int, before: int, after: int) -> np.ndarray:
    """For each position of the padded axis, the input position it copies (a negative width
    crops: its positions are dropped)."""
    positions = np.arange(-before, size + after)
    if mode == "replicate":
        return np.clip(positions, 0, size - 1)
    if mode == "circular":
        start = max(-before, 0)
        kept = size + min(before, 0) + min(after, 0)
        return start + (positions - start) % max(kept, 1)  # kept 0: no positions
    period = 2 * (size - 1)  # reflect: ... 2 1 [0 1 2 ... n-1] n-2 ...
    folded = np.abs(positions) % period if period else np.zeros_like(positions)
    return np.where(folded < size, folded, period - folded)


def attention_probabilities(query: Tensor, key: Tensor, scale: float, keep: Any = None,
                            bias: Any = None) -> Tensor:
    """softmax(query @ key^T * scale + bias) over the keys, with the scores of keys where
    `keep` is False removed. A query that may see no key gets all-zero weights (as PyTorch's
    scaled_dot_product_attention), not NaN; `keep` and `bias` broadcast against the scores."""
    scores = (query @ key.transpose(-2, -1)) * scale
    if keep is not None:
        scores = where(keep, scores, float("-inf"))
    if bias is not None:
        scores = scores + _cast_like(bias, scores)
    return bind("softmax", scores, axis=-1, zero_masked_rows=True)


def _cast_like(x: Any, like: Tensor) -> Tensor:
    x = as_tensor(x, like=like)
    return x if x.dtype == like.dtype else x.astype(like.dtype)


def _target_like(target: Any, prediction: Tensor) -> Tensor:
    """A loss's target in the prediction's dtype, but a float64 one beside float32 predictions
    kept: PyTorch promotes, so the loss is float64, computed from the exact target."""
    target = as_tensor(target, like=prediction)
    if target.dtype == "float64" and prediction.dtype == "float32":
        return target
    return _cast_like(target, prediction)


def check_mask_dtype(op: str, name: str, mask: Tensor, true_keeps: bool = True) -> None:
    """A mask keeps (bool) or adds to (float) the scores; 0/1 integers would be added, silently
    not what a keep-mask meant: refused, as PyTorch refuses them. `true_keeps`: what True means
    to `op` (scaled_dot_product_attention keeps those scores; MultiheadAttention and the
    transformer layers mask them out)."""
    if mask.dtype != "bool" and not mask.dtype.startswith("float"):
        advice = ("True keeps a score; use mask.astype(bool) for a 0/1 keep-mask" if true_keeps else
                  "True masks a score out; use (mask == 0) for a 0/1 keep-mask, mask.astype(bool) "
                  "for a 0/1 mask of the positions to leave out")
        raise DTypeError(f"{op}: {name} must be bool ({advice}) or float (added to the scores), "
                         f"got {mask.dtype} (at {user_location()})")


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Any = None,
                                 dropout_p: float = 0.0, is_causal: bool = False,
                                 scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """softmax(query @ key^T * scale + mask) @ value over (..., L, E), (..., S, E), (..., S, Ev),
    as PyTorch's: a boolean `attn_mask` keeps the scores where it is True, a float one is added;
    `is_causal` lets query i see keys 0..i; `scale` defaults to 1/sqrt(E). Dropout with
    probability `dropout_p` applies to the attention weights whenever dropout_p > 0. With
    `enable_gqa`, keys and values of (..., H_kv, S, ·) serve query heads H_q, a multiple of
    H_kv, in consecutive groups (grouped-query attention)."""
    query, key, value = as_tensor(query), as_tensor(key), as_tensor(value)
    if (min(query.ndim, key.ndim, value.ndim) < 2 or query.shape[-1] != key.shape[-1]
            or key.shape[-2] != value.shape[-2]):
        raise ShapeError(f"scaled_dot_product_attention: expects query (..., L, E), key "
                         f"(..., S, E) and value (..., S, Ev), got {query.shape}, {key.shape} "
                         f"and {value.shape} (at {user_location()})")
    if enable_gqa:
        key, value = _shared_heads(query, key), _shared_heads(query, value)
    keep = bias = None
    if is_causal:
        if attn_mask is not None:
            raise ValueError("scaled_dot_product_attention: give either attn_mask or "
                             "is_causal=True, not both")
        keep = np.tril(np.ones((query.shape[-2], key.shape[-2]), dtype=bool))
    elif attn_mask is not None:
        mask = as_tensor(attn_mask)
        check_mask_dtype("scaled_dot_product_attention", "attn_mask", mask)
        keep, bias = (mask, None) if mask.dtype == "bool" else (None, mask)
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    weights = attention_probabilities(query, key, scale, keep, bias)
    if dropout_p > 0:
        weights = dropout(weights, dropout_p)
    return weights @ value


def _shared_heads(query: Tensor, x: Tensor) -> Tensor:
    """Key or value heads (..., H_kv, S, ·) repeated in place to the query's H_q heads: head h
    of the query reads head h // (H_q / H_kv)."""
    if min(query.ndim, x.ndim) < 3 or query.shape[-3] % x.shape[-3]:
        raise ShapeError(f"scaled_dot_product_attention: with enable_gqa, the query's heads "
                         f"(axis -3) must be a multiple of the key's and value's, got {query.shape} "
                         f"and {x.shape} (at {user_location()})")
    groups = query.shape[-3] // x.shape[-3]
    if groups == 1:
        return x
    *batch, heads, steps, width = x.shape
    repeated = x.unsqueeze(-3).expand(*batch, heads, groups, steps, width)
    return repeated.reshape(*batch, heads * groups, steps, width)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    return normalization.group_norm(as_tensor(input), num_groups, weight, bias, eps)


def instance_norm(input: Tensor, running_mean: Tensor | None = None,
                  running_var: Tensor | None = None, weight: Tensor | None = None,
                  bias: Tensor | None = None, use_input_stats: bool = True, momentum: float = 0.1,
                  eps: float = 1e-5) -> Tensor:
    """Normalise each sample's channels one by one over their positions (see
    normalization.instance_norm for running statistics)."""
    return normalization.instance_norm(as_tensor(input), running_mean, running_var, weight, bias,
                                       use_input_stats, momentum, eps)


def layer_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise over the trailing dimensions `normalized_shape` (biased variance), then scale
    by `weight` and shift by `bias`."""
    return normalization.layer_norm(as_tensor(input), normalized_shape, weight, bias, eps)


def rms_norm(input: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the trailing `normalized_shape`, scaled by `weight`
    (eps by default the machine epsilon of x's dtype, as PyTorch's)."""
    return normalization.rms_norm(as_tensor(input), normalized_shape, weight, eps)


def embedding(input: Any, weight: Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Tensor:
    """Rows of `weight` (num_embeddings, dim) picked by integer ids `input`; the rows picked at
    `padding_idx` take no gradient. `sparse` is a PyTorch storage hint and changes nothing."""
    if max_norm is not None or scale_grad_by_freq:
        raise GraphcError(f"embedding: max_norm (renormalising rows in place) and "
                          f"scale_grad_by_freq are not supported; renormalise the table in the "
                          f"training step instead (at {user_location()})")
    return sparse_layers.embedding(input, weight, padding_idx)


def embedding_bag(input: Any, weight: Tensor, offsets: Any = None, max_norm: float | None = None,
                  norm_type: float = 2, scale_grad_by_freq: bool = False, mode: str = "mean",
                  sparse: bool = False, per_sample_weights: Any = None,
                  include_last_offset: bool = False, padding_idx: int | None = None) -> Tensor:
    """The sum, mean or maximum of the rows of `weight` each bag of ids picks (see
    nn.sparse.embedding_bag)."""
    if max_norm is not None or scale_grad_by_freq:
        raise GraphcError(f"embedding_bag: max_norm and scale_grad_by_freq are not supported "
                          f"(at {user_location()})")
    return sparse_layers.embedding_bag(input, weight, offsets, mode, per_sample_weights,
                                       include_last_offset, padding_idx)


__all__ += ["embedding_bag"]


# -- losses ----------------------------------------------------------------------------------
def _reduction(size_average: bool | None, reduce: bool | None, reduction: str) -> str:
    """PyTorch's deprecated size_average/reduce flags, when given, choose the reduction as
    they do there: reduce=False gives 'none', else size_average=False 'sum', else 'mean'."""
    if size_average is None and reduce is None:
        return reduction
    if reduce is False:
        return "none"
    return "sum" if size_average is False else "mean"


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def _loss_input(op: str, input: Any) -> Tensor:
    """The prediction as a Tensor; a tuple or list (a model returning several outputs) is
    refused with the fix, instead of being stacked into a constant."""
    if isinstance(input, (tuple, list)):
        raise InputError(f"{op}: the input is a {type(input).__name__} of {len(input)} values, "
                         f"not a tensor: a model that returns several outputs must hand the "
                         f"loss its prediction alone, e.g. {op}(outputs[0], target) "
                         f"(at {user_location()})")
    return as_tensor(input)


def _same_shape_target(op: str, input: Tensor, target: Any) -> Tensor:
    target = _target_like(target, input)
    if target.shape != input.shape:
        raise ShapeError(f"{op}: the target's shape {target.shape} must equal the input's "
                         f"{input.shape} (at {user_location()})")
    return target


def _broadcast_target(op: str, input: Tensor, target: Any) -> Tensor:
    """`target` in the input's dtype (see _target_like); a shape other than the input's broadcasts against it,
    with PyTorch's warning: (N, 1) predictions against (N,) targets make an (N, N) loss."""
    target = _target_like(target, input)
    if target.shape != input.shape:
        warnings.warn(f"{op}: the target's shape {target.shape} differs from the input's "
                      f"{input.shape}; they broadcast, which is likely wrong: give both the same "
                      f"shape (at {user_location()})", UserWarning, stacklevel=2)
    return target


def _class_rows(op: str, scores: Tensor, target: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """Class scores (C,), (N, C) or (N, C, d1, ...) as rows (M, C), their class targets (M,),
    and the shape of the per-target losses ((), (N,) or (N, d1, ...))."""
    if scores.ndim == 0:
        raise ShapeError(f"{op}: expects class scores (C,), (N, C) or (N, C, d1, ...), got a "
                         f"0-d input (at {user_location()})")
    target_shape = () if scores.ndim == 1 else scores.shape[:1] + scores.shape[2:]
    if target.shape != target_shape:
        raise ShapeError(f"{op}: class targets for input {scores.shape} must have shape "
                         f"{target_shape}, got {target.shape} (at {user_location()})")
    if target.dtype not in ("int32", "int64"):
        raise DTypeError(f"{op}: class targets must be integers (or float probabilities shaped "
                         f"like the input), got {target.dtype} (at {user_location()})")
    if scores.ndim > 2:  # classes last, then one row per position
        scores = scores.permute((0,) + tuple(range(2, scores.ndim)) + (1,))
    return scores.reshape(-1, scores.shape[-1]), target.reshape(-1), target_shape


def _class_weights(weight: Any, num_classes: int, like: Tensor) -> Tensor | None:
    if weight is None:
        return None
    weight = _cast_like(weight, like)
    if weight.shape != (num_classes,):
        raise ShapeError(f"class weights must have shape ({num_classes},), one per class, got "
                         f"{weight.shape} (at {user_location()})")
    return weight


def _target_terms(op: str, log_probs: Tensor, target: Any, weight: Tensor | None,
                  ignore_index: int) -> tuple[Tensor, Tensor, Tensor, Tensor, tuple[int, ...]]:
    """For class targets: per target, -weight[y] * log_probs[y] and weight[y] (both 0 where
    y == ignore_index), and the rows (M, C), the kept mask (M,) and the per-target shape."""
    rows, targets, shape = _class_rows(op, log_probs, as_tensor(target))
    column = targets.reshape(-1, 1)
    kept = column != ignore_index
    safe = where(kept, column, 0)
    picked = bind("take_along_axis", rows, safe, axis=1, wrap_negative=False)
    if weight is None:
        target_weight = kept.astype(rows.dtype)
    else:
        target_weight = where(kept, bind("gather", weight, safe, axis=0, wrap_negative=False), 0)
    losses = where(kept, -picked * target_weight if weight is not None else -picked, 0)
    return losses.reshape(-1), target_weight.reshape(-1), rows, kept.reshape(-1), shape


def _weighted_reduce(losses: Tensor, weights: Tensor, shape: tuple[int, ...], reduction: str) -> Tensor:
    """'mean' divides by the summed target weights (PyTorch's weighted mean; nan when every
    target is ignored), 'none' gives the per-target shape."""
    if reduction == "mean":
        return losses.sum() / weights.sum()
    if reduction == "none":
        return losses.reshape(shape)
    return _reduce(losses, reduction)


def _class_axis(op: str, scores: Tensor, what: str) -> int:
    """The class axis of (C,), (N, C) or (N, C, d1, ...) `scores`, refused where there is none
    or it is empty."""
    if scores.ndim == 0:
        raise ShapeError(f"{op}: expects {what} (C,), (N, C) or (N, C, d1, ...), got a 0-d input "
                         f"(at {user_location()})")
    class_axis = 0 if scores.ndim == 1 else 1
    if scores.shape[class_axis] == 0:
        raise ShapeError(f"{op}: the {what} {scores.shape} have no class (axis {class_axis} is "
                         f"empty) (at {user_location()})")
    return class_axis


def nll_loss(input: Tensor, target: Any, weight: Any = None, size_average: bool | None = None,
             ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of integer class targets, for log-probabilities (N, C), (C,) or
    (N, C, d1, ...) with targets (N,), () or (N, d1, ...); `weight` (C,) scales each class.

    As PyTorch's: a target must lie in [0, C) (a negative one is not counted from the end) or
    equal `ignore_index`, else the call raises IndexOutOfRangeError naming the target, its
    position and this line, before any kernel reads through it. An ignored target adds no loss
    (0 with reduction='none') and no gradient; the mean is weighted (divided by the summed
    weights of the kept targets), nan when every target is ignored."""
    log_probs = _loss_input("nll_loss", input)
    reduction = _reduction(size_average, reduce, reduction)
    class_axis = _class_axis("nll_loss", log_probs, "log-probabilities")
    weight = _class_weights(weight, log_probs.shape[class_axis], log_probs)
    losses, weights, _, _, shape = _target_terms("nll_loss", log_probs, target, weight, ignore_index)
    return _weighted_reduce(losses, weights, shape, reduction)


def cross_entropy(input: Tensor, target: Any, weight: Any = None, size_average: bool | None = None,
                  ignore_index: int = -100, reduce: bool | None = None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """Softmax cross-entropy of logits (N, C), (C,) or (N, C, d1, ...) (classes on axis 1), with
    integer class targets (as nll_loss, `ignore_index` included) or class probabilities shaped
    like the logits. `weight` (C,) scales each class; `label_smoothing` ε mixes the target
    with the uniform distribution: (1-ε)·target + ε/C, as PyTorch's."""
    logits = _loss_input("cross_entropy", input)
    reduction = _reduction(size_average, reduce, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    class_axis = _class_axis("cross_entropy", logits, "logits")
    num_classes = logits.shape[class_axis]
    log_probs = log_softmax(logits, dim=class_axis)
    weight = _class_weights(weight, num_classes, logits)
    target = as_tensor(target)
    if target.dtype in ("float32", "float64"):
        return _probability_cross_entropy(log_probs, target, weight, class_axis, label_smoothing,
                                          reduction)
    losses, weights, rows, kept, shape = _target_terms("cross_entropy", log_probs, target, weight,
                                                       ignore_index)
    loss = _weighted_reduce(losses, weights, shape, reduction)
    if not label_smoothing:
        return loss
    # The uniform part: -sum_c weight[c] * log p_c / C per kept target, reduced as the rest.
    per_class = rows * weight if weight is not None else rows
    uniform = where(kept, -per_class.sum(1), 0)
    return loss * (1 - label_smoothing) + _weighted_reduce(uniform, weights, shape, reduction) * (
        label_smoothing / num_classes)


def _probability_cross_entropy(log_probs: Tensor, target: Tensor, weight: Tensor | None,
                               class_axis: int, label_smoothing: float, reduction: str) -> Tensor:
    """-sum_c weight[c] * target_c * log p_c per sample; the mean is over samples, unweighted."""
    if target.shape != log_probs.shape:
        raise ShapeError(f"cross_entropy: probability targets must match the logits' shape "
                         f"{log_probs.shape}, got {target.shape} (at {user_location()})")
    target = _target_like(target, log_probs)
    num_classes = log_probs.shape[class_axis]
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / num_classes
    per_class = target * log_probs
    if weight is not None:
        per_class = per_class * weight.reshape((-1,) + (1,) * (log_probs.ndim - class_axis - 1))
    return _reduce(-per_class.sum(class_axis), reduction)


def binary_cross_entropy(input: Tensor, target: Any, weight: Any = None,
                         size_average: bool | None = None, reduce: bool | None = None,
                         reduction: str = "mean") -> Tensor:
    """-weight * (t log p + (1-t) log(1-p)) for probabilities p; each log is clamped at -100,
    as PyTorch's, so p of exactly 0 or 1 gives a finite loss. Its gradient in p is PyTorch's,
    (p - t) / max(p (1 - p), 1e-12): finite at p of exactly 0 or 1 too (a saturated sigmoid),
    where the clamped logs' own would be 0 * (1/0), NaN. Where p (1 - p) > 1e-12 (every p but
    the saturated ones) the loss is the logs themselves, so its higher derivatives are exact."""
    probs = _loss_input("binary_cross_entropy", input)
    target = _same_shape_target("binary_cross_entropy", probs, target)
    reduction = _reduction(size_average, reduce, reduction)
    p = stop_gradient(probs)
    interior = p * (1 - p) > 1e-12
    live = where(interior, probs, 0.5)  # the logs of the saturated ones are not differentiated
    inside = -(target * live.log() + (1 - target) * bind("log1p", -live))
    log_p = maximum(p.log(), -100.0)
    log_not_p = maximum(bind("log1p", -p), -100.0)
    slope = stop_gradient((p - target) / maximum(p * (1 - p), 1e-12))
    # probs - p is 0: the term adds nothing to the loss and gives p the gradient `slope`
    saturated = -(target * log_p + (1 - target) * log_not_p) + slope * (probs - p)
    loss = where(interior, inside, saturated)
    if weight is not None:
        loss = loss * _cast_like(weight, probs)
    return _reduce(loss, reduction)


def binary_cross_entropy_with_logits(input: Tensor, target: Any, weight: Any = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: Any = None) -> Tensor:
    """binary_cross_entropy(sigmoid(x), t) computed stably from the logits x; `pos_weight`
    scales the positive term (broadcast along the last axis, one per class), `weight` each
    element's loss."""
    logits = _loss_input("binary_cross_entropy_with_logits", input)
    target = _same_shape_target("binary_cross_entropy_with_logits", logits, target)
    logits = logits.astype(target.dtype)  # a float64 target: computed in float64, as PyTorch's
    reduction = _reduction(size_average, reduce, reduction)
    # -log sigmoid(x) = log(1 + exp(-x)), written per sign so that no exp overflows and the
    # gradient at x = 0 is sigmoid(0) - 1 (max(-x, 0) + log(1 + exp(-|x|)) loses it there: the
    # subgradients of max and |x| at their kinks are 0).
    nonnegative = logits >= 0
    above, below = where(nonnegative, logits, 0), where(nonnegative, 0, logits)
    neg_log_sigmoid = where(nonnegative, bind("log1p", (-above).exp()),
                            bind("log1p", below.exp()) - below)
    if pos_weight is not None:
        pos_weight = _cast_like(pos_weight, logits)
        try:
            np.broadcast_shapes(pos_weight.shape, logits.shape)
        except ValueError:
            raise ShapeError(f"binary_cross_entropy_with_logits: pos_weight {pos_weight.shape} "
                             f"does not broadcast to the logits {logits.shape} (one per class, "
                             f"along the last axis) (at {user_location()})") from None
    positive_scale = target if pos_weight is None else target * pos_weight
    # t·(-log σ(x)) + (1-t)·(-log(1-σ(x))), with -log(1-σ(x)) = x - log σ(x).
    loss = (1 - target) * logits + (positive_scale + 1 - target) * neg_log_sigmoid
    if weight is not None:
        loss = loss * _cast_like(weight, logits)
    return _reduce(loss, reduction)


def kl_div(input: Tensor, target: Any, size_average: bool | None = None, reduce: bool | None = None,
           reduction: str = "mean", log_target: bool = False) -> Tensor:
    """Kullback-Leibler divergence with `input` as log-probabilities: target * (log target -
    input), 0 where target is 0 (NaN where it is negative) (or exp(target) * (target - input) with `log_target`).
    reduction='batchmean' divides the sum by the batch size (the true KL divergence); 'mean'
    averages over every element, as PyTorch's."""
    log_q = _loss_input("kl_div", input)
    target = _target_like(target, log_q)
    reduction = _reduction(size_average, reduce, reduction)
    if log_target:
        loss = target.exp() * (target - log_q)
    else:
        # 0 where the target is 0; the inner where keeps log's argument off 0, so 0·log 0 has a
        # zero gradient too (a negative target stays NaN, as in PyTorch: it is no probability)
        zero = target == 0
        loss = where(zero, 0.0, target * (where(zero, 1.0, target).log() - log_q))
    if reduction == "batchmean":
        return loss.sum() / (log_q.shape[0] if log_q.ndim else 1)
    return _reduce(loss, reduction)


def _elementwise_weighted(loss: Tensor, weight: Any, reduction: str, op: str,
                          mean_over_weights: bool = True) -> Tensor:
    """PyTorch's per-element `weight` of the regression losses: mse_loss's and l1_loss's mean
    divides by the summed weights, huber_loss's by the element count."""
    if weight is None:
        return _reduce(loss, reduction)
    weight = _cast_like(weight, loss)
    if weight.shape != loss.shape:
        raise ShapeError(f"{op}: weight must have the input's shape {loss.shape}, got "
                         f"{weight.shape} (at {user_location()})")
    loss = loss * weight
    if reduction == "mean" and mean_over_weights:
        return loss.sum() / weight.sum()
    return _reduce(loss, reduction)


def mse_loss(input: Tensor, target: Any, size_average: bool | None = None,
             reduce: bool | None = None, reduction: str = "mean", weight: Any = None) -> Tensor:
    input = _loss_input("mse_loss", input)
    loss = (input - _broadcast_target("mse_loss", input, target)).square()
    return _elementwise_weighted(loss, weight, _reduction(size_average, reduce, reduction), "mse_loss")


def l1_loss(input: Tensor, target: Any, size_average: bool | None = None,
            reduce: bool | None = None, reduction: str = "mean", weight: Any = None) -> Tensor:
    input = _loss_input("l1_loss", input)
    loss = (input - _broadcast_target("l1_loss", input, target)).abs()
    return _elementwise_weighted(loss, weight, _reduction(size_average, reduce, reduction), "l1_loss")


def smooth_l1_loss(input: Tensor, target: Any, size_average: bool | None = None,
                   reduce: bool | None = None, reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """0.5·d²/beta where |d| < beta, |d| - 0.5·beta beyond (the L1 loss when beta is 0)."""
    input = _loss_input("smooth_l1_loss", input)
    reduction = _reduction(size_average, reduce, reduction)
    if beta < 0:
        raise ValueError(f"smooth_l1_loss: beta must be non-negative, got {beta}")
    residual = input - _broadcast_target("smooth_l1_loss", input, target)
    if beta == 0:
        return _reduce(residual.abs(), reduction)
    small, near, magnitude = _huber_sides(residual, beta)
    # PyTorch's order, 0.5 d² / beta: 1 / beta overflows float32 below beta ~ 3e-39
    return _reduce(where(small, near.square() * 0.5 / beta, magnitude - 0.5 * beta), reduction)


def _huber_sides(residual: Tensor, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """(|d| < threshold, d there and 0 beyond, |d|): the quadratic side squares d itself, not
    |d| (whose second derivative at 0 is 0 through sign(0)), and 0 beyond the threshold, where
    its discarded gradient would be 0 · inf at an infinite residual."""
    magnitude = residual.abs()
    small = magnitude < threshold
    return small, where(small, residual, 0), magnitude


def huber_loss(input: Tensor, target: Any, reduction: str = "mean", delta: float = 1.0,
               weight: Any = None) -> Tensor:
    """0.5·d² where |d| < delta, delta·(|d| - 0.5·delta) beyond: smooth_l1_loss scaled by delta."""
    input = _loss_input("huber_loss", input)
    if delta <= 0:
        raise ValueError(f"huber_loss: delta must be positive, got {delta}")
    small, near, magnitude = _huber_sides(input - _broadcast_target("huber_loss", input, target), delta)
    loss = where(small, near.square() * 0.5, (magnitude - 0.5 * delta) * delta)
    return _elementwise_weighted(loss, weight, reduction, "huber_loss", mean_over_weights=False)


# -- margin, embedding and likelihood losses (PyTorch's formulas) ----------------------------
def margin_ranking_loss(input1: Tensor, input2: Tensor, target: Any, margin: float = 0.0,
                        size_average: bool | None = None, reduce: bool | None = None,
                        reduction: str = "mean") -> Tensor:
    """max(0, -y · (x1 - x2) + margin) for targets y of 1 (x1 should rank higher) or -1."""
    x1, x2 = _loss_input("margin_ranking_loss", input1), _loss_input("margin_ranking_loss", input2)
    loss = (-_target_like(target, x1) * (x1 - x2) + margin).clamp(min=0)
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def hinge_embedding_loss(input: Tensor, target: Any, margin: float = 1.0,
                         size_average: bool | None = None, reduce: bool | None = None,
                         reduction: str = "mean") -> Tensor:
    """x where y is 1, max(0, margin - x) where y is -1 (x a distance); as PyTorch's, a target
    of any other value takes both terms."""
    x = _loss_input("hinge_embedding_loss", input)
    y = _target_like(target, x)
    loss = where(y != 1, (margin - x).clamp(min=0), 0.0) + where(y != -1, x, 0.0)
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def soft_margin_loss(input: Tensor, target: Any, size_average: bool | None = None,
                     reduce: bool | None = None, reduction: str = "mean") -> Tensor:
    """log(1 + exp(-y · x)) for targets y of 1 or -1 (softplus: no overflow for large -y · x)."""
    x = _loss_input("soft_margin_loss", input)
    loss = softplus(-_broadcast_target("soft_margin_loss", x, target) * x)
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def cosine_embedding_loss(input1: Tensor, input2: Tensor, target: Any, margin: float = 0.0,
                          size_average: bool | None = None, reduce: bool | None = None,
                          reduction: str = "mean") -> Tensor:
    """1 - cos(x1, x2) where y is 1, max(0, cos(x1, x2) - margin) where y is -1; the cosine
    along the axis after the target's, each squared norm plus 1e-12, as PyTorch's."""
    x1, x2 = _loss_input("cosine_embedding_loss", input1), _loss_input("cosine_embedding_loss", input2)
    y = _target_like(target, x1)
    axis = y.ndim
    if x1.ndim != axis + 1 or x2.ndim != axis + 1:
        raise ShapeError(f"cosine_embedding_loss: inputs of {x1.shape} and {x2.shape} for a target "
                         f"of {y.shape}: the inputs need one axis more than the target, the "
                         f"vectors compared (at {user_location()})")
    squares = ((x1 * x1).sum(axis) + 1e-12) * ((x2 * x2).sum(axis) + 1e-12)
    cos = (x1 * x2).sum(axis) / squares.sqrt()
    loss = where(y == 1, 1 - cos, 0.0) + where(y == -1, (cos - margin).clamp(min=0), 0.0)
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def triplet_margin_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 1.0,
                        p: float = 2.0, eps: float = 1e-6, swap: bool = False,
                        size_average: bool | None = None, reduce: bool | None = None,
                        reduction: str = "mean") -> Tensor:
    """max(0, margin + d(a, p) - d(a, n)), d the pairwise_distance; with `swap`, d(a, n) is
    the smaller of it and d(p, n)."""
    a, pos, neg = (_loss_input("triplet_margin_loss", t) for t in (anchor, positive, negative))
    if not (a.ndim == pos.ndim == neg.ndim) or a.ndim not in (1, 2):
        raise ShapeError(f"triplet_margin_loss: anchor, positive and negative must be 1-D or 2-D "
                         f"alike, got {a.shape}, {pos.shape} and {neg.shape} (at {user_location()})")
    to_positive = pairwise_distance(a, pos, p, eps)
    to_negative = pairwise_distance(a, neg, p, eps)
    if swap:
        to_negative = minimum(to_negative, pairwise_distance(pos, neg, p, eps))
    loss = (margin + to_positive - to_negative).clamp(min=0)
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def multilabel_soft_margin_loss(input: Tensor, target: Any, weight: Any = None,
                                size_average: bool | None = None, reduce: bool | None = None,
                                reduction: str = "mean") -> Tensor:
    """Binary cross-entropy of each class's logit against its 0/1 target, averaged over the
    classes (the last axis), then reduced over the samples."""
    x = _loss_input("multilabel_soft_margin_loss", input)
    y = _same_shape_target("multilabel_soft_margin_loss", x, target)
    loss = -(y * logsigmoid(x) + (1 - y) * logsigmoid(-x))
    if weight is not None:
        loss = loss * _cast_like(weight, x)
    loss = loss.sum(-1) / x.shape[-1]
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def poisson_nll_loss(input: Tensor, target: Any, log_input: bool = True, full: bool = False,
                     size_average: bool | None = None, eps: float = 1e-8,
                     reduce: bool | None = None, reduction: str = "mean") -> Tensor:
    """Negative log-likelihood of Poisson counts y: exp(x) - y · x for a log-rate x
    (`log_input`), else x - y · log(x + eps) for a rate; `full` adds Stirling's approximation
    of log(y!) where y > 1."""
    x = _loss_input("poisson_nll_loss", input)
    y = _broadcast_target("poisson_nll_loss", x, target)
    loss = x.exp() - y * x if log_input else x - y * (x + eps).log()
    if full:
        counted = y > 1
        safe = where(counted, y, 2.0)  # log of the others (0 log 0) is never taken
        stirling = safe * safe.log() - safe + 0.5 * (2 * math.pi * safe).log()
        loss = loss + where(counted, stirling, 0.0)
    return _reduce(loss, _reduction(size_average, reduce, reduction))


def gaussian_nll_loss(input: Tensor, target: Any, var: Any, full: bool = False, eps: float = 1e-6,
                      reduction: str = "mean") -> Tensor:
    """0.5 · (log(var) + (x - y)² / var) (+ 0.5 · log(2π) with `full`), the predicted variance
    `var` of x's shape, or of it without the last axis, or with a last axis of 1; held at `eps`
    at least, where (as PyTorch's clamp without gradient) its gradient is still var's own."""
    x = _loss_input("gaussian_nll_loss", input)
    y = _broadcast_target("gaussian_nll_loss", x, target)
    v = _cast_like(as_tensor(var, like=x), x)
    if v.shape != x.shape:
        if v.shape == x.shape[:-1]:
            v = v.unsqueeze(-1)
        elif not (v.shape[:-1] == x.shape[:-1] and v.shape[-1:] == (1,)):
            raise ShapeError(f"gaussian_nll_loss: var of {v.shape} for an input of {x.shape}: it "
                             f"needs the input's shape, or it without the last axis, or a last "
                             f"axis of 1 (at {user_location()})")
    v = v + stop_gradient(maximum(v, eps) - v)
    loss = 0.5 * (v.log() + (x - y).square() / v)
    if full:
        loss = loss + 0.5 * math.log(2 * math.pi)
    return _reduce(loss, reduction)
