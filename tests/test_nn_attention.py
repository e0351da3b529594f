"""Attention against PyTorch (skipped without torch): F.scaled_dot_product_attention,
nn.MultiheadAttention and nn.TransformerEncoderLayer/Encoder with PyTorch's weights loaded
through load_state_dict, outputs and gradients in float64; numba-cpu against the reference."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc.ir.errors import ShapeError
from torch_compare import check_against_torch, graphc_run

torch = pytest.importorskip("torch")
# A bool padding mask with a float attention mask is a combination PyTorch deprecates but still
# accepts; graphc accepts it too, and the test compares the two on it.
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched src_key_padding_mask:UserWarning")


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def rand(*shape, seed=0):
    return np.random.default_rng(seed + sum(shape)).standard_normal(shape)


# -- F.scaled_dot_product_attention -------------------------------------------------------------
SDPA_MASKS = {
    "none": lambda L, S: {},
    "causal": lambda L, S: {"is_causal": True},
    "bool": lambda L, S: {"attn_mask": rand(L, S, seed=5) > -0.3},
    "float": lambda L, S: {"attn_mask": rand(2, 1, L, S, seed=6)},
    "bool_with_a_fully_masked_row": lambda L, S: {
        "attn_mask": np.arange(L)[:, None] * np.ones(S) > 0},
    "scale": lambda L, S: {"scale": 0.3},
}


@pytest.mark.parametrize("mask", SDPA_MASKS)
def test_sdpa_matches_pytorch(mask):
    q, k, v = rand(2, 3, 4, 5), rand(2, 3, 6, 5, seed=1), rand(2, 3, 6, 2, seed=2)
    keywords = SDPA_MASKS[mask](4, 6)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    t_keywords = {n: torch.tensor(a) if isinstance(a, np.ndarray) else a for n, a in keywords.items()}
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, **t_keywords)
    expected.sum().backward()

    def loss(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, **keywords)
        return out.sum(), out

    (_, out), grads = gc.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True,
                                        backend="reference")(q, k, v)
    np.testing.assert_allclose(out, expected.detach().numpy(), rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_sdpa_grouped_query_attention_matches_pytorch():
    q, k, v = rand(2, 4, 3, 5), rand(2, 2, 6, 5, seed=1), rand(2, 2, 6, 3, seed=2)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True,
                                                                enable_gqa=True)
    expected.sum().backward()
    out, grads = gc.value_and_grad(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                       enable_gqa=True).sum(),
        argnums=(0, 1, 2), backend="reference")(q, k, v)
    np.testing.assert_allclose(out, expected.sum().item(), rtol=1e-10)
    for ours, theirs in zip(grads, (tq, tk, tv)):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ShapeError, match="must be a multiple"):
        gc.jit(lambda q, k: F.scaled_dot_product_attention(q, k, k, enable_gqa=True),
               backend="reference")(q, rand(2, 3, 6, 5))


def test_sdpa_dropout_drops_weights_with_the_training_key():
    q = rand(1, 4, 3).astype(np.float32)
    out = gc.jit(lambda q: F.scaled_dot_product_attention(q, q, q, dropout_p=0.5),
                 backend="reference")(q)
    plain = gc.jit(lambda q: F.scaled_dot_product_attention(q, q, q), backend="reference")(q)
    assert out.shape == plain.shape and not np.allclose(out, plain)


# -- nn.MultiheadAttention ------------------------------------------------------------------------
def key_padding(batch, source):
    mask = np.zeros((batch, source), dtype=bool)
    mask[0, -2:] = True
    return mask


MHA_CASES = {
    "self_attention_sequence_first": (dict(), lambda: (rand(4, 2, 6),) * 3, {}),
    "cross_attention_batch_first_key_padding": (
        dict(batch_first=True), lambda: (rand(2, 3, 6), rand(2, 5, 6, seed=1), rand(2, 5, 6, seed=2)),
        {"key_padding_mask": key_padding(2, 5)}),
    "per_head_weights_float_mask": (
        dict(batch_first=True), lambda: (rand(2, 4, 6),) * 3,
        {"attn_mask": rand(4, 4, seed=3), "average_attn_weights": False}),
    "bool_mask_per_batch_and_head": (
        dict(bias=False), lambda: (rand(4, 2, 6),) * 3,
        {"attn_mask": np.triu(np.ones((2 * 3, 4, 4), dtype=bool), 1)}),
    "float_key_padding_need_weights_false": (
        dict(), lambda: (rand(4, 2, 6),) * 3,
        {"key_padding_mask": np.where(key_padding(2, 4), -1e9, 0.0), "need_weights": False}),
    "unbatched": (dict(), lambda: (rand(4, 6), rand(5, 6, seed=1), rand(5, 6, seed=2)), {}),
    "kdim_vdim": (dict(kdim=3, vdim=2, batch_first=True),
                  lambda: (rand(2, 4, 6), rand(2, 5, 3, seed=1), rand(2, 5, 2, seed=2)), {}),
}


@pytest.mark.parametrize("case", MHA_CASES)
def test_multihead_attention_matches_pytorch(case):
    options, make_inputs, keywords = MHA_CASES[case]
    args = make_inputs()
    outs = check_against_torch(torch, nn.MultiheadAttention(6, 3, **options),
                               torch.nn.MultiheadAttention(6, 3, **options), list(args), keywords)
    assert len(outs) == (1 if keywords.get("need_weights") is False else 2)


def test_multihead_attention_state_dict_keys_and_shapes_match_pytorch():
    for options in (dict(), dict(bias=False), dict(kdim=3, vdim=2)):
        ours = {k: v.shape for k, v in nn.MultiheadAttention(6, 2, **options).state_dict().items()}
        theirs = {k: tuple(v.shape)
                  for k, v in torch.nn.MultiheadAttention(6, 2, **options).state_dict().items()}
        assert ours == theirs, options


def test_multihead_attention_refuses_bad_shapes():
    mha = nn.MultiheadAttention(6, 3)
    x = rand(4, 2, 6).astype(np.float32)
    with pytest.raises(ShapeError, match=r"attn_mask must have shape \(4, 4\) or \(6, 4, 4\)"):
        gc.jit(lambda x: mha(x, x, x, attn_mask=np.zeros((3, 3)))[0], backend="reference")(x)
    with pytest.raises(ShapeError, match="do not fit the layout"):
        gc.jit(lambda x: mha(x, x[:, :1], x)[0], backend="reference")(x)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        nn.MultiheadAttention(6, 4)


# -- nn.TransformerEncoderLayer / TransformerEncoder --------------------------------------------
ENCODER_CASES = {
    "post_norm_relu": (dict(), lambda: rand(5, 2, 8), {}),
    "pre_norm_batch_first_masks": (
        dict(norm_first=True, batch_first=True), lambda: rand(2, 5, 8),
        {"src_mask": np.triu(np.full((5, 5), -np.inf), 1),
         "src_key_padding_mask": key_padding(2, 5)}),
    "causal_no_bias": (dict(bias=False), lambda: rand(5, 2, 8),
                       {"is_causal": True, "src_mask": np.triu(np.ones((5, 5), bool), 1)}),
}


@pytest.mark.parametrize("case", ENCODER_CASES)
def test_transformer_encoder_layer_matches_pytorch(case):
    options, make_input, keywords = ENCODER_CASES[case]
    ours = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **options)
    theirs = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, **options)
    check_against_torch(torch, ours, theirs, [make_input()], keywords)


def test_transformer_encoder_layer_gelu_matches_pytorch():
    ours = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, activation="gelu")
    theirs = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                              activation="gelu")
    check_against_torch(torch, ours, theirs, [rand(5, 2, 8)])


def test_transformer_encoder_stacks_copies_with_pytorch_names():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    t_layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                               batch_first=True)
    ours = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8))
    theirs = torch.nn.TransformerEncoder(t_layer, 2, norm=torch.nn.LayerNorm(8),
                                         enable_nested_tensor=False)
    ours = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    check_against_torch(torch, ours, theirs, [rand(2, 5, 8)],
                        {"src_key_padding_mask": key_padding(2, 5)})


@pytest.mark.parametrize("batch_first", [False, True])
def test_transformer_encoder_decoder_matches_pytorch(batch_first):
    """nn.Transformer (missing before): its state dict loads PyTorch's, its output and every
    gradient match, with a causal target mask and padding masks."""
    options = dict(d_model=8, nhead=2, num_encoder_layers=2, num_decoder_layers=1,
                   dim_feedforward=16, dropout=0.0, batch_first=batch_first)
    ours, theirs = nn.Transformer(**options), torch.nn.Transformer(**options)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    src, tgt = (rand(2, 5, 8), rand(2, 4, 8)) if batch_first else (rand(5, 2, 8), rand(4, 2, 8))
    mask = nn.Transformer.generate_square_subsequent_mask(4, dtype="float64")
    np.testing.assert_array_equal(mask, torch.nn.Transformer.generate_square_subsequent_mask(
        4, dtype=torch.float64).numpy())
    check_against_torch(torch, ours, theirs, [src, tgt],
                        {"tgt_mask": mask, "src_key_padding_mask": key_padding(2, 5),
                         "memory_key_padding_mask": key_padding(2, 5)})
    weights = [p for p in nn.Transformer(**options).parameters() if p.ndim > 1]
    bound = max(np.sqrt(6 / sum(p.shape)) for p in weights)  # Xavier-uniform, as PyTorch's
    assert all(np.abs(p).max() <= bound for p in weights)


def test_encoder_layer_in_training_mode_applies_dropout():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.5)
    x = rand(5, 2, 8).astype(np.float32)
    forward = gc.jit(lambda x: layer(x), backend="reference")
    trained = forward(x)
    layer.eval()
    assert not np.allclose(trained, forward(x))


def test_masked_sdpa_on_numba_cpu_matches_reference():
    q, k, v = (rand(2, 4, 3, seed=i).astype(np.float32) for i in range(3))
    keep = np.tril(np.ones((4, 4), dtype=bool), -1)  # query i sees keys < i: query 0 none

    def loss(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return (out * np.cos(np.arange(out.numel()), dtype=np.float32).reshape(out.shape)).sum(), out

    runs = [gc.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True, backend=backend)(q, k, v)
            for backend in ("reference", "numba-cpu")]
    (_, reference), reference_grads = runs[0]
    (_, compiled), compiled_grads = runs[1]
    np.testing.assert_allclose(compiled, reference, rtol=1e-5, atol=1e-6)
    assert np.all(reference[:, 0] == 0)
    for ours, theirs in zip(compiled_grads, reference_grads):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~14 s: the whole encoder layer's forward and backward kernels
def test_attention_block_on_numba_cpu_matches_reference():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    x = rand(2, 5, 8).astype(np.float32)
    keywords = {"src_key_padding_mask": key_padding(2, 5), "is_causal": True}
    cotangents = [np.random.default_rng(0).uniform(0.5, 1.5, (2, 5, 8)).astype(np.float32)]
    reference = graphc_run(layer, [x], keywords, cotangents)
    compiled = graphc_run(layer, [x], keywords, cotangents, backend="numba-cpu")
    for ours, theirs in zip(compiled, reference):
        ours, theirs = (ours, theirs) if not isinstance(ours, dict) else (
            [ours[k] for k in sorted(ours)], [theirs[k] for k in sorted(theirs)])
        for a, b in zip(ours, theirs):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
