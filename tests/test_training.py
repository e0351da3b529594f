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


def masks_of(step, x, steps=3):
    """The dropout masks a step drew: which hidden units of the first layer its update reached
    (a dropped unit's weights get no gradient), plain SGD on a fresh copy of the weights."""
    weight = step.model.state_dict()["0.weight"]
    masks = []
    for _ in range(steps):
        before = weight.copy()
        step(x, np.zeros(len(x), np.int64))
        masks.append((weight != before).any(axis=1))
    return masks


def dropout_step(x, seed=None):
    if seed is not None:
        gc.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 64), nn.Dropout(0.5), nn.Linear(64, 3))
    return gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (x, np.zeros(len(x), np.int64)), backend=REF)


def test_each_training_step_call_draws_its_own_dropout_masks():
    """Steps took the key (seed, 0) when compiled and counted their own calls: two models
    compiled after one manual_seed drew the same masks at every step, and a gc.jit call drew a
    step's bits. Every call takes the global generator's next key, as PyTorch's calls draw from
    its one generator."""
    x = np.ones((1, 4), np.float32)
    first, second = dropout_step(x, seed=0), dropout_step(x)
    masks = [m for pair in zip(masks_of(first, x), masks_of(second, x)) for m in pair]
    assert len({m.tobytes() for m in masks}) == len(masks)
    # a gc.jit draw next to them: not the bits of the step drawn before it
    noise = gc.jit(lambda v: F.dropout(v, 0.5), backend=REF)(np.ones(64, np.float32)) > 0
    assert not any(np.array_equal(noise, m) for m in masks)


def test_manual_seed_after_compiling_replays_a_steps_masks():
    x = np.ones((1, 4), np.float32)
    step = dropout_step(x, seed=3)
    gc.manual_seed(11)
    first = masks_of(step, x)
    gc.manual_seed(11)
    assert [m.tobytes() for m in masks_of(step, x)] == [m.tobytes() for m in first]


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


def test_an_early_stopping_reused_for_another_run_starts_afresh():
    """Its best value, epoch and weights were kept across fit calls: a second fold stopped
    after `patience` epochs against the first fold's best and got the first fold's weights."""
    x, y = blobs()
    stopper = EarlyStopping(monitor="val_loss", patience=2)
    weights = []
    for fold in range(2):
        model, step = small_step(lr=0.01 if fold else 0.05)
        history = fit(step, [(x[:64], y[:64])], epochs=4, val_loader=[(x[64:], y[64:])],
                      early_stopping=stopper, progress=False)
        assert len(history.epochs) == 4 and history.best_epoch == 4  # still improving
        weights.append(model.state_dict()["0.weight"].copy())
    assert not np.array_equal(weights[0], weights[1])


def test_validation_gives_the_loss_every_target_of_a_step_with_several():
    """A step compiled with targets=2 (a per-sample weight): validation called the model with
    the first target as an input."""
    x, y = blobs()
    w = np.linspace(0.5, 1.5, len(y)).astype(np.float32)

    def weighted(out, labels, weights):
        return (F.cross_entropy(out, labels, reduction="none") * weights).mean()
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    step = gc.compile_train_step(model, weighted, optim.SGD(model.parameters(), lr=0.1),
                                 (x[:32], y[:32], w[:32]), targets=2, backend=REF)
    history = fit(step, [(x[:32], y[:32], w[:32])], epochs=1, val_loader=[(x[32:], y[32:], w[32:])],
                  progress=False)
    out = gc.compile(model, x[32:], backend=REF)(x[32:])
    expected = gc.jit(weighted, backend=REF)(out, y[32:], w[32:])
    np.testing.assert_allclose(history["val_loss"][0], expected, rtol=1e-6)
    np.testing.assert_allclose(history["val_accuracy"][0], np.mean(out.argmax(1) == y[32:]))


def test_validation_of_a_model_with_several_outputs_gives_the_loss():
    """evaluate concatenated the outputs for metrics: a tuple failed with NumPy's error."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.classes, self.value = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 1)

        def forward(self, x):
            h = F.relu(self.body(x))
            return self.classes(h), self.value(h)[:, 0]

    def loss(out, labels, values):
        return F.cross_entropy(out[0], labels) + F.mse_loss(out[1], values)
    x, y = blobs()
    v = x[:, 0].copy()
    gc.manual_seed(0)
    model = TwoHeads()
    step = gc.compile_train_step(model, loss, optim.SGD(model.parameters(), lr=0.1), (x[:32], y[:32], v[:32]),
                                 targets=2, backend=REF)
    history = fit(step, [(x[:32], y[:32], v[:32])], val_loader=[(x[32:], y[32:], v[32:])], progress=False)
    expected = gc.jit(loss, backend=REF)(gc.compile(model, x[32:], backend=REF)(x[32:]), y[32:], v[32:])
    np.testing.assert_allclose(history["val_loss"][0], expected, rtol=1e-6)
