"""Optimizers: the compiled update equals a NumPy implementation of each published rule over
several steps, and PyTorch's optimizers when torch is installed."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim

STEPS = 5
rng = np.random.default_rng(0)
X = rng.standard_normal((8, 3)).astype(np.float32)
Y = rng.standard_normal((8, 2)).astype(np.float32)


def grad_of(w):
    """d/dW of mean((X @ W.T - Y)^2) for a bias-free linear layer."""
    return 2 * (X @ w.T - Y).T @ X / Y.size


def numpy_rule(name, kw):
    """The published update rules, written out directly (PyTorch's documentation)."""
    state = {}

    def step(w, g, t):
        lr, wd = kw.get("lr"), kw.get("weight_decay", 0.0)
        if name != "AdamW":
            g = g + wd * w
        if name == "SGD":
            mom, damp, nest = kw.get("momentum", 0), kw.get("dampening", 0), kw.get("nesterov", False)
            if mom:
                buf = g if t == 1 else mom * state["buf"] + (1 - damp) * g
                state["buf"] = buf
                g = g + mom * buf if nest else buf
            return w - lr * g
        if name in ("Adam", "AdamW"):
            b1, b2 = kw.get("betas", (0.9, 0.999))
            eps = kw.get("eps", 1e-8)
            if name == "AdamW":
                w = w * (1 - lr * wd)
            m = b1 * state.get("m", 0) + (1 - b1) * g
            v = b2 * state.get("v", 0) + (1 - b2) * g * g
            state.update(m=m, v=v)
            if kw.get("amsgrad"):  # the largest second moment so far
                v = state["v_max"] = np.maximum(state.get("v_max", 0), v)
            return w - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
        if name == "Adagrad":
            s = state.get("s", kw.get("initial_accumulator_value", 0)) + g * g
            state["s"] = s
            clr = lr / (1 + (t - 1) * kw.get("lr_decay", 0))
            return w - clr * g / (np.sqrt(s) + kw.get("eps", 1e-10))
        if name == "RMSprop":
            alpha, eps, mom = kw.get("alpha", 0.99), kw.get("eps", 1e-8), kw.get("momentum", 0)
            sq = alpha * state.get("sq", 0) + (1 - alpha) * g * g
            state["sq"] = sq
            if kw.get("centered"):
                ga = alpha * state.get("ga", 0) + (1 - alpha) * g
                state["ga"] = ga
                avg = np.sqrt(sq - ga * ga) + eps
            else:
                avg = np.sqrt(sq) + eps
            if mom:
                state["buf"] = mom * state.get("buf", 0) + g / avg
                return w - lr * state["buf"]
            return w - lr * g / avg
        raise AssertionError(name)
    return step


CASES = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}),
    ("Adam", {"lr": 0.01}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1, "betas": (0.8, 0.99)}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adam", {"lr": 0.01, "amsgrad": True, "betas": (0.5, 0.6)}),  # small betas: the maximum holds
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1, "amsgrad": True, "betas": (0.5, 0.6)}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
]


def run_graphc(name, kw, backend="reference"):
    gc.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    w0 = model.weight.copy()
    opt = getattr(optim, name)(model.parameters(), **kw)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend=backend)
    history = []
    for _ in range(STEPS):
        step(X, Y)
        history.append(model.weight.copy())
    return w0, history


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_update_matches_published_rule(name, kw):
    w0, history = run_graphc(name, kw)
    w = w0.astype(np.float64)
    rule = numpy_rule(name, kw)
    for t in range(1, STEPS + 1):
        w = rule(w, grad_of(w), t)
        np.testing.assert_allclose(history[t - 1], w, rtol=2e-5, atol=2e-6, err_msg=f"step {t}")


@pytest.mark.parametrize("name,kw", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
def test_update_matches_pytorch(name, kw):
    torch = pytest.importorskip("torch")
    w0, history = run_graphc(name, kw)
    w = torch.tensor(w0, requires_grad=True)
    topt = getattr(torch.optim, name)([w], **kw)
    for t in range(STEPS):
        topt.zero_grad()
        loss = torch.nn.functional.mse_loss(torch.tensor(X) @ w.T, torch.tensor(Y))
        loss.backward()
        topt.step()
        np.testing.assert_allclose(history[t], w.detach().numpy(), rtol=2e-5, atol=2e-6)


def test_learning_rate_is_an_input_so_schedules_do_not_recompile():
    model = nn.Linear(3, 2)
    opt = optim.SGD(model.parameters(), lr=0.1)
    sched = optim.StepLR(opt, step_size=2, gamma=0.5)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend="reference")
    for _ in range(4):
        step(X, Y)
        sched.step()
    assert opt.lr == pytest.approx(0.025) and len(step._compiled) == 1


def test_schedules():
    opt = optim.SGD([np.zeros(1, np.float32)], lr=1.0)
    assert optim.ExponentialLR(opt, 0.5).rate(3) == 0.125
    cos = optim.CosineAnnealingLR(opt, T_max=10, eta_min=0.1)
    assert cos.rate(0) == 1.0 and cos.rate(10) == pytest.approx(0.1) and cos.rate(5) == pytest.approx(0.55)


def test_gradient_clipping_and_l1():
    gc.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    w0 = model.weight.copy()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=1.0), (X, Y),
                                 backend="reference", clip_grad_norm=0.01, l1=0.5)
    step(X, Y)
    g = grad_of(w0.astype(np.float64)) + 0.5 * np.sign(w0)
    expected = w0 - g * min(1.0, 0.01 / (np.linalg.norm(g) + 1e-6))
    np.testing.assert_allclose(model.weight, expected, rtol=1e-5, atol=1e-7)


def test_schedulers_import_from_pytorchs_module_path():
    """Ports keep `from torch.optim.lr_scheduler import ...` as graphc.optim.lr_scheduler."""
    from graphc.optim import lr_scheduler

    assert lr_scheduler.CosineAnnealingLR is gc.optim.CosineAnnealingLR
    opt = gc.optim.SGD([np.zeros(1, np.float32)], lr=1.0)
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    sched.step()
    assert sched.get_last_lr() == [0.5]


@pytest.mark.parametrize("beta2", [0.999, 0.99999])
def test_adams_bias_corrections_are_exact_as_pytorchs(beta2):
    """The first Adam update of a float32 weight is lr * g / (|g| + eps): its bias corrections
    are computed in float64, as PyTorch's (in float32, 1 - 0.99999 ** 1 rounded made it
    0.100067854 for lr 0.1, where PyTorch gives 0.099999964)."""
    x, y = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    model = nn.Linear(1, 1, bias=False)
    model.weight[...] = 1.0
    opt = optim.Adam(model.parameters(), lr=0.1, betas=(0.9, beta2))
    gc.compile_train_step(model, F.mse_loss, opt, (x, y))(x, y)
    exact = 0.1 * 2 / (2 + 1e-8)  # the gradient is 2
    assert abs((1.0 - float(model.weight[0, 0])) - exact) < 1e-7


@pytest.mark.parametrize("setting", [dict(clip_grad_norm=float("nan")), dict(clip_grad_norm=-1.0),
                                     dict(clip_grad_norm=0.0), dict(l1=float("nan")), dict(l1=-5.0)])
def test_a_nan_or_negative_clip_or_l1_is_refused(setting):
    """A NaN bound turned every weight NaN; a negative one, or a negative l1, climbed the loss."""
    model = nn.Linear(3, 2)
    with pytest.raises(gc.GraphcError, match="must be a number"):
        gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1), (X, Y),
                              backend="reference", **setting)
    gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1), (X, Y),
                          backend="reference", clip_grad_norm=float("inf"), l1=0)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "Adagrad", "RMSprop"])
def test_pytorchs_implementation_flags_are_taken(name):
    """foreach/fused/capturable pick PyTorch's kernels: accepted (ported code passes
    fused=True), changing nothing; differentiable=True is refused, naming it."""
    params = [np.zeros(2, np.float32)]
    getattr(optim, name)(params, lr=0.1, foreach=True, fused=True, capturable=True)
    with pytest.raises(gc.GraphcError, match="differentiable=True"):
        getattr(optim, name)(params, lr=0.1, differentiable=True)
