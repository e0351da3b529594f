"""A compiled step or function runs the train/eval mode its modules had when it was compiled;
switching a mode afterwards compiles again, and says so."""
import logging

import numpy as np

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim

REF = "reference"


def bn_dropout_model():
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    bn = model[1]
    bn.register_buffer("running_mean", np.array([0.1, -0.2, 0.3, 0.0], np.float32))
    bn.register_buffer("running_var", np.array([1.5, 0.5, 2.0, 1.0], np.float32))
    return model


def data(n=8):
    rng = np.random.default_rng(2)
    return (rng.standard_normal((n, 3)).astype(np.float32),
            rng.standard_normal((n, 2)).astype(np.float32))


def eval_loss(model, x, y):
    """Eval-mode loss in NumPy: running statistics, no dropout."""
    state = model.state_dict()
    h = x @ state["0.weight"].T + state["0.bias"]
    h = ((h - state["1.running_mean"]) / np.sqrt(state["1.running_var"] + 1e-5)
         * state["1.weight"] + state["1.bias"])
    out = h @ state["3.weight"].T + state["3.bias"]
    return np.mean((out - y) ** 2)


def test_train_step_compiled_in_eval_mode_runs_eval_behaviour():
    model = bn_dropout_model().eval()
    x, y = data()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (x, y), backend=REF)
    for _ in range(2):
        expected = eval_loss(model, x, y)
        np.testing.assert_allclose(step(x, y), expected, rtol=1e-5)
    assert int(model.state_dict()["1.num_batches_tracked"]) == 0
    assert not model.training and not model[2].training


def test_switching_mode_after_compiling_recompiles_and_logs(caplog):
    model = bn_dropout_model().eval()
    x, y = data()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.0),
                                 (x, y), backend=REF)
    step(x, y)
    model.train()
    with caplog.at_level(logging.WARNING, logger="graphc"):
        step(x, y)
    assert "recompiling train_step" in caplog.text and "mode" in caplog.text
    assert int(model.state_dict()["1.num_batches_tracked"]) == 1  # batch statistics now
    model.eval()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="graphc"):
        np.testing.assert_allclose(step(x, y), eval_loss(model, x, y), rtol=1e-5)
    assert caplog.text == "" and len(step._compiled) == 2


def test_jitted_function_follows_the_modules_mode(caplog):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))
    x = np.ones((64, 3), np.float32)
    forward = gc.jit(model, backend=REF)
    dropped = forward(x)
    assert (dropped == 0).any()
    model.eval()
    with caplog.at_level(logging.WARNING, logger="graphc"):
        kept = forward(x)
    np.testing.assert_allclose(kept, x @ model[0].weight.T + model[0].bias, rtol=1e-6)
    assert "retracing" in caplog.text and "mode" in caplog.text


def test_compile_keeps_each_modules_own_mode():
    """gc.compile traces in eval mode and restores every module's mode, not the root's."""
    model = bn_dropout_model()
    model[1].eval()  # a frozen batch norm inside a model in training mode
    x, _ = data()
    gc.compile(model, x, backend=REF)
    assert model.training and not model[1].training and model[2].training
