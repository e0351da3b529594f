"""The step builder every training step is built with, and the executable protocols."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import distributed, nn, optim, train
from graphc.backends import DeviceResident, Executable, PlannedExecutable
from graphc.data import TensorDataset
from graphc.distributed import DataParallelStep, DistributedLoader, World
from graphc.ir.interpret import evaluate
from graphc.passes import Stages
from graphc.step_builder import StepBuilder, trace_gradients

REF = "reference"


def noisy_mlp(seed: int = 0) -> nn.Module:
    """Parameters, float and integer buffers (batch norm) and dropout (the RNG key)."""
    gc.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.25),
                         nn.Linear(6, 3))


def batch(n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((n, 4)).astype(np.float32), rng.integers(0, 3, n)


def donated_names(graph, donate: dict[int, int]) -> dict[str, str]:
    """Donating input name -> the output written into it."""
    return {graph.inputs[i].name: graph.outputs[o][0] for i, o in donate.items()}


def test_every_state_input_of_a_train_step_is_donated_to_its_update_once():
    model, target = noisy_mlp(), nn.Linear(4, 3)
    step = gc.compile_train_step(model, lambda out, x, y: F.cross_entropy(out + target(x), y),
                                 optim.Adam(model.parameters()), (batch()[0], *batch()),
                                 backend=REF, targets=2)
    graph = step._latest.traced
    donated = donated_names(graph, step.donate)
    assert len(set(step.donate.values())) == len(step.donate)
    implicit = {"Linear.weight", "Linear.bias"}  # the target network: read, never written
    assert implicit <= {inp.name for inp in graph.inputs}
    expected = {inp.name for inp in graph.inputs if inp.role != "data"} - implicit
    assert set(donated) == expected
    prefix = {"param": "param:", "state": ("state:", "buffer:"), "rng": "rng"}
    for inp in graph.inputs:
        if inp.name in donated and inp.name != "step":
            assert donated[inp.name].startswith(prefix[inp.role])
            assert donated[inp.name].split(":")[-1] == inp.name.split(":")[-1]
    assert donated["step"] == "step"


def test_learning_rate_follows_the_implicit_inputs_and_the_rng_key_comes_last():
    model, target = noisy_mlp(), nn.Linear(4, 3)
    step = gc.compile_train_step(model, lambda out, x, y: F.cross_entropy(out + target(x), y),
                                 optim.SGD(model.parameters(), lr=0.1), (batch()[0], *batch()),
                                 backend=REF, targets=2)
    names = [inp.name for inp in step._latest.traced.inputs]
    assert names[-4:] == ["Linear.weight", "Linear.bias", "lr", "rng"]
    assert names.index("step") < names.index("Linear.weight")


def test_the_data_parallel_graphs_together_donate_what_the_single_step_donates():
    model = noisy_mlp()
    single = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()),
                                   batch(), backend=REF)
    parallel = DataParallelStep(model, F.cross_entropy, optim.Adam(model.parameters()), batch(),
                                backend=REF, world=World())
    gradients = donated_names(parallel._latest.traced, parallel.donate)
    update = donated_names(parallel._update.traced, parallel._update.donate)
    assert set(gradients) == {"1.num_batches_tracked"}  # integers are not averaged
    assert not set(gradients) & set(update)
    # The RNG key is advanced on the host by the data-parallel step (one stream per rank).
    assert {**gradients, **update, "rng": "rng"} == donated_names(single._latest.traced,
                                                                 single.donate)


def test_spliced_gradients_are_those_of_value_and_grad():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters()), batch(),
                                 backend=REF)
    x, y = batch()
    spec = step.spec
    gradients = trace_gradients(spec, [x, y], Stages("test"))
    with StepBuilder(spec, "loss_and_grads") as b:
        data, params, buffers = b.batch([x, y]), b.params(), b.buffers()
        loss, _, grads = b.splice(gradients, data, params, buffers)
        b.output("loss", loss)
        for name, g in grads.items():
            b.output(f"grad:{name}", g)
    assert not b.donate and [inp.role for inp in b.graph.inputs] == ["data"] * 2 + ["param"] * 4
    loss, *grads = evaluate(b.graph, [x, y, *spec.params.values()])

    def loss_of(params: dict) -> gc.Tensor:
        return F.cross_entropy(nn.functional_call(model, params, x), y)

    expected_loss, expected = gc.value_and_grad(loss_of, backend=REF)(dict(spec.params))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    for name, g in zip(spec.trainable, grads):
        np.testing.assert_allclose(g, expected[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_executables_declare_what_they_offer():
    model = noisy_mlp()
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters()), batch(),
                                 backend=REF)
    assert isinstance(step.executable, Executable)
    assert not isinstance(step.executable, (PlannedExecutable, DeviceResident))
    assert not step._latest.device_resident
    with pytest.raises(gc.GraphcError, match="has no memory plan"):
        step.memory_plan
    compiled = gc.jit(lambda v: v * 2.0 + 1.0, backend="numba-cpu")
    compiled(np.ones(3, np.float32))
    executable = compiled._last.executable
    assert isinstance(executable, PlannedExecutable) and not isinstance(executable, DeviceResident)
    assert executable.plan.peak_bytes >= 0 and executable.kernels


class NoisySqrt(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.drop = nn.Linear(4, 3), nn.Dropout(0.5)

    def forward(self, x: gc.Tensor) -> gc.Tensor:
        return gc.sqrt(self.drop(self.lin(x)) - 1e6)  # negative: NaN


def test_a_data_parallel_step_locates_the_op_that_made_the_nan():
    """It reruns its gradients graph with this rank's RNG key (it used to pass the learning
    rate, which that graph does not take, where the key goes: TypeError)."""
    model = NoisySqrt()
    step = DataParallelStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                            batch(), backend=REF, world=World())
    report = step.check_numerics(*batch())
    assert report.op == "sqrt" and report.kind == "NaN" and "test_step_builder.py" in report.loc
    with pytest.raises(gc.GraphcError, match=r"sqrt at .*test_step_builder.py:\d+ .*produced NaN"):
        distributed.fit(step, DistributedLoader(TensorDataset(*batch(10)), 5, World()),
                        progress=False, check_numerics=True)


class FakeWorld:
    """Rank 1 of 2: not the root; it evaluates through a stand-in for the collective."""

    size, is_root = 2, False

    def __init__(self) -> None:
        self.evaluated = 0

    def evaluate(self, model_fn, loss_fn, loader, targets=1) -> dict:
        self.evaluated += 1
        return {"loss": 0.5, "outputs": None}


def test_fit_leaves_announcing_to_the_root_and_evaluation_to_the_world(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 batch(), backend=REF)
    world, announced, started = FakeWorld(), [], []
    assert isinstance(world, train.World) and isinstance(train.SINGLE_PROCESS, train.World)
    history = train.fit(step, [batch()], epochs=3, val_loader=[batch()], world=world,
                        checkpoint_path=str(tmp_path / "ckpt"), initial_epoch=2,
                        on_epoch_start=started.append,
                        on_epoch_end=lambda epoch, logs: announced.append(epoch))
    assert [e["epoch"] for e in history.epochs] == started == [2, 3]
    assert history["val_loss"] == [0.5, 0.5] and world.evaluated == 2
    assert not announced and not (tmp_path / "ckpt").exists()
    assert step.step_count == 2
