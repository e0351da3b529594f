"""DQN on CartPole-v1 with the Q-network's whole update compiled into one graph.

    python examples/cartpole_dqn.py [--episodes 500] [--seed 0] [--backend numba-cpu]
                                    [--log-dir runs/dqn] [--no-stop]

One compiled training step holds the online network's forward on s, the target network's
forward on s' (behind a stop_gradient), the TD target r + gamma * (1 - done) * max Q_target,
the Huber loss on Q(s, a), the backward pass and Adam's update. The target network's weights
are inputs of that step, so syncing them is an in-place copy, never a recompilation. Actions
come from a second compiled function: the online network on one observation.

Needs gymnasium (pip install gymnasium). Stops once the 100-episode average return reaches
195 unless --no-stop; prints a summary line with episodes, best average, wall time and the
median latency of one update.
"""
from __future__ import annotations

import argparse

import gymnasium as gym

import graphc as gc
from graphc.rl import DQNConfig, DQNLearner, RunResult, train_dqn


def run(config: DQNConfig = DQNConfig(), episodes: int = 500, seed: int = 0,
        backend: str | None = None, stop_when_solved: bool = True, progress: bool = True,
        log_dir: str | None = None) -> tuple[RunResult, DQNLearner]:
    """Train a DQN agent on CartPole-v1; prints and returns what the run measured."""
    gc.manual_seed(seed)
    env = gym.make("CartPole-v1")
    learner = DQNLearner(env.observation_space.shape[0], int(env.action_space.n), config, backend)
    print(f"backend {learner.backend}: update step and policy compiled in {learner.compile_s:.2f} s "
          f"({len(learner.train_step.graph.nodes)} nodes in the update graph)")
    result = train_dqn(env, learner, config, episodes, seed, stop_when_solved=stop_when_solved,
                       progress=progress, log_dir=log_dir)
    env.close()
    print(result.summary(f"graphc-dqn[{learner.backend}]", learner.compile_s))
    return result, learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="numba-cpu (the default) or reference")
    parser.add_argument("--log-dir", default=None, help="write TensorBoard scalars here (tensorboardX)")
    parser.add_argument("--no-stop", action="store_true", help="keep training after solving")
    parser.add_argument("--no-progress", action="store_true")
    DQNConfig.add_arguments(parser)
    args = parser.parse_args()
    run(DQNConfig.from_arguments(args), args.episodes, args.seed, args.backend, not args.no_stop,
        not args.no_progress, args.log_dir)


if __name__ == "__main__":
    main()
