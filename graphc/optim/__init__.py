"""Optimizers as update rules emitted into the training-step graph (learning-rate schedules
are in graphc.optim.lr_scheduler, re-exported here).

An optimizer holds PyTorch's `param_groups`: a list of dicts, each with its "params" and its
own hyperparameters (lr, weight_decay, momentum, betas...), the optimizer's defaults filling
what a group leaves out. It declares its per-parameter state (zeros on the host) and writes
its update with traced tensors. It keeps that state and the step count, as torch.optim's
optimizers do: every training step compiled with it updates the same arrays, so a step
compiled anew (after a setting changed) goes on where the last one left off. Each group's
learning rate and the step count enter the compiled step as inputs, so a schedule changes the
rates without recompiling; the other hyperparameters are compiled in (a compiled step refuses
to run once one has changed).
Formulas follow PyTorch's documented ones. As in PyTorch, a rule that reads the step count (Adam's
bias correction, the first momentum step, Adagrad's rate decay) reads the parameter's own: where
it differs from the optimizer's (a parameter group added, or momentum set, after steps were
taken) the parameter's state holds it as a "step" slot, so the group starts from its own first
step. A parameter the loss does not read is not updated (its state neither), as PyTorch skips
one without a gradient, and from then on counts its own steps (a training step finding it
unused gives it the count it had), so that its count goes on only with its own updates.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

import numpy as np

from graphc.ir.errors import GraphcError

from ..functions import maximum, minimum, sqrt, where
from ..tensor import Tensor

Params = dict[str, Tensor]
State = dict[str, dict[str, Tensor]]
ParamsArg = Iterable[np.ndarray] | Iterable[dict[str, Any]]


def _implementation(name: str, differentiable: bool) -> None:
    """PyTorch's implementation choices (foreach, fused, capturable) change nothing here: the
    update is one compiled graph with the step. differentiable=True asks for gradients through
    the update itself, which a training step does not give."""
    if differentiable:
        raise GraphcError(f"{name}: differentiable=True (gradients through the optimizer's update) "
                          "is not supported; the compiled step applies the update without a graph "
                          "to differentiate")


# the rates a learning-rate schedule keeps in a parameter group besides "lr" (checkpoints save them)
SCHEDULE_KEYS = ("initial_lr", "max_lr", "min_lr")

# Hyperparameters PyTorch's optimizers refuse below 0 (NaN too)
_NONNEGATIVE = ("lr", "weight_decay", "momentum", "eps", "alpha", "lr_decay", "initial_accumulator_value")


def checked_rates(rates: Sequence[Any], owner: str, where: str) -> Sequence[Any]:
    """`rates` when each is a finite number >= 0; else an error naming the first bad one (a
    NaN rate would turn every weight NaN). `where` names a rate's place, formatted with its
    group's index."""
    for i, rate in enumerate(rates):
        number = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, (bool, np.bool_))
        if not number or not np.isfinite(rate) or rate < 0:
            raise GraphcError(f"{owner}: {where.format(i)} is {rate!r}; a learning rate is a finite "
                              "number >= 0")
    return rates


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
        # per parameter (by id: arrays are unhashable), its slots' arrays; and the steps taken
        self._state: dict[int, dict[str, np.ndarray]] = {}
        self.step_count = np.zeros((), np.float32)
        # how many times a parameter took a step count of its own: the training steps compiled
        # with this optimizer compile again to read it
        self.own_counts_version = 0
        # parameters with state that no group held when a step was last compiled: the count
        # each had then (it missed the steps taken since, as PyTorch's own count would)
        self._left_at: dict[int, np.ndarray] = {}

    # -- parameter groups ------------------------------------------------------------------
    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group as PyTorch does: {"params": [...], hyperparameter: value, ...}, the
        defaults filling the rest. A parameter may belong to one group only."""
        cls = type(self).__name__
        if not isinstance(group, dict) or "params" not in group:
            raise GraphcError(f"{cls}: a parameter group is a dict with a 'params' key, got "
                              f"{type(group).__name__}; pass either parameters or a list of "
                              "such dicts")
        # (the rates a schedule keeps in a group may come with it, as PyTorch allows)
        unknown = sorted(set(group) - {"params", *self.defaults, *SCHEDULE_KEYS})
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
        negative = [key for key in _NONNEGATIVE if key in full and not full[key] >= 0]
        if negative:
            raise ValueError(f"{cls}: parameter group {index}: {', '.join(negative)} must be >= 0, "
                             f"got {', '.join(str(full[key]) for key in negative)}")
        self._check_group(full, index)
        self.param_groups.append(full)

    def _check_group(self, group: dict[str, Any], index: int) -> None:
        """Subclasses refuse hyperparameter combinations that make no sense."""

    # PyTorch's eager loop, which a compiled training step is instead of
    def _not_eager(self, method: str) -> GraphcError:
        return GraphcError(f"{type(self).__name__}.{method}(): graphc's optimizers update the "
                           "weights inside a compiled training step (gc.compile_train_step(model, "
                           "loss_fn, optimizer, example_inputs), then step(x, y) per batch), so "
                           "there are no gradients to zero or apply by hand; save and load the "
                           "optimizer's state with graphc.train.save_checkpoint/load_checkpoint")

    def zero_grad(self, set_to_none: bool = True) -> None:
        raise self._not_eager("zero_grad")

    def step(self, closure: Any = None) -> None:
        raise self._not_eager("step")

    def state_dict(self) -> dict[str, Any]:
        raise self._not_eager("state_dict")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise self._not_eager("load_state_dict")

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
        rates = checked_rates([group["lr"] for group in self.param_groups], type(self).__name__,
                              "param_groups[{}]['lr']")
        return [to_dtype(rate) for rate in rates]

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

    def counts_steps(self, group: dict[str, Any]) -> bool:
        """Whether the rule of a parameter in `group` reads its step count (PyTorch's
        state["step"])."""
        return False

    def init_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """Fresh state for `param`: each slot its group needs, zeros."""
        return {name: np.zeros_like(param) for name in self.slots(self._group_of(param))}

    def state_of(self, param: np.ndarray) -> dict[str, np.ndarray]:
        """The state this optimizer keeps for `param`, shared by the training steps compiled
        with it; slots its group needs now and did not before (momentum set since) start
        fresh. Fresh slots after steps were taken count the parameter's own steps from 0."""
        state = self._state.setdefault(id(param), {})
        fresh = self.init_state(param)
        new = fresh.keys() - state.keys()
        # a parameter given state only now (its group added late) starts its count; so does one
        # whose rule starts over with a new slot (SGD's momentum buffer); Adam's max_exp_avg_sq
        # (amsgrad set late) goes on from the moments' count; one back in a group after steps
        # without it goes on from the count it had when it left
        left_at = self._left_at.pop(id(param), None)
        if new and self.step_count > 0 and (not state or self.restarts_count(new)):
            self.count_own_steps(param)
        elif left_at is not None and "step" not in state and left_at != self.step_count:
            self.count_own_steps(param, left_at)
        for name, array in fresh.items():
            state.setdefault(name, array)
        return state

    def absent_parameters(self) -> set[int]:
        """The ids of the parameters with state that no group holds now (a group removed to
        freeze them)."""
        present = {id(p) for group in self.param_groups for p in group["params"]}
        return {key for key in self._state if key not in present}

    def note_absent_parameters(self) -> None:
        """Mark the absent parameters (`absent_parameters`): their count stops here, for when a
        group brings them back (`state_of`). Called as a step is compiled, the only time the
        groups take effect."""
        for key in self.absent_parameters():
            if "step" not in self._state[key]:
                self._left_at.setdefault(key, self.step_count.copy())

    def restarts_count(self, new_slots: set[str]) -> bool:
        """Whether a parameter's rule counts its steps from the first again once it keeps
        `new_slots` (state it did not keep before)."""
        return False

    def keeps_own_steps(self, param: np.ndarray) -> bool:
        """Whether `param` can count steps of its own: its rule reads a step count."""
        return self.counts_steps(self._group_of(param))

    def count_own_steps(self, param: np.ndarray, start: Any = 0) -> None:
        """Give `param` a step count of its own ("step" slot, from `start`), where its rule
        reads one: its updates no longer read the optimizer's count."""
        if self.keeps_own_steps(param):
            self._state.setdefault(id(param), {})["step"] = np.array(start, np.float32)
            self.own_counts_version += 1

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor,
             group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def update(self, params: Params, grads: Params, state: State, lrs: Sequence[Tensor],
               step: Tensor, unused: frozenset[str] = frozenset()) -> tuple[Params, State]:
        """Apply `rule` to every parameter, `params` being in the order of `self.params` and
        `lrs` one rate per group; `step` counts from 1 at the first update (a parameter with a
        "step" slot counts its own). The rule sees its group's rate and the step in the
        parameter's dtype (the graph never mixes float widths). Parameters named in `unused`,
        which the loss does not read, keep their values and state."""
        group_index = [i for i, group in enumerate(self.param_groups) for _ in group["params"]]
        if len(group_index) != len(params) or len(lrs) != len(self.param_groups):
            raise GraphcError(f"{type(self).__name__}: update got {len(params)} parameters and "
                              f"{len(lrs)} rates for {len(group_index)} parameters in "
                              f"{len(self.param_groups)} groups")
        new_params, new_state = {}, {}
        for (name, p), i in zip(params.items(), group_index):
            if name in unused:
                new_params[name], new_state[name] = p, dict(state[name])
            else:
                new_params[name], new_state[name] = self.update_parameter(
                    p, grads[name], state[name], lrs[i], step, self.param_groups[i])
        return new_params, new_state

    def update_parameter(self, p: Tensor, g: Tensor, slots: dict[str, Tensor], lr: Tensor,
                         step: Tensor, group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """`rule` for one parameter of `group`: its new value and slots, given the step count
        (its own where it keeps one) and the rate in its dtype."""
        own_step = slots["step"] + 1 if "step" in slots else step
        if group.get("maximize"):  # ascent: the rule (weight decay too) sees -g, as PyTorch's
            g = -g
        new_p, new_slots = self.rule(p, g, slots, _in_dtype(lr, p.dtype), _in_dtype(own_step, p.dtype),
                                     group)
        if "step" in slots:
            new_slots = {**new_slots, "step": own_step}
        return new_p, new_slots


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _decayed(p: Tensor, g: Tensor, group: dict[str, Any]) -> Tensor:
    """L2 regularisation folded into the gradient (PyTorch's weight_decay)."""
    return g + p * group["weight_decay"] if group["weight_decay"] else g


class SGD(Optimizer):
    def __init__(self, params: ParamsArg, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        _implementation(type(self).__name__, differentiable)
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov, maximize=maximize))

    def _check_group(self, group, index):
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(f"SGD: parameter group {index}: Nesterov momentum needs momentum > 0 "
                             "and zero dampening")

    def slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",) if group["momentum"] else ()

    def counts_steps(self, group: dict[str, Any]) -> bool:
        return bool(group["momentum"])  # the buffer's first step

    def restarts_count(self, new_slots: set[str]) -> bool:
        return "momentum_buffer" in new_slots  # momentum set late: the buffer starts at g

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor,
             group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
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
    """PyTorch's Adam; with `amsgrad`, the denominator divides by the largest second moment so
    far (state "max_exp_avg_sq")."""

    decoupled = False

    def __init__(self, params: ParamsArg, lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        _implementation(type(self).__name__, differentiable)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=bool(amsgrad), maximize=maximize))

    def _check_group(self, group, index):
        betas = tuple(map(float, group["betas"]))
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"{type(self).__name__}: parameter group {index}: betas must be two "
                             f"numbers in [0, 1), got {group['betas']}")
        group["betas"] = betas

    def slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if group["amsgrad"] else ("exp_avg", "exp_avg_sq")

    def counts_steps(self, group: dict[str, Any]) -> bool:
        return True  # the bias corrections

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor,
             group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        beta1, beta2 = group["betas"]
        weight_decay = group["weight_decay"]
        if self.decoupled:
            p = p * (1 - lr * weight_decay) if weight_decay else p
        else:
            g = _decayed(p, g, group)
        m = state["exp_avg"] * beta1 + g * (1 - beta1)
        # (g (1 - beta2)) g, PyTorch's order: g² alone overflows float32 from |g| ~ 1.8e19
        v = state["exp_avg_sq"] * beta2 + g * (1 - beta2) * g
        # The corrections in float64, as PyTorch computes them (Python floats): in float32,
        # with beta2 = 0.99999 rounded, 1 - beta2 ** step was 7e-4 off, and so every update.
        step = step.astype("float64")
        correction1 = 1 - beta1 ** step
        correction2 = 1 - beta2 ** step
        step_size = (lr.astype("float64") / correction1).astype(p.dtype)
        moments = {"exp_avg": m, "exp_avg_sq": v}
        if group["amsgrad"]:
            v = moments["max_exp_avg_sq"] = maximum(state["max_exp_avg_sq"], v)
        denom = sqrt(v) / sqrt(correction2).astype(p.dtype) + group["eps"]
        return p - step_size * m / denom, moments


class AdamW(Adam):
    """Adam with decoupled weight decay: p <- p * (1 - lr * weight_decay) before the update."""

    decoupled = True

    def __init__(self, params: ParamsArg, lr: float = 1e-3,
                 betas: Sequence[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         differentiable=differentiable)


class Adagrad(Optimizer):
    def __init__(self, params: ParamsArg, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        _implementation(type(self).__name__, differentiable)
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value, eps=eps,
                                      maximize=maximize))

    def init_state(self, param: np.ndarray) -> dict[str, np.ndarray]:
        # The group's own value (PyTorch's Adagrad reads only the optimizer's default).
        return {"sum": np.full_like(param, self._group_of(param)["initial_accumulator_value"])}

    def slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("sum",)

    def counts_steps(self, group: dict[str, Any]) -> bool:
        return bool(group["lr_decay"])

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor,
             group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        g = _decayed(p, g, group)
        clr = lr / ((step - 1) * group["lr_decay"] + 1)
        total = state["sum"] + g.square()
        return p - clr * g / (sqrt(total) + group["eps"]), {"sum": total}


class RMSprop(Optimizer):
    def __init__(self, params: ParamsArg, lr: float = 1e-2, alpha: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False, *, maximize: bool = False, foreach: bool | None = None, fused: bool | None = None,
                 capturable: bool = False, differentiable: bool = False) -> None:
        _implementation(type(self).__name__, differentiable)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize))

    def slots(self, group: dict[str, Any]) -> tuple[str, ...]:
        return ("square_avg",) + (("momentum_buffer",) if group["momentum"] else ()) + (
            ("grad_avg",) if group["centered"] else ())

    def rule(self, p: Tensor, g: Tensor, state: dict[str, Tensor], lr: Tensor, step: Tensor,
             group: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        g = _decayed(p, g, group)
        alpha, eps = group["alpha"], group["eps"]
        new = {"square_avg": state["square_avg"] * alpha + g * (1 - alpha) * g}  # as Adam's
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
    if not terms:
        raise GraphcError("l1_penalty: no parameters given (pass the traced parameters to penalise)")
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total * weight


def clip_by_global_norm(grads: Params, max_norm: float) -> Params:
    """Scale all gradients by min(1, max_norm / (global L2 norm + 1e-6)), as torch's clip_grad_norm_."""
    if not grads:
        return {}
    squares = [g.square().sum() for g in grads.values()]
    total = squares[0]
    for s in squares[1:]:
        total = total + s
    scale = minimum(max_norm / (sqrt(total) + 1e-6), 1.0)
    return {name: g * scale for name, g in grads.items()}


# Last: the schedulers' module imports Optimizer from this one.
from .lr_scheduler import (ChainedScheduler, ConstantLR, CosineAnnealingLR,  # noqa: E402
                           CosineAnnealingWarmRestarts, CyclicLR, ExponentialLR, LambdaLR, LinearLR,
                           LRScheduler, MultiplicativeLR, MultiStepLR, OneCycleLR, PolynomialLR,
                           ReduceLROnPlateau, SequentialLR, StepLR)

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "l1_penalty",
           "clip_by_global_norm", "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR",
           "ExponentialLR", "LinearLR", "CosineAnnealingLR", "OneCycleLR", "SequentialLR",
           "ReduceLROnPlateau", "CosineAnnealingWarmRestarts", "ConstantLR", "PolynomialLR",
           "MultiplicativeLR", "ChainedScheduler", "CyclicLR"]
