"""`Embedding`: a lookup table of vectors indexed by integer ids, as PyTorch's; `EmbeddingBag`:
the sum, mean or maximum of the vectors of each bag of ids."""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.ir.errors import DTypeError, GraphcError, ShapeError, user_location

from .. import init
from ..functions import concatenate, stop_gradient, where
from ..tensor import Tensor, as_tensor, bind
from .module import Module, Parameter, _host_array

__all__ = ["Embedding", "EmbeddingBag", "embedding", "embedding_bag"]


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


def _checked_table_settings(layer: str, num_embeddings: int, padding_idx: int | None,
                            max_norm: float | None, scale_grad_by_freq: bool) -> int | None:
    """`padding_idx` counted from 0 (-1: the last row, as PyTorch's); the settings graphc does
    not take refused, naming `layer`."""
    if max_norm is not None or scale_grad_by_freq:
        raise GraphcError(f"{layer}: max_norm (renormalising rows in place) and "
                          "scale_grad_by_freq are not supported; renormalise the table in "
                          f"the training step instead (at {user_location()})")
    if padding_idx is None:
        return None
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"{layer}: padding_idx {padding_idx} must be within "
                         f"[-{num_embeddings}, {num_embeddings})")
    return padding_idx % num_embeddings


def _register_table(module: Module, num_embeddings: int, embedding_dim: int,
                    padding_idx: int | None, given: np.ndarray | None, frozen: bool) -> None:
    """An embedding table as `module.weight`: drawn from N(0, 1) with the padding row zero, or
    a given one (from_pretrained: no draw, its padding row kept); frozen, a buffer (never
    trained, in the state dict as "weight" still)."""
    if given is None:
        table = init.generator().standard_normal((num_embeddings, embedding_dim)).astype(np.float32)
        if padding_idx is not None:
            table[padding_idx] = 0
    else:
        table = given
    if frozen:
        module.register_buffer("weight", table)
    else:
        module.weight = Parameter(table)


class Embedding(Module):
    """weight (num_embeddings, embedding_dim) drawn from N(0, 1); the `padding_idx` row starts
    at zero and is never updated by gradients."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False,
                 _weight: np.ndarray | None = None, _freeze: bool = False) -> None:
        super().__init__()
        padding_idx = _checked_table_settings("Embedding", num_embeddings, padding_idx, max_norm,
                                              scale_grad_by_freq)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        _register_table(self, num_embeddings, embedding_dim, padding_idx, _weight, _freeze)

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


_BAG_MODES = ("sum", "mean", "max")


def embedding_bag(indices: Any, weight: Tensor, offsets: Any = None, mode: str = "mean",
                  per_sample_weights: Any = None, include_last_offset: bool = False,
                  padding_idx: int | None = None) -> Tensor:
    """One vector per bag: the sum, mean or maximum of the rows of `weight` its ids pick. Bags
    are the rows of a 2-D `indices` (B, N), or, for a 1-D `indices`, the runs starting at each
    of `offsets` (the last bag running to the end, or to the last offset with
    `include_last_offset`). Ids equal to `padding_idx` are left out; an empty bag gives zeros;
    `per_sample_weights` (the shape of `indices`) scale the rows of a sum. As PyTorch's, but
    computed densely: a (bags, ids) membership mask, so 1-D input suits up to some thousands of
    ids a batch. Offsets given as an array are checked as PyTorch checks them (starting at 0,
    never decreasing); traced offsets are taken as they come."""
    if mode not in _BAG_MODES:
        raise ValueError(f"embedding_bag: mode must be one of {_BAG_MODES}, got {mode!r} "
                         f"(at {user_location()})")
    indices, weight = as_tensor(indices), as_tensor(weight)
    if per_sample_weights is not None and mode != "sum":
        raise ValueError(f"embedding_bag: per_sample_weights are only supported with mode='sum', "
                         f"got mode={mode!r} (at {user_location()})")
    rows = embedding(indices, weight, padding_idx)  # (B, N, D) or (N, D)
    keep = None if padding_idx is None else indices != (padding_idx % weight.shape[0])
    if indices.ndim == 2:
        if offsets is not None:
            raise ValueError(f"embedding_bag: offsets must be None for 2-D input (each row is a "
                             f"bag), got offsets (at {user_location()})")
        member = keep if keep is not None else as_tensor(np.ones(indices.shape, bool))
    elif indices.ndim == 1:
        member = _bag_membership(indices, offsets, include_last_offset)
        if keep is not None:
            member = member & keep.unsqueeze(0)
    else:
        raise ShapeError(f"embedding_bag: expects 1-D ids with offsets or 2-D (bags, ids) input, "
                         f"got shape {indices.shape} (at {user_location()})")
    if per_sample_weights is not None:
        per_sample_weights = as_tensor(per_sample_weights)
        if per_sample_weights.shape != indices.shape:
            raise ShapeError(f"embedding_bag: per_sample_weights must have the ids' shape "
                             f"{indices.shape}, got {per_sample_weights.shape} (at {user_location()})")
    bags_by_ids = member.astype(weight.dtype)  # (B, N): how much each id counts in each bag
    if per_sample_weights is not None:
        bags_by_ids = bags_by_ids * per_sample_weights.astype(weight.dtype)
    if mode == "max":
        picked = rows if indices.ndim == 2 else rows.unsqueeze(0)  # (B or 1, N, D)
        largest = where(member.unsqueeze(-1), picked, -np.inf).amax(1)
        return where(member.any(1).unsqueeze(-1), largest, 0.0)
    total = (rows * bags_by_ids.unsqueeze(-1)).sum(1) if indices.ndim == 2 else bags_by_ids @ rows
    if mode == "sum":
        return total
    count = member.astype(weight.dtype).sum(1, keepdim=True)
    return total / count.clamp(min=1)


def _bag_membership(indices: Tensor, offsets: Any, include_last_offset: bool) -> Tensor:
    """(bags, ids) bool: whether id n lies in bag b, [offsets[b], the next offset)."""
    if offsets is None:
        raise ValueError(f"embedding_bag: 1-D ids need offsets, the position where each bag "
                         f"starts (at {user_location()})")
    count = indices.shape[0]
    if not isinstance(offsets, Tensor):  # known now: checked as PyTorch checks them
        given = np.asarray(offsets)
        if given.ndim == 1 and given.size and given.dtype.kind in "iu":
            problem = ("offsets[0] must be 0" if given[0] != 0
                       else "offsets must not decrease" if (np.diff(given) < 0).any()
                       else f"offsets must not pass the {count} ids" if given[-1] > count
                       else f"with include_last_offset, the last offset must be the number of "
                            f"ids, {count}" if include_last_offset and given[-1] != count
                       else None)
            if problem:
                raise ValueError(f"embedding_bag: {problem}, got offsets {given.tolist()} "
                                 f"(at {user_location()})")
    offsets = as_tensor(offsets)
    if offsets.ndim != 1 or offsets.dtype not in ("int32", "int64"):
        raise ShapeError(f"embedding_bag: offsets must be a 1-D int tensor, got {offsets.dtype} "
                         f"of shape {offsets.shape} (at {user_location()})")
    offsets = offsets.astype("int64")
    if include_last_offset:
        if offsets.shape[0] < 1:
            raise ShapeError(f"embedding_bag: include_last_offset needs at least one offset "
                             f"(at {user_location()})")
        starts, ends = offsets[:-1], offsets[1:]
    else:
        starts = offsets
        ends = concatenate([offsets[1:], as_tensor(np.array([count], np.int64))])
    position = as_tensor(np.arange(count, dtype=np.int64)).unsqueeze(0)
    return (position >= starts.unsqueeze(1)) & (position < ends.unsqueeze(1))


class EmbeddingBag(Module):
    """weight (num_embeddings, embedding_dim) drawn from N(0, 1), as Embedding's; forward(input,
    offsets=None, per_sample_weights=None) reduces each bag's rows by `mode` (see
    embedding_bag)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, max_norm: float | None = None,
                 norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                 sparse: bool = False, _weight: np.ndarray | None = None,
                 include_last_offset: bool = False, padding_idx: int | None = None,
                 _freeze: bool = False) -> None:
        super().__init__()
        padding_idx = _checked_table_settings("EmbeddingBag", num_embeddings, padding_idx, max_norm,
                                              scale_grad_by_freq)
        if mode not in _BAG_MODES:
            raise ValueError(f"EmbeddingBag: mode must be one of {_BAG_MODES}, got {mode!r}")
        self.num_embeddings, self.embedding_dim, self.mode = num_embeddings, embedding_dim, mode
        self.include_last_offset, self.padding_idx = include_last_offset, padding_idx
        _register_table(self, num_embeddings, embedding_dim, padding_idx, _weight, _freeze)

    @classmethod
    def from_pretrained(cls, embeddings: Any, freeze: bool = True, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                        mode: str = "mean", sparse: bool = False, include_last_offset: bool = False,
                        padding_idx: int | None = None) -> EmbeddingBag:
        """An EmbeddingBag whose table is `embeddings`, copied; frozen (a buffer) by default."""
        given = _host_array(embeddings, "EmbeddingBag.from_pretrained")
        table = np.array(given, dtype=np.float64 if given.dtype == np.float64 else np.float32)
        if table.ndim != 2:
            raise ValueError(f"EmbeddingBag.from_pretrained: embeddings must be 2-D, got shape "
                             f"{table.shape}")
        return cls(*table.shape, max_norm, norm_type, scale_grad_by_freq, mode, sparse, table,
                   include_last_offset, padding_idx, _freeze=freeze)

    def forward(self, input: Any, offsets: Any = None, per_sample_weights: Any = None) -> Tensor:
        return embedding_bag(input, self.weight, offsets, self.mode, per_sample_weights,
                             self.include_last_offset, self.padding_idx)

    def extra_repr(self) -> str:
        padding = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}{padding}"
