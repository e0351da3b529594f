"""nn.RMSNorm / F.rms_norm (LLaMA's normalisation), addmm and baddbmm (HF GPT-2's Conv1D, BLOOM's
ALiBi scores), finfo and iinfo, against PyTorch's: values and gradients."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F

torch = pytest.importorskip("torch")

rng = np.random.default_rng(0)


@pytest.mark.parametrize("eps", [None, 1e-6])
@pytest.mark.parametrize("normalized_shape", [(6,), (4, 6)])
def test_rms_norm_matches_pytorch_with_its_gradients(normalized_shape, eps):
    x, weight = rng.standard_normal((3, 4, 6)), rng.standard_normal(normalized_shape)
    value, grads = gc.value_and_grad(lambda a, w: (F.rms_norm(a, normalized_shape, w, eps) ** 2).sum(),
                                     argnums=(0, 1), backend="reference")(x, weight)
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(weight, requires_grad=True)
    expected = (torch.nn.functional.rms_norm(tx, normalized_shape, tw, eps) ** 2).sum()
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-12)
    np.testing.assert_allclose(grads[0], tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grads[1], tw.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_rms_norm_module_loads_pytorchs_state_and_runs_compiled():
    ours, theirs = nn.RMSNorm(6), torch.nn.RMSNorm(6)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    x = rng.standard_normal((5, 6)).astype(np.float32)
    np.testing.assert_allclose(gc.compile(ours, x)(x), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5)
    assert list(nn.RMSNorm(6, elementwise_affine=False).state_dict()) == []
    with pytest.raises(gc.ShapeError, match="rms_norm: normalized_shape \\(5,\\) must be the trailing"):
        gc.jit(lambda a: F.rms_norm(a, 5))(x)


@pytest.mark.parametrize("beta, alpha", [(1, 1), (0.5, 2.0), (0, 1)])
def test_addmm_and_baddbmm_match_pytorch(beta, alpha):
    bias, m1, m2 = rng.standard_normal(3), rng.standard_normal((2, 4)), rng.standard_normal((4, 3))
    scores, b1, b2 = rng.standard_normal((2, 1, 3)), rng.standard_normal((2, 5, 4)), rng.standard_normal((2, 4, 3))

    def ours(*args):
        return (gc.addmm(args[0], args[1], args[2], beta=beta, alpha=alpha).sin().sum()
                + args[3].baddbmm(args[4], args[5], beta=beta, alpha=alpha).sin().sum())

    arrays = (bias, m1, m2, scores, b1, b2)
    value, grads = gc.value_and_grad(ours, argnums=tuple(range(6)), backend="reference")(*arrays)
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    expected = (torch.addmm(leaves[0], leaves[1], leaves[2], beta=beta, alpha=alpha).sin().sum()
                + leaves[3].baddbmm(leaves[4], leaves[5], beta=beta, alpha=alpha).sin().sum())
    expected.backward()
    assert value == pytest.approx(expected.item(), rel=1e-12)
    for got, leaf in zip(grads, leaves):
        np.testing.assert_allclose(got, leaf.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_finfo_and_iinfo_take_graphcs_and_numpys_dtypes():
    assert gc.finfo(gc.float32).eps == torch.finfo(torch.float32).eps
    assert gc.finfo("float64").max == torch.finfo(torch.float64).max
    assert gc.iinfo(gc.int64).max == torch.iinfo(torch.int64).max
    assert gc.finfo(np.float32).tiny == torch.finfo(torch.float32).tiny
