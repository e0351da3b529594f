"""Neural-network functions with PyTorch's names and conventions (NCHW, weight (out, in))."""
from __future__ import annotations

import math
from typing import Any, Sequence

from ..functions import bernoulli, logsumexp, one_hot, stop_gradient, where
from graphc.ir.errors import GraphcError, ShapeError, user_location
from ..tensor import Tensor, as_tensor, bind

__all__ = ["relu", "sigmoid", "tanh", "softmax", "log_softmax", "logsumexp", "linear", "conv2d",
           "max_pool2d", "avg_pool2d", "dropout", "cross_entropy", "nll_loss", "mse_loss",
           "l1_loss", "one_hot", "binary_cross_entropy_with_logits", "smooth_l1_loss"]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def relu(x: Tensor) -> Tensor:
    return bind("relu", as_tensor(x))


def sigmoid(x: Tensor) -> Tensor:
    return bind("sigmoid", as_tensor(x))


def tanh(x: Tensor) -> Tensor:
    return bind("tanh", as_tensor(x))


# -- activations: PyTorch's formulas, defaults and gradients (at 0 too) ---------------------------
__all__ += ["gelu", "silu", "leaky_relu", "elu", "softplus", "normalize"]


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """x * Phi(x), Phi the standard normal CDF: exact through erf, or PyTorch's tanh
    approximation with `approximate="tanh"`."""
    x = as_tensor(x)
    if approximate == "none":
        return x * 0.5 * (1 + bind("erf", x * (1 / math.sqrt(2))))
    if approximate == "tanh":
        inner = (x + 0.044715 * x * x * x) * math.sqrt(2 / math.pi)
        return 0.5 * x * (1 + bind("tanh", inner))
    raise GraphcError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r} "
                      f"(at {user_location()})")


def silu(x: Tensor) -> Tensor:
    """x * sigmoid(x) (swish)."""
    x = as_tensor(x)
    return x * bind("sigmoid", x)


def leaky_relu(x: Tensor, negative_slope: float = 0.01) -> Tensor:
    """x where x > 0, else negative_slope * x (the slope's gradient at 0, as in PyTorch)."""
    x = as_tensor(x)
    return where(x > 0, x, x * negative_slope)


def elu(x: Tensor, alpha: float = 1.0) -> Tensor:
    """x where x > 0, else alpha * (exp(x) - 1)."""
    x = as_tensor(x)
    # exp of the clamped value: the branch not taken must not overflow, or its zero
    # cotangent times an infinite derivative would be NaN
    return where(x > 0, x, alpha * (x.clamp(max=0).exp() - 1))


def softplus(x: Tensor, beta: float = 1.0, threshold: float = 20.0) -> Tensor:
    """log(1 + exp(beta * x)) / beta, and x itself where beta * x > threshold."""
    x = as_tensor(x)
    scaled = x * beta
    smooth = bind("log1p", scaled.clamp(max=threshold).exp()) * (1 / beta)
    return where(scaled > threshold, x, smooth)


def normalize(x: Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """x divided by its p-norm along `dim`, the norm kept at least `eps`."""
    x = as_tensor(x)
    return x / x.norm(p, dim, keepdim=True).clamp(min=eps)


def softmax(x: Tensor, dim: int = -1) -> Tensor:
    x = as_tensor(x)
    e = (x - stop_gradient(x.amax(dim, keepdim=True))).exp()
    return e / e.sum(dim, keepdims=True)


def log_softmax(x: Tensor, dim: int = -1) -> Tensor:
    x = as_tensor(x)
    return x - logsumexp(x, dim, keepdims=True)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x @ weight.T + bias, with weight of shape (out_features, in_features)."""
    out = as_tensor(x) @ as_tensor(weight).T
    return out + bias if bias is not None else out


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> Tensor:
    out = bind("conv2d", as_tensor(x), as_tensor(weight), stride=_pair(stride), padding=_pair(padding),
               dilation=_pair(dilation), groups=groups)
    return out + as_tensor(bias).reshape(1, -1, 1, 1) if bias is not None else out


def max_pool2d(x: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0) -> Tensor:
    kernel = _pair(kernel_size)
    return bind("max_pool2d", as_tensor(x), kernel=kernel, stride=_pair(stride) if stride else kernel,
                padding=_pair(padding))


def avg_pool2d(x: Tensor, kernel_size: Any, stride: Any = None, padding: Any = 0,
               count_include_pad: bool = True) -> Tensor:
    kernel = _pair(kernel_size)
    return bind("avg_pool2d", as_tensor(x), kernel=kernel, stride=_pair(stride) if stride else kernel,
                padding=_pair(padding), count_include_pad=count_include_pad)


def dropout(x: Tensor, p: float = 0.5, training: bool = True) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p), while training."""
    if not 0 <= p < 1:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    if not training or p == 0:
        return x
    x = as_tensor(x)
    keep = bernoulli(1 - p, x.shape)
    return where(keep, x * (1.0 / (1 - p)), 0)


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def nll_loss(log_probs: Tensor, target: Any, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Negative log-likelihood of integer class targets, for log-probabilities (N, C).

    As PyTorch's: a target must lie in [0, C) (a negative one is not counted from the end) or
    equal `ignore_index`, else the call raises IndexOutOfRangeError naming the target, its
    position and this line, before any kernel reads through it. An ignored target adds no loss
    (0 with reduction='none') and no gradient; the mean is over the other targets, nan when
    every target is ignored."""
    target = as_tensor(target)
    if log_probs.ndim != 2 or target.shape != log_probs.shape[:1]:
        raise ShapeError(f"nll_loss: expects log-probabilities (N, C) and targets (N,), got "
                         f"{log_probs.shape} and {target.shape} (at {user_location()})")
    if target.dtype not in ("int32", "int64"):
        raise ShapeError(f"nll_loss: targets must be integer class indices, got {target.dtype} "
                         f"(at {user_location()})")
    column = target.reshape(-1, 1)
    kept = column != ignore_index
    picked = bind("take_along_axis", log_probs, where(kept, column, 0), axis=1, wrap_negative=False)
    losses = where(kept, -picked, 0).reshape(-1)
    if reduction == "mean":
        return losses.sum() / kept.astype(losses.dtype).sum()
    return _reduce(losses, reduction)


def cross_entropy(logits: Tensor, target: Any, reduction: str = "mean", ignore_index: int = -100) -> Tensor:
    """Softmax cross-entropy of logits (N, C): integer targets (N,) or probabilities (N, C).
    Integer targets follow nll_loss: in [0, C) or `ignore_index` (those rows add nothing)."""
    target = as_tensor(target)
    logp = log_softmax(logits, dim=1)
    if target.dtype in ("float32", "float64"):
        if target.shape != logits.shape:
            raise ShapeError(f"cross_entropy: probability targets must match logits {logits.shape}, "
                             f"got {target.shape} (at {user_location()})")
        return _reduce(-(target * logp).sum(1), reduction)
    return nll_loss(logp, target, reduction, ignore_index)


def mse_loss(input: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    return _reduce((input - as_tensor(target, like=input)).square(), reduction)


def l1_loss(input: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    return _reduce((input - as_tensor(target, like=input)).abs(), reduction)


def smooth_l1_loss(input: Tensor, target: Any, reduction: str = "mean", beta: float = 1.0) -> Tensor:
    """Huber loss (PyTorch's smooth_l1 with `beta`): quadratic near zero, linear beyond."""
    diff = (input - as_tensor(target, like=input)).abs()
    loss = where(diff < beta, diff.square() * (0.5 / beta), diff - 0.5 * beta)
    return _reduce(loss, reduction)


def binary_cross_entropy_with_logits(logits: Tensor, target: Any, reduction: str = "mean") -> Tensor:
    target = as_tensor(target, like=logits)
    # max(x, 0) - x*t + log(1 + exp(-|x|)): stable for large |x|.
    loss = relu(logits) - logits * target + bind("log1p", (-logits.abs()).exp())
    return _reduce(loss, reduction)
