"""float64 models: Module.double/float/to, every optimizer trains a float64 model (against
PyTorch in float64, to ~1e-10), every loss and layer runs forward and backward in float64 on
numba-cpu as on the reference interpreter, and nothing drifts to float32 along the way."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim

BACKENDS = ["reference", "numba-cpu"]
TIGHT = dict(rtol=1e-10, atol=1e-12)
rng = np.random.default_rng(0)
X = rng.standard_normal((6, 3))
Y = rng.standard_normal((6, 2))


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def mlp():
    gc.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


# -- casting ----------------------------------------------------------------------------------
def test_double_float_and_to_cast_parameters_and_float_buffers():
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    before = model.state_dict()
    assert model.double() is model
    state = model.state_dict()
    assert {k: v.dtype.name for k, v in state.items()} == {
        "0.weight": "float64", "0.bias": "float64", "1.weight": "float64", "1.bias": "float64",
        "1.running_mean": "float64", "1.running_var": "float64",
        "1.num_batches_tracked": "int64"}  # a counter keeps its integer dtype
    np.testing.assert_array_equal(state["0.weight"], before["0.weight"])
    assert model[0].weight is state["0.weight"]  # registered in place of the old array
    assert model.float() is model and model.state_dict()["0.weight"].dtype == np.float32
    assert model.to("float64").state_dict()["1.running_var"].dtype == np.float64
    assert model.to(np.float32).state_dict()["1.running_var"].dtype == np.float32
    with pytest.raises(gc.GraphcError, match="floating-point dtype"):
        model.to("int32")
    with pytest.raises(gc.GraphcError, match="floating-point dtype"):
        model.to("cuda")


# -- optimizers -------------------------------------------------------------------------------
OPTIMIZERS = [
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "dampening": 0.3}),
    ("Adam", {"lr": 0.01, "weight_decay": 0.1}),
    ("AdamW", {"lr": 0.01, "weight_decay": 0.1}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01, "initial_accumulator_value": 0.1}),
    ("RMSprop", {"lr": 0.01}),
    ("RMSprop", {"lr": 0.01, "momentum": 0.9, "centered": True, "weight_decay": 0.01}),
]


def torch_trajectory(torch, state, name, kw, steps):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 2)).double()
    model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    opt = getattr(torch.optim, name)(model.parameters(), **kw)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(torch.tensor(X)), torch.tensor(Y))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,kw", OPTIMIZERS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(OPTIMIZERS)])
def test_every_optimizer_trains_a_float64_model(torch, backend, name, kw):
    model = mlp().double()
    initial = {k: v.copy() for k, v in model.state_dict().items()}
    opt = getattr(optim, name)(model.parameters(), **kw)
    step = gc.compile_train_step(model, F.mse_loss, opt, (X, Y), backend=backend)
    losses = [step(X, Y) for _ in range(3)]

    expected_losses, expected = torch_trajectory(torch, initial, name, kw, 3)
    np.testing.assert_allclose(losses, expected_losses, **TIGHT)
    for k, v in model.state_dict().items():
        assert v.dtype == np.float64, k
        np.testing.assert_allclose(v, expected[k], **TIGHT, err_msg=k)
    assert all(s.dtype == np.float64 for slots in step.opt_state.values() for s in slots.values())


def test_float64_learning_rate_is_not_rounded_to_float32():
    """lr = 0.1 is not a float32 number: rounding it would move a float64 step by ~1e-9."""
    model = nn.Linear(3, 2, bias=False).double()
    w0 = model.weight.copy()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (X, Y), backend="reference")
    step(X, Y)
    gradient = 2 * (X @ w0.T - Y).T @ X / Y.size
    np.testing.assert_allclose(model.weight, w0 - 0.1 * gradient, rtol=1e-14, atol=1e-15)


def test_float32_model_keeps_a_float32_learning_rate():
    model = mlp()
    step = gc.compile_train_step(model, F.mse_loss, optim.Adam(model.parameters()),
                                 (X.astype(np.float32), Y.astype(np.float32)), backend="reference")
    lr_input = next(inp for inp in step.graph.inputs if inp.name == "lr")
    assert lr_input.value.dtype == "float32"


# -- losses -----------------------------------------------------------------------------------
LOGITS = rng.standard_normal((4, 3))
LABELS = np.array([0, 2, 1, 2])
PROBS = np.abs(rng.standard_normal((4, 3)))
PROBS /= PROBS.sum(1, keepdims=True)
BINARY = (rng.random((4, 3)) > 0.5).astype(np.float64)
TARGET = rng.standard_normal((4, 3))


def all_losses(z):
    return gc.stack([
        F.mse_loss(z, TARGET), F.l1_loss(z, TARGET), F.smooth_l1_loss(z, TARGET, beta=0.5),
        F.cross_entropy(z, LABELS), F.cross_entropy(z, PROBS),
        F.nll_loss(F.log_softmax(z, 1), LABELS),
        F.binary_cross_entropy_with_logits(z, BINARY)])


def test_every_loss_in_float64(torch):
    tz = torch.tensor(LOGITS, requires_grad=True)
    tF = torch.nn.functional
    expected = torch.stack([
        tF.mse_loss(tz, torch.tensor(TARGET)), tF.l1_loss(tz, torch.tensor(TARGET)),
        tF.smooth_l1_loss(tz, torch.tensor(TARGET), beta=0.5),
        tF.cross_entropy(tz, torch.tensor(LABELS)), tF.cross_entropy(tz, torch.tensor(PROBS)),
        tF.nll_loss(tF.log_softmax(tz, 1), torch.tensor(LABELS)),
        tF.binary_cross_entropy_with_logits(tz, torch.tensor(BINARY))])
    weights = np.arange(1.0, 8.0)
    (expected * torch.tensor(weights)).sum().backward()
    for backend in BACKENDS:
        values = gc.jit(all_losses, backend=backend)(LOGITS)
        grad = gc.grad(lambda z: (all_losses(z) * weights).sum(), backend=backend)(LOGITS)
        assert values.dtype == np.float64 and grad.dtype == np.float64
        np.testing.assert_allclose(values, expected.detach().numpy(), **TIGHT, err_msg=backend)
        np.testing.assert_allclose(grad, tz.grad.numpy(), **TIGHT, err_msg=backend)


# -- layers -----------------------------------------------------------------------------------
LAYERS = {
    "Linear": (lambda: nn.Linear(3, 2), (4, 3)),
    "Conv2d": (lambda: nn.Conv2d(2, 3, 3, padding=1, stride=2), (2, 2, 5, 5)),
    "MaxPool2d": (lambda: nn.MaxPool2d(2), (2, 2, 4, 4)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2, padding=1, count_include_pad=False), (2, 2, 4, 4)),
    "Dropout": (lambda: nn.Dropout(0.5), (4, 3)),
    "activations": (lambda: nn.Sequential(nn.Flatten(), nn.ReLU(), nn.Identity(), nn.Sigmoid(),
                                          nn.Tanh(), nn.Softmax(1), nn.LogSoftmax(1)), (2, 3, 2)),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(3), (5, 3)),
    "BatchNorm2d": (lambda: nn.BatchNorm2d(2), (3, 2, 2, 2)),
    "LayerNorm": (lambda: nn.LayerNorm(3), (4, 3)),
    "RNN": (lambda: nn.RNN(3, 2, num_layers=2), (2, 3, 3)),
    "LSTM": (lambda: nn.LSTM(3, 2), (2, 3, 3)),
    "GRU": (lambda: nn.GRU(3, 2), (2, 3, 3)),
    "Embedding": (lambda: nn.Embedding(5, 3, padding_idx=0), None),
}


def first_output(out):
    return out[0] if isinstance(out, tuple) else out


def forward_and_gradients(model, state, x, backend):
    """(output, new buffers, gradients of a weighted sum w.r.t. the parameters and a float x)."""
    params = {k: v for k, v in state.items() if k in dict(model.named_parameters())}
    buffers = {k: v for k, v in state.items() if k not in params}

    def loss(p, x):
        out, updates = nn.functional_call(model, {**p, **buffers}, x, return_buffers=True)
        out = first_output(out)
        weights = np.cos(np.arange(out.numel())).reshape(out.shape)
        return (out * weights).sum(), (out, updates)

    argnums = (0,) * bool(params) + (1,) * (x.dtype == np.float64)  # no gradient for int ids
    (_, (out, updates)), grads = gc.value_and_grad(
        loss, argnums=argnums, has_aux=True, backend=backend)(params, x)
    named = dict(zip(argnums, grads))
    return out, updates, {**named.get(0, {}), **({"x": named[1]} if 1 in named else {})}


@pytest.mark.parametrize("name", list(LAYERS))
def test_every_layer_in_float64_matches_the_reference(name):
    make, shape = LAYERS[name]
    gc.manual_seed(1)
    model = make().double().train()
    x = rng.integers(0, 5, (2, 3)) if shape is None else rng.standard_normal(shape)
    state = model.state_dict()
    results = {}
    for backend in BACKENDS:
        gc.manual_seed(2)  # the same dropout mask on each backend
        results[backend] = forward_and_gradients(model, state, x, backend)
    (ref_out, ref_updates, ref_grads), (out, updates, grads) = (results[b] for b in BACKENDS)
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, ref_out, **TIGHT)
    assert set(updates) == set(ref_updates) and set(grads) == set(ref_grads)
    assert set(grads) >= set(dict(model.named_parameters()))
    for k in updates:
        assert updates[k].dtype == state[k].dtype, k
        np.testing.assert_allclose(updates[k], ref_updates[k], **TIGHT, err_msg=k)
    for k in grads:
        assert grads[k].dtype == np.float64, k
        np.testing.assert_allclose(grads[k], ref_grads[k], **TIGHT, err_msg=k)


def test_a_loaded_float64_step_keeps_its_learning_rate_in_float64(tmp_path):
    """The loaded step passes lr in the step's own dtype, as the compiled one does."""
    model = nn.Linear(3, 2, bias=False).double()
    w0 = model.weight.copy()
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (X, Y), backend="reference")
    step.export(str(tmp_path / "step.gcx"))
    loaded = gc.load(str(tmp_path / "step.gcx"), backend="reference")
    loaded(X, Y)
    gradient = 2 * (X @ w0.T - Y).T @ X / Y.size
    np.testing.assert_allclose(loaded.state_dict()["weight"], w0 - 0.1 * gradient, rtol=1e-14, atol=1e-15)
