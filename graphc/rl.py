"""Reinforcement-learning helpers: a replay buffer, exploration schedules, discounted returns,
and the DQN pieces whose training step compiles into one graph.

The DQN step is ONE compiled graph: `QNetworks.forward(obs, next_obs)` returns the online
Q-values of `obs` and the target network's Q-values of `next_obs` (behind a stop_gradient),
and `td_loss(gamma)` turns them into the Huber loss of Q(s, a) against
r + gamma * (1 - done) * max_a' Q_target(s', a'). Build the optimizer from
`networks.online.parameters()` only: the target network's parameters are then fixed inputs of
the step, read from their own arrays at every call, so `sync_target()` (an in-place copy)
takes effect without recompiling.
"""
from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field, fields
from typing import Any, Callable, NamedTuple, Protocol, Sequence

import numpy as np

from . import nn, optim
from .compile import compile, compile_train_step
from .functions import amax, stop_gradient, take_along_axis
from .nn import functional as F
from .tensor import Tensor


# -- experience ------------------------------------------------------------------------------
class Transitions(NamedTuple):
    """A batch of transitions, as arrays ready for a compiled step."""

    obs: np.ndarray        # (B, *obs_shape) float32
    actions: np.ndarray    # (B,) int64
    rewards: np.ndarray    # (B,) float32
    next_obs: np.ndarray   # (B, *obs_shape) float32
    dones: np.ndarray      # (B,) float32: 1.0 where the episode terminated (no bootstrap)


class ReplayBuffer:
    """A fixed-capacity ring of transitions in preallocated NumPy arrays; once full, each new
    transition overwrites the oldest."""

    def __init__(self, capacity: int, obs_shape: Sequence[int]) -> None:
        if capacity < 1:
            raise ValueError(f"ReplayBuffer: capacity must be >= 1, got {capacity}")
        self.capacity = int(capacity)
        self.obs = np.zeros((capacity, *obs_shape), np.float32)
        self.next_obs = np.zeros((capacity, *obs_shape), np.float32)
        self.actions = np.zeros(capacity, np.int64)
        self.rewards = np.zeros(capacity, np.float32)
        self.dones = np.zeros(capacity, np.float32)
        self._next = 0   # slot the next transition goes to
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, obs: Any, action: int, reward: float, next_obs: Any, done: bool) -> None:
        i = self._next
        self.obs[i], self.actions[i], self.rewards[i] = obs, action, reward
        self.next_obs[i], self.dones[i] = next_obs, float(done)
        self._next = (i + 1) % self.capacity
        self._size = min(self._size + 1, self.capacity)

    def sample(self, batch_size: int, rng: np.random.Generator) -> Transitions:
        """`batch_size` transitions drawn uniformly with replacement."""
        if self._size == 0:
            raise ValueError("ReplayBuffer.sample: the buffer is empty")
        idx = rng.integers(0, self._size, size=batch_size)
        return Transitions(self.obs[idx], self.actions[idx], self.rewards[idx],
                           self.next_obs[idx], self.dones[idx])


def linear_schedule(start: float, end: float, duration: int) -> Callable[[int], float]:
    """t -> value going linearly from `start` (t=0) to `end` (t >= duration), e.g. epsilon."""
    def value(t: int) -> float:
        fraction = min(max(t, 0) / duration, 1.0) if duration > 0 else 1.0
        return start + fraction * (end - start)
    return value


def epsilon_greedy(q_values: np.ndarray, epsilon: float, rng: np.random.Generator) -> int:
    """A uniformly random action with probability epsilon, else the greedy one."""
    if rng.random() < epsilon:
        return int(rng.integers(q_values.shape[-1]))
    return int(np.argmax(q_values))


def discounted_returns(rewards: Sequence[float], gamma: float,
                       dones: Sequence[bool] | None = None) -> np.ndarray:
    """G_t = r_t + gamma * G_{t+1}, restarting after every step where `dones` is true (so one
    call can cover several consecutive episodes). Returns float32 of the rewards' length."""
    rewards = np.asarray(rewards, np.float64)
    ends = np.zeros(len(rewards), bool) if dones is None else np.asarray(dones, bool)
    if ends.shape != rewards.shape:
        raise ValueError(f"discounted_returns: rewards {rewards.shape} and dones {ends.shape} "
                         "must have the same shape")
    returns = np.empty_like(rewards)
    running = 0.0
    for t in range(len(rewards) - 1, -1, -1):
        running = rewards[t] + gamma * running * (not ends[t])
        returns[t] = running
    return returns.astype(np.float32)


# -- networks --------------------------------------------------------------------------------
def mlp(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    """Linear-ReLU layers of the `hidden` widths, then a linear output layer."""
    widths = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], out_features))


class QNetworks(nn.Module):
    """The online Q-network and its target copy, evaluated together in one training step."""

    def __init__(self, online: nn.Module, target: nn.Module) -> None:
        super().__init__()
        self.online, self.target = online, target
        self.sync_target()

    def forward(self, obs: Tensor, next_obs: Tensor) -> tuple[Tensor, Tensor]:
        return self.online(obs), stop_gradient(self.target(next_obs))

    def sync_target(self, tau: float = 1.0) -> None:
        """target <- tau * online + (1 - tau) * target, in place (tau=1: a hard copy). Integer
        buffers (BatchNorm's batch count) are copied, as PyTorch's Polyak updates leave them
        out of the average. Every new value is computed before the first is written."""
        online = self.online.state_dict()
        targets = self.target.state_dict()
        updated = {name: online[name] if tau == 1.0 or not np.issubdtype(target.dtype, np.floating)
                   else (1.0 - tau) * target + tau * online[name] for name, target in targets.items()}
        for name, target in targets.items():
            np.copyto(target, updated[name], casting="same_kind")


def td_loss(gamma: float, beta: float = 1.0) -> Callable[..., Tensor]:
    """loss_fn((q, q_next_target), actions, rewards, dones) for compile_train_step(targets=3):
    the Huber loss (smooth L1 with `beta`) of Q(s, a) against the one-step TD target."""
    def loss(q_pair: tuple[Tensor, Tensor], actions: Tensor, rewards: Tensor, dones: Tensor) -> Tensor:
        q, q_next = q_pair
        q_taken = take_along_axis(q, actions.reshape(-1, 1), axis=1).reshape(-1)
        target = rewards + gamma * (1.0 - dones) * amax(q_next, axis=1)
        return F.smooth_l1_loss(q_taken, target, beta=beta)
    return loss


# -- the DQN agent -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DQNConfig:
    """Hyper-parameters of the DQN agent (defaults: tuned for CartPole-v1)."""

    hidden: tuple[int, ...] = (128, 128)
    lr: float = 1e-3
    batch_size: int = 64
    gamma: float = 0.99
    buffer_size: int = 50_000
    warmup_steps: int = 1_000          # random-ish transitions collected before the first update
    train_every: int = 1               # environment steps per update
    target_sync_every: int = 250       # environment steps between target-network syncs
    tau: float = 1.0                   # < 1: Polyak averaging at every step instead of syncs
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    epsilon_decay_steps: int = 2_000    # fast: a slow decay spends most of 500 episodes on random play
    huber_beta: float = 1.0

    @staticmethod
    def add_arguments(parser: Any) -> None:
        """One --flag per field on an argparse parser (--hidden takes several widths)."""
        for f in fields(DQNConfig):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "hidden":
                parser.add_argument(flag, type=int, nargs="+", default=list(f.default))
            else:
                parser.add_argument(flag, type=type(f.default), default=f.default)

    @classmethod
    def from_arguments(cls, args: Any) -> DQNConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls)}
        return cls(**{**values, "hidden": tuple(values["hidden"])})


class QLearner(Protocol):
    """What the DQN loop needs from a learner; graphc's and PyTorch's implement it alike."""

    def q_values(self, obs: np.ndarray) -> np.ndarray: ...
    def update(self, batch: Transitions) -> float: ...
    def sync_target(self, tau: float = 1.0) -> None: ...


class DQNLearner:
    """The Q-network's update as ONE compiled graph, and greedy action values as another."""

    def __init__(self, obs_dim: int, n_actions: int, config: DQNConfig,
                 backend: str | None = None) -> None:
        self.networks = QNetworks(mlp(obs_dim, config.hidden, n_actions),
                                  mlp(obs_dim, config.hidden, n_actions))
        self.optimizer = optim.Adam(self.networks.online.parameters(), lr=config.lr)
        batch = ReplayBuffer(config.batch_size, (obs_dim,))  # zeros, shaped like a sampled batch
        start = time.perf_counter()
        self.train_step = compile_train_step(
            self.networks, td_loss(config.gamma, config.huber_beta), self.optimizer,
            (batch.obs, batch.next_obs, batch.actions, batch.rewards, batch.dones),
            backend=backend, targets=3)
        self.policy = compile(self.networks.online, batch.obs[:1], backend=backend)
        self.compile_s = time.perf_counter() - start
        self.backend = self.train_step.backend

    def q_values(self, obs: np.ndarray) -> np.ndarray:
        return self.policy(obs.reshape(1, -1))[0]

    def update(self, batch: Transitions) -> float:
        return self.train_step(batch.obs, batch.next_obs, batch.actions, batch.rewards, batch.dones)

    def sync_target(self, tau: float = 1.0) -> None:
        self.networks.sync_target(tau)


@dataclass
class RunResult:
    """What a training run measured; `summary()` is the one-line report."""

    window: int = 100  # episodes in the moving average
    returns: list[float] = field(default_factory=list)
    averages: list[float] = field(default_factory=list)  # over the last <= `window` episodes
    solved_episode: int | None = None
    env_steps: int = 0
    wall_s: float = 0.0
    update_s: list[float] = field(default_factory=list)
    act_s: list[float] = field(default_factory=list)

    @property
    def best_average(self) -> float:
        """The best moving average over a full window (over all episodes, if fewer)."""
        full = self.averages[self.window - 1:] or self.averages
        return max(full, default=math.nan)

    def summary(self, name: str, compile_s: float = 0.0) -> str:
        def median_ms(seconds: list[float]) -> float:
            return float(np.median(seconds)) * 1e3 if seconds else math.nan
        return (f"summary {name}: episodes {len(self.returns)}, solved at episode "
                f"{self.solved_episode if self.solved_episode is not None else 'never'}, "
                f"best {self.window}-episode average {self.best_average:.1f}, wall time {self.wall_s:.1f} s "
                f"(compile {compile_s:.1f} s), {len(self.update_s)} updates, median update "
                f"{median_ms(self.update_s):.3f} ms, median action {median_ms(self.act_s):.3f} ms")


class EpisodeLog:
    """Per-episode bookkeeping shared by the training loops: returns, the moving average,
    the solved test, a tqdm bar and optional TensorBoard scalars."""

    def __init__(self, result: RunResult, episodes: int, solved_at: float, progress: bool = True,
                 log_dir: str | None = None) -> None:
        from tqdm.auto import tqdm

        from .train import tensorboard_writer

        self.result, self.solved_at = result, solved_at
        self.recent: deque[float] = deque(maxlen=result.window)
        self.bar = tqdm(total=episodes, desc="episodes", disable=not progress)
        self.writer = tensorboard_writer(log_dir)

    def episode(self, episode_return: float, **scalars: float) -> bool:
        """Record one finished episode; True once the moving average over a full window
        reaches `solved_at`."""
        result = self.result
        self.recent.append(episode_return)
        average = float(np.mean(self.recent))
        result.returns.append(episode_return)
        result.averages.append(average)
        n = len(result.returns)
        solved = len(self.recent) == result.window and average >= self.solved_at
        if solved and result.solved_episode is None:
            result.solved_episode = n
        self.bar.update(1)
        self.bar.set_postfix(ret=f"{episode_return:.0f}", avg100=f"{average:.1f}",
                             **{k: f"{v:.3g}" for k, v in scalars.items()})
        if self.writer is not None:
            self.writer.add_scalar("episode/return", episode_return, n)
            self.writer.add_scalar("episode/average_return", average, n)
            for key, value in scalars.items():
                self.writer.add_scalar(f"episode/{key}", value, n)
        return solved

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def train_dqn(env: Any, learner: QLearner, config: DQNConfig, episodes: int = 500,
              seed: int = 0, solved_at: float = 195.0, stop_when_solved: bool = True,
              progress: bool = True, log_dir: str | None = None) -> RunResult:
    """Run epsilon-greedy DQN on a gymnasium environment with discrete actions.

    Reproducible from `seed` (environment resets, exploration and replay sampling; seed the
    learner's initialisation separately). Only termination stops bootstrapping: an episode cut
    by the time limit still bootstraps from its last state.
    """
    rng = np.random.default_rng(seed)
    epsilon = linear_schedule(config.epsilon_start, config.epsilon_end, config.epsilon_decay_steps)
    buffer = ReplayBuffer(config.buffer_size, env.observation_space.shape)
    result = RunResult()
    log = EpisodeLog(result, episodes, solved_at, progress=progress, log_dir=log_dir)
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    try:
        for _ in range(episodes):
            episode_return, done, losses = 0.0, False, []
            while not done:
                eps = epsilon(result.env_steps)
                tic = time.perf_counter()
                action = epsilon_greedy(learner.q_values(np.asarray(obs, np.float32)), eps, rng)
                result.act_s.append(time.perf_counter() - tic)
                next_obs, reward, terminated, truncated, _ = env.step(action)
                buffer.add(obs, action, reward, next_obs, terminated)
                obs, episode_return = next_obs, episode_return + float(reward)
                done = terminated or truncated
                result.env_steps += 1
                if result.env_steps >= config.warmup_steps and result.env_steps % config.train_every == 0:
                    batch = buffer.sample(config.batch_size, rng)
                    tic = time.perf_counter()
                    losses.append(learner.update(batch))
                    result.update_s.append(time.perf_counter() - tic)
                if config.tau < 1.0:
                    learner.sync_target(config.tau)
                elif result.env_steps % config.target_sync_every == 0:
                    learner.sync_target()
            obs, _ = env.reset()
            scalars = {"epsilon": eps, **({"loss": float(np.mean(losses))} if losses else {})}
            if log.episode(episode_return, **scalars) and stop_when_solved:
                break
    finally:
        log.close()
    result.wall_s = time.perf_counter() - start
    return result


__all__ = ["ReplayBuffer", "Transitions", "linear_schedule", "epsilon_greedy",
           "discounted_returns", "mlp", "QNetworks", "td_loss", "DQNConfig", "QLearner",
           "DQNLearner", "RunResult", "EpisodeLog", "train_dqn"]
