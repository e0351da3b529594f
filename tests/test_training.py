"""compile_train_step, compile (inference), the fit loop, early stopping and checkpoints."""
import logging
import os

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.data import DataLoader, TensorDataset
from graphc.models import mnist_cnn
from graphc.train import EarlyStopping, fit, load_checkpoint, save_checkpoint

REF = "reference"


def blobs(n=96, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = (rng.standard_normal((n, 4)) + np.eye(3, 4)[y] * 3).astype(np.float32)
    return x, y.astype(np.int64)


def small_step(backend=REF, lr=0.05, dropout=0.0):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 3))
    x, y = blobs()
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=lr),
                                 (x[:32], y[:32]), backend=backend)
    return model, step


def test_step_updates_the_models_own_arrays_in_place():
    model, step = small_step()
    weight = model.state_dict()["0.weight"]
    before = weight.copy()
    x, y = blobs()
    loss = step(x[:32], y[:32])
    assert isinstance(loss, float) and np.isfinite(loss)
    assert model.state_dict()["0.weight"] is weight and not np.array_equal(weight, before)
    assert float(step.step_count) == 1.0


def test_one_graph_holds_forward_backward_and_update():
    _, step = small_step()
    ops = [node.op for node in step.graph.nodes]
    assert ops.count("matmul") >= 4 and "sqrt" in ops  # forward+backward matmuls and Adam's update
    roles = {inp.role for inp in step.graph.inputs}
    assert roles == {"data", "param", "state"}
    assert "digraph" in step.to_dot(stage="traced") and "digraph" in step.to_dot()


def test_new_batch_size_recompiles_once_and_says_so(caplog):
    _, step = small_step()
    x, y = blobs()
    with caplog.at_level(logging.WARNING, logger="graphc"):
        step(x[:16], y[:16])
        step(x[16:32], y[16:32])
    assert caplog.text.count("recompiling train_step") == 1 and "f32[16,4]" in caplog.text
    assert len(step._compiled) == 2


def test_inference_is_eval_mode_and_sees_new_weights():
    model, step = small_step(dropout=0.5)
    x, y = blobs()
    infer = gc.compile(model, x[:8], backend=REF)
    a = infer(x[:8])
    np.testing.assert_array_equal(a, infer(x[:8]))  # no dropout at inference
    step(x[:32], y[:32])
    assert not np.array_equal(a, infer(x[:8]))  # weights are inputs, not constants


def test_dropout_in_the_step_is_reproducible():
    losses = []
    for _ in range(2):
        _, step = small_step(dropout=0.5)
        x, y = blobs()
        losses.append([step(x[:32], y[:32]) for _ in range(3)])
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_cnn_on_numba_cpu_follows_the_reference_loss_by_loss():
    """The MNIST CNN (8x8 inputs; dropout on; its second convolution runs as Winograd on
    numba-cpu): the same loss sequence on both backends, since the counter-based RNG draws
    the same dropout masks."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    losses = {}
    for backend in (REF, "numba-cpu"):
        gc.manual_seed(0)
        model = mnist_cnn(image_size=8)
        step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()),
                                     (x, y), backend=backend)
        losses[backend] = [step(x, y) for _ in range(6)]
    assert losses[REF][-1] < losses[REF][0]
    np.testing.assert_allclose(losses["numba-cpu"], losses[REF], rtol=1e-4)


def loaders(batch=32):
    x, y = blobs(192)
    train = DataLoader(TensorDataset(x[:128], y[:128]), batch_size=batch, shuffle=True, seed=0,
                       drop_last=True)
    val = DataLoader(TensorDataset(x[128:], y[128:]), batch_size=batch)
    return train, val


def test_fit_learns_and_reports_metrics(tmp_path):
    _, step = small_step()
    train, val = loaders()
    history = fit(step, train, epochs=3, val_loader=val, progress=False, log_dir=str(tmp_path / "tb"))
    assert history["loss"][-1] < history["loss"][0]
    assert history["val_accuracy"][-1] > 0.9
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tb"))


def test_early_stopping_stops_and_restores_the_best_weights():
    model, step = small_step(lr=0.05)
    train, val = loaders()
    # Improvement can never exceed this min_delta, so training stops after `patience` epochs.
    stopper = EarlyStopping(monitor="val_loss", patience=2, min_delta=1e9)
    seen = {}
    history = fit(step, train, epochs=10, val_loader=val, early_stopping=stopper, progress=False,
                  on_epoch_end=lambda e, logs: seen.setdefault(e, model.state_dict()["0.weight"].copy()))
    assert history.stopped_early and len(history.epochs) == 3 and history.best_epoch == 1
    np.testing.assert_array_equal(model.state_dict()["0.weight"], seen[1])


def test_checkpoint_round_trip_continues_identically(tmp_path):
    x, y = blobs()
    _, step = small_step(dropout=0.3)
    step(x[:32], y[:32])
    save_checkpoint(str(tmp_path / "ck.safetensors"), step)
    expected = [step(x[:32], y[:32]) for _ in range(3)]
    _, other = small_step(dropout=0.3)
    load_checkpoint(str(tmp_path / "ck.safetensors"), other)
    assert [other(x[:32], y[:32]) for _ in range(3)] == expected


def test_interrupted_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    import graphc.train as train_module

    path = str(tmp_path / "ck.safetensors")
    x, y = blobs()
    _, step = small_step()
    save_checkpoint(path, step)
    before = open(path, "rb").read()
    step(x[:32], y[:32])

    def crash(fd):
        raise KeyboardInterrupt("power cut")
    monkeypatch.setattr(train_module.os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, step)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ck.safetensors"]  # no temporary file left behind


def test_corrupt_checkpoint_is_refused(tmp_path):
    path = tmp_path / "ck.safetensors"
    _, step = small_step()
    save_checkpoint(str(path), step)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(gc.SerializationError, match="cannot read checkpoint"):
        load_checkpoint(str(path), step)
