"""Shape primitives: NumPy forward, finite-difference VJPs, canonical attributes and errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from graphc.ir import AttributeSchemaError, Builder, DTypeError, ShapeError, TensorType
from graphc.ir.registry import get
from opcheck import check_vjp, run_op

SMALL = settings(max_examples=15, deadline=None)
SEEDS = st.integers(0, 2**32 - 1)  # an example's arrays come from its own seed, so it replays exactly
rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def sample(shape):
    return rng.standard_normal(shape)


# -- reshape / transpose / broadcast_to -------------------------------------------------------
@pytest.mark.parametrize("before,after", [((2, 3), (3, 2)), ((2, 3, 4), (6, 4)), ((6,), (1, 6, 1)),
                                          ((), (1, 1)), ((0, 3), (3, 0))])
def test_reshape(before, after):
    x = sample(before)
    np.testing.assert_array_equal(run_op("reshape", [x], shape=after), x.reshape(after))
    check_vjp("reshape", [x], shape=after)


def test_reshape_errors():
    with pytest.raises(ShapeError, match=r"reshape: cannot reshape \(2, 3\) \(6 elements\) to \(4,\) \(4 elements\)"):
        run_op("reshape", [np.ones((2, 3))], shape=(4,))
    with pytest.raises(AttributeSchemaError, match=r"reshape: shape \(3, -1\) has a negative dimension "
                                                   r"\(the frontend resolves -1"):
        run_op("reshape", [np.ones((2, 3))], shape=(3, -1))


@SMALL
@given(st.data())
def test_transpose_forward_and_vjp(data):
    shape = data.draw(array_shapes(min_dims=0, max_dims=4, max_side=3))
    perm = data.draw(st.permutations(range(len(shape))))
    signed = tuple(p - len(shape) if data.draw(st.booleans()) else p for p in perm)
    x = np.random.default_rng(data.draw(SEEDS)).standard_normal(shape)
    np.testing.assert_array_equal(run_op("transpose", [x], perm=signed), np.transpose(x, perm))
    check_vjp("transpose", [x], perm=signed)


def test_transpose_errors():
    with pytest.raises(ShapeError, match=r"transpose: perm \(0, 0\) is not a permutation of the axes 0..1"):
        run_op("transpose", [np.ones((2, 3))], perm=(0, 0))
    with pytest.raises(ShapeError, match=r"transpose: perm \(1, 0, 2\) has 3 entries for rank 2"):
        run_op("transpose", [np.ones((2, 3))], perm=(1, 0, 2))


@pytest.mark.parametrize("before,after", [((3,), (2, 3)), ((2, 1), (2, 5)), ((1, 3, 1), (4, 3, 2)),
                                          ((), (2, 2)), ((2, 3), (2, 3)), ((1,), (0,))])
def test_broadcast_to(before, after):
    x = sample(before)
    np.testing.assert_array_equal(run_op("broadcast_to", [x], shape=after), np.broadcast_to(x, after))
    check_vjp("broadcast_to", [x], shape=after)


@pytest.mark.parametrize("before,after", [((3,), (4,)), ((2, 3), (3,)), ((2, 1), (2, 3, 4))])
def test_broadcast_to_errors(before, after):
    with pytest.raises(ShapeError, match=rf"broadcast_to: cannot broadcast \({before[0]}"):
        run_op("broadcast_to", [np.ones(before)], shape=after)


# -- expand_dims / squeeze --------------------------------------------------------------------
@pytest.mark.parametrize("shape,axes", [((3,), (0,)), ((3,), (-1,)), ((2, 3), (0, 3)), ((2, 3), (-1, 1)),
                                        ((), (0, 1))])
def test_expand_dims_and_squeeze_invert_each_other(shape, axes):
    x = sample(shape)
    expected = np.expand_dims(x, axes)
    np.testing.assert_array_equal(run_op("expand_dims", [x], axes=axes), expected)
    check_vjp("expand_dims", [x], axes=axes)
    np.testing.assert_array_equal(run_op("squeeze", [expected], axes=axes), x)
    check_vjp("squeeze", [expected], axes=axes)


def test_expand_dims_and_squeeze_errors():
    with pytest.raises(ShapeError, match=r"squeeze: cannot squeeze axis 1 of size 3"):
        run_op("squeeze", [np.ones((1, 3))], axes=(0, -1))
    with pytest.raises(ShapeError, match=r"expand_dims: axis 3 is out of range for rank 3"):
        run_op("expand_dims", [np.ones((2, 3))], axes=(3,))
    with pytest.raises(ShapeError, match=r"expand_dims: duplicate axes in \(0, -3\) for rank 3"):
        run_op("expand_dims", [np.ones(2)], axes=(0, -3))


# -- slice / slice_grad -------------------------------------------------------------------------
@st.composite
def sliced_array(draw):
    """An array and per-axis (start, stop, step): NumPy-style, so negative and out of range too."""
    shape = draw(array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=5))
    bound = st.integers(-7, 7)
    starts, stops, steps = zip(*[(draw(bound), draw(bound), draw(st.integers(1, 3))) for _ in shape])
    return np.random.default_rng(draw(SEEDS)).standard_normal(shape), starts, stops, steps


def _numpy_slice(x, starts, stops, steps):
    return x[tuple(slice(*bounds) for bounds in zip(starts, stops, steps))]


@SMALL
@given(sliced_array())
def test_slice_forward_and_vjp(case):
    x, starts, stops, steps = case
    attrs = dict(starts=starts, stops=stops, steps=steps)
    np.testing.assert_array_equal(run_op("slice", [x], **attrs), _numpy_slice(x, *case[1:]))
    check_vjp("slice", [x], **attrs)


@SMALL
@given(sliced_array())
def test_slice_grad_scatters_into_zeros_and_its_vjp_is_slice(case):
    x, starts, stops, steps = case
    attrs = dict(shape=x.shape, starts=starts, stops=stops, steps=steps)
    g = _numpy_slice(x, starts, stops, steps)
    expected = np.zeros_like(x)
    expected[tuple(slice(*bounds) for bounds in zip(starts, stops, steps))] = g
    np.testing.assert_array_equal(run_op("slice_grad", [g], **attrs), expected)
    check_vjp("slice_grad", [g], **attrs)  # grad-of-grad of slice goes through this rule


def test_slice_bounds_are_canonicalised():
    b = Builder()
    x = b.add_input(TensorType((5, 4), "float32"), "x")
    b.slice(x, starts=(-2, 3), stops=(100, 1), steps=(1, 2))
    assert b.graph.nodes[0].attrs == {"starts": (3, 3), "stops": (5, 3), "steps": (1, 2)}
    assert b.graph.nodes[0].output.shape == (2, 0)


def test_slice_errors():
    x = np.ones((4, 4))
    with pytest.raises(AttributeSchemaError, match=r"slice: steps must be positive, got \(1, 0\)"):
        run_op("slice", [x], starts=(0, 0), stops=(4, 4), steps=(1, 0))
    with pytest.raises(ShapeError, match=r"slice: needs one start, stop and step per axis \(2\), got 1, 1 and 1"):
        run_op("slice", [x], starts=(0,), stops=(4,), steps=(1,))
    with pytest.raises(ShapeError, match=r"slice_grad: operand shape \(3,\) differs from the shape \(2,\)"):
        run_op("slice_grad", [np.ones(3)], shape=(4,), starts=(0,), stops=(4,), steps=(2,))


# -- concatenate ----------------------------------------------------------------------------
@pytest.mark.parametrize("shapes,axis", [([(2, 3), (4, 3)], 0), ([(2, 1), (2, 3), (2, 0), (2, 2)], -1),
                                         ([(2, 3, 1)], 1), ([(1, 2, 3), (1, 2, 2)], 2)])
def test_concatenate_forward_and_vjp(shapes, axis):
    xs = [sample(s) for s in shapes]
    np.testing.assert_array_equal(run_op("concatenate", xs, axis=axis), np.concatenate(xs, axis=axis))
    check_vjp("concatenate", xs, axis=axis)


def test_concatenate_errors():
    with pytest.raises(ShapeError, match=r"concatenate: shapes \(2, 3\) and \(2, 4\) differ outside axis 0"):
        run_op("concatenate", [np.ones((2, 3)), np.ones((2, 4))], axis=0)
    with pytest.raises(DTypeError, match=r"concatenate: dtype mismatch float64 vs float32"):
        run_op("concatenate", [np.ones(2), np.ones(2, np.float32)], axis=0)
    with pytest.raises(ShapeError, match=r"concatenate: axis 0 is out of range for rank 0"):
        run_op("concatenate", [np.ones(()), np.ones(())], axis=0)
    with pytest.raises(ShapeError, match=r"concatenate: needs at least one operand"):
        Builder().concatenate(axis=0)


# -- pad ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape,pads,value", [((3,), ((1, 2),), 0.0), ((2, 3), ((0, 1), (2, 0)), -1.5),
                                              ((2, 0), ((1, 1), (0, 2)), 4.0)])
def test_pad_forward_and_vjp(shape, pads, value):
    x = sample(shape)
    np.testing.assert_array_equal(run_op("pad", [x], pads=pads, value=value),
                                  np.pad(x, pads, constant_values=value))
    check_vjp("pad", [x], pads=pads, value=value)


def test_pad_integer_operands_and_errors():
    x = np.arange(4, dtype=np.int32).reshape(2, 2)
    out = run_op("pad", [x], pads=((1, 0), (0, 1)), value=7)
    np.testing.assert_array_equal(out, np.pad(x, ((1, 0), (0, 1)), constant_values=7))
    assert out.dtype == np.int32
    assert run_op("pad", [np.array(5, np.int64)], pads=(), value=1) == 5  # rank 0: nothing to pad
    with pytest.raises(DTypeError, match=r"pad: pad value 0.5 is not representable in int32"):
        run_op("pad", [x], pads=((0, 0), (0, 0)), value=0.5)
    with pytest.raises(AttributeSchemaError, match=r"pad: pad widths must be non-negative"):
        run_op("pad", [x], pads=((0, -1), (0, 0)))
    with pytest.raises(ShapeError, match=r"pad: needs one \(before, after\) pair per axis \(2\), got 1"):
        run_op("pad", [x], pads=((1, 1),))


# -- all shape ops -------------------------------------------------------------------------
@pytest.mark.parametrize("op,attrs", [("reshape", {"shape": (4,)}), ("transpose", {"perm": (1, 0)}),
                                      ("expand_dims", {"axes": (0,)}), ("squeeze", {"axes": ()}),
                                      ("broadcast_to", {"shape": (3, 2, 2)}),
                                      ("slice", {"starts": (0, 0), "stops": (2, 2), "steps": (1, 1)})])
def test_reference_impls_return_fresh_arrays(op, attrs):
    x = np.arange(4.0).reshape(2, 2)
    out = get(op).impl(x, **attrs)
    assert not np.shares_memory(out, x) and out.flags.c_contiguous and out.flags.writeable
