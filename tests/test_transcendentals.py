"""The numba-cpu backend's vectorisable float32 tanh (backends/kernels/pointwise.py): its
accuracy over every float32 range that matters, its non-finite values, and that the loop it is
in vectorises (the reason it exists: a libm tanhf call keeps the loop scalar)."""
import platform

import numpy as np
import pytest

from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph

SMALLEST_SUBNORMAL = float(np.finfo(np.float32).smallest_subnormal)


def tanh_executable(x: np.ndarray, dtype: str = "float32"):
    b = Builder(f"tanh_{dtype}")
    b.add_output("y", b.tanh(b.add_input(TensorType.of(x), "x")))
    return compile_graph(b.graph.verify(), "numba-cpu")


def ulp_error(got: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """|got - exact| in units of the float32 spacing at `exact` (float64 values)."""
    spacing = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    return np.abs(got.astype(np.float64) - exact) / np.maximum(spacing, SMALLEST_SUBNORMAL)


def dense_float32_grid() -> np.ndarray:
    """Every float32 range tanh's approximation treats apart: subnormals, tiny, the polynomial
    (|x| < 0.625) and its edge, the exponential, saturation (|x| > 9.01), both signs, extremes."""
    tiny = np.geomspace(SMALLEST_SUBNORMAL, 1e-3, 20_000, dtype=np.float64).astype(np.float32)
    around_edge = np.float32(0.625) + np.arange(-2000, 2000, dtype=np.float32) * np.float32(6e-8)
    body = np.linspace(0, 12, 600_001, dtype=np.float32)
    huge = np.geomspace(12, np.finfo(np.float32).max, 1000).astype(np.float32)
    half = np.concatenate([tiny, around_edge, body, huge, [np.finfo(np.float32).max]])
    return np.concatenate([half, -half, [0.0, -0.0]]).astype(np.float32)


def test_float32_tanh_is_within_a_ulp_and_a_half_of_exact_like_numpy():
    x = dense_float32_grid()
    got = tanh_executable(x)(x)[0]
    exact = np.tanh(x.astype(np.float64))
    error = ulp_error(got, exact)
    numpy_error = ulp_error(np.tanh(x), exact)
    assert error.max() <= 1.5, f"max {error.max():.3f} ulp at x={x[np.argmax(error)]!r}"
    assert numpy_error.max() <= 1.5  # the same bound holds for NumPy's own float32 tanh
    nonzero = x != 0  # the kernels' fastmath flags include nsz: the sign of a zero may not hold
    np.testing.assert_array_equal(np.signbit(got[nonzero]), np.signbit(x[nonzero]))  # odd
    np.testing.assert_array_equal(np.abs(got) <= 1, True)


def test_float32_tanh_of_non_finite_values_is_numpys():
    x = np.array([np.inf, -np.inf, np.nan, -np.nan, 0.0, 1e-45, -1e-45, 9.0, -9.0, 3e38],
                 np.float32)
    got = tanh_executable(x)(x)[0]
    np.testing.assert_array_equal(got, np.tanh(x))  # NaN == NaN here, positionally


def test_float64_tanh_keeps_libm():
    x = np.linspace(-20, 20, 4001)
    executable = tanh_executable(x, "float64")
    assert "tanh_float32" not in executable.kernels[0].source
    np.testing.assert_allclose(executable(x)[0], np.tanh(x), rtol=1e-15, atol=0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
def test_float32_tanh_loop_vectorises():
    """The kernel divides whole vector registers (vdivps: the scalar loop libm's tanhf kept it
    in has vdivss) and calls no tanhf."""
    x = np.linspace(-3, 3, 4096, dtype=np.float32)
    executable = tanh_executable(x)
    kernel = executable.kernels[0]
    assert "tanh_float32(" in kernel.source
    np.testing.assert_allclose(executable(x)[0], np.tanh(x), rtol=0, atol=3e-7)
    dispatcher = kernel.functions[0]
    assembly = "\n".join(dispatcher.inspect_asm(signature) for signature in dispatcher.signatures)
    assert "tanhf" not in assembly
    assert "vdivps" in assembly, "the tanh kernel's loop did not vectorise"
