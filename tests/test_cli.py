"""The graphc command line: inspect, info, train, trace; exit codes and messages."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import optim
from graphc.cli import main
from graphc.data import find_mnist
from graphc.models import mnist_cnn

REF = "reference"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    gc.manual_seed(0)
    model = mnist_cnn()
    x = np.zeros((8, 1, 28, 28), np.float32)
    y = np.zeros(8, np.int64)
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()), (x, y), backend=REF)
    step(x, y)
    path = str(tmp / "cnn.gcx")
    step.export(path)
    return path, step


def test_info_agrees_with_the_compiled_object(exported, capsys):
    path, step = exported
    assert main(["info", path]) == 0
    out = capsys.readouterr().out
    n_params = step.model.num_parameters()
    assert f"parameters: {n_params:,} in 8 tensors, {n_params * 4:,} bytes" in out
    assert f"graph: {len(step.graph.nodes)} nodes" in out
    assert "input0: f32[8,1,28,28] [data]" in out and "numba" in out and "training steps taken: 1" in out


@pytest.mark.parametrize("stage", ["traced", "optimized", "fused"])
def test_inspect_text_and_dot(exported, stage, tmp_path, capsys):
    path, _ = exported
    assert main(["inspect", path, "--stage", stage]) == 0
    assert capsys.readouterr().out.startswith("graph train_step(")
    out = tmp_path / "g.dot"
    assert main(["inspect", path, "--stage", stage, "--format", "dot", "-o", str(out)]) == 0
    assert out.read_text().startswith("digraph")
    if stage == "fused":
        assert "subgraph cluster_" in out.read_text()


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot is not installed")
def test_inspect_renders_svg(exported, tmp_path):
    path, _ = exported
    out = tmp_path / "g.svg"
    assert main(["inspect", path, "--stage", "optimized", "--format", "svg", "-o", str(out)]) == 0
    assert out.read_text().lstrip().startswith("<?xml") and "<svg" in out.read_text()


def test_inspect_says_when_dot_is_missing(exported, tmp_path, monkeypatch, capsys):
    path, _ = exported
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert main(["inspect", path, "--format", "svg", "-o", str(tmp_path / "x.svg")]) == 1
    assert "needs Graphviz's `dot`" in capsys.readouterr().err


def test_failures_are_one_line_with_status_1(tmp_path):
    bad = tmp_path / "bad.gcx"
    bad.write_bytes(b"garbage")
    proc = subprocess.run([sys.executable, "-m", "graphc.cli", "info", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "not a readable graphc export" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_usage_errors_exit_2():
    proc = subprocess.run([sys.executable, "-m", "graphc.cli", "inspect"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr


@pytest.mark.skipif(find_mnist() is None, reason="MNIST files are not available")
def test_train_continues_and_saves(exported, tmp_path, capsys):
    path, _ = exported
    out = tmp_path / "more.gcx"
    assert main(["train", path, "--data", find_mnist(), "--steps", "3", "--save", str(out), "--quiet",
                 "--backend", REF]) == 0
    assert "total steps 4" in capsys.readouterr().out
    assert gc.load(str(out), backend=REF).step_count == 4


def test_trace_a_users_script(tmp_path, capsys):
    script = tmp_path / "model.py"
    script.write_text("import graphc.nn.functional as F\n\n"
                      "def predict(x, w):\n    return F.softmax(x @ w, 1)\n")
    dot = tmp_path / "predict.dot"
    assert main(["trace", f"{script}:predict", "--example-shapes", "f32[4,3]", "f32[3,2]",
                 "--dot", str(dot)]) == 0
    text = dot.read_text()
    assert "matmul" in text and "f32[4,2]" in text
    assert main(["trace", f"{script}:nope", "--example-shapes", "f32[1]", "--dot", str(dot)]) == 1
    assert main(["trace", f"{script}:predict", "--example-shapes", "float[4]", "--dot", str(dot)]) == 1


def test_trace_reads_a_script_of_any_name_and_refuses_a_folder(tmp_path, capsys):
    """A script named model.txt, or a folder, ended in `'NoneType' object has no attribute
    'loader'` with a traceback."""
    script = tmp_path / "model.txt"
    script.write_text("def double(x):\n    return x * 2\n")
    dot = tmp_path / "g.dot"
    assert main(["trace", f"{script}:double", "--example-shapes", "f32[3]", "--dot", str(dot)]) == 0
    assert main(["trace", f"{tmp_path}:double", "--example-shapes", "f32[3]", "--dot", str(dot)]) == 1
    assert f"{tmp_path} is not a file" in capsys.readouterr().err


def test_inspect_writes_an_image_only_where_told(exported, tmp_path, monkeypatch, capsys):
    """Without -o, an svg went to `<name>.<stage>.svg` in the working folder, replacing a file
    of that name the user had."""
    path, _ = exported
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "cnn.optimized.svg"
    mine.write_text("my own figure")
    assert main(["inspect", path, "--format", "svg"]) == 1
    assert "renders an image: name its file with -o PATH" in capsys.readouterr().err
    assert mine.read_text() == "my own figure"


def test_train_refuses_a_save_path_before_training(exported, tmp_path, capsys):
    """An unwritable --save was found after every step had run, and the training was lost."""
    path, _ = exported
    for save, reason in [(tmp_path / "missing" / "more.gcx", "no folder"), (tmp_path, "it is a folder")]:
        assert main(["train", path, "--data", str(tmp_path), "--steps", "3", "--save", str(save)]) == 1
        assert f"cannot write {save}: {reason}" in capsys.readouterr().err
