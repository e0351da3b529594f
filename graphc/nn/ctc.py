"""Connectionist temporal classification loss (F.ctc_loss, nn.CTCLoss), as PyTorch's: the
forward algorithm in log space over each target with blanks around its labels, one gc.scan over
time. Its gradient is the scan's: exact for any log-probabilities (PyTorch's own assumes they
come from a log_softmax; through one, the two agree)."""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.ir.errors import GraphcError, ShapeError, user_location

from ..control import scan
from ..functions import concatenate, maximum, stack, take_along_axis, where
from ..tensor import Tensor, as_tensor

NEG_INF = float("-inf")


def ctc_loss(log_probs: Tensor, targets: Any, input_lengths: Any, target_lengths: Any,
             blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> Tensor:
    """-log p(target | input) for log-probabilities (T, N, C) (or (T, C) unbatched), padded
    targets (N, S) (or, with target lengths given as numbers, concatenated into one 1-D
    array), each sequence's input and target lengths. reduction='mean' divides each loss by
    its target length (at least 1), then averages over the batch; `zero_infinity` makes the
    loss of an impossible alignment (input shorter than its target needs) 0, gradient too."""
    log_probs = as_tensor(log_probs)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"ctc_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    unbatched = log_probs.ndim == 2
    if unbatched:
        log_probs = log_probs.unsqueeze(1)
        targets = as_tensor(targets).reshape(1, -1)
        input_lengths, target_lengths = (as_tensor(v).reshape(1) for v in (input_lengths, target_lengths))
    if log_probs.ndim != 3:
        raise ShapeError(f"ctc_loss: log_probs must be (T, N, C) or (T, C), got {log_probs.shape} "
                         f"(at {user_location()})")
    steps, batch, classes = log_probs.shape
    labels = _padded_targets(targets, target_lengths, batch)
    target_lengths = as_tensor(target_lengths).astype("int64").reshape(batch)
    input_lengths = as_tensor(input_lengths).astype("int64").reshape(batch)
    if not 0 <= blank < classes:
        raise GraphcError(f"ctc_loss: blank={blank} is no class of the {classes} in log_probs "
                          f"(at {user_location()})")
    length = labels.shape[1]
    # the labels with a blank before, between and after them: (N, 2S + 1)
    labels = where(np.arange(length) < target_lengths.unsqueeze(1), labels, blank)  # padding: blank
    blanks = as_tensor(np.full((batch, length), blank, np.int64))
    extended = concatenate([stack([blanks, labels], -1).reshape(batch, 2 * length), blanks[:, :1]], 1)
    width = 2 * length + 1
    emitted = take_along_axis(log_probs, extended.unsqueeze(0).broadcast_to((steps, batch, width)), 2)
    # a label may follow the one two back directly, skipping the blank between, unless repeated
    two_back = concatenate([as_tensor(np.full((batch, 2), -1, np.int64)), extended[:, :-2]], 1)
    skips = (extended != blank) & (extended != two_back)
    active = np.arange(steps)[:, None] < input_lengths.unsqueeze(0)  # (T, N)

    def step(alpha: Tensor, xs: tuple[Tensor, Tensor]) -> tuple[Tensor, None]:
        emission, running = xs
        one = _shifted(alpha, 1)
        two = where(skips, _shifted(alpha, 2), NEG_INF)
        advanced = _log_add_exp(_log_add_exp(alpha, one), two) + emission
        return where(running.unsqueeze(1), advanced, alpha), None

    start = where(np.arange(width) < 2, emitted[0], NEG_INF)
    alpha, _ = scan(step, start, (emitted[1:], active[1:]))
    last = take_along_axis(alpha, (2 * target_lengths).unsqueeze(1), 1)[:, 0]
    before = take_along_axis(alpha, maximum(2 * target_lengths - 1, 0).unsqueeze(1), 1)[:, 0]
    loss = -_log_add_exp(last, where(target_lengths > 0, before, NEG_INF))
    if zero_infinity:
        loss = where(loss == float("inf"), 0.0, loss)
    if reduction == "mean":
        return (loss / maximum(target_lengths, 1).astype(loss.dtype)).mean()
    if reduction == "sum":
        return loss.sum()
    return loss[0] if unbatched else loss


def _padded_targets(targets: Any, target_lengths: Any, batch: int) -> Tensor:
    """Targets as a padded (N, S) int64 tensor; concatenated 1-D ones split by their lengths,
    which must then be numbers (the split's shape depends on them)."""
    targets = as_tensor(targets)
    if targets.ndim == 2 and targets.shape[0] == batch:
        return targets.astype("int64")
    if targets.ndim != 1:
        raise ShapeError(f"ctc_loss: targets must be (N, S) padded or 1-D concatenated, got "
                         f"{targets.shape} for a batch of {batch} (at {user_location()})")
    if isinstance(target_lengths, Tensor):
        raise GraphcError(f"ctc_loss: concatenated 1-D targets need their target_lengths as "
                          f"numbers (a list or NumPy array), not a traced tensor: pad the targets "
                          f"to (N, S) instead (at {user_location()})")
    lengths = np.asarray(target_lengths, np.int64).reshape(batch)
    if lengths.sum() != targets.shape[0] or (lengths < 0).any():
        raise ShapeError(f"ctc_loss: target_lengths {lengths.tolist()} do not split the "
                         f"{targets.shape[0]} concatenated targets (at {user_location()})")
    longest = max(int(lengths.max(initial=0)), 1)
    if targets.shape[0] == 0:  # every target empty
        return as_tensor(np.zeros((batch, longest), np.int64))
    # each row's labels, then its last index again as padding (masked by the lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    index = np.minimum(starts[:, None] + np.arange(longest), targets.shape[0] - 1)
    return targets.astype("int64")[index.reshape(-1)].reshape(batch, longest)


def _shifted(alpha: Tensor, by: int) -> Tensor:
    """alpha moved `by` positions along its last axis, -inf coming in."""
    fill = as_tensor(np.full((alpha.shape[0], by), NEG_INF, alpha.dtype))
    return concatenate([fill, alpha[:, :-by]], 1)


def _log_add_exp(a: Tensor, b: Tensor) -> Tensor:
    """log(exp(a) + exp(b)), -inf where both are, without the NaN gradient of -inf - -inf."""
    top = maximum(a, b)
    finite = top > NEG_INF
    shift = where(finite, top, 0.0)
    total = (a - shift).exp() + (b - shift).exp()
    return where(finite, shift + where(finite, total, 1.0).log(), NEG_INF)
