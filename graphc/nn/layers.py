"""Feed-forward layers with PyTorch's names, shapes and default initialisations."""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import Any, Callable, Sequence

import numpy as np

from .. import init
from ..tensor import Tensor
from . import functional as F
from .module import Module, Parameter


def uniform(shape: Sequence[int], bound: float) -> Parameter:
    """U(-bound, bound) in float32 from graphc's seeded generator (PyTorch's default scheme)."""
    return Parameter(init.generator().uniform(-bound, bound, size=tuple(shape)).astype(np.float32))


class Identity(Module):
    """Returns its input. Takes and ignores any constructor arguments, as PyTorch's does (so a
    layer chosen by configuration can be swapped for it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def forward(self, x: Tensor) -> Tensor:
        return x


class Linear(Module):
    """y = x @ W.T + b, W of shape (out_features, in_features), U(±1/sqrt(in)) initialisation."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features) if in_features else 0.0
        self.weight = uniform((out_features, in_features), bound)
        if bias:
            self.bias = uniform((out_features,), bound)
        else:  # registered as absent: `layer.bias is None`, as in PyTorch
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    def __init__(self, in_channels: int, out_channels: int, kernel_size: Any, stride: Any = 1,
                 padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 padding_mode: str = "zeros") -> None:
        super().__init__()
        kh, kw = F.pair_argument(kernel_size, "Conv2d: kernel_size")
        self.stride = F.pair_argument(stride, "Conv2d: stride")
        self.dilation = F.pair_argument(dilation, "Conv2d: dilation")
        F.check_conv_arguments("Conv2d", (kh, kw), self.stride, self.dilation, groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: channels ({in_channels}, {out_channels}) must be divisible "
                             f"by groups={groups}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, (kh, kw)
        self.padding = (padding if isinstance(padding, str)
                        else F.pair_argument(padding, "Conv2d: padding"))
        F.conv_padding("Conv2d", self.padding, self.kernel_size, self.stride, self.dilation)  # checked now
        if padding_mode not in F.CONV_PADDING_MODES:
            raise ValueError(f"Conv2d: padding_mode must be one of {sorted(F.CONV_PADDING_MODES)}, "
                             f"got {padding_mode!r}")
        self.padding_mode = padding_mode
        self.groups = groups
        bound = 1 / math.sqrt(in_channels // groups * kh * kw)
        self.weight = uniform((out_channels, in_channels // groups, kh, kw), bound)
        if bias:
            self.bias = uniform((out_channels,), bound)
        else:  # registered as absent: `layer.bias is None`, as in PyTorch
            self.register_parameter("bias", None)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, self.bias, self.stride,
                        self.padding, self.dilation, self.groups, self.padding_mode)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


class MaxPool2d(Module):
    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1,
                 return_indices: bool = False, ceil_mode: bool = False) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.dilation, self.return_indices, self.ceil_mode = dilation, return_indices, ceil_mode

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation,
                            self.ceil_mode, self.return_indices)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class AvgPool2d(Module):
    def __init__(self, kernel_size: Any, stride: Any = None, padding: Any = 0,
                 ceil_mode: bool = False, count_include_pad: bool = True,
                 divisor_override: int | None = None) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.ceil_mode, self.count_include_pad = ceil_mode, count_include_pad
        self.divisor_override = divisor_override

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class Dropout2d(Module):
    """Zeroes whole channels while training (F.dropout2d)."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        F.check_dropout_probability(type(self).__name__, p)
        self.p, self.inplace = p, inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout2d(x, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class Dropout1d(Dropout2d):
    """Zeroes whole channels of (N, C, L) or (C, L) input while training (F.dropout1d)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout1d(x, self.p, self.training, self.inplace)


class Upsample(Module):
    """F.interpolate as a layer. `recompute_scale_factor`: the scale factor only sizes the
    output (floor(size * scale_factor)), which is then sampled as for that size, as PyTorch's."""

    def __init__(self, size: Any = None, scale_factor: Any = None, mode: str = "nearest",
                 align_corners: bool | None = None, recompute_scale_factor: bool | None = None) -> None:
        super().__init__()
        self.size, self.scale_factor, self.mode = size, scale_factor, mode
        self.align_corners, self.recompute_scale_factor = align_corners, recompute_scale_factor

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, self.size, self.scale_factor, self.mode, self.align_corners,
                             self.recompute_scale_factor)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale_factor={self.scale_factor}, mode={self.mode!r}"


class PixelShuffle(Module):
    """(*, C r^2, H, W) -> (*, C, H r, W r) (F.pixel_shuffle)."""

    def __init__(self, upscale_factor: int) -> None:
        super().__init__()
        self.upscale_factor = upscale_factor

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_shuffle(x, self.upscale_factor)

    def extra_repr(self) -> str:
        return f"upscale_factor={self.upscale_factor}"


class PixelUnshuffle(Module):
    """(*, C, H r, W r) -> (*, C r^2, H, W) (F.pixel_unshuffle)."""

    def __init__(self, downscale_factor: int) -> None:
        super().__init__()
        self.downscale_factor = downscale_factor

    def forward(self, x: Tensor) -> Tensor:
        return F.pixel_unshuffle(x, self.downscale_factor)

    def extra_repr(self) -> str:
        return f"downscale_factor={self.downscale_factor}"


class PReLU(Module):
    """x where positive, else a learned slope times x: one slope, or one per channel."""

    def __init__(self, num_parameters: int = 1, init: float = 0.25) -> None:
        super().__init__()
        self.num_parameters = num_parameters
        self.weight = Parameter(np.full(num_parameters, init, dtype=np.float32))

    def forward(self, x: Tensor) -> Tensor:
        return F.prelu(x, self.weight)


class Hardtanh(Module):
    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> None:
        super().__init__()
        self.min_val, self.max_val, self.inplace = min_val, max_val, inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.hardtanh(x, self.min_val, self.max_val, self.inplace)


class ReLU6(Hardtanh):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__(0.0, 6.0, inplace)


class Dropout(Module):
    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        F.check_dropout_probability("Dropout", p)
        self.p, self.inplace = p, inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"


class AlphaDropout(Dropout):
    """PyTorch's: F.alpha_dropout while training (for SELU networks), the identity in eval."""

    def forward(self, x: Tensor) -> Tensor:
        return F.alpha_dropout(x, self.p, self.training, self.inplace)


class Flatten(Module):
    def __init__(self, start_dim: int = 1, end_dim: int = -1) -> None:
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(self.start_dim, self.end_dim)


class ReLU(Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(x, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.sigmoid(x)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.tanh(x)


class GELU(Module):
    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class SiLU(Module):
    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.silu(x, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class LeakyReLU(Module):
    def __init__(self, negative_slope: float = 0.01, inplace: bool = False) -> None:
        super().__init__()
        self.negative_slope, self.inplace = negative_slope, inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.negative_slope, self.inplace)

    def extra_repr(self) -> str:
        return f"negative_slope={self.negative_slope}"


class ELU(Module):
    def __init__(self, alpha: float = 1.0, inplace: bool = False) -> None:
        super().__init__()
        self.alpha, self.inplace = alpha, inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.elu(x, self.alpha, self.inplace)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class Softplus(Module):
    def __init__(self, beta: float = 1.0, threshold: float = 20.0) -> None:
        super().__init__()
        self.beta, self.threshold = beta, threshold

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(x, self.beta, self.threshold)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, threshold={self.threshold}"


class Softmax(Module):
    """PyTorch's nn.Softmax; without `dim`, PyTorch's implicit one (F.implicit_softmax_dim)."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.softmax(x, self.dim)


class LogSoftmax(Module):
    """PyTorch's nn.LogSoftmax; without `dim`, PyTorch's implicit one (F.implicit_softmax_dim)."""

    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(x, self.dim)


class _Activation(Module):
    """An activation without settings: `function` (a graphc.nn.functional function) of x."""

    function: Callable[[Tensor], Tensor]

    def forward(self, x: Tensor) -> Tensor:
        return type(self).function(x)


class LogSigmoid(_Activation):
    function = staticmethod(F.logsigmoid)


class Softsign(_Activation):
    function = staticmethod(F.softsign)


class Tanhshrink(_Activation):
    function = staticmethod(F.tanhshrink)


class _InPlaceActivation(Module):
    """An activation whose only setting is PyTorch's `inplace`."""

    function: Callable[[Tensor, bool], Tensor]

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: Tensor) -> Tensor:
        return type(self).function(x, self.inplace)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class Hardsigmoid(_InPlaceActivation):
    function = staticmethod(F.hardsigmoid)


class Hardswish(_InPlaceActivation):
    function = staticmethod(F.hardswish)


class Mish(_InPlaceActivation):
    function = staticmethod(F.mish)


class SELU(_InPlaceActivation):
    function = staticmethod(F.selu)


class CELU(Module):
    def __init__(self, alpha: float = 1.0, inplace: bool = False) -> None:
        super().__init__()
        self.alpha, self.inplace = alpha, inplace

    def forward(self, x: Tensor) -> Tensor:
        return F.celu(x, self.alpha, self.inplace)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class GLU(Module):
    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.glu(x, self.dim)


class Softmin(Module):
    def __init__(self, dim: int | None = None) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return F.softmin(x, self.dim)


class CosineSimilarity(Module):
    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return F.cosine_similarity(x1, x2, self.dim, self.eps)


class PairwiseDistance(Module):
    def __init__(self, p: float = 2.0, eps: float = 1e-6, keepdim: bool = False) -> None:
        super().__init__()
        self.norm, self.eps, self.keepdim = p, eps, keepdim

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return F.pairwise_distance(x1, x2, self.norm, self.eps, self.keepdim)


class Unflatten(Module):
    """The axis `dim` split into `unflattened_size` (the inverse of Flatten)."""

    def __init__(self, dim: int, unflattened_size: Sequence[int]) -> None:
        super().__init__()
        self.dim, self.unflattened_size = dim, tuple(unflattened_size)

    def forward(self, x: Tensor) -> Tensor:
        return x.unflatten(self.dim, self.unflattened_size)


def _layer(name: str, layer: Any) -> Module:
    if not isinstance(layer, Module):  # a plain function would be a skipped attribute
        raise TypeError(f"Sequential: layer {name} is a {type(layer).__name__}, not a "
                        "Module (wrap a function in a Module, e.g. nn.ReLU() for F.relu)")
    return layer


class Sequential(Module):
    """Its layers in order, each called on the last one's output; given as modules (named 0,
    1, ...) or as one OrderedDict of names to modules, as PyTorch's. Like PyTorch's, it is
    edited as a list (append, extend, insert, pop, item assignment and deletion); a deletion
    renames the layers after it to their new positions."""

    def __init__(self, *layers: Module | OrderedDict[str, Module]) -> None:
        super().__init__()
        named = (list(layers[0].items()) if len(layers) == 1 and isinstance(layers[0], OrderedDict)
                 else [(str(i), layer) for i, layer in enumerate(layers)])
        for name, layer in named:
            self.register_module(name, _layer(name, layer))

    def _position(self, index: int) -> int:
        if isinstance(index, bool) or not hasattr(index, "__index__"):
            raise TypeError(f"Sequential indices are ints or slices, not {type(index).__name__}")
        index = operator.index(index)  # NumPy's integers too, as PyTorch takes them
        if not -len(self) <= index < len(self):
            raise IndexError(f"Sequential index {index} is out of range for {len(self)} layers")
        return index % len(self)

    def __getitem__(self, index: int | slice) -> Module:
        """The layer at `index`; a slice gives a Sequential of those layers, under their names."""
        if not isinstance(index, slice):
            return list(self._modules.values())[self._position(index)]
        part = Sequential()
        for name in list(self._modules)[index]:
            setattr(part, name, self._modules[name])
        return part

    def __setitem__(self, index: int, layer: Module) -> None:
        name = list(self._modules)[self._position(index)]
        self._modules[name] = _layer(name, layer)

    def __delitem__(self, index: int | slice) -> None:
        layers = list(self._modules.values())
        del layers[index if isinstance(index, slice) else self._position(index)]
        self._modules.clear()
        self._modules.update((str(i), layer) for i, layer in enumerate(layers))

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Any:
        return iter(list(self._modules.values()))

    def __add__(self, other: Sequential) -> Sequential:
        """A new Sequential of this one's layers, then other's (the modules themselves)."""
        if not isinstance(other, Sequential):
            return NotImplemented
        return Sequential(*self, *other)

    def append(self, layer: Module) -> Sequential:
        name = str(len(self))
        if name in self._modules:  # an OrderedDict's own name "2" at position 0, say
            raise KeyError(f"Sequential.append: a layer named {name!r} exists already")
        self.register_module(name, _layer(name, layer))
        return self

    def extend(self, layers: Any) -> Sequential:
        for layer in layers:
            self.append(layer)
        return self

    def insert(self, index: int, layer: Module) -> Sequential:
        """`layer` at position `index` (-len to len); the layers from there on are renamed to
        their new positions."""
        if not isinstance(index, int) or not -len(self) <= index <= len(self):
            raise IndexError(f"Sequential.insert: index {index} is out of range for {len(self)} layers")
        layers = list(self._modules.values())
        layers.insert(index, _layer(str(index), layer))
        self._modules.clear()
        self._modules.update((str(i), m) for i, m in enumerate(layers))
        return self

    def pop(self, index: int | slice = -1) -> Module:
        """The layer at `index` (the last by default), removed as `del seq[index]` removes it."""
        layer = self[index]
        del self[index]
        return layer

    def forward(self, x: Any) -> Any:
        for layer in self._modules.values():
            x = layer(x)
        return x
