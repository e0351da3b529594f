"""Transforms and compiled functions where a user's program is less plain: a scan over a 1-D
carry differentiated in several arguments, a layer replaced after compiling, NumPy float64
scalars, outputs that would alias the inputs."""
import logging

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir.errors import GraphcError

BACKENDS = ["reference", "numba-cpu"]


def test_a_scan_over_a_vector_carry_differentiated_in_xs_and_weights_is_right_on_every_backend():
    rng = np.random.default_rng(0)
    xs, w, h0 = rng.standard_normal((5, 3)), rng.standard_normal((3, 3)) * 0.5, rng.standard_normal(3)

    def loss(xs, w):
        def body(h, x):  # a 1-D carry: its product reshapes it, a view the step copies out
            h = gc.tanh(h @ w + x)
            return h, h * h
        _, ys = gc.scan(body, h0, xs)
        return gc.sum(ys)
    expected = gc.grad(loss, argnums=(0, 1), backend="reference")(xs, w)
    got = gc.grad(loss, argnums=(0, 1), backend="numba-cpu")(xs, w)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-10)
    value, step = gc.jit(loss, backend="reference"), 1e-6  # the reference against differences
    bumped = [(value(xs, w + step * e.reshape(3, 3)) - value(xs, w - step * e.reshape(3, 3))) / (2 * step)
              for e in np.eye(9)]
    np.testing.assert_allclose(expected[1].reshape(-1), bumped, rtol=1e-6, atol=1e-9)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.fc(x))


def _identity_layer(bias):
    layer = nn.Linear(2, 2)
    layer.weight = np.eye(2, dtype=np.float32)
    layer.bias = np.array(bias, np.float32)
    return layer


X = np.array([[1.0, -2.0]], np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_jitted_module_whose_layer_is_replaced_runs_the_new_layer(backend, caplog):
    model = TwoLayers()
    run = gc.jit(model, backend=backend)
    run(X)
    model.fc = _identity_layer([5.0, 6.0])
    with caplog.at_level(logging.WARNING, logger="graphc"):
        np.testing.assert_allclose(run(X), [[6.0, 4.0]])
    assert "child modules of" in caplog.text and "replaced" in caplog.text
    model.act = nn.Tanh()
    np.testing.assert_allclose(run(X), np.tanh([[6.0, 4.0]]), rtol=1e-6)
    model.layers = nn.ModuleList([nn.ReLU()])  # a child added and not called: no retrace needed
    np.testing.assert_allclose(run(X), np.tanh([[6.0, 4.0]]), rtol=1e-6)


def test_a_compiled_model_whose_layer_is_replaced_reads_and_runs_the_new_one():
    model = TwoLayers()
    compiled = gc.compile(model, X)
    compiled(X)
    model.fc = _identity_layer([5.0, 6.0])
    np.testing.assert_allclose(compiled(X), [[6.0, 4.0]])
    model.act = nn.Sigmoid()
    np.testing.assert_allclose(compiled(X), 1 / (1 + np.exp(-np.array([[6.0, 4.0]]))), rtol=1e-6)


def test_a_training_step_follows_a_replaced_activation_and_refuses_a_replaced_trained_layer():
    model = TwoLayers()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (X, np.zeros((1, 2), np.float32)))
    step(X, np.zeros((1, 2), np.float32))
    model.act = nn.Tanh()
    expected = float(np.mean(np.tanh(X @ model.fc.weight.T + model.fc.bias) ** 2))
    assert step(X, np.zeros((1, 2), np.float32)) == pytest.approx(expected, rel=1e-6)
    model.fc = nn.Linear(2, 2)  # the optimizer holds the old layer's parameters
    with pytest.raises(GraphcError, match="optimizer parameters .* do not belong to the model"):
        step(X, np.zeros((1, 2), np.float32))


def test_numpy_float64_scalars_keep_their_width():
    out = gc.jit(lambda x: x * 1)(np.float64(0.1))
    assert out.dtype == np.float64 and float(out) == 0.1
    assert gc.jit(lambda x: x * 1)(0.1).dtype == np.float32  # a Python float is PyTorch's float32
    grads = gc.grad(lambda a, b: a * b, argnums=(0, 1))(np.float64(2.0), np.array(3.0))
    assert [g.dtype for g in grads] == [np.float64, np.float64]
    assert gc.jit(lambda x: x + np.float64(0.1))(np.zeros(2)).dtype == np.float64


def test_the_reference_backend_returns_arrays_of_their_own():
    a = np.ones(3, np.float32)
    same = gc.jit(lambda x: x, backend="reference")(a)
    same[0] = 5.0
    assert a[0] == 1.0
    reshaped = gc.jit(lambda x: x.reshape(3, 1), backend="reference")(a)
    assert not np.shares_memory(reshaped, a)
    p, q = gc.jit(lambda x: (x * 2, x * 2), backend="reference")(a)
    p[0] = 0.0
    assert q[0] == 2.0
