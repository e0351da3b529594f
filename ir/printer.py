"""A stable, readable text form of graphs (in the spirit of a jaxpr).

    graph mlp(%0: f32[4,3] x [data], %1: f32[3,2] w [param]) {
      %2: f32[4,2] = matmul(%0, %1)                      # fc @ model.py:12
      return (y: %2)
    }
"""
from __future__ import annotations

import re

import numpy as np

from .graph import Graph, Node, Value

_LOC_COLUMN = 56
# C0 and C1 control characters and DEL, which no name or location shown as text may hold
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def format_attr(value: object) -> str:
    if isinstance(value, np.ndarray):
        if value.size <= 8:
            body = np.array2string(value, separator=",", threshold=8).replace("\n", "")
            return body if value.ndim else repr(value.item())
        return f"<{value.dtype.name}{list(value.shape)}>"
    if isinstance(value, tuple):
        inner = ",".join(format_attr(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    return repr(value)


def format_graph(graph: Graph, indent: str = "", names: dict[Value, str] | None = None) -> str:
    names = {} if names is None else names

    def name(v: Value) -> str:
        if v not in names:
            names[v] = f"%{len(names)}"
        return names[v]

    params = ", ".join(f"{name(i.value)}: {i.value.type} {i.name} [{i.role}]" for i in graph.inputs)
    lines = [f"{indent}graph {graph.name}({params}) {{"]
    for node in graph.nodes:
        outs = ", ".join(f"{name(v)}: {v.type}" for v in node.outputs)
        args = ", ".join(name(v) for v in node.inputs)
        attrs = ", ".join(f"{k}={format_attr(v)}" for k, v in node.attrs.items())
        sep = "; " if args and attrs else ""
        text = f"{indent}  {outs} = {node.op}({args}{sep}{attrs})"
        origin = format_origin(node)
        if origin:
            text = f"{text.ljust(_LOC_COLUMN)}  # {origin}"
        lines.append(text)
        if node.subgraph is not None:
            # Name the subgraph's values afresh: they are a separate scope.
            lines.append(format_graph(node.subgraph, indent + "    ", {}))
    results = ", ".join(f"{n}: {name(v)}" for n, v in graph.outputs)
    lines.append(f"{indent}  return ({results})")
    lines.append(f"{indent}}}")
    return "\n".join(lines)


def format_origin(node: Node) -> str:
    """Where a node came from, for people: "features.0 @ model.py:12" (module path and user
    line, either may be missing); a kernel names the module paths of its members."""
    modules = ", ".join(node.module_paths())
    loc = short_loc(node.loc) if node.loc else ""
    return " @ ".join(part for part in (modules, loc) if part)


def short_loc(loc: str) -> str:
    """Keep the file's base name: the full path is in the JSON, the text form stays narrow."""
    path, _, line = loc.rpartition(":")
    return f"{path.rsplit('/', 1)[-1]}:{line}"
