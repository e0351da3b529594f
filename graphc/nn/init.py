"""torch.nn.init's initialisers: in place on a module's arrays, outside a trace.

Each one overwrites the array it is given (a parameter or buffer as the module holds it, or an
nn.Parameter before it is assigned) and returns it, drawing from graphc's seeded host generator
(graphc.init, reseeded by gc.manual_seed) unless given another. Compiled steps read the
module's own arrays at every call, so they see the new values without recompiling. Formulas and
fan computations are PyTorch's; the draws are NumPy's, so the values differ from PyTorch's for
one seed while the distributions are the same.
"""
from __future__ import annotations

import math
from typing import TypeVar

import numpy as np

from graphc.ir.errors import GraphcError, InputError, user_location

from .. import init as host_init
from ..tensor import Tensor
from .module import Parameter

Initialised = TypeVar("Initialised", np.ndarray, Parameter)

_LINEAR_GAINS = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d",
                 "conv_transpose3d", "sigmoid")


def calculate_gain(nonlinearity: str, param: float | None = None) -> float:
    """The recommended scale for a nonlinearity's weights, PyTorch's table."""
    if nonlinearity in _LINEAR_GAINS:
        return 1.0
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise InputError(f"calculate_gain('leaky_relu'): the negative slope must be a "
                             f"number, got {param!r}")
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise InputError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r} (one of "
                     f"{', '.join(_LINEAR_GAINS)}, tanh, relu, leaky_relu, selu)")


def calculate_fan_in_and_fan_out(tensor: np.ndarray | Parameter) -> tuple[int, int]:
    """(fan_in, fan_out) as PyTorch computes them: a weight is (out, in, *kernel), each fan
    multiplied by the kernel's size; at least 2 dimensions."""
    shape = _array(tensor, "calculate_fan_in_and_fan_out").shape
    if len(shape) < 2:
        raise GraphcError(f"nn.init: fan in and fan out need an array of at least 2 dimensions, "
                          f"got shape {shape} (at {user_location()})")
    receptive_field = math.prod(shape[2:])
    return shape[1] * receptive_field, shape[0] * receptive_field


_calculate_fan_in_and_fan_out = calculate_fan_in_and_fan_out  # the name PyTorch code calls


def uniform_(tensor: Initialised, a: float = 0.0, b: float = 1.0,
             generator: np.random.Generator | None = None) -> Initialised:
    """U(a, b)."""
    array = _array(tensor, "uniform_")
    array[...] = _generator(generator).uniform(a, b, size=array.shape)
    return tensor


def normal_(tensor: Initialised, mean: float = 0.0, std: float = 1.0,
            generator: np.random.Generator | None = None) -> Initialised:
    """N(mean, std²)."""
    array = _array(tensor, "normal_")
    array[...] = _generator(generator).normal(mean, std, size=array.shape)
    return tensor


def trunc_normal_(tensor: Initialised, mean: float = 0.0, std: float = 1.0, a: float = -2.0,
                  b: float = 2.0, generator: np.random.Generator | None = None) -> Initialised:
    """N(mean, std²) restricted to [a, b] (absolute bounds, as PyTorch's), drawn by inverting
    the normal CDF over the bounds' range, so it never loops however narrow they are."""
    array = _array(tensor, "trunc_normal_")
    if not a < b:
        raise InputError(f"nn.init.trunc_normal_: needs a < b, got a={a}, b={b}")
    from scipy import special  # here, not at import: it costs every `import graphc` 0.16 s
    low, high = special.ndtr((a - mean) / std), special.ndtr((b - mean) / std)
    unit = special.ndtri(_generator(generator).uniform(low, high, size=array.shape))
    array[...] = np.clip(mean + std * unit, a, b)
    return tensor


def constant_(tensor: Initialised, val: float) -> Initialised:
    _array(tensor, "constant_")[...] = val
    return tensor


def zeros_(tensor: Initialised) -> Initialised:
    return constant_(tensor, 0.0)


def ones_(tensor: Initialised) -> Initialised:
    return constant_(tensor, 1.0)


def xavier_uniform_(tensor: Initialised, gain: float = 1.0,
                    generator: np.random.Generator | None = None) -> Initialised:
    """Glorot: U(-bound, bound) with bound = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    bound = math.sqrt(3.0) * gain * math.sqrt(2.0 / (fan_in + fan_out))
    return uniform_(tensor, -bound, bound, generator)


def xavier_normal_(tensor: Initialised, gain: float = 1.0,
                   generator: np.random.Generator | None = None) -> Initialised:
    """Glorot: N(0, std²) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    return normal_(tensor, 0.0, gain * math.sqrt(2.0 / (fan_in + fan_out)), generator)


def kaiming_uniform_(tensor: Initialised, a: float = 0.0, mode: str = "fan_in",
                     nonlinearity: str = "leaky_relu",
                     generator: np.random.Generator | None = None) -> Initialised:
    """He: U(-bound, bound) with bound = gain * sqrt(3 / fan), fan by `mode`, gain from
    `nonlinearity` (and `a`, leaky_relu's negative slope)."""
    std = _kaiming_std(tensor, a, mode, nonlinearity)
    return uniform_(tensor, -math.sqrt(3.0) * std, math.sqrt(3.0) * std, generator)


def kaiming_normal_(tensor: Initialised, a: float = 0.0, mode: str = "fan_in",
                    nonlinearity: str = "leaky_relu",
                    generator: np.random.Generator | None = None) -> Initialised:
    """He: N(0, std²) with std = gain / sqrt(fan) (see kaiming_uniform_)."""
    return normal_(tensor, 0.0, _kaiming_std(tensor, a, mode, nonlinearity), generator)


def orthogonal_(tensor: Initialised, gain: float = 1.0,
                generator: np.random.Generator | None = None) -> Initialised:
    """A (semi-)orthogonal matrix times `gain`, the array seen as (shape[0], the rest), from
    the QR decomposition of a normal matrix with the signs fixed by R's diagonal (PyTorch's)."""
    array = _array(tensor, "orthogonal_")
    if array.ndim < 2:
        raise GraphcError(f"nn.init.orthogonal_: needs at least 2 dimensions, got shape "
                          f"{array.shape} (at {user_location()})")
    if array.size == 0:  # nothing to draw (PyTorch's no-op)
        return tensor
    rows = array.shape[0]
    cols = array.size // rows
    flat = _generator(generator).standard_normal((rows, cols))
    if rows < cols:
        flat = flat.T
    q, r = np.linalg.qr(flat)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    array[...] = gain * q.reshape(array.shape)
    return tensor


def _kaiming_std(tensor: np.ndarray | Parameter, a: float, mode: str, nonlinearity: str) -> float:
    if mode not in ("fan_in", "fan_out"):
        raise InputError(f"nn.init.kaiming: mode must be 'fan_in' or 'fan_out', got {mode!r}")
    fan_in, fan_out = calculate_fan_in_and_fan_out(tensor)
    fan = fan_in if mode == "fan_in" else fan_out
    if fan == 0:  # an array without elements: nothing to draw (PyTorch's no-op)
        return 0.0
    return calculate_gain(nonlinearity, a) / math.sqrt(fan)


def _array(tensor: np.ndarray | Parameter, initialiser: str) -> np.ndarray:
    """The floating-point array an initialiser writes into."""
    if isinstance(tensor, Parameter):
        tensor = tensor.data
    if isinstance(tensor, Tensor):
        raise GraphcError(
            f"nn.init.{initialiser}: got a Tensor of a trace; initialise a module's arrays "
            f"outside gc.jit / gc.grad / a compiled step (e.g. model.apply(init_weights) "
            f"before compiling) (at {user_location()})")
    if not isinstance(tensor, np.ndarray) or tensor.dtype.kind != "f":
        raise InputError(f"nn.init.{initialiser}: expects a floating-point array (a module's "
                         f"parameter or buffer), got {_describe(tensor)} (at {user_location()})")
    return tensor


def _describe(value: object) -> str:
    return f"an array of {value.dtype}" if isinstance(value, np.ndarray) else \
        f"a {type(value).__name__}"


def _generator(generator: np.random.Generator | None) -> np.random.Generator:
    return generator if generator is not None else host_init.generator()


__all__ = ["calculate_gain", "calculate_fan_in_and_fan_out", "uniform_", "normal_",
           "trunc_normal_", "constant_", "zeros_", "ones_", "xavier_uniform_", "xavier_normal_",
           "kaiming_uniform_", "kaiming_normal_", "orthogonal_"]
