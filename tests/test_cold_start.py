"""What keeps a cold start short: kernels compile serially where they can only run on one
thread (a parallel kernel compiles 2-4 times as long)."""
from __future__ import annotations

import contextlib
import re

import numba
import numpy as np
import pytest

from graphc.backends.numba_cpu.codegen_common import (PARALLEL_MIN_ELEMENTS, always_parallel, kernel_threads,
                                                      runs_parallel)
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph


def exp_of_difference(shape: tuple[int, ...]):
    b = Builder("exp_of_difference")
    x = b.add_input(TensorType(shape, "float32"), "x")
    y = b.add_input(TensorType(shape[-1:], "float32"), "y")
    b.add_output("out", b.exp(b.mul(b.sub(x, y), x)))
    return b.graph.verify()


def test_a_large_kernel_compiles_serially_when_kernels_run_on_one_thread(monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((320, 240), np.float32), rng.standard_normal(240, np.float32)
    assert x.size >= PARALLEL_MIN_ELEMENTS
    graph = exp_of_difference(x.shape)
    executable = compile_graph(graph, "numba-cpu")
    [kernel] = executable.kernels
    assert not kernel.generated.parallel and "prange(" not in kernel.source
    np.testing.assert_allclose(executable(x, y)[0], evaluate(graph, [x, y])[0], rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba runs one thread here")
def test_kernel_threads_follow_numba_and_the_requested_count(monkeypatch):
    monkeypatch.delenv("GRAPHC_NUM_THREADS", raising=False)
    assert kernel_threads() == numba.config.NUMBA_NUM_THREADS and runs_parallel(PARALLEL_MIN_ELEMENTS)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", str(numba.config.NUMBA_NUM_THREADS + 5))
    assert kernel_threads() == numba.config.NUMBA_NUM_THREADS
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    assert kernel_threads() == 1 and not runs_parallel(PARALLEL_MIN_ELEMENTS)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="GRAPHC_NUM_THREADS='two'"):
        kernel_threads()


def two_sized_chains(big: tuple[int, int], small: tuple[int, int]):
    """The same loop, exp(x * x - y), over a large and a small operand."""
    b = Builder("two_sized_chains")
    for name, shape in (("big", big), ("small", small)):
        x = b.add_input(TensorType(shape, "float32"), f"{name}_x")
        y = b.add_input(TensorType(shape[-1:], "float32"), f"{name}_y")
        b.add_output(name, b.exp(b.sub(b.mul(x, x), y)))
    return b.graph.verify()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="Numba runs one thread here")
def test_a_small_kernel_shares_the_parallel_code_a_large_one_compiles(monkeypatch):
    monkeypatch.delenv("GRAPHC_NUM_THREADS", raising=False)
    rng = np.random.default_rng(1)
    big, small = (320, 240), (8, 240)
    assert runs_parallel(big[0] * big[1]) and not runs_parallel(small[0] * small[1])
    arrays = [rng.standard_normal(s, np.float32) for s in (big, big[-1:], small, small[-1:])]
    graph = two_sized_chains(big, small)
    executable = compile_graph(graph, "numba-cpu")
    calls = [call for kernel in executable.kernels for call in kernel.generated.calls]
    assert len(calls) == 2 and calls[0].source == calls[1].source and calls[0].parallel
    assert executable.cache_stats.compiled == 1
    for got, want in zip(executable(*arrays), evaluate(graph, arrays)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def time_steps(shape: tuple[int, int, int], steps: tuple[int, ...]):
    """x[:, t, :] * 2 for each t of `steps`, as separate outputs."""
    b = Builder("time_steps")
    x = b.add_input(TensorType(shape, "float32"), "x")
    n, _, f = shape
    for t in steps:
        b.add_output(f"step_{t}", b.mul(b.slice(x, starts=(0, t, 0), stops=(n, t + 1, f), steps=(1, 1, 1)),
                                        b.const(2.0, "float32")))
    return b.graph.verify()


def test_slices_at_different_offsets_compile_once():
    x = np.random.default_rng(2).standard_normal((3, 5, 4), np.float32)
    graph = time_steps(x.shape, (0, 2, 4))
    executable = compile_graph(graph, "numba-cpu")
    sources = {call.source for kernel in executable.kernels for call in kernel.generated.calls}
    assert len(executable.kernels) == 3 and len(sources) == 1
    for got, t in zip(executable(x), (0, 2, 4)):
        np.testing.assert_array_equal(got, x[:, t:t + 1, :] * 2)


def test_a_large_product_compiles_serially_when_kernels_run_on_one_thread(monkeypatch):
    """Library kernels (GEMM, batched products) too: their prange loops run as range."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    rng = np.random.default_rng(3)
    a, w = rng.standard_normal((4, 96, 80), np.float32), rng.standard_normal((4, 80, 112), np.float32)
    b = Builder("batched_product")
    x = b.add_input(TensorType(a.shape, "float32"), "a")
    y = b.add_input(TensorType(w.shape, "float32"), "w")
    b.add_output("out", b.matmul(x, y))
    graph = b.graph.verify()
    executable = compile_graph(graph, "numba-cpu")
    assert executable.kernels and not any(k.generated.parallel for k in executable.kernels)
    np.testing.assert_allclose(executable(a, w)[0], a @ w, rtol=1e-5, atol=1e-4)


def lstm_gates(batch: int, hidden: int):
    """sigmoid(g[:, :H]) * tanh(g[:, H:2H]) from one product g: an LSTM's fused gate kernel."""
    b = Builder("lstm_gates")
    g = b.add_input(TensorType((batch, 4 * hidden), "float32"), "g")

    def gate(k: int):
        return b.slice(g, starts=(0, k * hidden), stops=(batch, (k + 1) * hidden), steps=(1, 1))
    b.add_output("out", b.mul(b.sigmoid(gate(0)), b.tanh(gate(1))))
    return b.graph.verify()


@pytest.mark.parametrize("parallel", [False, True])
def test_a_slice_at_an_argument_offset_loads_vectors_not_gathers(parallel):
    """Numba wraps negative indices around; unless the code generator tells LLVM that an offset
    passed as an argument is not negative, each lane reads at its own address (a gather where
    the CPU has them, scalar loads elsewhere) and the gate kernel ran 1.4 times as long."""
    g = np.random.default_rng(3).standard_normal((4, 4 * 32), np.float32)
    graph = lstm_gates(4, 32)
    with always_parallel() if parallel else contextlib.nullcontext():
        executable = compile_graph(graph, "numba-cpu")
    [kernel] = executable.kernels
    assert kernel.generated.parallel == parallel
    [function] = kernel.functions
    [ir] = function.inspect_llvm().values()
    assert "llvm.masked.gather" not in ir
    assert re.search(r"load <\d+ x float>", ir), "the loop over the gates is not vectorised"
    np.testing.assert_allclose(executable(g)[0], evaluate(graph, [g])[0], rtol=1e-5, atol=1e-6)
