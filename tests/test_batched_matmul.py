"""numba-cpu's batched matmul (backends/numba_cpu/codegen_batched_matmul.py) against the reference
backend: odd sizes, operands read transposed (the prologue's transposes), broadcast batch axes,
float32 and float64, and the small right operands read transposed that it copies first."""
import numpy as np
import pytest

from graphc.backends.numba_cpu.codegen_batched_matmul import copies_transposed_operand
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph

TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-5), "float64": dict(rtol=1e-12, atol=1e-12)}


def product_graph(a_shape, b_shape, dtype, transpose_a, transpose_b):
    """x @ y with x, y given as stored (the transposed ones swapped in their last two axes)."""
    b = Builder("batched_matmul")
    x = b.add_input(TensorType(a_shape, dtype), "x")
    y = b.add_input(TensorType(b_shape, dtype), "y")

    def swap(v):
        axes = list(range(len(v.shape)))
        axes[-2:] = axes[-1], axes[-2]
        return b.transpose(v, perm=tuple(axes))

    b.add_output("out", b.matmul(swap(x) if transpose_a else x, swap(y) if transpose_b else y))
    return b.graph.verify()


def stored(shape, transposed):
    return shape[:-2] + (shape[-1], shape[-2]) if transposed else shape


# (batch of x, batch of y, M, K, N): odd sizes, broadcast batch axes, attention's shapes
CASES = [((3,), (3,), 5, 7, 3),
         ((2, 3), (1, 3), 4, 3, 5),
         ((2, 1), (4,), 3, 6, 2),
         ((4,), (), 6, 5, 7),            # untransposed x: one GEMM over the stack's rows
         ((2, 2), (2, 2), 16, 8, 16),   # copies the transposed right operand
         ((3,), (3,), 9, 9, 1)]


@pytest.mark.parametrize("x_batch, y_batch, m, k, n", CASES)
@pytest.mark.parametrize("transpose_a, transpose_b", [(False, False), (False, True), (True, False),
                                                      (True, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_cpu_matches_reference(x_batch, y_batch, m, k, n, transpose_a, transpose_b, dtype):
    rng = np.random.default_rng(0)
    a_shape, b_shape = stored(x_batch + (m, k), transpose_a), stored(y_batch + (k, n), transpose_b)
    x, y = rng.standard_normal(a_shape).astype(dtype), rng.standard_normal(b_shape).astype(dtype)
    graph = product_graph(a_shape, b_shape, dtype, transpose_a, transpose_b)
    (got,), (want,) = compile_graph(graph, "numba-cpu")(x, y), evaluate(graph, [x, y])
    np.testing.assert_allclose(got, want, **TOLERANCE[dtype])


def test_large_batches_run_in_parallel_with_a_scratch_per_thread():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((64, 64, 32)).astype(np.float32), rng.standard_normal((64, 64, 32)).astype(np.float32)
    graph = product_graph(x.shape, y.shape, "float32", False, True)
    executable = compile_graph(graph, "numba-cpu")
    (kernel,) = [k for k in executable.kernels if k.generated is not None]
    assert kernel.generated.parallel and "columns = np.empty" in kernel.generated.source
    (got,), (want,) = executable(x, y), evaluate(graph, [x, y])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_only_small_transposed_operands_with_enough_rows_are_copied():
    assert copies_transposed_operand(64, 32, 64) and copies_transposed_operand(8, 8, 8)
    assert not copies_transposed_operand(16, 64, 16)    # too few rows to repay the copy
    assert not copies_transposed_operand(128, 64, 128)  # BLAS's own packing is as good
