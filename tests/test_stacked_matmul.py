"""A stack of matrices times one shared matrix (a linear layer over a batch of sequences):
numba-cpu runs it as one GEMM over the stacked rows, and the shared matrix's gradient is one
product of the stacked rows instead of a GEMM per stack element and a sum. Checked against the
reference interpreter, finite differences (float64) and the kernels actually generated."""
import numba
import numpy as np
import pytest

from graphc.backends.reference import evaluate
from graphc.ir import TensorType
from graphc.lowering import compile_graph
from opcheck import build_graph, check_vjp, vjp_graph

BLAS_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def gemm_entries(executable):
    return [call.entry for k in executable.kernels if k.pattern == "library" for call in k.generated.calls]


def run_both(graph, arrays):
    executable = compile_graph(graph, "numba-cpu")
    for got, want in zip(executable(*arrays), evaluate(graph, arrays)):
        np.testing.assert_allclose(got, want, **BLAS_TOLERANCE)
    return executable


@pytest.mark.parametrize("stack", [(3,), (2, 3)])
def test_stack_times_shared_matrix_is_one_gemm(stack):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(stack + (4, 5)).astype(np.float32)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    w_rows = rng.standard_normal((6, 5)).astype(np.float32)  # read transposed, as nn.Linear's
    graph = build_graph("stacked", [x, w, w_rows], lambda b, x, w, wr: [
        b.matmul(x, w), b.matmul(x, b.transpose(wr, perm=(1, 0)))])
    assert gemm_entries(run_both(graph, [x, w, w_rows])) == ["matmul", "matmul"]


def test_large_stack_splits_its_rows_across_threads():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64, 64)).astype(np.float32)  # 4.2 MFLOP: above the parallel limit
    w = rng.standard_normal((128, 64)).astype(np.float32)
    graph = build_graph("stacked_parallel", [x, w], lambda b, x, w: [b.matmul(x, b.transpose(w, perm=(1, 0)))])
    executable = run_both(graph, [x, w])
    assert gemm_entries(executable) == ["matmul"]
    # the stack's 256 rows read W.T stored (passes/fusion.py, STORE_RIGHT_FROM_ROWS)
    (call,) = [k for k in executable.kernels if k.pattern == "library"][0].generated.calls
    if numba.config.NUMBA_NUM_THREADS > 1:  # row blocks of the whole stack, one per thread
        assert call.parallel and "prange" in call.source


def test_transposed_or_broadcast_stacks_keep_one_gemm_per_element():
    """Rows of a transposed stack are not consecutive, and a broadcast stack repeats its rows:
    neither folds into one GEMM."""
    rng = np.random.default_rng(2)
    xt = rng.standard_normal((3, 5, 4)).astype(np.float32)
    x1 = rng.standard_normal((1, 4, 5)).astype(np.float32)
    w = rng.standard_normal((5, 6)).astype(np.float32)
    ws = rng.standard_normal((3, 5, 6)).astype(np.float32)
    graph = build_graph("unfolded", [xt, x1, w, ws], lambda b, xt, x1, w, ws: [
        b.matmul(b.transpose(xt, perm=(0, 2, 1)), w), b.matmul(x1, ws)])
    assert gemm_entries(run_both(graph, [xt, x1, w, ws])) == ["batched_matmul", "batched_matmul"]


def test_shared_matrix_gradient_is_one_product_of_the_stacked_rows():
    x, w = TensorType((2, 3, 4, 5), "float64"), TensorType((5, 6), "float64")
    graph = vjp_graph("matmul", [x, w])
    products = [n for n in graph.nodes if n.op == "matmul"]
    # the product itself, the stack's gradient (a stack too) and the shared matrix's (one matrix)
    assert sorted(len(n.output.shape) for n in products) == [2, 4, 4]
    assert not [n for n in graph.nodes if n.op == "sum"]  # nothing left to sum over the stack
    rng = np.random.default_rng(3)
    check_vjp("matmul", [rng.standard_normal(x.shape), rng.standard_normal(w.shape)], rtol=1e-6)


def test_gradient_of_stacked_product_on_numba_cpu_matches_reference():
    rng = np.random.default_rng(4)
    types = [TensorType((2, 3, 4), "float32"), TensorType((4, 5), "float32")]
    graph = vjp_graph("matmul", types)
    arrays = [rng.standard_normal(t.shape).astype(np.float32) for t in types]
    arrays.append(rng.standard_normal((2, 3, 5)).astype(np.float32))
    run_both(graph, arrays)
