"""Random-number primitives: a counter-based generator that yields the same bits on every backend.

The key is an int64[2] operand holding (seed, counter); the frontend advances the counter each
step, and the `stream` attribute separates random ops that share one key. Element i of an output
(flat index, C order) gets 64 bits that are a pure function of (seed, counter, stream, i):

    key64   = mix(mix(seed * GOLDEN + stream) + counter)
    bits(i) = mix(key64 + (i + 1) * GOLDEN)

where `mix` is the splitmix64 finaliser and all arithmetic is on uint64, wrapping mod 2**64 (the
int64 key entries are reinterpreted as uint64). There is no sequential state: every element is
computable on its own, so parallel loops and GPU threads need no coordination.

Floats take the top bits, which makes them exact in both widths:
uniform float32 = (bits >> 40) * 2**-24 and float64 = (bits >> 11) * 2**-53, both in [0, 1).
random_bernoulli(p) is `uniform float64 < p`: it reads the same bits as a float64 random_uniform
of the same key and stream, and resolves p to 2**-53.

Sharing the formula with code generators: the functions listed in `RNG_FUNCTIONS` are written in
the subset of Python that means the same on NumPy uint64 arrays and scalars and inside
numba.njit / numba.cuda.jit (every constant is an explicit np.uint64, so Numba never mixes signed
and unsigned integers into float64). Backends do not call them from this module: they paste
`rng_source(decorator)` into the generated kernel module (which must `import numpy as np`), e.g.
`rng_source("numba.njit(inline='always')")`. Inlining the text keeps Numba's on-disk kernel cache
correct: a cached kernel is not recompiled when a helper it calls in another file changes. All
arguments are uint64: convert the key entries and the element index with np.uint64(...).
The reference implementation below calls the very same functions on whole arrays.
"""
from __future__ import annotations

import inspect

import numpy as np

from ..errors import AttributeSchemaError
from ..registry import SOURCE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, is_float
from .shape import check_dims


# -- the generator (valid NumPy and Numba source: see the module docstring) --------------------
def mix(z):
    """splitmix64's finaliser: a bijection of uint64 in which every input bit flips every output bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def key_bits(seed, counter, stream):
    """64 bits naming one (seed, counter, stream) triple; 0x9E37... is the golden-ratio increment."""
    return mix(mix(seed * np.uint64(0x9E3779B97F4A7C15) + stream) + counter)


def element_bits(key64, index):
    """The 64 random bits of element `index` (flat, C order) under `key64`."""
    return mix(key64 + (index + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15))


def uniform_float32(bits):
    """The top 24 bits scaled to [0, 1): exactly representable in float32."""
    return np.float32(bits >> np.uint64(40)) * np.float32(1.0 / 16777216.0)


def uniform_float64(bits):
    """The top 53 bits scaled to [0, 1): exactly representable in float64."""
    return np.float64(bits >> np.uint64(11)) * (1.0 / 9007199254740992.0)


def bernoulli(bits, p):
    return uniform_float64(bits) < p


RNG_FUNCTIONS = ("mix", "key_bits", "element_bits", "uniform_float32", "uniform_float64", "bernoulli")


def rng_source(decorator: str = "") -> str:
    """The generator's source text (callees first), each function under `@decorator` if given."""
    parts = []
    for name in RNG_FUNCTIONS:
        text = inspect.getsource(globals()[name])
        parts.append(f"@{decorator}\n{text}" if decorator else text)
    return "\n\n".join(parts)


# -- the reference implementation -----------------------------------------------------------
def _bits(key: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    seed, counter = key.astype(np.uint64)  # two's complement reinterpretation, as np.uint64 in Numba
    size = int(np.prod(shape, dtype=np.int64))
    with np.errstate(over="ignore"):  # uint64 wrap-around is the point, not an accident
        key64 = key_bits(seed, counter, np.uint64(stream))
        return element_bits(key64, np.arange(size, dtype=np.uint64)).reshape(shape)


def _element_bits(key: np.ndarray, stream: int, shape: tuple[int, ...]) -> np.ndarray:
    """_bits, with a one-element array made 0-d: before NumPy 2, np.float32(array) of one
    element is a scalar (and deprecated); callers restore the shape."""
    bits = _bits(key, stream, shape)
    return bits.reshape(()) if bits.size == 1 else bits


def _uniform_impl(key, *, shape, dtype, stream):
    bits = _element_bits(key, stream, shape)
    return np.asarray((uniform_float32 if dtype == "float32" else uniform_float64)(bits)).reshape(shape)


def _bernoulli_impl(key, *, p, shape, stream):
    return np.asarray(bernoulli(_element_bits(key, stream, shape), p)).reshape(shape)


# -- shape rules ----------------------------------------------------------------------------
def _check_source(op: str, key: TensorType, shape: tuple[int, ...], stream: int) -> None:
    if key.dtype != "int64":
        raise OpTypeError(f"key must be int64[2] (seed, counter), got {key}", dtype=True)
    if key.shape != (2,):
        raise OpTypeError(f"key must be int64[2] (seed, counter), got {key}")
    check_dims(op, shape)
    if not 0 <= stream < 2**63:
        raise AttributeSchemaError(f"{op}: stream must lie in [0, 2**63), got {stream}")


def _uniform_infer(key: TensorType, *, shape: tuple[int, ...], dtype: str, stream: int) -> TensorType:
    _check_source("random_uniform", key, shape, stream)
    if not is_float(dtype):
        raise OpTypeError(f"dtype must be float32 or float64, got {dtype}", dtype=True)
    return TensorType(shape, dtype)


def _bernoulli_infer(key: TensorType, *, p: float, shape: tuple[int, ...], stream: int) -> TensorType:
    _check_source("random_bernoulli", key, shape, stream)
    if not 0.0 <= p <= 1.0:
        raise AttributeSchemaError(f"random_bernoulli: p must lie in [0, 1], got {p}")
    return TensorType(shape, "bool")


def _no_cotangent(b, g, key, *, out, **attrs):
    return (None,)  # random bits do not depend differentiably on the key


register(Primitive(
    "random_uniform", SOURCE, _uniform_infer, _uniform_impl, _no_cotangent,
    attrs={"shape": Attr("ints"), "dtype": Attr("dtype", "float32"), "stream": Attr("int", 0)},
    num_inputs=1, doc="Uniform floats in [0, 1) from the counter-based generator."))

register(Primitive(
    "random_bernoulli", SOURCE, _bernoulli_infer, _bernoulli_impl, _no_cotangent,
    attrs={"p": Attr("float"), "shape": Attr("ints"), "stream": Attr("int", 0)},
    num_inputs=1, doc="True with probability p: float64 uniform of the same bits < p."))
