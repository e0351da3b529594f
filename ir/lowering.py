"""The lowering registry: which backend function lowers which primitive.

Each backend registers its lowerings here, keyed by (target, primitive), next to the code that
emits them (as PyTensor's `numba_funcify` dispatches on the op):

    @lowering("numba-cpu", "conv2d")
    def _conv2d(node, refs): ...

What a lowering is called with depends on the target and on the op's fusion class (a library
call, a reduction accumulator, a pointwise rule, an ONNX converter); the registry only records
that the target handles the primitive and hands the function back.

A target may also register a *kind default*: one lowering for every primitive of a registry kind
that has none of its own. The code generators use it for elementwise ops, whose registry entry
already carries the scalar expression they compose, so a new elementwise op lowers everywhere
once its `scalar` is written.

`unlowered_primitives(target)` lists what a target cannot lower; the completeness test
(tests/test_lowering_completeness.py) keeps it empty, up to reasoned exclusions.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, TypeVar

from .errors import GraphcError
from .ops.control import SCAN_OP
from .registry import KINDS, PRIMITIVES, get

# Ops that are not registry primitives but still lower per target: nodes holding a body graph
# (ir/ops/control.py). They have no kind, hence no kind default.
STRUCTURED_OPS = (SCAN_OP,)

F = TypeVar("F", bound=Callable[..., Any])

_LOWERINGS: dict[str, dict[str, Callable[..., Any]]] = {}
_KIND_DEFAULTS: dict[str, dict[str, Callable[..., Any]]] = {}


class LoweringMissing(GraphcError, LookupError):
    """A backend was asked to lower a primitive it registered nothing for."""


def register_lowering(target: str, primitive: str, fn: F) -> F:
    """Record `fn` as `target`'s lowering of `primitive` (a name in the op registry, or a
    structured op)."""
    if primitive not in STRUCTURED_OPS:
        get(primitive)  # a typo must fail at import, not when the op first reaches the backend
    table = _LOWERINGS.setdefault(target, {})
    if primitive in table:
        raise ValueError(f"{target}: primitive {primitive!r} has two lowerings "
                         f"({table[primitive].__qualname__} and {fn.__qualname__})")
    table[primitive] = fn
    return fn


def lowering(target: str, *primitives: str) -> Callable[[F], F]:
    """Decorator: the function is `target`'s lowering of each of `primitives`."""
    if not primitives:
        raise ValueError("lowering() needs at least one primitive name")

    def register(fn: F) -> F:
        for primitive in primitives:
            register_lowering(target, primitive, fn)
        return fn
    return register


def register_kind_default(target: str, kind: str, fn: F) -> F:
    """Record `fn` as `target`'s lowering of every primitive of registry `kind` without one."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; kinds are {KINDS}")
    _KIND_DEFAULTS.setdefault(target, {})[kind] = fn
    return fn


def kind_default(target: str, kind: str) -> Callable[..., Any] | None:
    """`target`'s lowering of the primitives of `kind` that have none of their own, or None."""
    return _KIND_DEFAULTS.get(target, {}).get(kind)


def find_lowering(target: str, primitive: str) -> Callable[..., Any] | None:
    """`target`'s lowering of `primitive`: its own, else its kind's default, else None."""
    own = _LOWERINGS.get(target, {}).get(primitive)
    if own is not None or primitive in STRUCTURED_OPS:
        return own
    return kind_default(target, get(primitive).kind)


def lowering_for(target: str, primitive: str) -> Callable[..., Any]:
    """`target`'s lowering of `primitive`; raises LoweringMissing when it has none."""
    fn = find_lowering(target, primitive)
    if fn is None:
        raise LoweringMissing(f"{target} has no lowering for {primitive!r}; it lowers "
                              f"{', '.join(lowered_primitives(target)) or 'nothing'}")
    return fn


def lowered_primitives(target: str, primitives: Iterable[str] | None = None) -> list[str]:
    """The registered primitives (or `primitives`) that `target` lowers, sorted."""
    names = PRIMITIVES if primitives is None else primitives
    return sorted(p for p in names if find_lowering(target, p) is not None)


def unlowered_primitives(target: str, primitives: Iterable[str] | None = None) -> list[str]:
    """The registered primitives (or `primitives`) that `target` cannot lower, sorted."""
    names = PRIMITIVES if primitives is None else primitives
    return sorted(p for p in names if find_lowering(target, p) is None)


__all__ = ["LoweringMissing", "STRUCTURED_OPS", "find_lowering", "kind_default", "lowered_primitives", "lowering",
           "lowering_for", "register_kind_default", "register_lowering", "unlowered_primitives"]
