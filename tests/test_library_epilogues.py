"""Library kernels with elementwise epilogues on numba-cpu against the reference interpreter:
products of odd sizes, with transposed operands, stacked and broadcast batches, in float32 and
float64; convolutions (im2col and Winograd) and their input gradients; and an epilogue that
overwrites, in place, an operand its own product reads."""
import numpy as np
import pytest

from graphc.backends.reference import evaluate
from graphc.lowering import compile_graph
from graphc.passes.fusion import fuse
from opcheck import build_graph

TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-4), "float64": dict(rtol=1e-10, atol=1e-10)}


def normal(rng, shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def library_epilogues(graph):
    """The op names of each library kernel's members after fusion (its anchor and epilogue)."""
    return [[n.op for n in k.subgraph.nodes if n.op != "constant"]
            for k in fuse(graph).nodes if k.attrs["pattern"] == "library"]


def check(graph, arrays, dtype, donate=None):
    """Compile for numba-cpu, run, compare every output with the reference; the executable."""
    executable = compile_graph(graph, "numba-cpu", donate=donate)
    want = evaluate(graph, [a.copy() for a in arrays])
    got = executable(*[a.copy() for a in arrays])
    for name, g, w in zip(graph.output_names, got, want):
        assert g.dtype == w.dtype, name
        np.testing.assert_allclose(g, w, err_msg=name, **TOLERANCE[dtype])
    return executable


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_products_with_epilogues_match_reference(dtype):
    rng = np.random.default_rng(1)
    x, w, bias = normal(rng, (37, 5), dtype), normal(rng, (5, 11), dtype), normal(rng, (11,), dtype)
    xt, wt = normal(rng, (5, 37), dtype), normal(rng, (11, 5), dtype)
    stack, batch, shared = normal(rng, (3, 7, 5), dtype), normal(rng, (2, 3, 7, 5), dtype), normal(rng, (3, 5, 11), dtype)
    residual = normal(rng, (2, 3, 7, 11), dtype)

    def products(b, x, w, bias, xt, wt, stack, batch, shared, residual):
        half = b.scalar_like(0.5, bias)
        return [
            b.relu(b.add(b.matmul(x, w), bias)),                              # 2-D, odd sizes
            b.mul(b.tanh(b.matmul(b.transpose(xt, perm=(1, 0)), b.transpose(wt, perm=(1, 0)))),
                  b.scalar_like(3.0, bias)),                                  # both operands transposed
            b.sigmoid(b.add(b.matmul(stack, w), bias)),                       # a stack times one matrix
            b.sub(residual, b.mul(b.matmul(batch, shared), half)),            # a broadcast batch
        ]
    arrays = [x, w, bias, xt, wt, stack, batch, shared, residual]
    graph = build_graph(f"products_{dtype}", arrays, products)
    fused = library_epilogues(graph)
    assert len(fused) == 4 and all(ops[-1] != "matmul" for ops in fused)  # each has an epilogue
    check(graph, arrays, dtype)


@pytest.mark.slow
def test_convolutions_with_epilogues_match_reference():
    rng = np.random.default_rng(2)
    x, w, bias = normal(rng, (3, 2, 9, 7)), normal(rng, (4, 2, 3, 3)), normal(rng, (4, 1, 1))
    xw, ww, bw = normal(rng, (3, 16, 7, 6)), normal(rng, (17, 16, 3, 3)), normal(rng, (17, 1, 1))
    dy, mask = normal(rng, (3, 4, 5, 4)), normal(rng, (3, 2, 9, 7))
    dyw, maskw = normal(rng, (3, 17, 7, 6)), normal(rng, (3, 16, 7, 6))

    def convolutions(b, x, w, bias, xw, ww, bw, dy, mask, dyw, maskw):
        return [
            b.relu(b.add(b.conv2d(x, w, stride=2, padding=1), bias)),       # im2col
            b.relu(b.add(b.conv2d(xw, ww, padding=1), bw)),                  # Winograd
            b.mul(b.conv2d_input_grad(dy, w, input_shape=(3, 2, 9, 7), stride=2, padding=1), mask),
            b.mul(b.conv2d_input_grad(dyw, ww, input_shape=(3, 16, 7, 6), padding=1), maskw),
        ]
    arrays = [x, w, bias, xw, ww, bw, dy, mask, dyw, maskw]
    graph = build_graph("convolutions", arrays, convolutions)
    fused = library_epilogues(graph)
    assert len(fused) == 4 and all(len(ops) > 1 for ops in fused)
    check(graph, arrays, "float32")


def test_epilogue_overwriting_an_operand_of_its_product_in_place():
    """w = w - 0.1 * tanh(x @ w), w donated: the update is the product's epilogue and is
    written into w's buffer, which the product reads whole (every row of x meets all of w): an
    epilogue run block by block with the product would overwrite w before later blocks read it.
    700 x 700 float32 (1.9 MiB) spans several blocks of any cache-sized blocking."""
    rng = np.random.default_rng(3)
    x, w = normal(rng, (700, 700)) / 25, normal(rng, (700, 700))
    graph = build_graph("update", [w, x], lambda b, w, x: [
        b.sub(w, b.mul(b.tanh(b.matmul(x, w)), b.scalar_like(0.1, w)))])
    assert library_epilogues(graph) == [["matmul", "tanh", "mul", "sub"]]
    executable = check(graph, [w, x], "float32", donate={0: 0})
    assert executable.plan.donated_in_place == {0: 0}


def test_epilogues_written_over_their_products_match_reference():
    """Each library result is read by a transpose, so it lives in the arena. A result nothing
    else reads is overwritten by its epilogue (conv + bias + ReLU): one buffer for both. A
    product another kernel reads, and one whose epilogue casts it to int32 (as many bytes),
    keep their own buffers."""
    rng = np.random.default_rng(4)
    x, w, bias = normal(rng, (2, 3, 6, 5)), normal(rng, (4, 3, 3, 3)), normal(rng, (4, 1, 1))
    a, m, n = normal(rng, (5, 7)), normal(rng, (7, 9)), normal(rng, (7, 3))

    def layers(b, x, w, bias, a, m, n):
        activated = b.relu(b.add(b.conv2d(x, w, padding=1), bias))
        product = b.matmul(a, m)
        rounded = b.cast(b.mul(b.matmul(a, n), b.scalar_like(8.0, a)), dtype="int32")
        return [b.transpose(activated, perm=(0, 1, 3, 2)), b.transpose(b.relu(product), perm=(1, 0)),
                b.neg(b.transpose(product, perm=(1, 0))), b.transpose(rounded, perm=(1, 0))]
    arrays = [x, w, bias, a, m, n]
    graph = build_graph("overwritten", arrays, layers)
    plan = check(graph, arrays, "float32").plan
    slots = [[plan.slot_of(v) for v in k.outputs] for k in plan.schedule if k.attrs["pattern"] == "library"]
    assert sorted(len(set(s)) for s in slots) == [1, 2, 2]  # only the convolution's pair shares
