"""Layers, activations and schedules ported PyTorch code reaches for, checked against PyTorch:
the recurrent cells (RNNCell, LSTMCell, GRUCell) looped by the caller, the activations without
a graphc op of their own (hardswish, mish, selu, logsigmoid, ...), cosine similarity and
pairwise distance, and the learning-rate schedules with restarts, constant, polynomial and
multiplicative rates."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
import graphc.optim as optim

torch = pytest.importorskip("torch")
TF = torch.nn.functional


@pytest.mark.parametrize("name, settings", [("RNNCell", {}), ("RNNCell", {"nonlinearity": "relu"}),
                                            ("LSTMCell", {}), ("LSTMCell", {"bias": False}),
                                            ("GRUCell", {}), ("GRUCell", {"bias": False})])
def test_a_cell_looped_over_time_computes_and_differentiates_as_pytorchs(name, settings):
    torch_cell = getattr(torch.nn, name)(5, 4, **settings)
    cell = getattr(nn, name)(5, 4, **settings)
    cell.load_state_dict({k: v.detach().numpy() for k, v in torch_cell.state_dict().items()})
    xs = np.random.default_rng(0).standard_normal((6, 3, 5)).astype(np.float32)

    def loss(cell, xs):
        state, total = None, 0
        for t in range(xs.shape[0]):
            state = cell(xs[t], state)
            h = state[0] if isinstance(state, tuple) else state
            total = total + (h * h).sum()
        return total

    torch_xs = torch.tensor(xs, requires_grad=True)
    expected = loss(torch_cell, torch_xs)
    expected.backward()
    np.testing.assert_allclose(gc.jit(lambda x: loss(cell, x))(xs), expected.item(), rtol=1e-5)
    np.testing.assert_allclose(gc.grad(lambda x: loss(cell, x))(xs), torch_xs.grad.numpy(),
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["RNNCell", "LSTMCell", "GRUCell"])
def test_a_cell_takes_an_unbatched_input_and_a_given_state(name):
    torch_cell = getattr(torch.nn, name)(5, 4)
    cell = getattr(nn, name)(5, 4)
    cell.load_state_dict({k: v.detach().numpy() for k, v in torch_cell.state_dict().items()})
    x = np.linspace(-1, 1, 5, dtype=np.float32)
    h = np.linspace(0.5, -0.5, 4, dtype=np.float32)
    state = (h, 2 * h) if name == "LSTMCell" else h
    torch_state = tuple(map(torch.tensor, state)) if name == "LSTMCell" else torch.tensor(state)
    expected = torch_cell(torch.tensor(x), torch_state)
    got = gc.jit(lambda x: cell(x, state))(x)
    for g, e in zip(*((got, expected) if name == "LSTMCell" else ((got,), (expected,)))):
        assert g.shape == (4,)
        np.testing.assert_allclose(g, e.detach().numpy(), atol=1e-6)


def test_a_cell_names_a_state_of_the_wrong_shape():
    with pytest.raises(gc.GraphcError, match=r"GRUCell: the state must have shape \(3, 4\) .*got "
                                             r"\(2, 4\).*test_torch_layers_more.py"):
        gc.jit(lambda x: nn.GRUCell(5, 4)(x, np.zeros((2, 4), np.float32)))(np.zeros((3, 5), np.float32))
    with pytest.raises(gc.GraphcError, match=r"LSTMCell: the state must be a pair \(h, c\)"):
        gc.jit(lambda x: nn.LSTMCell(5, 4)(x, np.zeros((3, 4), np.float32)))(np.zeros((3, 5), np.float32))


# the kinks (±3, 0, ±20) where a gradient's side is a choice, and values past them
KINKS = np.concatenate([np.linspace(-30, 30, 41), [-3, 3, 0, -20, 20, -21, 21, 1e-3]]).reshape(7, 7)


@pytest.mark.parametrize("name, settings", [("logsigmoid", {}), ("hardsigmoid", {}), ("hardswish", {}),
                                            ("mish", {}), ("selu", {}), ("celu", {"alpha": 0.5}),
                                            ("softsign", {}), ("tanhshrink", {}), ("softmin", {"dim": 1}),
                                            ("glu", {"dim": 1})])
def test_an_activation_and_its_gradient_match_pytorchs_at_its_kinks(name, settings):
    x = KINKS[:, :6] if name == "glu" else KINKS
    torch_x = torch.tensor(x, requires_grad=True)
    expected = getattr(TF, name)(torch_x, **settings)
    (expected * expected).sum().backward()
    function = getattr(F, name)
    np.testing.assert_allclose(gc.jit(lambda a: function(a, **settings))(x), expected.detach().numpy(),
                               rtol=1e-12, atol=1e-15)
    # PyTorch computes hardsigmoid's 1/6 and celu's 1/alpha in float32 even for doubles
    np.testing.assert_allclose(gc.grad(lambda a: (function(a, **settings) ** 2).sum())(x),
                               torch_x.grad.numpy(), rtol=1e-7, atol=1e-15)


def test_activation_modules_compile_as_layers():
    model = nn.Sequential(nn.Hardswish(), nn.Mish(), nn.SELU(), nn.CELU(0.5), nn.LogSigmoid(),
                          nn.Softsign(), nn.Tanhshrink(), nn.Hardsigmoid(), nn.Softmin(1),
                          nn.GLU(1), nn.Unflatten(1, (2, 2)))
    torch_model = torch.nn.Sequential(torch.nn.Hardswish(), torch.nn.Mish(), torch.nn.SELU(),
                                      torch.nn.CELU(0.5), torch.nn.LogSigmoid(), torch.nn.Softsign(),
                                      torch.nn.Tanhshrink(), torch.nn.Hardsigmoid(), torch.nn.Softmin(1),
                                      torch.nn.GLU(1), torch.nn.Unflatten(1, (2, 2)))
    x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32) * 4
    np.testing.assert_allclose(gc.compile(model, x)(x), torch_model(torch.tensor(x)).numpy(), rtol=1e-5, atol=1e-7)


def test_cosine_similarity_and_pairwise_distance_broadcast_and_differentiate_as_pytorchs():
    a = np.random.default_rng(1).standard_normal((4, 6))
    b = np.random.default_rng(2).standard_normal((1, 6))
    for function, torch_function in [
            (lambda p, q: F.cosine_similarity(p, q), lambda p, q: TF.cosine_similarity(p, q)),
            (lambda p, q: nn.CosineSimilarity(dim=-1, eps=1e-6)(p, q),
             lambda p, q: torch.nn.CosineSimilarity(dim=-1, eps=1e-6)(p, q)),
            (lambda p, q: F.pairwise_distance(p, q, p=3, keepdim=True),
             lambda p, q: TF.pairwise_distance(p, q, p=3, keepdim=True)),
            (lambda p, q: nn.PairwiseDistance()(p, q), lambda p, q: torch.nn.PairwiseDistance()(p, q))]:
        ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
        expected = torch_function(ta, tb)
        (expected ** 2).sum().backward()
        np.testing.assert_allclose(gc.jit(function)(a, b), expected.detach().numpy(), rtol=1e-12)
        ga, gb = gc.grad(lambda p, q: (function(p, q) ** 2).sum(), argnums=(0, 1))(a, b)
        np.testing.assert_allclose(ga, ta.grad.numpy(), rtol=1e-10)
        np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=1e-10)
    zero = np.zeros((2, 3))
    np.testing.assert_array_equal(gc.jit(lambda p, q: F.cosine_similarity(p, q))(zero, a[:2, :3]), [0, 0])


@pytest.mark.parametrize("name, settings", [
    ("CosineAnnealingWarmRestarts", {"T_0": 5}),
    ("CosineAnnealingWarmRestarts", {"T_0": 3, "T_mult": 2, "eta_min": 0.01}),
    ("ConstantLR", {"factor": 0.5, "total_iters": 4}),
    ("PolynomialLR", {"total_iters": 7, "power": 2.0}),
    ("MultiplicativeLR", {"lr_lambda": lambda epoch: 0.9 if epoch % 2 else 0.95})])
def test_a_schedule_sets_pytorchs_rates(name, settings):
    torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    torch_schedule = getattr(torch.optim.lr_scheduler, name)(torch_optimizer, **settings)
    optimizer = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    schedule = getattr(optim, name)(optimizer, **settings)
    for _ in range(40):
        assert schedule.get_last_lr()[0] == pytest.approx(torch_schedule.get_last_lr()[0], rel=1e-9, abs=1e-15)
        torch_optimizer.step()
        torch_schedule.step()
        schedule.step()


@pytest.mark.parametrize("settings", [{"T_0": 1, "T_mult": 3}, {"T_0": 3, "T_mult": 2, "eta_min": 0.01}])
def test_warm_restarts_restart_exactly_and_take_fractional_epochs(settings):
    """A logarithm counted the periods: epoch 121 of T_0=1, T_mult=3 (a restart) gave eta_min;
    and step(epoch), PyTorch's way to move the rate within an epoch, took no argument."""
    torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(torch_optimizer, **settings)
    schedule = optim.CosineAnnealingWarmRestarts(optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0), **settings)
    for _ in range(400):
        assert schedule.get_last_lr()[0] == pytest.approx(torch_schedule.get_last_lr()[0], abs=1e-15)
        torch_optimizer.step()
        torch_schedule.step()
        schedule.step()
    for batch in range(40):
        torch_schedule.step(batch / 4)
        schedule.step(batch / 4)
        assert schedule.get_last_lr()[0] == pytest.approx(torch_schedule.get_last_lr()[0], abs=1e-15)
    assert schedule.last_epoch == torch_schedule.last_epoch == 9


def test_a_schedule_refuses_periods_pytorch_refuses():
    optimizer = optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="T_0 must be an int > 0"):
        optim.CosineAnnealingWarmRestarts(optimizer, T_0=0)
    with pytest.raises(ValueError, match="total_iters must be an int > 0"):
        optim.PolynomialLR(optimizer, total_iters=0)


RNG = np.random.default_rng(3)
LOGITS, CLASSES = RNG.standard_normal((6, 4)), RNG.integers(0, 4, 6)
PROBABILITIES = 1 / (1 + np.exp(-LOGITS))
BITS = (RNG.random((6, 4)) < 0.5).astype(np.float64)
CLASS_WEIGHTS = RNG.random(4) + 0.5
LOG_PROBABILITIES = np.log(PROBABILITIES / PROBABILITIES.sum(1, keepdims=True))


@pytest.mark.parametrize("name, settings, input, target", [
    ("CrossEntropyLoss", {"weight": CLASS_WEIGHTS, "label_smoothing": 0.1}, LOGITS, CLASSES),
    ("CrossEntropyLoss", {"ignore_index": 2, "reduction": "sum"}, LOGITS, CLASSES),
    ("NLLLoss", {"weight": CLASS_WEIGHTS}, LOG_PROBABILITIES, CLASSES),
    ("BCELoss", {"weight": CLASS_WEIGHTS}, PROBABILITIES, BITS),
    ("BCEWithLogitsLoss", {"pos_weight": CLASS_WEIGHTS}, LOGITS, BITS),
    ("KLDivLoss", {"reduction": "batchmean"}, LOG_PROBABILITIES, np.exp(LOG_PROBABILITIES)),
    ("MSELoss", {}, LOGITS, BITS), ("L1Loss", {"reduction": "none"}, LOGITS, BITS),
    ("SmoothL1Loss", {"beta": 0.5}, LOGITS, BITS), ("HuberLoss", {"delta": 0.3}, LOGITS, BITS)])
def test_a_loss_module_computes_pytorchs_loss_and_keeps_its_buffers(name, settings, input, target):
    torch_settings = {k: torch.tensor(v) if isinstance(v, np.ndarray) else v for k, v in settings.items()}
    torch_criterion = getattr(torch.nn, name)(**torch_settings)
    criterion = getattr(nn, name)(**settings)
    expected = torch_criterion(torch.tensor(input), torch.tensor(target)).numpy()
    # (atol: the KL divergence of a distribution from itself is a rounding residual or 0)
    np.testing.assert_allclose(gc.jit(lambda a, b: criterion(a, b))(input, target), expected,
                               rtol=1e-12, atol=1e-15)
    assert sorted(criterion.state_dict()) == sorted(torch_criterion.state_dict())


def test_a_loss_module_is_a_training_steps_loss():
    model = nn.Linear(4, 4)
    x = LOGITS.astype(np.float32)
    step = gc.compile_train_step(model, nn.CrossEntropyLoss(weight=CLASS_WEIGHTS.astype(np.float32)),
                                 optim.SGD(model.parameters(), lr=0.1), (x, CLASSES))
    assert np.isfinite(step(x, CLASSES))


def test_a_pretrained_embedding_is_frozen_as_a_buffer_unless_told():
    table = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    frozen = nn.Embedding.from_pretrained(table)
    assert [n for n, _ in frozen.named_parameters()] == [] and list(frozen.state_dict()) == ["weight"]
    model = nn.Sequential(frozen, nn.Linear(3, 2))
    ids, target = np.array([0, 1, 4]), np.zeros((3, 2), np.float32)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1), (ids, target))
    step(ids, target)
    np.testing.assert_array_equal(model[0].weight, table)
    trained = nn.Embedding.from_pretrained(table, freeze=False, padding_idx=1)
    assert [n for n, _ in trained.named_parameters()] == ["weight"]
    np.testing.assert_array_equal(trained.weight, table)  # the padding row is kept, as PyTorch's
    expected = torch.nn.Embedding.from_pretrained(torch.tensor(table))(torch.tensor(ids)).numpy()
    np.testing.assert_array_equal(gc.jit(frozen)(ids), expected)


def test_from_pretrained_draws_nothing_and_takes_pytorch_tensors():
    """It built a random table first (advancing the initialisation generator: the next layer's
    weights changed) and refused a torch tensor that requires grad."""
    table = torch.nn.Embedding(5, 3).weight  # requires grad
    gc.manual_seed(0)
    expected = nn.Linear(2, 2).weight.copy()
    gc.manual_seed(0)
    layer = nn.Embedding.from_pretrained(table)
    np.testing.assert_array_equal(nn.Linear(2, 2).weight, expected)
    np.testing.assert_array_equal(layer.weight, table.detach().numpy())
    loss = nn.CrossEntropyLoss(weight=torch.ones(3, requires_grad=True))
    assert list(loss.state_dict()) == ["weight"]
    assert nn.Linear(2, 2).to(torch.float64).weight.dtype == np.float64


def test_glu_names_a_dim_out_of_range_and_hardswish_differentiates_at_infinity():
    with pytest.raises(gc.GraphcError, match=r"glu: dim -3 is not an axis of x, of shape \(4, 6\)"):
        gc.jit(lambda t: F.glu(t, -3))(np.zeros((4, 6)))
    x = np.array([-np.inf, -5.0, 5.0, np.inf])
    np.testing.assert_array_equal(gc.grad(lambda t: F.hardswish(t).sum())(x), [0, 0, 1, 1])


def test_warm_restarts_carry_a_fraction_into_the_next_plain_step():
    torch_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    torch_schedule = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(torch_optimizer, T_0=10)
    schedule = optim.CosineAnnealingWarmRestarts(optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), T_0=10)
    torch_schedule.step(2.5)
    schedule.step(2.5)
    for _ in range(3):
        assert schedule.get_last_lr()[0] == pytest.approx(torch_schedule.get_last_lr()[0], abs=1e-15)
        assert schedule.last_epoch == torch_schedule.last_epoch
        torch_optimizer.step()
        torch_schedule.step()
        schedule.step()


def test_an_integer_mask_error_gives_each_layers_meaning_of_true():
    """MultiheadAttention masks out where a bool mask is True: the advice for a 0/1 keep-mask
    (astype(bool), right for scaled_dot_product_attention) inverted it."""
    mha = nn.MultiheadAttention(4, 1, batch_first=True)
    x = np.ones((1, 3, 4), np.float32)
    keep = np.tril(np.ones((3, 3), np.int64))
    with pytest.raises(gc.GraphcError, match=r"True masks a score out; use \(mask == 0\)"):
        gc.jit(lambda x: mha(x, x, x, attn_mask=keep)[0])(x)
    with pytest.raises(gc.GraphcError, match="True keeps a score"):
        gc.jit(lambda x: F.scaled_dot_product_attention(x, x, x, attn_mask=keep))(x)


def test_shape_errors_of_conv1d_and_linear_name_them_and_the_users_shapes():
    with pytest.raises(gc.GraphcError, match=r"conv1d: weight \(4, 3, 3\) .* expects 3 input channels, "
                                             r"got input \(2, 5, 7\)"):
        gc.jit(nn.Conv1d(3, 4, 3))(np.zeros((2, 5, 7), np.float32))
    with pytest.raises(gc.GraphcError, match=r"conv1d: input \(1, 1, 2\) .* shorter than the kernel's span 3"):
        gc.jit(nn.Conv1d(1, 1, 3))(np.zeros((1, 1, 2), np.float32))
    with pytest.raises(gc.GraphcError, match=r"linear: weight \(4, 3\) .* got input of shape \(2, 5\)"):
        gc.jit(nn.Linear(3, 4))(np.zeros((2, 5), np.float32))


def test_batch_norm_in_eval_uses_running_statistics_wherever_they_exist():
    """Turning track_running_stats off after building leaves the buffers, which PyTorch's eval
    mode still uses (graphc used the batch's statistics: differences up to 16)."""
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32) * 4 + 2
    ours, theirs = nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for bn in (ours, theirs):
        bn.running_mean[...] = [0.5, -1.0, 2.0] if bn is ours else torch.tensor([0.5, -1.0, 2.0])
        bn.eval()
        bn.track_running_stats = False
    np.testing.assert_allclose(gc.jit(ours)(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-6)


def test_layers_take_what_pytorchs_take():
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Tanh())
    assert isinstance(seq[np.int64(1)], nn.ReLU)  # NumPy integer indices
    seq[np.int64(1)] = nn.GELU()
    assert isinstance(seq[1], nn.GELU)
    conv = nn.Conv1d(1, 1, 3)
    conv.padding = 2  # an int, as PyTorch's takes
    assert gc.jit(conv)(np.zeros((1, 1, 5), np.float32)).shape == (1, 1, 7)
    model = nn.Sequential(nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 1)))
    assert next(model.parameters()).dtype == np.float32  # an iterator, as PyTorch's
    assert list(dict(model.named_parameters(prefix="m", recurse=True))) == [
        "m.0.weight", "m.0.bias", "m.1.0.weight", "m.1.0.bias"]
    assert list(model[1].parameters(recurse=False)) == []
    assert list(model.state_dict(prefix="enc.")) == ["enc.0.weight", "enc.0.bias", "enc.1.0.weight", "enc.1.0.bias"]
    assert model.get_submodule("1.0") is model[1][0]
    assert model.get_parameter("1.0.bias") is model[1][0].bias
    with pytest.raises(AttributeError, match="no submodule '2'"):
        model.get_submodule("2")
    assert len(seq + model) == 5 and len(nn.ModuleList([nn.ReLU()]) + nn.ModuleList([nn.Tanh()])) == 2
    with pytest.raises(ValueError, match="divisor_override must be a nonzero int"):
        gc.jit(nn.AvgPool2d(2, divisor_override=2.5))(np.zeros((1, 1, 4, 4), np.float32))


def test_conv_transpose_output_size_and_too_small_outputs_as_pytorchs():
    ours = nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1, padding_mode="zeros")
    theirs = torch.nn.ConvTranspose2d(1, 1, 3, stride=2, padding=1)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    x = np.random.default_rng(1).standard_normal((1, 1, 5, 5)).astype(np.float32)
    for size in ([9, 9], [10, 10], [1, 1, 10, 9]):
        got = gc.jit(lambda x, size=size: ours(x, output_size=size))(x)
        want = theirs(torch.tensor(x), output_size=size).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="not reachable"):
        gc.jit(lambda x: ours(x, output_size=[12, 12]))(x)
    tight = nn.ConvTranspose2d(1, 2, (1, 3), stride=(3, 1), padding=(2, 2), dilation=(1, 2),
                               output_padding=(0, 1))  # output_padding past the stride: 0 rows
    with pytest.raises(gc.GraphcError, match="too small"):
        gc.jit(tight)(np.zeros((1, 1, 2, 3), np.float32))


@pytest.mark.parametrize("size", [3, 4])  # windows of unequal size, and tiling ones
@pytest.mark.parametrize("layer", ["AdaptiveMaxPool2d", "AdaptiveAvgPool2d"])
def test_adaptive_pooling_of_integers_is_refused_whatever_the_windows(layer, size):
    with pytest.raises(gc.GraphcError, match="expects a floating-point input, got int64"):
        gc.jit(getattr(nn, layer)(size))(np.arange(36, dtype=np.int64).reshape(1, 1, 6, 6))


@pytest.mark.parametrize("mode, align_corners", [("nearest", None), ("bilinear", False), ("bilinear", True)])
def test_upsample_recomputing_its_scale_factor_samples_as_pytorchs(mode, align_corners):
    x = np.random.default_rng(2).standard_normal((1, 2, 5, 7)).astype(np.float32)
    settings = dict(scale_factor=1.7, mode=mode, align_corners=align_corners, recompute_scale_factor=True)
    got = gc.jit(nn.Upsample(**settings))(x)
    want = torch.nn.Upsample(**settings)(torch.tensor(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
