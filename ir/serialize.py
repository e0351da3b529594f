"""Versioned JSON (de)serialization of graphs; a round trip is exact.

Values are numbered in definition order; attributes keep their kinds exactly (tuples stay
tuples, floats keep every bit via repr, arrays travel as base64 with dtype and shape).

A document is data from outside: nothing in it is executed, and nothing in it reaches
generated source. Reading rebuilds the graph from the registry: op names are the registry's
own strings, attributes are re-validated against each op's schema (dtype names map through a
fixed table), and fused kernel nodes are refused (their names and patterns would be pasted
into kernel source; graphc fuses a loaded graph itself). A scan's body is rebuilt the same way,
primitive by primitive, its own nested scans counted against MAX_BODY_DEPTH. JSON nesting is
bounded before the document is parsed.
"""
from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np

from .errors import GraphcError, SerializationError
from .graph import MODULE_PATH_CHARS, MODULE_PATH_MAX, Graph, Node, Value
from .printer import UNPRINTABLE
from .ops.control import MAX_BODY_DEPTH, SCAN_ATTRS, SCAN_OP, make_scan
from .registry import PRIMITIVES
from .types import DTYPES, TensorType

FORMAT = "graphc.ir"
VERSION = 1
MAX_JSON_DEPTH = 64  # graph documents nest about 8 deep; json.loads recurses once per level
# Parsed JSON takes ~60-100 bytes per element whatever the text's size: the element count bounds
# the memory a document costs (the MNIST CNN's graph has ~5,000 elements).
MAX_JSON_ITEMS = 2_000_000
_NP_DTYPES = {name: np.dtype(name) for name in DTYPES}
_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1
_ITEM_MARK = np.zeros(256, bool)  # one per element at most: separators and openers
_ITEM_MARK[[ord(","), ord(":"), ord("["), ord("{")]] = True
_SCAN_CHUNK = 1 << 20


class JSONDepthError(SerializationError):
    """A JSON document nested deeper, or holding more elements, than graphc's documents do."""


def json_shape(document: str | bytes) -> tuple[int, int]:
    """(deepest nesting of arrays and objects, upper bound on the element count) of a JSON
    text, counted without parsing it: in chunks, vectorised, with the state that crosses a
    chunk boundary (inside a string or not, the run of backslashes before) carried over."""
    data = document.encode("utf-8", "surrogatepass") if isinstance(document, str) else document
    depth = deepest = 0
    items = 1
    in_string, backslashes = 0, 0
    for start in range(0, len(data), _SCAN_CHUNK):
        chunk = np.frombuffer(data, np.uint8, min(_SCAN_CHUNK, len(data) - start), start)
        quote = chunk == ord('"')
        is_backslash = chunk == ord("\\")
        if backslashes or is_backslash.any():
            # the run of backslashes ending at each byte (one carried in from the last chunk):
            # a quote after an odd run is escaped
            position = np.arange(len(chunk), dtype=np.int32)
            last_other = np.maximum.accumulate(np.where(is_backslash, -1, position))
            run = position - last_other + np.where(last_other < 0, backslashes, 0)
            quote &= np.concatenate(([backslashes], run[:-1])) % 2 == 0
            backslashes = int(run[-1])
        inside = (np.cumsum(quote, dtype=np.int32) + in_string) % 2 == 1
        structural = ~(inside | quote)
        steps = _BRACKET_STEP[chunk]
        steps[~structural] = 0
        levels = np.cumsum(steps, dtype=np.int32) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
        items += int(np.count_nonzero(_ITEM_MARK[chunk] & structural))
        in_string = int(inside[-1])
    return deepest, items


def load_json(document: str | bytes, max_depth: int = MAX_JSON_DEPTH,
              max_items: int = MAX_JSON_ITEMS) -> Any:
    """json.loads for documents from outside, their nesting and size checked first (json.loads
    would exhaust the stack on deep nesting, and memory on millions of tiny elements):
    JSONDepthError beyond the limits, a ValueError for bad JSON (bytes must be UTF-8)."""
    depth, items = json_shape(document)
    if depth > max_depth:
        raise JSONDepthError(f"JSON nested {depth} levels deep (at most {max_depth})")
    if items > max_items:
        raise JSONDepthError(f"JSON of up to {items:,} elements (at most {max_items:,})")
    if isinstance(document, bytes):
        document = document.decode("utf-8")  # json.loads would also accept UTF-16 and -32
    try:
        return json.loads(document)
    except RecursionError:  # unreachable given the depth check; never let it escape
        raise JSONDepthError(f"JSON nested too deeply (at most {max_depth})") from None


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
            dtype = _NP_DTYPES.get(spec["dtype"])
            if dtype is None:
                raise SerializationError(f"array attribute: unsupported dtype {spec['dtype']!r:.40}")
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


def written_name(name: str, what: str) -> str:
    """`name` as a document holds it: the loader refuses control characters and unpaired
    surrogates, so a file holding one would never load again."""
    try:
        return checked_text(name, what)
    except SerializationError as exc:
        raise SerializationError(f"{exc}, which an exported file cannot hold: rename it (a module "
                                 "added with add_module, a name given)") from None


def _written_location(loc: str | None) -> str | None:
    """A node's source location with control characters and unpaired surrogates escaped (a
    file path may hold them; the loader refuses them raw)."""
    if loc is None:
        return None
    loc = loc.encode("utf-8", "backslashreplace").decode("utf-8")
    return UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02x}", loc)


def graph_to_dict(graph: Graph) -> dict[str, Any]:
    ids: dict[Value, int] = {}
    types: list[str] = []

    def define(v: Value) -> int:
        ids[v] = len(types)
        types.append(str(v.type))
        return ids[v]

    inputs = [{"name": written_name(i.name, "an input's name"), "role": i.role, "value": define(i.value)}
              for i in graph.inputs]
    nodes = []
    for node in graph.nodes:
        entry: dict[str, Any] = {
            "op": node.op,
            "inputs": [ids[v] for v in node.inputs],
            "outputs": [define(v) for v in node.outputs],
            "attrs": {k: _encode_attr(v) for k, v in node.attrs.items()},
            "loc": _written_location(node.loc),
        }
        if node.module:
            entry["module"] = node.module
        if node.subgraph is not None:
            entry["subgraph"] = graph_to_dict(node.subgraph)
        nodes.append(entry)
    return {"name": written_name(graph.name, "the graph's name"), "values": types, "inputs": inputs,
            "nodes": nodes,
            "outputs": [{"name": written_name(n, "an output's name"), "value": ids[v]} for n, v in graph.outputs]}


def _expect(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SerializationError(f"{what} is {type(value).__name__}, expected "
                                 f"{getattr(kind, '__name__', 'a string or null')}")
    return value


def checked_text(value: Any, what: str) -> str:
    """`value`, a string a document names something with, printable as one line of UTF-8."""
    _expect(value, str, what)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SerializationError(f"{what} {value!r:.60} holds an unpaired surrogate, not text") from None
    if UNPRINTABLE.search(value):  # a line break could forge lines where `graphc inspect` prints it
        raise SerializationError(f"{what} {value!r:.60} holds control characters")
    return value


def _location(value: Any, what: str) -> str | None:
    return None if value is None else checked_text(value, what)


class _ValueTypes:
    """The document's value types, parsed when a value is defined (one TensorType per distinct
    text): a document cannot make the loader build types for values no node defines."""

    def __init__(self, texts: Any) -> None:
        self.texts = _expect(texts, list, "the value types")
        self.parsed: dict[str, TensorType] = {}

    def __getitem__(self, index: Any) -> TensorType:
        if type(index) is not int or not 0 <= index < len(self.texts):
            raise SerializationError(f"value index {index!r:.40} is not one of the "
                                     f"{len(self.texts)} values")
        text = _expect(self.texts[index], str, "a value type")
        if text not in self.parsed:
            self.parsed[text] = TensorType.parse(text)
        return self.parsed[text]


def _scan_node(entry: dict[str, Any], values: dict[int, Value], depth: int) -> Node:
    """A scan rebuilt from its body document (loaded like a graph, one level deeper) and its
    four integer/bool attributes; the verifier then checks the body against the operands."""
    if depth >= MAX_BODY_DEPTH:
        raise SerializationError(f"scan bodies nest more than {MAX_BODY_DEPTH} deep")
    raw = _expect(entry["attrs"], dict, "scan's attrs")
    if sorted(raw) != sorted(SCAN_ATTRS):
        raise SerializationError(f"scan's attributes are {sorted(SCAN_ATTRS)}")
    length, reverse, num_consts, num_carry = (raw[a] for a in SCAN_ATTRS)
    for name, v in (("length", length), ("num_consts", num_consts), ("num_carry", num_carry)):
        _expect(v, int, f"scan's {name}")
    _expect(reverse, bool, "scan's reverse")
    body = graph_from_dict(_expect(entry["subgraph"], dict, "scan's body"), depth + 1)
    body.name = "body"  # the document's name for it is not needed, so not kept
    if num_carry > len(body.outputs):
        raise SerializationError(f"scan carries {num_carry} values; its body returns {len(body.outputs)}")
    inputs = tuple(values[_expect(i, int, "scan's input")] for i in entry["inputs"])
    loc = _location(entry["loc"], "scan's loc")
    return make_scan(inputs, body, length, reverse, num_consts, num_carry, loc,
                     _module_path(entry.get("module"), SCAN_OP))


def _node(entry: dict[str, Any], values: dict[int, Value], types: _ValueTypes, depth: int) -> Node:
    if entry.get("op") != SCAN_OP:
        return _primitive_node(entry, values, types)
    node = _scan_node(entry, values, depth)
    outputs = _expect(entry["outputs"], list, "scan's outputs")
    if (len(outputs) != len(node.outputs) or any(i in values for i in outputs)
            or len(set(outputs)) != len(outputs)):
        raise SerializationError("scan's outputs do not match its body, or redefine a value")
    if [types[i] for i in outputs] != [v.type for v in node.outputs]:
        raise SerializationError("scan's output types do not match its body's outputs")
    return node


def _primitive_node(entry: dict[str, Any], values: dict[int, Value], types: _ValueTypes) -> Node:
    """A node rebuilt from the registry: its op name and attributes come from the registry's
    schema, never from the document's strings."""
    op = _expect(entry["op"], str, "a node's op")
    if "subgraph" in entry or op == "kernel":
        raise SerializationError("the graph holds fused kernel nodes: graph documents carry "
                                 "primitive ops only, and graphc fuses after loading")
    prim = PRIMITIVES.get(op)
    if prim is None:
        raise SerializationError(f"unknown op {op!r:.60}")
    raw = _expect(entry["attrs"], dict, f"{op}'s attrs")
    try:
        attrs = prim.check_attrs({k: _decode_attr(v) for k, v in raw.items()})
    except GraphcError as exc:
        raise SerializationError(f"{op}: {exc}") from None
    loc = _location(entry["loc"], f"{op}'s loc")
    module = _module_path(entry.get("module"), op)
    inputs = tuple(values[_expect(i, int, f"{op}'s input")] for i in entry["inputs"])
    outputs = _expect(entry["outputs"], list, f"{op}'s outputs")
    if any(i in values for i in outputs) or len(set(outputs)) != len(outputs):
        raise SerializationError(f"node {op} redefines a value")
    return Node(prim.name, inputs, attrs, tuple(types[i] for i in outputs), loc, module=module)


def _module_path(path: Any, op: str) -> str | None:
    """A node's module path from a document: dotted names only (it is printed in generated
    kernels' comments, where anything else, a line break first, could become code)."""
    _expect(path, (str, type(None)), f"{op}'s module path")
    if path is not None and (len(path) > MODULE_PATH_MAX or not MODULE_PATH_CHARS.fullmatch(path)):
        raise SerializationError(f"{op}'s module path {path!r:.60} is not a dotted name of at most "
                                 f"{MODULE_PATH_MAX} characters from [A-Za-z0-9_.]")
    return path


def graph_from_dict(doc: dict[str, Any], depth: int = 0) -> Graph:
    """The graph of a document (not yet verified: see graph_from_json); `depth` counts the scan
    bodies it is nested in."""
    try:
        types = _ValueTypes(doc["values"])
        graph = Graph(checked_text(doc["name"], "the graph's name"))
        values: dict[int, Value] = {}
        for inp in doc["inputs"]:
            index = inp["value"]
            if index in values:
                raise SerializationError(f"input {inp['name']!r:.60} redefines value {index}")
            values[index] = graph.add_input(types[index], checked_text(inp["name"], "an input's name"),
                                            _expect(inp["role"], str, "an input's role"))
        for entry in doc["nodes"]:
            node = _node(_expect(entry, dict, "a node"), values, types, depth)
            values.update(zip(entry["outputs"], node.outputs))
            graph.nodes.append(node)
        for out in doc["outputs"]:
            graph.add_output(checked_text(out["name"], "an output's name"),
                             values[_expect(out["value"], int, "an output's value")])
    except SerializationError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise SerializationError(f"malformed graph document: {type(exc).__name__}: {exc}") from None
    return graph


def graph_to_json(graph: Graph, indent: int | None = None) -> str:
    return json.dumps({"format": FORMAT, "version": VERSION, "graph": graph_to_dict(graph)},
                      indent=indent, sort_keys=False)


def graph_from_json(text: str | bytes) -> Graph:
    """Parse, rebuild and verify a graph document (bytes: UTF-8); anything wrong raises
    SerializationError."""
    from .verify import verify

    try:
        doc = load_json(text)
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError; JSONDepthError is ours
        if isinstance(exc, SerializationError):
            raise
        raise SerializationError(f"not a JSON document: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SerializationError(f"not a {FORMAT} document")
    version = doc.get("version")
    if type(version) is not int or version > VERSION:
        raise SerializationError(
            f"graph format version {version!r:.20} is newer than this graphc supports ({VERSION}); upgrade graphc")
    if not isinstance(doc.get("graph"), dict):
        raise SerializationError("malformed graph document: no graph")
    graph = graph_from_dict(doc["graph"])
    try:
        verify(graph)
    except GraphcError as exc:
        raise SerializationError(f"graph document does not verify: {exc}") from None
    except Exception as exc:  # an op's type rule failing on values no tracer would make
        raise SerializationError(f"graph document does not verify: {type(exc).__name__}: {exc}") from exc
    return graph
