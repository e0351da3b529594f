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
