"""Multi-head attention and the transformer encoder and decoder, with PyTorch's parameter names, shapes,
mask conventions and defaults, so a PyTorch `state_dict` loads as it is.

Layouts follow PyTorch: (L, N, E) unless `batch_first` ((N, L, E)); an unbatched (L, E) input
is accepted. Masks passed to these modules are PyTorch's module masks: a boolean mask is True
where attention is *not* allowed (the opposite of F.scaled_dot_product_attention's), a float
mask is added to the scores. One difference: a query that may attend to no key at all gets
all-zero weights (as PyTorch's scaled_dot_product_attention), where PyTorch's module returns NaN.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np

from graphc.ir.errors import ShapeError, user_location

from ..tensor import Tensor, as_tensor
from . import functional as F
from .containers import ModuleList
from .init import xavier_uniform_
from .layers import Dropout, Linear, uniform
from .module import Module, Parameter
from .normalization import LayerNorm

__all__ = ["MultiheadAttention", "TransformerEncoderLayer", "TransformerEncoder",
           "TransformerDecoderLayer", "TransformerDecoder", "Transformer"]


class MultiheadAttention(Module):
    """softmax(Q K^T / sqrt(head_dim)) V over `num_heads` heads of embed_dim / num_heads.

    Parameters as PyTorch's: `in_proj_weight` (3E, E) stacking the query, key and value
    projections (or `q_proj_weight`, `k_proj_weight`, `v_proj_weight` when kdim or vdim differ
    from embed_dim), `in_proj_bias` (3E,), and `out_proj` a Linear(E, E).
    forward(query, key, value, ...) -> (output, attention weights or None)."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: int | None = None,
                 vdim: int | None = None, batch_first: bool = False) -> None:
        super().__init__()
        if num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by "
                             f"num_heads ({num_heads})")
        if add_bias_kv or add_zero_attn:
            raise NotImplementedError("MultiheadAttention: add_bias_kv and add_zero_attn are not "
                                      "supported")
        self.embed_dim, self.num_heads, self.dropout = embed_dim, num_heads, dropout
        self.head_dim = embed_dim // num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.batch_first = batch_first
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        # PyTorch's initialisation: Xavier-uniform projections, zero biases.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = _xavier_uniform((3 * embed_dim, embed_dim))
        else:
            self.q_proj_weight = _xavier_uniform((embed_dim, embed_dim))
            self.k_proj_weight = _xavier_uniform((embed_dim, self.kdim))
            self.v_proj_weight = _xavier_uniform((embed_dim, self.vdim))
        if bias:
            self.in_proj_bias = Parameter(np.zeros(3 * embed_dim, dtype=np.float32))
        else:  # registered as absent, as in PyTorch
            self.register_parameter("in_proj_bias", None)
        self.out_proj = Linear(embed_dim, embed_dim, bias=bias)
        if bias:
            self.out_proj.bias = Parameter(np.zeros(embed_dim, dtype=np.float32))

    def forward(self, query: Any, key: Any, value: Any, key_padding_mask: Any = None,
                need_weights: bool = True, attn_mask: Any = None,
                average_attn_weights: bool = True, is_causal: bool = False
                ) -> tuple[Tensor, Tensor | None]:
        """(output shaped like query, weights): weights (N, L, S) averaged over heads, or
        (N, num_heads, L, S) without `average_attn_weights`; None unless `need_weights`.
        `key_padding_mask` (N, S) marks keys to ignore; `attn_mask` is (L, S) or
        (N * num_heads, L, S); `is_causal` without an attn_mask applies the causal mask."""
        query, key, value = as_tensor(query), as_tensor(key), as_tensor(value)
        batched = self._check_inputs(query, key, value)
        q, k, v = (self._batch_major(t, batched) for t in (query, key, value))
        batch, target_len, _ = q.shape
        source_len = k.shape[1]
        q, k, v = (self._heads(F.linear(t, w, b)) for t, w, b in zip((q, k, v), *self._projections()))
        keep, bias = self._masks(attn_mask, key_padding_mask, is_causal, batch, target_len,
                                 source_len)
        weights = F.attention_probabilities(q, k, 1 / math.sqrt(self.head_dim), keep, bias)
        weights = F.dropout(weights, self.dropout, self.training)
        heads = (weights @ v).transpose(1, 2).reshape(batch, target_len, self.embed_dim)
        output = self.out_proj(heads)
        if not batched:
            output = output.squeeze(0)
        elif not self.batch_first:
            output = output.transpose(0, 1)
        if not need_weights:
            return output, None
        if average_attn_weights:
            weights = weights.mean(1)
        return output, (weights if batched else weights.squeeze(0))

    def _projections(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """The query, key and value projection weights and biases."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            stacked = self.in_proj_weight
            weights = [stacked[i * E:(i + 1) * E] for i in range(3)]
        else:
            weights = [self.q_proj_weight, self.k_proj_weight, self.v_proj_weight]
        bias = self.in_proj_bias
        if bias is None:
            return weights, [None] * 3
        return weights, [bias[i * E:(i + 1) * E] for i in range(3)]

    def _check_inputs(self, query: Tensor, key: Tensor, value: Tensor) -> bool:
        """Whether the inputs are batched; raises on shapes PyTorch would refuse."""
        batched = query.ndim == 3
        layout = "(N, L, E)" if self.batch_first else "(L, N, E)"
        if query.ndim not in (2, 3) or key.ndim != query.ndim or value.ndim != query.ndim:
            raise ShapeError(f"MultiheadAttention: query, key and value must all be {layout} or "
                             f"all unbatched (L, E), got {query.shape}, {key.shape} and "
                             f"{value.shape} (at {user_location()})")
        batch_axis = (0 if self.batch_first else 1) if batched else None
        sizes_agree = (query.shape[-1] == self.embed_dim and key.shape[-1] == self.kdim
                       and value.shape[-1] == self.vdim and key.shape[:-1] == value.shape[:-1]
                       and (batch_axis is None or query.shape[batch_axis] == key.shape[batch_axis]))
        if not sizes_agree:
            raise ShapeError(f"MultiheadAttention(embed_dim={self.embed_dim}, kdim={self.kdim}, "
                             f"vdim={self.vdim}): query, key and value of shapes {query.shape}, "
                             f"{key.shape} and {value.shape} do not fit the layout {layout} "
                             f"(at {user_location()})")
        return batched

    def _batch_major(self, x: Tensor, batched: bool) -> Tensor:
        if not batched:
            return x.unsqueeze(0)
        return x if self.batch_first else x.transpose(0, 1)

    def _heads(self, x: Tensor) -> Tensor:
        """(N, T, E) -> (N, heads, T, head_dim)."""
        batch, steps, _ = x.shape
        return x.reshape(batch, steps, self.num_heads, self.head_dim).transpose(1, 2)

    def _masks(self, attn_mask: Any, key_padding_mask: Any, is_causal: bool, batch: int,
               target_len: int, source_len: int) -> tuple[Tensor | None, Tensor | None]:
        """PyTorch's module masks as (keep, bias), both broadcasting against (N, H, L, S)."""
        keep = bias = None
        if attn_mask is not None:
            mask = as_tensor(attn_mask)
            allowed = {(target_len, source_len), (batch * self.num_heads, target_len, source_len)}
            if mask.shape not in allowed:
                raise ShapeError(f"MultiheadAttention: attn_mask must have shape "
                                 f"({target_len}, {source_len}) or "
                                 f"({batch * self.num_heads}, {target_len}, {source_len}), got "
                                 f"{mask.shape} (at {user_location()})")
            F.check_mask_dtype("MultiheadAttention", "attn_mask", mask, true_keeps=False)
            if mask.ndim == 3:
                mask = mask.reshape(batch, self.num_heads, target_len, source_len)
            keep, bias = (~mask, None) if mask.dtype == "bool" else (None, mask)
        elif is_causal:
            keep = as_tensor(np.tril(np.ones((target_len, source_len), dtype=bool)))
        if key_padding_mask is not None:
            padding = as_tensor(key_padding_mask)
            allowed = {(batch, source_len)} | ({(source_len,)} if batch == 1 else set())
            if padding.shape not in allowed:
                raise ShapeError(f"MultiheadAttention: key_padding_mask must have shape "
                                 f"({batch}, {source_len}), got {padding.shape} "
                                 f"(at {user_location()})")
            F.check_mask_dtype("MultiheadAttention", "key_padding_mask", padding, true_keeps=False)
            padding = padding.reshape(batch, 1, 1, source_len)
            if padding.dtype == "bool":
                keep = ~padding if keep is None else keep & ~padding
            else:
                bias = padding if bias is None else bias + padding
        return keep, bias

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, dropout={self.dropout}, "
                f"batch_first={self.batch_first}")


def _xavier_uniform(shape: tuple[int, int]) -> Parameter:
    fan_out, fan_in = shape
    return uniform(shape, math.sqrt(6 / (fan_in + fan_out)))


_ACTIVATIONS = ("relu", "gelu")


def _checked_activation(layer: str, activation: Any) -> None:
    if isinstance(activation, str) and activation not in _ACTIVATIONS:
        raise ValueError(f"{layer}: activation must be 'relu', 'gelu' or a callable, got "
                         f"{activation!r}")


def _feed_forward(layer: Module, x: Tensor) -> Tensor:
    """linear2(dropout(activation(linear1(x)))), the feed-forward block of both layers."""
    activate = getattr(F, layer.activation) if isinstance(layer.activation, str) else layer.activation
    return layer.linear2(layer.dropout(activate(layer.linear1(x))))


class TransformerEncoderLayer(Module):
    """Self-attention then a feed-forward block, each with dropout, a residual connection and
    layer norm (after the residual sum, or before each block with `norm_first`); submodules
    named as PyTorch's: self_attn, linear1, dropout, linear2, norm1, norm2, dropout1, dropout2.
    forward(src, src_mask=None, src_key_padding_mask=None, is_causal=False)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        _checked_activation("TransformerEncoderLayer", activation)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.activation = activation

    def forward(self, src: Any, src_mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: bool = False) -> Tensor:
        x = as_tensor(src)
        if self.norm_first:
            x = x + self._attention_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal)
            return x + self._feed_forward_block(self.norm2(x))
        x = self.norm1(x + self._attention_block(x, src_mask, src_key_padding_mask, is_causal))
        return self.norm2(x + self._feed_forward_block(x))

    def _attention_block(self, x: Tensor, mask: Any, key_padding_mask: Any, is_causal: bool) -> Tensor:
        out, _ = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask,
                                need_weights=False, is_causal=is_causal)
        return self.dropout1(out)

    def _feed_forward_block(self, x: Tensor) -> Tensor:
        return self.dropout2(_feed_forward(self, x))


class TransformerEncoder(Module):
    """`num_layers` copies of `encoder_layer` applied in turn (each with its own parameters,
    `layers.0.`, `layers.1.`, ... in the state dict), then the optional final `norm`."""

    def __init__(self, encoder_layer: TransformerEncoderLayer, num_layers: int,
                 norm: Module | None = None, enable_nested_tensor: bool = True,
                 mask_check: bool = True) -> None:
        """`enable_nested_tensor` and `mask_check` select PyTorch's fast paths for padded
        batches; graphc has one path, so they change nothing (accepted for ported code). That
        path is PyTorch's training path: at padded positions it computes values, where PyTorch's
        nested-tensor path in eval mode without gradients returns zeros (values at the other
        positions agree); a mean over positions should leave the padding out either way."""
        super().__init__()
        self.layers = ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm  # None registers it absent, as PyTorch's: assigning one later applies it

    def forward(self, src: Any, mask: Any = None, src_key_padding_mask: Any = None,
                is_causal: bool | None = None) -> Tensor:
        x = as_tensor(src)
        for layer in self.layers:
            x = layer(x, src_mask=mask, src_key_padding_mask=src_key_padding_mask,
                      is_causal=bool(is_causal))
        return self.norm(x) if self.norm is not None else x


class TransformerDecoderLayer(Module):
    """Self-attention over the target, attention to the encoder's output (`memory`), then a
    feed-forward block, each with dropout, a residual connection and layer norm (after the
    residual sum, or before each block with `norm_first`); submodules named as PyTorch's:
    self_attn, multihead_attn, linear1, dropout, linear2, norm1-3, dropout1-3."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = False, norm_first: bool = False, bias: bool = True) -> None:
        super().__init__()
        _checked_activation("TransformerDecoderLayer", activation)
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                            batch_first=batch_first)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout, bias=bias,
                                                 batch_first=batch_first)
        self.linear1 = Linear(d_model, dim_feedforward, bias=bias)
        self.dropout = Dropout(dropout)
        self.linear2 = Linear(dim_feedforward, d_model, bias=bias)
        self.norm_first = norm_first
        self.norm1 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm2 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.norm3 = LayerNorm(d_model, eps=layer_norm_eps, bias=bias)
        self.dropout1 = Dropout(dropout)
        self.dropout2 = Dropout(dropout)
        self.dropout3 = Dropout(dropout)
        self.activation = activation

    def forward(self, tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
                tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                tgt_is_causal: bool = False, memory_is_causal: bool = False) -> Tensor:
        x, memory = as_tensor(tgt), as_tensor(memory)
        attend_self = (tgt_mask, tgt_key_padding_mask, tgt_is_causal)
        attend_memory = (memory_mask, memory_key_padding_mask, memory_is_causal)
        if self.norm_first:
            x = x + self._self_attention_block(self.norm1(x), *attend_self)
            x = x + self._memory_attention_block(self.norm2(x), memory, *attend_memory)
            return x + self.dropout3(_feed_forward(self, self.norm3(x)))
        x = self.norm1(x + self._self_attention_block(x, *attend_self))
        x = self.norm2(x + self._memory_attention_block(x, memory, *attend_memory))
        return self.norm3(x + self.dropout3(_feed_forward(self, x)))

    def _self_attention_block(self, x: Tensor, mask: Any, key_padding_mask: Any,
                              is_causal: bool) -> Tensor:
        out, _ = self.self_attn(x, x, x, attn_mask=mask, key_padding_mask=key_padding_mask,
                                need_weights=False, is_causal=is_causal)
        return self.dropout1(out)

    def _memory_attention_block(self, x: Tensor, memory: Tensor, mask: Any, key_padding_mask: Any,
                                is_causal: bool) -> Tensor:
        out, _ = self.multihead_attn(x, memory, memory, attn_mask=mask,
                                     key_padding_mask=key_padding_mask, need_weights=False,
                                     is_causal=is_causal)
        return self.dropout2(out)


class TransformerDecoder(Module):
    """`num_layers` copies of `decoder_layer` applied in turn (`layers.0.`, `layers.1.`, ... in
    the state dict), then the optional final `norm`."""

    def __init__(self, decoder_layer: TransformerDecoderLayer, num_layers: int,
                 norm: Module | None = None) -> None:
        super().__init__()
        self.layers = ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Any, memory: Any, tgt_mask: Any = None, memory_mask: Any = None,
                tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                tgt_is_causal: bool | None = None, memory_is_causal: bool = False) -> Tensor:
        x = as_tensor(tgt)
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                      tgt_key_padding_mask=tgt_key_padding_mask,
                      memory_key_padding_mask=memory_key_padding_mask,
                      tgt_is_causal=bool(tgt_is_causal), memory_is_causal=memory_is_causal)
        return self.norm(x) if self.norm is not None else x


class Transformer(Module):
    """PyTorch's encoder-decoder: a TransformerEncoder and a TransformerDecoder, each with a
    final layer norm (`encoder.`, `decoder.` in the state dict), every matrix initialised
    Xavier-uniform as PyTorch's. forward(src, tgt, src_mask, tgt_mask, memory_mask, and the
    three key padding masks) returns the decoder's output."""

    def __init__(self, d_model: int = 512, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str | Callable[[Tensor], Tensor] = "relu",
                 custom_encoder: Module | None = None, custom_decoder: Module | None = None,
                 layer_norm_eps: float = 1e-5, batch_first: bool = False, norm_first: bool = False,
                 bias: bool = True) -> None:
        super().__init__()
        settings = dict(dim_feedforward=dim_feedforward, dropout=dropout, activation=activation,
                        layer_norm_eps=layer_norm_eps, batch_first=batch_first,
                        norm_first=norm_first, bias=bias)
        self.encoder = custom_encoder if custom_encoder is not None else TransformerEncoder(
            TransformerEncoderLayer(d_model, nhead, **settings), num_encoder_layers,
            LayerNorm(d_model, eps=layer_norm_eps, bias=bias))
        self.decoder = custom_decoder if custom_decoder is not None else TransformerDecoder(
            TransformerDecoderLayer(d_model, nhead, **settings), num_decoder_layers,
            LayerNorm(d_model, eps=layer_norm_eps, bias=bias))
        self.d_model, self.nhead, self.batch_first = d_model, nhead, batch_first
        for p in self.parameters():
            if p.ndim > 1:
                xavier_uniform_(p)

    def forward(self, src: Any, tgt: Any, src_mask: Any = None, tgt_mask: Any = None,
                memory_mask: Any = None, src_key_padding_mask: Any = None,
                tgt_key_padding_mask: Any = None, memory_key_padding_mask: Any = None,
                src_is_causal: bool | None = None, tgt_is_causal: bool | None = None,
                memory_is_causal: bool = False) -> Tensor:
        src, tgt = as_tensor(src), as_tensor(tgt)
        batch_axis = 0 if self.batch_first else 1
        if src.ndim == 3 and tgt.ndim == 3 and src.shape[batch_axis] != tgt.shape[batch_axis]:
            raise ShapeError(f"Transformer: src of {src.shape} and tgt of {tgt.shape} differ in "
                             f"their batch (axis {batch_axis}) (at {user_location()})")
        if src.shape[-1] != self.d_model or tgt.shape[-1] != self.d_model:
            raise ShapeError(f"Transformer: src of {src.shape} and tgt of {tgt.shape} must end in "
                             f"d_model={self.d_model} features (at {user_location()})")
        memory = self.encoder(src, mask=src_mask, src_key_padding_mask=src_key_padding_mask,
                              is_causal=src_is_causal)
        return self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_mask=memory_mask,
                            tgt_key_padding_mask=tgt_key_padding_mask,
                            memory_key_padding_mask=memory_key_padding_mask,
                            tgt_is_causal=tgt_is_causal, memory_is_causal=memory_is_causal)

    @staticmethod
    def generate_square_subsequent_mask(sz: int, device: Any = None, dtype: Any = None) -> np.ndarray:
        """The causal mask PyTorch's returns: 0 on and below the diagonal, -inf above (a float
        mask added to the scores), as a NumPy array (float32 unless `dtype` says otherwise)."""
        return np.triu(np.full((sz, sz), -np.inf, dtype=np.dtype(dtype or "float32")), 1)
