"""graphc.distributed: sharding, the split training step, and real MPI jobs on loopback.

The MPI tests launch `mpiexec -n 2` on the scripts in tests/mpi_scripts/ (each job bounded by a
timeout) and skip when mpi4py or mpiexec is missing. The rest runs in this process as a world of
one (no MPI call is made there).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import data, nn, optim
from graphc.backends import available_backends
from graphc.distributed import DataParallelStep, DistributedLoader, DistributedSampler, World, fit
from graphc.train import training_state

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "mpi_scripts")
EXAMPLE = os.path.join(HERE, os.pardir, "examples", "mnist_ddp.py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
ONE_THREAD = {name: "1" for name in ("GRAPHC_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS",
                                     "OPENBLAS_NUM_THREADS")}

needs_mpi = pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
                               reason="needs mpi4py and mpiexec (pip install mpi4py mpich)")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(SCRIPTS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(args: list[str], ranks: int = 2, timeout: float = 90, **env: str) -> tuple[int, str]:
    """Run `python args...` under `mpiexec -n ranks` (ranks=1: without mpiexec); returns
    (exit status, stdout+stderr). A job still running after `timeout` seconds fails the test:
    that bounds the time a failure may take to end the job."""
    command = [sys.executable, *args]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **ONE_THREAD, **env})
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()  # mpiexec forwards it to the ranks and cleans up
        try:
            output, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
        pytest.fail(f"{' '.join(command)} hung: still running after {timeout} s\n{output[-3000:]}")
    return proc.returncode, output


# -- sharding ----------------------------------------------------------------------------------
def test_shards_are_disjoint_equal_and_agree_on_the_permutation():
    n, size = 103, 3
    shards = [DistributedSampler(n, rank, size, seed=5).indices(epoch=2) for rank in range(size)]
    assert [len(s) for s in shards] == [n // size] * size
    together = np.concatenate(shards)
    assert len(set(together.tolist())) == len(together)  # disjoint
    assert not np.array_equal(shards[0], DistributedSampler(n, 0, size, seed=5).indices(epoch=3))


def test_kth_batches_of_all_ranks_form_the_single_process_kth_batch():
    n, size, batch = 64, 2, 4
    single = data.DataLoader(data.TensorDataset(np.arange(n)), size * batch, shuffle=True, seed=9)
    single.set_epoch(1)
    shards = [DistributedSampler(n, rank, size, seed=9).indices(1) for rank in range(size)]
    for k, (expected,) in enumerate(single):
        together = np.concatenate([s[k * batch:(k + 1) * batch] for s in shards])
        assert sorted(together) == sorted(expected)


def test_evaluation_shards_use_every_item_once():
    shards = [DistributedSampler(10, rank, 4, shuffle=False, even=False).indices(0) for rank in range(4)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(10))
    assert len(DistributedSampler(10, 1, 4, shuffle=False, even=False)) == 3


def test_sampler_refuses_fewer_items_than_ranks():
    with pytest.raises(ValueError, match="3 items cannot give each of 4 ranks"):
        DistributedSampler(3, 0, 4)


def test_a_world_of_one_loads_what_a_shuffled_dataloader_loads():
    x, y = np.arange(50, dtype=np.float32).reshape(25, 2), np.arange(25)
    ours = DistributedLoader(data.TensorDataset(x, y), 4, World(), seed=11)
    theirs = data.DataLoader(data.TensorDataset(x, y), 4, shuffle=True, seed=11, drop_last=True)
    for epoch in (0, 3):
        ours.set_epoch(epoch)
        theirs.set_epoch(epoch)
        got, expected = list(ours), list(theirs)
        assert len(got) == len(expected) == len(ours) == 6
        for (xa, ya), (xb, yb) in zip(got, expected):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(ours, ours))  # iterating has no side effect


# -- the split step in a world of one ------------------------------------------------------------
def noisy_model() -> nn.Module:
    return load_script("ddp_steps").noisy_model()


def test_one_process_step_is_the_single_graph_train_step_bit_for_bit():
    """Dropout (same RNG stream) and batch norm (buffers through the reduced buffer) included."""
    rng = np.random.default_rng(0)
    batches = [(rng.standard_normal((8, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 8))
               for _ in range(3)]
    steps = []
    for build in (gc.compile_train_step, lambda *a, **k: DataParallelStep(*a, **k, world=World())):
        gc.manual_seed(0)
        model = noisy_model()
        steps.append(build(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-2),
                           batches[0], backend="reference", clip_grad_norm=1.0))
    losses = []
    for step in steps:  # each from the same key: the same dropout masks
        gc.manual_seed(1)
        losses.append([step(*batch) for batch in batches])
    assert losses[0] == losses[1]
    single, parallel = (training_state(s) for s in steps)
    assert single.keys() == parallel.keys()
    for name in single:
        np.testing.assert_array_equal(single[name], parallel[name], err_msg=name)
    assert parallel["model/1.num_batches_tracked"] == 3 and parallel["step"] == 3
    assert steps[1].times.steps == 3 and steps[1].times.allreduce < steps[1].times.total


def test_a_step_of_one_process_follows_the_global_generator_and_switches_modes():
    """Two things a TrainStep does that the data-parallel step did not: drawing each call's
    dropout key from the global generator (it counted its own from (seed, 0): a draw before it
    made a world of one differ from the single-graph step, and two steps drew the same masks),
    and training on after model.eval() (BatchNorm's statistics then leave the reduced buffer,
    which was refused as 'a new batch signature changed which values are reduced')."""
    rng = np.random.default_rng(0)
    batch = (rng.standard_normal((8, 1, 8, 8)).astype(np.float32), rng.integers(0, 10, 8))
    steps, models = [], []
    for build in (gc.compile_train_step, lambda *a, **k: DataParallelStep(*a, **k, world=World())):
        gc.manual_seed(0)
        models.append(noisy_model())
        steps.append(build(models[-1], F.cross_entropy, optim.Adam(models[-1].parameters(), lr=1e-2),
                           batch, backend="reference"))
    losses = []
    for step, model in zip(steps, models):
        gc.manual_seed(1)
        gc.jit(lambda v: F.dropout(v, 0.5), backend="reference")(np.ones(4, np.float32))  # a draw first
        run = [step(*batch)]
        model.eval()
        run += [step(*batch), step(*batch)]
        model.train()
        losses.append(run + [step(*batch)])
    assert losses[0] == losses[1]
    for name, value in training_state(steps[0]).items():
        np.testing.assert_array_equal(training_state(steps[1])[name], value, err_msg=name)
    twins = []
    for _ in range(2):  # the same weights; each call another key: other masks, another loss
        gc.manual_seed(0)
        model = noisy_model()
        twins.append(DataParallelStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                      batch, backend="reference", world=World()))
    assert twins[0](*batch) != twins[1](*batch)


def test_the_reduced_buffer_holds_gradients_averaged_buffers_and_the_loss():
    gc.manual_seed(0)
    model = noisy_model()
    x, y = np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64)
    step = DataParallelStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                            (x, y), backend="reference", world=World())
    keys = [key for key, _ in step.layout.slots]
    assert keys[-1] == "loss" and "buffer:1.running_mean" in keys
    assert "buffer:1.num_batches_tracked" not in keys  # int64: stays a local in-place update
    assert step.layout.size == sum(p.size for p in model.parameters()) + 2 * 4 + 1
    assert step.graph.outputs[0][0] == "reduced"
    with pytest.raises(gc.GraphcError, match="two graphs around an allreduce"):
        step.export("unused.graphc")


def test_a_replaced_activation_is_followed_and_a_replaced_trained_layer_refused():
    """As by a single-process step: after `model[1] = nn.Tanh()` both step the edited model
    alike; replacing a trained layer needs a new optimizer and step."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((6, 3)).astype(np.float32), rng.integers(0, 2, 6)
    steps, models = [], []
    for build in (gc.compile_train_step, lambda *a, **k: DataParallelStep(*a, **k, world=World())):
        gc.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        steps.append(build(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), (x, y),
                           backend="reference"))
        models.append(model)
    assert steps[0](x, y) == steps[1](x, y)
    for model in models:
        model[1] = nn.Tanh()
    assert steps[0](x, y) == steps[1](x, y)
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        np.testing.assert_array_equal(a, b)
    models[1][2] = nn.Linear(4, 2)
    with pytest.raises(gc.GraphcError, match="build a new optimizer and step"):
        steps[1](x, y)


def test_fit_in_a_world_of_one_resumes_from_its_checkpoint(tmp_path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 1, 8, 8)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64)
    path = str(tmp_path / "ckpt.safetensors")

    def run(epochs: int, resume: bool) -> dict[str, np.ndarray]:
        gc.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Dropout(0.3), nn.Linear(8, 2))
        step = DataParallelStep(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-2),
                                (x[:8], y[:8]), backend="reference", world=World())
        loader = DistributedLoader(data.TensorDataset(x, y), 8, World(), seed=1)
        history = fit(step, loader, epochs, checkpoint_path=path, resume_from_checkpoint=resume,
                      progress=False)
        return training_state(step), history

    straight, history = run(3, resume=False)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
    os.remove(path)
    run(1, resume=False)
    resumed, history = run(3, resume=True)
    assert [e["epoch"] for e in history.epochs] == [2, 3]
    for name in straight:
        np.testing.assert_array_equal(straight[name], resumed[name], err_msg=name)


# -- real ranks ----------------------------------------------------------------------------------
def ranks_state(out_dir) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(os.path.join(out_dir, f"rank{r}.npz"))) for r in range(2)]


@needs_mpi
@pytest.mark.parametrize("backend", ["reference", pytest.param("numba-cpu", marks=pytest.mark.slow)])
def test_two_ranks_end_with_identical_parameters_and_optimizer_state(tmp_path, backend):
    """Ranks start from different seeds and see different data: the broadcast and the reduced
    gradients must still leave them identical (buffers averaged, dropout masks per rank)."""
    if backend not in available_backends():
        pytest.skip(f"backend {backend} is not available")
    status, output = launch([os.path.join(SCRIPTS, "ddp_steps.py"), "identical", str(tmp_path),
                             backend], timeout=300)
    assert status == 0, output
    first, second = ranks_state(tmp_path)
    assert first.keys() == second.keys()
    for name in first:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
    assert first["step"] == 3


@needs_mpi
def test_a_two_rank_step_equals_one_process_stepping_on_both_halves(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "ddp_steps.py"), "equivalent", str(tmp_path)])
    assert status == 0, output
    script = load_script("ddp_steps")
    gc.manual_seed(0)
    model = script.plain_model()
    single = gc.compile_train_step(model, F.cross_entropy, script.optimizer(model),
                                   script.batches()[0], backend="reference", clip_grad_norm=1.0)
    losses = [single(*batch) for batch in script.batches()]
    expected = training_state(single)
    for state in ranks_state(tmp_path):
        np.testing.assert_allclose(state["losses"], losses, rtol=1e-6)
        for name in expected:
            np.testing.assert_allclose(state[name], expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


@needs_mpi
def test_ranks_that_build_different_models_refuse_to_start(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "ddp_steps.py"), "mismatch", str(tmp_path)])
    assert status != 0
    assert "ranks [1] disagree with rank 0" in output and "aborting all ranks" in output
    assert not os.listdir(tmp_path)


@needs_mpi
@pytest.mark.parametrize("mode, message", [
    ("eval_on_one_rank", "ranks [1] disagree with rank 0 on the gradients' layout"),
    ("dataset_length", "ranks [1] disagree with rank 0 on the dataset's length")])
def test_ranks_that_disagree_while_training_end_the_job_saying_on_what(mode, message):
    """A rank switched to eval() summed a shorter buffer with the others' (misaligned means,
    different 'global' losses, exit 0); ranks sharding datasets of other lengths shared rows."""
    status, output = launch([os.path.join(SCRIPTS, "async_and_disagreements.py"), mode], timeout=60)
    assert status != 0 and message in output, output
    assert "stepped with" not in output and "sharded datasets" not in output


@needs_mpi
def test_an_async_epoch_trains_the_short_last_batch_a_loader_keeps():
    """With drop_last=False the last 6 of 30 rows (batches of 8) were never trained on."""
    status, output = launch([os.path.join(SCRIPTS, "async_and_disagreements.py"), "async_short_batch"], timeout=60)
    assert status == 0, output
    assert "updates 4, samples {1: 30}" in output


@needs_mpi
def test_an_async_step_advances_batch_norms_count_as_one_process_does():
    """The server never advanced integer buffers: after fit every rank held a count of 0, and a
    second fit restarted BatchNorm(momentum=None)'s running average."""
    status, output = launch([os.path.join(SCRIPTS, "async_and_disagreements.py"), "async_batch_norm"],
                            timeout=90)
    assert status == 0, output
    assert "count 8 of 8, running mean off by 0" in output


@pytest.mark.parametrize("value", ["nan", "0", "-5", "inf", "abc"])
def test_a_timeout_that_is_no_duration_is_refused(monkeypatch, value):
    """NaN never expired (a stuck rank hung the job forever), 0 and -5 aborted the first
    collective blaming another rank, and 'abc' was a bare ValueError."""
    from graphc.distributed.data_parallel import DistributedError, _timeout

    monkeypatch.setenv("GRAPHC_DDP_TIMEOUT", value)
    with pytest.raises(DistributedError, match=f"GRAPHC_DDP_TIMEOUT='{value}': expected a number of seconds > 0"):
        _timeout()
    monkeypatch.setenv("GRAPHC_DDP_TIMEOUT", "2.5")
    assert _timeout() == 2.5


@needs_mpi
def test_a_killed_rank_ends_the_job(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "ddp_fit.py"), str(tmp_path),
                                      "--fail", "kill", "--fail-at", "2"], timeout=60)
    assert status != 0
    assert "injecting 'kill' on rank 1" in output and "Killed (signal 9)" in output


@needs_mpi
def test_a_rank_raising_ends_the_job_and_says_which_and_why(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "ddp_fit.py"), str(tmp_path),
                                      "--fail", "raise", "--fail-at", "2"], timeout=60)
    assert status != 0
    assert "RuntimeError: injected failure" in output
    assert "rank 1 of 2: failed with RuntimeError: injected failure; aborting all ranks" in output


@needs_mpi
@pytest.mark.slow
def test_a_rank_leaving_quietly_trips_the_others_deadline(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "ddp_fit.py"), str(tmp_path),
                                      "--fail", "exit", "--fail-at", "2"], timeout=60,
                                     GRAPHC_DDP_TIMEOUT="3")
    assert status != 0
    # (the step's first collective: the check that the ranks' gradients are laid out alike)
    assert "rank 0 of 2: the allgather checking the gradients' layout" in output
    assert "did not complete within 3 s" in output


@needs_mpi
@pytest.mark.slow
def test_after_a_killed_rank_the_checkpoint_is_intact_and_training_resumes_exactly(tmp_path):
    script = [os.path.join(SCRIPTS, "ddp_fit.py")]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    straight.mkdir(), interrupted.mkdir()
    status, output = launch([*script, str(straight), "--epochs", "3"])
    assert status == 0, output
    fit_script = load_script("ddp_fit")
    steps_per_epoch = fit_script.SAMPLES // (2 * fit_script.BATCH)
    # rank 1 dies in the second epoch, after rank 0 saved the first epoch's checkpoint
    status, output = launch([*script, str(interrupted), "--epochs", "3", "--fail", "kill",
                                "--fail-at", str(steps_per_epoch + 2)])
    assert status != 0 and '"epoch": 1' in output and '"epoch": 2' not in output
    from safetensors.numpy import load_file
    checkpoint = load_file(str(interrupted / "checkpoint.safetensors"))
    expected = dict(np.load(straight / "final.npz"))
    assert checkpoint.keys() == expected.keys()
    assert float(checkpoint["step"].reshape(())) == steps_per_epoch
    status, output = launch([*script, str(interrupted), "--epochs", "3", "--resume"])
    assert status == 0, output
    assert '"epoch": 1' not in output and '"epoch": 3' in output
    resumed = dict(np.load(interrupted / "final.npz"))
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_the_example_trains_alone_and_on_two_ranks(ranks):
    status, output = launch([EXAMPLE, "--digits", "--backend", "reference", "--epochs", "1",
                                "--limit", "640", "--no-progress"], ranks=ranks, timeout=180)
    assert status == 0, output
    assert f"{ranks} rank(s), backend reference: {640 // (32 * ranks)} steps per epoch" in output
    accuracy = float(output.split("eval accuracy ")[1].split(",")[0])
    assert accuracy > 0.3  # ten classes: well above chance after one epoch
    assert output.count("epoch 1:") == 1  # only rank 0 logs
