"""Reduction primitives: NumPy forward, finite-difference VJPs, tie handling and axis errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from graphc.backends.reference import evaluate
from graphc.ir import Builder, DTypeError, ShapeError, TensorType, VerificationError
from graphc.ir.graph import Node
from graphc.ir.registry import get
from opcheck import check_vjp, run_op, vjp_graph

SMALL = settings(max_examples=15, deadline=None)


@st.composite
def array_and_axes(draw, min_side=1):
    """A float64 array and a random subset of its axes, each written positive or negative."""
    shape = draw(array_shapes(min_dims=0, max_dims=3, min_side=min_side, max_side=4))
    axes = draw(st.lists(st.sampled_from(range(len(shape))), unique=True) if shape else st.just([]))
    signed = [a - len(shape) if draw(st.booleans()) else a for a in axes]
    x = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
    return x, tuple(signed)


@SMALL
@given(array_and_axes(), st.booleans())
def test_sum_forward_and_vjp(case, keepdims):
    x, axes = case
    np.testing.assert_allclose(run_op("sum", [x], axes=axes, keepdims=keepdims),
                               np.sum(x, axis=axes, keepdims=keepdims), rtol=1e-12)
    check_vjp("sum", [x], axes=axes, keepdims=keepdims)


@SMALL
@given(array_and_axes(), st.booleans())
def test_max_forward_and_vjp(case, keepdims):
    x, axes = case
    np.testing.assert_array_equal(run_op("max", [x], axes=axes, keepdims=keepdims),
                                  np.max(x, axis=axes, keepdims=keepdims))
    check_vjp("max", [x], axes=axes, keepdims=keepdims)


def test_sum_keeps_integer_dtype_and_allows_empty_axes():
    x = np.full((3, 2), 2**30, np.int32)
    out = run_op("sum", [x], axes=(1,))
    assert out.dtype == np.int32  # NumPy would widen to int64; graphc keeps the operand's dtype
    np.testing.assert_array_equal(out, np.sum(x, axis=1, dtype=np.int32))
    np.testing.assert_array_equal(run_op("sum", [x], axes=()), x)


def test_max_vjp_splits_cotangent_among_ties():
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    graph = vjp_graph("max", [TensorType.of(x)], axes=(-1,))
    (dx,) = evaluate(graph, [x, np.array([1.0, 3.0])])
    np.testing.assert_allclose(dx, [[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]])


@pytest.mark.parametrize("shape,axis", [((5,), 0), ((3, 4), 1), ((3, 4), -2), ((2, 3, 4), -1)])
@pytest.mark.parametrize("keepdims", [False, True])
def test_argmax_matches_numpy_first_maximum_wins(shape, axis, keepdims):
    x = np.random.default_rng(1).integers(0, 3, shape).astype(np.float64)  # many ties
    out = run_op("argmax", [x], axis=axis, keepdims=keepdims)
    assert out.dtype == np.int64
    np.testing.assert_array_equal(out, np.argmax(x, axis=axis, keepdims=keepdims))


def test_argmax_has_no_cotangent():
    b = Builder()
    x = b.add_input(TensorType((3, 4), "float64"), "x")
    out = b.argmax(x, axis=1)
    assert get("argmax").vjp(b, b.zeros_like(out), x, out=out, axis=1, keepdims=False) == (None,)


def test_bind_canonicalises_axes():
    b = Builder()
    x = b.add_input(TensorType((2, 3, 4), "float32"), "x")
    b.sum(x, axes=(-1, 0))
    b.argmax(x, axis=-2, keepdims=True)
    assert b.graph.nodes[0].attrs == {"axes": (0, 2), "keepdims": False}
    assert b.graph.nodes[1].attrs == {"axis": 1, "keepdims": True}


def test_verifier_rejects_non_canonical_axes():
    b = Builder("g")
    x = b.add_input(TensorType((2, 3), "float32"), "x")
    node = Node("sum", (x,), {"axes": (-1,), "keepdims": False}, (TensorType((2,), "float32"),))
    b.graph.nodes.append(node)
    with pytest.raises(VerificationError, match=r"axes \(-1,\) is not in canonical form \(1,\)"):
        b.graph.verify()


@pytest.mark.parametrize("op", ["sum", "max"])
def test_axis_errors_name_op_axis_and_operand(op):
    x = np.ones((2, 3))
    with pytest.raises(ShapeError, match=rf"{op}: axis 2 is out of range for rank 2 \(operands: f64\[2,3\]\)"):
        run_op(op, [x], axes=(0, 2))
    with pytest.raises(ShapeError, match=rf"{op}: duplicate axes in \(1, -1\) for rank 2"):
        run_op(op, [x], axes=(1, -1))
    with pytest.raises(DTypeError, match=rf"{op}: expects a numeric operand, got bool"):
        run_op(op, [x > 0], axes=(0,))


def test_max_and_argmax_reject_empty_axes():
    x = np.ones((3, 0))
    with pytest.raises(ShapeError, match=r"max: cannot take the max over axis 1 of size 0"):
        run_op("max", [x], axes=(1,))
    with pytest.raises(ShapeError, match=r"argmax: cannot take the argmax over axis 1 of size 0"):
        run_op("argmax", [x], axis=-1)
    assert run_op("sum", [x], axes=(1,)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ShapeError, match=r"argmax: axis -3 is out of range for rank 2"):
        run_op("argmax", [np.ones((2, 2))], axis=-3)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_var_and_std_keep_their_digits_where_the_mean_is_large_against_the_spread(backend):
    """x - mean with the mean rounded to float32 left its rounding error in every centred
    value: rows of 3e7 + 4 N(0, 1) had their variance 21% off (PyTorch's float32: 4e-8)."""
    import graphc as gc
    x = (3e7 + 4 * np.random.default_rng(0).standard_normal((4, 1000))).astype(np.float32)
    exact = x.astype(np.float64).var(axis=1, ddof=1)
    variance, deviation = gc.jit(lambda a: (a.var(1), a.std(1)), backend=backend)(x)
    np.testing.assert_allclose(variance, exact, rtol=1e-6)
    np.testing.assert_allclose(deviation, np.sqrt(exact), rtol=1e-6)
