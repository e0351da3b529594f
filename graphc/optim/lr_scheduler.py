"""Learning-rate schedules, as PyTorch's torch.optim.lr_scheduler (all re-exported from
graphc.optim).

Host side: a scheduler sets each group's "lr", which the compiled step reads as an input at
every call. Each rate is computed in closed form from the group's initial rate and the epoch
count, which equals PyTorch's chained updates (up to rounding) when nothing else sets the rates.
Where something else did (another scheduler stepped beside it, ReduceLROnPlateau, a rate set by
hand), the schedules PyTorch computes from the current rate carry that change on, as PyTorch's
do (a SequentialLR does within such a stage, from its milestone on); the others (LambdaLR,
OneCycleLR, CyclicLR, CosineAnnealingWarmRestarts) set their own rate over it, as PyTorch's do
too.
"""
from __future__ import annotations

import bisect
import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from graphc.ir.errors import GraphcError

from . import SCHEDULE_KEYS, Optimizer


def _count(name: str, value: Any, least: int = 1) -> int:
    """`value`, an int >= least, or a ValueError naming the setting."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return int(value)


class _SavedState:
    """state_dict() / load_state_dict(), as PyTorch's schedulers have them."""

    def state_dict(self) -> dict[str, Any]:
        """The schedule's state, as PyTorch's: its attributes but the optimizer and functions
        (a SequentialLR's schedulers as their own state dicts)."""
        state = {key: value for key, value in vars(self).items()
                 if key not in ("optimizer", "schedulers") and not callable(value)
                 and not (isinstance(value, list) and any(callable(v) for v in value))}
        if "schedulers" in vars(self):
            state["_schedulers"] = [s.state_dict() for s in self.schedulers]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned (of a scheduler of this class and optimizer)."""
        if not isinstance(state_dict, dict):
            raise GraphcError(f"{type(self).__name__}.load_state_dict: expected the dict "
                              f"state_dict() returned, got {type(state_dict).__name__}")
        unknown = sorted(set(state_dict) - set(self.state_dict()))
        if unknown:
            raise GraphcError(f"{type(self).__name__}.load_state_dict: unknown entries {unknown} "
                              "(a state dict of another kind of scheduler?)")
        state = dict(state_dict)
        inner = state.pop("_schedulers", [])
        if len(inner) != len(getattr(self, "schedulers", ())):
            raise GraphcError(f"{type(self).__name__}.load_state_dict: the state holds {len(inner)} "
                              f"schedulers, this one {len(self.schedulers)}")
        for scheduler, saved in zip(getattr(self, "schedulers", ()), inner):
            scheduler.load_state_dict(saved)
        self.__dict__.update(state)


class LRScheduler(_SavedState):
    """PyTorch's protocol: construction sets the epoch-0 rates, each `step()` advances one
    epoch (or one batch, as the schedule is meant), `get_last_lr()` returns the rates set,
    `state_dict()` / `load_state_dict()` save and restore the count. A schedule defines
    `rate(epoch, group)`, its closed form; a subclass written for PyTorch, overriding
    `get_lr()` (the rates at `self.last_epoch`), works too.
    `schedule_keys`: the rates it keeps in each parameter group (checkpoints save them).
    `keeps_rate_on_resume`: built to resume (last_epoch >= 0), it keeps the group's rate for
    the epoch it resumes in, as PyTorch's chained form of the schedule does, where others
    (StepLR, LambdaLR...) set the next epoch's."""

    schedule_keys: tuple[str, ...] = ("initial_lr",)
    keeps_rate_on_resume = False
    # Each step multiplies the rate by a factor of the epoch alone, whatever the rate was (so
    # chained with others, as ChainedScheduler does, the factors multiply as in PyTorch's chain)
    multiplicative = False
    # PyTorch computes the rate from the group's current one: a change something else made
    # carries on (see `_carried`)
    chainable = False

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
        # PyTorch counts one epoch more than the rates it then sets
        self._behind = 1 if last_epoch != -1 and self.keeps_rate_on_resume else 0
        # per group, whether the rates set are the closed form's (nothing else changed them)
        self._exact = [True] * len(optimizer.param_groups)
        self.step()

    def rate(self, epoch: int, group: int = 0) -> float:
        """Group `group`'s learning rate after `epoch` steps."""
        raise NotImplementedError(
            f"{type(self).__name__}: a schedule defines rate(epoch, group), group's learning rate "
            "after epoch steps (or, as for PyTorch, get_lr(): every group's rate at self.last_epoch)")

    def get_lr(self) -> list[float]:
        """Every group's rate at `last_epoch`."""
        return [self.rate(self.last_epoch - self._behind, i) for i in range(len(self.optimizer.param_groups))]

    def rate_at(self, epoch: int, group: int) -> float:
        """rate(epoch, group), through a subclass's own get_lr() where it has one (a schedule
        written for PyTorch, inside a SequentialLR or ChainedScheduler)."""
        if type(self).get_lr is LRScheduler.get_lr:
            return self.rate(epoch, group)
        saved, self.last_epoch = self.last_epoch, epoch + self._behind
        try:
            return self.get_lr()[group]
        finally:
            self.last_epoch = saved

    def step(self) -> None:
        if len(self.optimizer.param_groups) != len(self.base_lrs):
            raise GraphcError(
                f"{type(self).__name__}: the optimizer has {len(self.optimizer.param_groups)} "
                f"parameter groups, {len(self.base_lrs)} when the scheduler was built "
                "(add_param_group since); build a new scheduler for them all, with last_epoch="
                f"{self.last_epoch} to go on, after giving the new groups 'initial_lr'")
        self.last_epoch += 1
        for i, (group, lr) in enumerate(zip(self.optimizer.param_groups, self.get_lr())):
            group["lr"] = self._carried(i, group["lr"], lr)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _carried(self, group: int, current: float, rate: float) -> float:
        """`rate`, the schedule's own, while nothing else has changed the rate this schedule set
        last; once something has (another scheduler, ReduceLROnPlateau, a hand), each step
        takes the group's current rate on as PyTorch's chainable step does: its distance from
        the floor (the cosine's eta_min) times the schedule's own step factor, or where the own
        rate left the floor, plus its own step (the cosine's restart, a finished polynomial's
        zero step keeping a rate set by hand)."""
        if not self.chainable:
            return rate
        last = getattr(self, "_last_lr", None)
        if last is None:  # built, from the rate the group has now (another schedule's, perhaps)
            if self.last_epoch != 0:
                return rate  # resumed: the rate the checkpoint holds is the schedule's
            previous = self.initial_reference(group, rate)
            if current == previous and self._exact[group]:
                return rate
        else:
            if current == last[group] and self._exact[group]:
                return rate
            previous = self.rate_at(self.last_epoch - 1 - self._behind, group)
        self._exact[group] = False
        floor = self.carry_floor()
        if previous == floor:
            return current + (rate - previous)
        return floor + (current - floor) * (rate - floor) / (previous - floor)

    def initial_reference(self, group: int, rate: float) -> float:
        """The rate built on, as PyTorch's first step multiplies the group's current rate by the
        schedule's first factor: the initial rate (ChainedScheduler: its own first rate, its
        schedules having set it)."""
        return self.base_lrs[group]

    def carry_floor(self) -> float:
        return 0.0

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def replay_to(self, epoch: int) -> None:
        """Put the schedule at `epoch`, stepped there from its start at each group's initial
        rate with no change carried: where a run resumed after `epoch` (fit's initial_epoch)
        puts a scheduler built afresh, whatever rate a checkpoint restored meanwhile."""
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base
        self.last_epoch, self._behind, self._last_lr = -1, 0, None
        self._exact = [True] * len(self.optimizer.param_groups)
        while self.last_epoch < epoch:
            self.step()


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
    multiplicative = chainable = True

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.step_size, self.gamma = _count("StepLR: step_size", step_size), gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * self.gamma ** (epoch // self.step_size)


class MultiStepLR(LRScheduler):
    """The rate times gamma at each milestone passed."""

    multiplicative = chainable = True

    def __init__(self, optimizer: Optimizer, milestones: Iterable[int], gamma: float = 0.1,
                 last_epoch: int = -1) -> None:
        self.milestones = sorted(_count("MultiStepLR: each milestone", m, 0) for m in milestones)
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * self.gamma ** bisect.bisect_right(self.milestones, epoch)


class ExponentialLR(LRScheduler):
    keeps_rate_on_resume = True
    multiplicative = chainable = True

    def __init__(self, optimizer: Optimizer, gamma: float, last_epoch: int = -1) -> None:
        self.gamma = gamma
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * self.gamma ** epoch


class LinearLR(LRScheduler):
    """The rate's factor moves linearly from start_factor to end_factor over total_iters
    epochs, then stays (the usual warm-up: LinearLR(opt, start_factor=0.01, total_iters=k))."""

    keeps_rate_on_resume = True
    multiplicative = chainable = True

    def __init__(self, optimizer: Optimizer, start_factor: float = 1 / 3, end_factor: float = 1.0,
                 total_iters: int = 5, last_epoch: int = -1) -> None:
        if not 0 < start_factor <= 1 or not 0 <= end_factor <= 1:
            raise ValueError("LinearLR: start_factor must be in (0, 1] and end_factor in [0, 1]")
        self.start_factor, self.end_factor = start_factor, end_factor
        self.total_iters = _count("LinearLR: total_iters", total_iters, 0)
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        progress = min(epoch, self.total_iters) / self.total_iters if self.total_iters else 1.0
        return self.base_lrs[group] * (self.start_factor
                                       + (self.end_factor - self.start_factor) * progress)


class CosineAnnealingLR(LRScheduler):
    """eta_min + (initial_lr - eta_min) * (1 + cos(pi * epoch / T_max)) / 2; past T_max the
    cosine rises again, as PyTorch's does."""

    keeps_rate_on_resume = True
    chainable = True

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0,
                 last_epoch: int = -1) -> None:
        if isinstance(T_max, bool) or not isinstance(T_max, (int, float, np.integer, np.floating)) \
                or not 0 < T_max < math.inf:
            raise ValueError(f"CosineAnnealingLR: T_max must be a number of epochs > 0, got {T_max!r}")
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        cos = (1 + math.cos(math.pi * epoch / self.T_max)) / 2
        return self.eta_min + (self.base_lrs[group] - self.eta_min) * cos

    def carry_floor(self) -> float:
        return self.eta_min


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

    def replay_to(self, epoch: int) -> None:
        self._position = -1
        super().replay_to(epoch)

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

    multiplicative = chainable = True

    def __init__(self, optimizer: Optimizer, factor: float = 1 / 3, total_iters: int = 5,
                 last_epoch: int = -1) -> None:
        if not 0 <= factor <= 1:
            raise ValueError(f"ConstantLR: factor must be in [0, 1], got {factor}")
        self.factor, self.total_iters = factor, _count("ConstantLR: total_iters", total_iters, 0)
        super().__init__(optimizer, last_epoch)

    def rate(self, epoch: int, group: int = 0) -> float:
        return self.base_lrs[group] * (self.factor if epoch < self.total_iters else 1.0)


class PolynomialLR(LRScheduler):
    """The rate times (1 - epoch / total_iters) ** power, 0 from total_iters on."""

    keeps_rate_on_resume = True
    multiplicative = chainable = True

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
    steps, initial_lr times the product of lr_lambda(1) ... lr_lambda(k). As a later stage of a
    SequentialLR, it goes on from the rate the stage before left, as PyTorch's."""

    keeps_rate_on_resume = True
    multiplicative = chainable = True

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

    def continued(self, rate: float, epoch: int, group: int = 0) -> float:
        """The rate `epoch` steps after a SequentialLR handed over at `rate`: PyTorch steps the
        stage with epoch 0 there, which applies lr_lambda(0) too."""
        self.rate(epoch, group)  # the products up to `epoch`
        return rate * self.lr_lambdas[group](0) * self._products[group][epoch]


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
        total_steps = _count("OneCycleLR: total_steps (epochs * steps_per_epoch)", total_steps)
        if not 0 <= pct_start <= 1 or anneal_strategy not in ("cos", "linear"):
            raise ValueError("OneCycleLR: pct_start must be in [0, 1] and anneal_strategy 'cos' or "
                             f"'linear', got {pct_start!r} and {anneal_strategy!r}")
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
        for i, scheduler in enumerate(schedulers):
            if not isinstance(scheduler, LRScheduler):
                raise ValueError(f"SequentialLR: schedulers[{i}] is a {type(scheduler).__name__}, "
                                 "which sets rates from a metric, not from the epoch; step it "
                                 "on its own")
        if any(s.optimizer is not optimizer for s in schedulers):
            raise GraphcError("SequentialLR: every scheduler must drive the same optimizer")
        self.schedulers = list(schedulers)
        self.milestones = [_count("SequentialLR: each milestone", m, 0) for m in milestones]
        super().__init__(optimizer, last_epoch)

    def step(self) -> None:
        # As PyTorch's, which steps the stage of the epoch: a chainable stage carries on a change
        # something else made to the rate (a plateau's cut, a hand), and a stage starts afresh
        # at its milestone (PyTorch's step(0) there), the first at epoch 0 (PyTorch's
        # constructor resets the rates the stages' constructors set).
        epoch = self.last_epoch + 1
        index = bisect.bisect_right(self.milestones, epoch)
        stage = self.schedulers[index]
        # (a MultiplicativeLR stage goes on from the rate it is handed, as PyTorch's)
        starts = epoch == 0 or (index and epoch == self.milestones[index - 1]
                                and not isinstance(stage, MultiplicativeLR))
        self.chainable = stage.chainable and not starts
        if starts:
            self._exact = [True] * len(self.optimizer.param_groups)
        super().step()

    def rate(self, epoch: int, group: int = 0) -> float:
        index = bisect.bisect_right(self.milestones, epoch)
        start = self.milestones[index - 1] if index else 0
        stage = self.schedulers[index]
        if index and isinstance(stage, MultiplicativeLR):
            return stage.continued(self.rate(start - 1, group), epoch - start, group)
        return stage.rate_at(epoch - start, group)


class ChainedScheduler(LRScheduler):
    """Several schedules at once, each step stepping them all, as PyTorch's: the rate is the
    initial rate times every schedule's factor (rate / initial rate) at the epoch. That is
    PyTorch's chain for the schedules whose steps multiply the rate by a factor of the epoch
    (StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR, PolynomialLR, MultiplicativeLR);
    others (a cosine, a lambda, one cycle) would chain otherwise, and are refused."""

    def __init__(self, schedulers: Sequence[LRScheduler], optimizer: Optimizer | None = None) -> None:
        schedulers = list(schedulers)
        if not schedulers:
            raise ValueError("ChainedScheduler: expected at least one scheduler")
        optimizer = optimizer if optimizer is not None else schedulers[0].optimizer
        for i, scheduler in enumerate(schedulers):
            # (one schedule alone chains with nothing; a get_lr() of its own may set any rate)
            factor = (getattr(scheduler, "multiplicative", False)
                      and type(scheduler).get_lr is LRScheduler.get_lr)
            if len(schedulers) > 1 and not factor:
                raise ValueError(f"ChainedScheduler: schedulers[{i}] is a {type(scheduler).__name__}, "
                                 "whose rate is not a factor of the epoch times the rate before; "
                                 "chain StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR, "
                                 "PolynomialLR or MultiplicativeLR, or use SequentialLR")
            if scheduler.optimizer is not optimizer:
                raise ValueError("ChainedScheduler: every scheduler must drive the same optimizer")
        self.schedulers = schedulers
        self.chainable = all(s.chainable for s in schedulers)  # as its schedules step in PyTorch
        super().__init__(optimizer, schedulers[0].last_epoch - 1)

    def initial_reference(self, group: int, rate: float) -> float:
        return rate

    def rate(self, epoch: int, group: int = 0) -> float:
        rate = self.base_lrs[group]
        for scheduler in self.schedulers:
            base = scheduler.base_lrs[group]
            rate *= scheduler.rate_at(epoch, group) / base if base else 0.0
        return rate

    def step(self) -> None:
        super().step()
        for scheduler in self.schedulers:
            scheduler.last_epoch = self.last_epoch
            scheduler._last_lr = list(self._last_lr)


class CyclicLR(LRScheduler):
    """PyTorch's cyclical rate, stepped once per batch: from base_lr up to max_lr over
    step_size_up steps and back over step_size_down (step_size_up by default); mode
    "triangular", "triangular2" (each cycle's height half the last's) or "exp_range" (the height
    times gamma ** step), or `scale_fn` of the cycle (scale_mode "cycle") or of the step
    ("iterations"). Cycling the momentum is refused, as OneCycleLR's."""

    def __init__(self, optimizer: Optimizer, base_lr: float | Sequence[float],
                 max_lr: float | Sequence[float], step_size_up: int = 2000,
                 step_size_down: int | None = None, mode: str = "triangular", gamma: float = 1.0,
                 scale_fn: Callable[[float], float] | None = None, scale_mode: str = "cycle",
                 cycle_momentum: bool = True, base_momentum: float = 0.8, max_momentum: float = 0.9,
                 last_epoch: int = -1) -> None:
        if cycle_momentum:
            raise GraphcError("CyclicLR: cycle_momentum=True would change momentum/betas at every "
                              "step, but those are compiled into the training step (only the "
                              "learning rates are its inputs); pass cycle_momentum=False")
        if mode not in ("triangular", "triangular2", "exp_range") and scale_fn is None:
            raise ValueError(f"CyclicLR: mode must be 'triangular', 'triangular2' or 'exp_range' "
                             f"(or give scale_fn), got {mode!r}")
        if scale_fn is not None and scale_mode not in ("cycle", "iterations"):
            raise ValueError(f"CyclicLR: scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
        up = float(step_size_up)
        down = up if step_size_down is None else float(step_size_down)
        if not (0 < up < math.inf and 0 <= down < math.inf):
            raise ValueError(f"CyclicLR: step_size_up must be > 0 and step_size_down >= 0, got "
                             f"{step_size_up!r} and {step_size_down!r}")
        lows = _per_group(base_lr, optimizer, "CyclicLR", "base_lr values")
        if last_epoch == -1:  # the cycle starts at base_lr, as PyTorch's sets it
            for group, low in zip(optimizer.param_groups, lows):
                group["lr"] = low
        self.max_lrs = _per_group(max_lr, optimizer, "CyclicLR", "max_lr values")
        self.total_size, self.step_ratio = up + down, up / (up + down)
        self.mode, self.gamma, self.scale_fn = mode, gamma, scale_fn
        self.scale_mode = scale_mode if scale_fn is not None else (
            "iterations" if mode == "exp_range" else "cycle")
        super().__init__(optimizer, last_epoch)
        self.base_lrs = lows

    def _scale(self, x: float) -> float:
        if self.scale_fn is not None:
            return self.scale_fn(x)
        if self.mode == "triangular":
            return 1.0
        return 1 / 2.0 ** (x - 1) if self.mode == "triangular2" else self.gamma ** x

    def rate(self, epoch: int, group: int = 0) -> float:
        cycle = math.floor(1 + epoch / self.total_size)
        x = 1.0 + epoch / self.total_size - cycle
        factor = x / self.step_ratio if x <= self.step_ratio else (x - 1) / (self.step_ratio - 1)
        height = (self.max_lrs[group] - self.base_lrs[group]) * factor
        return self.base_lrs[group] + height * self._scale(cycle if self.scale_mode == "cycle" else epoch)


class ReduceLROnPlateau(_SavedState):
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
        # a group added later takes the one min_lr given for all, as PyTorch's
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else min_lr
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
            groups = len(self.optimizer.param_groups)
            if len(self.min_lrs) != groups:
                if self.default_min_lr is None:
                    raise GraphcError(
                        f"ReduceLROnPlateau: the optimizer has {groups} parameter groups, "
                        f"{len(self.min_lrs)} when the scheduler was built with a min_lr for "
                        "each; set its min_lrs to one per group")
                self.min_lrs = [self.default_min_lr] * groups
            for group, floor in zip(self.optimizer.param_groups, self.min_lrs):
                new = max(group["lr"] * self.factor, floor)
                if group["lr"] - new > self.eps:
                    group["lr"] = new
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)


__all__ = ["SCHEDULE_KEYS", "LRScheduler", "LambdaLR", "StepLR", "MultiStepLR", "ExponentialLR", "LinearLR",
           "CosineAnnealingLR", "CosineAnnealingWarmRestarts", "ConstantLR", "PolynomialLR",
           "MultiplicativeLR", "OneCycleLR", "SequentialLR", "ChainedScheduler", "CyclicLR",
           "ReduceLROnPlateau"]
