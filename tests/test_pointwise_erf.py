"""The numba-cpu backend's vectorisable float32 erf (backends/kernels/pointwise.py, used by exact
GELU): its accuracy against math.erf over the whole float32 range, its non-finite values and
symmetry, float64 keeping libm, and that the loop it is in vectorises (math.erf is a libm call,
which keeps its loop scalar)."""
import math
import platform
import re

import numpy as np
import pytest

import graphc as gc
from graphc import nn
from graphc.backends.reference import evaluate
from graphc.lowering import compile_graph
from test_transcendentals import LARGEST, SMALLEST_SUBNORMAL, executable, ulp_error

MAX_ULP = 1.3  # 1.135 measured with fused multiply-adds (1.299 without, at x = 0.92717)
exact_erf = np.vectorize(math.erf, otypes=[np.float64])


def dense_float32_grid() -> np.ndarray:
    """Both signs of: subnormals and tiny values (erf(x) ~ 1.128 x), the polynomial's range and
    the switch to 1 - e**Q at 475/512 (ten thousand consecutive floats on each side), the tail
    up to where erf rounds to 1 (3.92) and past the clamp at 4, huge values, the largest float."""
    tiny = np.geomspace(SMALLEST_SUBNORMAL, 1e-3, 20_000).astype(np.float32)
    edge = np.nextafter(np.float32(0.927734375), np.float32(0))
    switch = edge.view(np.int32) + np.arange(-10_000, 10_000, dtype=np.int32)
    body = np.linspace(0, 5, 500_001, dtype=np.float32)
    huge = np.geomspace(5, LARGEST, 1000).astype(np.float32)
    half = np.concatenate([tiny, switch.view(np.float32), body, huge, [LARGEST]])
    return np.concatenate([half, -half, [0.0, -0.0]]).astype(np.float32)


def test_float32_is_within_a_few_ulp_of_math_erf():
    x = dense_float32_grid()
    got = executable("erf", x)(x)[0]
    assert got.dtype == np.float32
    error = ulp_error(got, exact_erf(x.astype(np.float64)))
    worst = np.argmax(error)
    assert error.max() <= MAX_ULP, f"max {error.max():.3f} ulp at x={x[worst]!r}"


def test_float32_non_finite_and_extreme_values():
    x = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, SMALLEST_SUBNORMAL, -SMALLEST_SUBNORMAL,
                  1e-38, 3.9, 3.92, 4.0, -4.0, 1e30, -LARGEST], np.float32)
    got = executable("erf", x)(x)[0]
    want = np.array([math.erf(v) if not math.isnan(v) else v for v in x.astype(np.float64)])
    np.testing.assert_array_max_ulp(got, want.astype(np.float32), maxulp=1)  # NaN == NaN
    np.testing.assert_array_equal(got[:2], [1.0, -1.0])


def test_float32_is_odd_and_at_most_one():
    x = dense_float32_grid()
    got = executable("erf", x)(x)[0]
    np.testing.assert_array_equal(got[x < 0], -executable("erf", -x[x < 0])(-x[x < 0])[0])
    np.testing.assert_array_equal(np.signbit(got[x != 0]), np.signbit(x[x != 0]))
    assert np.all(np.abs(got) <= 1)


def test_float64_keeps_libm():
    x = np.linspace(-6, 6, 4001)
    compiled = executable("erf", x)
    assert "erf_float32" not in compiled.kernels[0].source
    np.testing.assert_allclose(compiled(x)[0], exact_erf(x), rtol=1e-15, atol=0)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="reads x86 assembly")
def test_float32_loop_vectorises():
    """Whole vector registers are multiplied, and erf_float32 is inlined (a call, to libm or to
    the helper, would keep the loop scalar)."""
    x = np.linspace(-3, 3, 4096, dtype=np.float32)
    compiled = executable("erf", x)
    kernel = compiled.kernels[0]
    assert "erf_float32(" in kernel.source and "math.erf" not in kernel.source
    np.testing.assert_allclose(compiled(x)[0], exact_erf(x.astype(np.float64)), rtol=2e-7, atol=0)
    dispatcher = kernel.functions[0]
    assembly = "\n".join(dispatcher.inspect_asm(signature) for signature in dispatcher.signatures)
    loop_calls = re.findall(r"movabsq\s+\$(\S*erf_(?:far_)?float32\S*),", assembly)
    assert not loop_calls, f"the kernel calls {loop_calls} instead of inlining it"
    assert re.search(r"\bv(mul|fmadd\w*)ps\b[^\n]*%[yz]mm", assembly), "the erf loop did not vectorise"


def test_exact_gelu_forward_and_backward_use_it():
    """GELU(approximate='none') and its gradient run through erf_float32 in their fused
    kernels, matching the reference backend."""
    x = np.random.default_rng(0).normal(0, 2, (8, 16)).astype(np.float32)
    graph = gc.trace(gc.value_and_grad(lambda x: gc.sum(nn.functional.gelu(x) * x)), x)
    compiled = compile_graph(graph, "numba-cpu")
    sources = "\n".join(kernel.source for kernel in compiled.kernels)
    assert "erf_float32(" in sources and "math.erf" not in sources
    for got, want in zip(compiled(x), evaluate(graph, [x])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
