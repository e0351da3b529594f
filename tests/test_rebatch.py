"""Rebatching (passes/rebatch.py): another batch size of a compiled step or model reuses the
earlier optimized and fused graphs, renamed, only when the new trace is provably the old one
with its extents (and constants, as 1/B) renamed; anything else (a branch on the batch size to
another op) compiles afresh. Either way the values are those of a step compiled fresh at that
size."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir import Builder, TensorType
from graphc.backends.reference import evaluate
from graphc.passes import simplify
from graphc.passes.simplify import DerivedAttrs, attrs_key
from graphc.passes.rebatch import match_extents, rebatch

F32 = "float32"
REUSED = "reuses the graphs compiled for"


# -- the match, on small graphs ----------------------------------------------------------------
def flatten_scale_sum(batch: int, scale: float = 2.0, features: int = 4):
    """x (batch, features) -> reshape to (batch*features,) -> * scale -> sum."""
    b = Builder("g")
    x = b.add_input(TensorType((batch, features), F32), "x")
    flat = b.reshape(x, shape=(batch * features,))
    b.add_output("out", b.sum(b.mul(flat, b.const(scale, F32)), axes=(0,), keepdims=False))
    return b.graph


def test_match_renames_the_batch_and_its_products():
    match = match_extents(flatten_scale_sum(8), flatten_scale_sum(5))
    assert match is not None and match.ratio == Fraction(5, 8) and match.changed == {8, 32}
    # A graph not made from that trace: its reshape's attributes name the extent 32, which
    # nothing proves to be the batch's there.
    assert rebatch(flatten_scale_sum(8), match) is None


def test_rebatch_takes_the_new_trace_attributes():
    old, new = flatten_scale_sum(8), flatten_scale_sum(5)
    match = match_extents(old, new)
    renamed = rebatch(old, match)  # the traced graph itself: every node comes from the trace
    assert [v.type for v in renamed.values()] == [v.type for v in new.values()]
    assert renamed.nodes[0].attrs["shape"] == (20,)
    renamed.verify()


def scaled_by_product(batch: int):
    """x * (1/batch * 2): the constants' product is folded at compile time."""
    b = Builder("g")
    x = b.add_input(TensorType((batch, 4), F32), "x")
    b.add_output("out", b.mul(x, b.mul(b.const(1 / batch, F32), b.const(2.0, F32))))
    return b.graph


def two_slices(batch: int):
    """The first 8 rows of a table and its first `batch` rows: one value at batch 8."""
    b = Builder("g")
    table = b.add_input(TensorType((20, 4), F32), "table", "param")
    b.add_output("first8", b.slice(table, starts=(0, 0), stops=(8, 4), steps=(1, 1)))
    b.add_output("batch", b.slice(table, starts=(0, 0), stops=(batch, 4), steps=(1, 1)))
    return b.graph


@pytest.mark.parametrize("build", [lambda batch: flatten_scale_sum(batch, scale=1 / batch),
                                   scaled_by_product,
                                   lambda batch: times_filled_state(batch, filled)])
def test_rebatch_takes_the_new_constants(build):
    """A mean over the batch: the optimized graph at 8, renamed, computes with 1/5 at 5, a
    constant traced or one simplify folded (1/B * 2 is one constant in the optimized graph)."""
    old, new = build(8), build(5)
    match = match_extents(old, new)
    assert match is not None
    optimized = simplify(old)
    assert sum(n.op == "constant" for n in optimized.nodes) == 1
    renamed = rebatch(optimized, match)
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_array_equal(evaluate(renamed, [x])[0], evaluate(new, [x])[0])


def times_filled_state(batch: int, fill=np.full):
    """x.T * c.T for a constant c of the batch's shape (an initial state): c.T is folded."""
    b = Builder("g")
    x = b.add_input(TensorType((batch, 4), F32), "x")
    state = b.const(fill(batch, 4), F32)
    b.add_output("out", b.mul(b.transpose(x, perm=(1, 0)), b.transpose(state, perm=(1, 0))))
    return b.graph


def filled(batch, features):
    return np.full((batch, features), 0.5, np.float32)


def counting(batch, features):
    return np.arange(batch * features, dtype=np.float32).reshape(batch, features)


def test_match_takes_a_batch_equal_to_another_extent():
    """(8, 8) -> (5, 8): the features are 8 too, but no shape is read two ways."""
    match = match_extents(flatten_scale_sum(8, features=8), flatten_scale_sum(5, features=8))
    assert match is not None and match.changed == {8, 64}


def batch_times_weight(batch: int):
    """x (batch, 8) @ w (8, 8): at batch 8 the operands have one type, at 5 two."""
    b = Builder("g")
    x = b.add_input(TensorType((batch, 8), F32), "x")
    w = b.add_input(TensorType((8, 8), F32), "w", "param")
    b.add_output("out", b.matmul(x, w))
    return b.graph


@pytest.mark.parametrize("old, new", [
    (batch_times_weight(8), batch_times_weight(5)),   # operands of one type, then two
    (batch_times_weight(5), batch_times_weight(8)),   # and the other way
    (flatten_scale_sum(8, scale=1.0), flatten_scale_sum(5, scale=0.625)),  # x * 1 goes at 8
    (two_slices(8), two_slices(5)),                      # one slice at 8, two at 5 (CSE)
    (times_filled_state(8, counting), times_filled_state(5, counting)),  # not one value: unknown
    (flatten_scale_sum(2), flatten_scale_sum(1)),         # an extent becoming 1 reads as broadcast
    (flatten_scale_sum(8), flatten_scale_sum(5, features=3)),  # two ratios: not one batch
])
def test_match_refuses(old, new):
    assert match_extents(old, new) is None


def test_match_refuses_a_changed_concatenated_extent():
    def graph(batch):
        b = Builder("g")
        x = b.add_input(TensorType((batch, 3), F32), "x")
        both = b.concatenate(x, x, axis=0)
        b.add_output("out", b.slice(both, starts=(batch, 0), stops=(2 * batch, 3), steps=(1, 1)))
        return b.graph
    assert match_extents(graph(8), graph(5)) is None


def last_step_batch_first(batch: int, steps: int = 3, hidden: int = 4):
    """A batch-first view of time-major values, its last step, and the gradient of that step
    made batch-first: simplify moves both transposes to the small side (move_transposes), into
    slices whose bounds name the batch though no traced node has them."""
    b = Builder("g")
    seq = b.add_input(TensorType((steps, batch, hidden), F32), "seq")
    g = b.add_input(TensorType((batch, 1, hidden), F32), "g")
    bounds = {"starts": (0, steps - 1, 0), "stops": (batch, steps, hidden), "steps": (1, 1, 1)}
    b.add_output("last", b.slice(b.transpose(seq, perm=(1, 0, 2)), **bounds))
    scattered = b.slice_grad(g, shape=(batch, steps, hidden), **bounds)
    b.add_output("grad", b.transpose(scattered, perm=(1, 0, 2)))
    return b.graph


def test_rebatch_derives_moved_slices_again():
    """The slices move_transposes made are derived again from the new trace's attributes: the
    renamed graph is, attribute for attribute, what simplify makes of the trace at 5."""
    old, new = last_step_batch_first(8), last_step_batch_first(5)
    match = match_extents(old, new)
    optimized = simplify(old)
    assert [n.op for n in optimized.nodes] == ["slice", "transpose", "transpose", "slice_grad"]
    renamed = rebatch(optimized, match)
    assert renamed is not None
    renamed.verify()
    expected = simplify(new)
    assert ([(n.op, attrs_key(n.attrs)) for n in renamed.nodes]
            == [(n.op, attrs_key(n.attrs)) for n in expected.nodes])
    rng = np.random.default_rng(0)
    operands = [rng.standard_normal(i.value.type.shape).astype(np.float32) for i in new.inputs]
    for got, want in zip(evaluate(renamed, operands), evaluate(new, operands)):
        np.testing.assert_array_equal(got, want)
    # and from the renamed graph on, to a third size
    third = last_step_batch_first(6)
    again = rebatch(renamed, match_extents(new, third))
    assert again is not None
    assert [attrs_key(n.attrs) for n in again.nodes] == [attrs_key(n.attrs) for n in simplify(third).nodes]


def test_rebatch_refuses_a_derived_node_of_unknown_sources():
    """A derived slice whose source attributes came from no trace that was matched (here: a
    copy) names the batch in a way nothing proves: compiled afresh."""
    old, new = last_step_batch_first(8), last_step_batch_first(5)
    match = match_extents(old, new)
    optimized = simplify(old)
    moved = optimized.nodes[0]
    assert isinstance(moved.attrs, DerivedAttrs)
    moved.attrs = DerivedAttrs(moved.attrs, moved.attrs.derive,
                               tuple(dict(source) for source in moved.attrs.sources))
    assert rebatch(optimized, match) is None


# -- steps and models ----------------------------------------------------------------------------
class Regroup(nn.Module):
    """Reshapes with the batch: (B, 12) -> (2B, 6) -> linear -> (B, 14)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 7)

    def forward(self, x):
        batch = x.shape[0]
        return self.inner(x.reshape(batch * 2, 6)).reshape(batch, 14)


class BatchBranch(nn.Module):
    """Different programs by batch size: another op, or another constant, from 7 up."""

    def __init__(self, constant_only: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 10)
        self.constant_only = constant_only

    def forward(self, x):
        h = self.fc(x)
        big = x.shape[0] > 6
        if self.constant_only:
            return h * (2.0 if big else 3.0)
        return F.relu(h) if big else gc.tanh(h)


def mlp() -> nn.Module:
    """No extent of its own is 5 or 10 (the batches 5 and 2*5 would not be told apart from it)."""
    return nn.Sequential(Regroup(), nn.ReLU(), nn.Linear(14, 3))


def data(size: int, seed: int, regression: bool = False):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((size, 12)).astype(np.float32)
    y = (rng.standard_normal((size, 3)).astype(np.float32) if regression
         else rng.integers(0, 3, size).astype(np.int64))
    return x, y


def mse(out, target):
    return ((out - target) ** 2).mean()


def fresh_step(loss, state: dict, example):
    twin = mlp()
    twin.load_state_dict(state)
    return twin, gc.compile_train_step(twin, loss, optim.SGD(twin.parameters(), lr=0.1), example,
                                       backend="numba-cpu")


def call_sources(executable) -> set[str]:
    return {call.source for kernel in executable.kernels for call in kernel.generated.calls}


@pytest.mark.parametrize("loss, regression", [(F.cross_entropy, False), (mse, True)])
def test_step_at_other_batch_sizes_matches_fresh_steps(loss, regression, caplog):
    """8, then 5, then 8 again: the loss and the updated weights are exactly those of a step
    compiled fresh at each size, from the graphs at 8 renamed. No kernel is new at 5:
    cross-entropy divides by the count of its targets at run time, and a mean over the batch
    multiplies by the constant 1/B, a parameter of its kernel (not a literal of its source)."""
    gc.manual_seed(3)
    model = mlp()
    step = gc.compile_train_step(model, loss, optim.SGD(model.parameters(), lr=0.1),
                                 data(8, 0, regression), backend="numba-cpu")
    first = step.executable
    for size, seed in ((8, 1), (5, 2), (8, 3)):
        batch = data(size, seed, regression)
        twin, fresh = fresh_step(loss, model.state_dict(), batch)
        with caplog.at_level(logging.INFO, logger="graphc"):
            caplog.clear()
            assert step(*batch) == fresh(*batch)
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(value, twin.state_dict()[key], err_msg=key)
        if size == 5:
            assert REUSED in caplog.text
            assert step.graph.inputs[0].value.type.shape == (5, 12)  # simplified when asked
            assert step.check_numerics(*batch) is None  # the reference interpreter runs it
            assert step.executable.cache_stats.compiled == 0, step.executable.cache_stats
            assert step.executable.cache_stats.misses == 0, step.executable.cache_stats
            assert call_sources(step.executable) <= call_sources(first)
    assert step.executable is first  # batch 8 again: the first compilation


def test_model_at_other_batch_sizes_matches_fresh_models(caplog):
    model = mlp()
    compiled = gc.compile(model, data(8, 0)[0], backend="numba-cpu")
    first = compiled.executable
    for size in (8, 5, 8):
        x = data(size, size)[0]
        with caplog.at_level(logging.INFO, logger="graphc"):
            caplog.clear()
            out = compiled(x)
        np.testing.assert_array_equal(out, gc.compile(model, x, backend="numba-cpu")(x))
        if size == 5:
            assert REUSED in caplog.text
            assert compiled.executable.cache_stats.compiled == 0
            assert call_sources(compiled.executable) <= call_sources(first)


class LastStepClassifier(nn.Module):
    """A batch-first LSTM read at its last step, out[:, -1] (as the sequence benchmarks),
    unrolled (a program with scans is compiled afresh at another size): its traced graph
    transposes the steps' outputs, which simplify moves to the one step kept."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(3, 4, batch_first=True, unroll=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


def sequences(size: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 3, 3)).astype(np.float32), rng.integers(0, 3, size)


def test_batch_first_lstm_step_at_other_batch_sizes_is_rebatched(caplog):
    """7, 5, 6, 7: at 5 and 6 the graphs are renamed (6 from 5's), slices moved by simplify
    included, no kernel is new, and loss and weights are those of a step compiled fresh. (The
    four gates are concatenated at 4, 8, 12 and 16: a batch of 8 would not be renamed.)"""
    gc.manual_seed(4)
    model = LastStepClassifier()
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 sequences(7, 0), backend="numba-cpu")
    assert any(isinstance(n.attrs, DerivedAttrs) for n in step.graph.nodes)
    first = step.executable
    for size, seed in ((7, 1), (5, 2), (6, 3), (7, 4)):
        batch = sequences(size, seed)
        twin = LastStepClassifier()
        twin.load_state_dict(model.state_dict())
        fresh = gc.compile_train_step(twin, F.cross_entropy, optim.SGD(twin.parameters(), lr=0.1), batch,
                                      backend="numba-cpu")
        with caplog.at_level(logging.INFO, logger="graphc"):
            caplog.clear()
            assert step(*batch) == fresh(*batch)
        for key, value in model.state_dict().items():
            np.testing.assert_array_equal(value, twin.state_dict()[key], err_msg=key)
        if size != 7:
            assert REUSED in caplog.text
            assert step.executable.cache_stats.compiled == 0, step.executable.cache_stats
            assert call_sources(step.executable) <= call_sources(first)
    assert step.executable is first


@pytest.mark.parametrize("constant_only", [False, True])
def test_branch_on_the_batch_size_gets_its_own_program(constant_only, caplog):
    """The forward branches on x.shape[0]: at 5 it is another program. Another op: compiled
    afresh. Only another constant: the graphs at 8 renamed, with the constant of the trace at 5."""
    model = BatchBranch(constant_only)
    compiled = gc.compile(model, data(8, 0)[0], backend="numba-cpu")
    for size in (8, 5, 8):
        x = data(size, size)[0]
        with caplog.at_level(logging.INFO, logger="graphc"):
            caplog.clear()
            out = compiled(x)
        if size == 5:
            assert (REUSED in caplog.text) == constant_only
        h = x @ model.fc.weight.T + model.fc.bias
        expected = h * (2.0 if size > 6 else 3.0) if constant_only else (
            np.maximum(h, 0) if size > 6 else np.tanh(h))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_interpreter_backend_reuses_the_optimized_graph(caplog):
    """The reference backend runs the optimized graph itself: that one is renamed."""
    model = mlp()
    compiled = gc.compile(model, data(8, 0)[0], backend="reference")
    x = data(5, 1)[0]
    with caplog.at_level(logging.INFO, logger="graphc"):
        out = compiled(x)
    assert REUSED in caplog.text
    assert compiled.graph.inputs[0].value.type.shape == (5, 12)
    np.testing.assert_array_equal(out, gc.compile(model, x, backend="reference")(x))


CUDA_SIMULATOR_CHECK = """
import logging, numpy as np, graphc as gc, graphc.nn.functional as F
from graphc import nn, optim
logging.basicConfig(level=logging.INFO)
build = lambda: nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))
def data(n):
    rng = np.random.default_rng(n)
    return rng.standard_normal((n, 6)).astype(np.float32), rng.integers(0, 3, n)
model, twin = build(), build()
twin.load_state_dict(model.state_dict())
step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), data(4),
                             backend="numba-cuda")
oracle = gc.compile_train_step(twin, F.cross_entropy, optim.SGD(twin.parameters(), lr=0.1), data(4),
                               backend="reference")
for n in (4, 5, 4):
    np.testing.assert_allclose(step(*data(n)), oracle(*data(n)), rtol=1e-5, atol=1e-6)
for key, value in model.state_dict().items():
    np.testing.assert_allclose(value, twin.state_dict()[key], rtol=1e-5, atol=1e-6)
"""


@pytest.mark.slow
def test_numba_cuda_simulator_step_at_another_batch_size():
    """numba-cuda's fused graph renamed (run in the simulator, which must be on before numba is
    imported: in a child process); 13 s, mostly the simulator."""
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    child = subprocess.run([sys.executable, "-c", CUDA_SIMULATOR_CHECK], env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    assert "train_step reuses the graphs compiled for" in child.stderr


def test_a_model_called_at_ever_new_batch_sizes_keeps_a_bounded_number_of_them(monkeypatch):
    import graphc.tensor as tensor_module
    monkeypatch.setattr(tensor_module, "KEPT_VARIANTS", 4)
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    compiled = gc.compile(model, (np.zeros((8, 6), np.float32),))
    jitted = gc.jit(model)
    for _ in range(3):  # the busiest size, which an export writes
        compiled(np.ones((8, 6), np.float32))
    for batch in range(1, 12):
        x = np.full((batch, 6), 0.5, np.float32)
        np.testing.assert_allclose(compiled(x), jitted(x), rtol=1e-6)
        assert len(compiled._compiled) <= 4 and len(jitted._cache) <= 4
    assert any(c.signature[0][0] == (8, 6) for c in compiled._compiled.values())
    x = np.full((2, 6), 0.5, np.float32)  # forgotten, compiled again from its kernels
    np.testing.assert_allclose(compiled(x), jitted(x), rtol=1e-6)
