"""Indices are data: out-of-range class targets, embedding ids and gather indices raise
IndexOutOfRangeError (op, value, position, valid range, the user's line) on every backend, before
any kernel reads or writes through them; F.cross_entropy's ignore_index matches PyTorch.

The numba-cuda checks run in a child process on Numba's simulator (see test_numba_cuda.py for
why), with tiny shapes.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":  # the simulated child: before anything imports numba
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir import IndexOutOfRangeError
from graphc.ir.ops.indexing import NAMED_AFTER
from graphc.nn.sparse import embedding
from graphc.tensor import bind

TESTS = Path(__file__).resolve().parent
rng = np.random.default_rng(0)
HUGE = 10**9
BACKENDS = ["reference", "numba-cpu"]  # numba-cuda: the same tests, run by the simulated child


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


# Each index-consuming op, traced from a function whose op is on its second line: the line the
# error must name. The indices index an axis of size 5.
def take_along_axis(x, i, wrap_negative):
    return bind("take_along_axis", x, i, axis=1, wrap_negative=wrap_negative)


def gather(x, i, wrap_negative):
    return bind("gather", x, i, axis=0, wrap_negative=wrap_negative)


def scatter_add_along_axis(g, i, wrap_negative):
    return bind("scatter_add_along_axis", g, i, axis=1, shape=(3, 5), wrap_negative=wrap_negative)


def scatter_add(g, i, wrap_negative):
    return bind("scatter_add", g, i, axis=0, size=5, wrap_negative=wrap_negative)


OPS = {  # function, operand shape, indices shape
    "take_along_axis": (take_along_axis, (3, 5), (3, 2)),
    "gather": (gather, (5, 4), (2, 3)),
    "scatter_add_along_axis": (scatter_add_along_axis, (3, 2), (3, 2)),
    "scatter_add": (scatter_add, (2, 3, 4), (2, 3)),
}


def line_of(function) -> str:
    return f"{Path(__file__).name}:{function.__code__.co_firstlineno + 1}"


def valid_indices(shape, wrap_negative: bool, dtype) -> np.ndarray:
    return rng.integers(-5 if wrap_negative else 0, 5, shape).astype(dtype)


def expect_error(call, op: str, value: int, position: tuple[int, ...], low: int, where: str,
                 high: int = 5) -> None:
    """`call()` raises IndexOutOfRangeError for `op` (a regex) with exactly these details."""
    shown = re.escape(str(position[0] if len(position) == 1 else position))
    message = (rf"^{op}: index {value} at position {shown} of its indices is out of range: "
               rf"valid indices are \[{low}, {high}\) \(at .*{re.escape(where)}\)$")
    with pytest.raises(IndexOutOfRangeError, match=message) as info:
        call()
    error = info.value
    assert (error.value, error.position, error.low, error.high) == (value, position, low, high)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPS))
def test_out_of_range_indices_raise_naming_op_value_position_range_and_line(name, backend):
    op, x_shape, i_shape = OPS[name]
    x = rng.standard_normal(x_shape).astype(np.float32)
    position = (i_shape[0] - 1, 1)
    for wrap_negative, low, dtype in ((True, -5, np.int64), (False, 0, np.int32)):
        def f(x, i):
            return op(x, i, wrap_negative)
        compiled, reference = gc.jit(f, backend=backend), gc.jit(f, backend="reference")
        good = valid_indices(i_shape, wrap_negative, dtype)
        np.testing.assert_allclose(compiled(x, good), reference(x, good), rtol=1e-6)
        for bad in (5, low - 1, HUGE, -HUGE):
            indices = good.copy()
            indices[position] = bad
            # a scatter (a gradient) is named after its gather, the op the user wrote
            expect_error(lambda: compiled(x, indices), NAMED_AFTER.get(name, name), bad, position, low,
                         line_of(op))


@pytest.mark.parametrize("backend", BACKENDS)
def test_indices_computed_in_the_graph_are_checked_before_they_are_read(backend):
    def shifted(x, i):
        return gc.take_along_axis(x, i + 2, axis=1)  # i + 2 is computed, then read through

    f = gc.jit(shifted, backend=backend)
    x = rng.standard_normal((2, 5)).astype(np.float32)
    np.testing.assert_array_equal(f(x, np.array([[0, 2], [-7, 1]])),
                                  np.take_along_axis(x, np.array([[2, 4], [-5, 3]]), axis=1))
    expect_error(lambda: f(x, np.array([[0, 3], [1, 1]])), "take_along_axis", 5, (0, 1), -5,
                 line_of(shifted))


@pytest.mark.parametrize("backend", BACKENDS)
def test_constant_indices_out_of_range_are_refused(backend):
    def lookup(x):
        return gc.gather(x, np.array([0, 7]), axis=0)

    x = np.ones((5, 2), np.float32)
    with pytest.raises(IndexOutOfRangeError, match=rf"gather: index 7 at position 1 .*\[-5, 5\) "
                                                    rf"\(at .*{re.escape(line_of(lookup))}\)"):
        gc.jit(lookup, backend=backend)(x)


def test_indices_folded_at_compile_time_name_the_line():
    def folded(x):
        return x + gc.gather(np.ones((5, 2), np.float32), np.array([0, 7]), axis=0)  # constant: folded

    with pytest.raises(IndexOutOfRangeError, match=rf"gather: index 7 .*\(at .*{re.escape(line_of(folded))}\)"):
        gc.jit(folded, backend="reference")(np.ones((2, 2), np.float32))


# -- embedding: ids and the scatter-add of its gradient ------------------------------------------
def embedding_sum(weight, ids):
    return embedding(ids, weight).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_embedding_ids_and_their_gradient_refuse_negative_and_large_ids(backend):
    weight = rng.standard_normal((6, 3)).astype(np.float32)
    ids = np.array([[0, 5, 5], [2, 0, 1]], np.int64)
    value_and_grad = gc.jit(gc.value_and_grad(embedding_sum), backend=backend)
    value, grad = value_and_grad(weight, ids)
    np.testing.assert_allclose(value, weight[ids].sum(), rtol=1e-5)
    np.testing.assert_array_equal(grad, np.bincount(ids.ravel(), minlength=6)[:, None] * np.ones((1, 3)))
    grad_only = gc.jit(gc.grad(embedding_sum), backend=backend)  # only the scatter-add reads the ids
    np.testing.assert_array_equal(grad_only(weight, ids), grad)
    for bad in (6, -1, HUGE):
        wrong = ids.copy()
        wrong[1, 2] = bad
        where = line_of(embedding_sum)
        expect_error(lambda: value_and_grad(weight, wrong), "gather", bad, (1, 2), 0, where, 6)
        expect_error(lambda: grad_only(weight, wrong), "(gather|scatter_add)", bad, (1, 2), 0, where, 6)


# -- cross_entropy: class targets and ignore_index, against PyTorch -------------------------------
def torch_cross_entropy(logits: np.ndarray, target: np.ndarray, **kwargs):
    torch = pytest.importorskip("torch")
    x = torch.tensor(logits, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(x, torch.tensor(target), **kwargs)
    loss.sum().backward()
    return loss.detach().numpy(), x.grad.numpy()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_ignore_index_matches_pytorch(backend, reduction):
    logits = rng.standard_normal((6, 4)).astype(np.float32)
    cases = [(np.array([0, -100, 3, 1, -100, 2]), {}),            # PyTorch's default
             (np.array([0, 2, 2, 1, 3, 2]), {"ignore_index": 2}),  # an ignored class in range
             (np.array([-100] * 6), {})]                           # all ignored: mean is nan
    for target, kwargs in cases:
        def loss(x, t):
            return F.cross_entropy(x, t, reduction=reduction, **kwargs).sum()

        value, grad = gc.jit(gc.value_and_grad(loss), backend=backend)(logits, target)
        want_value, want_grad = torch_cross_entropy(logits, target, reduction=reduction, **kwargs)
        np.testing.assert_allclose(value, want_value.sum(), rtol=1e-5, atol=1e-6, equal_nan=True)
        np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6, equal_nan=True)
        if reduction == "none":
            per_row = gc.jit(lambda x, t: F.cross_entropy(x, t, reduction="none", **kwargs),
                             backend=backend)(logits, target)
            np.testing.assert_allclose(per_row, want_value, rtol=1e-5, atol=1e-6)


def cross_entropy_of(logits, target):
    return F.cross_entropy(logits, target)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_refuses_targets_outside_the_classes(backend):
    """PyTorch's rule: [0, C) or ignore_index; -1 is not the last class."""
    f = gc.jit(cross_entropy_of, backend=backend)
    logits = rng.standard_normal((4, 3)).astype(np.float32)
    for bad in (3, -1, -99, 100000, HUGE):
        target = np.array([0, 2, bad, 1])
        expect_error(lambda: f(logits, target), "take_along_axis", bad, (2, 0), 0,
                     line_of(cross_entropy_of), 3)


# -- a training step with a bad label -------------------------------------------------------------
def classifier_step(backend: str):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    x = np.random.default_rng(1).standard_normal((4, 4)).astype(np.float32)
    y = np.array([0, 2, 1, 1])
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.05),
                                 (x, y), backend=backend)
    return step, model, x, y


def optimizer_state(step) -> dict[str, np.ndarray]:
    return {f"{n}.{k}": v.copy() for n, slots in step.opt_state.items() for k, v in slots.items()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_label_leaves_parameters_and_optimizer_state_unchanged(backend):
    step, model, x, y = classifier_step(backend)
    step(x, y)
    state = {k: v.copy() for k, v in model.state_dict().items()}
    moments = optimizer_state(step)
    for bad in (3, -1, 100000):
        with pytest.raises(IndexOutOfRangeError, match=rf"index {bad} at position \(1, 0\) .*\[0, 3\)"):
            step(x, np.array([0, bad, 1, 1]))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    for name, value in optimizer_state(step).items():
        np.testing.assert_array_equal(value, moments[name], err_msg=name)
    assert int(step.step_count) == 1
    assert np.isfinite(step(x, y))  # and the next good batch trains on


@pytest.mark.parametrize("summed", [False, True], ids=["labels", "labels_summed_from_columns"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_label_leaves_batch_norm_statistics_unchanged(backend, summed):
    """cross_entropy gathers at where(label != ignore_index, label, 0), a value computed from the
    labels (here also by a reduction of the target): it is checked before any kernel too, not
    before the gather's own kernel, which runs after BatchNorm's running statistics are written
    in place. The error names the gather."""
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 4))
    x = np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32)

    def target(labels):
        return np.stack([labels, np.zeros_like(labels)], axis=1) if summed else labels
    loss = (lambda out, y: F.cross_entropy(out, y.sum(1))) if summed else F.cross_entropy
    step = gc.compile_train_step(model, loss, optim.SGD(model.parameters(), lr=0.1),
                                 (x, target(np.array([0, 1, 2, 3]))), backend=backend)
    step(x, target(np.array([0, 1, 2, 3])))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(IndexOutOfRangeError, match=r"take_along_axis: index 7 at position \(2, 0\)"):
        step(x, target(np.array([0, 1, 7, 3])))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_numpy_sums_otherwise_than_the_kernel_is_still_checked_where_it_is_read(backend):
    """An index that a reduction computes from the targets, in a step whose BatchNorm writes its
    statistics before the loss: checked first from a NumPy recomputation, which sums
    1e16 + 1 + ... - 1e16 in another order than the kernel (59 against 62). The kernel's own
    value must be checked too: it read and wrote outside the logits (SIGSEGV for a large one)."""
    def loss_fn(out, y):
        index = ((y.sum(-1) - 59.0) * 1e9).astype("int64")
        return -gc.take_along_axis(out, index[:, None], 1).mean()
    row = np.ones(64)
    row[0], row[32] = 1e16, -1e16
    y = np.tile(row, (8, 1))
    gc.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    step = gc.compile_train_step(model, loss_fn, optim.SGD(model.parameters(), lr=0.1), (x, y),
                                 backend=backend)
    sums = {"reference": np.sum(y, -1), "numba-cpu": gc.jit(lambda t: t.sum(-1), backend=backend)(y)}
    if np.all(sums[backend] == 59.0):
        assert np.isfinite(step(x, y))  # this backend sums as NumPy: the index is 0
    else:
        with pytest.raises(IndexOutOfRangeError, match="take_along_axis: index 3000000000"):
            step(x, y)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_computed_from_the_model_output_leaves_batch_norm_statistics_unchanged(backend):
    """argmax(out) + y is checked only where the gather reads it, after BatchNorm wrote its
    running statistics in place: those are put back when the check fails."""
    def loss_fn(out, y):
        return -gc.take_along_axis(out, (out.argmax(-1) + y)[:, None], 1).mean()
    gc.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3))
    x = np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32)
    step = gc.compile_train_step(model, loss_fn, optim.SGD(model.parameters(), lr=0.1),
                                 (x, np.zeros(8, np.int64)), backend=backend)
    step(x, np.zeros(8, np.int64))
    state = {k: v.copy() for k, v in model.state_dict().items()}
    with pytest.raises(IndexOutOfRangeError, match="take_along_axis"):
        step(x, np.full(8, 5, np.int64))
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(value, state[name], err_msg=name)
    assert np.isfinite(step(x, np.zeros(8, np.int64)))


# -- numba-cuda, on the simulator -----------------------------------------------------------------
CUDA = "numba-cuda"
CUDA_CHECKS = {
    **{f"out_of_range_{name}": (
        lambda name=name: test_out_of_range_indices_raise_naming_op_value_position_range_and_line(name, CUDA))
       for name in OPS},
    "computed_indices": lambda: test_indices_computed_in_the_graph_are_checked_before_they_are_read(CUDA),
    "constant_indices": lambda: test_constant_indices_out_of_range_are_refused(CUDA),
    "embedding": lambda: test_embedding_ids_and_their_gradient_refuse_negative_and_large_ids(CUDA),
    "ignore_index": lambda: test_cross_entropy_ignore_index_matches_pytorch(CUDA, "mean"),
    "bad_targets": lambda: test_cross_entropy_refuses_targets_outside_the_classes(CUDA),
    "bad_label_step": lambda: test_a_bad_label_leaves_parameters_and_optimizer_state_unchanged(CUDA),
    "bad_label_batch_norm": lambda: test_a_bad_label_leaves_batch_norm_statistics_unchanged(CUDA, False),
    "late_check_batch_norm": lambda: test_an_index_computed_from_the_model_output_leaves_batch_norm_statistics_unchanged(CUDA),
}


def run_cuda_checks() -> dict[str, str]:
    """Every check's verdict: 'ok' or its traceback."""
    verdicts = {}
    for name, check in CUDA_CHECKS.items():
        try:
            check()
            verdicts[name] = "ok"
        except Exception:
            verdicts[name] = traceback.format_exc()
    return verdicts


@pytest.fixture(scope="module")
def cuda_verdicts() -> dict[str, str]:
    pytest.importorskip("numba.cuda")
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], capture_output=True, text=True,
                          env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}, timeout=600, cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CUDA_CHECKS))
def test_numba_cuda_checks_indices_as_the_other_backends(cuda_verdicts, check):
    assert cuda_verdicts[check] == "ok", cuda_verdicts[check]


if __name__ == "__main__":
    print(json.dumps(run_cuda_checks()))


def test_an_index_only_the_gradient_reads_is_named_after_the_gather_the_user_wrote():
    """Where the forward gather is dead in a gradient graph, its scatter alone checked the
    indices, and the error named `scatter_add`, an op the user never wrote."""
    t, indices = np.arange(12, dtype=np.float32).reshape(4, 3), np.array([1, 5])
    with pytest.raises(IndexOutOfRangeError, match=r"^gather: index 5 at position \(1,\)|^gather: index 5"):
        gc.jit(lambda t, i: gc.grad(lambda t: t[i].sum())(t))(t, indices)
