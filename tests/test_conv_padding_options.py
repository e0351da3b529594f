"""PyTorch's convolution padding options: padding='same' / 'valid' (an even kernel pads one cell
more after than before) and padding_mode 'reflect', 'replicate', 'circular', on F.conv2d,
F.conv1d, Conv2d and Conv1d; values and gradients against PyTorch where it is installed, shapes
and errors everywhere. And slicing a Sequential gives a Sequential."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import ShapeError

# (kernel, dilation, padding, padding_mode)
CONV2D = [((3, 3), 1, "same", "zeros"), ((4, 2), 1, "same", "zeros"), ((3, 2), 2, "same", "zeros"),
          ((3, 3), 1, "valid", "zeros"), ((3, 3), 1, 1, "reflect"), ((2, 4), 1, "same", "replicate"),
          ((3, 3), 1, (2, 1), "circular"), ((5, 3), 1, "same", "reflect")]


def torch_conv2d(torch, x, w, b, dilation, padding, padding_mode):
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], padding=padding, dilation=dilation,
                           padding_mode=padding_mode)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor(w))
        conv.bias.copy_(torch.tensor(b))
    return conv


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # PyTorch's own note
@pytest.mark.parametrize("kernel, dilation, padding, padding_mode", CONV2D)
def test_conv2d_padding_options_match_pytorch(kernel, dilation, padding, padding_mode):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(sum(kernel) + dilation)
    x = rng.standard_normal((2, 3, 7, 8)).astype("float32")
    w = rng.standard_normal((4, 3, *kernel)).astype("float32")
    b = rng.standard_normal(4).astype("float32")

    def loss(x, w):
        out = F.conv2d(x, w, b, padding=padding, dilation=dilation, padding_mode=padding_mode)
        return (out * out).sum(), out
    (value, out), (dx, dw) = gc.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, w)
    conv = torch_conv2d(torch, x, w, b, dilation, padding, padding_mode)
    tx = torch.tensor(x, requires_grad=True)
    want = conv(tx)
    (want * want).sum().backward()
    np.testing.assert_allclose(out, want.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dw, conv.weight.grad.numpy(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_same_padding_keeps_the_size_in_the_layers(backend):
    x2 = np.random.default_rng(0).standard_normal((2, 3, 6, 5)).astype("float32")
    x1 = x2[:, :, 0]
    for layer, x in [(nn.Conv2d(3, 4, (4, 3), padding="same", padding_mode="reflect"), x2),
                     (nn.Conv2d(3, 4, 2, padding="same"), x2),
                     (nn.Conv1d(3, 4, 4, padding="same", padding_mode="circular"), x1),
                     (nn.Conv1d(3, 4, 3, padding="valid"), x1)]:
        out = gc.compile(layer, (x,), backend=backend)(x)
        want = x.shape[-1] - 2 if layer.padding == "valid" else x.shape[-1]
        assert out.shape == (2, 4, *x.shape[2:-1], want)


def test_conv1d_same_matches_pytorch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((2, 3, 9)).astype("float32")
    layer = nn.Conv1d(3, 5, 4, padding="same", dilation=2, padding_mode="replicate")
    ref = torch.nn.Conv1d(3, 5, 4, padding="same", dilation=2, padding_mode="replicate")
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(layer.weight)))
        ref.bias.copy_(torch.tensor(np.asarray(layer.bias)))
    np.testing.assert_allclose(gc.compile(layer, (x,))(x), ref(torch.tensor(x)).detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_bad_padding_is_named_when_the_layer_is_made():
    with pytest.raises(ShapeError, match="padding='same' needs stride 1"):
        nn.Conv2d(3, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        nn.Conv2d(3, 4, 3, padding="full")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        nn.Conv1d(3, 4, 3, padding_mode="mirror")


def test_a_slice_of_a_sequential_is_a_sequential():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2), nn.Tanh())
    head = model[2:]
    assert isinstance(head, nn.Sequential) and len(head) == 2
    assert list(head.state_dict()) == ["2.weight", "2.bias"]  # PyTorch keeps the names
    assert head[0] is model[2]
    x = np.random.default_rng(2).standard_normal((3, 5)).astype("float32")
    w, b = np.asarray(model[2].weight), np.asarray(model[2].bias)
    np.testing.assert_allclose(gc.compile(head, (x,))(x), np.tanh(x @ w.T + b), rtol=1e-5, atol=1e-6)
