"""The op registry: each primitive is declared once, with everything every layer needs.

A `Primitive` bundles (as a JAX primitive does) its attribute schema, its shape/dtype rule, its
NumPy reference implementation, its vector-Jacobian rule written in IR ops, its fusion kind and,
for elementwise ops, the scalar expression code generators compose into loops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import AttributeSchemaError
from .types import TensorType, canonical_dtype

# Fusion kinds (TVM's pattern kinds, simplified).
ELEMENTWISE = "elementwise"  # out[i] = f(in0[bcast(i)], in1[bcast(i)], ...)
REDUCTION = "reduction"      # reduces some axes of one input
SHAPE = "shape"              # moves elements without arithmetic: reshape, transpose, slice, ...
OPAQUE = "opaque"            # library-style kernels: matmul, conv, pooling, gather, ...
SOURCE = "source"            # no tensor inputs: constants, random numbers
KINDS = (ELEMENTWISE, REDUCTION, SHAPE, OPAQUE, SOURCE)

_REQUIRED = object()


class OpTypeError(Exception):
    """Raised by shape rules; the builder turns it into a ShapeError/DTypeError with context."""

    def __init__(self, message: str, dtype: bool = False) -> None:
        super().__init__(message)
        self.dtype = dtype


def _as_int(v: Any) -> int:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"expected an int, got {v!r}")
    return int(v)


def _as_ints(v: Any) -> tuple[int, ...]:
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return (int(v),)
    return tuple(_as_int(x) for x in v)


def _as_pairs(v: Any) -> tuple[tuple[int, int], ...]:
    pairs = tuple(tuple(_as_int(x) for x in p) for p in v)
    if any(len(p) != 2 for p in pairs):
        raise TypeError(f"expected pairs of ints, got {v!r}")
    return pairs  # type: ignore[return-value]


def _as_float(v: Any) -> float:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"expected a number, got {v!r}")
    return float(v)


def _as_bool(v: Any) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"expected a bool, got {v!r}")
    return bool(v)


def _as_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"expected a str, got {v!r}")
    return v


def _as_array(v: Any) -> np.ndarray:
    arr = np.array(v)  # a private, contiguous copy: attrs are immutable
    canonical_dtype(arr.dtype)
    arr.setflags(write=False)
    return arr


ATTR_KINDS: dict[str, Callable[[Any], Any]] = {
    "int": _as_int,
    "ints": _as_ints,
    "pairs": _as_pairs,
    "float": _as_float,
    "bool": _as_bool,
    "str": _as_str,
    "dtype": canonical_dtype,
    "array": _as_array,
    "optional_ints": lambda v: None if v is None else _as_ints(v),
}


@dataclass(frozen=True)
class Attr:
    kind: str
    default: Any = _REQUIRED


@dataclass(frozen=True)
class Primitive:
    """One primitive op. See module docstring; every field is used by some layer."""

    name: str
    kind: str
    infer: Callable[..., TensorType]          # infer(*input_types, **attrs) -> output type
    impl: Callable[..., np.ndarray]           # impl(*arrays, **attrs) -> array (NumPy oracle)
    vjp: Callable[..., Sequence[Any]] | None  # vjp(b, g, *inputs, out=..., **attrs) -> cotangents
    attrs: dict[str, Attr] = field(default_factory=dict)
    canon: Callable[..., dict[str, Any]] | None = None  # canon(input_types, attrs) -> attrs
    scalar: Callable[..., str] | None = None  # elementwise: scalar(*input_exprs, **attrs) -> code
    num_inputs: int | None = None             # None: variadic
    doc: str = ""
    # Properties fusion reads (it never tests op names); see passes/fusion.py.
    view: bool = False            # shape op that only reinterprets a contiguous buffer: an alias
    indexed_load: bool = False    # opaque op making one load per output element, at a computed
    #                               (data-dependent) index: it fuses like an elementwise op
    identity_reads: frozenset[int] = frozenset()  # operands a non-elementwise op reads at its
    #                                               own output index (elementwise ops read all so)
    transposed_operands: bool = False  # library op reading operands with the last two axes
    #                                    swapped at no cost (BLAS flags): it absorbs such transposes
    recompute_cost: int = 4       # elementwise: evaluating it once more per element, weighed by
    #                               rematerialisation against a store and a reload (arithmetic,
    #                               comparisons and selection 1; exp, tanh, erf, division, roots 4)

    def reads_at_identity(self, position: int) -> bool:
        """Does this op read operand `position` only at the index of the element it writes?"""
        return self.kind == ELEMENTWISE or position in self.identity_reads

    def check_attrs(self, attrs: dict[str, Any]) -> dict[str, Any]:
        """Validate and normalise attributes against the schema (lists become tuples, ...)."""
        unknown = set(attrs) - set(self.attrs)
        if unknown:
            raise AttributeSchemaError(
                f"{self.name}: unknown attribute(s) {sorted(unknown)}; it takes {sorted(self.attrs) or 'none'}")
        result = {}
        for name, spec in self.attrs.items():
            if name in attrs:
                value = attrs[name]
            elif spec.default is not _REQUIRED:
                value = spec.default
            else:
                raise AttributeSchemaError(f"{self.name}: missing required attribute {name!r}")
            if value is not None or spec.default is not None:
                try:
                    value = ATTR_KINDS[spec.kind](value)
                except (TypeError, ValueError) as exc:
                    raise AttributeSchemaError(f"{self.name}: attribute {name!r}: {exc}") from None
            result[name] = value
        return result


PRIMITIVES: dict[str, Primitive] = {}


def register(prim: Primitive) -> Primitive:
    if prim.name in PRIMITIVES:
        raise ValueError(f"primitive {prim.name!r} registered twice")
    if prim.kind not in KINDS:
        raise ValueError(f"{prim.name}: unknown kind {prim.kind!r}")
    if prim.kind == ELEMENTWISE and prim.scalar is None:
        raise ValueError(f"{prim.name}: elementwise primitives need a scalar expression")
    if prim.view and prim.kind != SHAPE:
        raise ValueError(f"{prim.name}: only shape ops can be views, not {prim.kind} ops")
    if (prim.indexed_load or prim.transposed_operands) and prim.kind != OPAQUE:
        raise ValueError(f"{prim.name}: indexed_load and transposed_operands are properties of opaque ops")
    PRIMITIVES[prim.name] = prim
    return prim


def get(name: str) -> Primitive:
    try:
        return PRIMITIVES[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}") from None
