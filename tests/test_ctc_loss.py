"""F.ctc_loss and nn.CTCLoss against PyTorch's: values and gradients (through a log_softmax, as
PyTorch's gradient assumes one) for padded and concatenated targets, repeated labels, empty
targets, sequences shorter than the batch's, an impossible alignment with and without
zero_infinity, another blank, an unbatched sequence, and a compiled training step."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F

torch = pytest.importorskip("torch")

rng = np.random.default_rng(0)
T, N, C, S = 12, 4, 6, 4
LOGITS = rng.standard_normal((T, N, C))
TARGETS = rng.integers(1, C, (N, S))
TARGETS[0, 1] = TARGETS[0, 0]          # a repeated label needs a blank between its two
TARGET_LENGTHS = np.array([4, 2, 0, 3])  # an empty target
INPUT_LENGTHS = np.array([12, 10, 7, 2])  # the last too short for its 3 labels: inf
PADDED = np.where(np.arange(S) < TARGET_LENGTHS[:, None], TARGETS, -1)  # padding out of range


def both(reduction, zero_infinity, targets=PADDED, blank=0, logits=LOGITS,
         lengths=(INPUT_LENGTHS, TARGET_LENGTHS)):
    """graphc's loss and gradient in the logits, then PyTorch's (padding given as 0 there)."""
    def ours(x):
        return F.ctc_loss(F.log_softmax(x, -1), targets, *lengths, blank=blank, reduction=reduction,
                          zero_infinity=zero_infinity).sum()

    value, grad = gc.value_and_grad(ours, backend="reference")(logits)
    x = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.ctc_loss(
        torch.log_softmax(x, -1), torch.tensor(np.maximum(targets, 0)), *map(torch.tensor, lengths),
        blank=blank, reduction=reduction, zero_infinity=zero_infinity).sum()
    expected.backward()
    return value, grad, expected.item(), x.grad.numpy()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ctc_matches_pytorch_with_zero_infinity(reduction):
    value, grad, expected, expected_grad = both(reduction, True)
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-12)


def test_an_impossible_alignment_is_an_infinite_loss_as_pytorchs():
    value, _, expected, _ = both("none", False)
    assert value == expected == np.inf


def test_concatenated_targets_another_blank_and_an_unbatched_sequence():
    flat = np.concatenate([TARGETS[n, :k] for n, k in enumerate(TARGET_LENGTHS)])
    value, grad, expected, expected_grad = both("mean", True, targets=flat)
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-12)
    value, grad, expected, expected_grad = both("sum", True, targets=TARGETS - 1, blank=C - 1)
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-12)
    value, grad, expected, expected_grad = both("sum", False, targets=TARGETS[0], logits=LOGITS[:, 0],
                                                lengths=(12, 4))
    assert value == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(grad, expected_grad, atol=1e-12)


def test_a_ctc_training_step_matches_pytorch():
    """A linear frame classifier trained by nn.CTCLoss in a compiled step on numba-cpu."""
    gc.manual_seed(0)
    model = nn.Linear(3, C)
    twin = torch.nn.Linear(3, C)
    twin.load_state_dict({k: torch.tensor(np.array(v)) for k, v in model.state_dict().items()})
    frames = rng.standard_normal((T, N, 3)).astype(np.float32)
    lengths = (INPUT_LENGTHS[:3].copy(), TARGET_LENGTHS[:3].copy())
    criterion = nn.CTCLoss()
    step = gc.compile_train_step(model, lambda out, y, il, tl: criterion(F.log_softmax(out, -1), y, il, tl),
                                 gc.optim.Adam(model.parameters(), lr=0.05),
                                 (frames[:, :3], PADDED[:3], *lengths), targets=3)
    opt = torch.optim.Adam(twin.parameters(), lr=0.05)
    for _ in range(3):
        loss = step(frames[:, :3], PADDED[:3], *lengths)
        opt.zero_grad()
        expected = torch.nn.CTCLoss()(torch.log_softmax(twin(torch.tensor(frames[:, :3])), -1),
                                      torch.tensor(np.maximum(PADDED[:3], 0)), *map(torch.tensor, lengths))
        expected.backward()
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(model.weight, twin.weight.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_targets_ctc_cannot_read_are_refused_by_name():
    log_probs = np.log(np.full((5, 2, 3), 1 / 3))
    with pytest.raises(gc.ShapeError, match="ctc_loss: target_lengths \\[2, 2\\] do not split"):
        gc.jit(lambda x: F.ctc_loss(x, np.array([1, 2, 1]), [5, 5], [2, 2]))(log_probs)
    with pytest.raises(gc.GraphcError, match="ctc_loss: blank=3 is no class"):
        gc.jit(lambda x: F.ctc_loss(x, np.ones((2, 1), np.int64), [5, 5], [1, 1], blank=3))(log_probs)
    with pytest.raises(gc.IndexOutOfRangeError):
        gc.jit(lambda x: F.ctc_loss(x, np.full((2, 1), 7), [5, 5], [1, 1]))(log_probs)
