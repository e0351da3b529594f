"""simplify sums matrix products a_i.T @ b_i by one product of the stacked operands
(passes/simplify.py, stack_products): an unrolled recurrence's weight gradient is one shallow
product per step, summed by a chain of adds."""
import numpy as np
import pytest

import graphc as gc
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.passes import simplify

F64 = "float64"


def matmuls(graph) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    return [(n.inputs[0].shape, n.inputs[1].shape) for n in graph.nodes if n.op == "matmul"]


def products_of(depths: tuple[int, ...], out_rows: tuple[int, ...] = ()):
    """a_i.T @ b_i for a_i (depth_i, 3) and b_i (depth_i, 5) inputs; a product i in `out_rows`
    is a_i.T[:1] @ b_i instead (a (1, 5) row that adds broadcast)."""
    b = Builder("g")
    products = []
    for i, depth in enumerate(depths):
        a = b.add_input(TensorType((depth, 3), F64), f"a{i}")
        x = b.add_input(TensorType((depth, 5), F64), f"b{i}")
        left = b.transpose(a, perm=(1, 0))
        if i in out_rows:
            left = b.slice(left, starts=(0, 0), stops=(1, depth), steps=(1, 1))
        products.append(b.matmul(left, x))
    return b, products


def summed_products(depths: tuple[int, ...], out_rows: tuple[int, ...] = ()):
    """The products of `products_of`, added left to right."""
    b, products = products_of(depths, out_rows)
    total = products[0]
    for p in products[1:]:
        total = b.add(total, p)
    return b, products, total


def operands(graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(i.value.shape).astype(i.value.dtype) for i in graph.inputs]


def assert_same_values(rewritten, graph, tolerance: float = 1e-12):
    """Equal but for the order of the sums."""
    args = operands(graph)
    for got, want in zip(evaluate(rewritten, args), evaluate(graph, args)):
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("depths", [(4, 4, 4), (2, 6, 3, 5)])
def test_three_or_more_summed_products_become_one_product_of_the_stacks(depths):
    b, _, total = summed_products(depths)
    b.add_output("out", total)
    rewritten = simplify(b.graph)
    assert matmuls(rewritten) == [((3, sum(depths)), (sum(depths), 5))]
    assert not any(n.op == "add" for n in rewritten.nodes)
    assert_same_values(rewritten, b.graph)


def test_a_sum_of_a_thousand_products_is_stacked_without_recursion():
    """The tree was walked by recursion, three frames per add: from about 330 products (an
    unrolled recurrence of 400 steps, its weight gradient) simplify raised RecursionError."""
    b, _, total = summed_products((2,) * 1000)
    b.add_output("out", total)
    rewritten = simplify(b.graph)
    assert matmuls(rewritten) == [((3, 2000), (2000, 5))]
    assert_same_values(rewritten, b.graph, tolerance=1e-10)


def test_a_tree_of_sums_is_stacked_whole():
    b, (p0, p1, p2, p3) = products_of((4, 4, 4, 4))
    b.add_output("out", b.add(b.add(p0, p1), b.add(p2, p3)))
    rewritten = simplify(b.graph)
    assert matmuls(rewritten) == [((3, 16), (16, 5))]
    assert_same_values(rewritten, b.graph)


def test_a_product_with_zeros_stays_in_the_stack_so_a_nan_it_meets_shows():
    """Products with a zero operand were left out: a NaN weight read by a recurrence's zero
    first state vanished from the sum, where PyTorch's 0 @ NaN is NaN."""
    b = Builder("g")
    zeros = b.const(np.zeros((4, 3)), F64)
    total = None
    for i in range(3):
        a = zeros if i == 0 else b.add_input(TensorType((4, 3), F64), f"a{i}")
        p = b.matmul(b.transpose(a, perm=(1, 0)), b.add_input(TensorType((4, 5), F64), f"b{i}"))
        total = p if total is None else b.add(total, p)
    b.add_output("out", total)
    rewritten = simplify(b.graph)
    assert matmuls(rewritten) == [((3, 12), (12, 5))]
    assert_same_values(rewritten, b.graph)
    read_by_zeros = np.ones((4, 5))
    read_by_zeros[0, 0] = np.nan
    (out,) = evaluate(rewritten, [read_by_zeros, np.ones((4, 3)), np.ones((4, 5)), np.ones((4, 3)),
                                  np.ones((4, 5))])
    assert np.isnan(out[:, 0]).all() and np.isfinite(out[:, 1:]).all()


def test_two_products_stay_apart():
    b, _, total = summed_products((4, 4))
    b.add_output("out", total)
    assert matmuls(simplify(b.graph)) == [((3, 4), (4, 5))] * 2


def test_products_of_another_shape_than_the_sum_stay_apart():
    b, _, total = summed_products((4, 4, 4), out_rows=(1,))
    b.add_output("out", total)
    rewritten = simplify(b.graph)
    assert len(matmuls(rewritten)) == 3
    assert_same_values(rewritten, b.graph)


@pytest.mark.parametrize("read_elsewhere", ["product", "partial_sum"])
def test_a_product_or_partial_sum_read_elsewhere_keeps_the_products_apart(read_elsewhere):
    b, products, total = summed_products((4, 4, 4))
    b.add_output("out", total)
    b.add_output("also", products[1] if read_elsewhere == "product" else total.producer.inputs[0])
    rewritten = simplify(b.graph)
    assert len(matmuls(rewritten)) == 3
    assert_same_values(rewritten, b.graph)


def unrolled_rnn_loss(w, u, xs, weights):
    """An unrolled tanh recurrence from a zero state: d loss / d w sums h_{t-1}.T @ g_t."""
    h = None
    for t in range(xs.shape[0]):
        pre = xs[t] @ u
        h = gc.tanh(pre if h is None else pre + h @ w)
    return (h * weights).sum()


def rnn_operands():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((6, 6)) * 0.4).astype(np.float32)
    u = (rng.standard_normal((4, 6)) * 0.4).astype(np.float32)
    xs = rng.standard_normal((5, 3, 4)).astype(np.float32)
    weights = rng.standard_normal((3, 6)).astype(np.float32)
    return w, u, xs, weights


def numpy_rnn_gradient(w, u, xs, weights):
    w, u, xs, weights = (a.astype(np.float64) for a in (w, u, xs, weights))
    hs = [np.zeros((xs.shape[1], w.shape[0]))]
    for x in xs:
        hs.append(np.tanh(x @ u + hs[-1] @ w))
    grad_w, carry = np.zeros_like(w), weights
    for t in range(len(xs), 0, -1):
        g = carry * (1 - hs[t] ** 2)
        grad_w += hs[t - 1].T @ g
        carry = g @ w.T
    return float((hs[-1] * weights).sum()), grad_w


def test_unrolled_recurrence_weight_gradient_is_one_stacked_product():
    args = rnn_operands()
    graph = gc.trace(gc.value_and_grad(unrolled_rnn_loss), *args)
    rewritten = simplify(graph)
    assert ((6, 12), (12, 6)) in matmuls(rewritten)
    assert ((6, 3), (3, 6)) not in matmuls(rewritten)  # no product of one step is left
    assert_same_values(rewritten, graph, tolerance=1e-5)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_unrolled_recurrence_weight_gradient_matches_numpy(backend):
    args = rnn_operands()
    value, grad_w = gc.value_and_grad(unrolled_rnn_loss, backend=backend)(*args)
    want_value, want_grad = numpy_rnn_gradient(*args)
    np.testing.assert_allclose(float(value), want_value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad_w), want_grad, rtol=1e-4, atol=1e-5)
