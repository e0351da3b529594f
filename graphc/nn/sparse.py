"""`Embedding`: a lookup table of vectors indexed by integer ids, as PyTorch's."""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.ir.errors import DTypeError, GraphcError, ShapeError, user_location

from .. import init
from ..functions import stop_gradient, where
from ..tensor import Tensor, as_tensor, bind
from .module import Module, Parameter, _host_array

__all__ = ["Embedding", "embedding"]


def embedding(indices: Any, weight: Tensor, padding_idx: int | None = None) -> Tensor:
    """Rows of `weight` (num_embeddings, dim) picked by integer `indices` of any shape; the
    output has shape indices.shape + (dim,). Rows looked up at `padding_idx` get no gradient.
    As PyTorch's, ids must lie in [0, num_embeddings): a negative id is an error (an
    IndexOutOfRangeError naming the id, its position and this line), not a row from the end."""
    indices, weight = as_tensor(indices), as_tensor(weight)
    if indices.dtype not in ("int32", "int64"):
        raise DTypeError(f"embedding: indices must be int32 or int64, got {indices.dtype} "
                         f"(at {user_location()})")
    if weight.ndim != 2:
        raise ShapeError(f"embedding: the weight is a (num_embeddings, embedding_dim) table, got "
                         f"shape {weight.shape} (at {user_location()})")
    rows = bind("gather", weight, indices, axis=0, wrap_negative=False)
    if padding_idx is None:
        return rows
    if not -weight.shape[0] <= padding_idx < weight.shape[0]:
        raise ValueError(f"embedding: padding_idx {padding_idx} is outside the table's "
                         f"{weight.shape[0]} rows (at {user_location()})")
    padding_idx %= weight.shape[0]  # -1: the last row, as PyTorch (also when set after building)
    # Masking the gathered rows (not the table) keeps the cost proportional to the lookups.
    is_padding = (indices == padding_idx).unsqueeze(-1)
    return where(is_padding, stop_gradient(rows), rows)


class Embedding(Module):
    """weight (num_embeddings, embedding_dim) drawn from N(0, 1); the `padding_idx` row starts
    at zero and is never updated by gradients."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: np.ndarray | None = None, _freeze: bool = False) -> None:
        super().__init__()
        if max_norm is not None or scale_grad_by_freq:
            raise GraphcError("Embedding: max_norm (renormalising rows in place) and "
                              "scale_grad_by_freq are not supported; renormalise the table in "
                              f"the training step instead (at {user_location()})")
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} must be within "
                                 f"[-{num_embeddings}, {num_embeddings})")
            padding_idx %= num_embeddings
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        if _weight is None:
            table = init.generator().standard_normal((num_embeddings, embedding_dim)).astype(np.float32)
            if padding_idx is not None:
                table[padding_idx] = 0
        else:  # a given table (from_pretrained): no draw from the generator, its padding row kept
            table = _weight
        if _freeze:  # a buffer: never trained, and in the state dict as "weight" still
            self.register_buffer("weight", table)
        else:
            self.weight = Parameter(table)

    @classmethod
    def from_pretrained(cls, embeddings: Any, freeze: bool = True, padding_idx: int | None = None,
                        max_norm: float | None = None, norm_type: float = 2.0,
                        scale_grad_by_freq: bool = False, sparse: bool = False) -> Embedding:
        """An Embedding whose table is `embeddings` (num_embeddings, embedding_dim), copied.
        Frozen (the default), the table is a buffer, never trained: model.parameters(), and so
        the optimizer, leave it out, and the state dict still holds it as "weight"."""
        given = _host_array(embeddings, "Embedding.from_pretrained")  # a torch tensor too
        table = np.array(given, dtype=np.float64 if given.dtype == np.float64 else np.float32)
        if table.ndim != 2:
            raise ValueError(f"Embedding.from_pretrained: embeddings must be 2-D (num_embeddings, "
                             f"embedding_dim), got shape {table.shape}")
        return cls(*table.shape, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse,
                   _weight=table, _freeze=freeze)

    def forward(self, indices: Any) -> Tensor:
        return embedding(indices, self.weight, self.padding_idx)

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{padding}"
