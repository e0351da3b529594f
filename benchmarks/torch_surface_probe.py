"""How much of PyTorch's everyday surface a ported model can use: each entry is one call
written once, the way a PyTorch user writes it, and run with both libraries.

    python benchmarks/torch_surface_probe.py [--backends reference,numba-cpu] [--only gelu,cat]

For every entry the call is traced inside a model and run through `gc.compile` on the
reference backend ("traces"), then compiled and run on numba-cpu ("compiles"); both results
are compared with PyTorch's on the same inputs and weights ("matches torch"), and for
functions of float inputs the gradients of a random weighting of the results are compared
with PyTorch autograd's (gc.grad on the reference backend: "gradients"). A call that
fails shows the first line of its error (the "refusal"). Optimizer and scheduler entries run
a compiled training step (or the schedule) instead and compare the weights (or the rates).
The table ends with the counts. Entries are written in PyTorch's names whether or not graphc
has them yet: the table is the state of the port, not a list of what passes.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

import graphc as gc
import graphc.nn.functional as gF

FLOAT_RTOL, FLOAT_ATOL = 1e-4, 1e-5


@dataclass
class Probe:
    """One entry. `call(T, F, *inputs)` runs with T = torch or graphc and F = its
    nn.functional; with `module`, `module(T.nn)` builds a module (PyTorch's weights are loaded
    into graphc's through load_state_dict) passed to `call` before the inputs. `run`, instead,
    is a whole computation `run(library, backend)` (backend None for PyTorch) returning arrays.
    Gradients are taken with respect to the float inputs but `constants`."""

    name: str
    category: str
    call: Callable[..., Any] | None = None
    inputs: Callable[[np.random.Generator], tuple] = lambda rng: (_floats(rng, 3, 4),)
    module: Callable[[Any], Any] | None = None
    run: Callable[[Any, str | None], list[np.ndarray]] | None = None
    constants: tuple[int, ...] = ()  # float inputs PyTorch does not differentiate (class weights)


@dataclass
class Result:
    probe: Probe
    traces: bool = False
    compiles: bool | None = None  # None: not tried (backend not asked for, or tracing failed)
    matches: bool | None = None  # None: no PyTorch to compare with
    gradients: bool | None = None  # None: not a function of float inputs, or nothing to compare
    refusal: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


def _floats(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def _ints(rng: np.random.Generator, high: int, *shape: int) -> np.ndarray:
    return rng.integers(0, high, shape).astype(np.int64)


def _probs(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.uniform(0.05, 0.95, shape).astype(np.float32)


def _setitem(T, F, x):
    y = x * 1
    y[:, 0] = 0
    return y


def _index_add(T, F, x, v):
    y = x * 1
    y[T.tensor([2, 0]) if T.__name__ == "torch" else np.array([2, 0])] += v
    return y


def _attention_mask(rng):
    q, k, v = (_floats(rng, 2, 2, 5, 4) for _ in range(3))
    return q, k, v, np.tril(np.ones((5, 5), bool))


# -- the entries ------------------------------------------------------------------------------
MATH = "activations and math"
SHAPE = "shape and indexing"
LAYERS = "layers and functions"
LOSSES = "losses"
OPTIM = "optimizers and schedulers"

PROBES: list[Probe] = [
    Probe("F.gelu", MATH, lambda T, F, x: F.gelu(x)),
    Probe("F.gelu(approximate='tanh')", MATH, lambda T, F, x: F.gelu(x, approximate="tanh")),
    Probe("F.silu", MATH, lambda T, F, x: F.silu(x)),
    Probe("F.leaky_relu", MATH, lambda T, F, x: F.leaky_relu(x, 0.1)),
    Probe("F.elu", MATH, lambda T, F, x: F.elu(x)),
    Probe("F.softplus", MATH, lambda T, F, x: F.softplus(x)),
    Probe("torch.sin", MATH, lambda T, F, x: T.sin(x)),
    Probe("torch.cos", MATH, lambda T, F, x: T.cos(x)),
    Probe("torch.erf", MATH, lambda T, F, x: T.erf(x)),
    Probe("x.clamp", MATH, lambda T, F, x: x.clamp(-0.5, 0.7)),
    Probe("torch.clip", MATH, lambda T, F, x: T.clip(x, min=-0.5)),
    Probe("x.norm", MATH, lambda T, F, x: x.norm(dim=1)),
    Probe("F.normalize", MATH, lambda T, F, x: F.normalize(x, dim=-1)),
    Probe("torch.cumsum", MATH, lambda T, F, x: T.cumsum(x, dim=1)),
    Probe("x.cumprod", MATH, lambda T, F, x: x.cumprod(dim=0)),
    Probe("x.var", MATH, lambda T, F, x: x.var(dim=1)),
    Probe("x.var(unbiased=False)", MATH, lambda T, F, x: x.var(1, unbiased=False)),
    Probe("x.std(correction=0)", MATH, lambda T, F, x: x.std(dim=0, correction=0)),
    Probe("x.min()", MATH, lambda T, F, x: x.min()),
    Probe("x.min(dim)", MATH, lambda T, F, x: x.min(dim=1)),
    Probe("x.argmin", MATH, lambda T, F, x: x.argmin(dim=1)),
    Probe("torch.einsum", MATH, lambda T, F, a, b: T.einsum("bij,bjk->bik", a, b),
          lambda rng: (_floats(rng, 2, 3, 4), _floats(rng, 2, 4, 5))),
    Probe("torch.triu", MATH, lambda T, F, x: T.triu(x, diagonal=1)),
    Probe("torch.tril", MATH, lambda T, F, x: T.tril(x)),
    Probe("torch.arange", MATH, lambda T, F, x: x * T.arange(4).float()),
    Probe("float tensor + int tensor promotes", MATH, lambda T, F, x: x + T.arange(4)),
    Probe("torch.zeros_like", MATH, lambda T, F, x: x + T.zeros_like(x)),
    Probe("torch.ones_like", MATH, lambda T, F, x: x * T.ones_like(x)),
    Probe("torch.full", MATH, lambda T, F, x: x + T.full((3, 4), 2.5)),

    Probe("torch.cat", SHAPE, lambda T, F, x: T.cat([x, x * 2], dim=1)),
    Probe("torch.stack", SHAPE, lambda T, F, x: T.stack([x, -x], dim=0)),
    Probe("torch.split", SHAPE, lambda T, F, x: T.split(x, 2, dim=1)),
    Probe("x.chunk", SHAPE, lambda T, F, x: x.chunk(2, dim=1)),
    Probe("x.repeat", SHAPE, lambda T, F, x: x.repeat(2, 1)),
    Probe("x.expand", SHAPE, lambda T, F, x: x[:1].expand(3, 4)),
    Probe("torch.flip", SHAPE, lambda T, F, x: T.flip(x, dims=[1])),
    Probe("x[:, ::-1]", SHAPE, lambda T, F, x: x[:, ::-1] if T.__name__ != "torch" else T.flip(x, [1])),
    Probe("x[:, [0, 2]]", SHAPE, lambda T, F, x: x[:, [0, 2]]),
    Probe("x[idx]", SHAPE, lambda T, F, x, i: x[i],
          lambda rng: (_floats(rng, 3, 4), _ints(rng, 3, 5))),
    Probe("x.masked_fill", SHAPE, lambda T, F, x: x.masked_fill(x > 0, -1.0)),
    Probe("torch.where(mask)", SHAPE, lambda T, F, x: T.where(x > 0, x, 0.0)),
    Probe("x[:, 0] = 0", SHAPE, _setitem),
    Probe("x[idx] += v", SHAPE, _index_add,
          lambda rng: (_floats(rng, 3, 4), _floats(rng, 2, 4))),
    Probe("x.size()", SHAPE, lambda T, F, x: x.reshape(x.size()[0], -1)),
    Probe("x.size(d)", SHAPE, lambda T, F, x: x.reshape(x.size(0) * x.size(1))),
    Probe("x.dim()", SHAPE, lambda T, F, x: x * x.dim()),
    Probe("x.numel()", SHAPE, lambda T, F, x: x / x.numel()),
    Probe("x.t()", SHAPE, lambda T, F, x: x.t()),
    Probe("x.mT", SHAPE, lambda T, F, x: x.mT, lambda rng: (_floats(rng, 2, 3, 4),)),
    Probe("x.view", SHAPE, lambda T, F, x: x.view(4, 3)),
    Probe("x.contiguous", SHAPE, lambda T, F, x: x.t().contiguous()),
    Probe("x.float()", SHAPE, lambda T, F, i: i.float() * 0.5, lambda rng: (_ints(rng, 5, 3, 4),)),
    Probe("x.double()", SHAPE, lambda T, F, x: x.double()),
    Probe("x.long()", SHAPE, lambda T, F, x: (x * 3).long()),
    Probe("x.to(dtype)", SHAPE, lambda T, F, x: x.to(T.float64)),
    Probe("x.sum(dim=, keepdim=)", SHAPE, lambda T, F, x: x.sum(dim=1, keepdim=True)),
    Probe("x.mean(dim=)", SHAPE, lambda T, F, x: x.mean(dim=0)),
    Probe("values, indices = x.max(dim)", SHAPE, lambda T, F, x: x.max(1)),
    Probe("(x > 0).sum() is int64", SHAPE, lambda T, F, x: (x > 0).sum()),

    Probe("F.layer_norm", LAYERS, lambda T, F, x, w, b: F.layer_norm(x, (4,), w, b),
          lambda rng: (_floats(rng, 3, 4), _floats(rng, 4), _floats(rng, 4))),
    Probe("F.embedding", LAYERS, lambda T, F, i, w: F.embedding(i, w),
          lambda rng: (_ints(rng, 6, 2, 3), _floats(rng, 6, 4))),
    Probe("F.pad constant", LAYERS, lambda T, F, x: F.pad(x, (1, 2), value=0.5)),
    Probe("F.pad reflect", LAYERS, lambda T, F, x: F.pad(x, (2, 1), mode="reflect"),
          lambda rng: (_floats(rng, 2, 3, 5),)),
    Probe("F.pad replicate", LAYERS, lambda T, F, x: F.pad(x, (1, 2, 2, 0), mode="replicate"),
          lambda rng: (_floats(rng, 1, 2, 3, 4),)),
    Probe("F.scaled_dot_product_attention", LAYERS,
          lambda T, F, q, k, v: F.scaled_dot_product_attention(q, k, v),
          lambda rng: tuple(_floats(rng, 2, 2, 5, 4) for _ in range(3))),
    Probe("F.scaled_dot_product_attention(is_causal)", LAYERS,
          lambda T, F, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
          lambda rng: tuple(_floats(rng, 2, 2, 5, 4) for _ in range(3))),
    Probe("F.scaled_dot_product_attention(attn_mask)", LAYERS,
          lambda T, F, q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
          _attention_mask),
    Probe("nn.MultiheadAttention", LAYERS, lambda T, F, m, x: m(x, x, x)[0],
          lambda rng: (_floats(rng, 5, 2, 8),), lambda nn: nn.MultiheadAttention(8, 2)),
    Probe("nn.TransformerEncoderLayer", LAYERS, lambda T, F, m, x: m(x),
          lambda rng: (_floats(rng, 2, 5, 8),),
          lambda nn: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)),
    Probe("nn.GELU", LAYERS, lambda T, F, m, x: m(x), module=lambda nn: nn.GELU()),
    Probe("nn.SiLU", LAYERS, lambda T, F, m, x: m(x), module=lambda nn: nn.SiLU()),
    Probe("nn.LeakyReLU", LAYERS, lambda T, F, m, x: m(x), module=lambda nn: nn.LeakyReLU(0.2)),
    Probe("nn.ELU", LAYERS, lambda T, F, m, x: m(x), module=lambda nn: nn.ELU()),
    Probe("nn.Softplus", LAYERS, lambda T, F, m, x: m(x), module=lambda nn: nn.Softplus()),
    Probe("nn.AdaptiveAvgPool2d", LAYERS, lambda T, F, m, x: m(x),
          lambda rng: (_floats(rng, 2, 3, 6, 5),), lambda nn: nn.AdaptiveAvgPool2d((2, 3))),
    Probe("nn.AdaptiveMaxPool2d", LAYERS, lambda T, F, m, x: m(x),
          lambda rng: (_floats(rng, 2, 3, 6, 5),), lambda nn: nn.AdaptiveMaxPool2d(2)),
    Probe("nn.Flatten", LAYERS, lambda T, F, m, x: m(x),
          lambda rng: (_floats(rng, 2, 3, 4),), lambda nn: nn.Flatten()),
    Probe("nn.Identity", LAYERS, lambda T, F, m, x: m(x), module=lambda nn: nn.Identity()),
    Probe("nn.Conv1d", LAYERS, lambda T, F, m, x: m(x),
          lambda rng: (_floats(rng, 2, 3, 7),), lambda nn: nn.Conv1d(3, 4, 3, padding=1)),
    Probe("nn.LSTM(bidirectional)", LAYERS, lambda T, F, m, x: m(x)[0],
          lambda rng: (_floats(rng, 4, 2, 3),), lambda nn: nn.LSTM(3, 5, bidirectional=True)),
    Probe("nn.GRU(num_layers=2, dropout)", LAYERS, lambda T, F, m, x: m(x)[0],
          lambda rng: (_floats(rng, 4, 2, 3),), lambda nn: nn.GRU(3, 5, num_layers=2, dropout=0.5)),
    Probe("nn.LSTM batch_first=False default", LAYERS, lambda T, F, m, x: m(x)[0],
          lambda rng: (_floats(rng, 5, 2, 3),), lambda nn: nn.LSTM(3, 4)),

    Probe("F.cross_entropy(label_smoothing)", LOSSES,
          lambda T, F, x, y: F.cross_entropy(x, y, label_smoothing=0.1),
          lambda rng: (_floats(rng, 4, 5), _ints(rng, 5, 4))),
    Probe("F.cross_entropy(weight)", LOSSES,
          lambda T, F, x, y, w: F.cross_entropy(x, y, weight=w),
          lambda rng: (_floats(rng, 4, 5), _ints(rng, 5, 4), _probs(rng, 5)), constants=(2,)),
    Probe("F.cross_entropy (N, C, d)", LOSSES, lambda T, F, x, y: F.cross_entropy(x, y),
          lambda rng: (_floats(rng, 2, 5, 3), _ints(rng, 5, 2, 3))),
    Probe("F.binary_cross_entropy", LOSSES, lambda T, F, p, y: F.binary_cross_entropy(p, y),
          lambda rng: (_probs(rng, 3, 4), _probs(rng, 3, 4))),
    Probe("F.binary_cross_entropy_with_logits(pos_weight)", LOSSES,
          lambda T, F, x, y, w: F.binary_cross_entropy_with_logits(x, y, pos_weight=w),
          lambda rng: (_floats(rng, 3, 4), _probs(rng, 3, 4), _probs(rng, 4)), constants=(2,)),
    Probe("F.nll_loss", LOSSES, lambda T, F, x, y: F.nll_loss(F.log_softmax(x, 1), y),
          lambda rng: (_floats(rng, 4, 5), _ints(rng, 5, 4))),
    Probe("F.kl_div", LOSSES,
          lambda T, F, x, y: F.kl_div(F.log_softmax(x, 1), y, reduction="batchmean"),
          lambda rng: (_floats(rng, 3, 4), _probs(rng, 3, 4))),
    Probe("F.smooth_l1_loss", LOSSES, lambda T, F, x, y: F.smooth_l1_loss(x, y, beta=0.5),
          lambda rng: (_floats(rng, 3, 4), _floats(rng, 3, 4))),
    Probe("F.huber_loss", LOSSES, lambda T, F, x, y: F.huber_loss(x, y, delta=0.7),
          lambda rng: (_floats(rng, 3, 4), _floats(rng, 3, 4))),
    Probe("F.l1_loss", LOSSES, lambda T, F, x, y: F.l1_loss(x, y),
          lambda rng: (_floats(rng, 3, 4), _floats(rng, 3, 4))),
]


# -- optimizers and schedulers: a few compiled training steps, or a schedule's rates ----------
_OPT_X = np.random.default_rng(1).standard_normal((8, 3)).astype(np.float32)
_OPT_Y = np.random.default_rng(2).standard_normal((8, 2)).astype(np.float32)


def _train(make_optimizer: Callable, make_scheduler: Callable | None = None, steps: int = 4
           ) -> Callable[[Any, str | None], list[np.ndarray]]:
    """Weights after `steps` steps of a linear model trained with the optimizer (two parameter
    groups: weight, bias) and, when given, its scheduler stepped after each step."""
    def run(lib, backend):
        rng = np.random.default_rng(0)
        w0, b0 = _floats(rng, 2, 3), _floats(rng, 2)
        if backend is None:  # PyTorch
            weight, bias = (lib.tensor(a, requires_grad=True) for a in (w0, b0))
            opt = make_optimizer(lib.optim, weight, bias)
            sched = make_scheduler(lib.optim.lr_scheduler, opt) if make_scheduler else None
            for _ in range(steps):
                opt.zero_grad()
                out = lib.tensor(_OPT_X) @ weight.T + bias
                lib.nn.functional.mse_loss(out, lib.tensor(_OPT_Y)).backward()
                opt.step()
                if sched:
                    sched.step()
            return [weight.detach().numpy(), bias.detach().numpy()]
        model = gc.nn.Linear(3, 2)
        model.load_state_dict({"weight": w0, "bias": b0})
        opt = make_optimizer(gc.optim, model.weight, model.bias)
        sched = make_scheduler(gc.optim, opt) if make_scheduler else None
        step = gc.compile_train_step(model, gF.mse_loss, opt, (_OPT_X, _OPT_Y), backend=backend)
        for _ in range(steps):
            step(_OPT_X, _OPT_Y)
            if sched:
                sched.step()
        if len(step._compiled) != 1:
            raise RuntimeError(f"the schedule recompiled the step {len(step._compiled)} times")
        return [model.weight.copy(), model.bias.copy()]
    return run


def _adamw_groups(optim, weight, bias):
    return optim.AdamW([{"params": [weight], "weight_decay": 0.1},
                        {"params": [bias], "weight_decay": 0.0, "lr": 0.05}], lr=0.01)


def _sgd_groups(optim, weight, bias):
    return optim.SGD([{"params": [weight], "momentum": 0.9}, {"params": [bias]}], lr=0.1)


PROBES += [
    Probe("AdamW parameter groups", OPTIM, run=_train(_adamw_groups)),
    Probe("SGD parameter groups", OPTIM, run=_train(_sgd_groups)),
    Probe("StepLR", OPTIM, run=_train(_sgd_groups, lambda s, o: s.StepLR(o, 2, gamma=0.5))),
    Probe("MultiStepLR", OPTIM, run=_train(_sgd_groups, lambda s, o: s.MultiStepLR(o, [1, 3]))),
    Probe("ExponentialLR", OPTIM, run=_train(_sgd_groups, lambda s, o: s.ExponentialLR(o, 0.7))),
    Probe("CosineAnnealingLR", OPTIM,
          run=_train(_adamw_groups, lambda s, o: s.CosineAnnealingLR(o, T_max=4))),
    Probe("LinearLR", OPTIM, run=_train(_adamw_groups, lambda s, o: s.LinearLR(o, 0.25, 1.0, 3))),
    Probe("LambdaLR", OPTIM, run=_train(_sgd_groups, lambda s, o: s.LambdaLR(o, lambda e: 1 / (e + 1)))),
    Probe("OneCycleLR(cycle_momentum=False)", OPTIM, run=_train(
        _adamw_groups, lambda s, o: s.OneCycleLR(o, 0.1, total_steps=5, cycle_momentum=False))),
    Probe("SequentialLR (warm-up, cosine)", OPTIM, run=_train(_adamw_groups, lambda s, o: s.SequentialLR(
        o, [s.LinearLR(o, 0.1, total_iters=2), s.CosineAnnealingLR(o, T_max=3)], milestones=[2]))),
]


# -- running an entry -------------------------------------------------------------------------
def _flat(out: Any) -> list[np.ndarray]:
    """The arrays of a result: tensors, (values, indices) pairs and tuples of chunks alike."""
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _flat(o)]
    if hasattr(out, "detach"):  # a torch tensor
        return [out.detach().numpy()]
    return [np.asarray(out)]


def _close(ours: list[np.ndarray], theirs: list[np.ndarray]) -> str:
    """'' when equal (floats within float32 tolerance, others exactly), else what differs."""
    if len(ours) != len(theirs):
        return f"{len(ours)} results, torch has {len(theirs)}"
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a.shape != b.shape:
            return f"result {i}: shape {a.shape}, torch {b.shape}"
        if a.dtype.kind != b.dtype.kind or (a.dtype.kind != "f" and a.dtype != b.dtype):
            return f"result {i}: dtype {a.dtype}, torch {b.dtype}"
        if a.dtype.kind == "f":
            if not np.allclose(a, b, rtol=FLOAT_RTOL, atol=FLOAT_ATOL):
                return f"result {i}: max |difference| {np.max(np.abs(a - b.astype(a.dtype))):.3g}"
        elif not np.array_equal(a, b):
            return f"result {i}: values differ"
    return ""


class _Wrapped(gc.nn.Module):
    """The entry's call as a model's forward, so it traces as a ported model's code does."""

    def __init__(self, probe: Probe, inner: Any = None) -> None:
        super().__init__()
        self.inner = inner
        self._call = probe.call

    def forward(self, *inputs: Any) -> Any:
        args = inputs if self.inner is None else (self.inner, *inputs)
        return self._call(gc, gF, *args)


def _torch_result(probe: Probe, inputs: tuple, torch: Any) -> tuple[list[np.ndarray], Any]:
    """PyTorch's result, and its module (to copy the weights from) when the entry has one."""
    if probe.run is not None:
        return probe.run(torch, None), None
    torch.manual_seed(0)
    module = probe.module(torch.nn).eval() if probe.module else None
    with torch.no_grad():
        args = [torch.tensor(a) for a in inputs]
        out = probe.call(torch, torch.nn.functional, *([module] if module else []), *args)
    return _flat(out), module


def _graphc_model(probe: Probe, torch_module: Any) -> gc.nn.Module:
    inner = None
    if probe.module is not None:
        inner = probe.module(gc.nn)
        if torch_module is not None:
            inner.load_state_dict({k: v.detach().numpy() for k, v in torch_module.state_dict().items()})
    return _Wrapped(probe, inner)


def _differentiable(probe: Probe, inputs: tuple, expected: list[np.ndarray] | None) -> bool:
    """Gradients are compared for functions (no module, no training run) of float inputs with
    float results."""
    return (probe.run is None and probe.module is None and expected is not None
            and any(a.dtype.kind == "f" for a in inputs) and any(e.dtype.kind == "f" for e in expected))


def _cotangents(expected: list[np.ndarray]) -> list[np.ndarray | None]:
    """A fixed random weight for each float result (None for the others): the gradients of
    sum(result * weight) are compared, which checks every result's vector-Jacobian product."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal(e.shape).astype(e.dtype) if e.dtype.kind == "f" else None
            for e in expected]


def _weighted_sum(results: list[Any], cotangents: list[np.ndarray | None]) -> Any:
    terms = [(r * c).sum() for r, c in zip(results, cotangents) if c is not None]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _graphc_leaves(out: Any) -> list[Any]:
    return [a for o in out for a in _graphc_leaves(o)] if isinstance(out, (tuple, list)) else [out]


def _wrt(probe: Probe, inputs: tuple) -> list[int]:
    return [i for i, a in enumerate(inputs) if a.dtype.kind == "f" and i not in probe.constants]


def _torch_gradients(probe: Probe, inputs: tuple, cotangents: list, torch: Any) -> list[np.ndarray]:
    wrt = _wrt(probe, inputs)
    args = [torch.tensor(a, requires_grad=i in wrt) for i, a in enumerate(inputs)]
    outs = probe.call(torch, torch.nn.functional, *args)
    leaves = [o for o in (outs if isinstance(outs, (tuple, list)) else [outs])]
    total = _weighted_sum(leaves, [None if c is None else torch.tensor(c) for c in cotangents])
    wrt = [a for a in args if a.requires_grad]
    if not total.requires_grad:  # no float input reaches the results
        return [np.zeros(a.shape, np.float32) for a in wrt]
    grads = torch.autograd.grad(total, wrt, allow_unused=True)
    return [np.zeros(a.shape, np.float32) if g is None else g.numpy() for a, g in zip(wrt, grads)]


def _graphc_gradients(probe: Probe, inputs: tuple, cotangents: list) -> list[np.ndarray]:
    def loss(*args):
        return _weighted_sum(_graphc_leaves(probe.call(gc, gF, *args)), cotangents)
    return list(gc.grad(loss, argnums=_wrt(probe, inputs), backend="reference")(*inputs))


def check_gradients(probe: Probe, inputs: tuple, expected: list[np.ndarray], torch: Any) -> str:
    """'' when graphc's gradients (reference backend) equal PyTorch's, else what differs."""
    cotangents = _cotangents(expected)
    return _close(_graphc_gradients(probe, inputs, cotangents),
                  _torch_gradients(probe, inputs, cotangents, torch))


def _refusal(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"


def run_probe(probe: Probe, backends: Sequence[str] = ("reference", "numba-cpu"),
              torch: Any = None) -> Result:
    """Trace and run one entry on each backend and compare with PyTorch (when given)."""
    result = Result(probe)
    start = time.perf_counter()
    inputs = probe.inputs(np.random.default_rng(0)) if probe.run is None else ()
    expected, torch_module = None, None
    if torch is not None:
        try:
            expected, torch_module = _torch_result(probe, inputs, torch)
        except Exception as exc:  # the entry itself is wrong for PyTorch: say so, never hide it
            result.notes.append(f"PyTorch failed: {_refusal(exc)}")
    matches = []
    for backend in backends:
        try:
            if probe.run is not None:
                got = probe.run(gc, backend)
            else:
                model = _graphc_model(probe, torch_module)
                got = _flat(gc.compile(model, inputs, backend=backend)(*inputs))
        except Exception as exc:
            result.refusal = result.refusal or f"[{backend}] {_refusal(exc)}"
            break
        if backend == "reference":
            result.traces = True
        else:
            result.compiles = True
        if expected is not None:
            difference = _close(got, expected)
            matches.append(not difference)
            if difference:
                result.notes.append(f"[{backend}] {difference}")
    if "numba-cpu" in backends and result.traces and result.compiles is None:
        result.compiles = False
    if expected is not None and result.traces:
        result.matches = all(matches) and len(matches) == len(backends)
        if _differentiable(probe, inputs, expected):
            try:
                difference = check_gradients(probe, inputs, expected, torch)
            except Exception as exc:
                difference = f"gradients: {_refusal(exc)}"
            result.gradients = not difference
            if difference:
                result.notes.append(f"[gradients] {difference}")
    result.seconds = time.perf_counter() - start
    return result


def _mark(value: bool | None) -> str:
    return {True: "yes", False: "NO", None: "-"}[value]


def report(results: Sequence[Result], out: Any = sys.stdout) -> None:
    width = max(len(r.probe.name) for r in results)
    category = None
    print(f"{'entry':{width}}  traces  compiles  matches torch  gradients  refusal / difference",
          file=out)
    for r in results:
        if r.probe.category != category:
            category = r.probe.category
            print(f"-- {category}", file=out)
        detail = r.refusal or "; ".join(r.notes)
        print(f"{r.probe.name:{width}}  {_mark(r.traces):6}  {_mark(r.compiles):8}  "
              f"{_mark(r.matches):13}  {_mark(r.gradients):9}  {detail[:160]}", file=out)
    n = len(results)
    print(f"\n{n} entries: {sum(r.traces for r in results)} trace, "
          f"{sum(bool(r.compiles) for r in results)} compile on numba-cpu, "
          f"{sum(bool(r.matches) for r in results)} match PyTorch, "
          f"{sum(not r.traces for r in results)} refused; gradients match PyTorch for "
          f"{sum(bool(r.gradients) for r in results)} of "
          f"{sum(r.gradients is not None for r in results)} differentiable functions", file=out)
    failed = [r for r in results if r.refusal]
    if failed:
        print("\nrefused or failed to compile:", file=out)
        for r in failed:
            print(f"  {r.probe.name}: {r.refusal}", file=out)


def main(argv: Sequence[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="reference,numba-cpu",
                        help="comma-separated, reference first (default: reference,numba-cpu)")
    parser.add_argument("--only", default="", help="comma-separated entry names to run")
    args = parser.parse_args(argv)
    backends = args.backends.split(",")
    if backends[0] != "reference":
        parser.error("the reference backend comes first: it is what 'traces' means")
    try:
        import torch
    except ImportError:
        torch = None
        print("PyTorch is not installed: 'matches torch' is not checked", file=sys.stderr)
    wanted = {n.strip() for n in args.only.split(",") if n.strip()}
    unknown = wanted - {p.name for p in PROBES}
    if unknown:
        parser.error(f"no entries named {sorted(unknown)}")
    results = [run_probe(p, backends, torch) for p in PROBES if not wanted or p.name in wanted]
    report(results)
    return results


if __name__ == "__main__":
    main()
