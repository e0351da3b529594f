"""Inference compile and export where a user's model is less plain: outputs nested as an LSTM's,
random draws in eval mode, samples that depend on each other, odd learning rates, loose inputs."""
import io
import json
import zipfile

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir.errors import GraphcError, InputError, LoadError
from graphc.serve.runner import GraphcRunner

X = np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        return y, (y.sum(1), {"scaled": y * 2, "mean": y.mean(1)})


def _rewrite_metadata(path, out, change):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    metadata = json.loads(members["metadata.json"])
    change(metadata)
    members["metadata.json"] = json.dumps(metadata).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    out.write_bytes(buf.getvalue())


@pytest.mark.parametrize("max_batch", [None, 4])
def test_a_loaded_function_returns_its_outputs_nested_as_the_model_does(tmp_path, max_batch):
    compiled = gc.compile(Nested(), X)
    compiled.export(str(tmp_path / "n.gcx"), max_batch=max_batch)
    loaded = gc.load(str(tmp_path / "n.gcx"))
    rows = X if max_batch is None else X[:3]
    y, (total, parts) = loaded(rows)
    want_y, (want_total, want_parts) = compiled(rows)
    np.testing.assert_allclose(y, want_y, rtol=1e-6)
    np.testing.assert_allclose(total, want_total, rtol=1e-6)
    assert sorted(parts) == ["mean", "scaled"]
    np.testing.assert_allclose(parts["scaled"], want_parts["scaled"], rtol=1e-6)


def test_a_training_steps_exported_forward_keeps_the_lstm_nesting(tmp_path):
    class Recurrent(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 3, batch_first=True)

        def forward(self, x):
            return self.rnn(x)
    model = Recurrent()
    xs, target = np.ones((2, 5, 4), np.float32), np.zeros((2, 5, 3), np.float32)
    step = gc.compile_train_step(model, lambda out, y: F.mse_loss(out[0], y),
                                 optim.SGD(model.parameters(), lr=0.1), (xs, target))
    step.export(str(tmp_path / "step.gcx"))
    gc.load(str(tmp_path / "step.gcx")).export_inference(str(tmp_path / "forward.gcx"))
    output, (h_n, c_n) = gc.load(str(tmp_path / "forward.gcx"))(xs)
    assert output.shape == (2, 5, 3) and h_n.shape == c_n.shape == (1, 2, 3)


def test_a_malformed_or_mismatched_nesting_is_refused(tmp_path):
    gc.compile(Nested(), X).export(str(tmp_path / "n.gcx"))
    for name, bad in [("deep", {"tuple": [{"list": [0, {"tuple": []}, 7]}]}),
                      ("count", {"tuple": [0, 0]}),
                      ("kind", {"set": [0, 0, 0, 0]})]:
        _rewrite_metadata(tmp_path / "n.gcx", tmp_path / f"{name}.gcx",
                          lambda m, bad=bad: m.update(outputs=bad))
        with pytest.raises(LoadError, match="metadata.json"):
            gc.load(str(tmp_path / f"{name}.gcx"))


def test_a_model_drawing_random_numbers_in_eval_mode_compiles_and_refuses_export(tmp_path):
    class MonteCarloDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.5, training=True)
    gc.manual_seed(0)
    compiled = gc.compile(MonteCarloDropout(), X)
    first, second = compiled(X), compiled(X)
    assert 0 < (first == 0).mean() < 1 and not np.array_equal(first, second)  # fresh draws
    gc.manual_seed(3)
    again = compiled(X)
    gc.manual_seed(3)
    np.testing.assert_array_equal(compiled(X), again)  # from the global generator, as gc.jit
    with pytest.raises(GraphcError, match="draws random numbers in eval mode"):
        compiled.export(str(tmp_path / "mc.gcx"))


def test_a_learning_rate_a_file_cannot_hold_is_refused_at_export(tmp_path):
    model = nn.Linear(4, 3)
    opt = optim.SGD(model.parameters(), lr=0.1)
    y = np.zeros(4, np.int64)
    step = gc.compile_train_step(model, F.cross_entropy, opt, (X, y))
    opt.lr = float("nan")
    with pytest.raises(GraphcError, match="cannot export learning rate nan"):
        step.export(str(tmp_path / "s.gcx"))
    assert not (tmp_path / "s.gcx").exists()
    opt.lr = np.float32(0.05)
    step.export(str(tmp_path / "s.gcx"))
    loaded = gc.load(str(tmp_path / "s.gcx"))
    loaded.lr = float("inf")
    with pytest.raises(GraphcError, match="cannot export learning rate inf"):
        loaded.export(str(tmp_path / "again.gcx"))


def test_a_batch_polymorphic_function_checks_inputs_at_the_callers_batch(tmp_path):
    gc.compile(nn.Linear(4, 2), X).export(str(tmp_path / "f.gcx"), max_batch=6)
    f = gc.load(str(tmp_path / "f.gcx"))
    assert f([[1.0, 2, 3, 4]] * 3).shape == (3, 2)  # a list converts as at a fixed batch
    with pytest.raises(InputError, match=r"expected shape \(3, 4\) .* got \(3, 5\)"):
        f(np.ones((3, 5), np.float32))
    with pytest.raises(InputError, match="expected dtype float32, got float64"):
        f(np.ones((3, 4), np.float64))


def test_a_fixed_batch_export_whose_samples_interact_is_not_padded_by_the_server(tmp_path):
    class Centered(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x)
            return h - h.mean(0)
    gc.compile(Centered(), X).export(str(tmp_path / "c.gcx"))
    with pytest.raises(LoadError, match="serves batches of exactly 4"):
        GraphcRunner.from_file(str(tmp_path / "c.gcx"))
    # a model of independent samples, its one output in a dict, pads as before
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.fc(x)}
    named = Named()
    gc.compile(named, X).export(str(tmp_path / "n.gcx"))
    runner = GraphcRunner.from_file(str(tmp_path / "n.gcx"))
    np.testing.assert_allclose(runner.run(X[:2]), gc.compile(named, X[:2])(X[:2])["logits"], rtol=1e-6)


def test_a_recurrent_model_read_only_through_its_final_state_exports_to_onnx(tmp_path):
    onnx = pytest.importorskip("onnx")
    from graphc.onnx_export import export_onnx

    class LastHidden(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(5, 7, batch_first=True)

        def forward(self, x):
            _, (h, _) = self.lstm(x)
            return h[0]
    model = LastHidden()
    x = np.random.default_rng(1).standard_normal((3, 6, 5)).astype(np.float32)
    export_onnx(model, str(tmp_path / "h.onnx"), example_inputs=x)
    onnx.checker.check_model(onnx.load(str(tmp_path / "h.onnx")))
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, gc.jit(model)(x), rtol=1e-5, atol=1e-6)


class FromOne(nn.Module):
    """Ids counted from 1: an id of 0 indexes nothing."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(5, 3)

    def forward(self, ids):
        return self.table(ids - 1)


def test_a_model_whose_ids_count_from_one_exports_and_says_why_not_with_max_batch(tmp_path):
    """Both exports failed with an IndexOutOfRangeError naming the user's valid line: the check
    that samples are computed apart ran the forward on ids of 0."""
    gc.manual_seed(0)
    ids = np.array([[1, 5], [2, 3]], np.int64)
    compiled = gc.compile(FromOne(), ids, backend="reference")
    compiled.export(str(tmp_path / "fixed.gcx"))
    np.testing.assert_allclose(gc.load(str(tmp_path / "fixed.gcx"), backend="reference")(ids), compiled(ids))
    with pytest.raises(gc.GraphcError, match=r"padded with zeros, and an integer input of 0 indexes nothing"):
        compiled.export(str(tmp_path / "buckets.gcx"), max_batch=4)


def test_a_loaded_step_says_how_many_learning_rates_it_takes(tmp_path):
    """A wrong count failed as 'expected 26 inputs (...)', listing the graph's inputs."""
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    params = list(model.parameters())
    optimizer = gc.optim.SGD([{"params": params[:2]}, {"params": params[2:], "lr": 0.05}], lr=0.1)
    x, y = np.ones((2, 4), np.float32), np.array([0, 2])
    step = gc.compile_train_step(model, F.cross_entropy, optimizer, (x, y), backend="reference")
    step.export(str(tmp_path / "s.gcx"))
    loaded = gc.load(str(tmp_path / "s.gcx"), backend="reference")
    loaded.lrs = [0.1]
    with pytest.raises(gc.GraphcError, match=r"step.lrs holds 1 learning rate\(s\); the step has 2 parameter group"):
        loaded(x, y)
    loaded.lrs = [0.1, 0.05]
    assert np.isfinite(loaded(x, y))
