"""Layers PyTorch models use that graphc builds from its ops: ConvTranspose2d (a convolution's
input gradient), GroupNorm, Upsample / F.interpolate (nearest, linear, bilinear), PReLU,
Hardtanh, ReLU6 and Dropout2d. Values and gradients (input and parameters) against PyTorch where
it is installed, with PyTorch's initial weights copied over; compiled on numba-cpu and on the
reference."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import GraphcError, ShapeError


def copy_weights(torch, ours, theirs):
    state = {k: np.asarray(v) for k, v in theirs.state_dict().items()}
    ours.load_state_dict({k: state[k] for k in ours.state_dict()})


def check_against_torch(make_ours, make_theirs, x, rtol=1e-4, atol=1e-5):
    """Forward values, input gradient and parameter gradients of sum(out * r) for fixed r."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    theirs, ours = make_theirs(torch), make_ours()
    copy_weights(torch, ours, theirs)
    tx = torch.tensor(x, requires_grad=True)
    out = theirs(tx)
    r = np.random.default_rng(1).standard_normal(tuple(out.shape)).astype("float32")
    (out * torch.tensor(r)).sum().backward()

    def loss(params, x):
        y = nn.functional_call(ours, params, x)
        return (y * r).sum(), y
    params = {k: np.asarray(v) for k, v in ours.state_dict().items() if k in dict(ours.named_parameters())}
    if params:
        (_, y), (dparams, dx) = gc.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    else:
        ((_, y), dx), dparams = gc.value_and_grad(loss, argnums=1, has_aux=True)(params, x), {}
    np.testing.assert_allclose(y, out.detach().numpy(), rtol=rtol, atol=atol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=rtol, atol=atol)
    named = dict(theirs.named_parameters())
    for name, grad in dparams.items():
        np.testing.assert_allclose(grad, named[name].grad.numpy(), rtol=rtol, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("stride, padding, output_padding, dilation, groups",
                         [(1, 0, 0, 1, 1), (2, 1, 1, 1, 1), (3, 2, 0, 1, 2), (2, 0, 1, 2, 1)])
def test_conv_transpose2d_matches_pytorch(stride, padding, output_padding, dilation, groups):
    x = np.random.default_rng(stride).standard_normal((2, 4, 5, 6)).astype("float32")
    args = (4, 6, (3, 2), stride, padding, output_padding, groups, True, dilation)
    check_against_torch(lambda: nn.ConvTranspose2d(*args),
                        lambda torch: torch.nn.ConvTranspose2d(*args), x)


@pytest.mark.parametrize("groups, affine", [(1, True), (3, True), (6, False)])
def test_group_norm_matches_pytorch(groups, affine):
    x = np.random.default_rng(groups).standard_normal((3, 6, 4, 5)).astype("float32") * 3 + 1
    check_against_torch(lambda: nn.GroupNorm(groups, 6, affine=affine),
                        lambda torch: torch.nn.GroupNorm(groups, 6, affine=affine), x)


@pytest.mark.parametrize("make", [
    lambda m: m.PReLU(), lambda m: m.PReLU(3, 0.1), lambda m: m.Hardtanh(-0.5, 0.7), lambda m: m.ReLU6()])
def test_activations_match_pytorch(make):
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype("float32") * 4
    check_against_torch(lambda: make(nn), lambda torch: make(torch.nn), x)


@pytest.mark.parametrize("size, scale", [(None, 2), (None, (2, 3)), ((7, 5), None), (None, 1.5), ((3, 2), None)])
def test_nearest_interpolation_matches_pytorch(size, scale):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype("float32")
    want = torch.nn.functional.interpolate(torch.tensor(x), size=size, scale_factor=scale, mode="nearest")
    for backend in ("reference", "numba-cpu"):
        got = gc.compile(nn.Upsample(size, scale), (x,), backend=backend)(x)
        np.testing.assert_array_equal(got, want.numpy())
    line = x[:, :, 0]
    want = torch.nn.functional.interpolate(torch.tensor(line), scale_factor=3, mode="nearest")
    np.testing.assert_array_equal(gc.jit(lambda t: F.interpolate(t, scale_factor=3))(line), want.numpy())


def test_dropout2d_zeroes_whole_channels_and_keeps_the_mean():
    x = np.ones((64, 32, 3, 3), "float32")
    model = nn.Dropout2d(0.25)
    step = gc.jit(lambda t: model(t))
    out = step(x)
    per_channel = out.reshape(64, 32, 9)
    assert np.all(per_channel.min(axis=2) == per_channel.max(axis=2))  # a channel is kept or dropped whole
    assert set(np.unique(out)) <= {0.0, np.float32(1 / 0.75)}
    assert abs(out.mean() - 1) < 0.1 and 0.15 < (per_channel[:, :, 0] == 0).mean() < 0.35
    model.eval()
    np.testing.assert_array_equal(gc.jit(lambda t: model(t))(x), x)


def test_alpha_dropout_keeps_selus_mean_and_variance_with_pytorchs_two_values():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((200, 500)).astype("float32")
    model = nn.AlphaDropout(0.2)
    out = gc.jit(lambda t: model(t))(x)
    # every element is either x's affine image or the one dropped value, as in PyTorch's
    theirs = torch.nn.functional.alpha_dropout(torch.tensor(x), 0.2, training=True).numpy()
    values, counts = np.unique(theirs, return_counts=True)
    kept = ~np.isclose(out, values[counts.argmax()], rtol=1e-6, atol=0)
    assert 0.17 < 1 - kept.mean() < 0.23
    scale = 1 / np.sqrt((F.SELU_SATURATION ** 2 * 0.2 + 1) * 0.8)
    np.testing.assert_allclose(out[kept], scale * x[kept] - F.SELU_SATURATION * scale * 0.2,
                               rtol=1e-5, atol=1e-6)
    assert abs(out.mean()) < 0.02 and abs(out.std() - 1) < 0.02  # self-normalising
    model.eval()
    np.testing.assert_array_equal(gc.jit(lambda t: model(t))(x), x)
    np.testing.assert_array_equal(gc.jit(lambda t: F.alpha_dropout(t, 0.2))(x), x)  # PyTorch's
    # default is training=False


def test_a_decoder_trains_on_numba_cpu_as_on_the_reference():
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype("float32")
    y = np.random.default_rng(4).integers(0, 4, 2)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.norm = nn.GroupNorm(2, 8)
            self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
            self.act = nn.PReLU(4)
            self.head = nn.Linear(4 * 16 * 16, 4)

        def forward(self, x):
            h = self.act(self.up(F.relu6(self.norm(self.down(x)))))
            return self.head(nn.Upsample(scale_factor=2)(h).reshape(x.shape[0], -1))
    losses = {}
    for backend in ("reference", "numba-cpu"):
        gc.manual_seed(0)
        model = Net()
        step = gc.compile_train_step(model, F.cross_entropy, gc.optim.SGD(model.parameters(), lr=0.1), (x, y),
                                     backend=backend)
        losses[backend] = [float(step(x, y)) for _ in range(3)]
    np.testing.assert_allclose(losses["numba-cpu"], losses["reference"], rtol=1e-5)
    assert losses["reference"][2] < losses["reference"][0]


def test_unsupported_and_wrong_arguments_are_named():
    x = np.zeros((1, 2, 4, 4), "float32")
    with pytest.raises(GraphcError, match="'bilinear' on \\(N, C, H, W\\)"):
        gc.jit(lambda t: F.interpolate(t, scale_factor=2, mode="bicubic"))(x)
    with pytest.raises(ShapeError, match="every size must be at least 1"):
        gc.jit(lambda t: F.interpolate(t, size=(0, 2)))(x)
    with pytest.raises(ShapeError, match="every size must be at least 1"):
        gc.jit(lambda t: F.interpolate(t, scale_factor=0.2, mode="bilinear"))(x)
    with pytest.raises(ShapeError, match="divisible by groups=3"):
        gc.jit(lambda t: F.conv_transpose2d(t, np.ones((2, 1, 3, 3), "float32"), groups=3))(x)
    with pytest.raises(ShapeError, match="output_padding"):
        gc.jit(lambda t: F.conv_transpose2d(t, np.ones((2, 1, 3, 3), "float32"), output_padding=1))(x)
    with pytest.raises(ValueError, match="divisible by num_groups"):
        nn.GroupNorm(3, 4)
    with pytest.raises(ShapeError, match="prelu"):
        gc.jit(lambda t: F.prelu(t, np.ones(3, "float32")))(x)


@pytest.mark.parametrize("stride, padding, output_padding, groups", [(2, 1, 1, 1), (3, 0, 2, 2), (1, 1, 0, 1)])
def test_conv_transpose2d_exports_to_onnx(tmp_path, stride, padding, output_padding, groups):
    ort = pytest.importorskip("onnxruntime")
    x = np.random.default_rng(5).standard_normal((2, 4, 5, 6)).astype("float32")
    gc.manual_seed(0)
    model = nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride, padding, output_padding, groups), nn.GroupNorm(3, 6))
    gc.export_onnx(model, tmp_path / "decoder.onnx", x)
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"))
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, gc.compile(model, (x,))(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, scale, align_corners", [
    (None, 2, False), (None, 2, True), ((7, 3), None, False), ((7, 3), None, True), (None, (1.5, 0.5), False),
    ((1, 9), None, True)])
def test_bilinear_interpolation_matches_pytorch(size, scale, align_corners):
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 5)).astype("float32")
    check_against_torch(lambda: nn.Upsample(size, scale, "bilinear", align_corners),
                        lambda torch: torch.nn.Upsample(size, scale, "bilinear", align_corners), x)


def test_linear_interpolation_of_a_sequence_matches_pytorch():
    x = np.random.default_rng(3).standard_normal((2, 3, 6)).astype("float32")
    check_against_torch(lambda: nn.Upsample(size=13, mode="linear"),
                        lambda torch: torch.nn.Upsample(size=13, mode="linear"), x)
