"""numba-cpu executables that GRAPHC_NUM_THREADS does not pin time their calls and run on all
threads or one, whichever is faster (backends/numba_cpu/thread_choice.py). The choice's logic on
made-up times, then a training step: it tries both counts, its results are bitwise those of a
step pinned to one thread, and the caller's thread count is left as it was."""
import numba
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc import optim
from graphc.backends.numba_cpu.codegen_common import always_parallel
from graphc.backends.numba_cpu.thread_choice import (FIRST_INTERVAL, LONGEST_INTERVAL, PROBE,
                                                     TRIALS, ThreadChoice)


def run_calls(choice: ThreadChoice, seconds_on: dict[int, float], calls: int) -> list[int]:
    """The thread counts of `calls` calls, each taking `seconds_on[threads]`."""
    used = []
    for _ in range(calls):
        threads = choice.threads()
        used.append(threads)
        choice.record(threads, seconds_on[threads])
    return used


def test_the_first_calls_try_both_counts_and_keep_the_faster():
    choice = ThreadChoice(4)
    assert sorted(run_calls(choice, {4: 1.0, 1: 2.0}, 2 * TRIALS)) == [1] * TRIALS + [4] * TRIALS
    assert choice.chosen == 4
    busy = ThreadChoice(4)
    run_calls(busy, {4: 9.0, 1: 2.0}, 2 * TRIALS)
    assert busy.chosen == 1


def test_a_probe_that_loses_makes_the_next_one_wait_twice_as_long():
    choice = ThreadChoice(2)
    times = {2: 1.0, 1: 1.6}
    run_calls(choice, times, 2 * TRIALS)
    used = run_calls(choice, times, FIRST_INTERVAL + PROBE)
    assert used == [2] * FIRST_INTERVAL + [1] * PROBE
    assert choice.chosen == 2 and choice.interval == 2 * FIRST_INTERVAL
    run_calls(choice, times, 20 * LONGEST_INTERVAL)
    assert choice.interval == LONGEST_INTERVAL  # capped: the machine's load may still change


def test_when_the_machine_gets_busy_the_next_probe_switches_to_one_thread():
    choice = ThreadChoice(2)
    run_calls(choice, {2: 1.0, 1: 1.6}, 2 * TRIALS)
    used = run_calls(choice, {2: 12.0, 1: 1.7}, FIRST_INTERVAL + PROBE + 5)
    assert used[-5:] == [1] * 5 and choice.chosen == 1
    assert choice.interval == FIRST_INTERVAL
    # and back once the load is gone
    run_calls(choice, {2: 1.0, 1: 1.6}, FIRST_INTERVAL + PROBE)
    assert choice.chosen == 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 6 * 6, 5)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(F.dropout(h, 0.2).reshape(x.shape[0], -1))


def train(monkeypatch, pin: str | None, steps: int):
    if pin is None:
        monkeypatch.delenv("GRAPHC_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("GRAPHC_NUM_THREADS", pin)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3, 12, 12)).astype("float32"), rng.integers(0, 5, 6)
    gc.manual_seed(0)
    model = Net()
    with always_parallel():  # every kernel parallel, as on a large batch
        step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.01), (x, y))
        losses = [float(step(x, y)) for _ in range(steps)]
    return step, losses, {k: np.array(v) for k, v in step.model.state_dict().items()}


def test_an_unpinned_step_tries_both_counts_with_bitwise_the_same_results(monkeypatch):
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here: there is nothing to choose")
    steps = 1 + 2 * TRIALS + 3
    previous = numba.get_num_threads()
    step, losses, weights = train(monkeypatch, None, steps)
    choice = step.executable._thread_choice
    assert [len(choice.times[c]) for c in choice.counts] == [TRIALS, TRIALS]
    assert choice.chosen in choice.counts
    assert numba.get_num_threads() == previous  # restored after every call
    _, pinned_losses, pinned_weights = train(monkeypatch, "1", steps)
    assert losses == pinned_losses
    for name in weights:
        np.testing.assert_array_equal(weights[name], pinned_weights[name], err_msg=name)
    numba.set_num_threads(previous)


def test_a_pinned_step_does_not_choose(monkeypatch):
    step, _, _ = train(monkeypatch, "1", 2)
    assert step.executable._thread_choice is None
    numba.set_num_threads(numba.config.NUMBA_NUM_THREADS)
