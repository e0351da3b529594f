"""gc.scan and the scan op: against Python loops on the reference backend (values, gradients by
finite differences and against the unrolled loop, grad of grad), the IR's views of it (text,
DOT, JSON, export), the passes on it, and its refusals."""
import json

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
from graphc.ir import Graph, GraphcError, SerializationError, VerificationError
from graphc.ir.interpret import evaluate
from graphc.ir.ops.control import MAX_BODY_DEPTH, SCAN_OP
from graphc.passes.fusion import fuse
from graphc.passes.simplify import simplify
from opcheck import finite_differences, on_cuda_simulator

REF = "reference"
rng = np.random.default_rng(0)


def jit(fn):
    return gc.jit(fn, backend=REF)


def cell(c, x, w):
    """One step of a small recurrence with a loop-invariant weight (graphc or NumPy)."""
    h = (c @ w + x).tanh() if hasattr(c, "tanh") else np.tanh(c @ w + x)
    return h, h * h


def python_loop(c, xs, w, reverse=False):
    ys = [None] * len(xs)
    for t in (range(len(xs) - 1, -1, -1) if reverse else range(len(xs))):
        c, ys[t] = cell(c, xs[t], w)
    return c, np.stack(ys)


def scanned(c, xs, w, reverse=False):
    return gc.scan(lambda carry, x: cell(carry, x, w), c, xs, reverse=reverse)


def loss_of(run):
    def loss(c, xs, w):
        last, ys = run(c, xs, w)
        return (last * last).sum() + (ys * np.arange(1, 4.0)).sum()
    return loss


C0, XS, W = rng.normal(size=(2, 3)), rng.normal(size=(5, 2, 3)), rng.normal(size=(3, 3)) * 0.5


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_matches_a_python_loop(reverse):
    last, ys = jit(lambda c, xs, w: scanned(c, xs, w, reverse))(C0, XS, W)
    want_last, want_ys = python_loop(C0, XS, W, reverse)
    np.testing.assert_allclose(last, want_last, rtol=1e-12)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-12)


def test_a_one_step_scan_and_its_gradient():
    xs = XS[:1]
    last, ys = jit(scanned)(C0, xs, W)
    want_last, want_ys = python_loop(C0, xs, W)
    np.testing.assert_allclose(last, want_last, rtol=1e-12)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-12)
    grads = gc.grad(loss_of(scanned), argnums=(0, 1, 2), backend=REF)(C0, xs, W)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, finite_differences(loss_of(python_loop), [C0, xs, W], i),
                                   rtol=1e-6, atol=1e-8)


def test_the_body_is_traced_once_and_weights_are_loop_invariant_operands():
    graph = jit(scanned).lower(C0, XS, W)
    (node,) = [n for n in graph.nodes if n.op == SCAN_OP]
    assert node.attrs == {"length": 5, "reverse": False, "num_consts": 1, "num_carry": 1}
    assert node.inputs[0] is graph.inputs[2].value  # w, passed whole at every step
    assert [n.op for n in node.subgraph.nodes] == ["matmul", "add", "tanh", "mul"]


def test_loop_invariant_work_is_hoisted_out_of_the_body():
    def f(c, xs, w):
        return gc.scan(lambda carry, x: ((carry @ w.T + x).tanh(), None), c, xs)[0]
    graph = jit(f).lower(C0, XS, W)
    assert "transpose" not in {n.op for n in graph.nodes[-1].subgraph.nodes}
    np.testing.assert_allclose(jit(f)(C0, XS, W), python_loop(C0, XS, W.T)[0], rtol=1e-12)


@pytest.mark.parametrize("reverse", [False, True])
def test_gradients_match_finite_differences_and_the_unrolled_loop(reverse):
    def run(c, xs, w):
        return scanned(c, xs, w, reverse)

    def unrolled(c, xs, w):
        ys = [None] * xs.shape[0]
        for t in (range(xs.shape[0] - 1, -1, -1) if reverse else range(xs.shape[0])):
            c, ys[t] = cell(c, xs[t], w)
        return c, gc.stack(ys)

    grads = gc.grad(loss_of(run), argnums=(0, 1, 2), backend=REF)(C0, XS, W)
    unrolled_grads = gc.grad(loss_of(unrolled), argnums=(0, 1, 2), backend=REF)(C0, XS, W)
    numpy_loss = loss_of(lambda c, xs, w: python_loop(c, xs, w, reverse))
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, unrolled_grads[i], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g, finite_differences(numpy_loss, [C0, XS, W], i), rtol=1e-6, atol=1e-8)


def test_the_vjp_is_a_reverse_scan_over_the_saved_carries():
    graph = gc.grad(loss_of(scanned), argnums=(0, 1, 2), backend=REF).lower(C0, XS, W)
    forward, backward = [n for n in graph.nodes if n.op == SCAN_OP]
    assert (forward.attrs["reverse"], backward.attrs["reverse"]) == (False, True)
    # residuals: the final carry, the stack of the carry entering each step (read by w's
    # gradient, one product after the loop) and of `carry @ w` (read by the backward body
    # instead of computing it again), nothing else
    assert [str(v.type) for v in forward.outputs] == ["f64[2,3]", "f64[5,2,3]", "f64[5,2,3]"]
    assert [n.op for n in forward.subgraph.nodes].count("matmul") == 1
    assert backward.inputs[-2] is forward.outputs[2]
    # in the loop, only the carry's cotangent (dpre @ w.T); w's gradient is one product after it
    assert [n.op for n in backward.subgraph.nodes].count("matmul") == 1
    assert any(n.op == "matmul" and n.inputs[1].shape == (10, 3) for n in graph.nodes)
    # w.T, which the gradient of `carry @ w` reads at every step, is computed once before the loop
    hoisted = backward.inputs[0].producer
    assert (hoisted.op, hoisted.inputs[0]) == ("transpose", graph.inputs[2].value)
    assert backward.attrs["num_consts"] == 1
    assert all(n.inputs[0] is not backward.subgraph.input_values[0] for n in backward.subgraph.nodes
               if n.op == "transpose")


def test_pytrees_of_carries_inputs_and_outputs():
    def f(state, xs):
        def step(carry, x):
            total = carry["total"] + x[0] * x[1]
            return {"total": total, "count": carry["count"] + 1.0}, (total, {"sq": x[0] * x[0]})
        return gc.scan(step, state, xs)

    state = {"total": np.zeros(3), "count": np.zeros(())}
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    carry, (totals, extra) = jit(f)(state, (a, b))
    np.testing.assert_allclose(carry["total"], (a * b).sum(0), rtol=1e-12)
    assert carry["count"] == 4.0
    np.testing.assert_allclose(totals, np.cumsum(a * b, axis=0), rtol=1e-12)
    np.testing.assert_allclose(extra["sq"], a * a, rtol=1e-12)


def test_length_without_xs():
    def powers(x):
        return gc.scan(lambda c, _: (c * x, c), gc.ones_like(x), None, length=4)
    last, ys = jit(powers)(np.array([2.0, 3.0]))
    np.testing.assert_allclose(ys, [[1, 1], [2, 3], [4, 9], [8, 27]])
    np.testing.assert_allclose(last, [16, 81])
    grad = gc.grad(lambda x: powers(x)[0].sum(), backend=REF)(np.array([2.0, 3.0]))
    np.testing.assert_allclose(grad, [4 * 8, 4 * 27])


def test_cumulative_sum_written_with_scan():
    x = rng.normal(size=(6, 2))
    _, sums = jit(lambda x: gc.scan(lambda c, row: (c + row, c + row), gc.zeros_like(x[0]), x))(x)
    np.testing.assert_allclose(sums, np.cumsum(x, axis=0), rtol=1e-12)


def test_a_scan_inside_a_scan():
    def f(c, xss, w):
        def outer(carry, xs):
            inner_last, inner_ys = gc.scan(lambda h, x: cell(h, x, w), carry, xs)
            return inner_last, inner_ys.sum(0)
        return gc.scan(outer, c, xss)

    xss = rng.normal(size=(3, 2, 2, 3))
    graph = jit(f).lower(C0, xss, W)
    (node,) = [n for n in graph.nodes if n.op == SCAN_OP]
    assert SCAN_OP in {n.op for n in node.subgraph.nodes}

    def numpy_f(c, xss, w):
        ys = []
        for xs in xss:
            c, inner = python_loop(c, xs, w)
            ys.append(inner.sum(0))
        return c, np.stack(ys)

    last, ys = jit(f)(C0, xss, W)
    want_last, want_ys = numpy_f(C0, xss, W)
    np.testing.assert_allclose(last, want_last, rtol=1e-12)
    np.testing.assert_allclose(ys, want_ys, rtol=1e-12)
    numpy_loss, loss = loss_of(numpy_f), loss_of(f)
    grads = gc.grad(loss, argnums=(0, 1, 2), backend=REF)(C0, xss, W)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, finite_differences(numpy_loss, [C0, xss, W], i), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("body", ["elementwise", "matmul"])
def test_grad_of_grad(body):
    """The VJP of a scan is a scan: differentiating the gradient again matches the unrolled
    loop's second derivative."""
    w = rng.normal(size=(3, 3)) * 0.5

    def step(c, x):
        return (c * x + c.sin() if body == "elementwise" else (c @ w + x).tanh()), None

    def looped(c, xs):
        return (gc.scan(step, c, xs)[0] ** 2).sum()

    def unrolled(c, xs):
        for t in range(xs.shape[0]):
            c = step(c, xs[t])[0]
        return (c ** 2).sum()

    c0, xs = rng.normal(size=(3,)), rng.normal(size=(4, 3)) * 0.5
    for fn in (looped, unrolled):
        fn.hessian_row = gc.grad(lambda c, xs, fn=fn: gc.grad(fn)(c, xs)[0], backend=REF)(c0, xs)
    np.testing.assert_allclose(looped.hessian_row, unrolled.hessian_row, rtol=1e-9, atol=1e-12)
    second = gc.grad(lambda c, xs: gc.grad(looped)(c, xs)[0], backend=REF).lower(c0, xs)
    scans = [n for n in second.nodes if n.op == SCAN_OP]
    assert len(scans) >= 3  # forward, its VJP, the VJP's VJP
    assert len(scans[0].outputs) == 2  # the carry, and its stack saved once for both VJPs


def test_text_dot_and_json_round_trip():
    graph = gc.grad(loss_of(scanned), argnums=(0, 1, 2), backend=REF).lower(C0, XS, W)
    graph.verify()
    text = str(graph)
    assert "scan(" in text and "graph body(" in text and "reverse=True" in text
    dot = graph.to_dot()
    assert dot.count("subgraph cluster_scan") == 2 and "scan: 5 steps, reversed" in dot
    again = Graph.from_json(graph.to_json())
    assert str(again) == text
    args = [C0, XS, W]
    for got, want in zip(evaluate(again, args), evaluate(graph, args)):
        np.testing.assert_array_equal(got, want)
    fused = fuse(graph)
    fused.verify()
    assert [k.attrs["pattern"] for k in fused.nodes].count("scan") == 2
    assert "subgraph cluster_scan" in fused.to_dot()


def _nested_scan_document(depth: int) -> str:
    """A graph of `depth` scans, each the body of the one around it."""
    def body(level: int) -> dict:
        inner = ([{"op": "scan", "inputs": [0], "outputs": [1], "loc": None, "subgraph": body(level + 1),
                   "attrs": {"length": 1, "reverse": False, "num_consts": 0, "num_carry": 1}}]
                 if level < depth else [])
        return {"name": "g", "values": ["f32[2]", "f32[2]"], "inputs": [{"name": "c", "role": "data", "value": 0}],
                "nodes": inner, "outputs": [{"name": "c", "value": 1 if inner else 0}]}
    return json.dumps({"format": "graphc.ir", "version": 1, "graph": body(0)})


def test_loader_bounds_the_nesting_of_bodies():
    Graph.from_json(_nested_scan_document(MAX_BODY_DEPTH))
    with pytest.raises(SerializationError, match=f"nest more than {MAX_BODY_DEPTH} deep"):
        Graph.from_json(_nested_scan_document(MAX_BODY_DEPTH + 1))


def test_loader_refuses_a_scan_whose_body_does_not_match():
    doc = json.loads(_nested_scan_document(1))
    doc["graph"]["nodes"][0]["subgraph"]["values"] = ["f32[3]", "f32[3]"]
    with pytest.raises(SerializationError, match="does not verify|do not match"):
        Graph.from_json(json.dumps(doc))
    doc = json.loads(_nested_scan_document(1))
    doc["graph"]["nodes"][0]["attrs"]["length"] = True
    with pytest.raises(SerializationError, match="scan's length"):
        Graph.from_json(json.dumps(doc))


def test_verifier_checks_the_body_against_the_operands():
    graph = jit(scanned).lower(C0, XS, W)
    node = next(n for n in graph.nodes if n.op == SCAN_OP)
    node.attrs = {**node.attrs, "num_consts": 0, "num_carry": 2}
    with pytest.raises(VerificationError, match="scan"):
        graph.verify()


class ScanRNN(nn.Module):
    """An Elman RNN over time through gc.scan, reading nn.RNN's weights."""

    def __init__(self, rnn: nn.RNN) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        r = self.rnn
        projected = x @ r.weight_ih_l0.T + r.bias_ih_l0 + r.bias_hh_l0
        h0 = gc.zeros((x.shape[1], r.hidden_size), dtype=x.dtype)
        last, out = gc.scan(lambda h, p: ((p + h @ r.weight_hh_l0.T).tanh(),) * 2, h0, projected)
        return out, last[None]


def test_an_rnn_on_scan_matches_the_unrolled_rnn_module():
    gc.manual_seed(0)
    rnn = nn.RNN(3, 4).to(dtype="float64")
    x = rng.normal(size=(5, 2, 3))
    want_out, want_h = gc.compile(rnn, [x], backend=REF)(x)
    got_out, got_h = gc.compile(ScanRNN(rnn), [x], backend=REF)(x)
    np.testing.assert_allclose(got_out, want_out, rtol=1e-12)
    np.testing.assert_allclose(got_h, want_h, rtol=1e-12)

    def loss(model):
        return lambda params, x: (nn.functional_call(model, params, x)[0] * np.cos(np.arange(8.0)).reshape(2, 4)).sum()
    params = {k: v for k, v in rnn.state_dict().items()}
    want = gc.grad(loss(rnn), backend=REF)(params, x)
    got = gc.grad(loss(ScanRNN(rnn)), backend=REF)({f"rnn.{k}": v for k, v in params.items()}, x)
    for k in params:
        np.testing.assert_allclose(got[f"rnn.{k}"], want[k], rtol=1e-10, atol=1e-12)


def test_a_training_step_through_a_scanned_forward_matches_the_unrolled_one():
    gc.manual_seed(1)
    x, target = rng.normal(size=(5, 2, 3)), rng.normal(size=(5, 2, 4))
    losses = []
    for wrap in (lambda rnn: rnn, ScanRNN):
        gc.manual_seed(1)
        rnn = nn.RNN(3, 4).to(dtype="float64")
        model = wrap(rnn)
        step = gc.compile_train_step(model, lambda out, t: ((out[0] - t) ** 2).mean(),
                                     gc.optim.SGD(model.parameters(), lr=0.1), [x, target], backend=REF)
        losses.append([step(x, target) for _ in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-10)
    assert losses[1][2] < losses[1][0]


def test_export_and_load_round_trip(tmp_path):
    gc.manual_seed(2)
    model = ScanRNN(nn.RNN(3, 4).to(dtype="float64"))
    x = rng.normal(size=(5, 2, 3))
    compiled = gc.compile(model, [x], backend=REF)
    path = str(tmp_path / "scan.gcx")
    compiled.export(path)
    loaded = gc.load(path, backend=REF)
    for got, want in zip(loaded(x), compiled(x)):
        np.testing.assert_array_equal(got, want)


def test_simplify_runs_inside_the_body_and_keeps_distinct_scans_apart():
    def f(c, xs):
        a = gc.scan(lambda h, x: (h * 1.0 + x, None), c, xs)[0]
        b = gc.scan(lambda h, x: (h * 2.0 + x, None), c, xs)[0]
        return a + b
    graph = jit(f).lower(C0, XS)
    scans = [n for n in graph.nodes if n.op == SCAN_OP]
    assert len(scans) == 2
    assert [n.op for n in scans[0].subgraph.nodes] == ["add"]  # h * 1.0 folded away
    assert simplify(graph).nodes[-1].op == "add"
    np.testing.assert_allclose(jit(f)(C0, XS), C0 + XS.sum(0) + python_loop_affine(C0, XS, 2.0), rtol=1e-12)


def test_simplify_drops_per_step_outputs_and_operands_nothing_reads():
    def f(c, xs, w):
        return gc.scan(lambda h, x: ((h + x).tanh(), (h @ w, x * 2.0)), c, xs)[0]
    graph = jit(f).lower(C0, XS, W)
    (node,) = [n for n in graph.nodes if n.op == SCAN_OP]
    assert len(node.outputs) == 1 and node.attrs["num_consts"] == 0  # w is no longer read
    assert [n.op for n in node.subgraph.nodes] == ["add", "tanh"]
    np.testing.assert_allclose(jit(f)(C0, XS, W), python_loop_tanh(C0, XS), rtol=1e-12)


def python_loop_tanh(c, xs):
    for x in xs:
        c = np.tanh(c + x)
    return c


def python_loop_affine(c, xs, a):
    for x in xs:
        c = c * a + x
    return c


def test_autodiff_of_a_graph_with_a_scan_and_an_integer_carry():
    def f(c, xs):
        (h, steps), _ = gc.scan(lambda carry, x: ((carry[0] * x, carry[1] + 1), None),
                                (c, gc.zeros((), dtype="int64")), xs)
        return (h * steps.astype("float64")).sum()
    xs = rng.normal(size=(3, 2))
    grad = gc.grad(f, backend=REF)(np.ones(2), xs)
    np.testing.assert_allclose(grad, 3 * xs.prod(0), rtol=1e-12)


def test_scan_outside_a_trace_runs_on_the_reference_backend():
    last, ys = gc.scan(lambda c, x: (c + x, c * x), np.zeros(2), np.arange(6.0).reshape(3, 2))
    np.testing.assert_allclose(last, [6, 9])
    np.testing.assert_allclose(ys, [[0, 0], [0, 3], [8, 20]])


def test_numba_cuda_on_the_simulator_matches_the_reference():
    on_cuda_simulator("test_scan", "simulated_cuda_matches_reference")


def simulated_cuda_matches_reference():
    """(run by the test above, in a process with the simulator on)"""
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(3, 3)) * 0.5).astype(np.float32)

    def loss(c, xs, w):
        last, ys = gc.scan(lambda h, x: ((h @ w + x).tanh(),) * 2, c, xs, reverse=True)
        return (last * last).sum() + ys.sum()
    c, xs = rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=(3, 2, 3)).astype(np.float32)
    got = gc.value_and_grad(loss, argnums=(0, 1, 2), backend="numba-cuda")(c, xs, w)
    want = gc.value_and_grad(loss, argnums=(0, 1, 2), backend="reference")(c, xs, w)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, r in zip(got[1], want[1]):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reverse", [False, True])
def test_numba_cpu_matches_the_reference_values_and_gradients(reverse):
    def loss(c, xs, w):
        return loss_of(lambda c, xs, w: scanned(c, xs, w, reverse))(c, xs, w)
    args = [a.astype(np.float32) for a in (C0, XS, W)]
    want = gc.value_and_grad(loss, argnums=(0, 1, 2), backend=REF)(*args)
    got = gc.value_and_grad(loss, argnums=(0, 1, 2), backend="numba-cpu")(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_numba_cpu_runs_a_scan_in_a_scan_and_a_training_step():
    def f(c, xss, w):
        def outer(carry, xs):
            inner_last, inner_ys = gc.scan(lambda h, x: cell(h, x, w), carry, xs)
            return inner_last, (inner_ys.sum(0), carry)  # a carry returned as it is
        return gc.scan(outer, c, xss)

    xss = rng.normal(size=(3, 2, 2, 3)).astype(np.float32)
    args = (C0.astype(np.float32), xss, W.astype(np.float32))
    want, got = jit(f)(*args), gc.jit(f, backend="numba-cpu")(*args)
    for g, w in zip(gc.tree.flatten(got)[0], gc.tree.flatten(want)[0]):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)

    x, target = rng.normal(size=(5, 2, 3)).astype(np.float32), rng.normal(size=(5, 2, 4)).astype(np.float32)
    losses = []
    for backend in (REF, "numba-cpu"):
        gc.manual_seed(3)
        model = ScanRNN(nn.RNN(3, 4))
        step = gc.compile_train_step(model, lambda out, t: ((out[0] - t) ** 2).mean(),
                                     gc.optim.Adam(model.parameters(), lr=0.01), [x, target], backend=backend)
        losses.append([step(x, target) for _ in range(3)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_a_scan_of_no_steps_returns_its_initial_carry_and_empty_ys(backend):
    """As `jax.lax.scan` over an empty axis: the carry as it came in, the ys with 0 rows."""
    def run(c, xs):
        return gc.scan(lambda h, x: (h * x + 1, (h.sum(), h.astype("int64"))), c, xs)

    c = np.array([1.0, 2.0], np.float32)
    carry, (sums, ints) = gc.jit(run, backend=backend)(c, np.zeros((0, 2), np.float32))
    np.testing.assert_array_equal(carry, c)
    assert (sums.shape, sums.dtype, ints.shape, ints.dtype) == ((0,), np.float32, (0, 2), np.int64)
    counted = gc.jit(lambda c: gc.scan(lambda h, _: (h + 1, None), c, None, length=0)[0],
                     backend=backend)(c)
    np.testing.assert_array_equal(counted, c)
    grads = gc.grad(lambda c, xs: (run(c, xs)[0] * 3).sum(), argnums=(0, 1))(c, np.zeros((0, 2), np.float32))
    np.testing.assert_array_equal(grads[0], [3, 3])
    assert grads[1].shape == (0, 2)


@pytest.mark.parametrize("case, message", [
    (lambda c, xs: gc.scan(lambda h, x: (h.astype("float32"), None), c, xs),
     r"carry enters the body as f64\[2\] and leaves it as f32\[2\]"),
    (lambda c, xs: gc.scan(lambda h, x: h, c, xs), "f must return a pair"),
    (lambda c, xs: gc.scan(lambda h, x: ((h, h), None), c, xs), "structure"),
    (lambda c, xs: gc.scan(lambda h, x: (h, None), c, (xs, xs[:2])), "different sizes"),
    (lambda c, xs: gc.scan(lambda h, x: (h, None), c, None), "give length="),
    (lambda c, xs: gc.scan(lambda h, x: (h, None), c, xs, length=4), "length=4 but xs has leading axis 3"),
    (lambda c, xs: gc.scan(lambda h, x: (h, None), c, None, length=-1), "length must be >= 0, got -1"),
    (lambda c, xs: gc.scan(lambda h, x: (gc.nn.functional.dropout(h, 0.5, True), None), c, xs),
     "random ops inside a scan are not supported"),
    (lambda c, xs: gc.scan(lambda h, x: (h, None), c, None, length=3.0), "length must be an integer, got 3.0"),
    (lambda c, xs: gc.scan(lambda h, x: (h + x, "step"), c, xs), r"f returned y = 'step', a str"),
    (lambda c, xs: gc.scan(lambda h, x: ((h[0], {"n": "x"}), None), (c, {"n": c}), xs),
     r"f returned the carry\[1\]\['n'\] = 'x', a str"),
])
def test_refusals_name_the_problem_and_the_users_line(case, message):
    with pytest.raises(GraphcError, match=message) as info:
        jit(case)(np.zeros(2), np.ones((3, 2)))
    assert "test_scan.py" in str(info.value)


def test_a_buffer_update_inside_a_body_is_refused():
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(3)

        def forward(self, xs):
            return gc.scan(lambda h, x: (self.norm(h + x), None), gc.zeros((2, 3)), xs)[0]

    model = Normalised()
    xs, target = rng.normal(size=(4, 2, 3)).astype(np.float32), np.zeros((2, 3), np.float32)
    with pytest.raises(GraphcError, match="updates a module buffer .* not supported inside a scan .*test_scan.py"):
        gc.compile_train_step(model, lambda out, t: ((out - t) ** 2).mean(),
                              gc.optim.SGD(model.parameters(), lr=0.1), [xs, target], backend=REF)(xs, target)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_results_of_a_program_with_a_scan_are_arrays_of_their_own(backend):
    """Not the caller's input, a module's weight, or another result (they were, with a scan,
    on numba-cpu: writing into a result changed the input or the model)."""
    def step(c, x):
        return c + x, c
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    lin = nn.Linear(2, 2)
    weight = lin.weight.copy()
    f = gc.jit(lambda x: (gc.scan(step, x[0] * 0, x)[0], x, lin.weight), backend=backend)
    _, x_out, w_out = f(x)
    assert not np.may_share_memory(x_out, x) and not np.may_share_memory(w_out, lin.weight)
    x_out[...], w_out[...] = -1, 0
    np.testing.assert_array_equal(x, np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(lin.weight, weight)
    twice = gc.jit(lambda x: (lambda c, ys: (ys, ys))(*gc.scan(step, x[0] * 0, x)), backend=backend)
    a, b = twice(np.ones((3, 2), np.float32))
    a[...] = 7
    np.testing.assert_array_equal(b, [[0, 0], [1, 1], [2, 2]])


def test_a_numpy_integer_length_is_a_length():
    carry, ys = jit(lambda c: gc.scan(lambda h, _: (h * 2, h), c, None, length=np.int64(3)))(np.ones(2))
    np.testing.assert_array_equal(carry, [8, 8])
    np.testing.assert_array_equal(ys, [[1, 1], [2, 2], [4, 4]])


def test_a_body_writing_a_tensor_from_outside_it_is_refused():
    """acc += b in the body, acc made before the loop: the write was hoisted out of the loop
    as an invariant and made once ([2, 2, 2] after 5 steps, where the loop gives [10, ...])."""
    def fn(xs):
        acc = gc.zeros(3)

        def body(c, x):
            acc.__iadd__(gc.ones(3) * 2)  # acc += ..., in place as in PyTorch
            return c + x, None
        return gc.scan(body, gc.zeros(3), xs)[0] + acc
    with pytest.raises(GraphcError, match=r"x \+= y inside a gc.scan body writes a tensor from outside "
                                          r"the body.*Carry the tensor.*test_scan.py"):
        jit(fn)(np.ones((5, 3), np.float32))


def test_a_body_value_read_after_the_loop_is_refused_by_name():
    """It was reported as a tensor 'of another traced function (kept from an earlier trace)'."""
    def fn(xs):
        kept = []

        def body(c, x):
            kept.append(c * 2)
            return c + x, None
        return gc.scan(body, gc.zeros(3), xs)[0] + kept[0]
    with pytest.raises(GraphcError, match=r"a value computed inside a gc.scan body is read after the "
                                          r"loop .*computed at .*test_scan.py"):
        jit(fn)(np.ones((5, 3), np.float32))


def test_a_weight_read_inside_and_outside_a_scan_exports_and_draws_fused(tmp_path):
    """Fusion's shared-transpose rewrite asked the op registry about the scan reading W.T:
    export and the fused DOT failed with `unknown op 'scan'` (training ran: it splits scans
    out first)."""
    class Model(gc.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gc.nn.Linear(3, 3)

        def forward(self, x):
            xs = x.transpose(0, 1)
            last, _ = gc.scan(lambda h, xt: ((self.lin(h) + xt).tanh(), None), xs[0] * 0, xs)
            return last + self.lin(xs[-1])

    x = np.random.default_rng(0).standard_normal((4, 5, 3)).astype(np.float32)
    y = np.zeros((4, 3), np.float32)
    gc.manual_seed(0)
    model = Model()
    step = gc.compile_train_step(model, gc.nn.functional.mse_loss,
                                 gc.optim.SGD(model.parameters(), lr=0.1), example_inputs=(x, y))
    expected = step(x, y)
    step.export(str(tmp_path / "step.gcx"))
    assert "scan" in step.to_dot(stage="fused")
    gc.compile(model, example_inputs=x).export(str(tmp_path / "model.gcx"))
    assert np.isfinite(expected) and np.isfinite(gc.load(str(tmp_path / "step.gcx"))(x, y))
