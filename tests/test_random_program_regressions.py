"""Failures the random-program generator (tests/random_programs.py) found, minimised.

Each test is the smallest program that showed one bug, kept after its fix so the bug stays
fixed. A bug found but not yet fixed gets an xfail(strict=True) test naming it and where it
lives (an unexpected pass then fails the suite once it is fixed), and the generator stops
drawing the form that hits it until then.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F


def test_grad_of_jit_is_the_gradient():
    """gc.grad(gc.jit(f)) returned f(x) (the wrapped Staged ran jit's compiled function)."""
    def f(x):
        return (x * x).sum()

    x = np.arange(3.0)
    np.testing.assert_array_equal(gc.grad(gc.jit(f), backend="reference")(x), 2 * x)
    value, grads = gc.value_and_grad(gc.jit(f), argnums=(0,), backend="reference")(x)
    assert value == 5.0
    np.testing.assert_array_equal(grads[0], 2 * x)


IMAGE = np.random.default_rng(0).standard_normal((1, 2, 4, 4))


@pytest.mark.parametrize("layer", [
    lambda w: F.conv2d(IMAGE, w),
    lambda w: F.max_pool2d(IMAGE, 2) * w.sum(),
    lambda w: F.avg_pool2d(IMAGE, 2) * w.sum(),
    lambda w: F.relu(IMAGE) * w.sum(),
], ids=["conv2d", "max_pool2d", "avg_pool2d", "relu"])
def test_layers_accept_a_closure_constant_image(layer):
    w = np.random.default_rng(1).standard_normal((3, 2, 3, 3))
    value = gc.jit(lambda w: layer(w).sum(), backend="reference")(w)
    assert np.isfinite(value)


def test_where_and_dropout_of_a_closure_constant():
    def f(x):
        return (gc.where(x > 0, IMAGE, 0) + F.dropout(IMAGE, p=0.5) * x).sum()

    gc.manual_seed(0)
    value = gc.jit(f, backend="reference")(np.ones((1, 2, 4, 4)))
    assert np.isfinite(value)


def run_simulated(source: str) -> None:
    """Run `source` in a child process on the numba-cuda simulator (switched on before numba
    is imported); fail with its error output."""
    child = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                           timeout=300, env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"})
    assert child.returncode == 0, child.stderr[-2000:]


SIMULATED_CONSTANT_OUTPUT = textwrap.dedent("""
    import numpy as np
    import graphc as gc

    # the gradient of x * 3.0 is the constant 3.0, a 0-d output
    grad = gc.grad(lambda x: x * 3.0, backend="numba-cuda")(np.array(2.0, np.float32))
    assert grad.shape == () and grad == 3.0, repr(grad)
""")


@pytest.mark.slow
def test_zero_dimensional_constant_output_keeps_its_shape_on_numba_cuda():
    run_simulated(SIMULATED_CONSTANT_OUTPUT)


SIMULATED_CONSTANT_READ_AND_RETURNED = textwrap.dedent("""
    import numpy as np
    import graphc as gc
    import graphc.nn.functional as F

    # relu's gradient compares with the constant 0.0, which is also x1's gradient (f ignores x1)
    x = np.array(0.7, np.float32)
    step, zero = gc.grad(lambda x0, x1: F.relu(x0) * 2.0, argnums=(0, 1), backend="numba-cuda")(x, x)
    assert step == 2.0 and np.all(zero == 0.0), (step, zero)
""")


@pytest.mark.slow
def test_constant_read_by_a_kernel_and_returned_on_numba_cuda():
    run_simulated(SIMULATED_CONSTANT_READ_AND_RETURNED)


SIMULATED_SCATTER_AT_A_ZERO_DIMENSIONAL_INDEX = textwrap.dedent("""
    import numpy as np
    import graphc as gc

    # the gradient of a gather at a 0-d index is a scatter_add of a 0-d cotangent
    x = np.arange(4, dtype=np.float32)
    grad = gc.grad(lambda x: gc.gather(x, np.array(-2), axis=0) * 1.5, backend="numba-cuda")(x)
    assert np.array_equal(grad, [0, 0, 1.5, 0]), grad
""")


@pytest.mark.slow
def test_scatter_at_a_zero_dimensional_index_on_numba_cuda():
    run_simulated(SIMULATED_SCATTER_AT_A_ZERO_DIMENSIONAL_INDEX)


def test_second_derivative_of_a_power_of_one_is_finite_at_zero():
    """pow's VJP was y * x**(y-1): differentiated again, its exponent y-1 = 0 gave 0 * x**-1,
    NaN at x = 0 (found as relu(x) ** 1 inside the squared norm of a gradient)."""
    def squared_gradient(x):
        return sum((g * g).sum() for g in gc.grad(lambda x: (F.relu(x) ** 1 * 3.0).sum(),
                                                   argnums=(0,))(x))

    x = np.array([-1.0, 0.0, 2.0])
    np.testing.assert_array_equal(gc.grad(squared_gradient, backend="reference")(x), [0, 0, 0])
    # d/dx x**0 = 0 at x = 0 as well (y * x**(y-1) is 0 * inf there)
    np.testing.assert_array_equal(
        gc.grad(lambda x: (x ** np.zeros(3)).sum(), backend="reference")(x), [0, 0, 0])
