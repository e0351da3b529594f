"""Versioned JSON (de)serialization of graphs; a round trip is exact.

Values are numbered in definition order; attributes keep their kinds exactly (tuples stay
tuples, floats keep every bit via repr, arrays travel as base64 with dtype and shape).
Nothing in a document is ever executed.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from .errors import SerializationError
from .graph import Graph, Node, Value
from .types import TensorType

FORMAT = "graphc.ir"
VERSION = 1


def _encode_attr(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")
        return {"ndarray": {"dtype": value.dtype.name, "shape": list(value.shape), "data": data}}
    if isinstance(value, tuple):
        return {"tuple": [_encode_attr(v) for v in value]}
    if isinstance(value, float):
        return {"float": repr(value)}  # also covers inf and nan, which JSON lacks
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise SerializationError(f"cannot serialize attribute value {value!r} ({type(value).__name__})")


def _decode_attr(value: Any) -> Any:
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode_attr(v) for v in value["tuple"])
        if "float" in value:
            return float(value["float"])
        if "ndarray" in value:
            spec = value["ndarray"]
            dtype = TensorType((), spec["dtype"]).np_dtype
            raw = base64.b64decode(spec["data"], validate=True)
            shape = tuple(int(d) for d in spec["shape"])
            if len(raw) != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
                raise SerializationError("array attribute: data length does not match its shape")
            arr = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
            arr.setflags(write=False)
            return arr
        raise SerializationError(f"unknown attribute encoding {sorted(value)}")
    if value is None or isinstance(value, (bool, int, str)):
        return value
    raise SerializationError(f"unknown attribute encoding {value!r}")


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    ids: dict[Value, int] = {}
    types: list[str] = []

    def define(v: Value) -> int:
        ids[v] = len(types)
        types.append(str(v.type))
        return ids[v]

    inputs = [{"name": i.name, "role": i.role, "value": define(i.value)} for i in graph.inputs]
    nodes = []
    for node in graph.nodes:
        entry: dict[str, Any] = {
            "op": node.op,
            "inputs": [ids[v] for v in node.inputs],
            "outputs": [define(v) for v in node.outputs],
            "attrs": {k: _encode_attr(v) for k, v in node.attrs.items()},
            "loc": node.loc,
        }
        if node.subgraph is not None:
            entry["subgraph"] = graph_to_dict(node.subgraph)
        nodes.append(entry)
    return {"name": graph.name, "values": types, "inputs": inputs, "nodes": nodes,
            "outputs": [{"name": n, "value": ids[v]} for n, v in graph.outputs]}


def graph_from_dict(doc: dict[str, Any]) -> Graph:
    try:
        types = [TensorType.parse(t) for t in doc["values"]]
        graph = Graph(doc["name"])
        values: dict[int, Value] = {}
        for inp in doc["inputs"]:
            values[inp["value"]] = graph.add_input(types[inp["value"]], inp["name"], inp["role"])
        for entry in doc["nodes"]:
            sub = graph_from_dict(entry["subgraph"]) if "subgraph" in entry else None
            attrs = {k: _decode_attr(v) for k, v in entry["attrs"].items()}
            node = Node(entry["op"], tuple(values[i] for i in entry["inputs"]), attrs,
                        tuple(types[i] for i in entry["outputs"]), entry["loc"], sub)
            values.update(zip(entry["outputs"], node.outputs))
            graph.nodes.append(node)
        for out in doc["outputs"]:
            graph.add_output(out["name"], values[out["value"]])
    except SerializationError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        raise SerializationError(f"malformed graph document: {type(exc).__name__}: {exc}") from None
    return graph


def graph_to_json(graph: Graph, indent: int | None = None) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "graph": graph_to_dict(graph)},
                      indent=indent, sort_keys=False)


def graph_from_json(text: str) -> Graph:
    """Parse and verify a graph document; anything wrong raises SerializationError."""
    from .verify import verify
    from .errors import VerificationError

    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SerializationError(f"not a JSON document: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"not a {FORMAT} document")
    version = doc.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SerializationError(
            f"graph format version {version!r} is newer than this graphc supports ({VERSION}); upgrade graphc")
    graph = graph_from_dict(doc.get("graph"))  # type: ignore[arg-type]
    try:
        verify(graph)
    except VerificationError as exc:
        raise SerializationError(f"graph document does not verify: {exc}") from None
    return graph
