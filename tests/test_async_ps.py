"""graphc.distributed.AsyncStep: the parameter server under `mpiexec -n 2` and `-n 3` (one server,
one or two workers) running tests/mpi_scripts/async_train.py, each job bounded by a timeout."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import optim
from graphc.distributed import AsyncStats, AsyncStep, DistributedError, World
from graphc.train import training_state
from test_distributed import SCRIPTS, launch, load_script, needs_mpi

SCRIPT = os.path.join(SCRIPTS, "async_train.py")


def single_process_run(workers: int, steps: int = 3, epochs: int = 1):
    """The synchronous reference: one process stepping on the same rows, workers*BATCH a step."""
    script = load_script("ddp_steps")
    gc.manual_seed(0)
    model = script.plain_model()
    data = script.batches(steps, workers * script.BATCH)
    step = gc.compile_train_step(model, F.cross_entropy, script.optimizer(model), data[0],
                                 backend="reference", clip_grad_norm=1.0)
    losses = [[step(*batch) for batch in data] for _ in range(epochs)]
    return [float(np.mean(epoch)) for epoch in losses], training_state(step)


def assert_state_close(got: dict, expected: dict) -> None:
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_an_async_step_needs_a_server_and_a_worker():
    model = load_script("ddp_steps").plain_model()
    x, y = np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)
    with pytest.raises(DistributedError, match="needs a server and at least one worker"):
        AsyncStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), (x, y),
                  world=World())


def test_stats_report_staleness_per_worker_and_throughput():
    stats = AsyncStats(seconds=2.0)
    for worker, staleness in [(1, 0), (1, 2), (2, 1), (2, 1)]:
        stats.record(worker, staleness, samples=8)
    assert stats.staleness_mean(1) == 1.0 and stats.staleness_max(1) == 2
    assert stats.staleness_mean() == 1.0 and stats.staleness_max() == 2
    assert stats.samples_per_s == 16.0
    summary = stats.summary()
    assert summary["workers"]["2"]["staleness_histogram"] == {1: 2}
    assert summary["workers"]["1"]["pushes"] == 2


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_max_staleness_zero_is_synchronous_training(tmp_path, ranks):
    """One worker: the single-process step on each batch in turn; two workers: every update is
    the mean of both pushes, the single-process step on both halves (as data parallelism)."""
    status, output = launch([SCRIPT, str(tmp_path), "--staleness", "0", "--epochs", "2"],
                            ranks=ranks)
    assert status == 0, output
    losses, expected = single_process_run(ranks - 1, epochs=2)
    final = dict(np.load(tmp_path / "final.npz"))
    np.testing.assert_allclose(final["losses"], losses, rtol=1e-5)
    assert_state_close(final, expected)
    for worker in range(1, ranks):  # fit leaves every rank with the server's state
        assert_state_close(dict(np.load(tmp_path / f"worker{worker}.npz")), expected)
    stats = json.load(open(tmp_path / "stats.json"))
    assert stats["updates"] == 6 and stats["staleness_max"] == 0


@needs_mpi
def test_a_straggler_falls_at_most_max_staleness_versions_behind(tmp_path):
    """Rank 2 sleeps 0.3 s per gradient; rank 1 takes milliseconds, so it runs ahead until the
    bound holds it: rank 2's gradients are applied exactly 2 versions stale."""
    status, output = launch([SCRIPT, str(tmp_path), "--staleness", "2", "--steps", "6",
                             "--slow-rank", "2"], ranks=3)
    assert status == 0, output
    stats = json.load(open(tmp_path / "stats.json"))
    fast, slow = stats["workers"]["1"], stats["workers"]["2"]
    assert fast["pushes"] + slow["pushes"] == 12
    assert fast["pushes"] > 2 * slow["pushes"] - 2  # the fast worker took most batches
    assert slow["staleness_max"] == 2 and stats["staleness_max"] == 2
    assert fast["staleness_max"] == 0  # never stale: it always had the newest version


@needs_mpi
def test_a_worker_leaving_quietly_ends_the_job_naming_it(tmp_path):
    status, output = launch([SCRIPT, str(tmp_path), "--fail", "exit", "--fail-rank", "2",
                             "--fail-at", "2"], ranks=3, timeout=60, GRAPHC_DDP_TIMEOUT="8")
    assert status != 0
    assert "rank 0 of 3: worker rank 2 pushed no gradients within 8 s" in output


@needs_mpi
def test_a_server_leaving_quietly_ends_the_job_naming_it(tmp_path):
    status, output = launch([SCRIPT, str(tmp_path), "--fail", "exit", "--fail-rank", "0",
                             "--fail-at", "2"], ranks=2, timeout=60, GRAPHC_DDP_TIMEOUT="8")
    assert status != 0
    assert "rank 1 of 2: waiting for the server's reply did not complete within 8 s" in output
    assert "rank 0 has exited or is stuck" in output


@needs_mpi
def test_a_killed_worker_ends_the_job(tmp_path):
    status, output = launch([SCRIPT, str(tmp_path), "--fail", "kill", "--fail-rank", "1",
                             "--fail-at", "2"], ranks=3, timeout=60)
    assert status != 0
    assert "injecting 'kill' on rank 1" in output and "Killed (signal 9)" in output


@needs_mpi
def test_a_worker_computing_on_changed_parameters_is_caught(tmp_path):
    """Worker 1's copy is changed before its 3rd gradient, the push that carries digests
    (check_every=3). Each reply overwrites the copy, so only a check push can see a change."""
    status, output = launch([SCRIPT, str(tmp_path), "--perturb-at", "3", "--check-every", "3",
                             "--steps", "4"], ranks=2, timeout=60)
    assert status != 0
    assert ("replicas diverged: worker rank 1 computed push 3 on a 'model/0.weight' that "
            "differs from the server's") in output


@needs_mpi
@pytest.mark.slow
def test_the_servers_checkpoint_resumes_training_exactly(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    args = ["--staleness", "0", "--epochs", "3"]
    status, output = launch([SCRIPT, str(straight), *args])
    assert status == 0, output
    # the worker dies in the second epoch, after the server checkpointed the first
    status, output = launch([SCRIPT, str(interrupted), *args, "--fail", "kill", "--fail-rank",
                             "1", "--fail-at", "5"])
    assert status != 0 and '"epoch": 1' in output and '"epoch": 2' not in output
    status, output = launch([SCRIPT, str(interrupted), *args, "--resume"])
    assert status == 0, output
    assert '"epoch": 1' not in output and '"epoch": 3' in output
    expected, resumed = (dict(np.load(d / "final.npz")) for d in (straight, interrupted))
    np.testing.assert_allclose(resumed["losses"], expected["losses"][1:], rtol=1e-6)
    for name in expected:
        if name not in ("losses", "val_accuracy"):
            np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


@needs_mpi
def test_validation_gives_the_loss_every_target_of_a_step_with_several(tmp_path):
    """AsyncStep compiled its validation model with the first target as an input, and the job
    died after its first epoch."""
    from graphc import data
    from graphc.train import fit
    script = load_script("async_two_targets")
    status, output = launch([os.path.join(SCRIPTS, "async_two_targets.py")], timeout=240)
    assert status == 0, output
    logs = json.loads(next(line for line in output.splitlines() if line.startswith("{")))
    x, labels, values = script.arrays()
    net = script.model()
    single = gc.compile_train_step(net, script.loss, optim.SGD(net.parameters(), lr=0.1),
                                   (x[:16], labels[:16], values[:16]), backend="reference", targets=2)
    expected = fit(single, data.DataLoader(data.TensorDataset(x, labels, values), 16), 1,
                   val_loader=data.DataLoader(data.TensorDataset(x[:20], labels[:20], values[:20]), 8),
                   progress=False).epochs[0]
    np.testing.assert_allclose(logs["val_loss"], expected["val_loss"], rtol=1e-6)
    np.testing.assert_allclose(logs["val_accuracy"], expected["val_accuracy"])


@pytest.mark.parametrize("text, message", [
    (b"{nope", "is not valid JSON"), (b"[1, 2]", "must hold"), (b'{"epoch": -5, "version": 0}', "must hold"),
    (b'{"epoch": 1, "version": 1e400}', "must hold"), (None, "no such file"),
])
def test_a_damaged_epoch_file_is_a_load_error_naming_it(tmp_path, text, message):
    """It was read with a bare json.load: JSONDecodeError, TypeError, OverflowError."""
    from graphc.distributed.async_ps import _read_epoch_file
    from graphc.ir.errors import LoadError
    path = tmp_path / "ck.safetensors.epoch.json"
    if text is not None:
        path.write_bytes(text)
    with pytest.raises(LoadError, match=message) as info:
        _read_epoch_file(str(path))
    assert str(path) in str(info.value)
