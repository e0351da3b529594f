"""Running a graphc module and the PyTorch module it ports on the same weights: outputs, and
gradients of a fixed random projection of the outputs w.r.t. the inputs and every parameter."""
import numpy as np

import graphc as gc
import graphc.nn as nn


class _WithKeywords(nn.Module):
    """`inner` called with fixed keyword arguments (functional_call passes positionals only)."""

    def __init__(self, inner, keywords):
        super().__init__()
        self.inner, self.keywords = inner, keywords

    def forward(self, *args):
        return self.inner(*args, **self.keywords)


def _as_list(out):
    return [o for o in out if o is not None] if isinstance(out, (tuple, list)) else [out]


def torch_run(torch, module, args, keywords, seed=1):
    """(outputs, cotangents, gradients by parameter name, input gradients) in float64."""
    tensors = [torch.tensor(a, requires_grad=a.dtype.kind == "f") for a in args]
    outs = _as_list(module(*tensors, **{k: torch.tensor(v) if isinstance(v, np.ndarray) else v
                                        for k, v in keywords.items()}))
    rng = np.random.default_rng(seed)
    cotangents = [rng.uniform(0.5, 1.5, tuple(o.shape)) for o in outs]
    sum(((o * torch.tensor(c)).sum() for o, c in zip(outs, cotangents))).backward()
    grads = {k: p.grad.numpy() for k, p in module.named_parameters()}
    return ([o.detach().numpy() for o in outs], cotangents, grads,
            [t.grad.numpy() for t in tensors if t.grad is not None])


def graphc_run(module, args, keywords, cotangents, backend="reference"):
    """The same for a graphc module, gradients by the same names."""
    wrapper = _WithKeywords(module, keywords)
    state = {k: v for k, v in wrapper.state_dict().items()
             if k in dict(wrapper.named_parameters())}
    differentiated = [i for i, a in enumerate(args) if a.dtype.kind == "f"]

    def loss(params, *xs):
        full = list(args)
        for i, x in zip(differentiated, xs):
            full[i] = x
        outs = _as_list(nn.functional_call(wrapper, params, *full))
        return sum((o * c).sum() for o, c in zip(outs, cotangents)), outs

    first = 0 if state else 1  # a module without parameters: the inputs' gradients only
    (_, outs), grads = gc.value_and_grad(
        loss, argnums=tuple(range(first, 1 + len(differentiated))), has_aux=True,
        backend=backend)(state, *(args[i] for i in differentiated))
    grads = ({},) * first + tuple(grads)
    param_grads = {k.removeprefix("inner."): g for k, g in grads[0].items()}
    return outs, param_grads, list(grads[1:])


def check_against_torch(torch, graphc_module, torch_module, args, keywords=None, rtol=1e-9,
                        atol=1e-11):
    """Load the PyTorch module's state dict into the graphc one (float64 both) and compare."""
    keywords = keywords or {}
    torch_module = torch_module.double()
    graphc_module = graphc_module.double()
    graphc_module.load_state_dict(torch_module.state_dict())
    t_outs, cotangents, t_grads, t_input_grads = torch_run(torch, torch_module, args, keywords)
    outs, grads, input_grads = graphc_run(graphc_module, args, keywords, cotangents)
    assert len(outs) == len(t_outs)
    for i, (ours, theirs) in enumerate(zip(outs, t_outs)):
        assert np.shape(ours) == theirs.shape, f"output {i}"
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol, err_msg=f"output {i}")
    assert set(grads) == set(t_grads)
    for name, theirs in t_grads.items():
        np.testing.assert_allclose(grads[name], theirs, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of {name}")
    for i, (ours, theirs) in enumerate(zip(input_grads, t_input_grads)):
        np.testing.assert_allclose(ours, theirs, rtol=rtol, atol=atol,
                                   err_msg=f"gradient of input {i}")
    return outs
