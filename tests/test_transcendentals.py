"""The numba-cpu backend's vectorisable float32 exp, tanh and sigmoid
(backends/kernels/pointwise.py): their accuracy over every float32 range that matters, their
non-finite values, and that the loops they are in vectorise (the reason they exist: a libm
call keeps its loop scalar)."""
import platform
import re

import numpy as np
import pytest

from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph

SMALLEST_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)
LARGEST = float(np.finfo(np.float32).max)
# NumPy's function (for float64: the value each float32 result is measured against)
NUMPY = {"exp": np.exp, "tanh": np.tanh, "sigmoid": lambda x: 1 / (1 + np.exp(-x))}
# exp rounds about once; tanh rounds e**2|x| - 1, its sum with 2 and the quotient (1.83 ulp at
# worst on the grid below, at |x| = 0.2508); sigmoid rounds e**-x, 1 + e**-x and the quotient,
# as NumPy's float32 1 / (1 + np.exp(-x)) does (2.5 ulp at worst).
MAX_ULP = {"exp": 1.5, "tanh": 1.9, "sigmoid": 2.5}


def executable(op: str, x: np.ndarray):
    b = Builder(f"{op}_{x.dtype}")
    b.add_output("y", getattr(b, op)(b.add_input(TensorType.of(x), "x")))
    return compile_graph(b.graph.verify(), "numba-cpu")


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at `exact` (float64 values)."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / np.maximum(spacing, SMALLEST_SUBNORMAL)


def dense_float32_grid() -> np.ndarray:
    """Every range the approximations treat apart, both signs: subnormals and tiny values,
    where tanh's reduction first takes a power of two (|x| = ln(2) / 4), the body, exp's
    overflow (88.72) and underflow (-87.3 to subnormal, -103.97 to 0), tanh's saturation
    (9.01), the extremes."""
    tiny = np.geomspace(SMALLEST_SUBNORMAL, 1e-3, 20_000, dtype=np.float64).astype(np.float32)
    around_edge = np.float32(np.log(2) / 4) + np.arange(-2000, 2000, dtype=np.float32) * np.float32(1.5e-8)
    body = np.linspace(0, 110, 1_100_001, dtype=np.float32)
    huge = np.geomspace(110, LARGEST, 1000).astype(np.float32)
    half = np.concatenate([tiny, around_edge, body, huge, [LARGEST]])
    return np.concatenate([half, -half, [0.0, -0.0]]).astype(np.float32)


@pytest.mark.parametrize("op", ["exp", "tanh", "sigmoid"])
def test_float32_is_within_a_few_ulp_of_exact(op):
    x = dense_float32_grid()
    got = executable(op, x)(x)[0]
    with np.errstate(over="ignore"):
        exact = NUMPY[op](x.astype(np.float64))
        numpy = NUMPY[op](x)
        compared = np.isfinite(exact.astype(np.float32))
        if op == "sigmoid":
            # Below x = -88.72, e**-x overflows float32 and sigmoid is 0, in NumPy and in the
            # reference backend as here: compared exactly below.
            compared &= np.isfinite(np.exp(-x))
    error = ulp_error(got[compared], exact[compared])
    assert error.max() <= MAX_ULP[op], f"{op}: max {error.max():.3f} ulp at x={x[compared][np.argmax(error)]!r}"
    np.testing.assert_array_equal(got[~compared], numpy[~compared])


@pytest.mark.parametrize("op", ["exp", "tanh", "sigmoid"])
def test_float32_non_finite_and_extreme_values_are_numpys(op):
    x = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, 1e-45, -1e-45, 1e-38, 9.0, -9.0, 88.72,
                  88.73, -87.4, -103.9, -104.0, 3e38, -3e38], np.float32)
    got = executable(op, x)(x)[0]
    with np.errstate(over="ignore"):
        want = NUMPY[op](x)
    np.testing.assert_array_max_ulp(got, want, maxulp=2)  # NaN == NaN, inf == inf, positionally
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))


def test_float32_tanh_is_odd():
    x = dense_float32_grid()
    got = executable("tanh", x)(x)[0]
    nonzero = x != 0  # the kernels' fastmath flags include nsz: the sign of a zero may not hold
    np.testing.assert_array_equal(np.signbit(got[nonzero]), np.signbit(x[nonzero]))
    np.testing.assert_array_equal(np.abs(got) <= 1, True)


@pytest.mark.parametrize("op", ["exp", "tanh", "sigmoid"])
def test_float64_keeps_libm(op):
    x = np.linspace(-20, 20, 4001)
    compiled = executable(op, x)
    assert f"{op}_float32" not in compiled.kernels[0].source
    np.testing.assert_allclose(compiled(x)[0], NUMPY[op](x), rtol=1e-15, atol=0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
@pytest.mark.parametrize("op", ["exp", "tanh", "sigmoid"])
def test_float32_loop_vectorises(op):
    """The kernel multiplies whole vector registers (libm's scalar expf/tanhf call kept the loop
    scalar: vector registers only moved data) and calls no libm function."""
    x = np.linspace(-3, 3, 4096, dtype=np.float32)
    compiled = executable(op, x)
    kernel = compiled.kernels[0]
    assert f"{op}_float32(" in kernel.source
    np.testing.assert_allclose(compiled(x)[0], NUMPY[op](x), rtol=1e-6, atol=0)
    dispatcher = kernel.functions[0]
    assembly = "\n".join(dispatcher.inspect_asm(signature) for signature in dispatcher.signatures)
    assert "tanhf" not in assembly and "expf" not in assembly
    assert re.search(r"\bv(mul|fmadd\w*)ps\b[^\n]*%[yz]mm", assembly), f"the {op} loop did not vectorise"
