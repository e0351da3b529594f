"""nn.RNN / nn.LSTM / nn.GRU and nn.Embedding: against PyTorch (outputs, final states and
gradients of every parameter, the input and the initial states) and against finite differences."""
import math

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
from graphc.ir import ShapeError

TOLERANCES = {np.float64: dict(rtol=1e-9, atol=1e-12), np.float32: dict(rtol=1e-4, atol=1e-6)}
# (class name, extra constructor arguments): the argument names are PyTorch's, so one dict
# builds both modules.
CELLS = [("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}), ("LSTM", {}),
         ("GRU", {})]


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def weights_like(shape, dtype):
    """Fixed, non-uniform weights so that a weighted sum exercises every output element."""
    return np.cos(np.arange(int(np.prod(shape)))).reshape(shape).astype(dtype)


def as_list(final):
    """h_n, or (h_n, c_n), as a list."""
    return list(final) if isinstance(final, tuple) else [final]


def scalar_loss(output, final, lift=lambda w: w):
    """Weighted sum of the output and final states, written once for graphc and for torch
    (`lift` turns the NumPy weights into the framework's tensors)."""
    total = 0
    for t in [output, *as_list(final)]:
        dtype = np.float64 if "64" in str(t.dtype) else np.float32
        total = total + (t * lift(weights_like(tuple(t.shape), dtype))).sum()
    return total


def random_state(model, dtype, rng):
    """The model's state dict with every array replaced by random values of `dtype`."""
    return {k: (rng.standard_normal(v.shape) * 0.5).astype(dtype)
            for k, v in model.state_dict().items()}


def initial_states(name, shape, dtype, rng):
    """h_0 for RNN/GRU, (h_0, c_0) for LSTM."""
    h0, c0 = ((rng.standard_normal(shape) * 0.5).astype(dtype) for _ in range(2))
    return (h0, c0) if name == "LSTM" else h0


def graphc_loss_and_grads(model, state, x, hx):
    """((loss, output, final), (grad state, grad x, grad hx)) on the reference backend."""
    def loss(p, x, hx):
        output, final = nn.functional_call(model, p, x, hx)
        return scalar_loss(output, final), (output, final)

    if hx is None:
        (value, aux), grads = gc.value_and_grad(lambda p, x: loss(p, x, None), argnums=(0, 1),
                                                has_aux=True, backend="reference")(state, x)
        grads = (*grads, None)
    else:
        (value, aux), grads = gc.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True,
                                                backend="reference")(state, x, hx)
    return (value, *aux), grads


def torch_loss_and_grads(torch, name, kwargs, state, x, hx, training=True):
    module = getattr(torch.nn, name)(**kwargs).to(getattr(torch, x.dtype.name)).train(training)
    module.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    tx = torch.tensor(x, requires_grad=True)
    thx = None if hx is None else (
        tuple(torch.tensor(h, requires_grad=True) for h in hx) if isinstance(hx, tuple)
        else torch.tensor(hx, requires_grad=True))
    output, final = module(tx, thx)
    value = scalar_loss(output, final, torch.tensor)
    value.backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    grad_hx = None if hx is None else [h.grad.numpy() for h in as_list(thx)]
    detached = [t.detach().numpy() for t in [output, *as_list(final)]]
    return value.item(), detached, grads, tx.grad.numpy(), grad_hx


def check_against_torch(torch, name, kwargs, x_shape, with_state, dtype, seed=0, training=True,
                        unroll=None):
    """`unroll` forces graphc's time loop unrolled (True) or on gc.scan (False)."""
    rng = np.random.default_rng(seed)
    model = getattr(nn, name)(**kwargs).train(training)
    model.unroll = unroll
    state = random_state(model, dtype, rng)
    x = rng.standard_normal(x_shape).astype(dtype)
    batch = (x_shape[0] if kwargs.get("batch_first") else x_shape[1]) if len(x_shape) == 3 else None
    layers = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    state_shape = ((layers,) + ((batch,) if batch else ())
                   + (kwargs["hidden_size"],))
    hx = initial_states(name, state_shape, dtype, rng) if with_state else None

    (value, output, final), (g_state, g_x, g_hx) = graphc_loss_and_grads(model, state, x, hx)
    t_value, t_outs, t_grads, t_gx, t_ghx = torch_loss_and_grads(torch, name, kwargs, state, x, hx,
                                                                 training)

    tol = TOLERANCES[dtype]
    np.testing.assert_allclose(value, t_value, **tol)
    for ours, theirs, what in zip([output, *as_list(final)], t_outs, ["output", "h_n", "c_n"]):
        assert ours.shape == theirs.shape, what
        np.testing.assert_allclose(ours, theirs, **tol, err_msg=what)
    assert set(g_state) == set(t_grads)
    for k in t_grads:
        np.testing.assert_allclose(g_state[k], t_grads[k], **tol, err_msg=f"gradient of {k}")
    np.testing.assert_allclose(g_x, t_gx, **tol, err_msg="gradient of the input")
    if with_state:
        for ours, theirs in zip(as_list(g_hx), t_ghx):
            np.testing.assert_allclose(ours, theirs, **tol, err_msg="gradient of the initial state")


# -- against PyTorch --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,extra", CELLS, ids=["rnn_tanh", "rnn_relu", "lstm", "gru"])
def test_two_layers_with_initial_state_match_pytorch(torch, name, extra, dtype):
    kwargs = dict(input_size=3, hidden_size=5, num_layers=2, batch_first=True, **extra)
    check_against_torch(torch, name, kwargs, (2, 4, 3), with_state=True, dtype=dtype)


LAYOUTS = {
    "time_major": (dict(num_layers=2, batch_first=False), (4, 2, 3), True),
    "unbatched": (dict(num_layers=2, batch_first=True), (4, 3), True),
    "no_bias_zero_state": (dict(bias=False, batch_first=True), (2, 3, 3), False),
    "default_time_major": (dict(), (4, 2, 3), True),
    "bidirectional_two_layers": (dict(num_layers=2, bidirectional=True), (4, 2, 3), True),
    "bidirectional_batch_first": (dict(bidirectional=True, batch_first=True), (2, 4, 3), True),
    "bidirectional_unbatched": (dict(num_layers=2, bidirectional=True), (4, 3), False),
    "dropout_in_eval_mode": (dict(num_layers=2, dropout=0.5), (4, 2, 3), True),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_layouts_match_pytorch(torch, name, layout):
    extra, x_shape, with_state = LAYOUTS[layout]
    kwargs = dict(input_size=3, hidden_size=4, **extra)
    check_against_torch(torch, name, kwargs, x_shape, with_state, np.float64, seed=1,
                        training=not extra.get("dropout"))


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_state_dict_keys_and_shapes_match_pytorch(torch, name, bidirectional):
    ours = getattr(nn, name)(3, 4, num_layers=2, bidirectional=bidirectional).state_dict()
    theirs = getattr(torch.nn, name)(3, 4, num_layers=2, bidirectional=bidirectional).state_dict()
    assert list(ours) == list(theirs)
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_batch_first_defaults_to_false_as_in_pytorch(torch, name):
    """A model ported from PyTorch reads (T, N, features) unless it says otherwise."""
    assert getattr(nn, name)(3, 4).batch_first is False
    assert getattr(torch.nn, name)(3, 4).batch_first is False


# -- without PyTorch ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_gradients_match_finite_differences(name):
    """Directional derivatives of the loss along random directions, per argument array."""
    rng = np.random.default_rng(2)
    model = getattr(nn, name)(2, 3, num_layers=2)
    state = random_state(model, np.float64, rng)
    x = rng.standard_normal((3, 2, 2))  # (T, N, input_size)
    hx = initial_states(name, (2, 2, 3), np.float64, rng)
    args = [state, x, hx]

    def loss(p, x, hx):
        return scalar_loss(*nn.functional_call(model, p, x, hx))

    forward = gc.jit(loss, backend="reference")
    grads = gc.grad(loss, argnums=(0, 1, 2), backend="reference")(*args)
    leaves = [(("state", k), state[k], grads[0][k]) for k in state]
    leaves += [(("x",), x, grads[1])]
    leaves += [(("hx", i), h, g) for i, (h, g) in enumerate(zip(as_list(hx), as_list(grads[2])))]
    eps = 1e-6
    for where, array, grad in leaves:
        direction = rng.standard_normal(array.shape)
        saved = array.copy()
        array += eps * direction
        plus = forward(*args)
        array[...] = saved - eps * direction
        minus = forward(*args)
        array[...] = saved
        numeric = (plus - minus) / (2 * eps)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=1e-6, atol=1e-8,
                                   err_msg=f"{name}: directional derivative along {where}")


@pytest.mark.parametrize("name,gates", [("RNN", 1), ("LSTM", 4), ("GRU", 3)])
def test_parameters_are_named_shaped_and_initialised_as_in_pytorch(name, gates):
    model = getattr(nn, name)(3, 5, num_layers=2)
    expected = {}
    for k, inputs in enumerate([3, 5]):
        expected |= {f"weight_ih_l{k}": (gates * 5, inputs), f"weight_hh_l{k}": (gates * 5, 5),
                     f"bias_ih_l{k}": (gates * 5,), f"bias_hh_l{k}": (gates * 5,)}
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items()} == expected
    bound = 1 / math.sqrt(5)
    for k, v in state.items():
        assert v.dtype == np.float32
        assert np.all(np.abs(v) <= bound), k
        # Five draws can spread less than bound / 4 (about 1 run in 30): judge spread on large arrays.
        if v.size >= 20:
            assert np.std(v) > bound / 4, f"{k} looks uninitialised"
        assert len(np.unique(v)) == v.size, f"{k} looks uninitialised"
    without_bias = getattr(nn, name)(3, 5, bias=False).state_dict()
    assert list(without_bias) == ["weight_ih_l0", "weight_hh_l0"]


@pytest.mark.parametrize("unroll", [True, False])
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_input_projection_is_one_matmul_per_layer(name, unroll):
    """x @ W_ih^T runs once over all (N*T) rows; only h @ W_hh^T runs per step (unrolled: a
    product per step; scanned: one in the loop's body)."""
    model = getattr(nn, name)(3, 4, num_layers=2, unroll=unroll)
    steps, batch = 5, 2
    graph = gc.trace(lambda p, x: nn.functional_call(model, p, x)[0], model.state_dict(),
                     np.zeros((steps, batch, 3), np.float32))
    matmuls = [n for n in graph.nodes if n.op == "matmul"]
    all_steps = [n for n in matmuls if n.inputs[0].shape[0] == steps * batch]
    assert len(all_steps) == 2
    bodies = [n.subgraph for n in graph.nodes if n.subgraph is not None]
    per_step = [n for body in bodies for n in body.nodes if n.op == "matmul"]
    assert (len(matmuls), len(bodies), len(per_step)) == ((2 * (steps + 1), 0, 0) if unroll else (2, 2, 2))


def test_default_float32_parameters_run_and_output_shapes():
    model = nn.LSTM(3, 4, num_layers=2)
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)  # (T, N, I)
    output, (h_n, c_n) = gc.jit(lambda p, x: nn.functional_call(model, p, x),
                                backend="reference")(model.state_dict(), x)
    assert output.shape == (5, 2, 4) and output.dtype == np.float32
    assert h_n.shape == c_n.shape == (2, 2, 4)
    np.testing.assert_array_equal(output[-1], h_n[-1])


def test_unsupported_options_and_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="dropout must be a probability"):
        nn.GRU(3, 4, num_layers=2, dropout=1.5)
    with pytest.raises(NotImplementedError, match="proj_size"):
        nn.LSTM(3, 4, proj_size=2)
    with pytest.raises(ValueError, match="nonlinearity"):
        nn.RNN(3, 4, nonlinearity="gelu")
    for sizes in ((0, 4), (-1, 4), (3, 0), (3, -2)):  # PyTorch refuses them too
        with pytest.raises(ValueError, match="input_size, hidden_size and num_layers must be positive"):
            nn.LSTM(*sizes)
    model = nn.GRU(3, 4, num_layers=2)
    run = gc.jit(lambda p, x, h: nn.functional_call(model, p, x, h), backend="reference")
    with pytest.raises(ShapeError, match="input_size=3"):
        run(model.state_dict(), np.zeros((5, 2, 4), np.float32), np.zeros((2, 2, 4), np.float32))
    with pytest.raises(ShapeError, match=r"initial states must have shape \(2, 2, 4\)"):
        run(model.state_dict(), np.zeros((5, 2, 3), np.float32), np.zeros((1, 2, 4), np.float32))


# -- Embedding ----------------------------------------------------------------------------------
def test_embedding_lookup_and_gradient_skip_the_padding_row():
    model = nn.Embedding(6, 3, padding_idx=-2)
    assert model.padding_idx == 4
    assert np.all(model.weight[4] == 0) and np.all(model.weight[[0, 1, 2, 3, 5]] != 0)
    weight = np.random.default_rng(0).standard_normal((6, 3))  # padding row non-zero on purpose
    indices = np.array([[1, 4, 1], [0, 5, 4]])

    def loss(p, idx):
        rows = nn.functional_call(model, p, idx)
        return (rows * weights_like(rows.shape, np.float64)).sum(), rows

    (_, rows), grads = gc.value_and_grad(loss, has_aux=True, backend="reference")(
        {"weight": weight}, indices)
    np.testing.assert_array_equal(rows, weight[indices])
    expected = np.zeros_like(weight)
    np.add.at(expected, indices, weights_like((2, 3, 3), np.float64))
    expected[4] = 0
    np.testing.assert_allclose(grads["weight"], expected, rtol=1e-12)


def test_embedding_matches_pytorch(torch):
    model = nn.Embedding(7, 4, padding_idx=0)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((7, 4))
    weight[0] = 0.25  # PyTorch looks the padding row up as it is, but never updates it
    indices = rng.integers(0, 7, size=(3, 5))
    indices[0, :2] = 0

    def loss(p, idx):
        rows = nn.functional_call(model, p, idx)
        return (rows * weights_like(rows.shape, np.float64)).sum(), rows

    (_, rows), grads = gc.value_and_grad(loss, has_aux=True, backend="reference")(
        {"weight": weight}, indices)
    tmodel = torch.nn.Embedding(7, 4, padding_idx=0).double()
    tmodel.load_state_dict({"weight": torch.tensor(weight)})
    trows = tmodel(torch.tensor(indices))
    (trows * torch.tensor(weights_like(trows.shape, np.float64))).sum().backward()
    np.testing.assert_allclose(rows, trows.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(grads["weight"], tmodel.weight.grad.numpy(), rtol=1e-12)
    assert list(model.state_dict()) == list(tmodel.state_dict())


def test_embedding_feeds_an_lstm():
    embed, lstm = nn.Embedding(10, 3), nn.LSTM(3, 4)

    class Tagger(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.lstm = embed, lstm

        def forward(self, tokens):
            return self.lstm(self.embed(tokens))[0]

    tagger = Tagger()
    tokens = np.array([[1, 2, 3], [4, 5, 9]])  # (T, N)
    out = gc.jit(lambda p, t: nn.functional_call(tagger, p, t), backend="reference")(
        tagger.state_dict(), tokens)
    alone = gc.jit(lambda p, x: nn.functional_call(lstm, p, x)[0], backend="reference")(
        lstm.state_dict(), embed.weight[tokens])
    np.testing.assert_allclose(out, alone, rtol=1e-6)
    assert list(tagger.state_dict())[:2] == ["embed.weight", "lstm.weight_ih_l0"]


def test_inter_layer_dropout_applies_only_while_training():
    model = nn.GRU(3, 4, num_layers=2, dropout=0.5)
    x = np.random.default_rng(0).standard_normal((4, 2, 3)).astype(np.float32)
    run = gc.jit(lambda x: model(x)[0], backend="reference")
    trained = run(x)
    model.eval()
    evaluated = run(x)
    single = nn.GRU(3, 4, num_layers=2)
    single.load_state_dict(model.state_dict())
    np.testing.assert_allclose(evaluated, gc.jit(lambda x: single(x)[0], backend="reference")(x))
    assert not np.allclose(trained, evaluated)


@pytest.mark.parametrize("steps", [5, 40])  # unrolled or scanned on one thread; scanned on several
@pytest.mark.parametrize("name", ["RNN", "LSTM", "GRU"])
def test_an_empty_batch_gives_empty_outputs_as_pytorch_does(name, steps):
    """Zero sequences: outputs (T, 0, D * hidden) and states (layers * D, 0, hidden). The input
    projection's reshape once asked for -1, which zero elements leave undetermined."""
    model = getattr(nn, name)(3, 4, num_layers=2, bidirectional=True)
    x = np.zeros((steps, 0, 3), np.float32)
    for backend in ("reference", "numba-cpu"):
        output, state = gc.jit(lambda p, x: nn.functional_call(model, p, x), backend=backend)(
            model.state_dict(), x)
        assert output.shape == (steps, 0, 8)
        for s in (state if name == "LSTM" else (state,)):
            assert s.shape == (4, 0, 4)
