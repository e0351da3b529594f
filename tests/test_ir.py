"""The IR core: printer, verifier, JSON round trip, DOT and networkx views."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphc.ir import Builder, Graph, Node, SerializationError, TensorType, VerificationError
from graphc.ir.serialize import graph_from_json, graph_to_json
from random_graphs import broadcasts

F32 = "float32"


def small_graph() -> Graph:
    b = Builder("mlp")
    x = b.add_input(TensorType((4, 3), F32), "x")
    w = b.add_input(TensorType((3, 2), F32), "w", role="param")
    h = b.tanh(b.mul(x, b.const(2.0, F32)))
    y = b.sum(b.exp(h), axes=(1,), keepdims=True)
    b.add_output("y", y)
    b.add_output("w_again", w)
    return b.graph


def test_printer_is_readable_and_stable():
    text = str(small_graph())
    assert text.splitlines()[0] == "graph mlp(%0: f32[4,3] x [data], %1: f32[3,2] w [param]) {"
    assert "= tanh(%" in text and "sum(%" in text and "axes=(1,), keepdims=True" in text
    assert text.splitlines()[-2].strip() == "return (y: %6, w_again: %1)"
    assert str(small_graph()).replace("test_ir.py", "") == text.replace("test_ir.py", "")
    assert "# test_ir.py:" in text  # nodes remember the user's line


def test_nodes_record_user_file_and_line():
    g = small_graph()
    assert all(n.loc and n.loc.rsplit(":", 1)[0].endswith("test_ir.py") for n in g.nodes)


def test_json_round_trip_is_exact():
    g = small_graph()
    text = graph_to_json(g)
    again = graph_from_json(text)
    assert graph_to_json(again) == text
    assert str(again) == str(g)


def test_json_rejects_bad_documents():
    with pytest.raises(SerializationError, match="not a JSON document"):
        graph_from_json("{nope")
    with pytest.raises(SerializationError, match="not a graphc.ir document"):
        graph_from_json(json.dumps({"format": "other"}))
    doc = json.loads(graph_to_json(small_graph()))
    doc["version"] = 99
    with pytest.raises(SerializationError, match="newer than this graphc supports"):
        graph_from_json(json.dumps(doc))
    doc = json.loads(graph_to_json(small_graph()))
    doc["graph"]["nodes"][0]["inputs"] = [42]
    with pytest.raises(SerializationError):
        graph_from_json(json.dumps(doc))
    doc = json.loads(graph_to_json(small_graph()))
    doc["graph"]["values"][-1] = "f32[9,9]"  # a type the op's rule disagrees with
    with pytest.raises(SerializationError, match="does not verify"):
        graph_from_json(json.dumps(doc))


UNARY = ["neg", "exp", "tanh", "sigmoid", "relu", "abs", "square"]
BINARY = ["add", "sub", "mul", "maximum", "minimum"]


@st.composite
def random_graphs(draw):
    """Random well-typed graphs over a few shapes, with fan-out, reductions and attributes."""
    b = Builder("random")
    shapes = [(3, 4), (4,), (1, 4), ()]
    dtype = draw(st.sampled_from(["float32", "float64"]))
    values = [b.add_input(TensorType(draw(st.sampled_from(shapes)), dtype), f"x{i}",
                          draw(st.sampled_from(["data", "param", "state"])))
              for i in range(draw(st.integers(1, 3)))]
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["unary", "binary", "const", "sum", "cast"]))
        x = draw(st.sampled_from(values))
        if kind == "unary":
            values.append(b.bind(draw(st.sampled_from(UNARY)), x))
        elif kind == "binary":
            y = draw(st.sampled_from([v for v in values if v.dtype == x.dtype
                                      and broadcasts(v.type.shape, x.type.shape)]))
            values.append(b.bind(draw(st.sampled_from(BINARY)), x, y))
        elif kind == "const":
            values.append(b.const(draw(st.floats(width=32)), x.dtype))
        elif kind == "sum" and x.type.ndim:
            values.append(b.sum(x, axes=(draw(st.integers(0, x.type.ndim - 1)),),
                                keepdims=draw(st.booleans())))
        elif kind == "cast":
            values.append(b.cast(x, dtype=x.dtype))
    for i, v in enumerate(draw(st.lists(st.sampled_from(values), min_size=1, max_size=3))):
        b.add_output(f"out{i}", v)
    return b.graph


@settings(max_examples=60, deadline=None)
@given(random_graphs())
def test_json_round_trip_of_random_graphs_is_exact(graph):
    graph.verify()
    text = graph.to_json()
    again = Graph.from_json(text)
    assert again.to_json() == text
    assert str(again) == str(graph)


def test_verifier_rejects_hand_broken_graphs():
    g = small_graph()
    g.nodes[1].outputs[0].type = TensorType((9,), F32)  # lie about a type
    with pytest.raises(VerificationError, match="output type is f32\\[9\\]"):
        g.verify()

    g = small_graph()
    g.nodes.reverse()  # use before definition
    with pytest.raises(VerificationError, match="used before it is defined"):
        g.verify()

    g = small_graph()
    g.nodes[0].attrs = {"value": np.float32(1), "bogus": 1}
    with pytest.raises(VerificationError, match="unknown attribute"):
        g.verify()

    g = small_graph()
    g.nodes.append(Node("no_such_op", (), {}, (TensorType((), F32),)))
    with pytest.raises(VerificationError, match="unknown op"):
        g.verify()

    g = small_graph()
    g.outputs.append(("dangling", Graph("other").add_input(TensorType((), F32), "z")))
    with pytest.raises(VerificationError, match="not defined"):
        g.verify()

    g = small_graph()
    g.inputs[1].role = "weird"
    with pytest.raises(VerificationError, match="unknown role"):
        g.verify()


def test_dot_shows_ops_types_inputs_and_outputs():
    dot = small_graph().to_dot()
    assert dot.startswith('digraph "mlp" {')
    assert "tanh" in dot and "f32[4,1]" in dot
    assert "shape=ellipse" in dot and "[param]" in dot  # inputs, with their roles
    assert "shape=doubleoctagon" in dot  # outputs


def test_dot_colours_by_slot():
    g = small_graph()
    dot = g.to_dot(slot_of=lambda v: 0)
    assert "#fbb4ae" in dot


def test_to_networkx():
    import networkx as nx

    g = small_graph()
    nxg = g.to_networkx()
    assert nx.is_directed_acyclic_graph(nxg)
    assert nxg.nodes[("input", 0)]["name"] == "x"
    assert nxg.nodes[("output", "y")]["type"] == "f32[4,1]"
    assert sum(1 for _, d in nxg.nodes(data=True) if d["op"] == "tanh") == 1


def test_copy_is_independent():
    g = small_graph()
    c = g.copy()
    assert str(c) == str(g)
    assert not set(g.values()) & set(c.values())
