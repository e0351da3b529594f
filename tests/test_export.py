"""Export and load of compiled steps: exact continuation, other backends, bad files, fuzzing."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc as gc
import graphc.nn.functional as F
from graphc import optim
from graphc.models import mnist_cnn

REF = "reference"
rng = np.random.default_rng(0)
X = rng.standard_normal((16, 1, 8, 8)).astype(np.float32)
Y = rng.integers(0, 10, 16)


def make_step(backend=REF):
    gc.manual_seed(0)
    model = mnist_cnn(image_size=8)
    return gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()), (X, Y),
                                 backend=backend)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "step.gcx")
    step = make_step()
    for _ in range(3):
        step(X, Y)
    step.export(path)
    continued = [step(X, Y) for _ in range(4)]
    return path, continued, {k: v.copy() for k, v in step.state_dict().items()}


def test_loaded_step_continues_bit_for_bit(exported):
    path, continued, _ = exported
    loaded = gc.load(path, backend=REF)
    assert loaded.step_count == 3
    assert [loaded(X, Y) for _ in range(4)] == continued


def test_loaded_state_dict_and_archive_contents(exported):
    path, _, final_state = exported
    loaded = gc.load(path, backend=REF)
    # in the model's order, as PyTorch's (safetensors' own order changed from run to run)
    assert list(loaded.state_dict()) == list(final_state)
    train_state = list(gc.train.training_state(loaded))
    assert train_state[:len(final_state)] == [f"model/{k}" for k in final_state]
    names = zipfile.ZipFile(path).namelist()
    for member in ("format.json", "graph.json", "plan.json", "state.safetensors", "metadata.json",
                   "checksums.json"):
        assert member in names
    meta = json.loads(zipfile.ZipFile(path).read("metadata.json"))
    assert {"graphc", "numba", "numpy"} <= set(meta["versions"]) and meta["backend"] == REF


def test_fresh_process_continues_identically(exported, tmp_path):
    path, continued, _ = exported
    script = tmp_path / "continue.py"
    np.save(tmp_path / "x.npy", X)
    np.save(tmp_path / "y.npy", Y)
    script.write_text(
        "import json, sys, numpy as np, graphc as gc\n"
        f"step = gc.load({path!r}, backend={REF!r})\n"
        f"x, y = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})\n"
        "print(json.dumps([step(x, y) for _ in range(4)]))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == continued


def test_inference_export_round_trip(tmp_path):
    step = make_step()
    step(X, Y)
    infer = gc.compile(step.model, X, backend=REF)
    infer.export(str(tmp_path / "f.gcx"))
    loaded = gc.load(str(tmp_path / "f.gcx"), backend=REF)
    np.testing.assert_array_equal(loaded(X), infer(X))


def rewrite(path, out, change):
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    change(members)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for n, d in members.items():
            z.writestr(n, d)
    with open(out, "wb") as f:
        f.write(buf.getvalue())


def test_bad_files_are_refused_clearly(exported, tmp_path):
    path, _, _ = exported
    data = open(path, "rb").read()
    cases = {
        "truncated": (data[: len(data) // 2], "not a readable graphc export"),
        "empty": (b"", "not a readable graphc export"),
        "not a zip": (b"hello world" * 10, "not a readable graphc export"),
    }
    for name, (blob, message) in cases.items():
        bad = tmp_path / f"{name}.gcx"
        bad.write_bytes(blob)
        with pytest.raises(gc.SerializationError, match=message):
            gc.load(str(bad), backend=REF)

    def corrupt(m):
        m["state.safetensors"] = m["state.safetensors"][:-4] + b"\0\0\0\0"

    def newer(m):
        m["format.json"] = json.dumps({"format": "graphc.export", "version": 99, "kind": "train_step"}).encode()

    def wrong_format(m):
        m["format.json"] = b'{"format": "something-else"}'

    for change, message in [(corrupt, "state.safetensors: tensor .* fails its checksum"),
                            (newer, "newer than this graphc reads"),
                            (wrong_format, "not a graphc export")]:
        out = tmp_path / f"{change.__name__}.gcx"
        rewrite(path, str(out), change)
        with pytest.raises(gc.SerializationError, match=message):
            gc.load(str(out), backend=REF)
    with pytest.raises(gc.SerializationError, match="no such file"):
        gc.load(str(tmp_path / "missing.gcx"))


def test_interrupted_export_leaves_the_previous_file(exported, tmp_path, monkeypatch):
    import graphc.train as train_module

    path, _, _ = exported
    target = tmp_path / "step.gcx"
    target.write_bytes(open(path, "rb").read())
    step = make_step()
    monkeypatch.setattr(train_module.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        step.export(str(target))
    assert target.read_bytes() == open(path, "rb").read()
    assert os.listdir(tmp_path) == ["step.gcx"]


def test_a_malformed_state_order_is_refused(exported, tmp_path):
    import hashlib

    path, _, _ = exported
    for bad in (["model/0.weight"], [1, 2], "model/0.weight"):
        def mutate(m, bad=bad):
            plan = json.loads(m["plan.json"])
            plan["state_order"] = bad
            m["plan.json"] = json.dumps(plan).encode()
            m["checksums.json"] = json.dumps({
                "members": {n: hashlib.sha256(d).hexdigest() for n, d in m.items()
                            if n not in ("checksums.json",)},
                "tensors": json.loads(m["checksums.json"])["tensors"]}).encode()
        rewrite(path, str(tmp_path / "order.gcx"), mutate)
        with pytest.raises(gc.SerializationError, match="plan.json: malformed state order"):
            gc.load(str(tmp_path / "order.gcx"), backend=REF)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_files_raise_only_the_documented_error(exported, tmp_path, data):
    path, _, _ = exported
    blob = bytearray(open(path, "rb").read())
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del blob[at:at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
    target = tmp_path / "fuzz.gcx"
    target.write_bytes(bytes(blob))
    try:
        gc.load(str(target), backend=REF)
    except gc.SerializationError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_members_with_valid_checksums_are_still_refused_or_valid(exported, tmp_path, data):
    """Mutate a JSON member and fix up the checksums: the loader's own validation must hold."""
    import hashlib

    path, _, _ = exported
    member = data.draw(st.sampled_from(["graph.json", "plan.json", "metadata.json", "format.json"]))

    def mutate(m):
        text = bytearray(m[member])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, len(text) - 1))
            text[at] = data.draw(st.sampled_from(b'0123456789{}[]",:-.aez '))
        m[member] = bytes(text)
        m["checksums.json"] = json.dumps({n: hashlib.sha256(d).hexdigest() for n, d in m.items()
                                          if n != "checksums.json"}).encode()

    target = tmp_path / "fuzz2.gcx"
    rewrite(path, str(target), mutate)
    try:
        gc.load(str(target), backend=REF)
    except gc.SerializationError:
        pass


@pytest.mark.slow
def test_cnn_export_reload_in_fresh_process_continues_identically_on_numba_cpu():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "examples", "export_continue.py"),
                           "--steps", "5", "--backend", "numba-cpu"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "identical to the uninterrupted run: True" in proc.stdout


def test_a_namedtuple_output_comes_back_as_a_namedtuple_of_its_fields(tmp_path):
    from collections import namedtuple
    Out = namedtuple("Out", "logits value")

    import graphc.nn as nn

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            h = self.fc(x)
            return Out(h[:, :3], h[:, 3])

    x = np.ones((2, 3), np.float32)
    compiled = gc.compile(TwoHeads(), (x,))
    compiled.export(str(tmp_path / "m.gcx"))
    out = gc.load(str(tmp_path / "m.gcx"))(x)
    assert type(out).__name__ == "Out" and out._fields == ("logits", "value")
    np.testing.assert_array_equal(out.logits, compiled(x).logits)


@pytest.mark.parametrize("bad", [{"name": "Out", "fields": ["import os"], "items": [0]},
                                 {"name": "Out(", "fields": ["a"], "items": [0]},
                                 {"name": "Out", "fields": ["a", 3], "items": [0, 0]},
                                 {"name": "Out", "fields": ["a"], "items": [0, 0]},
                                 {"name": "Out", "fields": ["a"]}])
def test_a_crafted_namedtuple_nesting_is_refused(bad):
    from graphc.tree import treedef_from_json
    with pytest.raises(ValueError):
        treedef_from_json({"namedtuple": bad})


def test_a_returned_dict_keeps_its_order_and_class_through_export(tmp_path):
    from collections import OrderedDict

    import graphc.nn as nn

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            h = self.fc(x)
            return OrderedDict([("zeta", h[:, :2]), ("alpha", h[:, 2:])])

    x = np.ones((2, 3), np.float32)
    gc.compile(Heads(), (x,)).export(str(tmp_path / "m.gcx"))
    out = gc.load(str(tmp_path / "m.gcx"))(x)
    assert type(out) is OrderedDict and list(out) == ["zeta", "alpha"]


@pytest.mark.parametrize("bad", [{"dict": {"a": 0}, "order": ["b"]}, {"dict": {"a": 0}, "order": [1]},
                                 {"dict": {"a": 0}, "order": ["a", "a"]}, {"dict": [0]}])
def test_a_crafted_dict_nesting_is_refused(bad):
    from graphc.tree import treedef_from_json
    with pytest.raises(ValueError):
        treedef_from_json(bad)


def test_a_namedtuple_with_renamed_fields_survives_export(tmp_path):
    from collections import namedtuple

    import graphc.nn as nn
    Out = namedtuple("Out", ["logits", "def"], rename=True)  # fields ('logits', '_1')

    class Renamed(nn.Module):
        def forward(self, x):
            return Out(x * 2, x + 1)

    x = np.ones((2, 3), np.float32)
    gc.compile(Renamed(), (x,)).export(str(tmp_path / "m.gcx"))
    out = gc.load(str(tmp_path / "m.gcx"))(x)
    assert out._fields == ("logits", "_1")


def test_an_output_nesting_json_cannot_keep_is_said_at_export(tmp_path):
    import graphc.nn as nn

    class IntKeys(nn.Module):
        def forward(self, x):
            return {"logits": x, "aux": {0: x * 2}}

    x = np.ones((2, 3), np.float32)
    with pytest.warns(UserWarning, match="dict key that is not a string"):
        gc.compile(IntKeys(), (x,)).export(str(tmp_path / "m.gcx"))
