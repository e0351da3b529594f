"""graphc.nn.utils against torch.nn.utils: weight norm trained in compiled steps, and the
parameter-vector helpers."""
import copy

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F

REF = "reference"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.utils.weight_norm(nn.Conv1d(2, 3, 3))
        self.fc = nn.utils.weight_norm(nn.Linear(3 * 6, 4), dim=None)

    def forward(self, x):
        return self.fc(self.conv(x).tanh().flatten(1))


def _torch_net(torch, model):
    class TorchNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.utils.weight_norm(torch.nn.Conv1d(2, 3, 3))
            self.fc = torch.nn.utils.weight_norm(torch.nn.Linear(3 * 6, 4), dim=None)

        def forward(self, x):
            return self.fc(torch.tanh(self.conv(x)).flatten(1))

    theirs = TorchNet()
    theirs.load_state_dict({k: torch.tensor(v) for k, v in model.state_dict().items()})
    return theirs


def test_weight_norm_names_and_shapes_are_pytorchs():
    torch = pytest.importorskip("torch")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch deprecates the function, not its checkpoints
        model = Net()
        theirs = _torch_net(torch, model)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert list(ours) == list(theirs.state_dict())  # g and v after the bias, as PyTorch's
    np.testing.assert_allclose(model.conv.weight_g.reshape(-1),
                               np.linalg.norm(model.conv.weight_v.reshape(3, -1), axis=1), rtol=1e-6)


@pytest.mark.parametrize("backend", [REF, "numba-cpu"])
def test_weight_norm_trains_as_pytorchs(backend):
    torch = pytest.importorskip("torch")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Net()
        theirs = _torch_net(torch, model)
    rng = np.random.default_rng(0)
    x, t = rng.normal(size=(5, 2, 8)).astype(np.float32), rng.integers(0, 4, 5)
    step = gc.compile_train_step(model, F.cross_entropy, gc.optim.Adam(model.parameters(), lr=0.05),
                                 (x, t), backend=backend)
    opt = torch.optim.Adam(theirs.parameters(), lr=0.05)
    for _ in range(3):
        loss = step(x, t)
        opt.zero_grad()
        expected = torch.nn.functional.cross_entropy(theirs(torch.tensor(x)), torch.tensor(t))
        expected.backward()
        opt.step()
        np.testing.assert_allclose(float(loss), expected.item(), rtol=1e-5)
    for name, value in theirs.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[name], value.numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


def test_remove_weight_norm_gives_the_weight_back():
    layer = nn.Linear(3, 2)
    before = layer.weight.copy()
    nn.utils.weight_norm(layer)
    assert sorted(n for n, _ in layer.named_parameters()) == ["bias", "weight_g", "weight_v"]
    x = np.ones((1, 3), np.float32)
    out = gc.jit(lambda a: layer(a), backend=REF)(x)
    np.testing.assert_allclose(out, x @ before.T + layer.bias, rtol=1e-6)
    layer.weight_g[...] *= 2  # g scales the weight
    nn.utils.remove_weight_norm(layer)
    assert [n for n, _ in layer.named_parameters()] == ["bias", "weight"]
    np.testing.assert_allclose(layer.weight, 2 * before, rtol=1e-6)
    np.testing.assert_allclose(gc.jit(lambda a: layer(a), backend=REF)(x),
                               x @ (2 * before).T + layer.bias, rtol=1e-6)
    copy.deepcopy(layer)


def test_weight_norm_of_a_1d_parameter_and_the_weight_read_after_a_call_are_pytorchs():
    """A 1-D parameter's norm over no axis is each element's magnitude (graphc divided by the
    vector's norm); after a compiled call, module.weight was a Tensor of the finished trace."""
    torch = pytest.importorskip("torch")
    import warnings
    layer = nn.utils.weight_norm(nn.Linear(3, 4), name="bias")
    theirs = torch.nn.Linear(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.nn.utils.weight_norm(theirs, name="bias")
    layer.bias_g[...] = [0.5, -2.0, 1.0, 3.0]
    theirs.load_state_dict({k: torch.tensor(v) for k, v in layer.state_dict().items()})
    x = np.ones((2, 3), np.float32)
    expected = theirs(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(gc.jit(lambda a: layer(a), backend=REF)(x), expected, rtol=1e-6)
    # read outside a trace: the present g * v / |v|, as PyTorch's module holds it
    np.testing.assert_allclose(layer.bias, theirs.bias.detach().numpy(), rtol=1e-6)
    conv = nn.utils.weight_norm(nn.Conv1d(2, 3, 3))
    gc.jit(lambda a: conv(a), backend=REF)(np.ones((1, 2, 5), np.float32))
    assert isinstance(conv.weight, np.ndarray) and conv.weight.shape == (3, 2, 3)
    np.testing.assert_allclose(conv.weight, conv.weight_v * conv.weight_g
                               / np.linalg.norm(conv.weight_v.reshape(3, -1), axis=1)[:, None, None],
                               rtol=1e-6)


def test_weight_norm_over_a_dim_counted_from_the_end_is_pytorchs():
    torch = pytest.importorskip("torch")
    import warnings
    ours = nn.utils.weight_norm(nn.Conv1d(2, 3, 3), dim=-2)  # -1 alone means the whole tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.nn.utils.weight_norm(torch.nn.Conv1d(2, 3, 3), dim=-2)
    assert ours.weight_g.shape == tuple(theirs.weight_g.shape) == (1, 2, 1)


def test_weight_norm_refuses_what_it_cannot_do():
    layer = nn.Linear(3, 2)
    with pytest.raises(gc.GraphcError, match="no parameter 'kernel'"):
        nn.utils.weight_norm(layer, "kernel")
    with pytest.raises(gc.GraphcError, match="dim must be an axis"):
        nn.utils.weight_norm(layer, dim=2)
    with pytest.raises(gc.GraphcError, match="dim must be an axis"):
        nn.utils.weight_norm(layer, dim=-3)
    nn.utils.weight_norm(layer)
    with pytest.raises(gc.GraphcError, match="has weight norm already"):
        nn.utils.weight_norm(layer)
    with pytest.raises(gc.GraphcError, match="not found"):
        nn.utils.remove_weight_norm(layer, "bias")


def test_parameter_vectors_round_trip_in_place():
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    params = list(model.parameters())
    vector = nn.utils.parameters_to_vector(params)
    assert vector.shape == (3 * 2 + 2 + 2 + 1,)
    nn.utils.vector_to_parameters(np.arange(vector.size, dtype=np.float32), params)
    np.testing.assert_array_equal(model[0].weight, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(model[1].bias, [10])
    with pytest.raises(gc.GraphcError, match="1-D vector of the parameters' 11 elements"):
        nn.utils.vector_to_parameters(np.zeros(10, np.float32), params)
