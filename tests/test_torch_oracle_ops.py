"""matmul, conv2d and pooling against PyTorch, a second oracle: forward values and the
gradients of every operand, with graphc's gradients computed by its VJP graphs on the reference
backend (1e-10 relative in float64, 1e-4 in float32)."""
import numpy as np
import pytest

from graphc.backends.reference import evaluate
from graphc.ir import TensorType
from opcheck import run_op, vjp_graph

torch = pytest.importorskip("torch")
F = torch.nn.functional

RTOL = {"float64": 1e-10, "float32": 1e-4}
DTYPES = sorted(RTOL)


def assert_close(actual: np.ndarray, expected, dtype: str, what: str) -> None:
    expected = expected.detach().numpy()
    assert actual.dtype == expected.dtype, what
    # Relative to each element, with an absolute floor relative to the tensor's scale, so
    # elements that cancel to almost zero do not demand more than the dtype carries.
    rtol = RTOL[dtype]
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max(),
                               err_msg=what)


def compare_with_torch(op: str, torch_fn, arrays: list[np.ndarray], dtype: str, **attrs) -> None:
    """Forward and every operand's gradient of graphc's `op` against `torch_fn`."""
    arrays = [a.astype(dtype) for a in arrays]
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    expected = torch_fn(*tensors)
    g = np.random.default_rng(1).standard_normal(tuple(expected.shape)).astype(dtype)
    expected.backward(torch.from_numpy(g))

    assert_close(run_op(op, arrays, **attrs), expected, dtype, f"{op} forward")
    graph = vjp_graph(op, [TensorType.of(a) for a in arrays], **attrs)
    grads = dict(zip(graph.output_names, evaluate(graph, [*arrays, g])))
    for i, t in enumerate(tensors):
        assert_close(grads[f"d{i}"], t.grad, dtype, f"{op} gradient of input {i}")


rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [((3, 4), (4, 5)), ((2, 3, 4), (4, 5)), ((3, 4), (2, 4, 5)),
                                    ((2, 1, 3, 4), (5, 4, 2)), ((64, 96), (96, 32))], ids=str)
def test_matmul(shapes, dtype):
    compare_with_torch("matmul", torch.matmul, [randn(*shapes[0]), randn(*shapes[1])], dtype)


CONV_CASES = {
    "plain": ((2, 3, 6, 7), (4, 3, 3, 3), {}),
    "stride_padding": ((2, 3, 9, 8), (5, 3, 3, 2), {"stride": (2, 3), "padding": (1, 2)}),
    "dilation": ((1, 2, 9, 9), (3, 2, 3, 3), {"dilation": (2, 3), "padding": (2, 1)}),
    "groups": ((2, 6, 7, 7), (9, 2, 3, 3), {"groups": 3, "stride": (2, 2)}),
    "depthwise": ((2, 4, 6, 6), (4, 1, 3, 3), {"groups": 4, "padding": (1, 1)}),
    "mnist_conv1": ((8, 1, 28, 28), (32, 1, 3, 3), {}),
    "mnist_conv2": ((4, 32, 26, 26), (64, 32, 3, 3), {}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CONV_CASES))
def test_conv2d(name, dtype):
    x_shape, w_shape, attrs = CONV_CASES[name]
    compare_with_torch("conv2d", lambda x, w: F.conv2d(x, w, **attrs),
                       [randn(*x_shape), randn(*w_shape)], dtype, **attrs)


POOL_CASES = {
    "2x2": ((4, 3, 8, 6), (2, 2), (2, 2), (0, 0)),
    "overlapping_padded": ((2, 2, 7, 7), (3, 3), (1, 1), (1, 1)),
    "rectangular_uncovered": ((2, 2, 9, 7), (3, 2), (2, 3), (1, 1)),
    "mnist_pool": ((4, 64, 24, 24), (2, 2), (2, 2), (0, 0)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_max_pool2d(name, dtype):
    shape, kernel, stride, padding = POOL_CASES[name]
    compare_with_torch("max_pool2d", lambda x: F.max_pool2d(x, kernel, stride, padding),
                       [randn(*shape)], dtype, kernel=kernel, stride=stride, padding=padding)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_pool2d_ties_match_torch(dtype):
    # Small integers make ties in most windows; both must pick the first maximum.
    x = np.random.default_rng(2).integers(0, 3, (2, 3, 7, 7)).astype(float)
    compare_with_torch("max_pool2d", lambda t: F.max_pool2d(t, 3, 2, 1), [x], dtype,
                       kernel=3, stride=2, padding=1)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(POOL_CASES))
def test_avg_pool2d(name, dtype, count_include_pad):
    shape, kernel, stride, padding = POOL_CASES[name]
    compare_with_torch(
        "avg_pool2d",
        lambda x: F.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad),
        [randn(*shape)], dtype, kernel=kernel, stride=stride, padding=padding,
        count_include_pad=count_include_pad)
