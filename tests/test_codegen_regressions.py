"""Ordinary programs the fused code generators once crashed on, checked against the reference.

Rank-changing views (None-indexing, unsqueeze, squeeze, reshape, stack, broadcast) put values of
different ranks into one fused kernel, and gradients add literals of the loss's rank (the seed of
ones): every such program is compiled forward and differentiated, and compared with the
reference backend.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn
from graphc.ir import Builder, TensorType
from graphc.nn.module import functional_call
from graphc.passes.fusion import fuse
from graphc.tensor import as_tensor

ATOL, RTOL = 2e-5, 1e-4
RNG = np.random.default_rng(16)
X = RNG.standard_normal((2, 3, 4)).astype(np.float32)
IMAGES = RNG.standard_normal((2, 1, 6, 6)).astype(np.float32)
FILTERS = (0.3 * RNG.standard_normal((2, 1, 3, 3))).astype(np.float32)


def assert_close(got, want):
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for k in want:
            assert_close(got[k], want[k])
        return
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert_close(g, w)
        return
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=RTOL)


def check_forward_and_gradient(fn, *args, backend="numba-cpu", forward=True):
    """`fn` compiled on `backend` agrees with the reference (unless not `forward`: its value is
    still checked through the gradient's), and so does the gradient of a weighted sum of its
    output (weights that differ per element, so a misplaced index shows)."""
    want = gc.jit(fn, backend="reference")(*args)
    if forward:
        assert_close(gc.jit(fn, backend=backend)(*args), want)
    weights = np.random.default_rng(1).standard_normal(want.shape).astype(np.float32)

    def loss(*a):
        return (fn(*a) * weights).sum()
    assert_close(gc.value_and_grad(loss, backend=backend)(*args),
                 gc.value_and_grad(loss, backend="reference")(*args))


# -- rank-changing views composed with elementwise ops and reductions ---------------------------
VIEW_PROGRAMS = {
    "none_index_leading": lambda x: x[None] * x[None] + 1.0,
    "none_index_middle": lambda x: (x[:, None] * 2.0).exp(),
    "none_index_then_sum": lambda x: (x[None, :, None] ** 2).sum(axis=(0, 2)),
    "unsqueeze_mul": lambda x: x.unsqueeze(1) * 2.0,
    "unsqueeze_last_broadcast": lambda x: x.unsqueeze(-1) * x.unsqueeze(-2),
    "squeeze_of_unsqueeze": lambda x: (x.unsqueeze(0) + 1.0).squeeze(0).tanh(),
    "squeeze_of_slice": lambda x: x[:, :1].squeeze(1) * x[:, 2],
    "reshape_more_dims": lambda x: x.reshape(2, 3, 2, 2).sigmoid() * 3.0,
    "reshape_fewer_dims_mean": lambda x: (x.reshape(6, 4) ** 2).mean(axis=0),
    "reshape_to_vector_mean": lambda x: x.reshape(24).abs().mean(),
    "flatten_max": lambda x: x.flatten(1).amax(axis=1),
    "reduction_then_reshape": lambda x: x.sum(axis=2).reshape(6) * 0.5,
    "keepdims_reduction_then_squeeze": lambda x: x.amax(axis=1, keepdims=True).squeeze(1) - x[:, 0],
    "stack_leading": lambda x: gc.stack([x, x * 2.0]) ** 2,
    "stack_trailing_sum": lambda x: gc.stack([x.exp(), x], axis=-1).sum(axis=(1, 3)),
    "concatenate_middle": lambda x: gc.concatenate([x, x[:, :1] * 3.0], axis=1).tanh(),
    "broadcast_to_larger_rank": lambda x: x.sum(axis=0).broadcast_to((5, 3, 4)) * 2.0,
    "expand_keepdims_mean": lambda x: x - x.mean(axis=(1, 2), keepdims=True).expand((2, 3, 4)),
    "transpose_then_reshape": lambda x: x.permute(2, 0, 1).reshape(4, 6) * 1.5,
    "permute_unsqueeze_sum": lambda x: x.permute(1, 0, 2).unsqueeze(0).sum(axis=(0, 3)),
    "softmax_of_reshape": lambda x: F.softmax(x.reshape(6, 4), dim=-1),
    "log_softmax_of_none_index": lambda x: F.log_softmax(x[None], dim=1),
}


@pytest.mark.parametrize("name", sorted(VIEW_PROGRAMS))
def test_rank_changing_views_match_the_reference(name):
    check_forward_and_gradient(VIEW_PROGRAMS[name], X)


# -- the programs of the bug report, by name ---------------------------------------------------
def test_gradient_through_none_indexing():
    check_forward_and_gradient(lambda x: (x[None] * x[None]).sum(), X)


def test_gradient_through_unsqueeze():
    check_forward_and_gradient(lambda x: (x.unsqueeze(1) * 2.0).sum(), X)


def test_gradient_of_mean_of_reshape():
    check_forward_and_gradient(lambda x: (x.reshape(6, 4) ** 2).mean(), X)


def test_gradient_through_stack():
    check_forward_and_gradient(lambda x: (gc.stack([x, x * 2.0]) ** 2).sum(), X)


def test_gradient_of_square_of_strided_padded_conv(backend="numba-cpu"):
    check_forward_and_gradient(
        lambda w: (F.conv2d(as_tensor(IMAGES), w, stride=2, padding=1) ** 2).sum(), FILTERS,
        backend=backend, forward=False)


def test_gradient_of_log_softmax_after_max_pool(backend="numba-cpu"):
    def f(w):
        pooled = F.max_pool2d(F.conv2d(as_tensor(IMAGES), w), 2)
        return F.log_softmax(pooled.reshape(2, -1), dim=1).sum()
    check_forward_and_gradient(f, FILTERS, backend=backend, forward=False)


def test_gradient_of_conv_with_closure_constant_input(backend="numba-cpu"):
    check_forward_and_gradient(lambda w: F.conv2d(as_tensor(IMAGES), w).sum(), FILTERS,
                               backend=backend, forward=False)


# -- the same programs on numba-cuda, in the simulator --------------------------------------------
def run_on_cuda_simulator() -> None:
    """The child: every program above on numba-cuda (the simulator is switched on before numba
    is imported, which the parent process has done already)."""
    for name, fn in sorted(VIEW_PROGRAMS.items()):
        check_forward_and_gradient(fn, X, backend="numba-cuda")
    for test in (test_gradient_of_square_of_strided_padded_conv,
                 test_gradient_of_log_softmax_after_max_pool,
                 test_gradient_of_conv_with_closure_constant_input):
        test(backend="numba-cuda")


def test_the_same_programs_match_the_reference_on_the_cuda_simulator():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    child = subprocess.run([sys.executable, __file__, "cuda"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-4000:]


# -- kernel names stay short ---------------------------------------------------------------------
MAX_NAME_LENGTH = 64


def long_fused_graphs():
    """An elementwise chain of ops with long names, and a matmul with a 60-op epilogue (what an
    unrolled recurrence fuses: one add per time step)."""
    b = Builder("chain")
    x = b.add_input(TensorType((3, 4), "bool"), "x")
    y = x
    for op in ("logical_not", "logical_and", "logical_or", "stop_gradient") * 5:
        y = b.bind(op, y) if op in ("logical_not", "stop_gradient") else b.bind(op, y, x)
    b.add_output("y", y)
    chain = b.graph

    b = Builder("epilogue")
    a, w = (b.add_input(TensorType(s, "float32"), n) for s, n in (((2, 3), "a"), ((3, 4), "w")))
    terms = [b.add_input(TensorType((2, 4), "float32"), f"t{i}") for i in range(60)]
    z = b.matmul(a, w)
    for t in terms:
        z = b.add(z, t)
    b.add_output("z", z)
    return [chain, b.graph]


def kernel_function_names(graph):
    from graphc.backends.numba_cpu.codegen import generate as generate_cpu
    from graphc.backends.numba_cuda.codegen import generate as generate_cuda

    names = []
    for kernel in fuse(graph.verify()).nodes:
        if kernel.attrs["pattern"] in ("view", "constant"):
            continue
        names.append(kernel.attrs["name"])
        for generate in (generate_cpu, generate_cuda):
            names += [call.entry for call in generate(kernel).calls]
    return names


def test_kernel_names_of_long_fused_chains_are_bounded_identifiers_and_file_names():
    for graph in long_fused_graphs():
        names = kernel_function_names(graph)
        assert names
        for name in names:
            assert len(name) <= MAX_NAME_LENGTH, name
            assert name.isidentifier() and "/" not in name, name
        # a function of the kernel alone: the same graph fused again names its kernels alike
        assert kernel_function_names(graph) == names


def test_long_labels_keep_a_readable_start_and_differ_by_their_hash():
    from graphc.ir.kernels import MAX_LABEL_LENGTH, bounded_label

    short = ["matmul", "add", "relu"]
    assert bounded_label(short) == "matmul_add_relu"
    long_a, long_b = ["add"] * 59 + ["mul"], ["add"] * 60
    label_a, label_b = bounded_label(long_a), bounded_label(long_b)
    assert len(label_a) == len(label_b) == MAX_LABEL_LENGTH
    assert label_a.startswith("add_add_") and label_a != label_b
    assert bounded_label(list(long_a)) == label_a


def test_the_same_kernel_at_another_position_has_the_same_source_on_both_backends():
    """Sources are the kernel cache's keys: a kernel's position in its graph must not be part of
    its source, or the same kernel compiles again for every graph it appears in."""
    from graphc.backends.numba_cpu.codegen import generate as generate_cpu
    from graphc.backends.numba_cuda.codegen import generate as generate_cuda

    def graph(with_reduction_first):
        b = Builder("g")
        x = b.add_input(TensorType((3, 4), "float32"), "x")
        if with_reduction_first:
            b.add_output("s", b.sum(b.add_input(TensorType((5,), "float32"), "v"), axes=(0,)))
        b.add_output("y", b.add(b.exp(x), b.scalar_like(1.0, x)))
        return fuse(b.graph.verify())

    def exp_add_kernel(fused):
        (kernel,) = [k for k in fused.nodes if k.attrs["pattern"] == "elementwise"]
        return kernel

    alone, after = exp_add_kernel(graph(False)), exp_add_kernel(graph(True))
    assert alone.attrs["name"] != after.attrs["name"]  # k0_... and k1_...
    for generate in (generate_cpu, generate_cuda):
        assert generate(alone).source == generate(after).source


def lstm_loss(lstm, sequence):
    def loss(params):
        out, _ = functional_call(lstm, params, sequence)
        return (out ** 2).mean()
    return loss


@pytest.mark.slow  # ~40 s with an empty kernel cache
def test_lstm_unrolled_over_60_steps_compiles_and_its_gradient_matches_the_reference():
    lstm = nn.LSTM(3, 4)
    sequence = np.random.default_rng(0).standard_normal((60, 2, 3)).astype(np.float32)  # (T, N, I)
    loss, params = lstm_loss(lstm, sequence), lstm.state_dict()
    assert_close(gc.value_and_grad(loss, backend="numba-cpu")(params),
                 gc.value_and_grad(loss, backend="reference")(params))


if __name__ == "__main__" and sys.argv[1:] == ["cuda"]:
    run_on_cuda_simulator()


def test_a_concatenation_of_hundreds_of_parts_fused_with_its_consumers_compiles():
    """Each part nested one more conditional expression: from 200 parts on (Python's parser
    limit) a fused concatenation (x * 2, its sum, an unrolled cell's stacked outputs in a loss)
    failed to compile with 'too many nested parentheses'."""
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    parts = lambda a: [a[:, i % 8] * (i + 1) for i in range(300)]
    doubled, total, rows = gc.jit(lambda a: (gc.cat(parts(a)) * 2.0, gc.stack(parts(a), 1).sum(1),
                                             gc.stack(parts(a), 0).sum(0)), backend="numba-cpu")(x)
    expected = [x[:, i % 8] * (i + 1) for i in range(300)]
    np.testing.assert_array_equal(doubled, np.concatenate(expected) * 2.0)
    np.testing.assert_allclose(total, np.stack(expected, 1).sum(1), rtol=1e-6)
    np.testing.assert_allclose(rows, np.stack(expected, 0).sum(0), rtol=1e-6)
