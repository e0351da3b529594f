"""The fusion pass: which nodes share a kernel, and that the kernel graph stays valid."""
import numpy as np
import pytest

from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.passes.fusion import anchor_index, fuse, inplace_pairs, op_class

F32 = "float32"


def builder(*shapes, dtype=F32):
    b = Builder("g")
    return b, [b.add_input(TensorType(s, dtype), f"x{i}") for i, s in enumerate(shapes)]


def kernels(graph):
    fused = fuse(graph.verify())
    fused.verify()
    return fused, [(n.attrs["pattern"], [m.op for m in n.subgraph.nodes]) for n in fused.nodes]


def same_results(graph, fused, seed=0):
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal(v.shape).astype(v.dtype) for v in graph.input_values]
    for want, got in zip(evaluate(graph, args), evaluate(fused, args)):
        np.testing.assert_array_equal(got, want)


def test_elementwise_chain_with_broadcast_is_one_kernel():
    b, (x, bias) = builder((4, 8), (8,))
    t = b.add(x, bias)
    y = b.relu(b.mul(b.exp(t), b.scalar_like(2.0, t)))
    b.add_output("y", b.sub(y, t))
    b.add_output("t", t)
    fused, ks = kernels(b.graph)
    assert ks == [("elementwise", ["constant", "add", "exp", "mul", "relu", "sub"])]
    (node,) = fused.nodes
    assert len(node.outputs) == 2  # t leaves the kernel too
    same_results(b.graph, fused)


def test_reduction_absorbs_producers_and_epilogue():
    b, (x,) = builder((4, 8))
    sq = b.square(b.sub(x, b.scalar_like(1.0, x)))
    mean = b.mul(b.sum(sq, axes=(1,)), b.scalar_like(1 / 8, x))
    b.add_output("y", b.sqrt(mean))
    fused, ks = kernels(b.graph)
    assert ks == [("reduction", ["constant", "constant", "sub", "square", "sum", "mul", "sqrt"])]
    node = fused.nodes[0]
    assert node.subgraph.nodes[anchor_index(node)].op == "sum"
    same_results(b.graph, fused)


def test_softmax_stores_the_shared_exponential_from_the_sum_kernel():
    b, (x,) = builder((4, 10))
    e = b.exp(b.sub(x, b.max(x, axes=(1,), keepdims=True)))
    b.add_output("y", b.div(e, b.sum(e, axes=(1,), keepdims=True)))
    fused, ks = kernels(b.graph)
    assert [p for p, _ in ks] == ["reduction", "reduction", "elementwise"]
    assert ks[1][1] == ["sub", "exp", "sum"]
    assert len(fused.nodes[1].outputs) == 2  # e (stored in the loop) and the sum
    same_results(b.graph, fused)


def test_matmul_takes_bias_and_relu_as_epilogue():
    b, (x, w, bias) = builder((5, 7), (7, 3), (3,))
    z = b.add(b.matmul(x, w), bias)
    b.add_output("y", b.relu(z))
    fused, ks = kernels(b.graph)
    assert ks == [("library", ["matmul", "add", "relu"])]
    # the matmul result gets its own buffer: the epilogue reads it after it is complete
    assert [v.shape for v in fused.nodes[0].outputs] == [(5, 3), (5, 3)]
    same_results(b.graph, fused)



def test_a_mask_only_later_kernels_read_is_computed_there_not_stored():
    # forward y = relu(x @ w); then, in the order autodiff emits them, a cotangent computed
    # from y and the ReLU gradient dz = cotangent * (y > 0): the mask joins the kernel that
    # uses it, which reads y, instead of being stored by the forward kernel.
    b, (x, w) = builder((4, 6), (6, 5))
    y = b.relu(b.matmul(x, w))
    cotangent = b.matmul(b.matmul(y, b.transpose(w, perm=(1, 0))), w)
    mask = b.cast(b.gt(y, b.scalar_like(0, y)), dtype=F32)
    b.add_output("y", y)
    b.add_output("dz", b.mul(cotangent, mask))
    fused, ks = kernels(b.graph)
    assert ks[0] == ("library", ["matmul", "relu"])
    assert ks[-1] == ("library", ["constant", "matmul", "gt", "cast", "mul"])
    same_results(b.graph, fused)

def test_anchor_operands_are_never_epilogue_members():
    b, (x, w) = builder((4, 4), (4, 4))
    a = b.exp(x)
    b.add_output("y", b.add(a, b.matmul(a, w)))
    fused, ks = kernels(b.graph)
    assert ks == [("elementwise", ["exp"]), ("library", ["matmul", "add"])]
    same_results(b.graph, fused)


def test_merge_that_would_close_a_cycle_is_refused():
    # exp(x) feeds the matmul, whose transposed result joins exp(x) again: merging the two
    # elementwise groups around the library kernel would make the kernel graph cyclic.
    b, (x, w) = builder((4, 4), (4, 4))
    a = b.exp(x)
    q = b.relu(b.matmul(a, w))
    b.add_output("y", b.add(a, b.transpose(q, perm=(1, 0))))
    fused, ks = kernels(b.graph)  # (kernels() verifies: inputs are defined before use)
    assert ks == [("elementwise", ["exp"]), ("library", ["matmul", "relu"]),
                  ("elementwise", ["transpose", "add"])]
    same_results(b.graph, fused)


def test_off_index_reads_break_the_loop():
    b, (x,) = builder((3, 3))
    e = b.exp(x)
    b.add_output("y", b.add(e, b.transpose(e, perm=(1, 0))))
    fused, ks = kernels(b.graph)
    assert len(ks) == 2  # exp(x) must be materialised before it is read transposed
    same_results(b.graph, fused)


def test_views_constants_and_literals():
    b, (x,) = builder((2, 6))
    table = b.const(np.arange(12, dtype=np.float32).reshape(2, 6), F32)
    y = b.reshape(b.add(b.mul(x, table), b.scalar_like(1.0, x)), shape=(3, 4))
    b.add_output("y", b.neg(y))
    fused, ks = kernels(b.graph)
    assert [p for p, _ in ks] == ["constant", "elementwise", "view", "elementwise"]
    assert ks[1][1] == ["constant", "mul", "add"]  # the scalar is a literal of the kernel
    same_results(b.graph, fused)


def test_dead_nodes_are_dropped():
    b, (x,) = builder((3,))
    b.exp(x)
    b.add_output("y", b.neg(x))
    _, ks = kernels(b.graph)
    assert ks == [("elementwise", ["neg"])]


def test_literal_read_by_an_anchor_becomes_a_constant_kernel():
    b, (x,) = builder((1, 1))
    b.add_output("y", b.matmul(x, b.const(np.ones((1, 1)), F32)))
    _, ks = kernels(b.graph)
    assert ks == [("constant", ["constant"]), ("library", ["matmul"])]


def test_inplace_pairs():
    b, (x, y) = builder((4, 4), (4,))
    b.add_output("z", b.add(b.transpose(x, perm=(1, 0)), b.mul(x, x)))
    b.add_output("w", b.mul(y, y))
    fused, _ = kernels(b.graph)
    # x is read transposed, so no output may overwrite it; y is read at identity
    assert inplace_pairs(fused.nodes[0]) == set()
    assert inplace_pairs(fused.nodes[1]) == {(0, 0)}


def test_epilogue_inputs_may_be_overwritten_but_not_by_the_library_result():
    b, (x, w, v) = builder((3, 4), (4, 5), (3, 5))
    b.add_output("y", b.sub(v, b.matmul(x, w)))
    fused, _ = kernels(b.graph)
    node = fused.nodes[0]
    anchor_out = node.subgraph.output_values.index(node.subgraph.nodes[0].output)
    v_pos = [i for i, u in enumerate(node.inputs) if u.shape == (3, 5)][0]
    assert (v_pos, 1 - anchor_out) in inplace_pairs(node)
    assert (v_pos, anchor_out) not in inplace_pairs(node)


def test_every_primitive_has_a_fusion_class():
    from graphc.ir import PRIMITIVES
    assert {op_class(op) for op in PRIMITIVES} <= {"constant", "view", "pointwise", "reduction",
                                                   "library"}


def test_fusing_a_fused_graph_is_an_error():
    b, (x,) = builder((3,))
    b.add_output("y", b.neg(x))
    with pytest.raises(ValueError, match="already fused"):
        fuse(fuse(b.graph))


def test_a_long_elementwise_chain_is_split_into_kernels_of_bounded_length():
    # Numba compiles a kernel in time about quadratic in its length: a crafted graph of
    # thousands of chained ops must not make one kernel of them
    from graphc.passes.fusion import MAX_KERNEL_NODES
    b, (x,) = builder((4, 8))
    y = x
    for i in range(3 * MAX_KERNEL_NODES):
        y = (b.neg, b.tanh, b.relu)[i % 3](y)
    b.add_output("y", y)
    fused, ks = kernels(b.graph)
    assert len(ks) >= 3 and max(len(ops) for _, ops in ks) <= MAX_KERNEL_NODES
    same_results(b.graph, fused)
