"""PyTorch's pooling options on graphc's functions and layers: ceil_mode (a last, partial window
per axis), avg_pool2d's count_include_pad and divisor_override, in PyTorch's argument order.
Values against NumPy loops written from PyTorch's definition, on the reference and numba-cpu;
values and gradients against PyTorch itself where it is installed."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import GraphcError, ShapeError

# (input H, W, kernel, stride, padding): each leaves a partial last window on some axis
# (3, 5, 4, 4, 0): the kernel outgrows the plane's height; ceil_mode still holds one window
CASES = [(7, 7, 2, 2, 0), (8, 6, 3, 2, 1), (5, 9, 3, 3, 1), (6, 6, 2, 2, 0), (10, 11, 4, 3, 2), (3, 5, 4, 4, 0)]


def windows(size, kernel, stride, padding):
    """(start, end) of each ceil_mode window along an axis, by PyTorch's rule, counted from the
    input's first cell (a negative start lies in the padding)."""
    outputs = -(-(size + 2 * padding - kernel) // stride) + 1
    if (outputs - 1) * stride >= size + padding:
        outputs -= 1
    return [(i * stride - padding, i * stride - padding + kernel) for i in range(outputs)]


def pooled(x, kernel, stride, padding, average, count_include_pad=True, divisor=None):
    h, w = x.shape[-2:]
    rows, cols = windows(h, kernel, stride, padding), windows(w, kernel, stride, padding)
    out = np.zeros(x.shape[:-2] + (len(rows), len(cols)))
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            block = x[..., max(r0, 0):min(r1, h), max(c0, 0):min(c1, w)]
            if not average:
                out[..., i, j] = block.max(axis=(-2, -1))
            elif divisor is not None:
                out[..., i, j] = block.sum(axis=(-2, -1)) / divisor
            elif count_include_pad:  # the padding counts, the cells past it ceil_mode adds do not
                area = (min(r1, h + padding) - r0) * (min(c1, w + padding) - c0)
                out[..., i, j] = block.sum(axis=(-2, -1)) / area
            else:
                out[..., i, j] = block.mean(axis=(-2, -1))
    return out


def pools(kernel, stride, padding):
    return lambda t: [F.max_pool2d(t, kernel, stride, padding, ceil_mode=True),
                      F.avg_pool2d(t, kernel, stride, padding, ceil_mode=True),
                      F.avg_pool2d(t, kernel, stride, padding, ceil_mode=True, count_include_pad=False),
                      F.avg_pool2d(t, kernel, stride, padding, True, True, 5)]  # PyTorch's order


VARIANTS = [dict(average=False), dict(average=True), dict(average=True, count_include_pad=False),
            dict(average=True, divisor=5)]


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
@pytest.mark.parametrize("h, w, kernel, stride, padding", CASES)
def test_ceil_mode_pools_as_pytorch_defines_it(h, w, kernel, stride, padding, backend):
    x = np.random.default_rng(h * w).standard_normal((2, 3, h, w)).astype("float32")
    outputs = gc.jit(pools(kernel, stride, padding), backend=backend)(x)
    for out, variant in zip(outputs, VARIANTS):
        want = pooled(x.astype(np.float64), kernel, stride, padding, **variant)
        assert out.shape == want.shape, variant
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6, err_msg=str(variant))


@pytest.mark.parametrize("h, w, kernel, stride, padding", CASES)
def test_values_and_gradients_match_pytorch(h, w, kernel, stride, padding):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(h + w).standard_normal((2, 3, h, w)).astype("float32")
    weights = [np.random.default_rng(k).standard_normal(o.shape).astype("float32")
               for k, o in enumerate(gc.jit(pools(kernel, stride, padding))(x))]

    def loss(t):
        return sum((o * w).sum() for o, w in zip(pools(kernel, stride, padding)(t), weights))
    value, gradient = gc.value_and_grad(loss)(x)
    tx = torch.tensor(x, requires_grad=True)
    tf = torch.nn.functional
    outs = [tf.max_pool2d(tx, kernel, stride, padding, ceil_mode=True),
            tf.avg_pool2d(tx, kernel, stride, padding, ceil_mode=True),
            tf.avg_pool2d(tx, kernel, stride, padding, ceil_mode=True, count_include_pad=False),
            tf.avg_pool2d(tx, kernel, stride, padding, True, True, 5)]
    expected = sum((o * torch.tensor(w)).sum() for o, w in zip(outs, weights))
    expected.backward()
    np.testing.assert_allclose(float(value), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(gradient, tx.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_the_layers_take_pytorchs_arguments():
    x = np.random.default_rng(0).standard_normal((1, 2, 7, 7)).astype("float32")
    layers = nn.Sequential(nn.MaxPool2d(3, 2, 1, 1, False, True), nn.AvgPool2d(2, 2, 0, True, False))
    out = gc.compile(layers, (x,))(x)
    first = pooled(x.astype(np.float64), 3, 2, 1, average=False)
    np.testing.assert_allclose(out, pooled(first, 2, 2, 0, average=True, count_include_pad=False),
                               rtol=1e-5, atol=1e-6)


def test_unsupported_options_are_named():
    x = np.zeros((1, 1, 4, 4), "float32")
    with pytest.raises(GraphcError, match="dilation"):
        gc.jit(lambda t: F.max_pool2d(t, 2, dilation=2))(x)
    with pytest.raises(GraphcError, match="return_indices"):
        gc.jit(lambda t: F.max_pool2d(t, 2, return_indices=True))(x)
    with pytest.raises(ShapeError, match="at most half the kernel"):
        gc.jit(lambda t: F.avg_pool2d(t, 2, padding=2, ceil_mode=True))(x)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_one_unbatched_sample_pools_as_its_batch_of_one(backend):
    """(C, H, W) input, as PyTorch's 2-D pools take it: the values and gradients of the same
    sample given as (1, C, H, W); other ranks are refused by name."""
    x = np.random.default_rng(3).standard_normal((3, 7, 6)).astype("float32")
    weights = [np.random.default_rng(k).standard_normal(o.shape[1:]).astype("float32")
               for k, o in enumerate(gc.jit(pools(3, 2, 1))(x[None]))]

    def loss(t):
        return sum((o * w).sum() for o, w in zip(pools(3, 2, 1)(t), weights))
    value, gradient = gc.value_and_grad(loss, backend=backend)(x)
    batched_value, batched_gradient = gc.value_and_grad(loss, backend=backend)(x[None])
    np.testing.assert_allclose(value, batched_value, rtol=1e-5)
    np.testing.assert_allclose(gradient, batched_gradient[0], rtol=1e-5, atol=1e-6)
    for layer in (nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1)):
        run = gc.jit(layer, backend=backend)
        np.testing.assert_allclose(run(x), run(x[None])[0])
    with pytest.raises(ShapeError, match=r"max_pool2d: expects an \(N, C, H, W\) or \(C, H, W\) input"):
        gc.jit(lambda t: F.max_pool2d(t, 2))(x[0])


@pytest.mark.parametrize("pool", [lambda t: F.max_pool2d(t, 2, stride=0),
                                  lambda t: nn.AvgPool2d(2, stride=0)(t),
                                  lambda t: F.avg_pool2d(t, 2, stride=(1, 0)), lambda t: F.max_pool2d(t, 0),
                                  lambda t: F.avg_pool2d(t, 2, padding=-1)])
def test_zero_strides_and_kernels_are_refused_as_pytorch_refuses_them(pool):
    """stride=0 pooled with the kernel's stride (0 read as 'not given')."""
    with pytest.raises(ShapeError, match="kernel and stride must be positive and padding non-negative"):
        gc.jit(pool)(np.zeros((1, 1, 4, 4), "float32"))


def test_a_zero_divisor_override_is_refused():
    with pytest.raises(ValueError, match="divisor_override must be a nonzero int"):
        gc.jit(lambda t: F.avg_pool2d(t, 2, divisor_override=0))(np.zeros((1, 1, 4, 4), "float32"))
