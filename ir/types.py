"""Static tensor types: every value in a graph has a fixed shape and dtype."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

DTYPES = ("float32", "float64", "int32", "int64", "bool")
FLOAT_DTYPES = ("float32", "float64")
SHORT_NAMES = {"float32": "f32", "float64": "f64", "int32": "i32", "int64": "i64", "bool": "bool"}
_FROM_SHORT = {v: k for k, v in SHORT_NAMES.items()}
_TYPE_TEXT = re.compile(r"([a-z0-9]+)\[((?:[0-9]+(?:,[0-9]+)*)?)\]")
_CANONICAL = frozenset(DTYPES)
_NP_DTYPES = {name: np.dtype(name) for name in DTYPES}  # executors ask on every call


def canonical_dtype(dtype: object) -> str:
    """Return the canonical dtype name for a NumPy dtype, a type or a name ('f32' works too)."""
    if isinstance(dtype, str):
        if dtype in _CANONICAL:  # every TensorType built asks; NumPy's dtype lookup costs ~10 us
            return dtype
        if dtype in _FROM_SHORT:
            return _FROM_SHORT[dtype]
    try:
        name = np.dtype(dtype).name  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(f"unsupported dtype {dtype!r}; graphc supports {', '.join(DTYPES)}") from exc
    if name not in DTYPES:
        raise TypeError(f"unsupported dtype {name!r}; graphc supports {', '.join(DTYPES)}")
    return name


def is_float(dtype: str) -> bool:
    return dtype in FLOAT_DTYPES


# More elements than any machine's memory holds (2**48 float32s are 1 PiB); the byte size of
# such an array still fits int64, which kernels index with.
MAX_ELEMENTS = 2**48


@dataclass(frozen=True)
class TensorType:
    """The static type of an SSA value: a shape of non-negative ints and a dtype name."""

    shape: tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        shape = tuple(int(d) for d in self.shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"negative dimension in shape {shape}")
        if math.prod(shape) > MAX_ELEMENTS:  # its sizes and offsets would overflow int64 in kernels
            raise ValueError(f"shape {shape} has {math.prod(shape):.3g} elements, more than any "
                             f"array can hold (at most 2**48)")
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)  # exact Python ints; np.prod cost ~10 us a call

    @property
    def nbytes(self) -> int:
        return self.size * _NP_DTYPES[self.dtype].itemsize

    @property
    def np_dtype(self) -> np.dtype:
        return _NP_DTYPES[self.dtype]

    def with_shape(self, shape: tuple[int, ...]) -> TensorType:
        return TensorType(shape, self.dtype)

    def with_dtype(self, dtype: str) -> TensorType:
        return TensorType(self.shape, dtype)

    def __str__(self) -> str:
        return f"{SHORT_NAMES[self.dtype]}[{','.join(map(str, self.shape))}]"

    @staticmethod
    def parse(text: str) -> TensorType:
        """Inverse of str(): 'f32[2,3]' -> TensorType((2, 3), 'float32'); a ValueError for any
        other text ('f32[', 'f32[4,]', digits other than ASCII's)."""
        match = _TYPE_TEXT.fullmatch(text)
        if match is None or match[1] not in _FROM_SHORT:
            raise ValueError(f"{text!r:.60} is not a tensor type such as f32[2,3]")
        dims = match[2]
        return TensorType(tuple(int(d) for d in dims.split(",")) if dims else (), _FROM_SHORT[match[1]])

    @staticmethod
    def of(array: np.ndarray) -> TensorType:
        return TensorType(array.shape, array.dtype.name)


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """NumPy broadcasting of shapes; raises ValueError when they do not broadcast."""
    return tuple(np.broadcast_shapes(*shapes))
