"""graphc.distributed.PipelineParallelStep: the partitioner, the schedules, and real 2-rank jobs.

Most tests run every stage in this process (a world of one: messages stay in memory, the
same schedules run); the MPI tests launch `mpiexec -n 2` on tests/mpi_scripts/pipeline_steps.py
(bounded by a timeout) and skip when mpi4py or mpiexec is missing.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.distributed import (DistributedError, PipelineParallelStep, World, stage_boundary)
from graphc.compile import CompiledGraph
from graphc.distributed.pipeline import (BACKWARD, FORWARD, StageExecutable, balanced_cuts,
                                         node_cost, partition, schedule, split_comm)
from graphc.lowering import compile_graph
from graphc.models import mlp, mnist_cnn
from graphc.step_builder import StepSpec, trace_loss

from test_distributed import SCRIPTS, launch, load_script, needs_mpi


class Skip(nn.Module):
    """Three marked stages; the first stage's output is read again by the last (a skip)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 8)
        self.fc3, self.fc4 = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):
        a = stage_boundary(F.relu(self.fc1(x)))
        b = stage_boundary(F.tanh(self.fc3(F.relu(self.fc2(a)))))
        return self.fc4(b + a)


def traced(model: nn.Module, batch) -> gc.ir.Graph:
    params = dict(model.named_parameters())
    opt = optim.SGD(model.parameters(), lr=0.1)
    spec = StepSpec("t", model, F.cross_entropy, opt, params, dict(model.named_buffers()),
                    list(params), {})
    return trace_loss(spec, batch)[0]


def mlp_batch(rows: int = 8, features: int = 12, classes: int = 4, dtype: str = "float32"):
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, features)).astype(dtype), rng.integers(0, classes, rows)


def pipeline(model: nn.Module, batch, optimizer: optim.Optimizer | None = None,
             **options) -> PipelineParallelStep:
    return PipelineParallelStep(model, F.cross_entropy, optimizer or optim.Adam(model.parameters(), lr=1e-2),
                                batch, backend="reference", world=World(), **options)


# -- the partitioner ---------------------------------------------------------------------------
def test_module_paths_cut_after_the_module_and_one_activation_crosses():
    gc.manual_seed(0)
    model = mlp((12, 16, 16, 4))
    step = pipeline(model, mlp_batch(), stages=2, microbatches=4, boundaries=["1"])
    first, second = step.partition.stages
    assert first.modules == ["0", "1"] and second.modules == ["2", "3", "4"]
    assert first.params == ["0.weight", "0.bias"]
    assert second.params == ["2.weight", "2.bias", "4.weight", "4.bias"]
    (crossing,) = step.partition.crossings
    assert (crossing.source, crossing.readers) == (0, (1,))
    assert crossing.type.shape == (2, 16) and crossing.nbytes == 2 * 16 * 4  # one micro-batch
    assert step.partition.bytes_between(0, 1) == 128
    assert first.data == [0] and second.data == [1]  # inputs to the first, labels to the last


def test_a_value_read_two_stages_later_is_sent_to_that_stage_directly():
    gc.manual_seed(0)
    batch = mlp_batch(4, 6, 3)
    part = pipeline(Skip(), batch, stages=3, microbatches=2).partition
    by_reader = {c.readers: c for c in part.crossings}
    assert set(by_reader) == {(1, 2), (2,)}
    assert by_reader[(1, 2)].source == 0 and by_reader[(2,)].source == 1
    assert [len(s.receives) for s in part.stages] == [0, 1, 2]
    assert part.bytes_between(0, 2) == part.bytes_between(0, 1) == 2 * 8 * 4


def test_marked_and_named_boundaries_must_agree_with_the_stage_count():
    gc.manual_seed(0)
    with pytest.raises(DistributedError, match="2 boundaries make 3 stages, not stages=2"):
        pipeline(Skip(), mlp_batch(4, 6, 3), stages=2, microbatches=2)
    with pytest.raises(DistributedError, match="boundary 'fc9' names no module"):
        pipeline(mlp((12, 16, 4)), mlp_batch(), stages=2, microbatches=2, boundaries=["fc9"])
    with pytest.raises(DistributedError, match="must follow one another"):
        pipeline(mlp((12, 16, 16, 4)), mlp_batch(), stages=3, microbatches=2, boundaries=["2", "0"])


def test_costs_count_multiply_adds_and_the_balanced_cut_splits_them_evenly():
    gc.manual_seed(0)
    model = mlp((64, 64, 64, 64, 64, 4))
    graph = traced(model, mlp_batch(4, 64))
    matmuls = [n for n in graph.nodes if n.op == "matmul"]
    assert node_cost(matmuls[0]) == 2 * 4 * 64 * 64
    (cut,) = balanced_cuts(graph, 2)
    part = partition(graph, [cut])
    costs = [s.cost for s in part.stages]
    assert max(costs) / sum(costs) < 0.6
    assert [c.type.shape for c in part.crossings] == [(4, 64)]


def test_tied_weights_across_stages_and_training_batch_norm_are_refused():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(stage_boundary(F.relu(self.fc(x))))

    gc.manual_seed(0)
    with pytest.raises(DistributedError, match="parameter 'fc.weight' is read by stages \\[0, 1\\]"):
        pipeline(Tied(), mlp_batch(4, 4), stages=2, microbatches=2)
    bn = nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(DistributedError, match="updates the buffers 1.num_batches_tracked, 1.running_mean, "
                       "1.running_var in training"):
        pipeline(bn, mlp_batch(), stages=2, microbatches=2)
    with pytest.raises(DistributedError, match="divisible by microbatches=3"):
        pipeline(mlp((12, 4, 4)), mlp_batch(), stages=2, microbatches=3)


def test_the_partition_draws_stages_as_clusters_and_cut_edges_with_their_bytes():
    gc.manual_seed(0)
    step = pipeline(mlp((12, 16, 16, 4)), mlp_batch(), stages=2, microbatches=4, boundaries=["1"])
    dot = step.partition.to_dot()
    assert dot.count("subgraph cluster_stage") == 2
    assert dot.count("color=red") == 1 and 'label="128 B"' in dot


# -- messages in the IR ----------------------------------------------------------------------------
def comm_nodes(graph: gc.ir.Graph, op: str) -> list[tuple[int, int, int]]:
    return [(n.attrs["peer"], n.attrs["tag"], n.attrs["bytes"]) for n in graph.nodes if n.op == op]


def test_stage_graphs_receive_and_send_through_comm_ops_naming_peer_tag_and_bytes():
    gc.manual_seed(0)
    step = pipeline(Skip(), mlp_batch(4, 6, 3), stages=3, microbatches=2)
    part = step.partition
    by_reader = {c.readers: c for c in part.crossings}
    a, b = by_reader[(1, 2)], by_reader[(2,)]  # fc1's activation, fc3's
    assert a.nbytes == b.nbytes == 2 * 8 * 4  # two rows of eight float32 per micro-batch
    back = len(part.crossings)  # cotangents are tagged after every activation
    graphs = step.stage_graphs()
    (first, first_back), (middle, middle_back), (last, last_back) = (graphs[s] for s in range(3))
    assert comm_nodes(first, "recv") == []
    assert comm_nodes(first, "send") == [(1, a.index, 64), (2, a.index, 64)]
    assert comm_nodes(middle, "recv") == [(0, a.index, 64)]
    assert comm_nodes(middle, "send") == [(2, b.index, 64)]
    assert sorted(comm_nodes(last, "recv")) == sorted([(0, a.index, 64), (1, b.index, 64)])
    assert comm_nodes(last, "send") == []
    # backward: cotangents come back from the readers and go back to the sources
    assert comm_nodes(first_back, "recv") == [(1, back + a.index, 64), (2, back + a.index, 64)]
    assert comm_nodes(first_back, "send") == []
    assert comm_nodes(middle_back, "recv") == [(2, back + b.index, 64)]
    assert comm_nodes(middle_back, "send") == [(0, back + a.index, 64)]
    assert sorted(comm_nodes(last_back, "send")) == sorted([(0, back + a.index, 64),
                                                            (1, back + b.index, 64)])
    for rt in step._stages:  # the compiled parts hold no message
        for executable in (rt.forward, rt.backward):
            assert not {"send", "recv"} & {n.op for n in executable.compiled.traced.nodes}


def test_stage_graphs_verify_print_and_round_trip_through_json():
    gc.manual_seed(0)
    step = pipeline(mlp((12, 16, 16, 4)), mlp_batch(), stages=2, microbatches=4, boundaries=["1"])
    graphs = step.stage_graphs()
    (first, _), (second, _) = graphs[0], graphs[1]
    text = str(second.verify())
    assert "recv(shape=(2,16), dtype='float32', peer=0, tag=0, bytes=128)" in text
    assert "send(" in str(first) and "peer=1, tag=0, bytes=128" in str(first)
    for forward, backward in graphs.values():
        for graph in (forward, backward):
            assert str(gc.ir.Graph.from_json(graph.to_json()).verify()) == str(graph)
    assert 'shape=cds' in first.to_dot()
    assert 'label="send to peer 1\\ntag 0, 128 bytes\\nf32[2,16]"' in first.to_dot()
    assert 'label="recv from peer 0\\ntag 0, 128 bytes\\nf32[2,16]"' in second.to_dot()


def test_a_message_whose_bytes_disagree_with_its_type_is_refused():
    b = gc.ir.Builder("g")
    with pytest.raises(gc.ir.ShapeError, match=r"recv: bytes=100 does not match f32\[2,16\], "
                                               r"which is 128 bytes"):
        b.recv(shape=(2, 16), dtype="float32", peer=0, tag=0, bytes=100)
    x = b.add_input(gc.ir.TensorType((3,), "float64"), "x")
    with pytest.raises(gc.ir.ShapeError, match="send: peer .-1. and tag .0. must be non-negative"):
        b.send(x, peer=-1, tag=0, bytes=24)


def test_the_reference_interpreter_refuses_messages_without_a_communicator():
    from graphc.backends.reference import evaluate
    from graphc.ir.ops.comm import CommunicationError

    gc.manual_seed(0)
    step = pipeline(mlp((12, 16, 16, 4)), mlp_batch(), stages=2, microbatches=4, boundaries=["1"])
    graph = step.stage_graphs()[1][0]
    args = [np.zeros(inp.value.shape, inp.value.type.np_dtype) for inp in graph.inputs]
    with pytest.raises(CommunicationError, match=r"recv \(peer 0, tag 0\) needs a communicator.*"
                                                 "StageExecutable"):
        evaluate(graph, args)


class MemoryLink:
    """A stage's messages in a dict: what it receives, by (peer, tag), and what it sent."""

    def __init__(self, inbox: dict) -> None:
        self.inbox, self.sent = inbox, {}

    def receive(self, node, microbatch: int) -> np.ndarray:
        return self.inbox[node.attrs["peer"], node.attrs["tag"]]

    def send(self, array: np.ndarray, node, microbatch: int) -> None:
        self.sent[node.attrs["peer"], node.attrs["tag"]] = np.array(array)


def compile_on_reference(graph: gc.ir.Graph, donate: dict[int, int]) -> CompiledGraph:
    return CompiledGraph(graph, graph, compile_graph(graph, "reference", donate), donate)


def test_split_comm_cuts_the_messages_off_and_only_at_the_boundary():
    b = gc.ir.Builder("stage")
    w = b.add_input(gc.ir.TensorType((4,), "float32"), "w", "param")
    x = b.recv(shape=(4,), dtype="float32", peer=0, tag=3, bytes=16)
    sent = b.send(b.mul(x, w), peer=2, tag=1, bytes=16)
    b.add_output("y", sent)
    split = split_comm(b.graph)
    assert [i.name for i in split.body.inputs] == ["w", "recv:0:3"]
    assert [n.op for n in split.body.nodes] == ["mul"]
    assert [(i, n.attrs["peer"]) for i, n in split.sends] == [(0, 2)]
    # and run by StageExecutable on the reference backend, through an in-memory link
    link = MemoryLink({(0, 3): np.arange(4, dtype=np.float32)})
    executable = StageExecutable(b.graph, compile_on_reference)
    (y,), (received,) = executable([np.full(4, 2, np.float32)], link, 0)
    np.testing.assert_array_equal(y, [0, 2, 4, 6])
    np.testing.assert_array_equal(link.sent[2, 1], [0, 2, 4, 6])
    np.testing.assert_array_equal(received, np.arange(4))
    # a send read inside the graph is no boundary
    b.add_output("z", b.neg(sent))
    with pytest.raises(DistributedError, match="neg reads the result of a send node"):
        split_comm(b.graph)


def test_saved_residuals_are_computed_once_and_spare_the_backward_its_recomputation():
    def matmuls(graph) -> int:
        return sum(n.op == "matmul" for n in graph.nodes)

    counts = {}
    for recompute in (False, True):
        gc.manual_seed(0)
        step = pipeline(mlp((12, 16, 16, 4)), mlp_batch(), stages=2, microbatches=4,
                        boundaries=["1"], recompute=recompute)
        last = step._stages[1]
        counts[recompute] = matmuls(last.forward.compiled.optimized), matmuls(last.backward.compiled.optimized)
        saved = [n for n in last.forward.compiled.optimized.output_names if n.startswith("saved:")]
        assert (saved == []) == recompute
    assert counts[False][0] == counts[True][0] == 2  # CSE merged the copies the split added
    assert counts[True][1] == counts[False][1] + 2  # the forward's two products, again


def test_only_activations_are_saved_never_weights_or_their_transposes():
    gc.manual_seed(0)
    step = pipeline(mlp((12, 16, 16, 4)), mlp_batch(), stages=2, microbatches=4, boundaries=["1"])
    for rt in step._stages:
        saved = [v for name, v in rt.forward.compiled.optimized.outputs if name.startswith("saved:")]
        assert saved and all(v.shape[0] == 2 for v in saved)  # one micro-batch's rows

# -- schedules -----------------------------------------------------------------------------------
def test_1f1b_keeps_at_most_stages_minus_s_forwards_in_flight():
    for stage in range(4):
        actions = schedule("1f1b", stage, 4, 8)
        assert sorted(actions) == sorted(schedule("gpipe", stage, 4, 8))
        in_flight = np.cumsum([1 if d == FORWARD else -1 for d, _ in actions])
        assert in_flight.max() == 4 - stage
        assert [m for d, m in actions if d == BACKWARD] == list(range(8))
    assert schedule("1f1b", 1, 2, 3) == [(FORWARD, 0), (BACKWARD, 0), (FORWARD, 1), (BACKWARD, 1),
                                         (FORWARD, 2), (BACKWARD, 2)]


# -- equivalence with the single-process step (one process running every stage) -------------------
def adam(model: nn.Module) -> optim.Optimizer:
    return optim.Adam(model.parameters(), lr=1e-2)


def momentum(model: nn.Module) -> optim.Optimizer:
    return optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def assert_same_training(build, batch, steps: int = 3, rtol: float = 1e-5, atol: float = 0.0,
                         make_optimizer=adam, **options) -> PipelineParallelStep:
    gc.manual_seed(0)
    reference_model = build()
    single = gc.compile_train_step(reference_model, F.cross_entropy, make_optimizer(reference_model),
                                   batch, backend="reference")
    gc.manual_seed(0)
    model = build()
    step = PipelineParallelStep(model, F.cross_entropy, make_optimizer(model), batch,
                                backend="reference", world=World(), **options)
    gc.manual_seed(1)  # each from the same key: the same dropout masks
    expected = [single(*batch) for _ in range(steps)]
    gc.manual_seed(1)
    np.testing.assert_allclose([step(*batch) for _ in range(steps)], expected, rtol=rtol)
    for name, value in reference_model.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[name], value, rtol=rtol, atol=atol, err_msg=name)
    for name, slots in single.opt_state.items():
        for slot, value in slots.items():
            np.testing.assert_allclose(step.opt_state[name][slot], value, rtol=rtol, atol=atol,
                                       err_msg=f"{name}.{slot}")
    assert float(step.step_count) == steps
    return step


@pytest.mark.parametrize("kind, recompute", [("1f1b", False), ("gpipe", False), ("1f1b", True)])
def test_three_stages_with_a_skip_train_as_one_process_does(kind, recompute):
    step = assert_same_training(lambda: Skip().to("float64"), mlp_batch(8, 6, 3, "float64"),
                                stages=3, microbatches=4, schedule=kind, recompute=recompute)
    assert [t.steps for t in step.times] == [3, 3, 3]
    assert all(t.forward > 0 and t.backward > 0 and t.update > 0 for t in step.times)


def cnn_batch(dtype: str):
    rng = np.random.default_rng(1)
    return rng.standard_normal((8, 1, 8, 8)).astype(dtype), rng.integers(0, 4, 8)


def test_the_mnist_cnn_with_adam_in_float64_matches():
    step = assert_same_training(lambda: mnist_cnn(8, 4).eval().to("float64"), cnn_batch("float64"),
                                stages=2, microbatches=4)
    assert step.partition.stages[0].modules[0] == "0"  # the convolutions carry most FLOPs


def test_the_mnist_cnn_with_momentum_in_float32_matches_to_rounding():
    """float32: gradients summed over micro-batches round differently from the whole batch's,
    and elements near zero differ by ~1e-10 absolute. (Adam divides by the root of the squared
    gradient and turns such rounding into ~1e-6 absolute after three steps: see float64.)"""
    assert_same_training(lambda: mnist_cnn(8, 4).eval(), cnn_batch("float32"), atol=1e-7,
                         make_optimizer=momentum, stages=2, microbatches=4)


@pytest.mark.parametrize("recompute", [False, True])
def test_with_one_micro_batch_dropout_draws_the_single_process_masks(recompute):
    """One micro-batch draws from the key the single-process step uses, so even dropout gives
    the same training; recomputed, the backward must draw the forward's mask again."""
    def build():
        return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 4))

    step = assert_same_training(build, mlp_batch(), make_optimizer=momentum, stages=2,
                                microbatches=1, boundaries=["1"], recompute=recompute)
    assert step.partition.stages[1].uses_rng


def test_a_refused_stage_file_leaves_every_stage_as_it_was(tmp_path):
    """One process running both stages loaded stage 0's file, then refused stage 1's: stage 0's
    weights and step count had changed."""
    from graphc.ir.errors import LoadError
    path = str(tmp_path / "ckpt")
    gc.manual_seed(0)
    model = mlp((12, 16, 16, 4))
    step = pipeline(model, mlp_batch(), stages=2, microbatches=2, boundaries=["1"])
    step(*mlp_batch())
    step.save_checkpoint(path)
    step(*mlp_batch())
    before = {**{k: v.copy() for k, v in model.state_dict().items()}, "step": step.step_count.copy()}
    damaged = bytearray(open(f"{path}.stage1", "rb").read())
    damaged[-3] ^= 0xFF
    open(f"{path}.stage1", "wb").write(bytes(damaged))
    with pytest.raises(LoadError, match="stage1"):
        step.load_checkpoint(path)
    for name, value in {**model.state_dict(), "step": step.step_count}.items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)


def test_a_checkpoint_per_stage_resumes_training_exactly(tmp_path):
    path = str(tmp_path / "ckpt")

    def fresh() -> tuple[nn.Module, PipelineParallelStep]:
        gc.manual_seed(0)
        model = mlp((12, 16, 16, 4))
        return model, pipeline(model, mlp_batch(), stages=2, microbatches=2, boundaries=["1"])

    model, step = fresh()
    assert not step.load_checkpoint(path)
    step(*mlp_batch())
    step.save_checkpoint(path)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.stage0", "ckpt.stage1"]
    step(*mlp_batch())
    expected = {**model.state_dict(), "step": step.step_count.copy()}
    model, step = fresh()
    assert step.load_checkpoint(path) and float(step.step_count) == 1
    step(*mlp_batch())
    for name, value in expected.items():
        np.testing.assert_array_equal({**model.state_dict(), "step": step.step_count}[name], value,
                                      err_msg=name)
    os.remove(path + ".stage1")
    assert not fresh()[1].load_checkpoint(path)

def test_a_pipeline_built_again_on_its_optimizer_goes_on_counting_steps():
    """Built again after 3 Adam steps, a pipeline restarted the count at 0 (bias correction as
    at step 1, the moments kept): 0.15 off PyTorch's weights after 3 + 4 + 3 steps; a training
    step goes on from the optimizer's count."""
    batch = mlp_batch()
    gc.manual_seed(0)
    reference_model = mlp((12, 16, 16, 4))
    reference_optimizer = adam(reference_model)
    gc.manual_seed(0)
    model = mlp((12, 16, 16, 4))
    optimizer = adam(model)
    for steps in (3, 4, 3):
        single = gc.compile_train_step(reference_model, F.cross_entropy, reference_optimizer, batch,
                                       backend="reference")
        step = pipeline(model, batch, optimizer, stages=2, microbatches=2, boundaries=["1"])
        for _ in range(steps):
            np.testing.assert_allclose(step(*batch), single(*batch), rtol=1e-5)
    assert float(optimizer.step_count) == float(reference_optimizer.step_count) == 10
    for name, value in reference_model.state_dict().items():
        np.testing.assert_allclose(model.state_dict()[name], value, rtol=1e-5, atol=1e-7, err_msg=name)


def test_a_stage_checkpoint_of_other_parameter_groups_is_refused(tmp_path):
    """Loaded into a pipeline whose groups hold the parameters in another order, the rates went
    to the wrong group; graphc.train's checkpoint functions name the pipeline's own."""
    from graphc.ir.errors import LoadError
    from graphc.train import save_checkpoint
    path = str(tmp_path / "ckpt")

    def build(order):
        gc.manual_seed(0)
        model = mlp((12, 16, 16, 4))
        groups = {0: {"params": list(model[0].parameters()), "lr": 0.05},
                  2: {"params": list(model[2].parameters()), "lr": 0.001}}
        opt = optim.Adam([groups[i] for i in order])
        return pipeline(model, mlp_batch(), opt, stages=2, microbatches=2, boundaries=["1"])

    step = build([0, 2])
    step(*mlp_batch())
    step.save_checkpoint(path)
    assert build([0, 2]).load_checkpoint(path)
    with pytest.raises(LoadError, match="parameter groups"):
        build([2, 0]).load_checkpoint(path)
    with pytest.raises(gc.GraphcError, match="PipelineParallelStep keeps one checkpoint per stage"):
        save_checkpoint(path, step)


# -- real ranks --------------------------------------------------------------------------------
def assert_each_rank_compiled_its_stage(messages: list[np.ndarray]) -> None:
    """Each rank's comm nodes ("STAGE GRAPH OP PEER TAG BYTES", tests/mpi_scripts) are its own
    stage's, of a two-stage pipeline: the first stage's forward sends to the second and its
    backward receives from it, the second's the mirror image, the same tags and bytes."""
    ranks = len(messages)
    ends = []
    for r, lines in enumerate(messages):
        stage = r // (ranks // 2)
        ops = [line.split() for line in lines]
        directions = ([("forward", "send"), ("backward", "recv")] if stage == 0
                      else [("forward", "recv"), ("backward", "send")])
        assert [(int(s), graph, op, int(peer)) for s, graph, op, peer, _, _ in ops] == [
            (stage, graph, op, 1 - stage) for graph, op in directions], lines
        ends.append([(int(tag), int(nbytes)) for *_, tag, nbytes in ops])
    assert all(end == ends[0] for end in ends) and ends[0][0][1] > 0


def ranks_state(out_dir, ranks: int = 2) -> tuple[np.ndarray, dict[str, np.ndarray], list[np.ndarray]]:
    """The losses (every rank's the same), the stages' state merged (replicas of a stage must
    hold the same) and each rank's times."""
    saved = [dict(np.load(os.path.join(out_dir, f"rank{r}.npz"))) for r in range(ranks)]
    assert_each_rank_compiled_its_stage([rank["messages"] for rank in saved])
    merged: dict[str, np.ndarray] = {}
    for rank in saved:
        np.testing.assert_array_equal(rank["losses"], saved[0]["losses"])
        for name, value in rank.items():
            if name not in ("losses", "times", "step", "messages"):
                if name in merged:
                    np.testing.assert_array_equal(value, merged[name], err_msg=name)
                merged[name] = value
    return saved[0]["losses"], merged, [rank["times"] for rank in saved]


@needs_mpi
@pytest.mark.parametrize("model, dtype, optimizer, atol", [
    ("mlp", "float32", "adam", 1e-7), ("cnn", "float32", "sgd", 1e-7), ("cnn", "float64", "adam", 0.0)])
def test_two_ranks_four_micro_batches_equal_the_single_process_step(tmp_path, model, dtype,
                                                                    optimizer, atol):
    status, output = launch([os.path.join(SCRIPTS, "pipeline_steps.py"), "equivalent", model,
                             dtype, optimizer, str(tmp_path)], timeout=120)
    assert status == 0, output
    script = load_script("pipeline_steps")
    net, batches = script.build(model, dtype)
    single = gc.compile_train_step(net, F.cross_entropy, script.optimizer(net, optimizer),
                                   batches[0], backend="reference")
    losses, state, times = ranks_state(tmp_path)
    np.testing.assert_allclose(losses, [single(*batch) for batch in batches], rtol=1e-5)
    expected = {**net.state_dict(), **{f"optim/{n}/{k}": v for n, s in single.opt_state.items()
                                       for k, v in s.items()}}
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(state[name], value, rtol=1e-5, atol=atol, err_msg=name)
    for forward, backward, update, wait, allreduce, total in times:
        assert min(forward, backward, update) > 0 and forward + backward + update + wait <= total
        assert allreduce == 0


@needs_mpi
@pytest.mark.slow
def test_two_ranks_on_numba_cpu_with_gpipe(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "pipeline_steps.py"), "equivalent", "cnn",
                             "float64", "adam", str(tmp_path), "numba-cpu", "gpipe"], timeout=300)
    assert status == 0, output
    script = load_script("pipeline_steps")
    net, batches = script.build("cnn", "float64")
    single = gc.compile_train_step(net, F.cross_entropy, script.optimizer(net), batches[0],
                                   backend="reference")
    losses, state, _ = ranks_state(tmp_path)
    np.testing.assert_allclose(losses, [single(*batch) for batch in batches], rtol=1e-5)
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(state[name], value, rtol=1e-5, err_msg=name)


@needs_mpi
def test_two_stages_by_two_replicas_equal_the_single_process_step(tmp_path):
    """4 ranks (on 2 cores): each replica pipelines its half of the batch in 2 micro-batches."""
    status, output = launch([os.path.join(SCRIPTS, "pipeline_steps.py"), "equivalent", "cnn",
                             "float64", "adam", str(tmp_path)], ranks=4, timeout=240)
    assert status == 0, output
    script = load_script("pipeline_steps")
    net, batches = script.build("cnn", "float64")
    single = gc.compile_train_step(net, F.cross_entropy, script.optimizer(net), batches[0],
                                   backend="reference")
    losses, state, times = ranks_state(tmp_path, ranks=4)
    np.testing.assert_allclose(losses, [single(*batch) for batch in batches], rtol=1e-5)
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(state[name], value, rtol=1e-5, err_msg=name)
    assert all(t[4] > 0 for t in times)  # every stage averaged over its replicas


@needs_mpi
def test_a_rank_leaving_quietly_ends_the_job_naming_it(tmp_path):
    status, output = launch([os.path.join(SCRIPTS, "pipeline_steps.py"), "exit"], timeout=60,
                            GRAPHC_DDP_TIMEOUT="3")
    assert status != 0
    assert "rank 1 leaving before its first step" in output
    assert "rank 0 of 2: receiving the cotangent of" in output
    assert "from rank 1 did not complete within 3 s" in output

