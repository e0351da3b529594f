"""Normalisation layers with PyTorch's names, state-dict keys and semantics.

Batch norm normalises each channel with the batch's mean and biased variance while training and
folds them into running statistics (the variance unbiased, as PyTorch does); in eval mode it
normalises with the running statistics. Layer norm normalises each sample over its trailing
`normalized_shape` dimensions.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np

from graphc.ir.errors import ShapeError, user_location

from ..functions import rsqrt, stop_gradient
from ..tensor import Tensor, as_tensor, bind
from .module import Module, Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d", "LayerNorm",
           "RMSNorm", "batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]


def _channel_shaped(v: Tensor, ndim: int) -> Tensor:
    """A per-channel vector (C,) reshaped to broadcast against an (N, C, ...) tensor."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _normalize(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    return (x - mean) * rsqrt(var + eps)


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None, training: bool = False,
               eps: float = 1e-5) -> Tensor:
    """Normalise each channel (axis 1) of x: with the batch's statistics when `training` (or
    when there are no running statistics), otherwise with `running_mean`/`running_var`."""
    if training or running_mean is None or running_var is None:
        # one kernel each way (ir/ops/norm.py); the affine part fuses into its epilogue
        out = bind("normalize", x, axes=_batch_axes(x), epsilon=eps)
    else:
        mean, var = _channel_shaped(running_mean, x.ndim), _channel_shaped(running_var, x.ndim)
        out = _normalize(x, mean, var, eps)
    return _channel_affine(out, weight, bias)


def _channel_affine(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    if weight is not None:
        x = x * _channel_shaped(weight, x.ndim)
    if bias is not None:
        x = x + _channel_shaped(bias, x.ndim)
    return x


def _batch_axes(x: Tensor) -> tuple[int, ...]:
    """Every axis but the channels' (1)."""
    return (0,) + tuple(range(2, x.ndim))


def _batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance, (C,) each, from one `moments` op (one pass over x)."""
    stats = bind("moments", x, axes=_batch_axes(x))
    return stats[0].reshape(-1), stats[1].reshape(-1)


def _register_norm_state(module: Module, num_features: int, affine: bool,
                         track_running_stats: bool) -> None:
    """A norm layer's weight and bias (ones and zeros) and running statistics, under PyTorch's
    names; what a setting leaves out is registered as absent (None), as in PyTorch."""
    if affine:
        module.weight = Parameter(np.ones(num_features, dtype=np.float32))
        module.bias = Parameter(np.zeros(num_features, dtype=np.float32))
    else:
        module.register_parameter("weight", None)
        module.register_parameter("bias", None)
    if track_running_stats:
        module.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        module.register_buffer("running_var", np.ones(num_features, dtype=np.float32))
        module.register_buffer("num_batches_tracked", np.zeros((), dtype=np.int64))
    else:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            module.register_buffer(name, None)


class _BatchNorm(Module):
    """Shared by BatchNorm1d/2d, which differ only in the input ranks they accept."""

    ranks: tuple[int, ...] = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        _register_norm_state(self, num_features, affine, track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        x = as_tensor(x)
        self._check_input(x)
        weight, bias = self.weight, self.bias  # None where registered absent
        # in eval mode, the running statistics wherever they exist, as PyTorch decides (turning
        # track_running_stats off afterwards leaves them in use)
        if not self.training and self.running_mean is not None and self.running_var is not None:
            return batch_norm(x, self.running_mean, self.running_var, weight, bias, False, self.eps)
        # normalised with the batch's own statistics, which one value per channel has not
        count = x.numel() // x.shape[1]
        if count == 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 value per channel "
                             f"when training, got input of shape {x.shape} (at {user_location()})")
        if self.training and self.track_running_stats:
            self._update_running_stats(x, count)
        if count == 0:  # an empty batch, as PyTorch: an empty result, the statistics kept
            return _channel_affine(x, weight, bias)
        return batch_norm(x, None, None, weight, bias, True, self.eps)

    def _update_running_stats(self, x: Tensor, count: int) -> None:
        """running = (1 - m) * running + m * batch statistic, with the unbiased batch variance;
        m is `momentum`, or 1/num_batches_tracked (a cumulative average) when momentum is None."""
        batches = as_tensor(self.num_batches_tracked) + 1
        self.update_buffer("num_batches_tracked", batches)
        if count == 0:  # counted, as by PyTorch, but no statistics to fold in
            return
        # Running stats take no gradient.
        mean, var = (stop_gradient(m) for m in _batch_moments(x))
        if self.momentum is None:
            factor = 1.0 / batches.astype(x.dtype)
        else:
            factor = self.momentum
        unbiased_var = var * (count / (count - 1))
        for name, batch_value in (("running_mean", mean), ("running_var", unbiased_var)):
            running = getattr(self, name)
            self.update_buffer(name, running + (batch_value - running) * factor)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim not in self.ranks or x.shape[1] != self.num_features:
            expected = " or ".join(f"rank-{r}" for r in self.ranks)
            raise ShapeError(f"{type(self).__name__}({self.num_features}): expects a {expected} "
                             f"input with {self.num_features} channels on axis 1, got shape "
                             f"{x.shape} (at {user_location()})")

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class BatchNorm1d(_BatchNorm):
    """Batch norm over (N, C) or (N, C, L) inputs."""

    ranks = (2, 3)


class BatchNorm2d(_BatchNorm):
    """Batch norm over (N, C, H, W) inputs."""

    ranks = (4,)


def _normalized_shape(value: int | Sequence[int]) -> tuple[int, ...]:
    """LayerNorm's trailing shape: one size (any integer type, as PyTorch's) or several."""
    if isinstance(value, (int, np.integer)):
        return (int(value),)
    return tuple(int(size) for size in value)


def _trailing_shape(op: str, x: Tensor, normalized_shape: int | Sequence[int],
                    **affine: Tensor | None) -> tuple[int, ...]:
    """`normalized_shape` checked against x's trailing dimensions and the affine parameters."""
    shape = _normalized_shape(normalized_shape)
    if not shape or x.shape[x.ndim - len(shape):] != shape:
        raise ShapeError(f"{op}: normalized_shape {shape} must be the trailing dimensions "
                         f"of the input, got shape {x.shape} (at {user_location()})")
    for name, value in affine.items():
        if value is not None and as_tensor(value).shape != shape:
            raise ShapeError(f"{op}: {name} must have the shape of normalized_shape {shape}, "
                             f"got {as_tensor(value).shape} (at {user_location()})")
    return shape


def layer_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5) -> Tensor:
    """Normalise over the trailing dimensions `normalized_shape` (biased variance)."""
    x = as_tensor(x)
    shape = _trailing_shape("layer_norm", x, normalized_shape, weight=weight, bias=bias)
    # one kernel each way (ir/ops/norm.py); the affine part fuses into its epilogue
    out = bind("normalize", x, axes=tuple(range(x.ndim - len(shape), x.ndim)), epsilon=eps)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


class LayerNorm(Module):
    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True) -> None:
        super().__init__()
        shape = _normalized_shape(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.elementwise_affine = elementwise_affine
        # what a setting leaves out is registered as absent (None), as in PyTorch
        if elementwise_affine:
            self.weight = Parameter(np.ones(shape, dtype=np.float32))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = Parameter(np.zeros(shape, dtype=np.float32))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}")


def rms_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """x / sqrt(mean(x^2) + eps) over the trailing dimensions `normalized_shape`, then scaled
    by `weight`; eps by default the machine epsilon of x's dtype, as PyTorch's."""
    x = as_tensor(x)
    shape = _trailing_shape("rms_norm", x, normalized_shape, weight=weight)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    epsilon = float(np.finfo(x.dtype).eps) if eps is None else eps
    out = x * ((x * x).mean(axes, keepdims=True) + epsilon).rsqrt()
    return out * weight if weight is not None else out


class RMSNorm(LayerNorm):
    """Root-mean-square normalisation over the trailing `normalized_shape` (no centring, no
    bias), as PyTorch's nn.RMSNorm (LLaMA's); eps by default the input dtype's epsilon."""

    def __init__(self, normalized_shape: int | Sequence[int], eps: float | None = None,
                 elementwise_affine: bool = True) -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)


def group_norm(x: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """Normalise each sample's channels in `num_groups` groups, each over its channels and
    positions (biased variance), then scale and shift per channel: x is (N, C, *)."""
    x = as_tensor(x)
    if x.ndim < 2 or x.shape[1] % num_groups:
        raise ShapeError(f"group_norm: expects (N, C, ...) input with C divisible by num_groups="
                         f"{num_groups}, got shape {x.shape} (at {user_location()})")
    if x.numel() == 0:  # an empty batch (or empty groups): an empty result, as PyTorch's
        out = x
    else:
        grouped = x.reshape(x.shape[0], num_groups, -1)
        out = bind("normalize", grouped, axes=(2,), epsilon=eps).reshape(*x.shape)
    per_channel = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    for name, value in (("weight", weight), ("bias", bias)):
        if value is not None and as_tensor(value).shape != (x.shape[1],):
            raise ShapeError(f"group_norm: {name} must have shape ({x.shape[1]},), one per "
                             f"channel, got {as_tensor(value).shape} (at {user_location()})")
    if weight is not None:
        out = out * as_tensor(weight).reshape(*per_channel)
    if bias is not None:
        out = out + as_tensor(bias).reshape(*per_channel)
    return out


class GroupNorm(Module):
    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        if affine:
            self.weight = Parameter(np.ones(num_channels, dtype=np.float32))
            self.bias = Parameter(np.zeros(num_channels, dtype=np.float32))
        else:  # registered as absent (None), as in PyTorch
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        x = as_tensor(x)
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ShapeError(f"GroupNorm({self.num_groups}, {self.num_channels}): expects (N, "
                             f"{self.num_channels}, ...) input, got shape {x.shape} (at {user_location()})")
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"


def instance_norm(x: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """Normalise each sample's channels one by one over their positions (biased variance): x is
    (N, C, *). Without `use_input_stats`, with the running statistics instead. PyTorch's
    functional form also updates running statistics passed with `use_input_stats`; a graphc
    tensor passed in cannot be written back, so that is refused: nn.InstanceNorm1d/2d with
    track_running_stats=True keep them (`momentum`, which would weigh that update, is taken for
    PyTorch's signature and has nothing to weigh here)."""
    x = as_tensor(x)
    if x.ndim < 3:
        raise ShapeError(f"instance_norm: expects (N, C, ...) input with positions to normalise "
                         f"over, got shape {x.shape} (at {user_location()})")
    channels = x.shape[1]
    for name, value in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                        ("running_var", running_var)):
        if value is not None and as_tensor(value).shape != (channels,):
            raise ShapeError(f"instance_norm: {name} must have shape ({channels},), one per "
                             f"channel, got {as_tensor(value).shape} (at {user_location()})")
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError(f"instance_norm: use_input_stats=False needs running_mean and "
                             f"running_var (at {user_location()})")
        out = _normalize(x, _channel_shaped(as_tensor(running_mean), x.ndim),
                         _channel_shaped(as_tensor(running_var), x.ndim), eps)
        return _channel_affine(out, weight, bias)
    if running_mean is not None or running_var is not None:
        raise ValueError(f"instance_norm: running statistics are updated in place by PyTorch's "
                         f"functional form, which a traced graphc tensor cannot be; use "
                         f"nn.InstanceNorm1d/2d(track_running_stats=True), or pass "
                         f"use_input_stats=False to normalise with them (at {user_location()})")
    if int(np.prod(x.shape[2:])) == 1:
        raise ValueError(f"instance_norm: expected more than 1 position per channel when "
                         f"normalising with the input's statistics, got input of shape {x.shape} "
                         f"(at {user_location()})")
    if x.numel() == 0:  # an empty batch: an empty result, as PyTorch's
        return _channel_affine(x, weight, bias)
    out = bind("normalize", x, axes=tuple(range(2, x.ndim)), epsilon=eps)
    return _channel_affine(out, weight, bias)


class _InstanceNorm(Module):
    """Shared by InstanceNorm1d/2d, which differ only in their ranks: (N, C, L) or (C, L), and
    (N, C, H, W) or (C, H, W). Defaults as PyTorch's: no affine parameters, no running
    statistics. With track_running_stats, training folds the batch's mean over samples of each
    sample's statistics (the variance unbiased) into them with `momentum` (None: never, as
    PyTorch), and eval mode normalises with them."""

    spatial_axes = 0

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = False, track_running_stats: bool = False) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        # (num_batches_tracked only for PyTorch's state-dict keys: nothing counts it)
        _register_norm_state(self, num_features, affine, track_running_stats)

    def forward(self, x: Tensor) -> Tensor:
        x = as_tensor(x)
        rank = self.spatial_axes + 2
        if x.ndim not in (rank - 1, rank):
            raise ShapeError(f"{type(self).__name__}: expects a rank-{rank - 1} or rank-{rank} "
                             f"input, got shape {x.shape} (at {user_location()})")
        if x.ndim == rank - 1:  # one unbatched sample
            return self.forward(x.unsqueeze(0)).squeeze(0)
        uses_running = self.running_mean is not None and self.running_var is not None
        if x.shape[1] != self.num_features:
            if self.affine or uses_running:
                raise ShapeError(f"{type(self).__name__}({self.num_features}): expects "
                                 f"{self.num_features} channels on axis 1, got shape {x.shape} "
                                 f"(at {user_location()})")
            warnings.warn(f"{type(self).__name__}({self.num_features}): input of shape {x.shape} "
                          f"has {x.shape[1]} channels; num_features is unused without affine "
                          f"parameters or running statistics (as PyTorch warns)", stacklevel=2)
        if not self.training and self.track_running_stats and uses_running:
            return instance_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                 use_input_stats=False, eps=self.eps)
        positions = int(np.prod(x.shape[2:]))
        if positions == 1:
            raise ValueError(f"{type(self).__name__}: expected more than 1 position per channel "
                             f"when normalising with the input's statistics, got input of shape "
                             f"{x.shape} (at {user_location()})")
        if self.training and self.track_running_stats and uses_running and x.shape[0] \
                and self.momentum is not None:
            self._update_running_stats(x, positions)
        return instance_norm(x, None, None, self.weight, self.bias, eps=self.eps)

    def _update_running_stats(self, x: Tensor, positions: int) -> None:
        stats = bind("moments", x, axes=tuple(range(2, x.ndim)))
        mean = stop_gradient(stats[0]).reshape(x.shape[0], -1).mean(0)
        unbiased_var = stop_gradient(stats[1]).reshape(x.shape[0], -1).mean(0) * (
            positions / (positions - 1))
        for name, batch_value in (("running_mean", mean), ("running_var", unbiased_var)):
            running = getattr(self, name)
            self.update_buffer(name, running + (batch_value - running) * self.momentum)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}")


class InstanceNorm1d(_InstanceNorm):
    spatial_axes = 1


class InstanceNorm2d(_InstanceNorm):
    spatial_axes = 2
