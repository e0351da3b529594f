"""nn.BatchNorm1d / BatchNorm2d / LayerNorm: against PyTorch (outputs, gradients, running
statistics and state-dict keys) and against a NumPy reference where PyTorch is absent."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
from graphc import optim
from graphc.ir import ShapeError

TOLERANCES = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-5)}
BATCH_NORM_INPUTS = [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 5)),
                     ("BatchNorm2d", (3, 3, 4, 2))]
BATCH_NORM_IDS = ["1d_NC", "1d_NCL", "2d"]


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def weights_like(shape, dtype):
    return np.cos(np.arange(int(np.prod(shape)))).reshape(shape).astype(dtype)


def random_state(model, dtype, rng):
    """Random affine parameters and running statistics (variances positive); the batch
    counter keeps its integer dtype."""
    state = {}
    for name, value in model.state_dict().items():
        if name == "num_batches_tracked":
            state[name] = np.array(3, np.int64)
        elif name == "running_var":
            state[name] = rng.uniform(0.5, 2.0, value.shape).astype(dtype)
        else:
            state[name] = rng.standard_normal(value.shape).astype(dtype)
    return state


def graphc_step(model, state, x):
    """(output, new buffers, gradients of a weighted sum w.r.t. the parameters and x)."""
    params = {k: v for k, v in state.items() if k in dict(model.named_parameters())}
    buffers = {k: v for k, v in state.items() if k not in params}

    def loss(differentiated):  # one argument: (parameters, x), as there may be no parameters
        p, x = differentiated
        out, updates = nn.functional_call(model, {**p, **buffers}, x, return_buffers=True)
        return (out * weights_like(out.shape, x.dtype)).sum(), (out, updates)

    (_, (out, updates)), (g_params, g_x) = gc.value_and_grad(
        loss, has_aux=True, backend="reference")((params, x))
    return out, updates, {**g_params, "x": g_x}


def torch_step(torch, module, state, x):
    module.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    tx = torch.tensor(x, requires_grad=True)
    out = module(tx)
    (out * torch.tensor(weights_like(tuple(out.shape), x.dtype))).sum().backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    buffers = {k: b.numpy() for k, b in module.named_buffers()}
    return out.detach().numpy(), buffers, {**grads, "x": tx.grad.numpy()}


def check_against_torch(torch, name, kwargs, x_shape, dtype, training, seed=0):
    rng = np.random.default_rng(seed)
    model = getattr(nn, name)(**kwargs).train(training)
    tmodule = getattr(torch.nn, name)(**kwargs).to(getattr(torch, np.dtype(dtype).name))
    tmodule.train(training)
    assert list(model.state_dict()) == list(tmodule.state_dict())
    state = random_state(model, dtype, rng)
    x = (rng.standard_normal(x_shape) * 2 + 1).astype(dtype)

    out, updates, grads = graphc_step(model, state, x)
    t_out, t_buffers, t_grads = torch_step(torch, tmodule, state, x)

    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(out, t_out, **tol, err_msg="output")
    assert set(grads) == set(t_grads)
    for k in grads:
        np.testing.assert_allclose(grads[k], t_grads[k], **tol, err_msg=f"gradient of {k}")
    updated = training and kwargs.get("track_running_stats", True)
    assert set(updates) == (set(t_buffers) if updated else set())
    for k, value in updates.items():
        assert value.shape == t_buffers[k].shape and value.dtype == t_buffers[k].dtype, k
        np.testing.assert_allclose(value, t_buffers[k], **tol, err_msg=f"buffer {k}")


# -- batch norm against PyTorch ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,x_shape", BATCH_NORM_INPUTS, ids=BATCH_NORM_IDS)
def test_batch_norm_matches_pytorch(torch, name, x_shape, training, dtype):
    check_against_torch(torch, name, dict(num_features=3), x_shape, dtype, training)


OPTIONS = {
    "momentum_0.3": dict(momentum=0.3),
    "cumulative_average": dict(momentum=None),
    "no_affine": dict(affine=False),
    "batch_stats_only": dict(track_running_stats=False),
    "eps": dict(eps=0.5),
}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_batch_norm_options_match_pytorch(torch, option, training):
    check_against_torch(torch, "BatchNorm1d", dict(num_features=3, **OPTIONS[option]), (4, 3, 2),
                        np.float64, training, seed=1)


def test_compiled_training_steps_update_running_statistics_as_pytorch(torch):
    """Two steps of compile_train_step update the model's own buffers in place."""
    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    tmodel = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    tmodel.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    step = gc.compile_train_step(model, lambda out, y: (out * y).sum(),
                                 optim.SGD(model.parameters(), lr=0.1),
                                 (np.zeros((5, 4), np.float32), np.zeros((5, 3), np.float32)),
                                 backend="reference")
    for _ in range(2):
        x, y = (rng.standard_normal(s).astype(np.float32) for s in ((5, 4), (5, 3)))
        step(x, y)
        tmodel.zero_grad()
        (tmodel(torch.tensor(x)) * torch.tensor(y)).sum().backward()
        with torch.no_grad():  # plain SGD by hand: importing torch.optim takes seconds
            for p in tmodel.parameters():
                p -= 0.1 * p.grad
    theirs = tmodel.state_dict()
    for k, value in model.state_dict().items():
        np.testing.assert_allclose(value, theirs[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    assert model.state_dict()["1.num_batches_tracked"] == 2


# -- layer norm against PyTorch -----------------------------------------------------------------
LAYER_NORMS = {
    "last_axis": (dict(normalized_shape=5), (3, 5)),
    "two_axes": (dict(normalized_shape=(4, 5)), (2, 3, 4, 5)),
    "no_affine": (dict(normalized_shape=5, elementwise_affine=False), (2, 3, 5)),
    "no_bias": (dict(normalized_shape=(3, 5), bias=False, eps=0.1), (2, 3, 5)),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", sorted(LAYER_NORMS))
def test_layer_norm_matches_pytorch(torch, case, dtype):
    kwargs, x_shape = LAYER_NORMS[case]
    check_against_torch(torch, "LayerNorm", kwargs, x_shape, dtype, training=True)


# -- without PyTorch ------------------------------------------------------------------------------
def test_batch_norm_training_step_matches_numpy():
    rng = np.random.default_rng(4)
    model = nn.BatchNorm2d(2, momentum=0.2)
    state = random_state(model, np.float64, rng)
    x = rng.standard_normal((3, 2, 2, 3)) * 3 - 1
    out, updates = gc.jit(lambda p, x: nn.functional_call(model, p, x, return_buffers=True),
                          backend="reference")(state, x)

    mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    shaped = lambda v: v.reshape(1, 2, 1, 1)  # noqa: E731
    normalized = (x - shaped(mean)) / np.sqrt(shaped(var) + 1e-5)
    np.testing.assert_allclose(out, normalized * shaped(state["weight"]) + shaped(state["bias"]),
                               rtol=1e-12)
    count = x.size // 2
    unbiased_var = var * count / (count - 1)
    np.testing.assert_allclose(updates["running_mean"], 0.8 * state["running_mean"] + 0.2 * mean,
                               rtol=1e-12)
    np.testing.assert_allclose(updates["running_var"], 0.8 * state["running_var"] + 0.2 * unbiased_var,
                               rtol=1e-12)
    assert updates["num_batches_tracked"] == 4 and updates["num_batches_tracked"].dtype == np.int64


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_a_batch_norm_called_twice_in_a_step_updates_its_statistics_twice(backend):
    """As PyTorch's: the second call's update starts from the first's (only the last call's
    survived, computed from the statistics before the step)."""
    import graphc.nn.functional as F

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.out = nn.BatchNorm1d(3), nn.Linear(3, 2)

        def forward(self, x):
            return self.out(self.bn(self.bn(x) * 2 + 1))
    gc.manual_seed(0)
    model = Twice()
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 3)) * 3 + 5).astype(np.float32)
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.0),
                                 (x, rng.integers(0, 2, 8)), backend=backend)
    step(x, rng.integers(0, 2, 8))
    mean, var = np.zeros(3), np.ones(3)
    for _ in range(2):
        mean = 0.9 * mean + 0.1 * x.mean(0)
        var = 0.9 * var + 0.1 * x.var(0, ddof=1)
        x = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * 2 + 1
    np.testing.assert_allclose(model.bn.running_mean, mean, rtol=1e-5)
    np.testing.assert_allclose(model.bn.running_var, var, rtol=1e-5)
    assert model.bn.num_batches_tracked == 2


def test_batch_norm_eval_uses_running_statistics_and_records_nothing():
    rng = np.random.default_rng(5)
    model = nn.BatchNorm1d(3).eval()
    state = random_state(model, np.float64, rng)
    x = rng.standard_normal((2, 3))
    out, updates = gc.jit(lambda p, x: nn.functional_call(model, p, x, return_buffers=True),
                          backend="reference")(state, x)
    normalized = (x - state["running_mean"]) / np.sqrt(state["running_var"] + 1e-5)
    np.testing.assert_allclose(out, normalized * state["weight"] + state["bias"], rtol=1e-12)
    assert updates == {}


def test_layer_norm_matches_numpy():
    rng = np.random.default_rng(6)
    model = nn.LayerNorm((2, 3))
    state = {k: rng.standard_normal(v.shape) for k, v in model.state_dict().items()}
    x = rng.standard_normal((4, 2, 3))
    out = gc.jit(lambda p, x: nn.functional_call(model, p, x), backend="reference")(state, x)
    mean, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    normalized = (x - mean) / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(out, normalized * state["weight"] + state["bias"], rtol=1e-12)


def test_initial_parameters_and_buffers():
    bn = nn.BatchNorm2d(4)
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var",
                                     "num_batches_tracked"]
    np.testing.assert_array_equal(bn.weight, np.ones(4, np.float32))
    np.testing.assert_array_equal(bn.bias, np.zeros(4, np.float32))
    np.testing.assert_array_equal(bn.running_var, np.ones(4, np.float32))
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked.dtype == np.int64
    assert list(nn.BatchNorm1d(4, affine=False, track_running_stats=False).state_dict()) == []
    ln = nn.LayerNorm((2, 3))
    assert ln.weight.shape == ln.bias.shape == (2, 3)
    assert list(nn.LayerNorm(3, elementwise_affine=False).state_dict()) == []


def test_bad_inputs_raise_clear_errors():
    def run(model, x):
        forward = gc.jit(lambda p, x: nn.functional_call(model, p, x), backend="reference")
        return forward(model.state_dict(), x)

    with pytest.raises(ShapeError, match=r"BatchNorm2d\(3\).*got shape \(2, 3, 4\)"):
        run(nn.BatchNorm2d(3), np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ShapeError, match="3 channels"):
        run(nn.BatchNorm1d(3), np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run(nn.BatchNorm1d(3), np.zeros((1, 3), np.float32))
    run(nn.BatchNorm1d(3).eval(), np.zeros((1, 3), np.float32))  # fine with running statistics
    with pytest.raises(ShapeError, match=r"normalized_shape \(4,\)"):
        run(nn.LayerNorm(4), np.zeros((2, 3), np.float32))
    # batch statistics of one value per channel, without running statistics too (were zeros)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        run(nn.BatchNorm1d(3, track_running_stats=False).eval(), np.zeros((1, 3), np.float32))
    with pytest.raises(ShapeError,
                       match=r"GroupNorm\(2, 4\): expects \(N, 4, ...\) input, got shape \(2, 6, 3\)"):
        run(nn.GroupNorm(2, 4), np.zeros((2, 6, 3), np.float32))
    with pytest.raises(ShapeError,
                       match=r"weight must have the shape of normalized_shape \(2, 4\), got \(4,\)"):
        gc.jit(lambda x, w: nn.functional.layer_norm(x, (2, 4), w))(np.zeros((3, 2, 4), np.float32),
                                                                    np.ones(4, np.float32))


def test_numpy_inputs_integer_types_and_empty_batches_as_pytorch():
    """A batch norm in training mode given an array crashed (x.numel); LayerNorm refused a NumPy
    integer; empty batches raised where PyTorch gives empty results, counting the batch."""
    bn = nn.BatchNorm1d(3)
    out, updates = gc.jit(lambda x: nn.functional_call(bn, {}, x, return_buffers=True))(
        np.ones((4, 3), np.float32))
    np.testing.assert_allclose(out, 0.0)
    assert nn.LayerNorm(np.int64(4)).normalized_shape == (4,)
    out, updates = gc.jit(lambda x: nn.functional_call(bn, {}, x, return_buffers=True))(
        np.zeros((0, 3), np.float32))
    assert out.shape == (0, 3) and updates["num_batches_tracked"] == 1
    assert set(updates) == {"num_batches_tracked"}  # the statistics are kept
    for layer, shape in ((nn.BatchNorm1d(3, track_running_stats=False), (0, 3)),
                         (nn.GroupNorm(2, 4), (0, 4, 2))):
        assert gc.jit(layer)(np.zeros(shape, np.float32)).shape == shape


@pytest.mark.parametrize("model", [nn.BatchNorm2d(2), nn.LayerNorm((2, 3))],
                         ids=["batch_norm", "layer_norm"])
def test_gradients_match_finite_differences(model):
    """Directional derivatives (through the batch statistics too) along random directions."""
    rng = np.random.default_rng(7)
    params = {k: rng.standard_normal(v.shape) for k, v in model.named_parameters()}
    buffers = {k: v.astype(np.float64) if v.dtype == np.float32 else v
               for k, v in model.named_buffers()}
    x = rng.standard_normal((3, 2, 2, 3))

    def loss(p, x):
        out = nn.functional_call(model, {**p, **buffers}, x)
        return (out * weights_like(out.shape, np.float64)).sum()

    forward = gc.jit(loss, backend="reference")
    g_params, g_x = gc.grad(loss, argnums=(0, 1), backend="reference")(params, x)
    eps = 1e-6
    for name, array, grad in [*((k, params[k], g_params[k]) for k in params), ("x", x, g_x)]:
        direction = rng.standard_normal(array.shape)
        saved = array.copy()
        array += eps * direction
        plus = forward(params, x)
        array[...] = saved - eps * direction
        minus = forward(params, x)
        array[...] = saved
        np.testing.assert_allclose(np.sum(grad * direction), (plus - minus) / (2 * eps), rtol=1e-6,
                                   atol=1e-8, err_msg=f"directional derivative along {name}")


def test_a_training_mode_batch_norm_outside_the_trained_model_says_what_to_do():
    """A teacher network called by the loss function: its statistics have no place in the
    step's outputs (the message said the update must be inside a training step, which it was)."""
    import graphc.nn.functional as F
    teacher = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    model = nn.Linear(3, 3)
    x = np.ones((4, 3), np.float32)
    with pytest.raises(gc.GraphcError, match=r"call .eval\(\) on it, or make it a submodule"):
        gc.compile_train_step(model, lambda out, x: F.mse_loss(out, teacher(x)),
                              optim.SGD(model.parameters(), lr=0.1), (x, x), backend="reference")
    teacher.eval()
    gc.compile_train_step(model, lambda out, x: F.mse_loss(out, teacher(x)),
                          optim.SGD(model.parameters(), lr=0.1), (x, x), backend="reference")(x, x)


def test_a_state_dict_without_the_batch_count_loads_as_in_pytorch():
    torch = pytest.importorskip("torch")
    model, torch_model = nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    model.num_batches_tracked[...] = 5
    state = {k: v.numpy() + 1 for k, v in torch_model.state_dict().items() if k != "num_batches_tracked"}
    torch_model.load_state_dict({k: torch.tensor(v) for k, v in state.items()})  # strict, accepted
    keys = model.load_state_dict(state)
    assert keys.missing_keys == [] and int(model.num_batches_tracked) == 5
    np.testing.assert_array_equal(model.running_mean, state["running_mean"])
    with pytest.raises(gc.GraphcError, match=r"missing keys \['running_var'\]"):
        model.load_state_dict({k: v for k, v in state.items() if k != "running_var"})
