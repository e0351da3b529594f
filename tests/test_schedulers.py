"""Learning-rate schedulers: the rates of every parameter group over 30 steps equal
torch.optim.lr_scheduler's, and a compiled step follows them without recompiling."""
import math

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import GraphcError, nn, optim

STEPS = 30
RATES = (0.1, 0.02)  # two parameter groups, two initial rates


def warmup_cosine(lib, opt):
    sched = lib.lr_scheduler if hasattr(lib, "lr_scheduler") else lib
    return sched.SequentialLR(opt, [sched.LinearLR(opt, start_factor=0.01, total_iters=5),
                                    sched.CosineAnnealingLR(opt, T_max=20, eta_min=1e-4)], [5])


# name -> how to build it from a module with PyTorch's scheduler names (torch.optim.lr_scheduler
# or graphc.optim) and an optimizer
SCHEDULES = {
    "StepLR": lambda s, o: s.StepLR(o, step_size=7, gamma=0.5),
    "MultiStepLR": lambda s, o: s.MultiStepLR(o, milestones=[3, 11, 20], gamma=0.3),
    "ExponentialLR": lambda s, o: s.ExponentialLR(o, gamma=0.9),
    "LinearLR": lambda s, o: s.LinearLR(o, start_factor=0.1, end_factor=0.8, total_iters=12),
    "CosineAnnealingLR": lambda s, o: s.CosineAnnealingLR(o, T_max=12, eta_min=0.001),
    "LambdaLR": lambda s, o: s.LambdaLR(o, [lambda e: 1 / (1 + e), lambda e: 0.95 ** e]),
    "OneCycleLR": lambda s, o: s.OneCycleLR(o, max_lr=[0.5, 0.05], total_steps=STEPS + 1,
                                            cycle_momentum=False),
    "OneCycleLR-linear-3phase": lambda s, o: s.OneCycleLR(
        o, max_lr=0.3, epochs=4, steps_per_epoch=8, anneal_strategy="linear", three_phase=True,
        cycle_momentum=False),
    "warmup-cosine": warmup_cosine,
    "warmup-exponential": lambda s, o: s.SequentialLR(
        o, [s.LinearLR(o, 0.5, 1.0, 4), s.ExponentialLR(o, gamma=0.8)], milestones=[6]),
}


def rates_over_steps(make, lib, opt, optimizer_step=lambda: None):
    sched = make(lib, opt)
    seen = [[g["lr"] for g in opt.param_groups]]
    for _ in range(STEPS):
        optimizer_step()  # PyTorch warns when a scheduler steps before its optimizer
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
        assert sched.get_last_lr() == seen[-1]
    return np.array(seen)


@pytest.mark.parametrize("name", SCHEDULES)
def test_rates_equal_pytorchs_for_every_group(name):
    torch = pytest.importorskip("torch")
    make = SCHEDULES[name]
    ours = optim.SGD([{"params": [np.zeros(2, np.float32)], "lr": RATES[0]},
                      {"params": [np.zeros(3, np.float32)], "lr": RATES[1]}], lr=1.0)
    theirs = torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": RATES[0]},
                              {"params": [torch.zeros(3, requires_grad=True)], "lr": RATES[1]}], lr=1.0)
    expected = rates_over_steps(make, torch.optim.lr_scheduler, theirs, lambda: theirs.step())
    got = rates_over_steps(make, optim, ours)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert len(set(map(tuple, got.tolist()))) > 3  # the schedule moves


def test_a_compiled_step_follows_a_warmup_cosine_schedule_without_recompiling():
    """Each step moves by the rate the schedule set: SGD moves the bias by lr * gradient,
    the gradient being known from the weights before the step."""
    gc.manual_seed(0)
    model = nn.Linear(3, 1)
    x = np.ones((4, 3), np.float32)
    y = np.zeros((4, 1), np.float32)
    opt = optim.SGD([{"params": [model.weight]}, {"params": [model.bias], "lr": 0.5}], lr=0.1)
    sched = warmup_cosine(optim, opt)
    step = gc.compile_train_step(model, F.mse_loss, opt, (x, y), backend="reference")
    compiled = step._latest
    for t in range(8):
        lrs = [g["lr"] for g in opt.param_groups]
        before = model.bias.copy()
        out = (x @ model.weight.T + model.bias)[0, 0]
        step(x, y)
        bias_grad = 2 * out  # mean over 4 equal rows of d/d bias (out - 0)^2
        np.testing.assert_allclose(before - model.bias, lrs[1] * bias_grad, rtol=1e-4, err_msg=f"step {t}")
        sched.step()
    assert list(step._compiled.values()) == [compiled]
    assert 0.1 * 0.01 < lrs[0] < 0.1 and lrs[0] != lrs[1]  # warmed up, decaying


def test_cycling_momentum_is_refused_with_the_way_out():
    opt = optim.Adam([np.zeros(2, np.float32)], lr=0.1)
    with pytest.raises(GraphcError, match="cycle_momentum=False"):
        optim.OneCycleLR(opt, max_lr=0.1, total_steps=10)


def test_stepping_past_one_cycle_says_so():
    opt = optim.SGD([np.zeros(2, np.float32)], lr=0.1)
    sched = optim.OneCycleLR(opt, max_lr=0.1, total_steps=3, cycle_momentum=False)
    for _ in range(3):
        sched.step()
    with pytest.raises(GraphcError, match=r"stepped 4 times, past its total_steps \(3\)"):
        sched.step()


def test_one_value_per_group_or_an_error_naming_the_count():
    opt = optim.SGD([{"params": [np.zeros(2, np.float32)]}, {"params": [np.zeros(1, np.float32)]}], lr=0.1)
    with pytest.raises(GraphcError, match=r"expected 2 lr_lambda functions \(one per parameter group\), got 3"):
        optim.LambdaLR(opt, [math.exp] * 3)
