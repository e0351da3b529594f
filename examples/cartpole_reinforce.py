"""REINFORCE with a learned baseline on CartPole-v1, the policy-gradient update compiled into
one graph.

    python examples/cartpole_reinforce.py [--episodes 1000] [--seed 0] [--backend numba-cpu]
                                          [--log-dir runs/reinforce] [--no-stop]

Each update learns from one whole episode. Episodes differ in length, compiled graphs have
static shapes: so the episode is padded to the time limit (500 steps) and a mask marks its
real steps, and every update runs the same compiled graph. The graph holds the policy and
value networks' forward, the masked policy-gradient loss with the normalised advantage
(discounted return minus the value baseline, not differentiated), the value regression, an
entropy bonus, the backward pass and Adam's update. Actions are sampled from a second compiled
function: the policy's softmax on one observation.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.rl import EpisodeLog, RunResult, discounted_returns, mlp


@dataclass(frozen=True)
class ReinforceConfig:
    hidden: tuple[int, ...] = (128,)
    lr: float = 1e-3
    gamma: float = 0.99
    value_coef: float = 0.5
    entropy_coef: float = 0.01


class ActorCritic(nn.Module):
    """A policy network (action logits) and a separate value network (the baseline)."""

    def __init__(self, obs_dim: int, n_actions: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.policy = mlp(obs_dim, hidden, n_actions)
        self.value = mlp(obs_dim, hidden, 1)

    def forward(self, obs: gc.Tensor) -> tuple[gc.Tensor, gc.Tensor]:
        return self.policy(obs), self.value(obs).reshape(-1)


def masked_mean(x: gc.Tensor, mask: gc.Tensor, count: gc.Tensor) -> gc.Tensor:
    return (x * mask).sum() / count


def reinforce_loss(value_coef: float, entropy_coef: float):
    """loss_fn((logits, values), actions, returns, mask) for compile_train_step(targets=3)."""
    def loss(out: tuple[gc.Tensor, gc.Tensor], actions: gc.Tensor, returns: gc.Tensor,
             mask: gc.Tensor) -> gc.Tensor:
        logits, values = out
        count = mask.sum()
        log_probs = F.log_softmax(logits, dim=1)
        taken = gc.take_along_axis(log_probs, actions.reshape(-1, 1), axis=1).reshape(-1)
        # The baseline lowers the variance; the advantage must not train the value network.
        advantage = gc.stop_gradient(returns - values)
        centred = advantage - masked_mean(advantage, mask, count)
        scale = gc.sqrt(masked_mean(centred.square(), mask, count) + 1e-8)
        policy_loss = -masked_mean(taken * (centred / scale), mask, count)
        value_loss = masked_mean((values - returns).square(), mask, count)
        entropy = -masked_mean((log_probs.exp() * log_probs).sum(1), mask, count)
        return policy_loss + value_coef * value_loss - entropy_coef * entropy
    return loss


class ReinforceLearner:
    """The compiled update (one padded episode) and the compiled action distribution."""

    def __init__(self, obs_dim: int, n_actions: int, max_steps: int, config: ReinforceConfig,
                 backend: str | None = None) -> None:
        self.model = ActorCritic(obs_dim, n_actions, config.hidden)
        self.gamma = config.gamma
        self.obs = np.zeros((max_steps, obs_dim), np.float32)
        self.actions = np.zeros(max_steps, np.int64)
        self.returns = np.zeros(max_steps, np.float32)
        self.mask = np.zeros(max_steps, np.float32)
        start = time.perf_counter()
        self.train_step = gc.compile_train_step(
            self.model, reinforce_loss(config.value_coef, config.entropy_coef),
            optim.Adam(self.model.parameters(), lr=config.lr),
            (self.obs, self.actions, self.returns, self.mask), backend=backend, targets=3)
        self.policy = gc.compile(nn.Sequential(self.model.policy, nn.Softmax(-1)), self.obs[:1],
                                 backend=backend)
        self.compile_s = time.perf_counter() - start
        self.backend = self.train_step.backend

    def probabilities(self, obs: np.ndarray) -> np.ndarray:
        return self.policy(obs.reshape(1, -1))[0]

    def update(self, observations: list[np.ndarray], actions: list[int], rewards: list[float]) -> float:
        """One gradient step on one episode, zero-padded to the time limit."""
        n = len(rewards)
        self.obs[:n], self.obs[n:] = observations, 0.0
        self.actions[:n], self.actions[n:] = actions, 0
        self.returns[:n], self.returns[n:] = discounted_returns(rewards, self.gamma), 0.0
        self.mask[:n], self.mask[n:] = 1.0, 0.0
        return self.train_step(self.obs, self.actions, self.returns, self.mask)


def sample_action(probabilities: np.ndarray, rng: np.random.Generator) -> int:
    # float32 probabilities may sum to 1 - 1e-7: draw against the cumulative sum instead of
    # letting rng.choice reject them.
    return int(min(np.searchsorted(np.cumsum(probabilities), rng.random() * probabilities.sum(),
                                   side="right"), len(probabilities) - 1))


def train_reinforce(env, learner: ReinforceLearner, episodes: int = 1000, seed: int = 0,
                    solved_at: float = 195.0, stop_when_solved: bool = True,
                    progress: bool = True, log_dir: str | None = None) -> RunResult:
    rng = np.random.default_rng(seed)
    result = RunResult()
    log = EpisodeLog(result, episodes, solved_at, progress=progress, log_dir=log_dir)
    start = time.perf_counter()
    obs, _ = env.reset(seed=seed)
    try:
        for _ in range(episodes):
            observations, actions, rewards, done = [], [], [], False
            while not done:
                tic = time.perf_counter()
                action = sample_action(learner.probabilities(np.asarray(obs, np.float32)), rng)
                result.act_s.append(time.perf_counter() - tic)
                observations.append(obs)
                actions.append(action)
                obs, reward, terminated, truncated, _ = env.step(action)
                rewards.append(float(reward))
                done = terminated or truncated
            result.env_steps += len(rewards)
            tic = time.perf_counter()
            loss = learner.update(observations, actions, rewards)
            result.update_s.append(time.perf_counter() - tic)
            obs, _ = env.reset()
            if log.episode(sum(rewards), loss=loss) and stop_when_solved:
                break
    finally:
        log.close()
    result.wall_s = time.perf_counter() - start
    return result


def run(config: ReinforceConfig = ReinforceConfig(), episodes: int = 1000, seed: int = 0,
        backend: str | None = None, stop_when_solved: bool = True, progress: bool = True,
        log_dir: str | None = None) -> tuple[RunResult, ReinforceLearner]:
    gc.manual_seed(seed)
    env = gym.make("CartPole-v1")
    learner = ReinforceLearner(env.observation_space.shape[0], int(env.action_space.n),
                               env.spec.max_episode_steps, config, backend)
    print(f"backend {learner.backend}: update step and policy compiled in {learner.compile_s:.2f} s "
          f"({len(learner.train_step.graph.nodes)} nodes in the update graph)")
    result = train_reinforce(env, learner, episodes, seed, stop_when_solved=stop_when_solved,
                             progress=progress, log_dir=log_dir)
    env.close()
    print(result.summary(f"graphc-reinforce[{learner.backend}]", learner.compile_s))
    return result, learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="numba-cpu (the default) or reference")
    parser.add_argument("--log-dir", default=None, help="write TensorBoard scalars here (tensorboardX)")
    parser.add_argument("--no-stop", action="store_true", help="keep training after solving")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--lr", type=float, default=ReinforceConfig.lr)
    parser.add_argument("--entropy-coef", type=float, default=ReinforceConfig.entropy_coef)
    args = parser.parse_args()
    config = ReinforceConfig(lr=args.lr, entropy_coef=args.entropy_coef)
    run(config, args.episodes, args.seed, args.backend, not args.no_stop, not args.no_progress,
        args.log_dir)


if __name__ == "__main__":
    main()
