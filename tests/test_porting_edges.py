"""What code ported from PyTorch and JAX passes graphc: empty dims, NumPy integers as sizes and
argnums, Python integers where a size must be static, convolution and pooling arguments, nearest
and linear resampling, and the arrays a training step is called with."""
import numpy as np
import pytest

import graphc as gc

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("op", ["sum", "mean", "amax", "amin", "var", "std", "norm"])
@pytest.mark.parametrize("empty", [(), []])
def test_an_empty_dim_reduces_every_axis_as_pytorch_and_an_empty_axis_none_as_numpy(op, empty):
    """`dim=()` kept every axis (NumPy's meaning of axis=()): ported code building its dims, as
    `x.sum(dim=tuple(range(1, x.ndim)))` of a vector, got the tensor back unreduced."""
    x = np.arange(6.0).reshape(2, 3)
    expected = getattr(torch.tensor(x), op)(dim=empty).numpy()
    np.testing.assert_allclose(gc.jit(lambda a: getattr(a, op)(dim=empty))(x), expected)
    if op != "norm":
        np.testing.assert_allclose(gc.jit(lambda a: getattr(gc, op)(a, dim=empty))(x), expected)
    numpy_name = {"amax": "max", "amin": "min"}.get(op, op)
    if hasattr(np, numpy_name) and op != "norm":
        np_op = getattr(np, numpy_name)
        np.testing.assert_allclose(gc.jit(lambda a: np_op(a, axis=()))(x), np_op(x, axis=()))


@pytest.mark.parametrize("use", [lambda x, n: gc.zeros(n), lambda x, n: x.split(n),
                                 lambda x, n: x.repeat(n), lambda x, n: x.sum(n),
                                 lambda x, n: gc.cumsum(x, n)])
def test_a_number_argument_used_as_a_size_says_sizes_are_static(use):
    """A jitted function's int argument is a traced 0-d tensor: as a size it failed with a bare
    `TypeError: len() of a 0-d tensor`, naming neither the cause nor the user's line."""
    with pytest.raises(gc.ir.errors.TracedValueError,
                       match=r"a number argument of a traced function is a tensor.*shapes are "
                             r"static.*test_porting_edges.py"):
        gc.jit(use)(np.arange(6.0), 0)


def test_argnums_takes_numpy_integers_and_names_anything_else():
    x = np.arange(3.0)
    loss = lambda a, b: (a * b * b).sum()  # noqa: E731
    np.testing.assert_array_equal(gc.grad(loss, argnums=np.int64(1))(x, x), 2 * x * x)
    grads = gc.grad(loss, argnums=(np.int32(0), 1))(x, x)
    np.testing.assert_array_equal(grads[0], x * x)
    for bad in ("0", 1.0, True, (0, None)):
        with pytest.raises(gc.ir.GraphcError, match="argnums must be an integer or a tuple"):
            gc.grad(loss, argnums=bad)(x, x)


def test_the_gradient_of_a_vector_says_how_to_take_a_vector_jacobian_product():
    with pytest.raises(gc.ir.GraphcError, match=r"grad needs a scalar.*\(y \* cotangent\)\.sum"):
        gc.grad(lambda x: x ** 2)(np.arange(3.0))
