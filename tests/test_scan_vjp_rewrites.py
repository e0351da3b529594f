"""The scan VJP's residuals and `hoist_accumulations`: on an LSTM's gradient the backward body
reads the forward's saved gate products instead of computing them again, and the recurrent
weight's and bias's gradients are one product and one reduction after the loop; values and
gradients stay those of a Python loop (float64, finite differences) on the reference backend and
on numba-cpu."""
import numpy as np
import pytest

import graphc as gc
from graphc.ir.interpret import evaluate
from graphc.ir.ops.control import SCAN_OP
from graphc.passes.autodiff import autodiff
from graphc.passes.scan_rewrites import hoist_accumulations
from opcheck import finite_differences

REF = "reference"
rng = np.random.default_rng(7)
T, N, I, H = 5, 3, 2, 4


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def lstm_loss(xs, w_ih, w_hh, b, h0, c0):
    """An LSTM whose bias is added inside the loop (its gradient is a sum over the batch per
    step), on gc.scan; the loss reads every step's h and the last c."""
    projected = xs @ w_ih.T

    def step(state, px):
        h, c = state
        gates = px + h @ w_hh.T + b
        i, f, o = (gc.sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        c = f * c + i * gc.tanh(gates[:, 2 * H:3 * H])
        h = o * gc.tanh(c)
        return (h, c), h

    (h, c), hs = gc.scan(step, (h0, c0), projected)
    return (hs * hs).sum() + (c * c).sum()


def numpy_lstm_loss(xs, w_ih, w_hh, b, h0, c0):
    h, c, total = h0, c0, 0.0
    for t in range(xs.shape[0]):
        gates = xs[t] @ w_ih.T + h @ w_hh.T + b
        i, f, o = (sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        c = f * c + i * np.tanh(gates[:, 2 * H:3 * H])
        h = o * np.tanh(c)
        total += (h * h).sum()
    return total + (c * c).sum()


def lstm_args(dtype=np.float64):
    return [a.astype(dtype) for a in (rng.normal(size=(T, N, I)), rng.normal(size=(4 * H, I)) * 0.5,
                                      rng.normal(size=(4 * H, H)) * 0.5, rng.normal(size=(4 * H,)) * 0.5,
                                      rng.normal(size=(N, H)), rng.normal(size=(N, H)))]


def scans(graph):
    forward, backward = [n for n in graph.nodes if n.op == SCAN_OP]
    return forward, backward


def matmuls(graph):
    return [n for n in graph.nodes if n.op == "matmul"]


def test_the_lstm_backward_body_reads_saved_products_and_sums_weight_gradients_after_the_loop():
    args = lstm_args()
    forward_graph = gc.jit(lstm_loss, backend=REF).lower(*args)
    raw = autodiff(forward_graph, [1, 2, 3, 4, 5])  # no simplify: the VJP rule's own graph
    forward, backward = scans(raw)
    # the forward's one product per step, h @ w_hh.T, read only through the gates' sigmoids
    # and tanh, is stacked as those four activations for the backward, which computes only the
    # cotangents' products, dgates @ w_hh (for h) and h^T @ dgates (w_hh), and tanh(c) again
    assert len(matmuls(forward.subgraph)) == 1
    saved = forward.outputs[-4:]
    assert [v.shape for v in saved] == [(T, N, H)] * 4 and all(v in backward.inputs for v in saved)
    assert [v.producer.op for v in forward.subgraph.output_values[-4:]] == ["sigmoid", "sigmoid", "sigmoid", "tanh"]
    assert len(matmuls(backward.subgraph)) == 2
    assert [n.op for n in backward.subgraph.nodes if n.op in ("sigmoid", "tanh", "exp")] == ["tanh"]
    carried = [v.shape for v in backward.inputs[backward.attrs["num_consts"]:][:backward.attrs["num_carry"]]]
    assert (H, 4 * H) in carried and (4 * H,) in carried  # w_hh.T's and b's running sums

    rewritten = hoist_accumulations(raw)
    _, loop = scans(rewritten)
    assert len(matmuls(loop.subgraph)) == 1  # dgates @ w_hh only
    assert "sum" not in {n.op for n in loop.subgraph.nodes}
    assert loop.attrs["num_carry"] == 2  # the cotangents of h and c; no weight sums
    after = [n for n in rewritten.nodes[rewritten.nodes.index(loop) + 1:] if n.op in ("matmul", "sum")]
    assert any(n.op == "matmul" and n.inputs[1].shape == (T * N, 4 * H) for n in after)
    assert any(n.op == "sum" and n.inputs[0].shape == (T, N, 4 * H) for n in after)
    for got, want in zip(evaluate(rewritten, args), evaluate(raw, args)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_lstm_gradients_match_a_python_loop_by_finite_differences():
    args = lstm_args()
    loss, grads = gc.value_and_grad(lstm_loss, argnums=(0, 1, 2, 3, 4, 5), backend=REF)(*args)
    np.testing.assert_allclose(loss, numpy_lstm_loss(*args), rtol=1e-12)
    for i, g in enumerate(grads):
        np.testing.assert_allclose(g, finite_differences(numpy_lstm_loss, args, i), rtol=1e-6, atol=1e-8)
    graph = gc.grad(lstm_loss, argnums=(1, 2, 3), backend=REF).lower(*args)
    _, backward = scans(graph)
    assert len(matmuls(backward.subgraph)) == 1


def test_the_recurrent_weight_gradient_comes_out_in_the_weights_layout():
    """The hoisted sum of h_t^T @ dgates_t starts from a zero accumulator, broadcast (too large
    to fold); added to nothing, it goes, and transpose(H^T @ dG) becomes dG^T @ H: w_hh's gradient
    in w_hh's own (4H, H) layout. Transposed, the Adam update that read it was a strided loop
    (lstm-64: 2.5 ms of a 48.5 ms step at 1 thread)."""
    args = lstm_args()
    graph = gc.grad(lstm_loss, argnums=(2,), backend=REF).lower(*args)
    (gradient,) = graph.output_values
    assert gradient.producer.op == "matmul" and gradient.shape == (4 * H, H)
    assert not [n for n in graph.nodes if n.op == "broadcast_to" and n.output.shape == (H, 4 * H)]
    np.testing.assert_allclose(gc.grad(lstm_loss, argnums=(2,), backend=REF)(*args)[0],
                               finite_differences(numpy_lstm_loss, args, 2), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("transposed", [True, False])
def test_an_accumulation_from_a_nonzero_start_leaves_the_loop(transposed):
    """acc + a_t^T @ b_t (or a_t @ b_t) and acc + sum(b_t) carried from nonzero starts: after the
    rewrite no carry is left, and the result is the start plus every step's term."""
    a_shape = (T, N, 3) if transposed else (T, 3, N)
    a, bs = rng.normal(size=a_shape), rng.normal(size=(T, N, 2))
    start, bias_start = rng.normal(size=(3, 2)), rng.normal(size=(2,))

    def f(start, bias_start, a, bs):
        def step(carry, x):
            acc, bias_acc = carry
            a_t, b_t = x
            return (acc + (a_t.T if transposed else a_t) @ (b_t * 2.0), bias_acc + b_t.sum(0)), None
        return gc.scan(step, (start, bias_start), (a, bs))[0]

    graph = gc.jit(f, backend=REF).lower(start, bias_start, a, bs)
    assert not [n for n in graph.nodes if n.op == SCAN_OP and n.attrs["num_carry"]]
    acc, bias_acc = gc.jit(f, backend=REF)(start, bias_start, a, bs)
    terms = [(a[t].T if transposed else a[t]) @ (bs[t] * 2) for t in range(T)]
    np.testing.assert_allclose(acc, start + sum(terms), rtol=1e-12)
    np.testing.assert_allclose(bias_acc, bias_start + bs.sum((0, 1)), rtol=1e-12)


def test_a_carry_read_elsewhere_in_the_body_stays_in_the_loop():
    """acc + x^T @ y is not hoisted when the step also reads acc (its value mid-loop matters)."""
    a, bs = rng.normal(size=(T, N, 2)), rng.normal(size=(T, N, 2))

    def f(start, a, bs):
        def step(acc, x):
            a_t, b_t = x
            return acc + a_t.T @ b_t, (acc * acc).sum()
        return gc.scan(step, start, (a, bs))

    start = rng.normal(size=(2, 2))
    graph = gc.jit(f, backend=REF).lower(start, a, bs)
    (loop,) = [n for n in graph.nodes if n.op == SCAN_OP]
    assert loop.attrs["num_carry"] == 1 and matmuls(loop.subgraph)
    last, ys = gc.jit(f, backend=REF)(start, a, bs)
    acc, want = start, []
    for t in range(T):
        want.append((acc * acc).sum())
        acc = acc + a[t].T @ bs[t]
    np.testing.assert_allclose(last, acc, rtol=1e-12)
    np.testing.assert_allclose(ys, want, rtol=1e-12)


@pytest.mark.slow  # ~20 s on the busy 2-core machine (compiles the forward and backward bodies)
def test_numba_cpu_lstm_gradients_match_the_reference():
    args = lstm_args(np.float32)
    argnums = (0, 1, 2, 3, 4, 5)
    want = gc.value_and_grad(lstm_loss, argnums=argnums, backend=REF)(*args)
    got = gc.value_and_grad(lstm_loss, argnums=argnums, backend="numba-cpu")(*args)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_a_product_read_only_by_an_add_is_saved_as_the_sum():
    """gates = px + h @ w.T, read by a sigmoid and also directly (h = gates * sigmoid(gates)):
    the forward stacks the sum, so the backward body recomputes neither the product nor the sum
    and does not read the projected input px at all."""
    xs, w, h0 = rng.normal(size=(T, N, H)), rng.normal(size=(H, H)) * 0.5, rng.normal(size=(N, H))

    def loss(xs, w, h0):
        def step(h, px):
            gates = px + h @ w.T
            h = gates * gc.sigmoid(gates)
            return h, h
        h, hs = gc.scan(step, h0, xs)
        return (hs * hs).sum()

    raw = autodiff(gc.jit(loss, backend=REF).lower(xs, w, h0), [1, 2])
    forward, backward = scans(raw)
    saved = [forward.subgraph.output_values[forward.outputs.index(v)] for v in forward.outputs[1:]
             if v in backward.inputs]
    saved = [v for v in saved if v.producer is not None]  # not the saved carries
    assert [v.producer.op for v in saved] == ["add"]
    assert any(v.producer is not None and v.producer.op == "matmul" for v in saved[0].producer.inputs)
    back = backward.subgraph
    (projected_px,) = [i.value for i in back.inputs if i.name == "x0"]  # px at step t
    assert projected_px not in back.users()
    assert len(matmuls(back)) == 2  # dgates @ w and h^T @ dgates; h @ w.T is not recomputed

    def numpy_loss(xs, w, h):
        total = 0.0
        for t in range(T):
            gates = xs[t] + h @ w.T
            h = gates * sigmoid(gates)
            total += (h * h).sum()
        return total
    args = [xs, w, h0]
    grads = gc.grad(loss, argnums=(1, 2), backend=REF)(*args)
    for n, g in zip((1, 2), grads):
        np.testing.assert_allclose(g, finite_differences(numpy_loss, args, n), rtol=1e-6, atol=1e-8)


def folded_lstm_loss(xs, w, b, h0, c0):
    """The gates as [x_t, h] @ w.T + b (nn.LSTM's form for a narrow input)."""
    def step(state, x):
        h, c = state
        gates = gc.concatenate([x, h], axis=1) @ w.T + b
        i, f, o = (gc.sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        c = f * c + i * gc.tanh(gates[:, 2 * H:3 * H])
        h = o * gc.tanh(c)
        return (h, c), h

    (h, c), hs = gc.scan(step, (h0, c0), xs)
    return (hs * hs).sum() + (c * c).sum()


def numpy_folded_lstm_loss(xs, w, b, h0, c0):
    return numpy_lstm_loss(xs, w[:, :I], w[:, I:], b, h0, c0)


def test_a_concatenation_before_the_product_is_stacked_by_the_forward():
    """The backward neither concatenates [x_t, h] again nor reads a stack of h: the weight's
    gradient after the loop is one product over the forward's stack of [x_t, h] (with
    hoist_accumulations, which the gradient pipeline runs)."""
    xs, w_ih, w_hh, b, h0, c0 = lstm_args()
    args = [xs, np.concatenate([w_ih, w_hh], axis=1), b, h0, c0]
    graph = gc.grad(folded_lstm_loss, argnums=(1, 2, 3, 4), backend=REF).lower(*args)
    forward, backward = scans(graph)
    assert not [n for n in backward.subgraph.nodes if n.op == "concatenate" and n.output.shape == (N, I + H)]
    # the cotangent of [x_t, h] is computed for h's columns only: xs are not differentiated
    assert [n.output.shape for n in matmuls(backward.subgraph)] == [(N, H)]
    stacked = [v.shape for v in backward.inputs[backward.attrs["num_consts"] + backward.attrs["num_carry"]:]]
    # c entering, the four gates' activations (saved in place of their pre-activation: the
    # backward computes no sigmoid again), cotangent of h
    assert stacked == [(T, N, H)] * 6
    assert (T, N, I + H) in [v.shape for v in forward.outputs]  # read after the loop only
    after = [n for n in graph.nodes[graph.nodes.index(backward) + 1:] if n.op == "matmul"]
    # dG^T @ [X H] over all steps: the gradient in the weight's own (4H, I + H) layout
    assert any(n.inputs[1].shape == (T * N, I + H) and n.output.shape == (4 * H, I + H) for n in after)
    loss, grads = gc.value_and_grad(folded_lstm_loss, argnums=(1, 2, 3, 4), backend=REF)(*args)
    np.testing.assert_allclose(loss, numpy_folded_lstm_loss(*args), rtol=1e-12)
    for n, g in zip((1, 2, 3, 4), grads):
        np.testing.assert_allclose(g, finite_differences(numpy_folded_lstm_loss, args, n),
                                   rtol=1e-6, atol=1e-8)


def test_two_products_summed_by_one_add_are_saved_once():
    """x_t @ a + h @ b: both products' only reader is the add, whose result is stacked once
    (the backward body reads one saved stack, no second copy of it)."""
    xs, a, b0, h0 = rng.normal(size=(T, N, I)), rng.normal(size=(I, H)), rng.normal(size=(H, H)), rng.normal(size=(N, H))

    def loss(xs, a, b, h0):
        h, hs = gc.scan(lambda h, x: ((x @ a + h @ b).tanh(),) * 2, h0, xs)
        return (hs * hs).sum()

    graph = gc.grad(loss, argnums=(1, 2, 3), backend=REF).lower(xs, a, b0, h0)
    forward, backward = scans(graph)
    saved = [v for v in forward.outputs[1:] if v in backward.inputs]
    assert [v.shape for v in saved] == [(T, N, H)] and backward.inputs.count(saved[0]) == 1

    def numpy_loss(xs, a, b, h):
        total = 0.0
        for t in range(T):
            h = np.tanh(xs[t] @ a + h @ b)
            total += (h * h).sum()
        return total
    args = [xs, a, b0, h0]
    grads = gc.grad(loss, argnums=(1, 2, 3), backend=REF)(*args)
    for n, g in zip((1, 2, 3), grads):
        np.testing.assert_allclose(g, finite_differences(numpy_loss, args, n), rtol=1e-6, atol=1e-8)


def rnn_last_step_loss(index, batch_first, reverse, ys_of=lambda h: h):
    """tanh RNN over xs (T, N, H) on gc.scan; the loss reads step `index` of the per-step
    outputs (time-major, or batch-first as nn.RNN's out[:, index]) and only 3 of its features."""
    def loss(xs, w, h0):
        def step(h, x):
            h = gc.tanh(x + h @ w)
            return h, ys_of(h)
        _, hs = gc.scan(step, h0, xs, reverse=reverse)
        last = hs.permute(1, 0, 2)[:, index, :3] if batch_first else hs[index, :, :3]
        return (last * last).sum()

    def numpy_loss(xs, w, h):
        hs = [None] * T
        for t in (reversed(range(T)) if reverse else range(T)):
            h = np.tanh(xs[t] + h @ w)
            hs[t] = ys_of(h)
        last = hs[index][:, :3]
        return (last * last).sum()
    return loss, numpy_loss


def stacked_cotangents(graph):
    _, backward = scans(graph)
    return [i.name for i in backward.subgraph.inputs if i.name.startswith("ct_y")]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_the_last_step_of_a_carry_returned_per_step_is_read_as_the_final_carry(batch_first, reverse):
    """out[:, -1] of a carry the body also returns per step (the last step: index 0 of a
    reverse scan) is the final carry: the backward loop reads no stacked cotangent (zeros but
    one step), the forward's stack of outputs goes, and values and gradients stay a loop's."""
    xs, w, h0 = rng.normal(size=(T, N, H)), rng.normal(size=(H, H)) * 0.5, rng.normal(size=(N, H))
    loss, numpy_loss = rnn_last_step_loss(0 if reverse else -1, batch_first, reverse)
    graph = gc.grad(loss, argnums=(0, 1, 2), backend=REF).lower(xs, w, h0)
    assert stacked_cotangents(graph) == []
    forward_only = gc.jit(loss, backend=REF).lower(xs, w, h0)
    assert [n.outputs[1:] for n in forward_only.nodes if n.op == SCAN_OP] == [()]
    args = [xs, w, h0]
    value, grads = gc.value_and_grad(loss, argnums=(0, 1, 2), backend=REF)(*args)
    np.testing.assert_allclose(value, numpy_loss(*args), rtol=1e-12)
    for n, g in enumerate(grads):
        np.testing.assert_allclose(g, finite_differences(numpy_loss, args, n), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("index, reverse, ys_of", [
    (-2, False, lambda h: h),       # not the last step
    (-1, True, lambda h: h),        # a reverse scan's last slice is its first step
    (-1, False, lambda h: h * 2),   # not the carry itself
])
def test_other_steps_and_outputs_are_read_from_the_stack(index, reverse, ys_of):
    xs, w, h0 = rng.normal(size=(T, N, H)), rng.normal(size=(H, H)) * 0.5, rng.normal(size=(N, H))
    loss, numpy_loss = rnn_last_step_loss(index, True, reverse, ys_of)
    assert stacked_cotangents(gc.grad(loss, argnums=(1,), backend=REF).lower(xs, w, h0)) == ["ct_y0"]
    args = [xs, w, h0]
    value, grads = gc.value_and_grad(loss, argnums=(0, 1, 2), backend=REF)(*args)
    np.testing.assert_allclose(value, numpy_loss(*args), rtol=1e-12)
    for n, g in enumerate(grads):
        np.testing.assert_allclose(g, finite_differences(numpy_loss, args, n), rtol=1e-6, atol=1e-8)


def test_the_backward_loop_sums_no_cotangent_of_a_const_or_input_nothing_differentiated_reaches():
    """A scan's VJP gives cotangents of its consts and stacked inputs only where they depend on
    what is differentiated: not of a data const (a (1, H) table) nor of the data xs, which it
    once summed step by step in a carry nothing read."""
    xs, w, table, h0 = (rng.normal(size=(T, N, H)), rng.normal(size=(H, H)) * 0.5,
                        rng.normal(size=(1, H)), rng.normal(size=(N, H)))

    def loss(w, table, xs, h0):
        h, hs = gc.scan(lambda h, x: ((x * table + h @ w).tanh(),) * 2, h0, xs)
        return (hs * hs).sum()

    raw = autodiff(gc.jit(loss, backend=REF).lower(w, table, xs, h0), [0])
    _, backward = scans(raw)
    a = backward.attrs
    carried = [v.shape for v in backward.inputs[a["num_consts"]:a["num_consts"] + a["num_carry"]]]
    assert sorted(carried) == sorted([(N, H), (H, H)])  # h's cotangent and w's running sum
    assert [name for name, _ in backward.subgraph.outputs if name.startswith("ct_x")] == []

    def numpy_loss(w, table, xs, h):
        total = 0.0
        for t in range(T):
            h = np.tanh(xs[t] * table + h @ w)
            total += (h * h).sum()
        return total
    args = [w, table, xs, h0]
    np.testing.assert_allclose(gc.grad(loss, backend=REF)(*args), finite_differences(numpy_loss, args, 0),
                               rtol=1e-6, atol=1e-8)
