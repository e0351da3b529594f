"""Values at the edges of float arithmetic, against PyTorch: log_softmax of large logits,
exact zeros through compiled elementwise kernels, running sums and products, the gradients of
Huber losses at infinite and zero residuals, and Adam's second moment of huge gradients."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F

torch = pytest.importorskip("torch")
BACKENDS = ["reference", "numba-cpu"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_log_softmax_of_large_logits_keeps_its_digits(backend):
    """x - logsumexp(x) cancels in float32: logits of 3e4 came out [-1.3125, -0.3125] and the
    cross-entropy of [1e8, 1e8] 0.156 (PyTorch: 0.503). A row holding +inf, or only -inf, is
    NaN as PyTorch's (it was [nan, -inf])."""
    x = np.array([[1e8, 1e8], [3e4, 3e4 + 1], [np.inf, 1], [-np.inf, -np.inf], [-np.inf, 2]],
                 np.float32)
    got = gc.jit(lambda a: F.log_softmax(a, dim=1), backend=backend)(x)
    np.testing.assert_allclose(got, torch.log_softmax(torch.tensor(x), 1).numpy(), rtol=1e-6)
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((64, 10)) + 1e4).astype(np.float32)
    labels = rng.integers(0, 10, 64)
    loss = gc.jit(lambda a, t: F.cross_entropy(a, t), backend=backend)(logits, labels)
    exact = torch.nn.functional.cross_entropy(torch.tensor(logits, dtype=torch.float64),
                                              torch.tensor(labels))
    assert abs(float(loss) - float(exact)) < 1e-5


def test_compiled_elementwise_kernels_do_not_fuse_multiplies_into_adds():
    """FMA contraction kept a * a unrounded in a * a - b * b: where a = b numba-cpu gave a
    rounding residual (sqrt of it NaN, sign of it +-1), the reference and PyTorch 0."""
    a = np.linspace(0.1, 3.0, 8).astype(np.float32)
    np.testing.assert_array_equal(gc.jit(lambda x, y: gc.sqrt(x * x - y * y))(a, a.copy()), 0)
    np.testing.assert_array_equal(
        gc.jit(lambda x, y, z: gc.sign(x * z - y * z))(a, a.copy(), a[::-1].copy()), 0)
