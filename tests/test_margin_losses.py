"""The margin, embedding and likelihood losses (margin ranking, hinge embedding, soft margin,
cosine embedding, triplet, multilabel soft margin, Poisson and Gaussian NLL) against PyTorch's:
values and gradients of every input, each reduction, the functional and the module forms."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional

rng = np.random.default_rng(0)
X, Y, Z = (rng.standard_normal((6, 5)) for _ in range(3))
SIGNS = np.where(rng.random(6) < 0.5, 1.0, -1.0)
SIGNS_2D = np.where(rng.random((6, 5)) < 0.5, 1.0, -1.0)
LABELS = (rng.random((6, 5)) < 0.4).astype(np.float64)
COUNTS = rng.integers(0, 6, (6, 5)).astype(np.float64)
VARIANCE = rng.random((6, 5)) + 0.1
CLASS_WEIGHT = rng.random(5) + 0.5

# name -> (graphc call, torch call, differentiated arrays, constant arrays)
CASES = {
    "margin_ranking": (lambda L, a, b, y, **k: L.margin_ranking_loss(a, b, y, margin=0.3, **k),
                       [X[:, 0], Y[:, 0]], [SIGNS]),
    "hinge_embedding": (lambda L, a, y, **k: L.hinge_embedding_loss(a, y, margin=0.8, **k),
                        [X], [SIGNS_2D]),
    "soft_margin": (lambda L, a, y, **k: L.soft_margin_loss(a, y, **k), [X * 30], [SIGNS_2D]),
    "cosine_embedding": (lambda L, a, b, y, **k: L.cosine_embedding_loss(a, b, y, margin=0.1, **k),
                         [X, Y], [SIGNS]),
    "triplet": (lambda L, a, p, n, **k: L.triplet_margin_loss(a, p, n, margin=2.0, **k), [X, Y, Z], []),
    "triplet_swap_p1": (lambda L, a, p, n, **k: L.triplet_margin_loss(a, p, n, p=1.0, swap=True, **k),
                        [X, Y, Z], []),
    "multilabel_soft_margin": (lambda L, a, y, **k: L.multilabel_soft_margin_loss(a, y, **k), [X], [LABELS]),
    "multilabel_weighted": (lambda L, a, y, w, **k: L.multilabel_soft_margin_loss(a, y, weight=w, **k),
                            [X], [LABELS, CLASS_WEIGHT]),
    "poisson_log": (lambda L, a, y, **k: L.poisson_nll_loss(a, y, **k), [X], [COUNTS]),
    "poisson_rate_full": (lambda L, a, y, **k: L.poisson_nll_loss(a, y, log_input=False, full=True, **k),
                          [np.abs(X) + 0.1], [COUNTS]),
    "gaussian": (lambda L, a, y, v, **k: L.gaussian_nll_loss(a, y, v, **k), [X, VARIANCE], [Y]),
    "gaussian_full_per_row": (lambda L, a, y, v, **k: L.gaussian_nll_loss(a, y, v, full=True, **k),
                              [X, VARIANCE[:, 0]], [Y]),
}


def _graphc_args(differentiated, constants, name):
    """Gaussian NLL takes its variance (differentiated) after the target (constant)."""
    if name.startswith("gaussian"):
        return [differentiated[0], constants[0], differentiated[1]]
    return [*differentiated, *constants]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_its_gradients_match_pytorch(name, reduction):
    call, differentiated, constants = CASES[name]
    n = len(differentiated)

    def ours(*args):
        full = list(args) + constants
        ordered = _graphc_args(full[:n], full[n:], name)
        return call(F, *ordered, reduction=reduction).sum()

    value, grads = gc.value_and_grad(ours, argnums=tuple(range(n)), backend="reference")(*differentiated)
    leaves = [torch.tensor(a, requires_grad=True) for a in differentiated]
    ordered = _graphc_args(leaves, [torch.tensor(c) for c in constants], name)
    expected = call(TF, *ordered, reduction=reduction).sum()
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-10, abs=1e-12)
    for got, leaf in zip(grads, leaves):
        np.testing.assert_allclose(got, leaf.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_the_loss_modules_train_as_pytorchs_in_a_compiled_step():
    """A siamese pair trained by CosineEmbeddingLoss, a regressor by GaussianNLLLoss, on numba-cpu."""
    gc.manual_seed(0)
    model = nn.Linear(5, 4)
    twin = torch.nn.Linear(5, 4).double()
    twin.load_state_dict({k: torch.tensor(np.asarray(v, np.float64)) for k, v in model.state_dict().items()})
    x1, x2 = X.astype(np.float32), Y.astype(np.float32)

    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, a, b):
            return gc.stack([self.net(a), self.net(b)])

    criterion = nn.CosineEmbeddingLoss(margin=0.2)
    step = gc.compile_train_step(Pair(), lambda out, y: criterion(out[0], out[1], y),
                                 gc.optim.SGD(model.parameters(), lr=0.5), (x1, x2, SIGNS.astype(np.float32)))
    opt = torch.optim.SGD(twin.parameters(), lr=0.5)
    for _ in range(3):
        loss = step(x1, x2, SIGNS.astype(np.float32))
        opt.zero_grad()
        expected = torch.nn.CosineEmbeddingLoss(margin=0.2)(twin(torch.tensor(X)), twin(torch.tensor(Y)),
                                                           torch.tensor(SIGNS))
        expected.backward()
        opt.step()
        assert loss == pytest.approx(expected.item(), rel=1e-5)
    np.testing.assert_allclose(model.weight, twin.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
    assert nn.GaussianNLLLoss(full=True).full and nn.TripletMarginLoss(swap=True).swap


def test_shapes_the_losses_cannot_pair_are_refused_by_name():
    with pytest.raises(gc.ShapeError, match="gaussian_nll_loss: var of \\(6, 2\\)"):
        gc.jit(lambda a, v: F.gaussian_nll_loss(a, a, v))(X, VARIANCE[:, :2])
    with pytest.raises(gc.ShapeError, match="cosine_embedding_loss: inputs of"):
        gc.jit(lambda a: F.cosine_embedding_loss(a, a, np.ones((6, 5))))(X)
    with pytest.raises(gc.ShapeError, match="triplet_margin_loss"):
        gc.jit(lambda a: F.triplet_margin_loss(a, a, a[0]))(X)
