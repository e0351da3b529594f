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


def test_a_replaced_layer_or_parameter_keeps_its_place_as_in_pytorch():
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    setattr(model, "1", nn.Tanh())  # swapping an activation in place
    assert list(model._modules) == ["0", "1", "2"]
    first, last = model[0], model[2]
    expected = np.tanh(X @ first.weight.T + first.bias) @ last.weight.T + last.bias
    np.testing.assert_allclose(gc.jit(model)(X), expected, rtol=1e-6)
    layer = nn.Linear(2, 3)
    layer.weight = nn.Parameter(np.zeros((3, 2), np.float32))
    assert list(layer.state_dict()) == ["weight", "bias"]


def test_sequential_refuses_a_layer_that_is_not_a_module_and_takes_an_ordered_dict():
    from collections import OrderedDict
    with pytest.raises(TypeError, match="layer 1 is a function, not a Module"):
        nn.Sequential(nn.Identity(), F.relu)
    named = nn.Sequential(OrderedDict([("fc", nn.Linear(2, 2)), ("act", nn.ReLU())]))
    assert list(named._modules) == ["fc", "act"] and named.fc is named[0]


def test_a_training_step_refuses_a_parameter_replaced_by_another_array():
    model = TwoLayers()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (X, np.zeros((1, 2), np.float32)))
    step(X, np.zeros((1, 2), np.float32))
    model.fc.weight = nn.Parameter(np.zeros((2, 2), np.float32))
    with pytest.raises(GraphcError, match="replacing a layer or a parameter"):
        step(X, np.zeros((1, 2), np.float32))


def test_load_state_dict_reports_keys_converts_dtypes_and_loads_all_or_nothing():
    keys = nn.Linear(1, 1).load_state_dict({"weight": np.zeros((1, 1)), "junk": np.zeros(1)}, strict=False)
    assert keys.missing_keys == ["bias"] and keys.unexpected_keys == ["junk"]
    norm = nn.BatchNorm1d(3)
    norm.load_state_dict({k: np.asarray(v, np.float64) + 1 for k, v in norm.state_dict().items()})
    assert norm.num_batches_tracked == 1 and norm.num_batches_tracked.dtype == np.int64
    before = {k: v.copy() for k, v in norm.state_dict().items()}
    bad = {**{k: np.asarray(v) + 1 for k, v in before.items()}, "running_var": np.zeros(4)}
    with pytest.raises(GraphcError, match="'running_var' has shape"):
        norm.load_state_dict(bad)
    for name, array in norm.state_dict().items():
        np.testing.assert_array_equal(array, before[name])  # nothing written


def test_train_takes_a_bool_and_manual_seed_takes_pytorchs_range():
    with pytest.raises(ValueError, match="mode must be a bool"):
        nn.Linear(1, 1).train("no")
    for seed in (2**63, 2**64 - 1, -1):
        gc.manual_seed(seed)
        first = gc.jit(lambda x: F.dropout(x, 0.5))(np.ones(64, np.float32))
        gc.manual_seed(seed)
        np.testing.assert_array_equal(gc.jit(lambda x: F.dropout(x, 0.5))(np.ones(64, np.float32)), first)
    gc.manual_seed(-1)
    minus_one = nn.Linear(3, 3).weight.copy()
    gc.manual_seed(2**64 - 1)  # the same 64 bits
    np.testing.assert_array_equal(nn.Linear(3, 3).weight, minus_one)
    for bad in (2**64, -2**63 - 1):
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
            gc.manual_seed(bad)
    gc.manual_seed(0)


def test_kaiming_init_of_an_empty_array_does_nothing():
    from graphc.nn import init
    for initialise in (init.kaiming_uniform_, init.kaiming_normal_):  # was a ZeroDivisionError
        assert initialise(np.empty((5, 0), np.float32)).shape == (5, 0)
