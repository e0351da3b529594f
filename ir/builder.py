"""Building graphs: `Builder.bind` checks an op's attributes and types and appends its node.

Differentiation rules are written against a Builder too, so gradients are ordinary IR:
``b.mul(g, b.cos(x))`` emits two nodes and returns the new value.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import registry
from .errors import DTypeError, ShapeError, user_location
from .graph import Graph, Node, Value
from .types import TensorType


class Builder:
    """Appends nodes to one graph. `loc`, when set, overrides the traced user location;
    `module` is the module path new nodes are stamped with (set while a module's forward is
    traced, or copied from the node a pass rewrites)."""

    def __init__(self, graph: Graph | str = "graph") -> None:
        self.graph = graph if isinstance(graph, Graph) else Graph(graph)
        self.loc: str | None = None
        self.module: str | None = None

    def at(self, node: Node | None) -> None:
        """New nodes take `node`'s user line and module path (None: the traced ones again)."""
        self.loc, self.module = (node.loc, node.module) if node is not None else (None, None)

    def add_input(self, type: TensorType, name: str, role: str = "data") -> Value:
        return self.graph.add_input(type, name, role)

    def add_output(self, name: str, value: Value) -> None:
        self.graph.add_output(name, value)

    def bind(self, op: str, *inputs: Value, **attrs: Any) -> Value:
        prim = registry.get(op)
        loc = self.loc or user_location()
        if prim.num_inputs is not None and len(inputs) != prim.num_inputs:
            raise TypeError(f"{op} takes {prim.num_inputs} inputs, got {len(inputs)}")
        types = [v.type for v in inputs]
        attrs = prim.check_attrs(attrs)
        try:
            if prim.canon is not None:
                attrs = prim.check_attrs(prim.canon(types, attrs))
            out_type = prim.infer(*types, **attrs)
        except (registry.OpTypeError, ValueError) as exc:  # ValueError: a TensorType refused
            operands = ", ".join(str(t) for t in types)
            where = f" at {loc}" if loc else ""
            cls = DTypeError if getattr(exc, "dtype", False) else ShapeError
            raise cls(f"{op}: {exc} (operands: {operands}){where}") from None
        node = Node(op, inputs, attrs, (out_type,), loc, module=self.module)
        self.graph.nodes.append(node)
        return node.output

    def __getattr__(self, name: str) -> Callable[..., Value]:
        if name in registry.PRIMITIVES:
            return lambda *inputs, **attrs: self.bind(name, *inputs, **attrs)
        raise AttributeError(f"Builder has no attribute or op {name!r}")

    # -- helpers for differentiation rules and the frontend -----------------------------
    def const(self, value: Any, dtype: str) -> Value:
        return self.bind("constant", value=np.asarray(value, dtype=dtype))

    def scalar_like(self, value: float, like: Value) -> Value:
        return self.const(value, like.dtype)

    def full(self, value: float, type: TensorType) -> Value:
        c = self.const(value, type.dtype)
        return c if type.shape == () else self.bind("broadcast_to", c, shape=type.shape)

    def zeros_like(self, like: Value) -> Value:
        return self.full(0, like.type)

    def unbroadcast(self, g: Value, shape: tuple[int, ...]) -> Value:
        """Sum a broadcast cotangent back down to `shape` (the VJP of implicit broadcasting)."""
        if g.shape == shape:
            return g
        lead = len(g.shape) - len(shape)
        axes = tuple(range(lead)) + tuple(
            lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
        if axes:
            g = self.bind("sum", g, axes=axes, keepdims=False)
        return g if g.shape == shape else self.bind("reshape", g, shape=shape)
