"""simplify moves a transpose to the small side of a slice or of a slice's gradient
(passes/simplify.py, TRANSPOSE_MOVES): a batch-first recurrence's out[:, -1] transposed the
whole (T, N, H) output of its scan to keep one step, and its gradient transposed a zero-filled
array of that size back."""
import numpy as np

import graphc as gc
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.passes import simplify

F64 = "float64"
ROTATE = (2, 0, 1)  # not its own inverse: an axis mapped the wrong way round shows


def transposes(graph) -> list[tuple[int, ...]]:
    """The operand shape of every transpose in `graph`."""
    return [n.inputs[0].shape for n in graph.nodes if n.op == "transpose"]


def test_slice_of_a_transpose_transposes_the_slice_only():
    b = Builder("g")
    x = b.add_input(TensorType((6, 4, 5), F64), "x")
    t = b.transpose(x, perm=ROTATE)  # (5, 6, 4)
    b.add_output("out", b.slice(t, starts=(1, 5, 0), stops=(5, 6, 4), steps=(2, 1, 3)))
    rewritten = simplify(b.graph)
    assert transposes(rewritten) == [(1, 2, 2)]
    x_value = np.arange(120.0).reshape(6, 4, 5)
    np.testing.assert_array_equal(evaluate(rewritten, [x_value])[0], evaluate(b.graph, [x_value])[0])


def test_transpose_of_a_slice_gradient_transposes_the_operand_only():
    b = Builder("g")
    g = b.add_input(TensorType((2, 1, 2), F64), "g")
    scattered = b.slice_grad(g, shape=(5, 6, 4), starts=(1, 5, 0), stops=(5, 6, 4), steps=(2, 1, 3))
    b.add_output("out", b.transpose(scattered, perm=ROTATE))
    rewritten = simplify(b.graph)
    assert transposes(rewritten) == [(2, 1, 2)]
    assert [n.op for n in rewritten.nodes] == ["transpose", "slice_grad"]
    g_value = np.arange(1.0, 5.0).reshape(2, 1, 2)
    np.testing.assert_array_equal(evaluate(rewritten, [g_value])[0], evaluate(b.graph, [g_value])[0])


def test_last_step_of_a_batch_first_sequence_and_its_gradient():
    """out[:, -1] of time-major values made batch-first, differentiated: no transpose of the
    whole sequence is left, forward or backward."""
    def loss(seq, w):
        batch_first = (seq * w).permute(1, 0, 2)  # (T, N, H) -> (N, T, H)
        return gc.sum(gc.tanh(batch_first[:, -1]))

    seq = np.random.default_rng(0).normal(size=(7, 3, 4))
    w = np.random.default_rng(1).normal(size=(7, 3, 4))
    graph = gc.trace(gc.value_and_grad(loss, argnums=(0, 1)), seq, w)
    rewritten = simplify(graph)
    assert transposes(graph) and all(np.prod(shape) == 12 for shape in transposes(rewritten))
    for got, want in zip(evaluate(rewritten, [seq, w]), evaluate(graph, [seq, w])):
        np.testing.assert_allclose(got, want, rtol=1e-15, atol=0)


def test_a_transpose_read_elsewhere_stays_whole_and_alone():
    b = Builder("g")
    x = b.add_input(TensorType((6, 4, 5), F64), "x")
    t = b.transpose(x, perm=ROTATE)
    b.add_output("part", b.slice(t, starts=(0, 5, 0), stops=(5, 6, 4), steps=(1, 1, 1)))
    b.add_output("whole", t)
    assert transposes(simplify(b.graph)) == [(6, 4, 5)]


def test_transposes_undoing_each_other_around_a_slice_go_even_where_the_inner_one_is_read_elsewhere():
    """transpose(slice(transpose(x, p)), q), q undoing p, is a slice of x: the inner transpose
    stays for its other reader, the outer one and the transposed copy of the slice go (a folded
    recurrent step's backward read W_hh so, from the transposed [W_ih, W_hh, b])."""
    b = Builder("g")
    x = b.add_input(TensorType((6, 4, 5), F64), "x")
    t = b.transpose(x, perm=ROTATE)  # (5, 6, 4)
    part = b.slice(t, starts=(1, 2, 0), stops=(5, 6, 4), steps=(2, 1, 3))  # (2, 4, 2)
    b.add_output("part", b.transpose(part, perm=(1, 2, 0)))  # (4, 2, 2): x's axis order again
    b.add_output("whole", t)
    rewritten = simplify(b.graph)
    assert transposes(rewritten) == [(6, 4, 5)]
    x_value = np.arange(120.0).reshape(6, 4, 5)
    for got, want in zip(evaluate(rewritten, [x_value]), evaluate(b.graph, [x_value])):
        np.testing.assert_array_equal(got, want)
