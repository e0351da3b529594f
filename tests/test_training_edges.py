"""Edge cases of the fit loop, the `graphc train` command, the data helpers and the metrics: one
regression test per bug, each failing before its fix."""
import faulthandler
import hashlib
import json
import math
import os
import struct
import sys
import zipfile

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.cli import main
from graphc.data import DataLoader, DatasetError, Subset, TensorDataset, read_idx
from graphc.ir.errors import GraphcError, LoadError
from graphc.metrics import MetricError, confusion_matrix, precision_recall_f1, roc_auc
from graphc.train import EarlyStopping, evaluate, fit, load_checkpoint, save_checkpoint, training_state

REF = "reference"


def setup(out=3):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, out))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32)
    y = rng.integers(0, 3 if out > 1 else 2, 32)
    return model, x, y


def train_step(model, x, y, loss=F.cross_entropy, lr=0.0):
    return gc.compile_train_step(model, loss, optim.SGD(model.parameters(), lr=lr),
                                 example_inputs=(x[:8], y[:8]), backend=REF)


# -- fit -------------------------------------------------------------------------------------

def test_a_generator_val_loader_is_validated_whole_in_every_epoch():
    model, x, y = setup()
    step = train_step(model, x, y)  # lr 0: the weights, so the validation loss, stay put
    val = [(x[16:24], y[16:24]), (x[24:32], y[24:32])]
    expected = evaluate(gc.compile(model, x[16:24], backend=REF), F.cross_entropy, val)["loss"]
    history = fit(step, [(x[:8], y[:8])], epochs=2, val_loader=(b for b in val), progress=False)
    assert history["val_loss"] == pytest.approx([expected, expected])


def test_an_epoch_without_batches_is_an_error_not_a_zero_loss():
    model, x, y = setup()
    step = train_step(model, x, y)
    short = DataLoader(TensorDataset(x[:16], y[:16]), 32, drop_last=True)
    with pytest.raises(GraphcError, match="train_loader .*no batch in epoch 1.*drop_last"):
        fit(step, short, epochs=2, progress=False)
    with pytest.raises(GraphcError, match="no batch in epoch 2: an iterator is used up"):
        fit(step, iter([(x[:8], y[:8])]), epochs=3, early_stopping=EarlyStopping("loss"),
            progress=False)
    empty_val = DataLoader(TensorDataset(x[:4], y[:4]), 8, drop_last=True)
    with pytest.raises(GraphcError, match="val_loader .* is empty"):
        fit(step, [(x[:8], y[:8])], val_loader=empty_val, progress=False)
    with pytest.raises(GraphcError, match="val_loader .* is empty"):
        fit(step, [(x[:8], y[:8])], val_loader=iter([]), progress=False)
    assert step.step_count == 1  # the iterator's one batch: the empty val_loaders stopped fit early


def test_a_single_logit_binary_classifier_validates_without_class_metrics():
    model, x, y = setup(out=1)

    def loss(out, t):
        return F.binary_cross_entropy_with_logits(out.reshape(-1), t.astype(np.float32))

    step = train_step(model, x, y, loss=loss, lr=0.1)
    history = fit(step, DataLoader(TensorDataset(x[:16], y[:16]), 8), epochs=1,
                  val_loader=DataLoader(TensorDataset(x[16:], y[16:]), 8), progress=False)
    logs = history.epochs[0]
    assert np.isfinite(logs["val_loss"]) and "val_accuracy" not in logs


def test_early_stopping_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="mode must be one of .*'Min'"):
        EarlyStopping(mode="Min")
    assert EarlyStopping(mode="max").mode == "max"


def test_early_stopping_on_a_validation_metric_needs_a_val_loader():
    model, x, y = setup()
    with pytest.raises(GraphcError, match="monitors 'val_loss'.*no val_loader"):
        fit(train_step(model, x, y), [(x[:8], y[:8])], early_stopping=EarlyStopping(),
            progress=False)


def test_a_loaded_step_checkpoints_and_stops_early(tmp_path):
    model, x, y = setup()
    step = train_step(model, x, y, lr=0.1)
    step(x[:8], y[:8])
    step.export(str(tmp_path / "step.gcx"))
    loaded = gc.load(str(tmp_path / "step.gcx"), backend=REF)
    batches = [(x[:8], y[:8]), (x[8:16], y[8:16])]
    stopper = EarlyStopping(monitor="loss", patience=1, min_delta=1e9)
    history = fit(loaded, batches, epochs=5, early_stopping=stopper, progress=False,
                  checkpoint_path=str(tmp_path / "ck.safetensors"))
    assert history.stopped_early and history.best_epoch == 1
    assert loaded.step_count == 5  # the best weights (after epoch 1) restored; the count goes on

    # the loaded step's checkpoint restores into it, and into the step it was exported from
    save_checkpoint(str(tmp_path / "best.safetensors"), loaded)
    expected = loaded(*batches[0])
    load_checkpoint(str(tmp_path / "best.safetensors"), loaded)
    assert loaded(*batches[0]) == expected
    load_checkpoint(str(tmp_path / "best.safetensors"), step)
    assert step(*batches[0]) == pytest.approx(expected)

    with pytest.raises(GraphcError, match="val_loader needs the model's code"):
        fit(loaded, batches, val_loader=batches, progress=False)


def test_restoring_the_best_weights_leaves_the_optimizer_count_and_key_going(tmp_path):
    """The restore copied back the whole training state: the step count and Adam's moments
    rewound, and a loaded step's random key too (a compiled step's key was a copy, so it went
    on): the same step, in memory and exported, then drew other dropout masks. Only the
    model's weights come back, as Keras restores them."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((32, 4)).astype(np.float32), rng.integers(0, 3, 32)
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.05),
                                 example_inputs=(x, y), backend=REF)
    step.export(str(tmp_path / "step.gcx"))
    loaded = gc.load(str(tmp_path / "step.gcx"), backend=REF)
    after = []
    for trained in (step, loaded):
        stopper = EarlyStopping("loss", patience=2, mode="max", min_delta=100.0)  # epoch 1 stays best
        fit(trained, [(x, y)] * 3, epochs=10, early_stopping=stopper, progress=False)
        assert trained.step_count == 9 and stopper.best_epoch == 1
        after.append([trained(x, y) for _ in range(3)])
    assert after[0] == after[1]


# -- graphc train ----------------------------------------------------------------------------

def write_idx(path, array):
    """An uncompressed IDX file of a uint8 array."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def mnist_dir(directory, count):
    directory.mkdir()
    write_idx(directory / "t10k-images-idx3-ubyte", np.zeros((count, 28, 28), np.uint8))
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(count) % 10)
    return str(directory)


@pytest.fixture(scope="module")
def mnist_step(tmp_path_factory):
    """An exported step taking MNIST images in batches of 8."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    x, y = np.zeros((8, 1, 28, 28), np.float32), np.zeros(8, np.int64)
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (x, y), backend=REF)
    path = str(tmp_path_factory.mktemp("cli") / "linear.gcx")
    step.export(path)
    return path


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_train_refuses_fewer_than_one_step(mnist_step, tmp_path, capsys, steps):
    with pytest.raises(SystemExit) as stop:
        main(["train", mnist_step, "--data", str(tmp_path), "--steps", steps, "--quiet"])
    assert stop.value.code == 2
    assert "--steps: must be at least 1" in capsys.readouterr().err


def test_train_refuses_data_without_a_full_batch(mnist_step, tmp_path, capsys):
    data = mnist_dir(tmp_path / "mnist", 5)
    # the bug hung here: end the run loudly instead
    faulthandler.dump_traceback_later(60, exit=True, file=sys.__stderr__)
    try:
        assert main(["train", mnist_step, "--data", data, "--steps", "1", "--quiet",
                     "--backend", REF]) == 1
    finally:
        faulthandler.cancel_dump_traceback_later()
    assert "has 5 training images, fewer than the step's batch of 8" in capsys.readouterr().err


def test_train_uses_only_the_data_directory_given(mnist_step, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAPHC_MNIST_DIR", mnist_dir(tmp_path / "elsewhere", 16))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", mnist_step, "--data", str(empty), "--steps", "1", "--quiet",
                 "--backend", REF]) == 1
    assert f"{empty}: no MNIST file t10k-images-idx3-ubyte" in capsys.readouterr().err


# -- data ------------------------------------------------------------------------------------

def test_subset_reads_a_boolean_mask_as_numpy_does():
    dataset = TensorDataset(np.arange(5) * 10)
    subset = Subset(dataset, np.array([False, False, False, True, True]))
    assert subset.indices.tolist() == [3, 4] and subset.take(np.arange(2))[0].tolist() == [30, 40]
    with pytest.raises(IndexError, match="boolean mask must have the dataset's length 5"):
        Subset(dataset, [True, False])
    with pytest.raises(TypeError, match="integers or a boolean mask, got float64"):
        Subset(dataset, np.array([0.0, 1.5]))
    assert len(Subset(dataset, [])) == 0


@pytest.mark.parametrize("dims", [(0, 0xFFFFFFFF, 0xFFFFFFFF), (1,) * 70])
def test_read_idx_refuses_a_shape_numpy_cannot_hold(tmp_path, dims):
    path = tmp_path / "bad-idx"
    payload = b"\0" if 0 not in dims else b""  # exactly what the header declares
    path.write_bytes(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload)
    with pytest.raises(DatasetError, match=f"{path}: the IDX header declares a shape NumPy cannot"):
        read_idx(path)


def test_data_loader_refuses_a_negative_seed_and_a_boolean_batch_size():
    dataset = TensorDataset(np.arange(4))
    with pytest.raises(ValueError, match="seed must be None or a non-negative integer .*got -1"):
        DataLoader(dataset, 2, seed=-1)
    with pytest.raises(ValueError, match="batch_size must be a positive integer, got True"):
        DataLoader(dataset, True)
    assert DataLoader(dataset, np.int64(2), seed=np.int64(3)).seed == 3


# -- metrics ---------------------------------------------------------------------------------

def test_roc_auc_ranks_integer_scores_exactly():
    assert roc_auc([0, 1], np.array([2**60, 2**60 + 1])) == 1.0
    assert roc_auc([0, 1], np.array([2**63, 2**63 + 1], dtype=np.uint64)) == 1.0
    assert roc_auc([1, 0], np.array([2**60, 2**60 + 1])) == 0.0


@pytest.mark.parametrize("num_classes", [2.7, True, 0])
def test_metrics_refuse_a_num_classes_that_is_no_count(num_classes):
    with pytest.raises(MetricError, match="num_classes must be a positive integer"):
        precision_recall_f1([0, 1], [1, 1], num_classes=num_classes)
    with pytest.raises(MetricError, match="num_classes must be a positive integer"):
        confusion_matrix([0, 1], [1, 1], num_classes=num_classes)


def test_a_resumed_fit_steps_its_scheduler_to_the_epoch_it_resumes_after():
    model, x, y = setup()
    opt = optim.SGD(model.parameters(), lr=1.0)
    step = gc.compile_train_step(model, F.cross_entropy, opt, example_inputs=(x[:8], y[:8]))
    scheduler = optim.ExponentialLR(opt, gamma=0.1)
    rates = []
    fit(step, [(x[:8], y[:8])], epochs=4, progress=False, scheduler=scheduler, initial_epoch=3,
        on_epoch_start=lambda epoch: rates.append(opt.lr))
    np.testing.assert_allclose(rates, [0.01, 0.001])  # epochs 3 and 4, as if 1 and 2 had run


def test_a_resumed_fit_draws_the_shuffles_an_uninterrupted_fit_draws():
    """A fresh DataLoader given to fit(initial_epoch=3) replayed epoch 1's shuffle: each epoch
    must draw the permutation an uninterrupted run draws for it."""
    model, x, y = setup()
    drawn = {}
    for initial_epoch in (1, 3):
        loader = DataLoader(TensorDataset(x, y), 8, shuffle=True, seed=5)
        fit(train_step(model, x, y), loader, epochs=4, progress=False, initial_epoch=initial_epoch,
            on_epoch_start=lambda epoch: drawn.setdefault(initial_epoch, []).append(loader.epoch))
    assert drawn == {1: [0, 1, 2, 3], 3: [2, 3]}


def test_distributed_validation_gives_no_accuracy_for_one_output_column():
    from graphc.distributed import DistributedLoader, World
    from graphc.distributed import evaluate as distributed_evaluate
    model, x, y = setup(out=1)
    loader = DistributedLoader(TensorDataset(x, y), 8, World(), shuffle=False, even=False,
                               drop_last=False)
    compiled = gc.compile(model, x[:8])
    result = distributed_evaluate(compiled, lambda out, t: F.mse_loss(out[:, 0], t.astype(np.float32)),
                                  loader)
    assert "loss" in result and "accuracy" not in result


def test_cli_trace_with_the_wrong_number_of_example_shapes_is_a_one_line_error(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text("def predict(x):\n    return x * 2\n")
    assert main(["trace", f"{script}:predict", "--example-shapes", "f32[4]", "f32[4]",
                 "--dot", str(tmp_path / "p.dot")]) == 1
    err = capsys.readouterr().err
    assert "predict(x) cannot take the 2 --example-shapes given" in err and "Traceback" not in err


def test_cli_serve_refuses_a_port_out_of_range(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "m.gcx", "--port", "70000"])
    assert exit_.value.code == 2 and "must be at most 65535" in capsys.readouterr().err


def test_cli_inspect_reports_a_failing_dot_in_one_line(tmp_path, monkeypatch, capsys):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "dot").write_text("#!/bin/sh\necho 'Error: cannot open output file' >&2\nexit 1\n")
    (fake / "dot").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}:{__import__('os').environ['PATH']}")
    model, x, y = setup()
    compiled = gc.compile(model, x[:8])
    compiled.export(str(tmp_path / "m.gcx"))
    assert main(["inspect", str(tmp_path / "m.gcx"), "--format", "png", "-o",
                 str(tmp_path / "missing" / "g.png")]) == 1
    err = capsys.readouterr().err
    assert "dot could not write" in err and "cannot open output file" in err and "Traceback" not in err


def test_early_stopping_counts_a_nan_metric_as_no_improvement():
    """NaN from the first epoch on stopped nothing (every NaN counted as a new best)."""
    model, x, y = setup()
    step = train_step(model, x, y)
    stopper = EarlyStopping("val_loss", patience=2)
    assert [stopper.update(e, {"val_loss": math.nan}, step) for e in range(2)] == [False, True]
    assert stopper.best_epoch == -1 and stopper.best_state is None
    stopper = EarlyStopping("val_loss", patience=2)
    logs = [1.0, math.nan, 0.5, math.nan, math.nan]
    assert [stopper.update(e, {"val_loss": v}, step) for e, v in enumerate(logs)] == [
        False, False, False, False, True]
    assert (stopper.best, stopper.best_epoch) == (0.5, 2)


@pytest.mark.parametrize("recurrent", [False, True])
def test_profiling_a_training_step_does_not_train_it(recurrent):
    """step.profile (as notebook 02 runs it) timed 1 + repeat real updates of the weights."""
    gc.manual_seed(0)
    if recurrent:  # a program with a scan: its parts and loop bodies are profiled
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn, self.head = nn.GRU(4, 5, batch_first=True), nn.Linear(5, 3)

            def forward(self, x):
                return self.head(self.rnn(x)[0][:, -1])
        model = Net()
        x = np.random.default_rng(0).standard_normal((8, 6, 4)).astype(np.float32)
    else:
        model, x, _ = setup()
        x = x[:8]
    y = np.arange(8) % 3
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.1),
                                 example_inputs=(x, y), backend="numba-cpu")
    step(x, y)
    before = {k: v.copy() for k, v in training_state(step).items()}
    report = step.profile(x, y, repeat=2)
    assert report is not None and report.calls == 2 and report.rows
    after = training_state(step)
    for name, array in before.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
@pytest.mark.parametrize("view", [False, True])
def test_a_batch_over_a_weights_memory_is_read_as_it_was_at_the_call(backend, view):
    """numba-cpu wrote the new weight in place before its last read of the batch that was that
    weight (or a view of it), so the first layer's update used half-updated inputs."""
    def run(alias):
        gc.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.5),
                                     (np.zeros((4, 4), np.float32),) * 2, backend=backend)
        weight = model[2].weight
        x = (weight[:] if view else weight) if alias else weight.copy()
        step(x, np.ones((4, 4), np.float32))
        return {k: np.array(v) for k, v in model.state_dict().items()}
    separate, shared = run(False), run(True)
    for name in separate:
        np.testing.assert_array_equal(shared[name], separate[name], err_msg=name)


def test_a_checkpoint_brings_back_the_learning_rates(tmp_path):
    """A rate lowered by hand came back as the optimizer's first after a resume (PyTorch's
    optimizer state dict holds them); a file without rates (an older graphc's) keeps them, and
    rates that are no rates are refused before anything is loaded."""
    from safetensors.numpy import load, save

    def build():
        model, x, y = setup()
        opt = optim.SGD([{"params": [model[0].weight]}, {"params": list(model[2].parameters())}], lr=0.1)
        return opt, gc.compile_train_step(model, F.cross_entropy, opt, (x[:8], y[:8]), backend=REF)
    opt, step = build()
    _, x, y = setup()
    step(x[:8], y[:8])
    opt.param_groups[1]["lr"] = 0.001
    path = str(tmp_path / "ck")
    save_checkpoint(path, step)
    resumed_opt, resumed = build()
    load_checkpoint(path, resumed)
    assert [g["lr"] for g in resumed_opt.param_groups] == [0.1, 0.001]
    assert resumed(x[:8], y[:8]) == step(x[:8], y[:8])
    step.export(str(tmp_path / "step.gcx"))
    loaded = gc.load(str(tmp_path / "step.gcx"))
    loaded.lrs = [1.0, 1.0]
    load_checkpoint(path, loaded)
    assert loaded.lrs == [0.1, 0.001]

    with open(path, "rb") as f:
        data = f.read()
    arrays = load(data)
    metadata = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])["__metadata__"]
    for rates, error in ((None, None), ("[0.1]", "expected 2 finite non-negative rates"),
                         ('[0.1, "x"]', "expected 2"), ("[0.1, NaN]", "expected 2")):
        changed = {k: v for k, v in metadata.items() if "learning_rates" not in k}
        if rates is not None:  # a crafted file: its checksum matches (anyone can recompute one)
            changed["learning_rates"] = rates
            changed["sha256:learning_rates"] = hashlib.sha256(rates.encode()).hexdigest()
        with open(tmp_path / "other", "wb") as f:
            f.write(save(arrays, metadata=changed))
        resumed_opt.lr = 0.5
        if error is None:
            load_checkpoint(str(tmp_path / "other"), resumed)
            assert resumed_opt.lr == 0.5
        else:
            before = resumed.model.state_dict()["0.weight"].copy()
            resumed.model.state_dict()["0.weight"][:] = 7.0
            with pytest.raises(gc.GraphcError, match=error):
                load_checkpoint(str(tmp_path / "other"), resumed)
            assert (resumed.model.state_dict()["0.weight"] == 7.0).all() and resumed_opt.lr == 0.5
            resumed.model.state_dict()["0.weight"][:] = before


def test_a_process_forked_after_parallel_kernels_ran_gets_an_error_not_a_hang():
    """GNU OpenMP killed the forked child at its first parallel region, and a Pool waiting
    on it hung for ever; the child now raises, saying what to do."""
    import multiprocessing
    import os

    import numba

    from graphc.backends.numba_cpu.codegen_common import kernel_threads
    if kernel_threads() < 2 or not hasattr(os, "fork"):
        pytest.skip("needs parallel kernels and fork")
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU())
    x = np.ones((256, 512), np.float32)
    run = gc.compile(model, (x,), backend="numba-cpu")
    for _ in range(2):
        run(x)
    if numba.threading_layer() != "omp":
        pytest.skip("another threading layer survives fork")
    _FORKED["run"] = run  # the child inherits it (a compiled model does not pickle)
    with multiprocessing.get_context("fork").Pool(1) as pool:
        with pytest.raises(gc.GraphcError, match="forked after its parent ran them.*'spawn'"):
            pool.apply_async(_call_forked, (x,)).get(timeout=120)


_FORKED: dict = {}


def _call_forked(x):
    return _FORKED["run"](x)


def test_threads_calling_one_training_step_at_two_batch_sizes_take_turns():
    """Each batch size has its own executable (and lock): two threads stepping at batch 8 and
    256 ran at once and lost updates, each step reading weights the other was writing."""
    import threading
    import time

    gc.manual_seed(0)
    model = nn.Linear(64, 64)
    x, y = np.ones((256, 64), np.float32), np.zeros(256, np.float32)
    step = gc.compile_train_step(model, lambda out, t: out.mean() + 0.0 * t.sum(),
                                 optim.SGD(model.parameters(), lr=0.01), (x[:8], y[:8]))
    step(x, y)  # both sizes compiled
    running, most = [0], [0]

    def watched(executable):
        def call(*args):
            running[0] += 1
            most[0] = max(most[0], running[0])
            time.sleep(0.002)  # long enough for the other thread to come in, were it let
            try:
                return executable(*args)
            finally:
                running[0] -= 1
        return call
    for compiled in step._compiled.values():
        compiled.executable = watched(compiled.executable)
    threads = [threading.Thread(target=lambda n=n: [step(x[:n], y[:n]) for _ in range(20)])
               for n in (8, 256)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and step.step_count == 41


# -- what a user passes by mistake, and crafted files -------------------------------------------
def _tiny_step():
    x, y = np.ones((4, 3), np.float32), np.zeros(4, np.int64)
    model = nn.Linear(3, 2)
    return gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 example_inputs=(x, y), backend=REF), x, y


def test_load_state_dict_of_a_path_says_to_read_the_file_first():
    """A path was split into characters: `missing keys [...], unexpected keys ['.', 'a', ...]`,
    and with strict=False an AttributeError."""
    for strict in (True, False):
        with pytest.raises(TypeError, match="expected a mapping of names to arrays, got str .a file's path"):
            nn.Linear(3, 2).load_state_dict("weights.safetensors", strict=strict)


def test_an_inference_function_is_refused_where_a_training_step_is_needed(tmp_path):
    """An inference export given to save_checkpoint failed with `'LoadedFunction' object has no
    attribute 'model'`, and fit said it `expected 1 inputs (input0), got 2`."""
    model = nn.Linear(3, 2)
    compiled = gc.compile(model, np.ones((4, 3), np.float32))
    compiled.export(str(tmp_path / "f.gcx"))
    for function in (compiled, gc.load(str(tmp_path / "f.gcx"))):
        for call in (lambda: save_checkpoint(str(tmp_path / "ck"), function),
                     lambda: load_checkpoint(str(tmp_path / "ck"), function),
                     lambda: fit(function, [(np.ones((4, 3), np.float32), np.zeros(4, np.int64))], progress=False)):
            with pytest.raises(GraphcError, match="expects a training step .*got an inference function"):
                call()


def test_fit_says_a_batch_must_be_a_tuple():
    """A loader of dicts ({'x': x, 'y': y}, common in PyTorch code) had its keys passed as the
    step's inputs: `arrays of dtype <U1 (str) are not supported`."""
    step, x, y = _tiny_step()
    with pytest.raises(GraphcError, match=r"each batch must be a tuple \(inputs..., target\).*dict "
                                          r"with keys \['x', 'y'\]"):
        fit(step, [{"x": x, "y": y}], progress=False)
    with pytest.raises(gc.InputError, match="is a dict, not an array"):
        step({"x": x, "y": y})


@pytest.mark.parametrize("key, value", [("learning_rates", "[1" + "0" * 400 + "]"),
                                        ("schedule", '[{"initial_lr": 1' + "0" * 400 + "}]")])
def test_a_checkpoints_rate_too_large_for_a_float_is_a_load_error(tmp_path, key, value):
    """`OverflowError: int too large to convert to float` escaped from math.isfinite."""
    step, _, _ = _tiny_step()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(str(path), step)
    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    header["__metadata__"][key] = value
    header["__metadata__"]["sha256:" + key] = hashlib.sha256(value.encode()).hexdigest()
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size:])
    with pytest.raises(LoadError, match=f"{key}: expected 1 (groups of )?finite non-negative rates"):
        load_checkpoint(str(path), step)


def test_a_name_near_the_systems_limit_is_written(tmp_path):
    """The temporary file's name added ~22 bytes to the name: a legal 240-byte name failed
    with `File name too long`."""
    step, _, _ = _tiny_step()
    path = tmp_path / ("c" * 228 + ".safetensors")
    save_checkpoint(str(path), step)
    step.export(str(path))
    assert gc.load(str(path)).step_count == 0
    assert os.listdir(tmp_path) == [path.name]


def _rewrite_checkpoint(path, **arrays):
    """The checkpoint at `path` with `arrays` in place of its own, checksums made anew."""
    from safetensors import safe_open
    from safetensors.numpy import load, save

    from graphc.export import tensor_digest

    with safe_open(str(path), "np") as f:
        metadata = f.metadata()
    state = {**load(path.read_bytes()), **arrays}
    metadata.update({f"sha256/{k}": tensor_digest(v) for k, v in arrays.items()})
    path.write_bytes(save(state, metadata=metadata))


@pytest.mark.parametrize("count", [np.nan, np.inf, -5.0, 2.5])
def test_a_step_count_that_is_no_count_is_refused_at_load(tmp_path, count):
    """A checksummed NaN, infinite or negative count loaded; `step_count`, `graphc info` and
    `graphc train` then failed with bare ValueErrors and OverflowErrors."""
    from safetensors.numpy import load

    from graphc.export import _archive

    step, x, y = _tiny_step()
    step.export(str(tmp_path / "ok.gcx"))
    with zipfile.ZipFile(tmp_path / "ok.gcx") as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    state = load(members.pop("state.safetensors"))
    state["step"] = np.array([count], np.float32)
    (tmp_path / "bad.gcx").write_bytes(_archive(members, state))
    with pytest.raises(LoadError, match="the step count 'step' must be one whole number >= 0"):
        gc.load(str(tmp_path / "bad.gcx"))
    save_checkpoint(str(tmp_path / "ck"), step)
    _rewrite_checkpoint(tmp_path / "ck", step=np.array([count], np.float32))
    with pytest.raises(LoadError, match="the step count must be a whole number >= 0"):
        load_checkpoint(str(tmp_path / "ck"), step)


def test_an_export_after_fit_takes_the_full_batch_when_the_short_one_ran_as_often(tmp_path):
    """1000 samples in batches of 512 run 512 and 488 once each an epoch: the tie went to the
    most recent signature, so the export (and `graphc train` from it) was at 488."""
    step, _, _ = _tiny_step()
    x, y = np.ones((10, 3), np.float32), np.zeros(10, np.int64)
    fit(step, DataLoader(TensorDataset(x, y), batch_size=6), epochs=2, progress=False)
    step.export(str(tmp_path / "s.gcx"))
    loaded = gc.load(str(tmp_path / "s.gcx"))
    assert [str(inp.value.type) for inp in loaded.graph.inputs if inp.role == "data"][:2] == ["f32[6,3]", "i64[6]"]


def test_fit_takes_a_0d_target_and_a_step_names_a_batch_of_the_wrong_arity():
    """fit failed with `len() of unsized object` after training on a 0-d target; a step called
    with one array too few traced the model again and failed inside its forward."""
    class Total(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 1)

        def forward(self, x):
            return self.linear(x).sum()
    model, x, t = Total(), np.ones((4, 3), np.float32), np.array(2.0, np.float32)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.01), (x, t),
                                 backend=REF)
    assert np.isfinite(fit(step, [(x, t)], progress=False)["loss"][0])
    with pytest.raises(GraphcError, match=r"train_step: takes 2 arrays, the model's inputs then 1 "
                                          r"target\(s\), as its example inputs; got 1"):
        step(x)


def test_empty_multiclass_input_to_roc_auc_is_refused():
    with pytest.raises(MetricError, match="y_true is empty"):
        roc_auc(np.zeros(0, np.int64), np.zeros((0, 0)))


def test_unsigned_labels_and_indices_beyond_int64_are_refused_not_wrapped():
    """uint64 2**63 was cast to -2**63 (accuracy 1.0 against it) and 2**64 - 1 to -1 (the
    dataset's last item)."""
    with pytest.raises(MetricError, match="beyond int64"):
        confusion_matrix(np.array([2 ** 63], np.uint64), np.array([0], np.int64))
    data = TensorDataset(np.arange(5, dtype=np.float32))
    with pytest.raises(IndexError, match="out of range"):
        Subset(data, np.array([2 ** 64 - 1], np.uint64))


def test_items_of_different_shapes_are_named_in_the_batch_error():
    class Ragged:
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return np.zeros(i + 1, np.float32), np.int64(i)
    with pytest.raises(DatasetError, match=r"position 0 .* \(1,\) in item 0, \(2,\) in item 1"):
        next(iter(DataLoader(Ragged(), batch_size=3)))


def test_a_negative_epoch_and_an_initial_epoch_below_one_are_refused():
    loader = DataLoader(TensorDataset(np.zeros((4, 2), np.float32), np.zeros(4, np.int64)),
                        batch_size=2, shuffle=True, seed=0)
    with pytest.raises(DatasetError, match="int >= 0, got -1"):
        loader.set_epoch(-1)
    model, x, y = setup()
    step = train_step(model, x, y)
    data = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    for first in (0, -2):  # trained epochs 0..2 or -2..2 where 1..2 were asked
        with pytest.raises(GraphcError, match="initial_epoch .* from 1"):
            fit(step, data, epochs=2, initial_epoch=first, progress=False)


def test_stale_temporaries_of_a_name_with_a_line_break_are_removed(tmp_path):
    from graphc.train import _remove_stale_temporaries
    stale = tmp_path / ".tmp-999999999-ck\npt.abc123"
    stale.write_bytes(b"partial")
    _remove_stale_temporaries(str(tmp_path), "ck\npt")
    assert not stale.exists()


def test_export_inference_refuses_to_write_over_the_training_step(tmp_path, capsys):
    model, x, y = setup()
    step = train_step(model, x, y)
    path = str(tmp_path / "step.gcx")
    step.export(path)
    before = open(path, "rb").read()
    assert main(["export-inference", path, path]) == 1
    assert "is the training step itself" in capsys.readouterr().err
    assert open(path, "rb").read() == before


def test_validation_traces_the_loss_once_for_all_epochs(caplog):
    """Each epoch's evaluation jitted the loss anew: a last batch of another size traced it
    again every epoch."""
    model, x, y = setup()
    step = train_step(model, x, y)
    train = DataLoader(TensorDataset(x[:8], y[:8]), batch_size=8)
    val = DataLoader(TensorDataset(x[:10], y[:10]), batch_size=8)  # batches of 8, then 2
    with caplog.at_level("INFO", logger="graphc"):
        fit(step, train, epochs=4, val_loader=val, progress=False)
    assert len([r for r in caplog.records if "retracing cross_entropy" in r.getMessage()]) <= 1
