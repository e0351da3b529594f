"""Rematerialisation in fusion: a kernel computes again the cheap elementwise values of another
kernel from what it loads anyway, instead of the other kernel storing them (passes/fusion.py)."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc import optim
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.passes.fusion import fuse
from graphc.passes.memplan import plan_memory

F32 = "float32"


def mlp(*activations):
    layers = [nn.Linear(6, 16)]
    for activation in activations:
        layers += [activation, nn.Linear(16, 16)]
    return nn.Sequential(*layers, nn.Linear(16, 3))


def batch(seed, size=8):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 6)).astype(np.float32), rng.integers(0, 3, size)


def step_for(model, backend):
    return gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-2),
                                 batch(0), backend=backend)


def kernel_ops(kernel):
    return [m.op for m in kernel.subgraph.nodes]


def tanh_count(fused):
    return sum(kernel_ops(k).count("tanh") for k in fused.nodes)


def test_gelu_sigmoid_tanh_mlp_step_on_numba_cpu_matches_reference():
    model = mlp(nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.GELU(), nn.Tanh(), nn.SiLU())
    oracle = mlp(nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.GELU(), nn.Tanh(), nn.SiLU())
    oracle.load_state_dict(model.state_dict())
    step, reference = step_for(model, "numba-cpu"), step_for(oracle, "reference")
    stored = fuse(step.stage_graph("optimized"), rematerialise=False)
    assert tanh_count(step.stage_graph("fused")) > tanh_count(stored)  # backward kernels recompute
    for seed in range(3):
        data = batch(seed)
        np.testing.assert_allclose(step(*data), reference(*data), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, oracle.state_dict()[key], rtol=1e-4, atol=1e-5, err_msg=key)


def fused_both_ways(model):
    """The training step's optimized graph fused with and without recomputation, its donations."""
    step = step_for(model, "reference")
    graph = step.stage_graph("optimized")
    return graph, fuse(graph).verify(), fuse(graph, rematerialise=False).verify(), step.donate


def forward_gelu_kernel(fused):
    return next(k for k in fused.nodes if "tanh" in kernel_ops(k))


def test_gelu_forward_kernel_stores_only_what_its_readers_cannot_recompute():
    graph, recomputed, stored, donate = fused_both_ways(mlp(nn.GELU(approximate="tanh")))
    before, after = forward_gelu_kernel(stored), forward_gelu_kernel(recomputed)
    assert kernel_ops(before) == kernel_ops(after)  # the forward kernel computes the same values
    # stored: the product, the pre-activation and five terms of GELU for the backward kernel, and
    # its result; recomputed: the product (the call's own buffer), pre-activation and result
    assert len(before.outputs) >= 6
    assert len(after.outputs) == 3
    assert plan_memory(recomputed, donate).peak_bytes < plan_memory(stored, donate).peak_bytes
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(v.shape).astype(v.dtype) if v.dtype == F32 else
            rng.integers(0, 3, v.shape).astype(v.dtype) for v in graph.input_values]
    for want, got in zip(evaluate(graph, args), evaluate(recomputed, args)):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def softmax_like(extra_read_of_input: bool):
    """x -> a sum kernel storing s = tanh(x)**2 as it reduces, then a kernel reading s (and x)."""
    b = Builder("g")
    x = b.add_input(TensorType((4, 8), F32), "x")
    s = b.square(b.tanh(x))
    total = b.sum(s, axes=(1,), keepdims=True)
    y = b.div(s, total)
    b.add_output("y", b.add(y, x) if extra_read_of_input else y)
    return b.graph.verify()


@pytest.mark.parametrize("reads_x", [False, True])
def test_recomputes_only_from_values_the_reader_loads_anyway(reads_x):
    graph = softmax_like(reads_x)
    fused = fuse(graph).verify()
    reduce, divide = fused.nodes
    assert reduce.attrs["pattern"] == "reduction"
    if reads_x:  # the dividing kernel loads x anyway: it computes tanh(x)**2 itself
        assert len(reduce.outputs) == 1
        assert kernel_ops(divide)[:2] == ["tanh", "square"]
    else:  # recomputing s would keep x alive for it: s is stored
        assert len(reduce.outputs) == 2
        assert "tanh" not in kernel_ops(divide)
    x = np.random.default_rng(1).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(evaluate(fused, [x])[0], evaluate(graph, [x])[0], rtol=1e-6)


def test_exact_gelu_backward_loads_the_pre_activation_instead_of_two_of_its_multiples():
    # the backward kernel reads x/2 and x/sqrt(2), which it does not load anyway: it loads x
    # once instead and computes both (and erf), a buffer less from forward to backward
    graph, recomputed, stored, donate = fused_both_ways(mlp(nn.GELU()))
    before, after = forward_gelu_kernel_erf(stored), forward_gelu_kernel_erf(recomputed)
    assert len(before.outputs) == 5  # product, x/2, x/sqrt(2), erf, result
    assert len(after.outputs) == 3   # product, x, result (x/2 and x/sqrt(2) alone: 4)
    assert plan_memory(recomputed, donate).peak_bytes < plan_memory(stored, donate).peak_bytes


def forward_gelu_kernel_erf(fused):
    return next(k for k in fused.nodes if "erf" in kernel_ops(k))


def two_terms_of_tanh(both: bool):
    """A sum kernel computing t = tanh(x), a = t**2 and b = exp(t) in its loop; a later kernel
    reads a (and b)."""
    b = Builder("g")
    x = b.add_input(TensorType((4, 8), F32), "x")
    t = b.tanh(x)
    square, exp = b.square(t), b.exp(t)
    total = b.sum(b.add(square, exp), axes=(1,), keepdims=True)
    y = b.div(square, total)
    b.add_output("y", b.add(y, exp) if both else y)
    return b.graph.verify()


@pytest.mark.parametrize("both", [False, True])
def test_one_new_load_replaces_two_stored_values_never_one(both):
    graph = two_terms_of_tanh(both)
    reduce, divide = fuse(graph).verify().nodes
    stored = fuse(graph, rematerialise=False).nodes[0]
    assert len(stored.outputs) == (3 if both else 2)  # the sum, a (and b)
    assert len(reduce.outputs) == 2  # the sum and t (both) or a (not both)
    assert ("tanh" in kernel_ops(divide)) is False
    assert ("exp" in kernel_ops(divide)) is both
    x = np.random.default_rng(2).standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(evaluate(fuse(graph), [x])[0], evaluate(graph, [x])[0], rtol=1e-6)


def test_a_reader_recomputes_in_one_section_of_its_loop_only():
    # a sum kernel's loop reads two terms of tanh(x) from one kernel; its epilogue reads two
    # terms of tanh(m) from another: each pair could be replaced by one load, but recomputed
    # nodes run in one of the two loops, so the second pair stays stored (this raised KeyError)
    b = Builder("g")
    x, u = (b.add_input(TensorType((4, 8), F32), name) for name in ("x", "u"))
    tx = b.tanh(x)
    square_x, exp_x = b.square(tx), b.exp(tx)
    b.add_output("s", b.sum(b.add(square_x, exp_x), axes=(1,), keepdims=True))
    m = b.sum(u, axes=(1,), keepdims=True)
    tm = b.tanh(m)
    square_m, exp_m = b.square(tm), b.exp(tm)  # traced before the reader: the sum of m keeps them
    scale = b.bind("broadcast_to", b.neg(m), shape=(4, 8))
    total = b.sum(b.mul(b.mul(square_x, exp_x), scale), axes=(1,), keepdims=True)
    b.add_output("y", b.add(b.mul(total, square_m), exp_m))
    graph = b.graph.verify()
    fused = fuse(graph).verify()
    first, second, reader = fused.nodes
    assert len(first.outputs) == 2   # the sum and tanh(x), which the reader's loop loads
    assert len(second.outputs) == 3  # -m, tanh(m)**2 and exp(tanh(m))
    assert kernel_ops(reader)[:2] == ["square", "exp"]
    rng = np.random.default_rng(3)
    args = [rng.standard_normal((4, 8)).astype(np.float32) for _ in range(2)]
    for want, got in zip(evaluate(graph, args), evaluate(fused, args)):
        np.testing.assert_allclose(got, want, rtol=1e-6)
