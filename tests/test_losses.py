"""Losses against PyTorch: values and input gradients in float64 on the reference backend
(skipped without torch), the numba-cpu backend against the reference, and the refusals."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc.ir.errors import InputError, ShapeError

torch = pytest.importorskip("torch")
# PyTorch warns that kl_div's 'mean' will mean 'batchmean' one day: the test pins today's meaning.
pytestmark = pytest.mark.filterwarnings("ignore:reduction. 'mean' divides the total loss:UserWarning")
TF = torch.nn.functional


def class_targets(rng, shape, classes, ignored=()):
    target = rng.integers(0, classes, shape)
    target.reshape(-1)[list(ignored)] = -100
    return target


# name -> (inputs from a generator: "x" is differentiated, the rest are constants; the call,
# written once for both libraries: F is graphc's or torch's functional module)
CASES = {
    "cross_entropy_weight_ignore": (
        lambda r: dict(x=r.normal(size=(5, 4)), y=class_targets(r, 5, 4, ignored=[2]),
                       w=r.uniform(0.5, 2, 4)),
        lambda F, a, red: F.cross_entropy(a["x"], a["y"], weight=a["w"], reduction=red)),
    "cross_entropy_spatial_smoothing_weight": (
        lambda r: dict(x=r.normal(size=(2, 3, 2, 3)), y=class_targets(r, (2, 2, 3), 3, [4]),
                       w=r.uniform(0.5, 2, 3)),
        lambda F, a, red: F.cross_entropy(a["x"], a["y"], weight=a["w"], reduction=red,
                                          label_smoothing=0.2)),
    "cross_entropy_smoothing_unbatched": (
        lambda r: dict(x=r.normal(size=(4,)), y=np.array(2)),
        lambda F, a, red: F.cross_entropy(a["x"], a["y"], reduction=red, label_smoothing=0.1)),
    "cross_entropy_probabilities_weight_smoothing": (
        lambda r: dict(x=r.normal(size=(3, 4, 2)), p=r.dirichlet(np.ones(4), (3, 2)).transpose(0, 2, 1),
                       w=r.uniform(0.5, 2, 4)),
        lambda F, a, red: F.cross_entropy(a["x"], a["p"], weight=a["w"], reduction=red,
                                          label_smoothing=0.3)),
    "nll_loss_spatial_weight": (
        lambda r: dict(x=r.normal(size=(3, 4, 2)), y=class_targets(r, (3, 2), 4, [1]),
                       w=r.uniform(0.5, 2, 4)),
        lambda F, a, red: F.nll_loss(a["x"], a["y"], weight=a["w"], reduction=red)),
    "binary_cross_entropy_weight": (
        lambda r: dict(x=r.uniform(0.05, 0.95, (3, 4)), t=r.uniform(0, 1, (3, 4)),
                       w=r.uniform(0.5, 2, (3, 4))),
        lambda F, a, red: F.binary_cross_entropy(a["x"], a["t"], weight=a["w"], reduction=red)),
    "bce_with_logits_pos_weight": (
        lambda r: dict(x=r.normal(scale=4, size=(3, 4)), t=(r.uniform(size=(3, 4)) > 0.5) * 1.0,
                       w=r.uniform(0.5, 2, (3, 4)), pw=r.uniform(0.5, 3, 4)),
        lambda F, a, red: F.binary_cross_entropy_with_logits(a["x"], a["t"], weight=a["w"],
                                                             reduction=red, pos_weight=a["pw"])),
    "bce_with_logits_at_zero_and_extremes": (  # a zero-initialised head: every logit 0
        lambda r: dict(x=np.r_[np.zeros(4), -40.0, 40.0].reshape(2, 3),
                       t=np.r_[1.0, 0, 0.5, 1, 0, 1].reshape(2, 3), pw=np.array([0.5, 1.0, 3.0])),
        lambda F, a, red: F.binary_cross_entropy_with_logits(a["x"], a["t"], reduction=red,
                                                             pos_weight=a["pw"])),
    "binary_cross_entropy_at_zero_and_one": (  # a saturated sigmoid
        lambda r: dict(x=np.array([[0.0, 1.0, 1.0], [0.0, 0.5, 1e-20]]),
                       t=np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.3]])),
        lambda F, a, red: F.binary_cross_entropy(a["x"], a["t"], reduction=red)),
    "kl_div": (
        lambda r: dict(x=np.log(r.dirichlet(np.ones(4), 3)),
                       t=np.where(np.eye(3, 4) > 0, 0.0, r.dirichlet(np.ones(4), 3))),
        lambda F, a, red: F.kl_div(a["x"], a["t"], reduction=red)),
    "kl_div_log_target": (
        lambda r: dict(x=np.log(r.dirichlet(np.ones(4), 3)), t=np.log(r.dirichlet(np.ones(4), 3))),
        lambda F, a, red: F.kl_div(a["x"], a["t"], reduction=red, log_target=True)),
    "smooth_l1_loss": (
        lambda r: dict(x=r.normal(size=(4, 3)), t=r.normal(size=(4, 3))),
        lambda F, a, red: F.smooth_l1_loss(a["x"], a["t"], reduction=red, beta=0.7)),
    "huber_loss_weight": (
        lambda r: dict(x=r.normal(size=(4, 3)), t=r.normal(size=(4, 3)), w=r.uniform(0.5, 2, (4, 3))),
        lambda F, a, red: F.huber_loss(a["x"], a["t"], reduction=red, delta=0.6, weight=a["w"])),
    "l1_loss_weight": (
        lambda r: dict(x=r.normal(size=(4, 3)), t=r.normal(size=(4, 3)), w=r.uniform(0.5, 2, (4, 3))),
        lambda F, a, red: F.l1_loss(a["x"], a["t"], reduction=red, weight=a["w"])),
    "mse_loss_weight": (
        lambda r: dict(x=r.normal(size=(4, 3)), t=r.normal(size=(4, 3)), w=r.uniform(0.5, 2, (4, 3))),
        lambda F, a, red: F.mse_loss(a["x"], a["t"], reduction=red, weight=a["w"])),
}


def torch_value_and_grad(call, arrays, reduction, cotangent):
    a = {k: torch.tensor(v, requires_grad=(k == "x")) for k, v in arrays.items()}
    out = call(TF, a, reduction)
    (out * torch.tensor(cotangent)).sum().backward()
    return out.detach().numpy(), a["x"].grad.numpy()


def graphc_value_and_grad(call, arrays, reduction, cotangent, backend="reference"):
    constants = {k: v for k, v in arrays.items() if k != "x"}

    def loss(x):
        out = call(F, {**constants, "x": x}, reduction)
        return (out * cotangent).sum(), out

    (_, out), grad = gc.value_and_grad(loss, has_aux=True, backend=backend)(arrays["x"])
    return out, grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", CASES)
def test_loss_values_and_gradients_match_pytorch(name, reduction):
    make, call = CASES[name]
    arrays = make(np.random.default_rng(0))
    shape = np.shape(call(TF, {k: torch.tensor(v) for k, v in arrays.items()}, reduction))
    cotangent = np.random.default_rng(1).uniform(0.5, 1.5, shape)
    expected, expected_grad = torch_value_and_grad(call, arrays, reduction, cotangent)
    value, grad = graphc_value_and_grad(call, arrays, reduction, cotangent)
    np.testing.assert_allclose(value, expected, rtol=1e-10, atol=1e-12)
    # PyTorch's binary_cross_entropy divides by max(p (1 - p), 1e-12) with 1e-12 as a float32,
    # 4e-9 below the float64 graphc uses
    rtol = 1e-8 if name == "binary_cross_entropy_at_zero_and_one" else 1e-9
    np.testing.assert_allclose(grad, expected_grad, rtol=rtol, atol=1e-12)


def test_kl_div_batchmean_and_legacy_reduction_flags_match_pytorch():
    make, _ = CASES["kl_div"]
    a = make(np.random.default_rng(2))
    t = {k: torch.tensor(v) for k, v in a.items()}
    got = gc.jit(lambda x, y: (F.kl_div(x, y, reduction="batchmean"),
                               F.l1_loss(x, y, size_average=False),
                               F.mse_loss(x, y, reduce=False)), backend="reference")(a["x"], a["t"])
    expected = (TF.kl_div(t["x"], t["t"], reduction="batchmean"),
                TF.l1_loss(t["x"], t["t"], reduction="sum"),
                TF.mse_loss(t["x"], t["t"], reduction="none"))
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-12)


def test_weighted_cross_entropy_with_smoothing_on_numba_cpu_matches_reference():
    make, call = CASES["cross_entropy_spatial_smoothing_weight"]
    arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v
              for k, v in make(np.random.default_rng(3)).items()}
    cotangent = np.float32(1.0)
    reference = graphc_value_and_grad(call, arrays, "mean", cotangent)
    compiled = graphc_value_and_grad(call, arrays, "mean", cotangent, backend="numba-cpu")
    for r, c in zip(reference, compiled):
        np.testing.assert_allclose(c, r, rtol=1e-5, atol=1e-6)


def test_a_tuple_given_as_the_prediction_is_refused_with_the_fix():
    logits = np.zeros((2, 3), np.float32)
    with pytest.raises(InputError, match=r"cross_entropy: the input is a tuple of 2 values.*"
                                         r"cross_entropy\(outputs\[0\], target\).*test_losses.py"):
        gc.jit(lambda x: F.cross_entropy((x, x), np.array([0, 1])), backend="reference")(logits)


def test_bad_target_shapes_and_weights_are_refused():
    logits = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ShapeError,
                       match=r"class targets for input \(2, 3, 4\) must have shape \(2, 4\)"):
        gc.jit(lambda x: F.cross_entropy(x, np.zeros(2, np.int64)), backend="reference")(logits)
    with pytest.raises(ShapeError, match=r"class weights must have shape \(3,\)"):
        gc.jit(lambda x: F.nll_loss(x, np.zeros((2, 4), np.int64), weight=np.ones(4)),
               backend="reference")(logits)
    with pytest.raises(ShapeError, match="binary_cross_entropy_with_logits: the target's shape"):
        gc.jit(lambda x: F.binary_cross_entropy_with_logits(x, np.zeros((2, 3))),
               backend="reference")(logits)
