"""Constants that change with the batch size are arguments of numba-cpu kernels, not literals of
their source (the kernel cache's key): a step called at another batch size reuses the fused graph
with new constant values (passes/rebatch.py) and compiles no kernel."""
from __future__ import annotations

import logging

import numpy as np

import graphc as gc
from graphc import nn, optim
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph

REUSED = "reuses the graphs compiled for"


def batch_mean_loss(out, target):
    return ((out - target) ** 2).mean()


def bn_model() -> nn.Module:
    """BatchNorm in training mode: its running variance takes the batch's times n / (n - 1)."""
    return nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3))


def batch(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 6)).astype(np.float32), rng.standard_normal((size, 3)).astype(np.float32)


def sources(executable) -> set[str]:
    return {call.source for kernel in executable.kernels for call in kernel.generated.calls}


def test_a_second_batch_size_compiles_no_kernel_for_batch_norm_and_a_batch_mean(caplog):
    gc.manual_seed(0)
    model = bn_model()
    step = gc.compile_train_step(model, batch_mean_loss, optim.SGD(model.parameters(), lr=0.1), batch(8, 0),
                                 backend="numba-cpu")
    first = step.executable
    twin = bn_model()
    twin.load_state_dict(model.state_dict())
    at_5 = batch(5, 1)
    with caplog.at_level(logging.INFO, logger="graphc"):
        loss = step(*at_5)
    assert REUSED in caplog.text
    assert step.executable is not first
    assert step.executable.cache_stats.compiled == 0, step.executable.cache_stats
    assert step.executable.cache_stats.misses == 0, step.executable.cache_stats
    assert sources(step.executable) <= sources(first)
    # the constants of batch 5 reach the kernels: the same loss and running statistics as a
    # step compiled at 5
    fresh = gc.compile_train_step(twin, batch_mean_loss, optim.SGD(twin.parameters(), lr=0.1), at_5,
                                  backend="numba-cpu")
    assert loss == fresh(*at_5)
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, twin.state_dict()[key], err_msg=key)


def scaled(value: float):
    b = Builder("scaled")
    x = b.add_input(TensorType((3, 4), "float32"), "x")
    b.add_output("out", b.mul(x, b.const(value, "float32")))
    return b.graph.verify()


def test_a_float_constant_is_a_kernel_argument_of_its_own_dtype():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    one_third, one_fifth = compile_graph(scaled(1 / 3), "numba-cpu"), compile_graph(scaled(1 / 5), "numba-cpu")
    assert sources(one_third) == sources(one_fifth)
    [call] = one_third.kernels[0].generated.calls
    assert call.args[-1] == np.float32(1 / 3) and call.args[-1].dtype == np.float32
    for executable, value in ((one_third, 1 / 3), (one_fifth, 1 / 5)):
        np.testing.assert_array_equal(executable(x)[0], evaluate(scaled(value), [x])[0])
