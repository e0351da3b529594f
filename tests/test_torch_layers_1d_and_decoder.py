"""Layers ported PyTorch models reach for, built from graphc's ops and checked against PyTorch:
1-D pools and ConvTranspose1d (the 2-D ones over a height of 1), PixelShuffle/PixelUnshuffle,
InstanceNorm1d/2d with their running statistics, ParameterList/ParameterDict, and the
transformer decoder. Values and gradients with PyTorch's initial weights copied over."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
import graphc.optim as optim
from graphc.ir.errors import GraphcError, ShapeError

torch = pytest.importorskip("torch")
TF = torch.nn.functional
RNG = np.random.default_rng(0)
SIGNAL = RNG.standard_normal((2, 3, 11)).astype(np.float32)


def _copied(torch_module, module):
    module.load_state_dict({k: v.detach().numpy() for k, v in torch_module.state_dict().items()})
    return module


def _value_and_input_grad(function, torch_function, x):
    """(graphc's value, PyTorch's), (graphc's gradient of sum(out * out), PyTorch's)."""
    torch_x = torch.tensor(x, requires_grad=True)
    expected = torch_function(torch_x)
    (expected * expected).sum().backward()
    got = gc.jit(function)(x)
    grad = gc.grad(lambda t: (function(t) * function(t)).sum())(x)
    return (got, expected.detach().numpy()), (grad, torch_x.grad.numpy())


@pytest.mark.parametrize("kernel, stride, padding, ceil_mode, count_include_pad", [
    (3, None, 1, False, True), (4, 2, 2, True, False), (2, 3, 0, True, True), (5, 1, 2, False, False)])
def test_1d_pools_compute_and_differentiate_as_pytorchs(kernel, stride, padding, ceil_mode,
                                                        count_include_pad):
    for x in (SIGNAL, SIGNAL[0]):  # batched and unbatched
        pairs = _value_and_input_grad(
            lambda t: F.max_pool1d(t, kernel, stride, padding, ceil_mode=ceil_mode),
            lambda t: TF.max_pool1d(t, kernel, stride, padding, ceil_mode=ceil_mode), x)
        pairs += _value_and_input_grad(
            lambda t: nn.AvgPool1d(kernel, stride, padding, ceil_mode, count_include_pad)(t),
            lambda t: torch.nn.AvgPool1d(kernel, stride, padding, ceil_mode, count_include_pad)(t), x)
        for got, expected in pairs:
            assert got.shape == expected.shape
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_1d_pool_errors_name_the_1d_op_and_the_users_shapes():
    with pytest.raises(ShapeError, match=r"max_pool1d: expects an \(N, C, L\) or \(C, L\) input, got "
                                         r"shape \(2, 3, 4, 5\).*test_torch_layers_1d_and_decoder"):
        gc.jit(lambda t: F.max_pool1d(t, 2))(np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(ShapeError, match="avg_pool1d: .*padding at most half the kernel"):
        gc.jit(lambda t: F.avg_pool1d(t, 2, padding=2))(SIGNAL)
    with pytest.raises(ShapeError, match=r"max_pool1d: input \(2, 3, 11\) padded by 0 .* shorter "
                                         r"than the kernel 12"):
        gc.jit(lambda t: F.max_pool1d(t, 12))(SIGNAL)
    with pytest.raises(GraphcError, match="max_pool1d: dilation 2 .* not supported"):
        gc.jit(lambda t: nn.MaxPool1d(2, dilation=2)(t))(SIGNAL)


@pytest.mark.parametrize("stride, padding, output_padding, dilation, groups", [
    (1, 0, 0, 1, 1), (2, 1, 1, 1, 1), (3, 2, 0, 2, 3), (2, 0, 2, 3, 1)])
def test_conv_transpose1d_matches_pytorchs_values_and_gradients(stride, padding, output_padding,
                                                              dilation, groups):
    torch_layer = torch.nn.ConvTranspose1d(3, 6, 3, stride, padding, output_padding, groups,
                                           dilation=dilation)
    layer = _copied(torch_layer, nn.ConvTranspose1d(3, 6, 3, stride, padding, output_padding,
                                                    groups, dilation=dilation))
    for got, expected in _value_and_input_grad(layer, torch_layer, SIGNAL):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    torch_layer.zero_grad()
    (torch_layer(torch.tensor(SIGNAL)) ** 2).sum().backward()
    grads = gc.grad(lambda w: (F.conv_transpose1d(SIGNAL, w, layer.bias, stride, padding,
                                                  output_padding, groups, dilation) ** 2).sum())(layer.weight)
    np.testing.assert_allclose(grads, torch_layer.weight.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_conv_transpose1d_takes_an_output_size_and_an_unbatched_input():
    torch_layer = torch.nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1)
    layer = _copied(torch_layer, nn.ConvTranspose1d(3, 2, 3, stride=2, padding=1))
    expected = torch_layer(torch.tensor(SIGNAL), output_size=[22]).detach().numpy()
    got = gc.jit(lambda t: layer(t, output_size=[2, 2, 22]))(SIGNAL)
    assert got.shape == expected.shape == (2, 2, 22)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gc.jit(layer)(SIGNAL[1]), torch_layer(torch.tensor(SIGNAL[1])).detach(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"output_size \(25,\) is not reachable .* sizes 21 to 22"):
        gc.jit(lambda t: layer(t, output_size=(25,)))(SIGNAL)
    with pytest.raises(ShapeError, match=r"conv_transpose1d: weight \(3, 2, 3\) expects 3 input "
                                         r"channels, got input \(2, 4, 11\)"):
        gc.jit(layer)(np.zeros((2, 4, 11), np.float32))


def test_pixel_shuffle_and_unshuffle_match_pytorchs_over_extra_leading_axes():
    x = RNG.standard_normal((2, 3, 8, 4, 6)).astype(np.float32)
    for function, torch_function in ((nn.PixelShuffle(2), torch.nn.PixelShuffle(2)),
                                     (nn.PixelUnshuffle(2), torch.nn.PixelUnshuffle(2))):
        for got, expected in _value_and_input_grad(function, torch_function, x):
            assert got.shape == expected.shape
            np.testing.assert_array_equal(got, expected)
    round_trip = gc.jit(lambda t: F.pixel_unshuffle(F.pixel_shuffle(t, 2), 2))(x)
    np.testing.assert_array_equal(round_trip, x)
    with pytest.raises(ShapeError, match=r"pixel_shuffle: .*divisible by upscale_factor\^2 = 9"):
        gc.jit(lambda t: F.pixel_shuffle(t, 3))(x)
    with pytest.raises(ValueError, match="pixel_unshuffle: the factor must be a positive int, got 0"):
        gc.jit(lambda t: F.pixel_unshuffle(t, 0))(x)


@pytest.mark.parametrize("name, shape", [("InstanceNorm1d", (4, 3, 7)), ("InstanceNorm2d", (4, 3, 5, 6))])
@pytest.mark.parametrize("affine", [False, True])
def test_instance_norm_normalises_each_sample_as_pytorchs(name, shape, affine):
    x = (RNG.standard_normal(shape) * 3 + 1).astype(np.float32)
    torch_layer = getattr(torch.nn, name)(3, affine=affine)
    if affine:
        with torch.no_grad():
            torch_layer.weight.uniform_(0.5, 2)
            torch_layer.bias.uniform_(-1, 1)
    layer = _copied(torch_layer, getattr(nn, name)(3, affine=affine))
    for sample in (x, x[0]):  # batched and unbatched
        for got, expected in _value_and_input_grad(layer, torch_layer, sample):
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_instance_norm_running_statistics_follow_pytorchs_through_training_and_eval():
    x = (RNG.standard_normal((4, 3, 5, 6)) * 2 + 0.5).astype(np.float32)
    target = RNG.standard_normal((4, 3, 5, 6)).astype(np.float32)
    torch_model = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1),
                                      torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True))
    model = _copied(torch_model, nn.Sequential(nn.Conv2d(3, 3, 1),
                                               nn.InstanceNorm2d(3, affine=True, track_running_stats=True)))
    assert set(model.state_dict()) == set(torch_model.state_dict())
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.1)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1),
                                 (x, target))
    for _ in range(3):
        torch_optimizer.zero_grad()
        expected = TF.mse_loss(torch_model(torch.tensor(x)), torch.tensor(target))
        expected.backward()
        torch_optimizer.step()
        np.testing.assert_allclose(float(step(x, target)), expected.item(), rtol=1e-5)
    state = model.state_dict()
    for key, value in torch_model.state_dict().items():
        np.testing.assert_allclose(state[key], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=key)
    model.eval(), torch_model.eval()
    np.testing.assert_allclose(gc.jit(model)(x), torch_model(torch.tensor(x)).detach().numpy(),
                               rtol=1e-4, atol=1e-4)


def test_instance_norm_refuses_what_pytorch_refuses():
    with pytest.raises(ShapeError, match=r"InstanceNorm2d\(3\): expects 3 channels on axis 1, got "
                                         r"shape \(2, 4, 5, 5\)"):
        gc.jit(nn.InstanceNorm2d(3, affine=True))(np.zeros((2, 4, 5, 5), np.float32))
    with pytest.warns(UserWarning, match="num_features is unused"):
        gc.jit(nn.InstanceNorm2d(3))(np.ones((2, 4, 5, 5), np.float32))
    with pytest.raises(ValueError, match="expected more than 1 position per channel"):
        gc.jit(nn.InstanceNorm1d(3))(np.zeros((2, 3, 1), np.float32))
    with pytest.raises(ValueError, match="instance_norm: running statistics are updated in place"):
        gc.jit(lambda t: F.instance_norm(t, np.zeros(3, np.float32), np.ones(3, np.float32)))(SIGNAL)


def test_parameter_containers_register_train_and_save_under_pytorchs_names():
    def scales_model(library, array):
        class Scales(library.Module):
            def __init__(self):
                super().__init__()
                self.scales = library.ParameterList([array(np.ones(3)), array(np.full(3, 2.0))])
                self.shifts = library.ParameterDict({"a": library.Parameter(array(np.zeros(3)))})

            def forward(self, x):
                for scale in self.scales:
                    x = x * scale
                return x + self.shifts["a"]
        return Scales()

    model = scales_model(nn, lambda a: a.astype(np.float32))
    torch_model = scales_model(torch.nn, lambda a: torch.tensor(a, dtype=torch.float32))
    assert list(model.state_dict()) == list(torch_model.state_dict()) == ["scales.0", "scales.1", "shifts.a"]
    assert len(model.scales) == 2 and "a" in model.shifts and len(list(model.parameters())) == 3
    x = RNG.standard_normal((4, 3)).astype(np.float32)
    step = gc.compile_train_step(model, lambda out, t: ((out - t) ** 2).sum(),
                                 optim.SGD(model.parameters(), lr=0.01), (x, x))
    torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.01)
    for _ in range(2):
        step(x, x)
        torch_optimizer.zero_grad()
        ((torch_model(torch.tensor(x)) - torch.tensor(x)) ** 2).sum().backward()
        torch_optimizer.step()
    for key, value in torch_model.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[key], value.numpy(), rtol=1e-5, err_msg=key)
    model.scales.append(np.ones(3, np.float32))
    assert [name for name, _ in model.named_parameters()][:3] == ["scales.0", "scales.1", "scales.2"]
    with pytest.raises(IndexError, match="ParameterList index 5 is out of range for 3"):
        model.scales[5]


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_decoder_matches_pytorchs_with_masks(norm_first):
    torch.manual_seed(0)
    torch_layer = torch.nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                   batch_first=True, norm_first=norm_first,
                                                   activation="gelu")
    torch_decoder = torch.nn.TransformerDecoder(torch_layer, 2, norm=torch.nn.LayerNorm(8)).eval()
    decoder = _copied(torch_decoder, nn.TransformerDecoder(
        nn.TransformerDecoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True,
                                   norm_first=norm_first, activation="gelu"), 2, norm=nn.LayerNorm(8)))
    decoder.eval()
    assert set(decoder.state_dict()) == set(torch_decoder.state_dict())
    tgt = RNG.standard_normal((2, 5, 8)).astype(np.float32)
    memory = RNG.standard_normal((2, 7, 8)).astype(np.float32)
    causal = np.triu(np.ones((5, 5), bool), 1)  # True: not allowed, PyTorch's module convention
    padding = np.zeros((2, 7), bool)
    padding[1, 5:] = True

    def run(module, t, m, masks):
        return module(t, m, tgt_mask=masks[0], memory_key_padding_mask=masks[1])

    torch_tgt = torch.tensor(tgt, requires_grad=True)
    expected = run(torch_decoder, torch_tgt, torch.tensor(memory),
                   (torch.tensor(causal), torch.tensor(padding)))
    (expected ** 2).sum().backward()
    got = gc.jit(lambda t, m: run(decoder, t, m, (causal, padding)))(tgt, memory)
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-4, atol=1e-5)
    grad = gc.grad(lambda t: (run(decoder, t, memory, (causal, padding)) ** 2).sum())(tgt)
    np.testing.assert_allclose(grad, torch_tgt.grad.numpy(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_reduces_each_bag_as_pytorchs(mode):
    table = RNG.standard_normal((10, 4)).astype(np.float32)
    ids = np.array([1, 2, 4, 5, 4, 3, 2, 9, 0])
    for padding_idx in (None, 4):
        for last, offsets in ((False, np.array([0, 4, 4, 6])), (True, np.array([0, 4, 4, 6, 9]))):
            bag = nn.EmbeddingBag.from_pretrained(table, mode=mode, padding_idx=padding_idx,
                                                  include_last_offset=last)
            torch_bag = torch.nn.EmbeddingBag.from_pretrained(
                torch.tensor(table), mode=mode, padding_idx=padding_idx, include_last_offset=last)
            expected = torch_bag(torch.tensor(ids), torch.tensor(offsets)).numpy()  # bag 1 is empty
            np.testing.assert_allclose(gc.jit(bag)(ids, offsets), expected, rtol=1e-6, atol=1e-6)
    rows = RNG.integers(0, 10, (3, 5))
    torch_bag = torch.nn.EmbeddingBag(10, 4, mode=mode, padding_idx=2)
    bag = _copied(torch_bag, nn.EmbeddingBag(10, 4, mode=mode, padding_idx=2))
    np.testing.assert_allclose(gc.jit(bag)(rows), torch_bag(torch.tensor(rows)).detach().numpy(),
                               rtol=1e-6, atol=1e-6)
    weights = RNG.standard_normal(9).astype(np.float32) if mode == "sum" else None
    torch_table = torch.tensor(table, requires_grad=True)
    (TF.embedding_bag(torch.tensor(ids), torch_table, torch.tensor([0, 4, 4, 6]), mode=mode,
                      per_sample_weights=None if weights is None else torch.tensor(weights)) ** 2).sum().backward()
    grad = gc.grad(lambda w: (F.embedding_bag(ids, w, np.array([0, 4, 4, 6]), mode=mode,
                                              per_sample_weights=weights) ** 2).sum())(table)
    np.testing.assert_allclose(grad, torch_table.grad.numpy(), rtol=1e-5, atol=1e-6)
    if mode != "sum":
        with pytest.raises(ValueError, match="per_sample_weights are only supported with mode='sum'"):
            gc.jit(lambda i: F.embedding_bag(i, table, np.array([0]), mode=mode,
                                             per_sample_weights=np.ones(9, np.float32)))(ids)
    with pytest.raises(ValueError, match="1-D ids need offsets"):
        gc.jit(lambda i: F.embedding_bag(i, table, mode=mode))(ids)


def test_1d_errors_name_only_what_is_wrong_in_the_users_terms():
    with pytest.raises(GraphcError, match=r"max_pool1d: return_indices=True is not supported \(at"):
        gc.jit(lambda t: F.max_pool1d(t, 2, return_indices=True))(SIGNAL)
    weight = np.ones((3, 2, 3), np.float32)
    for kwargs, message in (({"stride": 0}, r"conv_transpose1d: stride must be positive, got \(0,\)"),
                            ({"groups": 2}, "3 input channels are not divisible by groups=2"),
                            ({"stride": 2, "output_padding": 2}, "output_padding must be smaller"),
                            ({"padding": 9}, "the output would have length -5 for input"),
                            ({"bias": np.ones(5, np.float32)}, r"bias must have shape \(2,\)")):
        with pytest.raises((ShapeError, ValueError), match=message):
            gc.jit(lambda t: F.conv_transpose1d(t, weight, **kwargs))(SIGNAL)
    with pytest.raises(ValueError, match="instance_norm: expected more than 1 position per channel"):
        gc.jit(lambda t: F.instance_norm(t))(np.zeros((2, 3, 1), np.float32))


def test_interpolate_takes_recompute_scale_factor_as_pytorchs():
    x = RNG.standard_normal((1, 2, 5, 5)).astype(np.float32)
    for mode in ("nearest", "bilinear"):
        expected = TF.interpolate(torch.tensor(x), scale_factor=1.5, mode=mode,
                                  recompute_scale_factor=True).numpy()
        got = gc.jit(lambda t: F.interpolate(t, scale_factor=1.5, mode=mode,
                                             recompute_scale_factor=True))(x)
        assert got.shape == expected.shape == (1, 2, 7, 7)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(GraphcError, match="antialias=True is not supported"):
        gc.jit(lambda t: F.interpolate(t, scale_factor=0.5, mode="bilinear", antialias=True))(x)


def test_a_parameter_taken_from_a_helper_layer_is_registered_as_pytorchs_is():
    def model(library):
        class WeightNormed(library.Module):
            def __init__(self):
                super().__init__()
                helper = library.Linear(3, 2)  # not kept: its parameters are
                self.weight_v, self.bias = helper.weight, helper.bias
                self.fc = library.Linear(2, 1)
        return WeightNormed()

    assert [n for n, _ in model(nn).named_parameters()] == \
        [n for n, _ in model(torch.nn).named_parameters()] == ["weight_v", "bias", "fc.weight", "fc.bias"]


def test_embedding_bag_checks_given_offsets_as_pytorch_and_interpolate_its_arguments():
    table, ids = np.ones((10, 3), np.float32), np.arange(6)
    for offsets, last, message in (([2, 5], False, r"offsets\[0\] must be 0"),
                                   ([0, 5, 3], False, "must not decrease"),
                                   ([0, 3, 5], True, "the last offset must be the number of ids, 6")):
        with pytest.raises(ValueError, match=message):
            gc.jit(lambda i: F.embedding_bag(i, table, np.array(offsets), include_last_offset=last))(ids)
    x = np.ones((1, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match="recompute_scale_factor is not meaningful with an explicit size"):
        gc.jit(lambda t: F.interpolate(t, size=(4, 4), recompute_scale_factor=True))(x)


def test_an_array_given_to_a_parameter_stays_a_plain_array_elsewhere_as_in_pytorch():
    table = np.ones(3, np.float32)
    holder, user = nn.Module(), nn.Module()
    holder.scale = nn.Parameter(table)
    user.table = table  # the array itself, not the Parameter: a constant
    assert [n for n, _ in user.named_parameters()] == []
    holder.scale[0] = 5  # one memory, as PyTorch's Parameter shares its tensor's
    assert table[0] == 5
