"""`normalize` and `normalize_grad` (ir/ops/norm.py), the normalisation of layer norm and batch
norm and its VJP as one kernel each: the ops against NumPy, both VJP rules (grad of grad
included) against finite differences in float64, numba-cpu (serial and parallel) and the
numba-cuda simulator against the reference, offset data, the shape rules' errors, and second
derivatives through layer norm and batch norm compiled on numba-cpu, against finite
differences and against PyTorch's double backward."""

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc.backends.numba_cpu.codegen_common import always_parallel
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.ir.errors import GraphcError
from graphc.lowering import compile_graph
from graphc.nn.normalization import batch_norm
from opcheck import check_vjp, on_cuda_simulator, run_op

CASES = [((4, 8), (1,)),             # layer norm: rows of a matrix
         ((2, 3, 5), (2,)),          # a sequence's tokens
         ((2, 3, 4), (1, 2)),        # normalized_shape of two dimensions
         ((6,), (0,)),               # one line
         ((3, 2, 4, 5), (0, 2, 3)),  # batch norm 2d: channels in the middle
         ((5, 3), (0,))]             # batch norm 1d: channels innermost


def op_graph(op, shape, axes, dtype="float32", epsilon=1e-5):
    b = Builder(op)
    names = ["x"] if op == "normalize" else ["g", "x"]
    inputs = [b.add_input(TensorType(shape, dtype), name) for name in names]
    b.add_output("out", b.bind(op, *inputs, axes=axes, epsilon=epsilon))
    return b.graph.verify()


def naive_normalize(x, axes, epsilon):
    mean = x.mean(axis=axes, keepdims=True)
    return (x - mean) / np.sqrt(((x - mean) ** 2).mean(axis=axes, keepdims=True) + epsilon)


def naive_normalize_grad(g, x, axes, epsilon):
    """The VJP written out as each line's Jacobian d xhat_j / d x_i against g_j."""
    kept = [a for a in range(x.ndim) if a not in axes]
    order = kept + list(axes)  # the lines as the rows of a matrix
    n = int(np.prod([x.shape[a] for a in axes]))
    lines, g_lines = (np.transpose(v, order).reshape(-1, n) for v in (x, g))
    out = np.empty_like(lines)
    for r, (line, g_line) in enumerate(zip(lines, g_lines)):
        centred = line - line.mean()
        rstd = 1 / np.sqrt((centred ** 2).mean() + epsilon)
        jacobian = rstd * (np.eye(n) - 1 / n - np.outer(centred, centred) * rstd ** 2 / n)
        out[r] = jacobian.T @ g_line
    return np.transpose(out.reshape([x.shape[a] for a in order]), np.argsort(order))


@pytest.mark.parametrize("shape, axes", CASES)
def test_forward_and_gradient_match_numpy(shape, axes):
    rng = np.random.default_rng(0)
    x, g = rng.standard_normal(shape) * 2 + 1, rng.standard_normal(shape)
    np.testing.assert_allclose(run_op("normalize", [x], axes=axes, epsilon=1e-3),
                               naive_normalize(x, axes, 1e-3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run_op("normalize_grad", [g, x], axes=axes, epsilon=1e-3),
                               naive_normalize_grad(g, x, axes, 1e-3), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape, axes", CASES)
def test_vjps_match_finite_differences(shape, axes):
    rng = np.random.default_rng(1)
    x, g = rng.standard_normal(shape), rng.standard_normal(shape)
    check_vjp("normalize", [x], rtol=1e-6, axes=axes, epsilon=0.01)
    check_vjp("normalize_grad", [g, x], rtol=1e-5, atol=1e-6, axes=axes, epsilon=0.01)


def test_shape_errors_name_the_problem():
    with pytest.raises(GraphcError, match=r"the axes kept, \(0, 2\), must be consecutive"):
        run_op("normalize", [np.zeros((2, 3, 4, 5))], axes=(1, 3), epsilon=1e-5)
    with pytest.raises(GraphcError, match="floating-point"):
        run_op("normalize", [np.zeros((2, 3), np.int64)], axes=(1,), epsilon=1e-5)
    with pytest.raises(GraphcError, match="size 0"):
        run_op("normalize", [np.zeros((2, 0))], axes=(1,), epsilon=1e-5)
    with pytest.raises(GraphcError, match="must have the operand's type"):
        run_op("normalize_grad", [np.zeros((2, 3), np.float32), np.zeros((2, 3))], axes=(1,),
               epsilon=1e-5)


@pytest.mark.parametrize("op", ["normalize", "normalize_grad"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_cpu_matches_reference(op, dtype):
    rng = np.random.default_rng(2)
    tolerance = dict(rtol=1e-5, atol=2e-6) if dtype == "float32" else dict(rtol=1e-12, atol=1e-13)
    for shape, axes in CASES:
        graph = op_graph(op, shape, axes, dtype)
        arrays = [rng.standard_normal(shape).astype(dtype) for _ in graph.inputs]
        (got,), (want,) = compile_graph(graph, "numba-cpu")(*arrays), evaluate(graph, arrays)
        np.testing.assert_allclose(got, want, **tolerance, err_msg=f"{op} {shape} {axes}")


@pytest.mark.parametrize("op", ["normalize", "normalize_grad"])
@pytest.mark.parametrize("shape, axes", [((16, 128), (1,)), ((8, 4, 64), (0, 2))])
def test_offset_lines_keep_their_digits_in_float32(op, shape, axes):
    """x and g 1000 times their spread: the two-pass statistics and g's sums shifted by its
    first element keep float32's precision (one-pass sums, or unshifted sums of g, were off by
    up to 2e-2 here)."""
    rng = np.random.default_rng(3)
    graph = op_graph(op, shape, axes)
    arrays = [(1000 + 3 * rng.standard_normal(shape)).astype(np.float32) for _ in graph.inputs]
    (got,) = compile_graph(graph, "numba-cpu")(*arrays)
    (exact,) = evaluate(graph, [a.astype(np.float64) for a in arrays])
    np.testing.assert_allclose(got, exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("op", ["normalize", "normalize_grad", "moments"])
@pytest.mark.parametrize("shape, axes", [((8, 768), (1,)), ((4, 8, 32, 32), (0, 2, 3))])
def test_a_first_element_far_from_the_mean_costs_no_digits(op, shape, axes):
    """A line's first element 300 among unit normals (a transformer's massive activation): the
    sums of x - x0 and its square lost three digits of the variance to cancellation (layer norm
    1.4e-3 off where PyTorch's float32 is 5e-6)."""
    rng = np.random.default_rng(5)
    if op == "moments":
        b = Builder(op)
        b.add_output("out", b.bind(op, b.add_input(TensorType(shape, "float32"), "x"), axes=axes))
        graph = b.graph.verify()
    else:
        graph = op_graph(op, shape, axes)
    arrays = [rng.standard_normal(shape).astype(np.float32) for _ in graph.inputs]
    arrays[-1][(0,) * len(shape)] = 300.0  # x's first line starts far from its mean
    arrays[-1][(slice(None),) * (len(shape) - 1) + (0,)] = 300.0
    (got,) = compile_graph(graph, "numba-cpu")(*arrays)
    (exact,) = evaluate(graph, [a.astype(np.float64) for a in arrays])
    if op == "moments":  # (mean, variance), the variance large here: relative to it
        np.testing.assert_allclose(got, exact, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_allclose(got, exact, rtol=0, atol=2e-5)


def test_parallel_kernels_match_reference():
    rng = np.random.default_rng(4)
    with always_parallel():
        for op in ("normalize", "normalize_grad"):
            for axes in ((2,), (0, 2)):
                graph = op_graph(op, (5, 3, 8), axes)
                arrays = [rng.standard_normal((5, 3, 8)).astype(np.float32) for _ in graph.inputs]
                executable = compile_graph(graph, "numba-cpu")
                assert executable.kernels[0].generated.parallel
                (got,), (want,) = executable(*arrays), evaluate(graph, arrays)
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6, err_msg=f"{op} {axes}")


@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm"])
def test_second_derivative_on_numba_cpu_matches_finite_differences(layer):
    """grad of (a function of) grad through F.layer_norm and F.batch_norm (training):
    normalize_grad's own VJP, compiled."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 6))
    w, b, target = rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal((3, 6))

    def loss(x, w, b):
        y = (F.layer_norm(x, 6, w, b) if layer == "layer_norm"
             else batch_norm(x, None, None, w, b, training=True))
        return ((y - target) ** 2 * target).sum()

    def gradient_norm(x, w, b):
        return (gc.grad(loss)(x, w, b) ** 2).sum()

    got = gc.jit(gc.grad(gradient_norm, argnums=(0, 1)), backend="numba-cpu")(x, w, b)
    f = lambda x, w: float(gc.jit(gradient_norm, backend="reference")(x, w, b))
    step = 1e-6
    for index, array in enumerate((x, w)):
        expected = np.zeros_like(array)
        for i in np.ndindex(*array.shape):
            plus, minus = array.copy(), array.copy()
            plus[i] += step
            minus[i] -= step
            args = [(x, w), (plus, w), (minus, w)] if index == 0 else [(x, w), (x, plus), (x, minus)]
            expected[i] = (f(*args[1]) - f(*args[2])) / (2 * step)
        np.testing.assert_allclose(got[index], expected, rtol=1e-5, atol=1e-6)


def test_numba_cuda_simulator_matches_reference():
    on_cuda_simulator("test_normalize_kernel", "simulated_cuda_matches_reference")


def simulated_cuda_matches_reference():
    """(run by the test above, in a process with the simulator on)"""
    rng = np.random.default_rng(6)
    for op in ("normalize", "normalize_grad"):
        graph = op_graph(op, (3, 2, 4), (0, 2))
        arrays = [(rng.standard_normal((3, 2, 4)) + 5).astype(np.float32) for _ in graph.inputs]
        (got,), (want,) = compile_graph(graph, "numba-cuda")(*arrays), evaluate(graph, arrays)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=op)


@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm"])
def test_second_derivative_matches_pytorch(layer):
    """d/dx and d/dw of |d loss / dx|^2 (a gradient penalty) against torch's double backward."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((4, 3, 5)) * 2 + 1).astype(np.float32)
    channels = 5 if layer == "layer_norm" else 3
    w, b = (rng.standard_normal(channels).astype(np.float32) for _ in range(2))
    target = rng.standard_normal(x.shape).astype(np.float32)

    def ours(x, w, b):
        y = (F.layer_norm(x, 5, w, b) if layer == "layer_norm"
             else batch_norm(x, None, None, w, b, training=True))
        return ((y - target) ** 2).sum()

    def penalty(x, w, b):
        return (gc.grad(ours)(x, w, b) ** 2).sum()

    got = gc.jit(gc.grad(penalty, argnums=(0, 1)), backend="numba-cpu")(x, w, b)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    y = (torch.nn.functional.layer_norm(tx, (5,), tw, tb) if layer == "layer_norm"
         else torch.nn.functional.batch_norm(tx, None, None, tw, tb, training=True))
    (dx,) = torch.autograd.grad(((y - torch.from_numpy(target)) ** 2).sum(), tx, create_graph=True)
    want = torch.autograd.grad((dx ** 2).sum(), (tx, tw))
    for ours_part, theirs in zip(got, want):
        np.testing.assert_allclose(ours_part, theirs.numpy(), rtol=2e-3, atol=2e-3)
