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
    "chained": lambda s, o: s.ChainedScheduler([s.ConstantLR(o, 0.5, 4), s.ExponentialLR(o, 0.9),
                                                s.StepLR(o, 5, 0.5)]),
    "chained-linear-polynomial": lambda s, o: s.ChainedScheduler(
        [s.LinearLR(o, 0.2, 1.0, 6), s.PolynomialLR(o, 40, 2.0), s.MultiStepLR(o, [3, 9], 0.3)]),
    "cyclic": lambda s, o: s.CyclicLR(o, 0.01, [0.1, 0.05], step_size_up=4, step_size_down=3,
                                      cycle_momentum=False),
    "cyclic-triangular2": lambda s, o: s.CyclicLR(o, 0.01, 0.1, step_size_up=3, mode="triangular2",
                                                  cycle_momentum=False),
    "cyclic-exp-range": lambda s, o: s.CyclicLR(o, [0.01, 0.001], 0.1, step_size_up=5, mode="exp_range",
                                                gamma=0.97, cycle_momentum=False),
    "cyclic-scale-fn": lambda s, o: s.CyclicLR(o, 0.01, 0.1, step_size_up=2, scale_fn=lambda x: 1 / (1 + x),
                                               scale_mode="iterations", cycle_momentum=False),
    # a multiplicative stage goes on from the rate the stage before left (it restarted at 0.1)
    "constant-multiplicative": lambda s, o: s.SequentialLR(
        o, [s.ConstantLR(o, 0.5, 3), s.MultiplicativeLR(o, lambda e: 0.9)], milestones=[3]),
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


def two_groups():
    return optim.SGD([{"params": [np.zeros(2, np.float32)], "lr": RATES[0]},
                      {"params": [np.zeros(3, np.float32)], "lr": RATES[1]}], lr=1.0)


# (name, how to build it, with last_epoch) from a module with PyTorch's scheduler names
RESUMABLE = {
    "ExponentialLR": lambda s, o, k: s.ExponentialLR(o, gamma=0.9, last_epoch=k),
    "MultiplicativeLR": lambda s, o, k: s.MultiplicativeLR(o, lambda e: 0.9, last_epoch=k),
    "StepLR": lambda s, o, k: s.StepLR(o, 7, 0.5, last_epoch=k),
    "MultiStepLR": lambda s, o, k: s.MultiStepLR(o, [3, 11, 20], 0.3, last_epoch=k),
    "LambdaLR": lambda s, o, k: s.LambdaLR(o, [lambda e: 1 / (1 + e), lambda e: 0.95 ** e], last_epoch=k),
    "LinearLR": lambda s, o, k: s.LinearLR(o, 0.1, 0.8, 12, last_epoch=k),
    "CosineAnnealingLR": lambda s, o, k: s.CosineAnnealingLR(o, 12, 0.001, last_epoch=k),
}


def resumed_rates(lib, opt, make, k=10, after=4, optimizer_step=lambda: None):
    """The rates of `after` steps of a schedule rebuilt with last_epoch=k after k steps."""
    sched = make(lib, opt, -1)
    for _ in range(k):
        optimizer_step()
        sched.step()
    sched = make(lib, opt, k)
    seen = [[g["lr"] for g in opt.param_groups]]
    for _ in range(after):
        optimizer_step()
        sched.step()
        seen.append([g["lr"] for g in opt.param_groups])
    return np.array(seen)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
@pytest.mark.parametrize("name", RESUMABLE)
def test_resuming_with_last_epoch_sets_the_rates_pytorch_sets(name):
    """Rebuilt with last_epoch=k after k steps (rates and initial rates in the groups), a
    schedule sets what PyTorch's sets: the ones PyTorch chains keep the rate of epoch k
    (ExponentialLR skipped one: 0.00859 where the run went on at 0.010737), others set epoch
    k + 1's. PyTorch's chained LinearLR and CosineAnnealingLR drift from their own closed form
    once resumed: graphc's follow the uninterrupted run."""
    torch = pytest.importorskip("torch")
    make = RESUMABLE[name]
    ours = resumed_rates(optim, two_groups(), make)
    if name in ("LinearLR", "CosineAnnealingLR"):
        opt = two_groups()
        whole = make(optim, opt, -1)
        rates = []
        for _ in range(14):
            whole.step()
            rates.append([g["lr"] for g in opt.param_groups])
        np.testing.assert_allclose(ours, rates[9:], rtol=1e-12)
        return
    theirs_opt = torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": RATES[0]},
                                  {"params": [torch.zeros(3, requires_grad=True)], "lr": RATES[1]}], lr=1.0)
    theirs = resumed_rates(torch.optim.lr_scheduler, theirs_opt, make, optimizer_step=theirs_opt.step)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)


def test_a_pytorch_style_scheduler_overriding_get_lr_works():
    class Halving(optim.LRScheduler):
        def get_lr(self):
            return [base * 0.5 ** self.last_epoch for base in self.base_lrs]
    opt = two_groups()
    sched = Halving(opt)
    sched.step()
    sched.step()
    assert sched.get_last_lr() == pytest.approx([0.025, 0.005])

    class Empty(optim.LRScheduler):
        pass
    with pytest.raises(NotImplementedError, match="rate\\(epoch, group\\).*get_lr"):
        Empty(two_groups())


def test_state_dicts_round_trip_and_resume_the_count():
    opt = two_groups()
    sched = optim.StepLR(opt, step_size=3, gamma=0.5)
    for _ in range(4):
        sched.step()
    state = sched.state_dict()
    assert state["last_epoch"] == 4 and "optimizer" not in state
    fresh = optim.StepLR(opt, step_size=3, gamma=0.5)
    fresh.load_state_dict(state)
    fresh.step()
    sched.step()
    assert fresh.get_last_lr() == sched.get_last_lr()
    with pytest.raises(GraphcError, match="unknown entries"):
        optim.ExponentialLR(two_groups(), 0.9).load_state_dict(state)
    sequential = warmup_cosine(optim, opt)
    sequential.step()
    inner = sequential.state_dict()["_schedulers"]
    assert len(inner) == 2 and inner[0]["total_iters"] == 5
    plateau = optim.ReduceLROnPlateau(opt, patience=0)
    plateau.step(1.0)
    again = optim.ReduceLROnPlateau(opt, patience=0)
    again.load_state_dict(plateau.state_dict())
    assert again.best == 1.0


@pytest.mark.parametrize("make, message", [
    (lambda o: optim.StepLR(o, step_size=-2), "step_size must be an int >= 1"),
    (lambda o: optim.StepLR(o, step_size=0), "step_size must be an int >= 1"),
    (lambda o: optim.OneCycleLR(o, 0.1, total_steps=2.5, cycle_momentum=False), "total_steps"),
    (lambda o: optim.LinearLR(o, total_iters=-3), "total_iters must be an int >= 0"),
    (lambda o: optim.ConstantLR(o, total_iters=1.5), "total_iters must be an int >= 0"),
    (lambda o: optim.CosineAnnealingLR(o, T_max=0), "T_max must be a number of epochs > 0"),
    (lambda o: optim.MultiStepLR(o, [2, -1]), "each milestone must be an int >= 0"),
    (lambda o: optim.SequentialLR(o, [optim.LinearLR(o), optim.ReduceLROnPlateau(o)], [2]),
     "ReduceLROnPlateau, which sets rates from a metric"),
])
def test_meaningless_schedule_settings_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make(two_groups())


def test_reduce_on_plateau_reduces_a_group_added_later():
    opt = optim.SGD([np.zeros(2, np.float32)], lr=0.1)
    plateau = optim.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    opt.add_param_group({"params": [np.zeros(3, np.float32)], "lr": 0.2})
    for _ in range(4):  # the first sets the best, then three reductions
        plateau.step(1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.0125, 0.025]  # PyTorch's
    listed = optim.SGD([np.zeros(2, np.float32)], lr=0.1)
    per_group = optim.ReduceLROnPlateau(listed, patience=0, min_lr=[0.0])
    listed.add_param_group({"params": [np.zeros(3, np.float32)], "lr": 0.2})
    per_group.step(1.0)
    with pytest.raises(GraphcError, match="min_lrs to one per group"):
        per_group.step(1.0)


def test_a_group_added_with_its_schedule_rates_is_accepted():
    """The error of a scheduler stepped after add_param_group says to give the new group
    'initial_lr': add_param_group takes it (PyTorch takes any key)."""
    opt = optim.SGD([np.zeros(2, np.float32)], lr=0.1)
    optim.StepLR(opt, step_size=2)
    opt.add_param_group({"params": [np.zeros(3, np.float32)], "lr": 0.05, "initial_lr": 0.05})
    sched = optim.StepLR(opt, step_size=2, last_epoch=0)
    assert sched.get_last_lr() == [0.1, 0.05]


def test_every_scheduler_is_in_the_modules_star_import():
    from graphc.optim import lr_scheduler
    defined = {name for name, value in vars(lr_scheduler).items()
               if isinstance(value, type) and value.__module__ == lr_scheduler.__name__
               and not name.startswith("_")}
    assert defined <= set(lr_scheduler.__all__)


def test_chaining_a_schedule_that_is_not_a_factor_is_refused():
    opt = two_groups()
    with pytest.raises(ValueError, match="schedulers\\[1\\] is a CosineAnnealingLR"):
        optim.ChainedScheduler([optim.ExponentialLR(opt, 0.9), optim.CosineAnnealingLR(opt, 10)])
    with pytest.raises(GraphcError, match="cycle_momentum=False"):
        optim.CyclicLR(opt, 0.01, 0.1)


def test_pytorch_style_get_lr_schedules_inside_sequential_and_chained_ones():
    """SequentialLR and ChainedScheduler asked the stage's rate(), which a get_lr() subclass
    does not define (a crash), or whose inherited closed form it replaced (0.8 four times where
    PyTorch gives 0.8, 0.4, 0.2, 0.1)."""
    torch = pytest.importorskip("torch")

    def halving(base):
        class Halving(base):
            def get_lr(self):
                return [0.8 * 0.5 ** self.last_epoch for _ in self.optimizer.param_groups]
        return Halving

    def run(lib, make):
        if lib is optim:
            opt = optim.SGD([np.zeros(2, np.float32)], lr=0.8)
        else:
            opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.8)
        sched = make(lib if lib is optim else lib.optim.lr_scheduler, opt)
        rates = []
        for _ in range(6):
            if lib is not optim:
                opt.step()
            sched.step()
            rates.append(opt.param_groups[0]["lr"])
        return rates
    makes = [lambda s, o: s.SequentialLR(o, [s.ConstantLR(o, 0.5, 2), halving(s.StepLR)(o, 1)], [2]),
             lambda s, o: s.ChainedScheduler([halving(s.StepLR)(o, 1)])]
    for make in makes:
        np.testing.assert_allclose(run(optim, make), run(torch, make), rtol=1e-12)
    # beside another, its own get_lr() sets the rate the other multiplies: no factor to chain
    with pytest.raises(ValueError, match="schedulers\\[0\\] is a Halving"):
        run(optim, lambda s, o: s.ChainedScheduler([halving(s.StepLR)(o, 1), s.ExponentialLR(o, 0.9)]))


def test_a_state_dict_of_another_number_of_stages_is_refused():
    opt = two_groups()
    three = optim.SequentialLR(opt, [optim.ConstantLR(opt), optim.ExponentialLR(opt, 0.9),
                                     optim.StepLR(opt, 2)], [3, 6])
    two = optim.SequentialLR(opt, [optim.ConstantLR(opt), optim.ExponentialLR(opt, 0.9)], [3])
    with pytest.raises(GraphcError, match="holds 3 schedulers, this one 2"):
        two.load_state_dict(three.state_dict())


@pytest.mark.parametrize("case", ["two schedules", "by hand", "warm-up and plateau", "cosine and plateau"])
def test_a_rate_something_else_changed_carries_on_as_in_pytorch(case):
    torch = pytest.importorskip("torch")
    import warnings

    def run(optim_module, params):
        sched = optim_module.lr_scheduler
        opt = optim_module.SGD(params, lr=1.0)
        if case == "two schedules":
            schedules = [sched.ExponentialLR(opt, 0.9), sched.MultiStepLR(opt, [2, 4], 0.1)]
        elif case == "by hand":
            schedules = [sched.StepLR(opt, 2, 0.5)]
        elif case == "warm-up and plateau":
            schedules = [sched.LinearLR(opt, 0.04, 1.0, total_iters=5)]
        else:
            schedules = [sched.CosineAnnealingLR(opt, 10, eta_min=0.1)]
        plateau = sched.ReduceLROnPlateau(opt, patience=0, factor=0.5) if "plateau" in case else None
        rates = []
        for epoch in range(8):
            for schedule in schedules:
                schedule.step()
            if plateau is not None:
                plateau.step(1.0)  # never improves: halves each epoch
            if case == "by hand" and epoch == 2:
                opt.param_groups[0]["lr"] *= 0.1
            rates.append(opt.param_groups[0]["lr"])
        return rates

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's warning about the order of steps
        expected = run(torch.optim, [torch.nn.Parameter(torch.zeros(1))])
    np.testing.assert_allclose(run(optim, [np.zeros(1, np.float32)]), expected, rtol=1e-9)


def _rates_beside_changes(lib, opt, build, hands):
    """Rates of the schedule `build(lib, opt)` stepped 12 epochs with a ReduceLROnPlateau cutting
    beside it (on a loss that stops improving) and the rate set by hand as `hands` says
    ({epoch: rate})."""
    schedule = build(lib, opt)
    plateau = lib.ReduceLROnPlateau(opt, patience=1, factor=0.5)
    rates = []
    for epoch, loss in enumerate([1.0, 0.9, 0.8, 0.8, 0.8, 0.7, 0.6] + [0.6] * 5):
        if epoch in hands:
            opt.param_groups[0]["lr"] = hands[epoch]
        schedule.step()
        plateau.step(loss)
        rates.append(opt.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("hands", [{5: 0.01}, {3: 0.0, 6: 0.5}], ids=["set", "paused"])
@pytest.mark.parametrize("build", [
    lambda L, o: L.SequentialLR(o, [L.LinearLR(o, 0.1, total_iters=2), L.ExponentialLR(o, 0.9)], [2]),
    lambda L, o: L.SequentialLR(o, [L.ConstantLR(o, 0.5, total_iters=2), L.StepLR(o, 2, 0.5)], [3]),
    lambda L, o: L.SequentialLR(o, [L.ExponentialLR(o, 0.8), L.MultiplicativeLR(o, lambda e: 0.9)], [4]),
    lambda L, o: L.SequentialLR(o, [L.ExponentialLR(o, 0.9), L.PolynomialLR(o, total_iters=2)], [2]),
    lambda L, o: L.ChainedScheduler([L.LinearLR(o, 0.5, total_iters=2), L.PolynomialLR(o, total_iters=3)]),
    lambda L, o: L.PolynomialLR(o, total_iters=2),
    lambda L, o: L.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
    lambda L, o: L.ExponentialLR(o, 0.9),
    lambda L, o: L.StepLR(o, 2, 0.5)])
def test_schedules_keep_changes_made_beside_them_as_pytorchs(build, hands):
    """SequentialLR set its stage's closed form, undoing a plateau's cut and a rate set by hand
    (PyTorch steps its chainable stage, which keeps them); a finished PolynomialLR put a hand's
    rate back to 0 (PyTorch keeps the rate there); a cosine cut at its floor by a plateau went
    negative; a rate paused at 0 by hand stayed 0 once restored. Each chainable step now takes
    the current rate on as PyTorch's does."""
    torch = pytest.importorskip("torch")
    import warnings
    import torch.optim.lr_scheduler as torch_schedulers
    from graphc.optim import lr_scheduler as ours
    theirs_opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step order warning: no optimizer step here
        expected = _rates_beside_changes(torch_schedulers, theirs_opt, build, hands)
    got = _rates_beside_changes(ours, gc.optim.SGD([np.zeros(2, np.float32)], lr=0.1), build, hands)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
