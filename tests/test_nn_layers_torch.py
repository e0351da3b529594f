"""Layers and functions with PyTorch's names against PyTorch (skipped without torch): F.pad,
F.embedding, F.layer_norm, nn.AdaptiveAvgPool2d/AdaptiveMaxPool2d, nn.Conv1d, nn.Flatten and
nn.Identity; outputs and gradients in float64 on the reference backend, weights loaded from
PyTorch's state_dict."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import ShapeError
from torch_compare import check_against_torch, graphc_run

torch = pytest.importorskip("torch")
TF = torch.nn.functional


def rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def check_function(ours, theirs, arrays, constants=()):
    """ours(*arrays) against theirs(*tensors): values and the gradients of a random projection
    w.r.t. every float array; `constants` are passed after them, unchanged, to both."""
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    expected = theirs(*tensors, *constants)
    cotangent = np.random.default_rng(9).uniform(0.5, 1.5, tuple(expected.shape))
    (expected * torch.tensor(cotangent)).sum().backward()

    def loss(*xs):
        out = ours(*xs, *constants)
        return (out * cotangent).sum(), out

    (_, out), grads = gc.value_and_grad(loss, argnums=tuple(range(len(arrays))), has_aux=True,
                                        backend="reference")(*arrays)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    for ours_grad, t in zip(grads, tensors):
        np.testing.assert_allclose(ours_grad, t.grad.numpy(), rtol=1e-10, atol=1e-12)


PADS = {
    "constant_last_dim": ((1, 2), "constant", None),
    "constant_value_three_dims": ((1, 0, 0, 2, 1, 1), "constant", 1.5),
    "constant_negative_crops": ((-1, 2, 1, -2), "constant", None),
    "reflect_two_dims": ((2, 3, 1, 2), "reflect", None),
    "replicate_two_dims": ((3, 0, 2, 4), "replicate", None),
    "circular_two_dims": ((2, 1, 0, 3), "circular", None),
    # negative widths crop in every mode: reflect and replicate mirror or repeat the input's
    # own edges (a crop on one side, a pad reaching past it on the other), circular wraps
    # what the crop leaves
    "reflect_negative_crops": ((-2, 3, 2, -3), "reflect", None),
    "reflect_crop_and_pad_one_side_each": ((-4, 1, -1, -1), "reflect", None),
    "replicate_negative_crops": ((-3, 2, 4, -1), "replicate", None),
    "circular_negative_crops": ((-2, 1, 1, -2), "circular", None),
}


@pytest.mark.parametrize("case", PADS)
def test_pad_matches_pytorch(case):
    widths, mode, value = PADS[case]
    x = rand(2, 3, 4, 5)
    keywords = {"mode": mode} | ({"value": value} if value is not None else {})
    check_function(lambda x: F.pad(x, widths, **keywords),
                   lambda x: TF.pad(x, widths, **keywords), [x])


def test_pad_refuses_widths_pytorch_refuses():
    x = np.zeros((1, 2, 3, 3), np.float32)
    with pytest.raises(ShapeError, match=r"reflect padding of \(3, 0\) .* widths below the dimension's size 3"):
        gc.jit(lambda x: F.pad(x, (3, 0), mode="reflect"), backend="reference")(x)
    with pytest.raises(ShapeError, match=r"replicate padding of \(-2, -1\) .* leave no output"):
        gc.jit(lambda x: F.pad(x, (-2, -1), mode="replicate"), backend="reference")(x)
    # PyTorch reads memory outside the input for these
    with pytest.raises(ShapeError, match=r"circular padding of \(-2, 2\) .* widths up to 1"):
        gc.jit(lambda x: F.pad(x, (-2, 2), mode="circular"), backend="reference")(x)
    with pytest.raises(ShapeError, match="an even number of widths"):
        gc.jit(lambda x: F.pad(x, (1, 1, 1)), backend="reference")(x)


@pytest.mark.parametrize("normalized_shape", [5, (4, 5)])
def test_layer_norm_function_matches_pytorch(normalized_shape):
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
    x, weight, bias = rand(3, 4, 5), rand(*shape, seed=1), rand(*shape, seed=2)
    check_function(lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, eps=1e-3),
                   lambda x, w, b: TF.layer_norm(x, shape, w, b, eps=1e-3), [x, weight, bias])


def test_embedding_function_matches_pytorch_with_a_negative_padding_index():
    ids = np.array([[0, 3, 4], [4, 1, 3]])
    check_function(lambda w, i: F.embedding(i, w, padding_idx=-2),
                   lambda w, i: TF.embedding(torch.tensor(i), w, padding_idx=-2), [rand(5, 3)],
                   constants=(ids,))


POOLS = {
    "dividing": (2, 3),
    "non_dividing": (3, 5),
    "keep_height": (None, 2),
    "square_int": 4,
    "global": 1,
}


@pytest.mark.parametrize("kind", ["AdaptiveAvgPool2d", "AdaptiveMaxPool2d"])
@pytest.mark.parametrize("size", POOLS)
def test_adaptive_pools_match_pytorch(kind, size):
    x = rand(2, 3, 6, 9)
    output_size = POOLS[size]
    check_against_torch(torch, getattr(nn, kind)(output_size),
                        getattr(torch.nn, kind)(output_size), [x])
    check_against_torch(torch, getattr(nn, kind)(output_size),  # unbatched (C, H, W)
                        getattr(torch.nn, kind)(output_size), [x[0]])


CONV1D = {
    "plain": (dict(kernel_size=3), (2, 4, 9)),
    "strided_padded_dilated": (dict(kernel_size=3, stride=2, padding=2, dilation=2), (2, 4, 9)),
    "grouped_no_bias": (dict(kernel_size=(2,), groups=2, bias=False), (2, 4, 7)),
    "unbatched": (dict(kernel_size=3, padding=1), (4, 6)),
}


@pytest.mark.parametrize("case", CONV1D)
def test_conv1d_matches_pytorch(case):
    options, shape = CONV1D[case]
    check_against_torch(torch, nn.Conv1d(4, 6, **options), torch.nn.Conv1d(4, 6, **options),
                        [rand(*shape)])


def test_conv1d_parameters_match_pytorch_names_shapes_and_initialisation_bounds():
    ours, theirs = nn.Conv1d(4, 6, 3, groups=2), torch.nn.Conv1d(4, 6, 3, groups=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    bound = 1 / np.sqrt(2 * 3)
    assert np.abs(ours.weight).max() <= bound and np.abs(ours.weight).max() > bound / 2


@pytest.mark.parametrize("start,end", [(1, -1), (0, 1), (1, 2), (2, 3)])
def test_flatten_and_identity_match_pytorch(start, end):
    x = rand(2, 3, 4, 5)
    check_against_torch(torch, nn.Sequential(nn.Identity(), nn.Flatten(start, end)),
                        torch.nn.Sequential(torch.nn.Identity(), torch.nn.Flatten(start, end)), [x])


def test_identity_ignores_constructor_arguments_as_pytorchs():
    assert isinstance(torch.nn.Identity(54, unused_argument=0.1), torch.nn.Identity)
    x = rand(2, 3)
    np.testing.assert_array_equal(
        gc.jit(nn.Identity(54, unused_argument=0.1), backend="reference")(x), x)


class PadPoolConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = nn.AdaptiveMaxPool2d((3, 2))  # from (8, 9): windows of unequal sizes
        self.conv = nn.Conv1d(3, 4, 3, stride=2)

    def forward(self, x):
        padded = F.pad(x, (2, 1, 1, 2), mode="reflect")
        pooled = self.pool(padded) + F.adaptive_avg_pool2d(padded, (3, 2))
        return self.conv(pooled.flatten(2))


@pytest.mark.slow  # ~14 s of kernel compilation
def test_reflect_pad_adaptive_pools_and_conv1d_on_numba_cpu_match_the_reference():
    model = PadPoolConv()
    x = rand(2, 3, 5, 6).astype(np.float32)
    cotangents = [np.random.default_rng(1).uniform(0.5, 1.5, (2, 4, 2)).astype(np.float32)]
    reference = graphc_run(model, [x], {}, cotangents)
    compiled = graphc_run(model, [x], {}, cotangents, backend="numba-cpu")
    np.testing.assert_allclose(compiled[0][0], reference[0][0], rtol=1e-5, atol=1e-6)
    for name in reference[1]:
        np.testing.assert_allclose(compiled[1][name], reference[1][name], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(compiled[2][0], reference[2][0], rtol=1e-5, atol=1e-6)


def test_load_state_dict_takes_pytorch_parameters_that_require_grad():
    theirs = torch.nn.Conv1d(2, 3, 2)
    ours = nn.Conv1d(2, 3, 2)
    ours.load_state_dict(dict(theirs.named_parameters()))  # Parameters, not detached tensors
    np.testing.assert_array_equal(ours.weight, theirs.weight.detach().numpy())


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")  # PyTorch's own deprecation note
@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 3, 4), (2, 3, 4, 5)])
@pytest.mark.parametrize("layer", ["Softmax", "LogSoftmax"])
def test_softmax_without_dim_takes_pytorchs_implicit_dim(layer, shape):
    """0 for 1-D and 3-D inputs, 1 otherwise (was always -1: wrong values on 3-D and 4-D)."""
    function = {"Softmax": "softmax", "LogSoftmax": "log_softmax"}[layer]
    with pytest.warns(UserWarning, match=rf"{function}: no dim given: .* dim={0 if len(shape) in (1, 3) else 1}"):
        check_function(lambda x: getattr(nn, layer)()(x), lambda x: getattr(torch.nn, layer)()(x), [rand(*shape)])
    with pytest.warns(UserWarning, match="give dim explicitly"):
        check_function(lambda x: getattr(F, function)(x, dim=None),
                       lambda x: getattr(TF, function)(x, dim=None), [rand(*shape)])


@pytest.mark.parametrize("mode, align_corners", [("nearest", None), ("linear", None), ("linear", True)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interpolate_picks_pytorchs_cells_for_every_size_and_scale(mode, align_corners, dtype):
    """PyTorch computes source positions in float32 (nearest: floored as float32 even for
    float64 input) and copies an axis whose size does not change: 30 -> 22 cells took cell 14
    for output 11 (PyTorch: 15), scale 1.3 over 40 cells took 29 for 39 (PyTorch: 30), and
    linear with scale 1.1 over 4 cells resampled what PyTorch copies."""
    keywords = {"mode": mode} | ({} if align_corners is None else {"align_corners": align_corners})
    wrong = []
    for n_in in range(1, 41, 3):
        x = np.random.default_rng(n_in).standard_normal((1, 1, n_in)).astype(dtype)
        for spec in [{"size": n} for n in range(1, 41)] + [
                {"scale_factor": f} for f in (0.5, 0.75, 1.1, 1.3, 2.0, 2.5) if int(n_in * f) >= 1]:
            expected = TF.interpolate(torch.tensor(x), **spec, **keywords).numpy()
            got = gc.jit(lambda a: F.interpolate(a, **spec, **keywords), backend="reference")(x)
            if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-5, atol=1e-5):
                wrong.append((n_in, spec))
    assert not wrong, wrong[:10]


def test_interpolate_refuses_a_size_or_scale_per_axis_of_the_wrong_length():
    x = np.zeros((1, 2, 4, 6), np.float32)
    for bad in ({"size": (8,)}, {"size": (8, 9, 10)}, {"scale_factor": (2.0,)}):
        with pytest.raises(ValueError, match="one value per spatial axis .2 for input"):
            gc.jit(lambda a: F.interpolate(a, **bad), backend="reference")(x)


@pytest.mark.parametrize("case", ["cumprod_past_a_nan", "std_of_a_constant_line", "normalize_p_half_at_zeros",
                                  "norm_p_0.3_at_zeros"])
def test_gradients_pytorch_keeps_finite_where_an_operand_is_zero_or_unreached(case):
    """Each was NaN where PyTorch's is finite: cumprod sent an output's NaN cotangent to inputs
    it does not depend on (inf * 0), std's slope at a zero variance (sqrt at 0 times 0), and a
    p < 1 norm's at zero elements (|x|^p at 0 times sign(0))."""
    x = np.array([[-2.0, -3.0, 0.5], [1.0, 1.0, 1.0]])
    ours, theirs = {
        "cumprod_past_a_nan": (lambda x: gc.sqrt(x.cumprod(1)), lambda x: torch.sqrt(x.cumprod(1))),
        "std_of_a_constant_line": (lambda x: x.std(1), lambda x: x.std(1)),
        "normalize_p_half_at_zeros": (lambda x: F.normalize(x * (x > 0), p=0.5, dim=1),
                                      lambda x: TF.normalize(x * (x > 0), p=0.5, dim=1)),
        "norm_p_0.3_at_zeros": (lambda x: (x * (x > 0)).norm(0.3, 1), lambda x: (x * (x > 0)).norm(0.3, 1)),
    }[case]
    tensor = torch.tensor(x, requires_grad=True)
    theirs(tensor).sum().backward()
    grad = gc.grad(lambda x: ours(x).sum(), backend="reference")(x)
    np.testing.assert_allclose(grad, tensor.grad.numpy(), rtol=1e-10, atol=1e-12)
    assert np.isfinite(grad[1]).all()


@pytest.mark.parametrize("call, match", [
    (lambda x: F.hardtanh(x, 2.0, 1.0), r"hardtanh: min_val \(2.0\) cannot be greater than max_val"),
    (lambda x: F.softplus(x, beta=0), "softplus: beta .* must not be 0"),
    (lambda x: F.pad(x, (1.5, 1)), r"pad: widths must be integers, got \(1.5, 1\)"),
    (lambda x: F.embedding(np.array([0, 1]), x.reshape(6, 4), padding_idx=6), "padding_idx 6 is outside the table's 6 rows"),
    (lambda x: F.embedding(np.array([0, 1]), x.reshape(6, 4), padding_idx=-7), "padding_idx -7 is outside"),
], ids=["hardtanh", "softplus", "pad", "embedding_padding_idx", "embedding_negative_padding_idx"])
def test_arguments_pytorch_refuses_are_refused_by_name(call, match):
    """They were taken silently (a truncated width, a padding index naming no row, bounds the
    wrong way round) or failed with a bare ZeroDivisionError."""
    with pytest.raises((ValueError, TypeError), match=match + r".*test_nn_layers_torch\.py"):
        gc.jit(call, backend="reference")(np.zeros((2, 12), np.float32))


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
@pytest.mark.parametrize("name", ["floor", "ceil", "trunc", "round", "expm1"])
def test_rounding_functions_and_expm1_match_pytorch(name, backend):
    """Halves, signed zeros, NaN and inf as PyTorch gives them; rounding has gradient 0."""
    x = np.float32([-2.5, -1.5, -0.5, -0.0, 0.5, 1.5, 2.5, -1.7, 1.2, 3.999, 1e-7, np.nan, np.inf])
    out = gc.jit(lambda x: getattr(x, name)(), backend=backend)(x)
    expected = getattr(torch.tensor(x), name)().numpy()
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))
    np.testing.assert_allclose(out, expected, rtol=1e-6, equal_nan=True)
    finite = x[np.isfinite(x)]
    grad = gc.grad(lambda x: getattr(x, name)().sum(), backend=backend)(finite)
    tensor = torch.tensor(finite, requires_grad=True)
    getattr(tensor, name)().sum().backward()
    np.testing.assert_allclose(grad, tensor.grad.numpy(), rtol=1e-6)
    if name != "expm1":  # an integer tensor is whole already: returned as it is
        ints = np.arange(-3, 3)
        np.testing.assert_array_equal(gc.jit(lambda x: getattr(gc, name)(x), backend=backend)(ints), ints)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_floor_division_and_remainder_match_pytorch(backend):
    """`//` and `%` on tensors (they were TypeErrors): rounded down and with the divisor's sign,
    for floats and integers, a Python number on either side; the remainder's gradient is 1 for
    x and -floor(x / y) for y. (A zero remainder takes the divisor's sign, as in NumPy and
    Python; PyTorch's takes the dividend's.)"""
    rng = np.random.default_rng(0)
    xf, yf = rng.uniform(-10, 10, 40), rng.choice([-3.5, -1.0, 0.7, 2.0, 3.0], 40)
    xi, yi = rng.integers(-20, 20, 40), rng.choice([-7, -3, 2, 5], 40)
    for x, y in [(xf, yf), (xi, yi), (xi, yf)]:
        for f in (lambda a, b: a // b, lambda a, b: a % b, lambda a, b: 7 // b + a % 3):
            expected = f(torch.tensor(x), torch.tensor(y)).numpy()
            got = gc.jit(f, backend=backend)(x, y)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    tx, ty = torch.tensor(xf, requires_grad=True), torch.tensor(yf, requires_grad=True)
    (tx % ty).sum().backward()
    gx, gy = gc.grad(lambda a, b: (a % b).sum(), argnums=(0, 1), backend=backend)(xf, yf)
    np.testing.assert_array_equal(gx, tx.grad.numpy())
    np.testing.assert_array_equal(gy, ty.grad.numpy())


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_fmod_matches_pytorch(backend):
    """fmod (missing before): the dividend's sign, for floats (also -0.0, a tiny dividend and a
    zero divisor: NaN) and integers (Numba's own np.fmod of integers takes the divisor's sign),
    through gc.fmod, Tensor.fmod and np.fmod; its gradient is 1 for x and -trunc(x / y) for y."""
    rng = np.random.default_rng(1)
    xf = np.concatenate([rng.uniform(-10, 10, 40), [-0.0, 1e-30, -1e-30, -4.0, 3.0]])
    yf = np.concatenate([rng.choice([-3.5, -1.0, 0.7, 2.0, 3.0], 40), [1.0, 1.0, 2.0, 2.0, 0.0]])
    xi, yi = rng.integers(-20, 20, 40), rng.choice([-7, -3, 2, 5], 40)
    for x, y in [(xf, yf), (xf.astype(np.float32), yf.astype(np.float32)), (xi, yi), (xi, yf[:40])]:
        expected = torch.fmod(torch.tensor(x), torch.tensor(y)).numpy()
        for f in (gc.fmod, lambda a, b: a.fmod(b), np.fmod):
            got = gc.jit(f, backend=backend)(x, y)
            assert got.dtype == expected.dtype
            np.testing.assert_array_equal(got, expected)
    assert gc.jit(lambda a: gc.fmod(a, 3), backend=backend)(np.int32(-7)) == -1
    tx, ty = torch.tensor(xf[:40], requires_grad=True), torch.tensor(yf[:40], requires_grad=True)
    torch.fmod(tx, ty).sum().backward()
    gx, gy = gc.grad(lambda a, b: gc.fmod(a, b).sum(), argnums=(0, 1), backend=backend)(xf[:40], yf[:40])
    np.testing.assert_array_equal(gx, tx.grad.numpy())
    np.testing.assert_array_equal(gy, ty.grad.numpy())


@pytest.mark.parametrize("decimals", [-3, -2, -1, 1, 2])
def test_round_to_decimals_matches_pytorch(decimals):
    """Negative decimals multiplied by 10**decimals, which float32 cannot hold exactly: 1234.5 to
    -3 decimals gave 999.99994 (PyTorch divides by 10**3 and multiplies back)."""
    x = np.random.default_rng(3).uniform(-1e5, 1e5, 2000).astype(np.float32)
    x[:4] = [1234.5, 100000.0, 2600.0, 0.125]
    expected = torch.round(torch.tensor(x), decimals=decimals).numpy()
    for backend in ("reference", "numba-cpu"):
        np.testing.assert_array_equal(gc.jit(lambda a: a.round(decimals=decimals), backend=backend)(x), expected)
