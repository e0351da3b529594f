"""`Conv1d`: a 1-D convolution over (N, C, L) (F.conv1d computes it as a 2-D one over
(N, C, 1, L)); `ConvTranspose2d`: the gradient of a 2-D convolution with respect to its input,
as a layer (a decoder's learned upsampling), and `ConvTranspose1d` the same over (N, C, L)."""
from __future__ import annotations

import math
from typing import Any

from ..tensor import Tensor
from . import functional as F
from .layers import uniform
from .module import Module

__all__ = ["Conv1d", "ConvTranspose1d", "ConvTranspose2d"]


def _one(v: Any, name: str = "size") -> tuple[int]:
    """PyTorch's 1-tuple form of a size (an int or a 1-tuple)."""
    return F.size_argument(v, 1, f"Conv1d: {name}")  # type: ignore[return-value]


def _output_padding(layer: Module, shape: tuple[int, ...], size: list[int]) -> tuple[int, ...]:
    """The output_padding that makes a transposed convolution of input `shape` give the spatial
    `size` (its last axes), as PyTorch's `output_size` picks it; a size out of reach refused."""
    spatial = len(size)
    padding = []
    for axis, wanted in enumerate(size):
        stride, dilation = layer.stride[axis], layer.dilation[axis]
        smallest = ((shape[axis - spatial] - 1) * stride - 2 * layer.padding[axis]
                    + dilation * (layer.kernel_size[axis] - 1) + 1)
        extra = wanted - smallest
        if not 0 <= extra < max(stride, dilation):
            raise ValueError(f"{type(layer).__name__}: output_size {tuple(size)} is not reachable "
                             f"from input {shape}: axis {axis} takes sizes {smallest} to "
                             f"{smallest + max(stride, dilation) - 1}")
        padding.append(extra)
    return tuple(padding)


def _zeros_padding_only(layer: str, padding_mode: str) -> str:
    if padding_mode != "zeros":  # as PyTorch's, which takes only this one
        raise ValueError(f"{layer}: only padding_mode='zeros' is supported, got {padding_mode!r}")
    return padding_mode


class Conv1d(Module):
    """weight (out_channels, in_channels/groups, kernel_size), bias (out_channels,), both
    U(±1/sqrt(in_channels/groups * kernel_size)) as PyTorch's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        (kernel,) = _one(kernel_size, "kernel_size")
        F.check_conv_arguments("Conv1d", (kernel,), _one(stride, "stride"), _one(dilation, "dilation"),
                               groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv1d: channels ({in_channels}, {out_channels}) must be divisible "
                             f"by groups={groups}")
        if padding_mode not in F.CONV_PADDING_MODES:
            raise ValueError(f"Conv1d: padding_mode must be one of {sorted(F.CONV_PADDING_MODES)}, "
                             f"got {padding_mode!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kernel,)
        self.stride, self.dilation = _one(stride, "stride"), _one(dilation, "dilation")
        self.padding = padding if isinstance(padding, str) else _one(padding, "padding")
        F.conv_padding("Conv1d", self.padding, self.kernel_size, self.stride, self.dilation)  # checked now
        self.padding_mode = padding_mode
        self.groups = groups
        bound = 1 / math.sqrt(in_channels // groups * kernel)
        self.weight = uniform((out_channels, in_channels // groups, kernel), bound)
        if bias:
            self.bias = uniform((out_channels,), bound)
        else:  # registered as absent: `layer.bias is None`, as in PyTorch
            self.register_parameter("bias", None)

    def forward(self, x: Any) -> Tensor:
        return F.conv1d(x, self.weight, self.bias, self.stride,
                        self.padding if isinstance(self.padding, (str, int)) else self.padding[0],
                        self.dilation, self.groups, self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class ConvTranspose2d(Module):
    """weight (in_channels, out_channels/groups, kH, kW), bias (out_channels,), both
    U(±1/sqrt(out_channels/groups * kH * kW)) as PyTorch's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, groups: int = 1, bias: bool = True,
                 dilation: Any = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.padding_mode = _zeros_padding_only("ConvTranspose2d", padding_mode)
        kh, kw = F.pair_argument(kernel_size, "ConvTranspose2d: kernel_size")
        self.stride, self.padding, self.dilation, self.output_padding = (
            F.pair_argument(v, f"ConvTranspose2d: {name}") for v, name in (
                (stride, "stride"), (padding, "padding"), (dilation, "dilation"),
                (output_padding, "output_padding")))
        F.check_conv_arguments("ConvTranspose2d", (kh, kw), self.stride, self.dilation, groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ConvTranspose2d: channels ({in_channels}, {out_channels}) must be "
                             f"divisible by groups={groups}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.groups = groups
        bound = 1 / math.sqrt(out_channels // groups * kh * kw)
        self.weight = uniform((in_channels, out_channels // groups, kh, kw), bound)
        if bias:
            self.bias = uniform((out_channels,), bound)
        else:  # registered as absent: `layer.bias is None`, as in PyTorch
            self.register_parameter("bias", None)

    def forward(self, x: Any, output_size: Any = None) -> Tensor:
        """`output_size` ((H, W), optionally after batch and channels) picks the output_padding
        that gives that size, as PyTorch's (a U-Net matching its skip connection's size)."""
        output_padding = self.output_padding
        if output_size is not None:
            output_padding = self._output_padding_for(F.as_tensor(x).shape, output_size)
        return F.conv_transpose2d(x, self.weight, self.bias, self.stride,
                                  self.padding, output_padding, self.groups, self.dilation)

    def _output_padding_for(self, shape: tuple[int, ...], output_size: Any) -> tuple[int, ...]:
        size = [int(s) for s in output_size][-2:]
        if len(size) != 2:
            raise ValueError(f"ConvTranspose2d: output_size must end with (H, W), got {output_size!r}")
        return _output_padding(self, shape, size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class ConvTranspose1d(Module):
    """weight (in_channels, out_channels/groups, kernel_size), bias (out_channels,), both
    U(±1/sqrt(out_channels/groups * kernel_size)) as PyTorch's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, output_padding: Any = 0, groups: int = 1, bias: bool = True,
                 dilation: Any = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        self.padding_mode = _zeros_padding_only("ConvTranspose1d", padding_mode)
        (kernel,) = _one(kernel_size, "kernel_size")
        self.stride, self.padding, self.output_padding, self.dilation = (
            F.size_argument(v, 1, f"ConvTranspose1d: {name}") for v, name in (
                (stride, "stride"), (padding, "padding"), (output_padding, "output_padding"),
                (dilation, "dilation")))
        F.check_conv_arguments("ConvTranspose1d", (kernel,), self.stride, self.dilation, groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"ConvTranspose1d: channels ({in_channels}, {out_channels}) must be "
                             f"divisible by groups={groups}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kernel,)
        self.groups = groups
        bound = 1 / math.sqrt(out_channels // groups * kernel)
        self.weight = uniform((in_channels, out_channels // groups, kernel), bound)
        if bias:
            self.bias = uniform((out_channels,), bound)
        else:  # registered as absent: `layer.bias is None`, as in PyTorch
            self.register_parameter("bias", None)

    def forward(self, x: Any, output_size: Any = None) -> Tensor:
        """`output_size` (L, optionally after batch and channels) picks the output_padding that
        gives that length, as PyTorch's."""
        output_padding = self.output_padding
        if output_size is not None:
            output_padding = self._output_padding_for(F.as_tensor(x).shape, output_size)
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding,
                                  output_padding, self.groups, self.dilation)

    def _output_padding_for(self, shape: tuple[int, ...], output_size: Any) -> tuple[int, ...]:
        size = ([int(s) for s in output_size][-1:] if isinstance(output_size, (tuple, list))
                else [int(output_size)])
        return _output_padding(self, shape, size)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")
