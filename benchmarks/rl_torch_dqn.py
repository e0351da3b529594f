"""The DQN agent of examples/cartpole_dqn.py with a PyTorch learner, for a side-by-side run.

    python benchmarks/rl_torch_dqn.py [--episodes 500] [--seed 0] [--graphc-backend numba-cpu]
                                      [--threads N] [--no-stop]
    python benchmarks/rl_torch_dqn.py --latency 2000 --graphc-backend numba-cpu,reference

Everything but the learner is shared with the graphc example: the loop, replay buffer,
exploration schedule and seeds (graphc.rl.train_dqn), the hyper-parameters (DQNConfig) and
even the initial weights (drawn by graphc under the same seed, then copied into torch). The
two runs differ only in how an update and an action are computed: eager PyTorch (autograd,
torch.optim.Adam, F.smooth_l1_loss) here, one compiled graphc graph there. With
--graphc-backend, the graphc agent runs right after in the same process for the comparison.
--latency times the learners alone, taking turns on the same replay batches.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import gymnasium as gym
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import graphc as gc
from graphc.rl import (DQNConfig, DQNLearner, QLearner, ReplayBuffer, RunResult, Transitions, mlp,
                       train_dqn)


def torch_mlp_like(graphc_net: gc.nn.Sequential) -> nn.Sequential:
    """A torch.nn.Sequential with the same layers and the same weights as a graphc mlp."""
    layers = []
    for layer in graphc_net:
        if isinstance(layer, gc.nn.Linear):
            linear = nn.Linear(layer.in_features, layer.out_features)
            with torch.no_grad():
                linear.weight.copy_(torch.from_numpy(layer.weight))
                linear.bias.copy_(torch.from_numpy(layer.bias))
            layers.append(linear)
        else:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class TorchDQNLearner:
    """graphc.rl.QLearner in eager PyTorch: the same TD target, Huber loss and Adam."""

    def __init__(self, online: nn.Sequential, config: DQNConfig) -> None:
        self.online, self.target = online, copy.deepcopy(online)
        self.target.requires_grad_(False)
        self.optimizer = torch.optim.Adam(self.online.parameters(), lr=config.lr)
        self.gamma, self.beta = config.gamma, config.huber_beta

    @torch.no_grad()
    def q_values(self, obs: np.ndarray) -> np.ndarray:
        return self.online(torch.from_numpy(obs).reshape(1, -1))[0].numpy()

    def update(self, batch: Transitions) -> float:
        obs, next_obs, actions, rewards, dones = (torch.from_numpy(a) for a in (
            batch.obs, batch.next_obs, batch.actions, batch.rewards, batch.dones))
        q_taken = self.online(obs).gather(1, actions.reshape(-1, 1)).reshape(-1)
        with torch.no_grad():
            target = rewards + self.gamma * (1.0 - dones) * self.target(next_obs).max(1).values
        loss = F.smooth_l1_loss(q_taken, target, beta=self.beta)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    @torch.no_grad()
    def sync_target(self, tau: float = 1.0) -> None:
        for t, o in zip(self.target.parameters(), self.online.parameters()):
            t.lerp_(o, tau)


def run_torch(config: DQNConfig, episodes: int, seed: int, stop_when_solved: bool = True,
              progress: bool = True) -> RunResult:
    gc.manual_seed(seed)  # the graphc example's initial weights, drawn the same way
    env = gym.make("CartPole-v1")
    obs_dim, n_actions = env.observation_space.shape[0], int(env.action_space.n)
    learner = TorchDQNLearner(torch_mlp_like(mlp(obs_dim, config.hidden, n_actions)), config)
    result = train_dqn(env, learner, config, episodes, seed, stop_when_solved=stop_when_solved,
                       progress=progress)
    env.close()
    print(result.summary(f"torch-dqn[{torch.__version__}, {torch.get_num_threads()} threads]"))
    return result


def measure_latency(learners: dict[str, QLearner], batch_size: int, updates: int, seed: int = 0
                    ) -> None:
    """Median/p90 latency of one update and one action per learner, on the same random
    batches, the learners taking turns so machine noise falls on all of them alike."""
    rng = np.random.default_rng(seed)
    buffer = ReplayBuffer(10_000, (4,))
    for _ in range(10_000):
        buffer.add(rng.standard_normal(4), int(rng.integers(2)), 1.0, rng.standard_normal(4),
                   bool(rng.random() < 0.05))
    update_s = {name: [] for name in learners}
    act_s = {name: [] for name in learners}
    for _ in range(updates):
        batch = buffer.sample(batch_size, rng)
        for name, learner in learners.items():
            tic = time.perf_counter()
            learner.update(batch)
            update_s[name].append(time.perf_counter() - tic)
            tic = time.perf_counter()
            learner.q_values(batch.obs[0])
            act_s[name].append(time.perf_counter() - tic)
    for name in learners:
        up, act = np.array(update_s[name]) * 1e3, np.array(act_s[name]) * 1e3
        print(f"latency {name}: update median {np.median(up):.3f} ms (p90 {np.percentile(up, 90):.3f}), "
              f"action median {np.median(act):.3f} ms (p90 {np.percentile(act, 90):.3f}), "
              f"{updates} updates of batch {batch_size}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--graphc-backend", default=None,
                        help="also run the graphc agent on this backend ('default' for the default; "
                             "with --latency, a comma-separated list)")
    parser.add_argument("--latency", type=int, default=0, metavar="N",
                        help="instead of training, time N updates of each learner on the same batches")
    parser.add_argument("--no-stop", action="store_true", help="keep training after solving")
    parser.add_argument("--no-progress", action="store_true")
    DQNConfig.add_arguments(parser)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = DQNConfig.from_arguments(args)
    if args.latency:
        gc.manual_seed(args.seed)
        learners = {f"torch[{torch.get_num_threads()} threads]":
                    TorchDQNLearner(torch_mlp_like(mlp(4, config.hidden, 2)), config)}
        for backend in (args.graphc_backend or "default").split(","):
            learner = DQNLearner(4, 2, config, None if backend == "default" else backend)
            learners[f"graphc[{learner.backend}]"] = learner
        measure_latency(learners, config.batch_size, args.latency, args.seed)
        return
    torch_result = run_torch(config, args.episodes, args.seed, not args.no_stop, not args.no_progress)
    if args.graphc_backend:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))
        from cartpole_dqn import run
        backend = None if args.graphc_backend == "default" else args.graphc_backend
        graphc_result, _ = run(config, args.episodes, args.seed, backend, not args.no_stop,
                               not args.no_progress)
        print(f"median update latency, torch / graphc[{backend or 'default'}]: "
              f"{np.median(torch_result.update_s) / np.median(graphc_result.update_s):.2f}x")


if __name__ == "__main__":
    main()
