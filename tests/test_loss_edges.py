"""Losses, activations and optimizers at the edges a model reaches in training, against the
values PyTorch documents (no PyTorch needed): a logit of exactly 0 (a zero-initialised head), a
probability of exactly 0 or 1 (a saturated sigmoid), an activation at its bounds, dropout of 1,
and one optimizer driving two compiled steps."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir.errors import GraphcError

BACKENDS = ["reference", "numba-cpu"]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bce_with_logits_has_the_sigmoid_gradient_at_a_logit_of_zero(backend):
    x = np.array([0.0, 0.0, 0.0, 1.5, -2.0], np.float32)
    t = np.array([1.0, 0.0, 0.5, 1.0, 0.0], np.float32)
    pos_weight = np.float32(3.0)
    plain = gc.grad(lambda x: F.binary_cross_entropy_with_logits(x, t, reduction="sum"),
                    backend=backend)(x)
    np.testing.assert_allclose(plain, sigmoid(x) - t, rtol=1e-6, atol=1e-7)
    weighted = gc.grad(lambda x: F.binary_cross_entropy_with_logits(
        x, t, reduction="sum", pos_weight=pos_weight), backend=backend)(x)
    # d/dx of -(pw t log s(x) + (1 - t) log(1 - s(x)))
    np.testing.assert_allclose(weighted, pos_weight * t * (sigmoid(x) - 1) + (1 - t) * sigmoid(x),
                               rtol=1e-6, atol=1e-7)


def test_bce_with_logits_stays_finite_at_extreme_logits():
    x = np.array([-200.0, -30.0, 30.0, 200.0], np.float32)
    t = np.array([1.0, 0.0, 1.0, 0.0], np.float32)
    value, grad = gc.value_and_grad(lambda x: F.binary_cross_entropy_with_logits(
        x, t, reduction="none").sum())(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    np.testing.assert_allclose(value, 400.0, rtol=1e-6)  # the two wrong ones at 200 cost 200 each
    np.testing.assert_allclose(grad, [-1.0, 0.0, 0.0, 1.0], atol=1e-6)


def test_a_zero_initialised_head_trains_under_bce_with_logits():
    head = nn.Linear(3, 1)
    head.weight[...] = 0
    head.bias[...] = 0
    x, y = np.ones((4, 3), np.float32), np.ones((4, 1), np.float32)
    step = gc.compile_train_step(head, F.binary_cross_entropy_with_logits,
                                 optim.SGD(head.parameters(), lr=1.0), (x, y))
    step(x, y)
    np.testing.assert_allclose(head.bias, [0.5])  # minus the mean of sigmoid(0) - 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_binary_cross_entropy_has_pytorchs_finite_gradient_at_probabilities_0_and_1(backend):
    p = np.array([0.0, 1.0, 1.0, 0.0, 0.5], np.float32)
    t = np.array([0.0, 1.0, 0.0, 1.0, 1.0], np.float32)
    value, grad = gc.value_and_grad(lambda p: F.binary_cross_entropy(p, t, reduction="sum"),
                                    backend=backend)(p)
    np.testing.assert_allclose(value, 200 + np.log(2), rtol=1e-6)  # each log clamped at -100
    # (p - t) / max(p (1 - p), 1e-12)
    np.testing.assert_allclose(grad, [0.0, 0.0, 1e12, -1e12, -2.0], rtol=1e-5)


def test_binary_cross_entropy_gradient_inside_zero_one_is_the_logs_one():
    p = np.array([0.1, 0.3, 0.9], np.float64)
    t = np.array([1.0, 0.2, 0.0], np.float64)
    w = np.array([2.0, 1.0, 0.5], np.float64)
    grad = gc.grad(lambda p: F.binary_cross_entropy(p, t, weight=w, reduction="sum"))(p)
    np.testing.assert_allclose(grad, w * (-t / p + (1 - t) / (1 - p)), rtol=1e-12)
    target_grad = gc.grad(lambda t: F.binary_cross_entropy(p, t, reduction="sum"))(t)
    np.testing.assert_allclose(target_grad, np.log(1 - p) - np.log(p), rtol=1e-12)


def test_a_saturated_sigmoid_under_binary_cross_entropy_keeps_its_weights_finite():
    model = nn.Sequential(nn.Linear(1, 1), nn.Sigmoid())
    model[0].weight[...] = 30.0  # sigmoid(30) is 1.0 in float32
    model[0].bias[...] = 0.0
    x, y = np.array([[1.0], [0.1]], np.float32), np.array([[1.0], [0.0]], np.float32)
    step = gc.compile_train_step(model, F.binary_cross_entropy,
                                 optim.SGD(model.parameters(), lr=0.1), (x, y))
    step(x, y)
    assert np.all(np.isfinite(model[0].weight)) and np.all(np.isfinite(model[0].bias))
    np.testing.assert_allclose(model[0].weight, [[29.995237]], rtol=1e-6)  # PyTorch's value


@pytest.mark.parametrize("backend", BACKENDS)
def test_hardtanh_and_relu6_pass_no_gradient_at_their_bounds(backend):
    x = np.array([-2.0, -1.0, -0.5, 1.0, 3.0], np.float32)
    value, grad = gc.value_and_grad(lambda x: F.hardtanh(x).sum(), backend=backend)(x)
    np.testing.assert_allclose(value, -1.0 - 1.0 - 0.5 + 1.0 + 1.0)
    np.testing.assert_array_equal(grad, [0, 0, 1, 0, 0])
    x6 = np.array([-1.0, 0.0, 3.0, 6.0, 7.0], np.float32)
    np.testing.assert_array_equal(gc.grad(lambda x: F.relu6(x).sum(), backend=backend)(x6),
                                  [0, 0, 1, 0, 0])
    out = gc.jit(lambda x: F.hardtanh(x, -0.5, 0.5), backend=backend)(
        np.array([np.nan, -3.0, 0.25, 3.0], np.float32))
    np.testing.assert_array_equal(out, [np.nan, -0.5, 0.25, 0.5])
    assert out.dtype == np.float32


def test_dropout_of_one_zeroes_everything_and_bad_probabilities_are_refused_when_built():
    x = np.array([[1.0, -2.0, np.nan]], np.float32)
    for drop in (lambda x: F.dropout(x, 1.0), lambda x: F.dropout2d(x.reshape(1, 3, 1, 1), 1.0)):
        out = gc.jit(drop)(x)
        np.testing.assert_array_equal(out.reshape(-1), [0.0, -0.0, np.nan])  # x * 0, as PyTorch's
    model = nn.Sequential(nn.Linear(3, 2), nn.Dropout(1.0))
    data, target = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    before = model[0].weight.copy()
    gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                          (data, target))(data, target)
    np.testing.assert_array_equal(model[0].weight, before)  # nothing reaches the layer
    for bad in (-0.1, 1.5):
        for layer in (nn.Dropout, nn.Dropout2d):
            with pytest.raises(ValueError, match="between 0 and 1"):
                layer(bad)


@pytest.mark.parametrize("make", [
    lambda p: optim.SGD(p, lr=0.1, momentum=-0.5),
    lambda p: optim.RMSprop(p, alpha=-0.1),
    lambda p: optim.RMSprop(p, momentum=-1.0),
    lambda p: optim.Adam(p, eps=-1e-8),
    lambda p: optim.Adagrad(p, lr_decay=-0.1),
    lambda p: optim.Adagrad(p, initial_accumulator_value=-1.0),
    lambda p: optim.SGD([{"params": p, "momentum": float("nan")}], lr=0.1),
])
def test_negative_hyperparameters_are_refused_as_pytorch_refuses_them(make):
    with pytest.raises(ValueError, match="must be >= 0"):
        make(nn.Linear(2, 2).parameters())


def _momentum_training(steps_per_compile):
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32))
               for _ in range(4)]
    gc.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = optim.Adam(model.parameters(), lr=0.05)
    step = None
    for i, (x, y) in enumerate(batches):
        if i % steps_per_compile == 0:  # a step compiled anew, as after changing a setting
            step = gc.compile_train_step(model, F.mse_loss, opt, (x, y))
        step(x, y)
    return model, step


def test_a_step_compiled_again_with_the_same_optimizer_goes_on_from_its_state():
    one_step, first = _momentum_training(4)
    two_steps, second = _momentum_training(2)
    np.testing.assert_array_equal(two_steps.weight, one_step.weight)
    np.testing.assert_array_equal(two_steps.bias, one_step.bias)
    assert float(second.step_count) == float(first.step_count) == 4.0
    np.testing.assert_array_equal(second.opt_state["bias"]["exp_avg"], first.opt_state["bias"]["exp_avg"])


def test_a_slot_needed_only_after_a_setting_changed_starts_at_zero():
    model = nn.Linear(2, 1)
    opt = optim.SGD(model.parameters(), lr=0.1)
    x, y = np.ones((2, 2), np.float32), np.zeros((2, 1), np.float32)
    gc.compile_train_step(model, F.mse_loss, opt, (x, y))(x, y)
    opt.param_groups[0]["momentum"] = 0.9
    step = gc.compile_train_step(model, F.mse_loss, opt, (x, y))
    # with its own step count: the buffer's first step is the gradient itself, as in PyTorch
    assert set(step.opt_state["weight"]) == {"momentum_buffer", "step"}
    np.testing.assert_array_equal(step.opt_state["weight"]["momentum_buffer"], 0.0)
    assert step.opt_state["weight"]["step"] == 0


def test_no_target_is_refused_naming_the_rule():
    x = np.ones((2, 2), np.float32)
    model = nn.Linear(2, 1)
    with pytest.raises(GraphcError, match="targets=0: the loss takes at least one target"):
        gc.compile_train_step(model, lambda out: out.sum(), optim.SGD(model.parameters(), lr=0.1),
                              (x,), targets=0)


@pytest.mark.parametrize("loss", [F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss])
def test_a_target_shaped_unlike_the_prediction_warns_as_pytorch_does(loss):
    prediction, target = np.arange(4, dtype=np.float32).reshape(4, 1), np.arange(4, dtype=np.float32)
    with pytest.warns(UserWarning, match=r"target's shape \(4,\) differs from the input's \(4, 1\)"):
        value = gc.jit(lambda p, t: loss(p, t))(prediction, target)
    assert value > 0  # (4, 1) against (4,): a (4, 4) loss, as in PyTorch
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gc.jit(lambda p, t: loss(p, t))(prediction, target.reshape(4, 1)) == 0


def test_an_integer_attention_mask_is_refused_as_pytorch_refuses_it():
    from graphc.ir.errors import DTypeError
    rng = np.random.default_rng(9)
    q = rng.standard_normal((3, 4)).astype(np.float32)
    keep = np.array([[1, 0, 1, 1, 0]] * 3)
    k = rng.standard_normal((5, 4)).astype(np.float32)
    with pytest.raises(DTypeError, match="attn_mask must be bool .* or float .* got int64"):
        gc.jit(lambda q, k: F.scaled_dot_product_attention(q, k, k, attn_mask=keep))(q, k)
    attention = nn.MultiheadAttention(4, 2)
    with pytest.raises(DTypeError, match="attn_mask must be bool"):
        gc.jit(lambda q, k: attention(q, k, k, attn_mask=keep))(q, k)
    with pytest.raises(DTypeError, match="key_padding_mask must be bool"):
        gc.jit(lambda q, k: attention(q, k, k, key_padding_mask=keep[0]))(q, k)
    kept = gc.jit(lambda q, k: F.scaled_dot_product_attention(q, k, k, attn_mask=keep.astype(bool)))(q, k)
    assert kept.shape == (3, 4)
