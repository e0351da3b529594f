"""The MNIST CNN's forward pass and gradients against PyTorch (skipped without torch)."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional


def cnn_loss(params, x, y):
    h = F.relu(F.conv2d(x, params["c1w"], params["c1b"]))
    h = F.relu(F.conv2d(h, params["c2w"], params["c2b"]))
    h = F.max_pool2d(h, 2)
    h = h.flatten(1)
    h = F.relu(F.linear(h, params["f1w"], params["f1b"]))
    logits = F.linear(h, params["f2w"], params["f2b"])
    return F.cross_entropy(logits, y), F.log_softmax(logits, 1)


def make_params(dtype, rng):
    shapes = {"c1w": (4, 1, 3, 3), "c1b": (4,), "c2w": (6, 4, 3, 3), "c2b": (6,),
              "f1w": (16, 6 * 4 * 4), "f1b": (16,), "f2w": (10, 16), "f2b": (10,)}
    return {k: (rng.standard_normal(s) * 0.3).astype(dtype) for k, s in shapes.items()}


def torch_loss(params, x, y):
    h = TF.relu(TF.conv2d(x, params["c1w"], params["c1b"]))
    h = TF.relu(TF.conv2d(h, params["c2w"], params["c2b"]))
    h = TF.max_pool2d(h, 2).flatten(1)
    h = TF.relu(TF.linear(h, params["f1w"], params["f1b"]))
    logits = TF.linear(h, params["f2w"], params["f2b"])
    return TF.cross_entropy(logits, y), TF.log_softmax(logits, 1)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_cnn_forward_and_gradients_match_pytorch(dtype, rtol):
    rng = np.random.default_rng(0)
    params = make_params(dtype, rng)
    x = rng.standard_normal((3, 1, 12, 12)).astype(dtype)
    y = np.array([1, 7, 3])
    (loss, logp), grads = gc.value_and_grad(cnn_loss, has_aux=True, backend="reference")(params, x, y)

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    tloss, tlogp = torch_loss(tparams, torch.tensor(x), torch.tensor(y))
    tloss.backward()
    atol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(loss, tloss.item(), rtol=rtol)
    np.testing.assert_allclose(logp, tlogp.detach().numpy(), rtol=rtol, atol=atol)
    for k in params:
        np.testing.assert_allclose(grads[k], tparams[k].grad.numpy(), rtol=rtol, atol=atol, err_msg=k)
