"""The graph core: SSA values, nodes and graphs (a jaxpr-like, static dataflow IR).

A `Graph` has named, role-tagged inputs, a topologically ordered list of `Node`s and named
outputs. Every `Value` is defined exactly once: by a graph input or by one node's outputs.
Primitive nodes have one output; fused kernel nodes (op ``"kernel"``) hold a subgraph and may
have several, as do scan nodes (op ``"scan"``, ir/ops/control.py), whose subgraph is the loop's
body.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

from .types import TensorType

ROLES = ("data", "param", "state", "rng")

MODULE_PATH_MAX = 200
MODULE_PATH_CHARS = re.compile(r"[A-Za-z0-9_.]+")
_MODULE_PATH_OTHER = re.compile(r"[^A-Za-z0-9_.]")


def safe_module_path(path: str) -> str:
    """`path` in the characters module paths may hold (`[A-Za-z0-9_.]`, MODULE_PATH_MAX at
    most), others replaced by "_": a ModuleDict key may be any string, and paths are printed in
    generated kernels' comments, where a line break would be code."""
    return _MODULE_PATH_OTHER.sub("_", path)[:MODULE_PATH_MAX]


class Value:
    """An SSA value. Identity is the object itself; `type` never changes."""

    __slots__ = ("type", "producer", "__weakref__")

    def __init__(self, type: TensorType, producer: Node | None = None) -> None:
        self.type = type
        self.producer = producer

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    def __repr__(self) -> str:
        return f"Value({self.type})"


class Node:
    """One operation: `outputs = op(*inputs, **attrs)`, recorded at the user's `loc` and inside
    the `module` it came from: its path from the outermost module called while tracing
    ("encoder.layers.1.fc", as fx's nn_module_stack), None outside any submodule."""

    __slots__ = ("op", "inputs", "attrs", "outputs", "loc", "subgraph", "module")

    def __init__(self, op: str, inputs: tuple[Value, ...], attrs: dict[str, Any],
                 output_types: tuple[TensorType, ...], loc: str | None = None,
                 subgraph: Graph | None = None, module: str | None = None) -> None:
        self.op = op
        self.inputs = tuple(inputs)
        self.attrs = attrs
        self.outputs = tuple(Value(t, self) for t in output_types)
        self.loc = loc
        self.subgraph = subgraph
        self.module = module

    def clone(self, inputs: Iterable[Value], attrs: dict[str, Any] | None = None,
              subgraph: Graph | None = None) -> Node:
        """This node reading `inputs` instead, with fresh outputs of the same types: the same op,
        attributes (or `attrs`), body (or `subgraph`), location and module. Not yet in a graph."""
        return Node(self.op, tuple(inputs), self.attrs if attrs is None else attrs,
                    tuple(v.type for v in self.outputs), self.loc,
                    self.subgraph if subgraph is None else subgraph, self.module)

    def module_paths(self) -> list[str]:
        """The module paths this node covers, in order: its own, or a kernel's members'."""
        if self.subgraph is None:
            return [self.module] if self.module else []
        return list(dict.fromkeys(p for n in self.subgraph.nodes for p in n.module_paths()))

    @property
    def output(self) -> Value:
        (out,) = self.outputs
        return out

    def __repr__(self) -> str:
        return f"Node({self.op}, {[str(v.type) for v in self.inputs]} -> {[str(v.type) for v in self.outputs]})"


@dataclass
class GraphInput:
    name: str
    role: str
    value: Value


class Graph:
    """A static dataflow graph: inputs (with roles), nodes in topological order, named outputs."""

    def __init__(self, name: str = "graph") -> None:
        self.name = name
        self.inputs: list[GraphInput] = []
        self.nodes: list[Node] = []
        self.outputs: list[tuple[str, Value]] = []

    # -- construction -------------------------------------------------------------------
    def add_input(self, type: TensorType, name: str, role: str = "data") -> Value:
        if role not in ROLES:
            raise ValueError(f"unknown input role {role!r}; expected one of {ROLES}")
        value = Value(type)
        self.inputs.append(GraphInput(name, role, value))
        return value

    def add_output(self, name: str, value: Value) -> None:
        self.outputs.append((name, value))

    # -- queries ------------------------------------------------------------------------
    @property
    def input_values(self) -> list[Value]:
        return [i.value for i in self.inputs]

    @property
    def output_values(self) -> list[Value]:
        return [v for _, v in self.outputs]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.outputs]

    def input(self, name: str) -> GraphInput:
        for inp in self.inputs:
            if inp.name == name:
                return inp
        raise KeyError(f"graph {self.name!r} has no input named {name!r}")

    def output(self, name: str) -> Value:
        for n, v in self.outputs:
            if n == name:
                return v
        raise KeyError(f"graph {self.name!r} has no output named {name!r}")

    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that read it (graph outputs are not nodes)."""
        result: dict[Value, list[Node]] = {}
        for node in self.nodes:
            for v in node.inputs:
                result.setdefault(v, []).append(node)
        return result

    def values(self) -> Iterator[Value]:
        yield from self.input_values
        for node in self.nodes:
            yield from node.outputs

    def __len__(self) -> int:
        return len(self.nodes)

    # -- views (implemented in their own modules) ---------------------------------------
    def __str__(self) -> str:
        from .printer import format_graph
        return format_graph(self)

    def __repr__(self) -> str:
        return f"<Graph {self.name!r}: {len(self.inputs)} inputs, {len(self.nodes)} nodes, {len(self.outputs)} outputs>"

    def verify(self) -> Graph:
        from .verify import verify
        verify(self)
        return self

    def to_json(self) -> str:
        from .serialize import graph_to_json
        return graph_to_json(self)

    @staticmethod
    def from_json(text: str) -> Graph:
        from .serialize import graph_from_json
        return graph_from_json(text)

    def to_dot(self, **options: Any) -> str:
        from .dot import graph_to_dot
        return graph_to_dot(self, **options)

    def to_networkx(self):  # -> networkx.MultiDiGraph
        from .dot import graph_to_networkx
        return graph_to_networkx(self)

    def copy(self) -> Graph:
        """A deep structural copy with fresh values (attrs are shared: they are immutable)."""
        new = Graph(self.name)
        mapping = {inp.value: new.add_input(inp.value.type, inp.name, inp.role) for inp in self.inputs}
        for node in self.nodes:
            clone = node.clone((mapping[v] for v in node.inputs),
                               subgraph=node.subgraph.copy() if node.subgraph is not None else None)
            mapping.update(zip(node.outputs, clone.outputs))
            new.nodes.append(clone)
        new.outputs = [(n, mapping[v]) for n, v in self.outputs]
        return new
