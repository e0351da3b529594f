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


def test_layers_without_bias_or_affine_parameters_hold_none_as_pytorchs():
    """`m.bias is None` raised AttributeError: torchvision's init loops crashed."""
    layers = [nn.Conv2d(3, 8, 3, bias=False), nn.Conv1d(3, 8, 3, bias=False), nn.Linear(3, 2, bias=False),
              nn.ConvTranspose2d(3, 8, 3, bias=False), nn.BatchNorm2d(3, affine=False),
              nn.GroupNorm(1, 3, affine=False), nn.LayerNorm(3, elementwise_affine=False),
              nn.LayerNorm(3, bias=False)]
    for layer in layers:
        assert layer.bias is None, type(layer).__name__
        assert "bias" not in layer.state_dict()
    assert nn.BatchNorm2d(3, track_running_stats=False).running_mean is None
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4, affine=False))
    for m in model.modules():
        if getattr(m, "bias", None) is not None:
            m.bias[:] = 0
    assert gc.jit(model.eval())(np.ones((2, 3, 5, 5), np.float32)).shape == (2, 4, 3, 3)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_one_unbatched_image_convolves_as_its_batch_of_one(backend):
    x = np.random.default_rng(0).standard_normal((3, 8, 7)).astype(np.float32)
    for layer in (nn.Conv2d(3, 4, 3, padding=1), nn.ConvTranspose2d(3, 4, 3, stride=2)):
        run = gc.jit(layer, backend=backend)
        np.testing.assert_allclose(run(x), run(x[None])[0], rtol=1e-6)


@pytest.mark.parametrize("build, message", [
    (lambda: nn.Conv2d(3, 4, 3, groups=0), "groups must be a positive integer"),
    (lambda: nn.Conv2d(3, 4, 0), r"kernel_size must be positive, got \(0, 0\)"),
    (lambda: nn.ConvTranspose2d(3, 4, 3, stride=0), "stride must be positive"),
    (lambda: nn.Conv1d(3, 4, 3, padding=(1, 2)), r"padding must be one int or a 1-tuple, got \(1, 2\)"),
    (lambda: nn.Conv1d(3, 4, 3, dilation=0), "dilation must be positive"),
])
def test_bad_convolution_arguments_are_refused_by_name(build, message):
    """groups=0 and kernel 0 failed as divisions by zero; Conv1d took padding (1, 2) as 1."""
    with pytest.raises(ValueError, match=message):
        build()


def test_a_transposed_convolution_too_small_to_have_an_output_is_refused():
    """padding=1 gave an empty result; padding=3 named an internal op and a 'not 4-D' shape."""
    x = np.ones((1, 3, 2, 2), np.float32)
    for padding, size in ((1, "0 x 0"), (3, "-4 x -4")):
        with pytest.raises(ShapeError, match=f"conv_transpose2d: the output would be {size} per channel"):
            gc.jit(nn.ConvTranspose2d(3, 4, 1, padding=padding))(x)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
@pytest.mark.parametrize("channels", [3, 16])  # 16: numba-cpu's Winograd path for 3x3 stride 1
def test_convolutions_of_an_empty_batch_have_empty_results_and_zero_weight_gradients(backend, channels):
    """As PyTorch's: the reference backend's input gradient (and so conv_transpose2d) failed in
    a reshape, and numba-cpu's Winograd weight gradient stepped a loop by 0 images."""
    x = np.zeros((0, channels, 5, 5), np.float32)
    w = np.ones((channels, channels, 3, 3), np.float32)

    def loss(x, w):
        return F.conv2d(x, w, padding=1).sum() + F.conv_transpose2d(x, w, stride=2).sum()
    dx, dw = gc.grad(loss, argnums=(0, 1), backend=backend)(x, w)
    assert dx.shape == x.shape and dw.shape == w.shape and not dw.any()
    transposed = gc.jit(lambda x, w: F.conv_transpose2d(x, w, stride=2), backend=backend)(x, w)
    assert transposed.shape == (0, channels, 11, 11)
