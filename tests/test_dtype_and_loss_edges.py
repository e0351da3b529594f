"""Values, dtypes and messages where graphc and PyTorch parted: NaN through norms and maxima,
Python lists as constants, one_hot, bool operators, integer means, the second derivative of
binary cross-entropy, kl_div of a negative target, and arguments of the wrong size."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import DTypeError, GraphcError, IndexOutOfRangeError, ShapeError

torch = pytest.importorskip("torch")


def test_a_norm_of_a_vector_with_a_nan_is_nan():
    """The zero-vector guard (squares > 0) took a NaN for a zero: the norm came out 0, and
    F.normalize divided by its epsilon instead."""
    x = np.array([[1.0, np.nan, 2.0], [3.0, 4.0, 0.0]], np.float32)
    tx = torch.tensor(x)
    for p in (2, 3, 0.5):
        np.testing.assert_array_equal(gc.jit(lambda a: a.norm(p=p, dim=1))(x),
                                      tx.norm(p=p, dim=1).numpy())
    assert np.isnan(gc.jit(lambda a: a.norm())(x))
    np.testing.assert_array_equal(gc.jit(lambda a: F.normalize(a, dim=1))(x),
                                  torch.nn.functional.normalize(tx, dim=1).numpy())
    assert np.isnan(gc.grad(lambda a: a.norm())(x)).all()
    np.testing.assert_array_equal(gc.grad(lambda a: a.norm())(np.zeros(3, np.float32)), 0)


def test_python_float_lists_are_float32_constants():
    """They came out float64, widening a float32 model (and failing a later matmul)."""
    x = np.array([1.0, 2.0], np.float32)
    for f in (lambda a: a + [0.5, 1.5], lambda a: gc.where(a > 1, a, [0.5, 1.5]),
              lambda a: gc.cat([a, [1.0]]), lambda a: (a * [[0.5], [1.5]]) @ np.ones((2, 2), np.float32)):
        assert gc.jit(f)(x).dtype == np.float32
    assert gc.jit(lambda a: a + np.array([0.5, 1.5]))(x).dtype == np.float64  # NumPy's own width


def test_functional_one_hot_is_pytorchs():
    """F.one_hot gave float32 and a row of zeros for a class out of range (JAX's gc.one_hot)."""
    y = np.array([0, 2, 1])
    got = gc.jit(lambda t: F.one_hot(t, 3))(y)
    np.testing.assert_array_equal(got, torch.nn.functional.one_hot(torch.tensor(y), 3).numpy())
    assert got.dtype == np.int64
    for bad in (np.array([0, 3]), np.array([-1, 0])):
        with pytest.raises(IndexOutOfRangeError, match="test_dtype_and_loss_edges"):
            gc.jit(lambda t: F.one_hot(t, 3))(bad)
    with pytest.raises(GraphcError, match="num_classes=-1: give the number of classes"):
        gc.jit(lambda t: F.one_hot(t))(y)
    assert gc.jit(lambda t: gc.one_hot(t, 3))(np.array([3])).tolist() == [[0.0, 0.0, 0.0]]


def test_bool_operators_take_bools_only_and_both_ways():
    """`mask & 2` was a logical and (PyTorch: a bitwise and of int64); `True & mask` and
    `mask ^ mask` were TypeErrors."""
    m = np.array([True, False, True])
    np.testing.assert_array_equal(gc.jit(lambda a: True & a)(m), m)
    np.testing.assert_array_equal(gc.jit(lambda a: False | a)(m), m)
    np.testing.assert_array_equal(gc.jit(lambda a: a ^ ~a)(m), [True, True, True])
    np.testing.assert_array_equal(gc.jit(lambda a: True ^ a)(m), ~m)
    for f in (lambda a: a & 2, lambda a: a | -2, lambda a: 2 & a, lambda a: a & np.array([1, 2, 3])):
        with pytest.raises(DTypeError, match="takes bool tensors and bools"):
            gc.jit(f)(m)


def test_the_gradient_of_a_maximum_that_is_nan_goes_to_the_nan():
    x = np.array([1.0, np.nan, 3.0], np.float32)
    tx = torch.tensor(x, requires_grad=True)
    tx.max().backward()
    np.testing.assert_array_equal(gc.grad(lambda a: a.max())(x), tx.grad.numpy())
    np.testing.assert_array_equal(gc.grad(lambda a: a.amin())(x), [0, 1, 0])


def test_the_mean_of_large_integers_does_not_wrap():
    x = np.array([2**62, 2**62])
    assert gc.jit(lambda a: a.mean())(x) == np.float32(2.0**62)


def test_binary_cross_entropys_second_derivative():
    """Its gradient was a constant to autodiff: Hessians and meta-gradients through it were 0."""
    p, t = np.array([0.3, 0.6], np.float32), np.array([1.0, 0.0], np.float32)
    loss = lambda q, y: F.binary_cross_entropy(q, y, reduction="sum")  # noqa: E731
    got = gc.grad(lambda q, y: (gc.grad(loss)(q, y) ** 2).sum())(p, t)
    tp = torch.tensor(p, requires_grad=True)
    (g,) = torch.autograd.grad(torch.nn.functional.binary_cross_entropy(tp, torch.tensor(t), reduction="sum"),
                               tp, create_graph=True)
    np.testing.assert_allclose(got, torch.autograd.grad((g ** 2).sum(), tp)[0].numpy(), rtol=1e-5)
    # the saturated ones keep PyTorch's finite first derivative
    np.testing.assert_allclose(gc.grad(loss)(np.array([0.0, 1.0], np.float32), t), [-1e12, 1e12], rtol=1e-6)


def test_kl_div_of_a_negative_target_is_nan_as_pytorchs():
    log_q = np.log(np.array([[0.2, 0.3, 0.5]], np.float32))
    t = np.array([[-0.1, 0.6, 0.5]], np.float32)
    assert np.isnan(gc.jit(lambda a, b: F.kl_div(a, b, reduction="sum"))(log_q, t))
    zero = np.array([[0.0, 0.5, 0.5]], np.float32)
    np.testing.assert_allclose(gc.jit(lambda a, b: F.kl_div(a, b, reduction="sum"))(log_q, zero),
                               torch.nn.functional.kl_div(torch.tensor(log_q), torch.tensor(zero),
                                                          reduction="sum").numpy(), rtol=1e-6)


def test_arguments_of_the_wrong_size_are_named():
    """The errors named an internal reshape, add or mul."""
    x = np.ones((2, 3, 4, 4), np.float32)
    cases = [
        (lambda a: F.group_norm(a, 1, np.ones(2, np.float32)), r"group_norm: weight must have shape \(3,\)"),
        (lambda a: F.conv2d(a, np.ones((2, 3, 3, 3), np.float32), bias=np.zeros(5, np.float32)),
         r"conv2d: bias must have shape \(2,\)"),
        (lambda a: F.linear(a, np.ones((2, 4), np.float32), np.zeros(3, np.float32)),
         r"linear: bias must have shape \(2,\)"),
        (lambda a: F.binary_cross_entropy_with_logits(a, a, pos_weight=np.ones(5, np.float32)),
         r"pos_weight \(5,\) does not broadcast to the logits"),
        (lambda a: F.cross_entropy(np.zeros((2, 0), np.float32), np.zeros(2, np.int64)),
         r"cross_entropy: the logits \(2, 0\) have no class"),
        (lambda a: F.embedding(np.array([1]), np.ones((5, 3, 2), np.float32)),
         r"embedding: the weight is a \(num_embeddings, embedding_dim\) table")]
    for f, message in cases:
        with pytest.raises(ShapeError, match=message + ".*test_dtype_and_loss_edges"):
            gc.jit(f)(x)
    with pytest.raises(GraphcError, match="Embedding: max_norm .* not supported"):
        nn.Embedding(5, 3, max_norm=1.0)


@pytest.mark.parametrize("op", ["exp", "log", "log1p", "expm1", "sqrt", "rsqrt", "tanh", "sigmoid",
                                "reciprocal", "sin", "cos", "erf"])
def test_elementwise_math_of_integers_is_float32_as_pytorchs(op):
    """They were refused; PyTorch computes an integer or bool tensor in float32."""
    x = np.array([1, 2, 4])
    expected = getattr(torch, op)(torch.tensor(x)).numpy()
    got = gc.jit(lambda a: getattr(gc, op)(a))(x)
    assert got.dtype == expected.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=2e-6)
    if hasattr(gc.Tensor, op):
        np.testing.assert_allclose(gc.jit(lambda a: getattr(a, op)())(x), expected, rtol=2e-6)


def test_relu6_and_hardtanh_keep_integers():
    x = np.array([-5, 1, 2, 9])
    for f, reference in ((F.relu6, torch.nn.functional.relu6), (F.hardtanh, torch.nn.functional.hardtanh)):
        got, expected = gc.jit(f)(x), reference(torch.tensor(x)).numpy()
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_a_constant_of_a_dtype_graphc_lacks_is_named_at_its_line():
    with pytest.raises(DTypeError, match=r"unsupported dtype 'uint8'.*cast it first.*test_dtype_and_loss_edges"):
        gc.jit(lambda a: a + np.array([1, 2], np.uint8))(np.ones(2, np.float32))


def test_an_einsum_diagonal_keeps_the_operands_dtype():
    a = np.arange(9, dtype=np.int32).reshape(3, 3)
    for x in (a, a % 2 == 0):
        expected = torch.einsum("ii->i", torch.tensor(x)).numpy()
        got = gc.jit(lambda t: gc.einsum("ii->i", t))(x)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)


def test_functional_sigmoid_and_tanh_take_integers_and_silu_names_itself():
    i = np.array([-3, 0, 2])
    for ours, theirs in ((F.sigmoid, torch.sigmoid), (F.tanh, torch.tanh), (nn.Sigmoid(), torch.sigmoid),
                         (nn.Tanh(), torch.tanh)):
        np.testing.assert_allclose(gc.jit(ours)(i), theirs(torch.tensor(i)).numpy(), rtol=1e-6)
    with pytest.raises(DTypeError, match="silu: takes a floating-point tensor, got int64"):
        gc.jit(F.silu)(i)


def test_a_gru_given_an_lstms_state_pair_says_so():
    gru, x, h = nn.GRU(3, 4), np.zeros((5, 2, 3), np.float32), np.zeros((1, 2, 4), np.float32)
    with pytest.raises(ShapeError, match=r"GRU: the initial state is one tensor h_0 .* got a tuple"):
        gc.jit(lambda a, b: gru(a, (b, b))[0])(x, h)
