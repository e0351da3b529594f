"""graphc.rl: replay buffer, schedules, returns, the compiled DQN step (its TD target passes
no gradient into the target network) and short seeded training runs of the CartPole examples."""
import importlib.util
import os
import sys

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.backends import available_backends
from graphc.rl import (DQNConfig, DQNLearner, QNetworks, ReplayBuffer, discounted_returns,
                       epsilon_greedy, linear_schedule, mlp, td_loss, train_dqn)

REF = "reference"
ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_script(folder, name):
    """Import examples/<name>.py or benchmarks/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, folder, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# -- helpers ---------------------------------------------------------------------------------
def test_replay_buffer_wraps_around_and_keeps_the_newest():
    buffer = ReplayBuffer(3, (2,))
    for i in range(5):
        buffer.add([i, -i], i % 2, float(i), [i + 1, 0], done=(i == 4))
    assert len(buffer) == 3
    # transitions 3 and 4 overwrote slots 0 and 1; slot 2 still holds transition 2
    np.testing.assert_array_equal(buffer.rewards, [3.0, 4.0, 2.0])
    np.testing.assert_array_equal(buffer.obs[:, 0], [3, 4, 2])
    np.testing.assert_array_equal(buffer.next_obs[:, 0], [4, 5, 3])
    np.testing.assert_array_equal(buffer.dones, [0.0, 1.0, 0.0])
    batch = buffer.sample(200, np.random.default_rng(0))
    assert set(batch.rewards.tolist()) == {2.0, 3.0, 4.0}
    np.testing.assert_array_equal(batch.obs[:, 0], batch.rewards)  # rows stay aligned
    np.testing.assert_array_equal(batch.actions, batch.rewards.astype(int) % 2)
    assert batch.obs.dtype == np.float32 and batch.actions.dtype == np.int64


def test_replay_buffer_before_wrapping_samples_only_what_was_added():
    buffer = ReplayBuffer(10, (1,))
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1, np.random.default_rng(0))
    buffer.add([7.0], 1, 1.0, [8.0], False)
    buffer.add([9.0], 0, 2.0, [10.0], True)
    batch = buffer.sample(50, np.random.default_rng(1))
    assert len(buffer) == 2 and set(batch.obs[:, 0].tolist()) == {7.0, 9.0}


def test_discounted_returns_by_hand():
    np.testing.assert_allclose(discounted_returns([1, 1, 1], 0.5), [1.75, 1.5, 1.0])
    np.testing.assert_allclose(discounted_returns([1.0, 2.0, 3.0], 1.0), [6.0, 5.0, 3.0])
    # a `done` ends one episode: the next step starts a new sum
    np.testing.assert_allclose(discounted_returns([1, 1, 1, 1], 0.5, dones=[0, 1, 0, 1]),
                               [1.5, 1.0, 1.5, 1.0])
    assert discounted_returns([], 0.9).shape == (0,)
    with pytest.raises(ValueError, match="same shape"):
        discounted_returns([1, 2], 0.9, dones=[True])


def test_linear_schedule_and_epsilon_greedy():
    eps = linear_schedule(1.0, 0.1, 100)
    assert [eps(0), eps(50), eps(100), eps(10_000)] == pytest.approx([1.0, 0.55, 0.1, 0.1])
    q = np.array([0.1, 0.9, 0.3], np.float32)
    rng = np.random.default_rng(0)
    assert all(epsilon_greedy(q, 0.0, rng) == 1 for _ in range(20))
    counts = np.bincount([epsilon_greedy(q, 1.0, rng) for _ in range(3000)], minlength=3)
    assert counts.min() > 850  # uniform over the three actions


def test_sync_target_copies_or_blends_in_place():
    gc.manual_seed(0)
    nets = QNetworks(mlp(4, [8], 2), mlp(4, [8], 2))
    online, target = nets.online.state_dict(), nets.target.state_dict()
    for name in online:
        np.testing.assert_array_equal(online[name], target[name])  # synced at construction
    arrays = {name: id(a) for name, a in target.items()}
    before = {name: a.copy() for name, a in target.items()}
    for a in online.values():
        a += 1.0
    nets.sync_target(tau=0.25)
    for name, a in nets.target.state_dict().items():
        assert id(a) == arrays[name]
        np.testing.assert_allclose(a, before[name] + 0.25, rtol=1e-6, atol=1e-6)


def test_a_soft_sync_copies_integer_buffers_and_averages_the_rest():
    """BatchNorm's int64 batch count failed the average (a bare NumPy casting error) after
    the layers before it were already averaged."""
    gc.manual_seed(0)
    nets = QNetworks(nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)),
                     nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)))
    online = nets.online.state_dict()
    before = {name: a.copy() for name, a in nets.target.state_dict().items()}
    for name, a in online.items():
        a += 4 if a.dtype.kind == "i" else 1.0
    nets.sync_target(tau=0.25)
    for name, a in nets.target.state_dict().items():
        expected = online[name] if a.dtype.kind == "i" else before[name] + 0.25
        np.testing.assert_allclose(a, expected, rtol=1e-6, atol=1e-6, err_msg=name)


# -- the compiled DQN step -------------------------------------------------------------------
def random_batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, 4)).astype(np.float32),       # obs
            rng.standard_normal((n, 4)).astype(np.float32),       # next_obs
            rng.integers(0, 2, n).astype(np.int64),                # actions
            rng.uniform(-1, 2, n).astype(np.float32),              # rewards
            (rng.random(n) < 0.3).astype(np.float32))              # dones


def numpy_q(state, prefix, x):
    h = np.maximum(x @ state[f"{prefix}0.weight"].T + state[f"{prefix}0.bias"], 0)
    return h @ state[f"{prefix}2.weight"].T + state[f"{prefix}2.bias"]


def numpy_td_loss(nets, gamma, obs, next_obs, actions, rewards, dones):
    state = nets.state_dict()
    q = numpy_q(state, "online.", obs)[np.arange(len(actions)), actions]
    target = rewards + gamma * (1 - dones) * numpy_q(state, "target.", next_obs).max(1)
    diff = np.abs(q - target)
    return np.mean(np.where(diff < 1, 0.5 * diff ** 2, diff - 0.5))


def numpy_td_loss_with(target_state, nets, batch):
    """The TD loss as if the target network still held `target_state`."""
    saved = {k: v.copy() for k, v in nets.target.state_dict().items()}
    nets.target.load_state_dict(target_state)
    try:
        return numpy_td_loss(nets, 0.9, *batch)
    finally:
        nets.target.load_state_dict(saved)


def test_td_target_passes_no_gradient_into_the_target_network():
    gc.manual_seed(1)
    nets = QNetworks(mlp(4, [16], 2), mlp(4, [16], 2))
    nets.target.load_state_dict({k: v * 0.5 for k, v in nets.target.state_dict().items()})
    obs, next_obs, actions, rewards, dones = random_batch()
    loss_fn = td_loss(gamma=0.9)

    def loss(online, target):
        params = {**{f"online.{k}": v for k, v in online.items()},
                  **{f"target.{k}": v for k, v in target.items()}}
        out = nn.functional_call(nets, params, obs, next_obs)
        return loss_fn(out, actions, rewards, dones)

    online, target = nets.online.state_dict(), nets.target.state_dict()
    g_online, g_target = gc.grad(loss, argnums=(0, 1), backend=REF)(online, target)
    for name, g in g_target.items():
        assert not np.any(g), f"gradient reached target.{name}"

    # The online gradient is that of a regression onto a constant TD target.
    q_next = numpy_q(nets.state_dict(), "target.", next_obs)
    fixed = (rewards + 0.9 * (1 - dones) * q_next.max(1)).astype(np.float32)

    def regression(online):
        q = nn.functional_call(nets.online, online, obs)
        picked = gc.take_along_axis(q, actions.reshape(-1, 1), axis=1).reshape(-1)
        return F.smooth_l1_loss(picked, fixed)

    expected = gc.grad(regression, backend=REF)(online)
    assert any(np.any(g) for g in expected.values())
    for name, g in g_online.items():
        np.testing.assert_allclose(g, expected[name], rtol=1e-5, atol=1e-6)


def test_compiled_step_reads_the_target_arrays_each_call_without_recompiling():
    gc.manual_seed(2)
    nets = QNetworks(mlp(4, [16], 2), mlp(4, [16], 2))
    optimizer = optim.Adam(nets.online.parameters(), lr=1e-2)
    batch = random_batch()
    step = gc.compile_train_step(nets, td_loss(0.9), optimizer, batch, backend=REF, targets=3)
    roles = {inp.name: inp.role for inp in step.graph.inputs}
    assert roles["target.0.weight"] == "param" and "target.0.weight.exp_avg" not in roles
    output_names = [name for name, _ in step.graph.outputs]
    assert not any(name.startswith("param:target.") for name in output_names)

    target_before = {k: v.copy() for k, v in nets.target.state_dict().items()}
    for _ in range(3):
        expected = numpy_td_loss(nets, 0.9, *batch)
        assert step(*batch) == pytest.approx(expected, rel=1e-5)
    for name, array in nets.target.state_dict().items():
        np.testing.assert_array_equal(array, target_before[name])  # the step never writes them

    nets.sync_target()  # an in-place copy: the next call must see it
    expected = numpy_td_loss(nets, 0.9, *batch)
    assert expected != pytest.approx(numpy_td_loss_with(target_before, nets, batch), rel=1e-3)
    assert step(*batch) == pytest.approx(expected, rel=1e-5)
    assert len(step._compiled) == 1


@pytest.mark.parametrize("backend", [REF, "numba-cpu"])
def test_compiled_dqn_update_matches_pytorch(backend):
    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not available")
    pytest.importorskip("torch")
    pytest.importorskip("gymnasium")
    bench = load_script("benchmarks", "rl_torch_dqn")
    TorchDQNLearner, torch_mlp_like = bench.TorchDQNLearner, bench.torch_mlp_like

    config = DQNConfig(hidden=(32, 32), lr=1e-2, gamma=0.95)
    gc.manual_seed(3)
    ours = DQNLearner(4, 2, config, backend=backend)
    theirs = TorchDQNLearner(torch_mlp_like(ours.networks.online), config)
    buffer = ReplayBuffer(100, (4,))
    rng = np.random.default_rng(0)
    for _ in range(100):
        buffer.add(rng.standard_normal(4), int(rng.integers(2)), 1.0, rng.standard_normal(4),
                   bool(rng.random() < 0.1))
    for i in range(5):
        batch = buffer.sample(config.batch_size, rng)
        assert ours.update(batch) == pytest.approx(theirs.update(batch), rel=1e-4, abs=1e-6)
        if i == 2:
            ours.sync_target()
            theirs.sync_target()
    obs = buffer.obs[0]
    np.testing.assert_allclose(ours.q_values(obs), theirs.q_values(obs), rtol=1e-4, atol=1e-5)
    torch_state = {k: v.detach().numpy() for k, v in theirs.online.state_dict().items()}
    for name, array in ours.networks.online.state_dict().items():
        np.testing.assert_allclose(array, torch_state[name], rtol=1e-4, atol=1e-5)


# -- training runs ---------------------------------------------------------------------------
@pytest.mark.slow
def test_dqn_learns_cartpole_in_a_short_seeded_run():
    gym = pytest.importorskip("gymnasium")
    config = DQNConfig(hidden=(64, 64), warmup_steps=500, epsilon_decay_steps=2000,
                       target_sync_every=250)
    gc.manual_seed(0)
    env = gym.make("CartPole-v1")
    learner = DQNLearner(4, 2, config)
    result = train_dqn(env, learner, config, episodes=120, seed=0, progress=False)
    # a random policy averages ~22 steps
    assert np.mean(result.returns[:20]) < 40
    assert np.mean(result.returns[-20:]) > 80, result.returns
    assert len(learner.train_step._compiled) == 1 and len(result.update_s) > 5000


def test_reinforce_update_ignores_the_padding_and_compiles_once():
    pytest.importorskip("gymnasium")
    example = load_script("examples", "cartpole_reinforce")
    config, max_steps = example.ReinforceConfig(hidden=(16,)), 40
    learners = []
    for _ in range(2):
        gc.manual_seed(4)
        learners.append(example.ReinforceLearner(4, 2, max_steps, config, backend=REF))
    ours, padded_with_garbage = learners
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((7, 4)).astype(np.float32)
    actions, rewards = rng.integers(0, 2, 7), np.ones(7)

    loss = ours.update(list(obs), list(actions), list(rewards))
    garbage = padded_with_garbage
    garbage.obs[:] = rng.standard_normal((max_steps, 4)) * 100
    garbage.actions[:], garbage.returns[:], garbage.mask[:] = 1, 1e3, 0.0
    garbage.obs[:7], garbage.actions[:7], garbage.mask[:7] = obs, actions, 1.0
    garbage.returns[:7] = discounted_returns(rewards, config.gamma)
    assert garbage.train_step(garbage.obs, garbage.actions, garbage.returns, garbage.mask) == \
        pytest.approx(loss, rel=1e-5)
    theirs = garbage.model.state_dict()
    for name, array in ours.model.state_dict().items():
        np.testing.assert_allclose(array, theirs[name], rtol=1e-5, atol=1e-6)

    longer = rng.standard_normal((max_steps, 4)).astype(np.float32)
    ours.update(list(longer), [0] * max_steps, [1.0] * max_steps)
    assert len(ours.train_step._compiled) == 1
    probabilities = ours.probabilities(obs[0])
    assert probabilities.shape == (2,) and probabilities.sum() == pytest.approx(1.0, abs=1e-6)
