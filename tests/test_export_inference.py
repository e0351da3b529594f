"""`LoadedTrainStep.export_inference` and `graphc export-inference`: a training step's file holds
its model's eval-mode forward, so the model trained so far (also after the loaded step trained
on) becomes an inference export without the model's code; the forward members are checked like
the rest of the file."""
import hashlib
import json
import re
import subprocess
import sys
import zipfile

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import export as export_module
from graphc import nn, optim
from graphc.cli import main
from graphc.ir.errors import GraphcError, LoadError

REF = "reference"
BATCH = 4
rng = np.random.default_rng(0)
X = rng.standard_normal((BATCH, 6)).astype(np.float32)
Y = rng.integers(0, 3, BATCH)


def tiny_model() -> nn.Module:
    """Dropout and batch norm: its eval forward is not its training forward."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(8, 3))


def samples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 6)).astype(np.float32)


def eval_oracle(state: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """A fresh model with `state`, its eval forward run by the reference interpreter."""
    model = tiny_model()
    model.load_state_dict(state)
    return gc.compile(model, x, backend=REF)(x)


@pytest.fixture(scope="module")
def step_file(tmp_path_factory):
    """A step trained 3 steps and exported, and the weights it was exported with."""
    gc.manual_seed(0)
    model = tiny_model()
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.05),
                                 (X, Y), backend=REF)
    for _ in range(3):
        step(X, Y)
    path = str(tmp_path_factory.mktemp("step") / "step.gcx")
    step.export(path)
    return path, {k: v.copy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def trained_on(step_file):
    """The step file loaded and trained 2 more steps."""
    loaded = gc.load(step_file[0], backend=REF)
    for _ in range(2):
        loaded(X, Y)
    return loaded


def members_of(path: str) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_members(members: dict[str, bytes], out, recompute: bool = True) -> str:
    """A file of `members`, the member checksums recomputed (plain SHA-256: anyone can) unless
    `recompute` is False."""
    members = dict(members)
    if recompute:
        manifest = json.loads(members["checksums.json"])
        manifest["members"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()
                               if n != "checksums.json"}
        members["checksums.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, zipfile.ZIP_STORED if name == "state.safetensors"
                       else zipfile.ZIP_DEFLATED)
    return str(out)


def without_lines(graph) -> str:
    """The graph's text without the user line after each node."""
    return re.sub(r"@ \S+:\d+", "", str(graph))


def edited_plan(members: dict[str, bytes], change) -> dict[str, bytes]:
    plan = json.loads(members["plan.json"])
    change(plan)
    return {**members, "plan.json": json.dumps(plan).encode()}


# -- the artefact ---------------------------------------------------------------------------------
def test_export_inference_has_the_weights_after_further_training(step_file, trained_on, tmp_path):
    path, exported_state = step_file
    assert trained_on.step_count == 5
    out = str(tmp_path / "model.gcx")
    trained_on.export_inference(out)
    current = trained_on.state_dict()
    expected = eval_oracle(current, X)
    for backend in (REF, "numba-cpu"):
        function = gc.load(out, backend=backend)
        assert isinstance(function, export_module.LoadedFunction)
        np.testing.assert_allclose(function(X), expected, rtol=1e-5, atol=1e-6)
    # the two later steps moved the weights and running statistics: the file has the newest
    assert not np.allclose(eval_oracle(exported_state, X), expected, atol=1e-4)
    # the graph gc.compile traces for the model (but for the user line each node records: the
    # step's export traced it), with the same signature and state names
    model = tiny_model()
    model.load_state_dict(current)
    direct = tmp_path / "direct.gcx"
    gc.compile(model, X, backend=REF).export(str(direct))
    assert without_lines(gc.load(str(direct), backend=REF).graph) == without_lines(
        gc.load(out, backend=REF).graph)
    assert set(gc.load(out, backend=REF).state_dict()) == set(current)


def test_a_step_exported_again_after_loading_keeps_its_forward(trained_on, tmp_path):
    again = str(tmp_path / "again.gcx")
    trained_on.export(again)
    reloaded = gc.load(again, backend=REF)
    reloaded(X, Y)
    out = str(tmp_path / "model.gcx")
    reloaded.export_inference(out)
    np.testing.assert_allclose(gc.load(out, backend=REF)(X), eval_oracle(reloaded.state_dict(), X),
                               rtol=1e-5, atol=1e-6)


CUDA_CHILD = """
import os, sys
os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
import numpy as np, graphc as gc
step_path, x_path, y_path, out, state_path = sys.argv[1:]
x, y = np.load(x_path), np.load(y_path)
step = gc.load(step_path, backend="numba-cuda")
for _ in range(2):
    step(x, y)
step.export_inference(out)  # the weights are on the device: export copies them back first
np.savez(state_path, **step.state_dict())
"""


@pytest.mark.slow
def test_a_step_training_on_the_gpu_exports_its_device_weights(step_file, tmp_path):
    """numba-cuda keeps a loaded step's state on the device (simulated here, in a process of its
    own: the simulator must be on before numba is imported)."""
    paths = {name: str(tmp_path / name) for name in ("x.npy", "y.npy", "model.gcx", "state.npz")}
    np.save(paths["x.npy"], X)
    np.save(paths["y.npy"], Y)
    subprocess.run([sys.executable, "-c", CUDA_CHILD, step_file[0], *paths.values()], check=True,
                   capture_output=True, timeout=300)
    state = dict(np.load(paths["state.npz"]))
    assert not np.allclose(state["4.weight"], step_file[1]["4.weight"])
    np.testing.assert_allclose(gc.load(paths["model.gcx"], backend=REF)(X), eval_oracle(state, X),
                               rtol=1e-5, atol=1e-6)


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(self.embed(ids))


def test_tied_weights_stay_tied(tmp_path):
    ids, targets = np.array([1, 2, 3, 4]), np.array([2, 3, 4, 5])
    model = TiedLM()
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.5),
                                 (ids, targets), backend=REF)
    step(ids, targets)
    step.export(str(tmp_path / "step.gcx"))
    loaded = gc.load(str(tmp_path / "step.gcx"), backend=REF)
    loaded(ids, targets)
    loaded.export_inference(str(tmp_path / "lm.gcx"))
    function = gc.load(str(tmp_path / "lm.gcx"), backend=REF)
    weights = function.state_dict()
    assert weights["embed.weight"] is weights["head.weight"]
    fresh = TiedLM()
    fresh.load_state_dict(loaded.state_dict())
    np.testing.assert_allclose(function(ids), gc.compile(fresh, ids, backend=REF)(ids), atol=1e-6)


def test_command_line_writes_the_same_function(step_file, tmp_path, capsys):
    out = str(tmp_path / "cli.gcx")
    assert main(["export-inference", step_file[0], out]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    np.testing.assert_allclose(gc.load(out, backend=REF)(X), eval_oracle(step_file[1], X),
                               rtol=1e-5, atol=1e-6)
    # an inference export is not a step
    assert main(["export-inference", out, str(tmp_path / "x.gcx")]) == 1
    assert "holds an inference function already" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["api", "cli"])
def test_max_batch_buckets_serve_every_batch_size(step_file, trained_on, tmp_path, how):
    out = str(tmp_path / f"bucketed-{how}.gcx")
    if how == "api":
        trained_on.export_inference(out, max_batch=8)
        state = trained_on.state_dict()
    else:
        assert main(["export-inference", step_file[0], out, "--max-batch", "8"]) == 0
        state = step_file[1]
    function = gc.load(out, backend="numba-cpu")
    assert function.buckets == [1, 2, 4, 8]
    for n in (1, 3, 8):
        x = samples(n, n)
        np.testing.assert_allclose(function(x), eval_oracle(state, x), rtol=1e-5, atol=1e-6)
    with pytest.raises(GraphcError, match="1 to 8 samples"):
        function(samples(9, 0))


def test_graphc_serve_serves_the_exported_function(trained_on, tmp_path):
    from test_serve import Server

    out = str(tmp_path / "trained.gcx")
    trained_on.export_inference(out, max_batch=4)
    server = Server(out, args=("--max-batch", "4"))
    try:
        x = samples(3, 7)
        status, body = server.predict(x, model="trained")
        assert status == 200, body
        np.testing.assert_allclose(np.array(body["outputs"], np.float32),
                                   eval_oracle(trained_on.state_dict(), x), rtol=1e-5, atol=1e-6)
    finally:
        assert server.stop() == 0


def test_a_max_batch_the_file_holds_no_forward_for_is_refused(trained_on, tmp_path, capsys):
    with pytest.raises(GraphcError, match=r"max_batch=6 needs the forward at batch 6.*holds "
                                          r"batches 1, 2, 4, 8, 16, 32, 64, 128, 256"):
        trained_on.export_inference(str(tmp_path / "six.gcx"), max_batch=6)
    with pytest.raises(GraphcError, match="max_batch must be an int"):
        trained_on.export_inference(str(tmp_path / "zero.gcx"), max_batch=0)
    assert not (tmp_path / "six.gcx").exists()


def without_forward(members: dict[str, bytes]) -> dict[str, bytes]:
    """The file as a graphc before this change wrote it."""
    members = {n: d for n, d in members.items() if not n.startswith("forward/")}
    return edited_plan(members, lambda plan: plan.pop("forward"))


def test_an_older_step_file_says_to_export_the_step_again(step_file, tmp_path, capsys):
    old = write_members(without_forward(members_of(step_file[0])), tmp_path / "old.gcx")
    loaded = gc.load(old, backend=REF)
    loaded(X, Y)  # it still trains
    with pytest.raises(LoadError, match="holds no eval-mode forward graph.*export the training "
                                        r"step again with this graphc \(step.export\(path\)\)"):
        loaded.export_inference(str(tmp_path / "model.gcx"))
    assert main(["export-inference", old, str(tmp_path / "model.gcx")]) == 1
    assert "export the training step again" in capsys.readouterr().err


class TrainingOnly(nn.Module):
    """A model with no eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x):
        if not self.training:
            raise GraphcError("TrainingOnly has no eval mode")
        return self.linear(x)


def test_a_model_whose_eval_forward_does_not_trace_still_exports_its_step(tmp_path, caplog):
    model = TrainingOnly()
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (X, Y), backend=REF)
    step(X, Y)
    path = str(tmp_path / "step.gcx")
    step.export(path)
    assert "the model's eval-mode forward is not stored" in caplog.text
    assert "TrainingOnly has no eval mode" in caplog.text
    loaded = gc.load(path, backend=REF)
    assert loaded(X, Y) == step(X, Y)
    with pytest.raises(LoadError, match="holds no eval-mode forward graph"):
        loaded.export_inference(str(tmp_path / "model.gcx"))


class TimeMajor(nn.Module):
    """(time, batch, features) inputs: padding axis 0 would pad time, which the reverse
    direction reads."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, bidirectional=True)

    def forward(self, x):
        return self.rnn(x)[0]


def test_a_step_whose_samples_interact_along_axis_0_exports_its_own_batch_and_says_why(tmp_path, caplog):
    model = TimeMajor()
    x = rng.standard_normal((8, 2, 3)).astype(np.float32)
    y = np.zeros((8, 2, 8), np.float32)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1), (x, y), backend=REF)
    path = str(tmp_path / "step.gcx")
    step.export(path)
    assert "stored at the step's batch 8 only" in caplog.text and "depends on the other samples" in caplog.text
    loaded = gc.load(path, backend=REF)
    with pytest.raises(GraphcError, match="holds the forward at the step's batch 8 only.*time-major"):
        loaded.export_inference(str(tmp_path / "padded.gcx"), max_batch=8)
    loaded.export_inference(str(tmp_path / "model.gcx"))
    np.testing.assert_allclose(gc.load(str(tmp_path / "model.gcx"), backend=REF)(x),
                               gc.compile(model, x, backend=REF)(x), rtol=1e-5, atol=1e-6)


# -- the forward members of a hostile file ----------------------------------------------------------
def test_a_tampered_forward_member_is_refused(step_file, tmp_path):
    members = members_of(step_file[0])
    graph = json.loads(members["forward/4.json"])
    flipped = json.dumps(graph).replace('"relu"', '"exp"').encode()
    assert flipped != members["forward/4.json"]
    cases = {
        # changed without its checksum
        "checksum": (write_members({**members, "forward/4.json": flipped}, tmp_path / "a.gcx",
                                   recompute=False), "forward/4.json: checksum mismatch"),
        # checksums recomputed: the graphs must still be the step's model at their batches
        "other batch": (write_members({**members, "forward/4.json": members["forward/2.json"]},
                                      tmp_path / "b.gcx"),
                        r"forward/4.json: takes f32\[2,6\], not the step's model inputs at batch 4"),
        "rebatched": (write_members({**members, "forward/8.json": members["forward/16.json"]},
                                    tmp_path / "c.gcx"),
                      "forward/8.json: its signature is not forward/4.json's at batch 8"),
        "not a graph": (write_members({**members, "forward/2.json": b'{"graph": 1}'},
                                      tmp_path / "d.gcx"), "forward/2.json"),
        "unlisted": (write_members({**members, "forward/3.json": members["forward/2.json"]},
                                   tmp_path / "e.gcx"), "plan.json: malformed forward entry"),
        "bool batch": (write_members(edited_plan(members, lambda p: p["forward"].update(batch=True)),
                                     tmp_path / "h.gcx"), "plan.json: malformed forward entry"),
        "missing": (write_members({n: d for n, d in members.items() if n != "forward/16.json"},
                                  tmp_path / "f.gcx"), "plan.json: malformed forward entry"),
        "unplanned": (write_members(edited_plan(members, lambda p: p.pop("forward")),
                                    tmp_path / "g.gcx"),
                      "plan.json: holds forward/1.json but lists no forward"),
    }
    for name, (path, message) in cases.items():
        with pytest.raises(LoadError, match=message):
            gc.load(path, backend=REF)


def rebound(plan, name, key):
    plan["forward"]["bindings"][name] = key


@pytest.mark.parametrize("key, message", [
    ("model/0.bias", r"'0.weight' \(f32\[8,6\]\) is bound to 'model/0.bias', which holds float32\[8\]"),
    ("model/missing", "'0.weight' .* is bound to 'model/missing', which holds nothing"),
    ("step", r"'0.weight' .* is bound to 'step', which holds float32\[\]"),
])
def test_forward_bindings_must_match_the_state(step_file, tmp_path, key, message):
    members = edited_plan(members_of(step_file[0]), lambda plan: rebound(plan, "0.weight", key))
    with pytest.raises(LoadError, match="forward/4.json: its input " + message):
        gc.load(write_members(members, tmp_path / "bound.gcx"), backend=REF)
    members = edited_plan(members_of(step_file[0]),
                          lambda plan: plan["forward"]["bindings"].pop("0.weight"))
    with pytest.raises(LoadError, match="'0.weight' .* is bound to None, which holds nothing"):
        gc.load(write_members(members, tmp_path / "unbound.gcx"), backend=REF)


def test_forward_members_are_capped_and_kept_out_of_inference_files(step_file, trained_on,
                                                                    tmp_path, monkeypatch):
    members = members_of(step_file[0])
    monkeypatch.setattr(export_module, "_BUCKET_GRAPHS_LIMIT", 10_000)
    with pytest.raises(LoadError, match=r"the forward's graphs are 9 members declaring [\d,]+ "
                                        r"bytes in all \(at most 25 and 10,000\)"):
        gc.load(write_members(members, tmp_path / "large.gcx"), backend=REF)
    monkeypatch.undo()
    many = {**members, **{f"forward/{n}.json": members["forward/2.json"] for n in range(3, 30)}}
    with pytest.raises(LoadError, match="the forward's graphs are 33 members"):
        gc.load(write_members(many, tmp_path / "many.gcx"), backend=REF)
    out = str(tmp_path / "model.gcx")
    trained_on.export_inference(out)
    smuggled = {**members_of(out), "forward/4.json": members["forward/4.json"]}
    with pytest.raises(LoadError, match="forward/4.json: holds forward/4.json, which an inference "
                                        "export has no use for"):
        gc.load(write_members(smuggled, tmp_path / "smuggled.gcx"), backend=REF)


def test_a_steps_forward_whose_rows_mix_is_not_served_padded(tmp_path):
    """export_inference without max_batch wrote no rows_apart flag, so `graphc serve` padded
    and batched clients together through a model mixing its rows (x - x.mean(0)): one client's
    answer depended on another's inputs."""
    from graphc.serve import GraphcRunner

    class Mix(gc.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gc.nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    for model, apart in ((Mix(), False), (gc.nn.Linear(4, 3), True)):
        step = gc.compile_train_step(model, gc.nn.functional.cross_entropy,
                                     gc.optim.SGD(model.parameters(), lr=0.1),
                                     example_inputs=(np.zeros((4, 4), np.float32), np.zeros(4, np.int64)))
        step.export(str(tmp_path / "step.gcx"))
        gc.load(str(tmp_path / "step.gcx")).export_inference(str(tmp_path / "model.gcx"))
        assert gc.load(str(tmp_path / "model.gcx")).metadata["rows_apart"] is apart
        if not apart:
            with pytest.raises(LoadError, match="samples depend on each other"):
                GraphcRunner.from_file(str(tmp_path / "model.gcx"))
