"""simplify (folding, identities, CSE, DCE) and the pass pipeline, each checked on small graphs
and against the reference backend."""
import os

import numpy as np

from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.passes import (SIMPLIFY, Pass, Stages, cse, dce, fold_constants, simplify,
                           transpose_products)

F64 = "float64"


def graph_with(build):
    b = Builder("g")
    x = b.add_input(TensorType((3,), F64), "x")
    b.add_output("out", build(b, x))
    return b.graph


def ops(graph):
    return [n.op for n in graph.nodes]


def test_constant_folding():
    g = graph_with(lambda b, x: b.mul(x, b.add(b.const(2.0, F64), b.const(3.0, F64))))
    folded = fold_constants(g)
    assert ops(dce(folded)) == ["constant", "mul"]
    x = np.arange(3.0)
    np.testing.assert_array_equal(evaluate(folded, [x])[0], x * 5)


def test_identities():
    for build in [lambda b, x: b.add(x, b.const(0.0, F64)),
                  lambda b, x: b.mul(b.const(1.0, F64), x),
                  lambda b, x: b.neg(b.neg(x)),
                  lambda b, x: b.reshape(x, shape=(3,)),
                  lambda b, x: b.cast(x, dtype=F64),
                  lambda b, x: b.transpose(x, perm=(0,)),
                  lambda b, x: b.div(x, b.const(1.0, F64)),
                  lambda b, x: b.reshape(b.transpose(b.transpose(b.reshape(x, shape=(1, 3)), perm=(1, 0)),
                                                     perm=(1, 0)), shape=(3,))]:
        g = simplify(graph_with(build))
        assert g.nodes == [] and g.outputs[0][1] is g.inputs[0].value, str(g)


def test_identity_that_would_drop_a_broadcast_is_kept():
    g = simplify(graph_with(lambda b, x: b.add(x, b.full(0.0, TensorType((2, 3), F64)))))
    assert g.outputs[0][1].shape == (2, 3)
    np.testing.assert_array_equal(evaluate(g, [np.ones(3)])[0], np.ones((2, 3)))


def product_graph(also_use_product: bool):
    """transpose(a.T @ b), the shape autodiff gives the gradient of a weight stored (out, in)."""
    b = Builder("g")
    a, d = b.add_input(TensorType((4, 3), F64), "a"), b.add_input(TensorType((4, 5), F64), "d")
    product = b.matmul(b.transpose(a, perm=(1, 0)), d)
    b.add_output("grad", b.transpose(product, perm=(1, 0)))
    if also_use_product:
        b.add_output("product", product)
    return b.graph


def test_transpose_of_a_product_becomes_a_product_of_transposes():
    g = product_graph(also_use_product=False)
    rewritten = dce(transpose_products(g))
    assert ops(rewritten) == ["transpose", "matmul"]  # d.T @ a: a's transpose cancelled
    (matmul,) = [n for n in rewritten.nodes if n.op == "matmul"]
    assert matmul.inputs[1] is rewritten.inputs[0].value
    a, d = np.arange(12.0).reshape(4, 3), np.arange(20.0).reshape(4, 5) - 7
    np.testing.assert_array_equal(evaluate(rewritten, [a, d])[0], evaluate(g, [a, d])[0])


def test_a_product_read_elsewhere_is_not_transposed_twice():
    g = product_graph(also_use_product=True)
    assert ops(dce(transpose_products(g))).count("matmul") == 1


def test_cse_merges_identical_nodes():
    g = graph_with(lambda b, x: b.add(b.exp(x), b.exp(x)))
    assert ops(cse(g)) == ["exp", "add"]
    merged = cse(g)
    assert merged.nodes[1].inputs[0] is merged.nodes[1].inputs[1]


def test_dce_drops_dead_nodes():
    def build(b, x):
        b.tanh(x)  # dead
        return b.exp(x)
    assert ops(dce(graph_with(build))) == ["exp"]


def test_pipeline_verifies_and_dumps_each_stage(tmp_path):
    g = graph_with(lambda b, x: b.add(b.exp(x), b.exp(x)))
    stages = Stages(g.name, verify=True, dump_dir=str(tmp_path))
    out = stages.run(stages.record("input", g), [Pass("cse", cse), Pass("dce", dce), SIMPLIFY])
    assert ops(out) == ["exp", "add"]
    files = sorted(os.listdir(tmp_path))
    assert files == ["g.00.input.dot", "g.00.input.txt", "g.01.cse.dot", "g.01.cse.txt",
                     "g.02.dce.dot", "g.02.dce.txt", "g.03.simplify.dot", "g.03.simplify.txt"]
    assert "exp" in (tmp_path / "g.01.cse.txt").read_text()


def test_graphc_dump_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHC_DUMP", str(tmp_path))
    g = graph_with(lambda b, x: b.exp(x))
    stages = Stages(g.name)
    stages.run(stages.record("input", g), [SIMPLIFY])
    assert (tmp_path / "g.01.simplify.txt").exists()
