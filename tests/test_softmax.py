"""`softmax` and `softmax_grad` (ir/ops/softmax.py): the ops against NumPy, their VJPs against
finite differences (float64), gradients of gradients, numba-cpu and the numba-cuda simulator
against the reference, ONNX through onnxruntime, F.softmax and attention against PyTorch, and
lines of -inf (masked attention rows)."""

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.ir.errors import GraphcError
from graphc.lowering import compile_graph
from opcheck import check_vjp, finite_differences, on_cuda_simulator, run_op

# (shape, axis): rows (attention's case), a middle axis, the first axis of a matrix
CASES = [((3, 2, 5), -1), ((2, 4, 3), 1), ((4, 3), 0)]


def naive_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def softmax_graph(shape, axis, dtype="float32", zero_masked_rows=False):
    """(x, g) -> (softmax(x), softmax_grad(g, softmax(x)))."""
    b = Builder("softmax")
    x, g = b.add_input(TensorType(shape, dtype), "x"), b.add_input(TensorType(shape, dtype), "g")
    y = b.bind("softmax", x, axis=axis, zero_masked_rows=zero_masked_rows)
    b.add_output("y", y)
    b.add_output("dx", b.bind("softmax_grad", g, y, axis=axis))
    return b.graph.verify()


def masked_scores(shape, dtype, rng):
    """Scores with one line of -inf (a query that may see no key) and some single -inf entries."""
    x = rng.standard_normal(shape).astype(dtype)
    x[(0,) * (len(shape) - 1)] = -np.inf
    x[(-1,) * len(shape)] = -np.inf
    return x


@pytest.mark.parametrize("shape, axis", CASES)
def test_forward_matches_numpy(shape, axis):
    x = np.random.default_rng(0).standard_normal(shape) * 5
    np.testing.assert_allclose(run_op("softmax", [x], axis=axis), naive_softmax(x, axis), rtol=1e-12)


@pytest.mark.parametrize("shape, axis", CASES)
def test_vjps_match_finite_differences(shape, axis):
    rng = np.random.default_rng(1)
    check_vjp("softmax", [rng.standard_normal(shape)], rtol=1e-6, axis=axis)
    y = naive_softmax(rng.standard_normal(shape), axis)
    check_vjp("softmax_grad", [rng.standard_normal(shape), y], rtol=1e-6, axis=axis)


def test_gradient_of_gradient_matches_finite_differences():
    """d/dx of <v, d/dx sum(softmax(x) * w)>: the second derivative goes through softmax_grad's VJP."""
    rng = np.random.default_rng(2)
    x, w, v = (rng.standard_normal((2, 5)) for _ in range(3))
    inner = gc.grad(lambda x: (F.softmax(x, -1) * w).sum())
    outer = gc.grad(lambda x: (inner(x) * v).sum())
    numeric = finite_differences(lambda x: float((evaluate_inner(x, w) * v).sum()), [x.copy()], 0)
    np.testing.assert_allclose(np.asarray(outer(x)), numeric, rtol=1e-6, atol=1e-8)


def evaluate_inner(x, w):
    """d/dx sum(softmax(x) w) in NumPy: y (w - sum(w y))."""
    y = naive_softmax(x, -1)
    return y * (w - (w * y).sum(-1, keepdims=True))


def test_lines_of_minus_inf_give_nan_or_zero_as_asked():
    x = masked_scores((3, 4), np.float64, np.random.default_rng(3))
    assert np.isnan(run_op("softmax", [x], axis=1)[0]).all()
    y = run_op("softmax", [x], axis=1, zero_masked_rows=True)
    assert (y[0] == 0).all() and y[2, 3] == 0
    np.testing.assert_allclose(y[1:].sum(1), 1)


def test_shape_errors_name_the_problem():
    with pytest.raises(GraphcError, match="floating-point"):
        run_op("softmax", [np.zeros((2, 3), np.int64)], axis=1)
    with pytest.raises(GraphcError, match="size 0"):
        run_op("softmax", [np.zeros((2, 0))], axis=1)
    with pytest.raises(GraphcError, match="out of range"):
        run_op("softmax", [np.zeros((2, 3))], axis=2)
    with pytest.raises(GraphcError, match="softmax output's type"):
        run_op("softmax_grad", [np.zeros((2, 3)), np.zeros((3, 2))], axis=1)


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_cpu_matches_reference(shape, axis, dtype):
    rng = np.random.default_rng(4)
    x, g = masked_scores(shape, dtype, rng), rng.standard_normal(shape).astype(dtype)
    for zero_masked_rows in (False, True):
        graph = softmax_graph(shape, axis, dtype, zero_masked_rows)
        got, want = compile_graph(graph, "numba-cpu")(x, g), evaluate(graph, [x, g])
        tolerance = dict(rtol=1e-6, atol=1e-7) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
        for name, a, b in zip(graph.output_names, got, want):
            np.testing.assert_allclose(a, b, equal_nan=True, err_msg=name, **tolerance)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_nan_anywhere_in_a_line_makes_the_line_nan(dtype):
    """The line's max folds with nan_maximum, a vectorised loop (lines of 37: vector bodies and a
    remainder): a NaN at any position, first, middle or last, turns its whole line NaN, as the
    reference's; the other lines are untouched."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 37)).astype(dtype)
    x[1, 0] = x[2, 18] = x[3, 36] = np.nan
    x[4, :] = -np.inf
    x[4, 20] = np.nan
    graph = softmax_graph(x.shape, -1, dtype)
    g = rng.standard_normal(x.shape).astype(dtype)
    got, want = compile_graph(graph, "numba-cpu")(x, g), evaluate(graph, [x, g])
    assert np.isnan(got[0][1:5]).all() and not np.isnan(got[0][[0, 5]]).any()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, equal_nan=True, rtol=1e-6, atol=1e-7)


def test_large_softmax_runs_in_parallel():
    rng = np.random.default_rng(5)
    shape = (64, 32, 64)
    x, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    graph = softmax_graph(shape, -1)
    executable = compile_graph(graph, "numba-cpu")
    assert all(k.generated.parallel for k in executable.kernels)
    for a, b in zip(executable(x, g), evaluate(graph, [x, g])):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_numba_cuda_simulator_matches_reference():
    on_cuda_simulator("test_softmax", "simulated_cuda_matches_reference")


def simulated_cuda_matches_reference():
    """(run by the test above, in a process with the simulator on)"""
    import warnings
    warnings.filterwarnings("ignore", "invalid value encountered")  # the simulator runs kernels
    #                                   as Python, where -inf - -inf on a masked line warns
    rng = np.random.default_rng(6)
    x, g = masked_scores((2, 3, 4), np.float32, rng), rng.standard_normal((2, 3, 4)).astype(np.float32)
    for axis, zero_masked_rows in ((2, True), (1, False)):
        graph = softmax_graph(x.shape, axis, "float32", zero_masked_rows)
        got, want = compile_graph(graph, "numba-cuda")(x, g), evaluate(graph, [x, g])
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("axis", [-1, 1])
def test_onnx_export_matches_reference(tmp_path, axis):
    onnxruntime = pytest.importorskip("onnxruntime")

    class Attention(gc.nn.Module):
        def forward(self, q, k):
            keep = np.ones((3, 4), dtype=bool)
            keep[0] = False  # a query that may see no key: zero weights
            return F.softmax(q, axis) + F.scaled_dot_product_attention(q, k, k, attn_mask=keep)

    rng = np.random.default_rng(7)
    q, k = rng.standard_normal((2, 3, 4)).astype(np.float32), rng.standard_normal((2, 4, 4)).astype(np.float32)
    path = tmp_path / "softmax.onnx"
    gc.export_onnx(Attention(), path, (q, k))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: a for i, a in zip(session.get_inputs(), (q, k))})[0]
    np.testing.assert_allclose(got, gc.compile(Attention(), (q, k), backend="reference")(q, k),
                               rtol=1e-5, atol=1e-6)


def test_softmax_and_its_gradient_match_pytorch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((4, 3, 6)).astype(np.float32), rng.standard_normal((4, 3, 6)).astype(np.float32)
    for dim in (-1, 1):
        value, grad = gc.value_and_grad(lambda x: (F.softmax(x, dim) * w).sum())(x)
        tx = torch.from_numpy(x).requires_grad_()
        loss = (torch.softmax(tx, dim) * torch.from_numpy(w)).sum()
        loss.backward()
        assert abs(float(value) - loss.item()) < 1e-5
        np.testing.assert_allclose(np.asarray(grad), tx.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_attention_traces_to_one_softmax_and_its_gradient_to_one_softmax_grad():
    rng = np.random.default_rng(9)
    q, k = rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 5, 4))
    keep = rng.random((3, 5)) > 0.3

    def loss(q, k):
        return F.attention_probabilities(q, k, 0.5, keep).square().sum()

    ops = [n.op for n in gc.trace(loss, q, k).nodes]
    assert ops.count("softmax") == 1 and "exp" not in ops and "max" not in ops
    ops = [n.op for n in gc.trace(gc.grad(loss), q, k).nodes]
    assert ops.count("softmax_grad") == 1 and "exp" not in ops
