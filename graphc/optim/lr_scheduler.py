"""Learning-rate schedules, as PyTorch's torch.optim.lr_scheduler (all re-exported from
graphc.optim).

Host side: a scheduler sets each group's "lr", which the compiled step reads as an input at
every call. Each rate is computed in closed form from the group's initial rate and the epoch
count, which equals PyTorch's chained updates (up to rounding) when nothing else sets the rates.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Iterable, Sequence

from graphc.ir.errors import GraphcError

from . import Optimizer


# the rates a schedule keeps in a parameter group besides "lr" (checkpoints save them)
SCHEDULE_KEYS = ("initial_lr", "max_lr", "min_lr")


class LRScheduler:
    """PyTorch's protocol: construction sets the epoch-0 rates, each `step()` advances one
    epoch (or one batch, as the schedule is meant), `get_last_lr()` returns the rates set.
    `schedule_keys`: the rates it keeps in each parameter group (checkpoints save them)."""

    schedule_keys: tuple[str, ...] = ("initial_lr",)

    def __init__(self, optimizer: Optimizer, last_epoch: int = -1) -> None:
        if not isinstance(optimizer, Optimizer):
            raise GraphcError(f"{type(self).__name__}: expected a graphc optimizer, got "
                              f"{type(optimizer).__name__}")
        self.optimizer = optimizer
        for i, group in enumerate(optimizer.param_groups):
            if last_epoch == -1:
                group.setdefault("initial_lr", group["lr"])
            elif any(key not in group for key in self.schedule_keys):
                # resuming: the schedule's rates are the group's
                missing = [key for key in self.schedule_keys if key not in group]
                raise GraphcError(
                    f"{type(self).__name__}(last_epoch={last_epoch}): parameter group {i} has no "
                    f"{' or '.join(map(repr, missing))} to resume the schedule from (PyTorch "
                    "raises too): load the checkpoint saved with the schedule running "
                    "(graphc.train.load_checkpoint restores them) before building the "
                    f"scheduler, or set them in param_groups[{i}]")
        self.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
        self.last_epoch = last_epoch
        self.step()

    def rate(self, epoch: int, group: int = 0) -> float:
        """Group `group`'s learning rate after `epoch` steps."""
        raise NotImplementedError

    def step(self) -> None:
        if len(self.optimizer.param_groups) != len(self.base_lrs):
            raise GraphcError(
                f"{type(self).__name__}: the optimizer has {len(self.optimizer.param_groups)} "
                f"parameter groups, {len(self.base_lrs)} when the scheduler was built "
                "(add_param_group since); build a new scheduler for them all, with last_epoch="
                f"{self.last_epoch} to go on, after giving the new groups 'initial_lr'")
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

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * self.lr_lambdas[group](epoch)


class StepLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """The rate times gamma at each milestone passed."""

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.milestones, self.gamma = sorted(milestones), gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class ExponentialLR(LRScheduler):
    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
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

    def rate(self, epoch: int, group: int = 0) -> float:
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

    def rate(self, epoch: int, group: int = 0) -> float:
        cos = (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        return self.eta_min + (self.base_lrs[group] - self.eta_min) * cos


class CosineAnnealingWarmRestarts(LRScheduler):
    """SGDR: a cosine from initial_lr down to eta_min over T_0 epochs, then again from the top,
    each period T_mult times the last."""

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        if type(T_0) is not int or T_0 <= 0 or type(T_mult) is not int or T_mult < 1:
            raise ValueError(f"CosineAnnealingWarmRestarts: T_0 must be an int > 0 and T_mult an "
                             f"int >= 1, got T_0={T_0!r}, T_mult={T_mult!r}")
        self.T_0, self.T_mult, self.eta_min = T_0, T_mult, eta_min
        self._position: float = last_epoch  # the epoch, fraction included, of the rates set
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: float | None = None) -> None:
        """One epoch on, or to `epoch`, which may fall between epochs as PyTorch's allows
        (`scheduler.step(epoch + batch / batches)` each batch); a plain step() after step(2.5)
        goes on to 3.5. last_epoch is the whole epochs, as PyTorch's."""
        position = self._position + 1 if epoch is None else epoch
        if not 0 <= position < math.inf:
            raise ValueError(f"CosineAnnealingWarmRestarts: epoch must be >= 0, got {epoch!r}")
        self.last_epoch = position - 1  # super().step() adds the one
        super().step()
        self._position, self.last_epoch = position, math.floor(position)

    def rate(self, epoch: float, group: int = 0) -> float:
        # the period `epoch` falls in, counted exactly (a logarithm put epoch 121 of T_0=1,
        # T_mult=3 at the end of a period, not at its restart)
        period, into = self.T_0, epoch % self.T_0 if self.T_mult == 1 else epoch
        while into >= period:
            into -= period
            period *= self.T_mult
        cos = (1 + math.cos(math.pi * into / period)) / 2
        return self.eta_min + (self.base_lrs[group] - self.eta_min) * cos


class ConstantLR(LRScheduler):
    """The rate times `factor` for the first total_iters epochs, then the initial rate."""

    def __init__(self, optimizer: Optimizer, factor: float = 1 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        if not 0 <= factor <= 1:
            raise ValueError(f"ConstantLR: factor must be in [0, 1], got {factor}")
        self.factor, self.total_iters = factor, total_iters
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * (self.factor if epoch < self.total_iters else 1.0)


class PolynomialLR(LRScheduler):
    """The rate times (1 - epoch / total_iters) ** power, 0 from total_iters on."""

    def __init__(self, optimizer: Optimizer, total_iters: int = 5, power: float = 1.0,
                 last_epoch: int = -1) -> None:
        if type(total_iters) is not int or total_iters <= 0:
            raise ValueError(f"PolynomialLR: total_iters must be an int > 0, got {total_iters!r}")
        self.total_iters, self.power = total_iters, power
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * (1 - min(epoch, self.total_iters) / self.total_iters) ** self.power


class MultiplicativeLR(LRScheduler):
    """The rate times lr_lambda(epoch) at each step (one function or one per group): after k
    steps, initial_lr times the product of lr_lambda(1) ... lr_lambda(k)."""

    def __init__(self, optimizer: Optimizer, lr_lambda: Callable[[int], float]
                 | Sequence[Callable[[int], float]], last_epoch: int = -1) -> None:
        self.lr_lambdas = _per_group(lr_lambda, optimizer, "MultiplicativeLR", "lr_lambda functions")
        self._products: list[list[float]] = [[1.0] for _ in self.lr_lambdas]  # after 0, 1, ... steps
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        products = self._products[group]
        while len(products) <= epoch:  # each factor once, however often the rates are asked
            products.append(products[-1] * self.lr_lambdas[group](len(products)))
        return self.base_lrs[group] * products[epoch]


class OneCycleLR(LRScheduler):
    """The 1cycle policy, stepped once per batch: from max_lr / div_factor up to max_lr over
    pct_start of total_steps, then down to initial_lr / final_div_factor (three_phase: down to
    the initial rate first). Cycling the momentum is refused: momentum and betas are compiled
    into the step, only the rates are its inputs."""

    schedule_keys = ("initial_lr", "max_lr", "min_lr")

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

    def rate(self, epoch: int, group: int = 0) -> float:
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

    def rate(self, epoch: int, group: int = 0) -> float:
        index = bisect.bisect_right(self.milestones, epoch)
        start = self.milestones[index - 1] if index else 0
        return self.schedulers[index].rate(epoch - start, group)


class ReduceLROnPlateau:
    """PyTorch's: multiply each group's rate by `factor` (not below its `min_lr`) once the
    metric given to `step(metric)` has not improved for more than `patience` epochs, then wait
    `cooldown` epochs before counting again. Improvement is by `threshold`, relative to the best
    (`threshold_mode` "rel") or absolute ("abs"), downwards (`mode` "min") or upwards ("max");
    a rate changes only by more than `eps`. graphc.train.fit steps it with the epoch's
    `monitor` log ("val_loss" where it validates, else "loss", by default)."""

    def __init__(self, optimizer: Optimizer, mode: str = "min", factor: float = 0.1,
                 patience: int = 10, threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float | Sequence[float] = 0.0, eps: float = 1e-8,
                 monitor: str | None = None) -> None:
        if not isinstance(optimizer, Optimizer):
            raise GraphcError(f"ReduceLROnPlateau: expected a graphc optimizer, got "
                              f"{type(optimizer).__name__}")
        if not factor < 1.0:
            raise ValueError(f"ReduceLROnPlateau: factor must be below 1, got {factor}")
        if mode not in ("min", "max") or threshold_mode not in ("rel", "abs"):
            raise ValueError(f"ReduceLROnPlateau: mode must be 'min' or 'max' and threshold_mode "
                             f"'rel' or 'abs', got {mode!r} and {threshold_mode!r}")
        self.optimizer, self.mode, self.factor, self.patience = optimizer, mode, factor, patience
        self.threshold, self.threshold_mode, self.cooldown, self.eps = threshold, threshold_mode, cooldown, eps
        self.min_lrs = _per_group(min_lr, optimizer, "ReduceLROnPlateau", "min_lr values")
        self.monitor = monitor
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs = self.cooldown_counter = self.last_epoch = 0
        self._last_lr = [group["lr"] for group in optimizer.param_groups]

    def improves(self, value: float) -> bool:
        """Whether `value` beats the best so far by the threshold, as PyTorch compares (a
        relative threshold scales the best as it is, sign and all; a NaN never beats it)."""
        if self.mode == "min":
            return value < (self.best * (1 - self.threshold) if self.threshold_mode == "rel"
                            else self.best - self.threshold)
        return value > (self.best * (1 + self.threshold) if self.threshold_mode == "rel"
                        else self.best + self.threshold)

    def step(self, metric: float) -> None:
        value = float(metric)
        self.last_epoch += 1
        if self.improves(value):
            self.best, self.num_bad_epochs = value, 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0  # epochs in cooldown do not count
        if self.num_bad_epochs > self.patience:
            for group, floor in zip(self.optimizer.param_groups, self.min_lrs):
                new = max(group["lr"] * self.factor, floor)
                if group["lr"] - new > self.eps:
                    group["lr"] = new
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)


__all__ = ["SCHEDULE_KEYS", "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR",
           "CosineAnnealingLR", "OneCycleLR", "SequentialLR", "ReduceLROnPlateau"]
