"""Indexing primitives: NumPy forward, accumulating scatters, finite-difference VJPs and errors."""
import numpy as np
import pytest

from graphc.ir import AttributeSchemaError, DTypeError, ShapeError
from opcheck import check_vjp, run_op

rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def sample(shape):
    return rng.standard_normal(shape)


def indices(high, shape, dtype=np.int64):
    """Random indices in [-high, high): negative ones count from the end; repeats are likely."""
    return rng.integers(-high, high, shape).astype(dtype)


# -- take_along_axis / scatter_add_along_axis ---------------------------------------------------
ALONG_AXIS = [  # x shape, indices shape, axis
    ((3, 4), (3, 6), 1),
    ((3, 4), (2, 4), -2),
    ((2, 3, 4), (2, 3, 1), -1),
    ((1, 4), (3, 2), 1),      # x broadcasts against indices off the axis
    ((3, 4), (1, 2), 1),      # indices broadcast against x off the axis
    ((5,), (7,), 0),
]


@pytest.mark.parametrize("x_shape,idx_shape,axis", ALONG_AXIS, ids=str)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_take_along_axis_forward_and_vjp(x_shape, idx_shape, axis, dtype):
    x = sample(x_shape)
    idx = indices(x_shape[axis], idx_shape, dtype)
    np.testing.assert_array_equal(run_op("take_along_axis", [x, idx], axis=axis),
                                  np.take_along_axis(x, idx, axis=axis))
    check_vjp("take_along_axis", [x, idx], axis=axis)


def _scatter_along_axis_by_loops(g, idx, axis, shape):
    """Reference by definition: route each element of g to the x element take_along_axis read."""
    out = np.zeros(shape)
    for pos in np.ndindex(*g.shape):
        i = idx[tuple(p if n > 1 else 0 for p, n in zip(pos, idx.shape))]
        source = [p if n > 1 else 0 for p, n in zip(pos, shape)]
        source[axis] = i
        out[tuple(source)] += g[pos]
    return out


@pytest.mark.parametrize("x_shape,idx_shape,axis", ALONG_AXIS, ids=str)
def test_scatter_add_along_axis_accumulates_and_its_vjp_is_take(x_shape, idx_shape, axis):
    idx = indices(x_shape[axis], idx_shape)
    g = np.take_along_axis(sample(x_shape), idx, axis=axis)  # a value of the right shape
    out = run_op("scatter_add_along_axis", [g, idx], axis=axis, shape=x_shape)
    np.testing.assert_allclose(out, _scatter_along_axis_by_loops(g, idx, axis % len(x_shape), x_shape),
                               rtol=1e-12)
    check_vjp("scatter_add_along_axis", [g, idx], axis=axis, shape=x_shape)


def test_take_along_axis_errors():
    x = np.ones((3, 4))
    with pytest.raises(DTypeError, match=r"take_along_axis: indices must be int32 or int64, got float64"):
        run_op("take_along_axis", [x, np.zeros((3, 1))], axis=1)
    with pytest.raises(ShapeError, match=r"take_along_axis: indices must have the operand's rank 2, got rank 1"):
        run_op("take_along_axis", [x, np.zeros(3, np.int64)], axis=1)
    with pytest.raises(ShapeError, match=r"take_along_axis: indices shape \(2, 1\) does not broadcast "
                                         r"against \(3, 4\) outside axis 1"):
        run_op("take_along_axis", [x, np.zeros((2, 1), np.int64)], axis=1)
    with pytest.raises(ShapeError, match=r"take_along_axis: cannot index axis 1 of size 0"):
        run_op("take_along_axis", [np.ones((3, 0)), np.zeros((3, 1), np.int64)], axis=1)
    with pytest.raises(ShapeError, match=r"scatter_add_along_axis: operand shape \(3, 2\) differs from "
                                         r"\(3, 1\)"):
        run_op("scatter_add_along_axis", [np.ones((3, 2)), np.zeros((3, 1), np.int64)], axis=1, shape=(3, 4))


# -- gather / scatter_add -------------------------------------------------------------------
GATHER = [  # x shape, indices shape, axis
    ((5, 3), (4,), 0),        # embedding lookup
    ((5, 3), (2, 4), 0),
    ((2, 5, 3), (), 1),       # a scalar index drops the axis
    ((2, 5, 3), (3, 2), -2),
    ((4,), (6,), -1),
]


@pytest.mark.parametrize("x_shape,idx_shape,axis", GATHER, ids=str)
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_gather_forward_and_vjp(x_shape, idx_shape, axis, dtype):
    x = sample(x_shape)
    idx = indices(x_shape[axis], idx_shape, dtype)
    out = run_op("gather", [x, idx], axis=axis)
    np.testing.assert_array_equal(out, np.take(x, idx, axis=axis))
    check_vjp("gather", [x, idx], axis=axis)


@pytest.mark.parametrize("x_shape,idx_shape,axis", GATHER, ids=str)
def test_scatter_add_accumulates_and_its_vjp_is_gather(x_shape, idx_shape, axis):
    axis %= len(x_shape)
    idx = indices(x_shape[axis], idx_shape)
    g = np.take(sample(x_shape), idx, axis=axis)
    expected = np.zeros(x_shape)
    lead = (slice(None),) * axis
    for pos in np.ndindex(*idx.shape):
        expected[lead + (idx[pos],)] += g[lead + pos]
    out = run_op("scatter_add", [g, idx], axis=axis, size=x_shape[axis])
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    check_vjp("scatter_add", [g, idx], axis=axis, size=x_shape[axis])


def test_gather_and_scatter_add_errors():
    with pytest.raises(DTypeError, match=r"gather: indices must be int32 or int64, got bool"):
        run_op("gather", [np.ones((3, 2)), np.array([True])], axis=0)
    with pytest.raises(ShapeError, match=r"gather: axis 2 is out of range for rank 2"):
        run_op("gather", [np.ones((3, 2)), np.array([0])], axis=2)
    with pytest.raises(ShapeError, match=r"scatter_add: operand axes 1..2 have shape \(3, 2\), "
                                         r"indices have shape \(2, 2\)"):
        run_op("scatter_add", [np.ones((4, 3, 2)), np.zeros((2, 2), np.int64)], axis=1, size=5)
    with pytest.raises(ShapeError, match=r"scatter_add: operand of rank 1 cannot hold indices of rank 3"):
        run_op("scatter_add", [np.ones(4), np.zeros((1, 1, 4), np.int64)], axis=0, size=5)
    with pytest.raises(AttributeSchemaError, match=r"scatter_add: size must be non-negative, got -1"):
        run_op("scatter_add", [np.ones(4), np.zeros(4, np.int64)], axis=0, size=-1)
    with pytest.raises(DTypeError, match=r"scatter_add: expects a numeric operand, got bool"):
        run_op("scatter_add", [np.ones(4, bool), np.zeros(4, np.int64)], axis=0, size=2)


# -- one_hot --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "bool"])
def test_one_hot_with_out_of_range_indices_giving_zero_rows(dtype):
    idx = np.array([[0, 3, -1], [4, 2, 1]], np.int32)
    out = run_op("one_hot", [idx], num_classes=4, dtype=dtype)
    assert out.shape == (2, 3, 4) and out.dtype == np.dtype(dtype)
    expected = np.zeros((2, 3, 4), dtype)
    for pos in np.ndindex(*idx.shape):
        if 0 <= idx[pos] < 4:
            expected[pos + (idx[pos],)] = 1
    np.testing.assert_array_equal(out, expected)
    assert not out[0, 2].any() and not out[1, 0].any()  # -1 and 4 are out of range


def test_one_hot_defaults_and_errors():
    assert run_op("one_hot", [np.array([1, 0])], num_classes=2).dtype == np.float32
    with pytest.raises(DTypeError, match=r"one_hot: indices must be int32 or int64, got float32"):
        run_op("one_hot", [np.zeros(2, np.float32)], num_classes=3)
    with pytest.raises(AttributeSchemaError, match=r"one_hot: num_classes must be non-negative, got -2"):
        run_op("one_hot", [np.zeros(2, np.int64)], num_classes=-2)
