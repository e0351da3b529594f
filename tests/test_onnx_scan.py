"""ONNX export of gc.scan: every scan becomes an ONNX Scan (forward and reverse, pytrees of
carries and slices, loop invariants read from the outer graph, scans inside scans), checked with
onnxruntime against graphc's reference backend; nn.LSTM / GRU / RNN beyond the unrolling
threshold export as compiled models, the ONNX graph's size independent of the sequence length."""
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import graphc as gc  # noqa: E402
from graphc import nn  # noqa: E402
from graphc.backends.reference import evaluate  # noqa: E402
from graphc.ir.ops.control import SCAN_OP  # noqa: E402
from graphc.nn.recurrent import UNROLL_MAX_STEPS  # noqa: E402
from graphc.onnx_export import MIN_OPSET, graph_to_onnx  # noqa: E402
from test_onnx import run_onnx  # noqa: E402

REF = "reference"


def random(rng, *shape):
    return rng.uniform(-1.0, 1.0, shape).astype(np.float32)


def scan_nodes(onnx_graph):
    """The Scan nodes of an ONNX graph, those inside Scan bodies included."""
    found = []
    for node in onnx_graph.node:
        if node.op_type == "Scan":
            found.append(node)
            found += scan_nodes(onnx.helper.get_attribute_value(node.attribute[0]))
    return found


def assert_onnx_matches_reference(fn, *args, opset=17):
    """Trace `fn`, export the graph, and compare onnxruntime's outputs with the reference
    interpreter's; returns the ONNX model."""
    graph = gc.trace(fn, *args)
    assert any(node.op == SCAN_OP for node in graph.nodes)
    model = graph_to_onnx(graph, {}, opset)
    got, expected = run_onnx(model, *args), evaluate(graph, list(args))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=2e-6, atol=2e-6)
    return model


# -- gc.scan bodies --------------------------------------------------------------------------------
@pytest.mark.parametrize("reverse", [False, True])
def test_elementwise_body_with_pytrees(reverse):
    """A dict carry and a tuple of slices in, a tuple of per-step outputs out; reversed, the
    steps read and write from the end."""
    rng = np.random.default_rng(0)

    def cumulative(total0, a, b):
        def step(carry, x):
            row_a, row_b = x
            total = carry["total"] + row_a * row_b
            count = carry["count"] + 1.0
            return {"total": total, "count": count}, (total / count, gc.tanh(row_a))
        last, (means, tanhs) = gc.scan(step, {"total": total0, "count": gc.zeros((), dtype="float32")},
                                       (a, b), reverse=reverse)
        return last["total"], last["count"], means, tanhs

    model = assert_onnx_matches_reference(cumulative, random(rng, 3), random(rng, 5, 3),
                                          random(rng, 5, 3))
    (scan,) = scan_nodes(model.graph)
    directions = {a.name: list(a.ints) for a in scan.attribute if a.name.endswith("directions")}
    assert directions == {"scan_input_directions": [int(reverse)] * 2,
                          "scan_output_directions": [int(reverse)] * 2}


@pytest.mark.parametrize("reverse", [False, True])
def test_matmul_body_reads_invariant_weights_from_the_outer_graph(reverse):
    rng = np.random.default_rng(1)

    def recurrence(h0, xs, w, b):
        w_t = w.T  # loop-invariant: computed once, outside the body
        return gc.scan(lambda h, x: (gc.tanh(h @ w_t + x + b), h), h0, xs, reverse=reverse)

    model = assert_onnx_matches_reference(recurrence, random(rng, 2, 4), random(rng, 6, 2, 4),
                                          random(rng, 4, 4), random(rng, 4))
    (scan,) = scan_nodes(model.graph)
    body = onnx.helper.get_attribute_value(scan.attribute[0])
    assert len(scan.input) == 2 and len(body.input) == 2  # the carry and one slice: no weights
    outer_names = {n for node in model.graph.node for n in node.output} | \
        {i.name for i in model.graph.input}
    read_from_outside = {n for node in body.node for n in node.input} - \
        {n for node in body.node for n in node.output} - {i.name for i in body.input}
    assert read_from_outside and read_from_outside <= outer_names


def test_scan_inside_scan():
    """The inner body reads a value of the outer body and a value of the whole graph."""
    rng = np.random.default_rng(2)

    def nested(grid, scale):
        def row_step(row_total, row):
            row_scale = gc.exp(row_total * 0.1)  # made in the outer body, read by the inner
            _, cells = gc.scan(lambda acc, v: (acc * 0.5 + v * row_scale * scale, acc), row_total,
                               row, reverse=True)
            return row_total + gc.sum(cells, axis=0), cells
        return gc.scan(row_step, gc.zeros((2,), dtype="float32"), grid)

    model = assert_onnx_matches_reference(nested, random(rng, 3, 4, 2), random(rng, 2))
    assert len(scan_nodes(model.graph)) == 2


def test_length_one_no_slices_and_pass_through_outputs():
    """A single step; a loop over `length` alone (Scan is given a trip count to count); a carry
    returned unchanged, outputs that are the body's inputs, and a constant output."""
    rng = np.random.default_rng(3)

    def one_step(c, xs):
        return gc.scan(lambda carry, x: ((carry[0] + x, carry[1]),
                                         (x, carry[0], gc.full((), 2.0, dtype="float32"))),
                       (c, c * 2.0), xs)

    assert_onnx_matches_reference(one_step, random(rng, 3), random(rng, 1, 3))

    def counter(c):
        return gc.scan(lambda carry, _: (carry * 1.5, carry), c, None, length=4, reverse=True)

    assert_onnx_matches_reference(counter, random(rng, 2, 2), opset=MIN_OPSET)


def test_a_scan_of_no_steps_exports_as_its_initial_carry():
    def no_steps(c, xs):
        return gc.scan(lambda h, x: (h + x, h), c, xs)

    args = np.ones(3, np.float32), np.zeros((0, 3), np.float32)
    graph = gc.trace(no_steps, *args)
    assert not any(node.op == SCAN_OP for node in graph.nodes)
    carry, ys = run_onnx(graph_to_onnx(graph, {}, 17), *args)
    np.testing.assert_array_equal(carry, args[0])
    assert ys.shape == (0, 3)


# -- recurrent layers as compiled models --------------------------------------------------------
class Recurrent(nn.Module):
    """A recurrent layer and a linear head on every step."""

    def __init__(self, kind, **kwargs):
        super().__init__()
        self.rnn = getattr(nn, kind)(3, 5, **kwargs)
        self.head = nn.Linear(10 if kwargs.get("bidirectional") else 5, 2)

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out)


def export_and_run(model, x, path):
    compiled = gc.compile(model, x, backend=REF)
    gc.export_onnx(compiled, path)
    (got,) = run_onnx(str(path), x)
    expected = compiled(x)
    assert got.shape == expected.shape
    return onnx.load(str(path)), np.abs(got - expected).max()


@pytest.mark.parametrize("kind,kwargs", [
    ("LSTM", {}), ("GRU", {}), ("RNN", {"nonlinearity": "relu"}),
    ("LSTM", {"num_layers": 2, "bidirectional": True}), ("GRU", {"bidirectional": True})],
    ids=["lstm", "gru", "rnn-relu", "lstm-2-layers-bidirectional", "gru-bidirectional"])
def test_recurrent_layers_export_as_scans(tmp_path, kind, kwargs):
    gc.manual_seed(0)
    model = Recurrent(kind, **kwargs)
    steps = 40
    assert steps > UNROLL_MAX_STEPS  # the scan path, not the unrolled cells
    rng = np.random.default_rng(4)
    exported, error = export_and_run(model, random(rng, steps, 2, 3), tmp_path / "m.onnx")
    assert error < 1e-5
    layers, directions = kwargs.get("num_layers", 1), 2 if kwargs.get("bidirectional") else 1
    assert len(scan_nodes(exported.graph)) == layers * directions
    # The exported graph does not grow with the sequence: twice the steps, the same nodes.
    longer, _ = export_and_run(model, random(rng, 2 * steps, 2, 3), tmp_path / "longer.onnx")
    assert [n.op_type for n in longer.graph.node] == [n.op_type for n in exported.graph.node]
