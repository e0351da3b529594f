"""Optimizers as update rules emitted into the training-step graph, and learning-rate schedules.

An optimizer declares its per-parameter state (zeros on the host) and writes its update with
traced tensors. The learning rate and the step count enter the compiled step as inputs, so a
schedule changes the rate without recompiling. Formulas follow PyTorch's documented ones.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from graphc.ir.errors import GraphcError

from .functions import minimum, sqrt, where
from .tensor import Tensor

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]


def _in_dtype(t: Tensor, dtype: str) -> Tensor:
    return t if t.dtype == dtype else t.astype(dtype)


class Optimizer:
    """Base class: `state_names` lists per-parameter state; `rule` updates one parameter."""

    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable[np.ndarray], lr: float, weight_decay: float = 0.0) -> None:
        self.params = list(params)
        if not self.params:
            raise GraphcError(f"{type(self).__name__}: got an empty parameter list")
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"{type(self).__name__}: lr and weight_decay must be >= 0")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        # The learning rate enters the step in the widest parameter dtype, so a float64 model
        # trains with its float64 rate rather than the nearest float32.
        self.lr_dtype = np.dtype(np.result_type(np.float32, *(p.dtype for p in self.params)))

    def init_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.zeros_like(param) for name in self.state_names}

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor
             ) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def update(self, params: Params, grads: Params, state: State, lr: Tensor, step: Tensor
               ) -> tuple[Params, State]:
        """Apply `rule` to every parameter; `step` counts from 1 at the first update. The rule
        sees `lr` and `step` in the parameter's dtype (the graph never mixes float widths)."""
        new_params, new_state = {}, {}
        for name, p in params.items():
            new_params[name], new_state[name] = self.rule(
                p, grads[name], state[name], _in_dtype(lr, p.dtype), _in_dtype(step, p.dtype))
        return new_params, new_state

    def _decayed(self, p: Tensor, g: Tensor) -> Tensor:
        """L2 regularisation folded into the gradient (PyTorch's weight_decay)."""
        return g + p * self.weight_decay if self.weight_decay else g


class SGD(Optimizer):
    state_names = ("momentum_buffer",)

    def __init__(self, params: Iterable[np.ndarray], lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, lr, weight_decay)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: Nesterov momentum needs momentum > 0 and zero dampening")
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov
        if not momentum:
            self.state_names = ()

    def rule(self, p, g, state, lr, step):
        g = self._decayed(p, g)
        if not self.momentum:
            return p - lr * g, {}
        # The first step starts the buffer at g itself (no dampening), as PyTorch does.
        blended = state["momentum_buffer"] * self.momentum + g * (1 - self.dampening)
        buf = where(step == 1, g, blended)
        direction = g + buf * self.momentum if self.nesterov else buf
        return p - lr * direction, {"momentum_buffer": buf}


class Adam(Optimizer):
    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params: Iterable[np.ndarray], lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, lr, weight_decay)
        self.beta1, self.beta2 = map(float, betas)
        self.eps = eps

    def rule(self, p, g, state, lr, step):
        if self.decoupled:
            p = p * (1 - lr * self.weight_decay) if self.weight_decay else p
        else:
            g = self._decayed(p, g)
        m = state["exp_avg"] * self.beta1 + g * (1 - self.beta1)
        v = state["exp_avg_sq"] * self.beta2 + g.square() * (1 - self.beta2)
        correction1 = 1 - self.beta1 ** step
        correction2 = 1 - self.beta2 ** step
        denom = sqrt(v) / sqrt(correction2) + self.eps
        return p - (lr / correction1) * m / denom, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p * (1 - lr * weight_decay) before the update."""

    decoupled = True

    def __init__(self, params: Iterable[np.ndarray], lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class Adagrad(Optimizer):
    state_names = ("sum",)

    def __init__(self, params: Iterable[np.ndarray], lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10) -> None:
        super().__init__(params, lr, weight_decay)
        self.lr_decay, self.initial, self.eps = lr_decay, initial_accumulator_value, eps

    def init_state(self, param):
        return {"sum": np.full_like(param, self.initial)}

    def rule(self, p, g, state, lr, step):
        g = self._decayed(p, g)
        clr = lr / ((step - 1) * self.lr_decay + 1)
        total = state["sum"] + g.square()
        return p - clr * g / (sqrt(total) + self.eps), {"sum": total}


class RMSprop(Optimizer):
    def __init__(self, params: Iterable[np.ndarray], lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> None:
        super().__init__(params, lr, weight_decay)
        self.alpha, self.eps, self.momentum, self.centered = alpha, eps, momentum, centered
        self.state_names = ("square_avg",) + (("momentum_buffer",) if momentum else ()) + (
            ("grad_avg",) if centered else ())

    def rule(self, p, g, state, lr, step):
        g = self._decayed(p, g)
        new = {"square_avg": state["square_avg"] * self.alpha + g.square() * (1 - self.alpha)}
        if self.centered:
            new["grad_avg"] = state["grad_avg"] * self.alpha + g * (1 - self.alpha)
            avg = sqrt(new["square_avg"] - new["grad_avg"].square()) + self.eps
        else:
            avg = sqrt(new["square_avg"]) + self.eps
        if self.momentum:
            new["momentum_buffer"] = state["momentum_buffer"] * self.momentum + g / avg
            return p - lr * new["momentum_buffer"], new
        return p - lr * g / avg, new


# -- regularisation helpers ------------------------------------------------------------------
def l1_penalty(params: Iterable[Tensor], weight: float) -> Tensor:
    """weight * sum(|p|) over traced parameters (add it to a loss)."""
    terms = [p.abs().sum() for p in params]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total * weight


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all gradients by min(1, max_norm / (global L2 norm + 1e-6)), as torch's clip_grad_norm_."""
    squares = [g.square().sum() for g in grads.values()]
    total = squares[0]
    for s in squares[1:]:
        total = total + s
    scale = minimum(max_norm / (sqrt(total) + 1e-6), 1.0)
    return {name: g * scale for name, g in grads.items()}


# -- learning-rate schedules (host side: they set optimizer.lr, an input of the step) ----------
class LRScheduler:
    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.base_lr = optimizer.lr
        self.epoch = 0

    def rate(self, epoch: int) -> float:
        raise NotImplementedError

    def step(self) -> None:
        self.epoch += 1
        self.optimizer.lr = self.rate(self.epoch)


class StepLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1) -> None:
        super().__init__(optimizer)
        self.step_size, self.gamma = step_size, gamma

    def rate(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class ExponentialLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, gamma: float) -> None:
        super().__init__(optimizer)
        self.gamma = gamma

    def rate(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** epoch


class CosineAnnealingLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0) -> None:
        super().__init__(optimizer)
        self.T_max, self.eta_min = T_max, eta_min

    def rate(self, epoch: int) -> float:
        cos = (1 + math.cos(math.pi * min(epoch, self.T_max) / self.T_max)) / 2
        return self.eta_min + (self.base_lr - self.eta_min) * cos


__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "l1_penalty",
           "clip_by_global_norm", "LRScheduler", "StepLR", "ExponentialLR", "CosineAnnealingLR"]
