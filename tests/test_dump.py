"""GRAPHC_DUMP and GRAPHC_VERIFY cover every stage of a compilation: the trace, autodiff,
simplify, fusion and the memory plan, each dumped as text and DOT and verified in turn."""
import re

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir import Builder, TensorType, VerificationError
from graphc.models import mnist_cnn
from graphc.passes import FUSION, pipeline
from graphc.passes.memplan import PlanValidationError

TRAIN_STEP_STAGES = ["trace", "autodiff", "train_step", "simplify", "fusion", "memory_plan"]


def cnn_step(model):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 4)
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (x, y), backend="numba-cpu")
    return step, x, y


def tiny_cnn():
    """Few kernels: compiles in a few seconds where the MNIST CNN takes half a minute."""
    gc.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))


def stages_in(directory, name):
    """{number: stage} of the dumped files `<name>.<NN>.<stage>.txt`, each with its .dot."""
    found = {}
    for path in directory.iterdir():
        match = re.fullmatch(re.escape(name) + r"\.(\d\d)\.(\w+)\.txt", path.name)
        if match:
            assert path.with_suffix(".dot").exists(), f"{path.name} has no DOT beside it"
            found[int(match[1])] = match[2]
    return found


@pytest.mark.parametrize("model", [pytest.param(lambda: mnist_cnn(image_size=8), marks=pytest.mark.slow,
                                                 id="mnist_cnn"), pytest.param(tiny_cnn, id="tiny_cnn")])
def test_cnn_training_step_dumps_every_stage_as_text_and_dot(tmp_path, monkeypatch, model):
    monkeypatch.setenv("GRAPHC_DUMP", str(tmp_path))
    gc.manual_seed(0)
    step, x, y = cnn_step(model())
    assert np.isfinite(step(x, y))
    stages = stages_in(tmp_path, "train_step")
    assert [stages[k] for k in sorted(stages)] == TRAIN_STEP_STAGES
    assert sorted(stages) == list(range(len(TRAIN_STEP_STAGES)))

    def read(number, suffix):
        return (tmp_path / f"train_step.{number:02d}.{TRAIN_STEP_STAGES[number]}.{suffix}").read_text()

    assert "conv2d" in read(0, "txt") and "optimizer" not in read(0, "txt")
    assert read(1, "txt").count("\n") > read(0, "txt").count("\n")  # the backward pass added
    kernels = re.findall(r"^  %.* = kernel\(", read(4, "txt"), re.MULTILINE)
    primitives = re.findall(r"^  %.* = \w+\(", read(3, "txt"), re.MULTILINE)
    assert 0 < len(kernels) < len(primitives)
    assert "subgraph cluster_k" in read(4, "dot")
    plan = read(5, "txt")
    assert plan.startswith("arena ") and "naive" in plan
    slots = re.findall(r"^\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)-(\d+)\s+\S", plan, re.MULTILINE)
    assert slots and all(int(offset) % 64 == 0 for _, offset, *_ in slots)
    assert any(colour in read(5, "dot") for colour in ("#fbb4ae", "#b3cde3", "#ccebc5"))


def test_grad_dumps_trace_autodiff_simplify_fusion_and_memory_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_DUMP", str(tmp_path))

    def loss(w, x):
        return gc.sum(gc.tanh(x @ w) ** 2)

    gc.grad(loss, backend="numba-cpu")(np.ones((3, 2), np.float32), np.ones((4, 3), np.float32))
    stages = stages_in(tmp_path, "loss")
    assert [stages[k] for k in sorted(stages)] == ["trace", "autodiff", "simplify", "fusion", "memory_plan"]


def test_verify_checks_every_stage_and_the_memory_plan(monkeypatch):
    """GRAPHC_VERIFY=1: each graph stage of the CNN step is verified, and the plan validated."""
    monkeypatch.setenv("GRAPHC_VERIFY", "1")
    verified, validated = [], []
    monkeypatch.setattr(pipeline, "verify_graph", lambda graph: verified.append(graph.name))
    monkeypatch.setattr(pipeline, "validate", lambda plan: validated.append(plan))
    step, x, y = cnn_step(tiny_cnn())
    step(x, y)
    assert len(verified) == len(TRAIN_STEP_STAGES) - 1 and len(validated) == 1

    monkeypatch.setenv("GRAPHC_VERIFY", "0")
    verified.clear()
    step, x, y = cnn_step(tiny_cnn())
    step(x, y)
    assert verified == []


def test_a_stage_that_breaks_a_type_fails_where_it_happens(tmp_path):
    b = Builder("g")
    x = b.add_input(TensorType((2, 3), "float32"), "x")
    b.add_output("y", b.exp(x))
    broken = b.graph
    broken.nodes[0].outputs[0].type = TensorType((3, 2), "float32")
    stages = pipeline.Stages("g", verify=True, dump_dir=str(tmp_path))
    with pytest.raises(VerificationError):
        stages.record("broken", broken)
    assert pipeline.Stages("g", verify=False).record("broken", broken) is broken


def test_memory_plan_stage_validates_the_plan(monkeypatch):
    b = Builder("g")
    x = b.add_input(TensorType((2, 3), "float32"), "x")
    w = b.add_input(TensorType((3, 4), "float32"), "w")
    b.add_output("y", b.sum(b.exp(b.matmul(x, w)), axes=(1,)))
    stages = pipeline.Stages("g", verify=True, dump_dir="")
    fused = stages.run(b.graph, [FUSION])
    assert stages.plan_memory(fused).storages  # the product lives in the arena
    plan_memory = pipeline.plan_memory

    def misaligned(graph, donate=None, scratch=None):
        plan = plan_memory(graph, donate, scratch)
        plan.storages[0].offset = 1
        return plan

    monkeypatch.setattr(pipeline, "plan_memory", misaligned)
    with pytest.raises(PlanValidationError, match="misaligned"):
        stages.plan_memory(fused)


def test_a_dump_location_that_is_not_a_folder_names_the_setting(tmp_path, monkeypatch):
    import graphc as gc
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("GRAPHC_DUMP", str(tmp_path / "a_file"))
    with pytest.raises(gc.GraphcError, match="GRAPHC_DUMP=.*cannot write the stages' graphs there"):
        gc.jit(lambda x: x * 2.0, backend="reference")(np.ones(3, np.float32))


def test_a_later_compilation_of_a_name_replaces_all_of_its_stages(tmp_path):
    """A recompilation with fewer stages (an export's trace and simplify) left the earlier one's
    later stages beside them: a folder mixing two compilations under one name."""
    b = Builder("g")
    x = b.add_input(TensorType((2, 3), "float32"), "x")
    b.add_output("y", b.exp(x))
    first = pipeline.Stages("g", dump_dir=str(tmp_path))
    for stage in ("trace", "simplify", "fusion"):
        first.record(stage, b.graph)
    (tmp_path / "g_update.00.trace.txt").write_text("another name's")
    pipeline.Stages("g", dump_dir=str(tmp_path)).record("trace", b.graph)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "g.00.trace.dot", "g.00.trace.txt", "g_update.00.trace.txt"]
