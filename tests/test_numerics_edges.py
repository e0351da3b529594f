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


@pytest.mark.parametrize("backend", BACKENDS)
def test_running_sums_and_products_of_float32_accumulate_in_float64(backend):
    """As PyTorch's: a running sum of 1e6 tenths was 100958 (1% off), and 1e30 * 1e30 * 0
    inf * 0 = NaN where PyTorch gives 0."""
    run = lambda f, x: gc.jit(lambda a: f(a, dim=0), backend=backend)(x)  # noqa: E731
    tenths = np.full(10**6, 0.1, np.float32)
    assert run(gc.cumsum, tenths)[-1] == torch.cumsum(torch.tensor(tenths), 0)[-1].item()
    for f, tf, x in [(gc.cumprod, torch.cumprod, [1e30, 1e30, 0, 5]),
                     (gc.cumsum, torch.cumsum, [3e38, 3e38, -3e38])]:
        x = np.array(x, np.float32)
        got = run(f, x)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, tf(torch.tensor(x), 0).numpy())
    x = np.array([1.0, 2.0, 0.0, 3.0], np.float32)
    grad = gc.grad(lambda a: gc.cumprod(a, dim=0).sum(), backend=backend)(x)
    assert grad.dtype == np.float32
    np.testing.assert_array_equal(grad, [3, 1, 8, 0])


@pytest.mark.parametrize("loss, keyword", [(F.smooth_l1_loss, {"beta": 1.0}),
                                           (F.smooth_l1_loss, {"beta": 0.3}),
                                           (F.huber_loss, {"delta": 2.0})])
def test_huber_losses_differentiate_at_infinite_and_zero_residuals(loss, keyword):
    """The quadratic side's discarded gradient was 0 * inf = NaN at an infinite residual, and
    the square of |d| had second derivative 0 at d = 0 (sign(0)^2), where PyTorch's is 1/beta."""
    name = loss.__name__
    pred = np.array([0.5, 3.0, np.inf, 3e38, 0.0, -0.2], np.float32)
    target = np.array([0, 0, 0, -3e38, 0, 0], np.float32)
    tp = torch.tensor(pred, requires_grad=True)
    want = torch.autograd.grad(getattr(torch.nn.functional, name)(
        tp, torch.tensor(target), reduction="sum", **keyword), tp)[0].numpy()
    for backend in BACKENDS:
        got = gc.grad(lambda p, t: loss(p, t, reduction="sum", **keyword), backend=backend)(pred, target)
        np.testing.assert_allclose(got, want, rtol=1e-6)
    x = np.array([0.0, 0.5, 2.0])
    second = gc.grad(lambda a: gc.grad(lambda b: loss(b, b * 0, reduction="sum", **keyword))(a).sum())(x)
    tx = torch.tensor(x, requires_grad=True)
    first = torch.autograd.grad(getattr(torch.nn.functional, name)(
        tx, tx.detach() * 0, reduction="sum", **keyword), tx, create_graph=True)[0]
    np.testing.assert_allclose(second, torch.autograd.grad(first.sum(), tx)[0].numpy())


@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
def test_second_moments_of_huge_gradients_do_not_overflow(name):
    """g² * (1 - beta2) overflowed float32 from |g| ~ 1.8e19: the update became 0 and the
    parameter froze; PyTorch multiplies (g (1 - beta2)) g."""
    model = gc.nn.Linear(3, 1, bias=False)
    model.weight = gc.nn.Parameter(np.ones((1, 3), np.float32))
    scale = np.array([1, 1e19, 3e19], np.float32)
    x = np.zeros((1, 3), np.float32)
    step = gc.compile_train_step(model, lambda out, s: (model.weight * s).sum(),
                                 getattr(gc.optim, name)(model.parameters(), lr=0.1), (x, scale))
    weight = torch.nn.Parameter(torch.ones(1, 3))
    reference = getattr(torch.optim, name)([weight], lr=0.1)
    for _ in range(3):
        step(x, scale)
        reference.zero_grad()
        (weight * torch.tensor(scale)).sum().backward()
        reference.step()
    np.testing.assert_allclose(model.weight, weight.detach().numpy(), rtol=1e-5)


def test_min_and_argmin_over_an_empty_axis_name_themselves():
    x = np.zeros((3, 0), np.float32)
    for call, op in [(lambda a: gc.amin(a, 1), "min"), (lambda a: a.min(1), "min"),
                     (lambda a: gc.argmin(a, 1), "argmin")]:
        with pytest.raises(gc.ir.ShapeError, match=rf"^{op}: cannot take the minimum over axis 1"):
            gc.jit(call)(x)


def test_running_sums_accumulate_in_float64_when_float32_is_asked_for_too():
    """dtype=float32 kept the float32 accumulation PyTorch does not have (2^25 ones summed
    to 2^24)."""
    tenths = np.full(10**6, 0.1, np.float32)
    assert gc.jit(lambda a: a.cumsum(0, dtype=np.float32))(tenths)[-1] == np.float32(100000.0)
    assert gc.jit(lambda a: a.cumsum(0, dtype=np.float32))(np.ones(2**25, np.int64))[-1] == 2**25
    np.testing.assert_array_equal(
        gc.jit(lambda a: a.cumprod(0, dtype=np.float32))(np.array([1e30, 1e30, 0], np.float32)),
        np.array([1e30, np.inf, 0], np.float32))


@pytest.mark.parametrize("beta", [1e-36, 1e-38, 1.0])
def test_smooth_l1_with_a_tiny_beta_is_the_l1_loss(beta):
    """1 / beta overflowed float32 below beta ~ 3e-39 and (|d| - beta/2) * beta underflowed:
    2% off at 1e-36, 0 at 1e-38."""
    x, t = np.array([0.0, 1e-8, -0.5, 2.0], np.float32), np.zeros(4, np.float32)
    got = gc.jit(lambda a, b: F.smooth_l1_loss(a, b, beta=beta, reduction="none"))(x, t)
    want = torch.nn.functional.smooth_l1_loss(torch.tensor(x), torch.tensor(t), beta=beta,
                                              reduction="none").numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
