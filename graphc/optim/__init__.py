"""Optimizers as update rules emitted into the training-step graph, and learning-rate schedules.

An optimizer holds PyTorch's `param_groups`: a list of dicts, each with its "params" and its
own hyperparameters (lr, weight_decay, momentum, betas...), the optimizer's defaults filling
what a group leaves out. It declares its per-parameter state (zeros on the host) and writes
its update with traced tensors. Each group's learning rate and the step count enter the
compiled step as inputs, so a schedule changes the rates without recompiling; the other
hyperparameters are compiled in (a compiled step refuses to run once one has changed).
Formulas follow PyTorch's documented ones.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from graphc.ir.errors import GraphcError

from ..functions import minimum, sqrt, where
from ..tensor import Tensor

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]
ParamsArg = Iterable[np.ndarray] | Iterable[dict[str, Any]]


def _in_dtype(t: Tensor, dtype: str) -> Tensor:
    return t if t.dtype == dtype else t.astype(dtype)


class Optimizer:
    """Base class. Subclasses pass their hyperparameter defaults to `__init__`, name the
    per-parameter state a group needs in `slots` and update one parameter in `rule`, reading
    the group's hyperparameters from its dict."""

    def __init__(self, params: ParamsArg, defaults: dict[str, Any]) -> None:
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        groups = list(params)
        if not groups:
            raise GraphcError(f"{type(self).__name__}: got an empty parameter list")
        for group in groups if isinstance(groups[0], dict) else [{"params": groups}]:
            self.add_param_group(group)

    # -- parameter groups ------------------------------------------------------------------
    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group as PyTorch does: {"params": [...], hyperparameter: value, ...}, the
        defaults filling the rest. A parameter may belong to one group only."""
        cls = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise GraphcError(f"{cls}: a parameter group is a dict with a 'params' key, got "
                              f"{type(group).__name__}; pass either parameters or a list of "
                              "such dicts")
        unknown = sorted(set(group) - {"params", *self.defaults})
        if unknown:
            raise GraphcError(f"{cls}: unknown key(s) {unknown} in parameter group "
                              f"{len(self.param_groups)}; {cls} takes "
                              f"{', '.join(sorted(self.defaults))}")
        params = group["params"]
        params = [params] if isinstance(params, np.ndarray) else list(params)
        index = len(self.param_groups)
        if not params:
            raise GraphcError(f"{cls}: parameter group {index} has no parameters")
        for p in params:
            if not isinstance(p, np.ndarray):
                raise GraphcError(f"{cls}: parameter group {index} holds a {type(p).__name__}, "
                                  "not a parameter array (build it from model.parameters())")
        seen = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        ids = [id(p) for p in params]
        for p in params:
            if id(p) in seen:
                raise GraphcError(f"{cls}: a parameter of shape {p.shape} appears in parameter "
                                  f"group {index} and in group {seen[id(p)]}; each parameter "
                                  "belongs to one group")
            if ids.count(id(p)) > 1:
                raise GraphcError(f"{cls}: a parameter of shape {p.shape} appears twice in "
                                  f"parameter group {index}")
        full = {**self.defaults, **group, "params": params}
        full["lr"] = float(full["lr"])
        if full["lr"] < 0 or full.get("weight_decay", 0.0) < 0:
            raise ValueError(f"{cls}: parameter group {index}: lr and weight_decay must be >= 0")
        self._check_group(full, index)
        self.param_groups.append(full)

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        """Subclasses refuse hyperparameter combinations that make no sense."""

    @property
    def params(self) -> list[np.ndarray]:
        """Every parameter, group by group (the order of the compiled step's inputs)."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        """The learning rate when every group has the same one; setting it sets every group's."""
        rates = {group["lr"] for group in self.param_groups}
        if len(rates) > 1:
            raise GraphcError(f"{type(self).__name__}: its {len(self.param_groups)} parameter "
                              "groups have different learning rates; read "
                              "optimizer.param_groups[i]['lr']")
        return rates.pop()

    @lr.setter
    def lr(self, value: float) -> None:
        for group in self.param_groups:
            group["lr"] = float(value)

    @property
    def lr_dtype(self) -> np.dtype:
        """The rates enter the step in the widest parameter dtype, so a float64 model trains
        with its float64 rates rather than the nearest float32."""
        return np.dtype(np.result_type(np.float32, *(p.dtype for p in self.params)))

    def learning_rates(self) -> list[np.generic]:
        """Each group's rate now, as the compiled step takes them."""
        to_dtype = self.lr_dtype.type
        return [to_dtype(group["lr"]) for group in self.param_groups]

    def compiled_settings(self) -> tuple:
        """What a compiled step bakes in: every group's parameters and its hyperparameters
        but the rate (schedulers' own keys, such as "initial_lr", are not read). A step
        compares it before running, so a change is never ignored."""
        return tuple((tuple(id(p) for p in g["params"]),
                      tuple((k, _frozen(g[k])) for k in self.defaults if k != "lr"))
                     for g in self.param_groups)

    def check_settings(self, compiled: tuple, step_name: str) -> None:
        """Raise if the groups changed since `compiled` (their compiled_settings) was taken."""
        now = self.compiled_settings()
        if now == compiled:
            return
        if len(now) != len(compiled) or any(a[0] != b[0] for a, b in zip(now, compiled)):
            raise GraphcError(f"{step_name}: the optimizer's parameter groups changed after the "
                              "step was compiled; compile a new step for the new groups")
        for i, (a, b) in enumerate(zip(compiled, now)):
            for (key, before), (_, after) in zip(a[1], b[1]):
                if before != after:
                    raise GraphcError(
                        f"{step_name}: optimizer.param_groups[{i}][{key!r}] changed from "
                        f"{before} to {after} after the step was compiled; only 'lr' is an input "
                        "of the compiled step: set it back, or compile a new step")

    def _group_of(self, param: np.ndarray) -> dict[str, Any]:
        for group in self.param_groups:
            if any(p is param for p in group["params"]):
                return group
        raise GraphcError(f"{type(self).__name__}: the array of shape {param.shape} is not one "
                          "of its parameters")

    # -- state and update ------------------------------------------------------------------
    def slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        """The per-parameter state a parameter of `group` keeps."""
        return ()

    def init_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        return {name: np.zeros_like(param) for name in self.slots(self._group_of(param))}

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor,
             group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def update(self, params: Params, grads: Params, state: State, lrs: Sequence[Tensor],
               step: Tensor) -> tuple[Params, State]:
        """Apply `rule` to every parameter, `params` being in the order of `self.params` and
        `lrs` one rate per group; `step` counts from 1 at the first update. The rule sees its
        group's rate and `step` in the parameter's dtype (the graph never mixes float widths)."""
        group_index = [i for i, group in enumerate(self.param_groups) for _ in group["params"]]
        if len(group_index) != len(params) or len(lrs) != len(self.param_groups):
            raise GraphcError(f"{type(self).__name__}: update got {len(params)} parameters and "
                              f"{len(lrs)} rates for {len(group_index)} parameters in "
                              f"{len(self.param_groups)} groups")
        new_params, new_state = {}, {}
        for (name, p), i in zip(params.items(), group_index):
            new_params[name], new_state[name] = self.rule(
                p, grads[name], state[name], _in_dtype(lrs[i], p.dtype), _in_dtype(step, p.dtype),
                self.param_groups[i])
        return new_params, new_state


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _decayed(p: Tensor, g: Tensor, group: dict[str, Any]) -> Tensor:
    """L2 regularisation folded into the gradient (PyTorch's weight_decay)."""
    return g + p * group["weight_decay"] if group["weight_decay"] else g


class SGD(Optimizer):
    def __init__(self, params: ParamsArg, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov))

    def _check_group(self, group, index):
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: parameter group {index}: Nesterov momentum needs momentum > 0 "
                             "and zero dampening")

    def slots(self, group):
        return ("momentum_buffer",) if group["momentum"] else ()

    def rule(self, p, g, state, lr, step, group):
        g = _decayed(p, g, group)
        momentum = group["momentum"]
        if not momentum:
            return p - lr * g, {}
        # The first step starts the buffer at g itself (no dampening), as PyTorch does.
        blended = state["momentum_buffer"] * momentum + g * (1 - group["dampening"])
        buf = where(step == 1, g, blended)
        direction = g + buf * momentum if group["nesterov"] else buf
        return p - lr * direction, {"momentum_buffer": buf}


class Adam(Optimizer):
    decoupled = False

    def __init__(self, params: ParamsArg, lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay))

    def _check_group(self, group, index):
        betas = tuple(map(float, group["betas"]))
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{type(self).__name__}: parameter group {index}: betas must be two "
                             f"numbers in [0, 1), got {group['betas']}")
        group["betas"] = betas

    def slots(self, group):
        return ("exp_avg", "exp_avg_sq")

    def rule(self, p, g, state, lr, step, group):
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if self.decoupled:
            p = p * (1 - lr * weight_decay) if weight_decay else p
        else:
            g = _decayed(p, g, group)
        m = state["exp_avg"] * beta1 + g * (1 - beta1)
        v = state["exp_avg_sq"] * beta2 + g.square() * (1 - beta2)
        correction1 = 1 - beta1 ** step
        correction2 = 1 - beta2 ** step
        denom = sqrt(v) / sqrt(correction2) + group["eps"]
        return p - (lr / correction1) * m / denom, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p * (1 - lr * weight_decay) before the update."""

    decoupled = True

    def __init__(self, params: ParamsArg, lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr, betas, eps, weight_decay)


class Adagrad(Optimizer):
    def __init__(self, params: ParamsArg, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10) -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps))

    def init_state(self, param):
        # The group's own value (PyTorch's Adagrad reads only the optimizer's default).
        return {"sum": np.full_like(param, self._group_of(param)["initial_accumulator_value"])}

    def slots(self, group):
        return ("sum",)

    def rule(self, p, g, state, lr, step, group):
        g = _decayed(p, g, group)
        clr = lr / ((step - 1) * group["lr_decay"] + 1)
        total = state["sum"] + g.square()
        return p - clr * g / (sqrt(total) + group["eps"]), {"sum": total}


class RMSprop(Optimizer):
    def __init__(self, params: ParamsArg, lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered))

    def slots(self, group):
        return ("square_avg",) + (("momentum_buffer",) if group["momentum"] else ()) + (
            ("grad_avg",) if group["centered"] else ())

    def rule(self, p, g, state, lr, step, group):
        g = _decayed(p, g, group)
        alpha, eps = group["alpha"], group["eps"]
        new = {"square_avg": state["square_avg"] * alpha + g.square() * (1 - alpha)}
        if group["centered"]:
            new["grad_avg"] = state["grad_avg"] * alpha + g * (1 - alpha)
            avg = sqrt(new["square_avg"] - new["grad_avg"].square()) + eps
        else:
            avg = sqrt(new["square_avg"]) + eps
        if group["momentum"]:
            new["momentum_buffer"] = state["momentum_buffer"] * group["momentum"] + g / avg
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


# -- learning-rate schedules -------------------------------------------------------------------
# Host side: a scheduler sets each group's "lr", which the compiled step reads as an input at
# every call. Each rate is computed in closed form from the group's initial rate and the epoch
# count, which equals PyTorch's chained updates (up to rounding) when nothing else sets the rates.
class LRScheduler:
    """PyTorch's protocol: construction sets the epoch-0 rates, each `step()` advances one
    epoch (or one batch, as the schedule is meant), `get_last_lr()` returns the rates set."""

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise GraphcError(f"{type(self).__name__}: expected a graphc optimizer, got "
                              f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def rate(self, epoch: int, group: int = 0) -> float:
        """Group `group`'s learning rate after `epoch` steps."""
        raise NotImplementedError

    def step(self) -> None:
        self.last_epoch += 1
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = self.rate(self.last_epoch, i)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)


def _per_group(value: Any, optimizer: Optimizer, name: str, what: str) -> list[Any]:
    """One value per parameter group: a list (or tuple) of them, or one for every group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise GraphcError(f"{name}: expected {n} {what} (one per parameter group), got "
                              f"{len(value)}")
        return list(value)
    return [value] * n


class LambdaLR(LRScheduler):
    """lr = initial_lr * lr_lambda(epoch), one function or one per group."""

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float]
                 | Sequence[Callable[[int], float]], last_epoch: int = -1) -> None:
        self.lr_lambdas = _per_group(lr_lambda, optimizer, "LambdaLR", "lr_lambda functions")
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        return self.base_lrs[group] * self.lr_lambdas[group](epoch)


class StepLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        return self.base_lrs[group] * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """The rate times gamma at each milestone passed."""

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.milestones, self.gamma = sorted(milestones), gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        return self.base_lrs[group] * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class ExponentialLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        return self.base_lrs[group] * self.gamma ** epoch


class LinearLR(LRScheduler):
    """The rate's factor moves linearly from start_factor to end_factor over total_iters
    epochs, then stays (the usual warm-up: LinearLR(opt, start_factor=0.01, total_iters=k))."""

    def __init__(self, optimizer: Optimizer, start_factor: float = 1 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError("LinearLR: start_factor must be in (0, 1] and end_factor in [0, 1]")
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        progress = min(epoch, self.total_iters) / self.total_iters if self.total_iters else 1.0
        return self.base_lrs[group] * (self.start_factor
                                       + (self.end_factor - self.start_factor) * progress)


class CosineAnnealingLR(LRScheduler):
    """eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2; past T_max the
    cosine rises again, as PyTorch's does."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        cos = (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        return self.eta_min + (self.base_lrs[group] - self.eta_min) * cos


class OneCycleLR(LRScheduler):
    """The 1cycle policy, stepped once per batch: from max_lr / div_factor up to max_lr over
    pct_start of total_steps, then down to initial_lr / final_div_factor (three_phase: down to
    the initial rate first). Cycling the momentum is refused: momentum and betas are compiled
    into the step, only the rates are its inputs."""

    def __init__(self, optimizer: Optimizer, max_lr: float | Sequence[float],
                 total_steps: int | None = None, epochs: int | None = None,
                 steps_per_epoch: int | None = None, pct_start: float = 0.3,
                 anneal_strategy: str = "cos", cycle_momentum: bool = True,
                 base_momentum: float = 0.85, max_momentum: float = 0.95,
                 div_factor: float = 25.0, final_div_factor: float = 1e4,
                 three_phase: bool = False, last_epoch: int = -1) -> None:
        if cycle_momentum:
            raise GraphcError("OneCycleLR: cycle_momentum=True would change momentum/betas at "
                              "every step, but those are compiled into the training step (only "
                              "the learning rates are its inputs); pass cycle_momentum=False")
        if total_steps is None:
            if epochs is None or steps_per_epoch is None:
                raise ValueError("OneCycleLR: give total_steps, or epochs and steps_per_epoch")
            total_steps = epochs * steps_per_epoch
        if total_steps <= 0 or not 0 <= pct_start <= 1 or anneal_strategy not in ("cos", "linear"):
            raise ValueError("OneCycleLR: total_steps must be positive, pct_start in [0, 1] and "
                             "anneal_strategy 'cos' or 'linear'")
        self.total_steps = total_steps
        self.anneal = _cosine_anneal if anneal_strategy == "cos" else _linear_anneal
        up = float(pct_start * total_steps) - 1
        # (last step of the phase, its start and end as names of the group's rates)
        self.phases = ([(up, "initial_lr", "max_lr"), (2 * up, "max_lr", "initial_lr"),
                        (total_steps - 1, "initial_lr", "min_lr")] if three_phase else
                       [(up, "initial_lr", "max_lr"), (total_steps - 1, "max_lr", "min_lr")])
        if last_epoch == -1:
            for group, top in zip(optimizer.param_groups,
                                  _per_group(max_lr, optimizer, "OneCycleLR", "max_lr values")):
                group["initial_lr"] = top / div_factor
                group["max_lr"] = top
                group["min_lr"] = group["initial_lr"] / final_div_factor
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        if epoch > self.total_steps:
            raise GraphcError(f"OneCycleLR: stepped {epoch} times, past its total_steps "
                              f"({self.total_steps}); give it more steps")
        rates = self.optimizer.param_groups[group]
        start = 0.0
        for i, (end, begin_key, end_key) in enumerate(self.phases):
            if epoch <= end or i == len(self.phases) - 1:
                fraction = (epoch - start) / (end - start)
                return self.anneal(rates[begin_key], rates[end_key], fraction)
            start = end
        raise AssertionError("unreachable: the last phase always returns")


def _cosine_anneal(start: float, end: float, fraction: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * fraction) + 1)


def _linear_anneal(start: float, end: float, fraction: float) -> float:
    return (end - start) * fraction + start


class SequentialLR(LRScheduler):
    """`schedulers[i]` sets the rates from milestones[i-1] on, counting its epochs from there
    (warm-up then decay: SequentialLR(opt, [LinearLR(...), CosineAnnealingLR(...)], [k]))."""

    def __init__(self, optimizer: Optimizer, schedulers: Sequence[LRScheduler],
                 milestones: Sequence[int], last_epoch: int = -1) -> None:
        if len(schedulers) != len(milestones) + 1:
            raise ValueError(f"SequentialLR: {len(schedulers)} schedulers need "
                             f"{len(schedulers) - 1} milestones, got {len(milestones)}")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise GraphcError("SequentialLR: every scheduler must drive the same optimizer")
        self.schedulers, self.milestones = list(schedulers), list(milestones)
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch, group=0):
        index = bisect.bisect_right(self.milestones, epoch)
        start = self.milestones[index - 1] if index else 0
        return self.schedulers[index].rate(epoch - start, group)


__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "l1_penalty",
           "clip_by_global_norm", "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR",
           "ExponentialLR", "LinearLR", "CosineAnnealingLR", "OneCycleLR", "SequentialLR"]
