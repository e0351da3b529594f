"""Random primitives: the counter-based generator's bits, determinism, statistics and errors."""
import warnings

import numpy as np
import pytest

from graphc.ir import AttributeSchemaError, Builder, DTypeError, ShapeError, TensorType
from graphc.ir.ops import random as rng_ops
from graphc.ir.registry import get
from opcheck import run_op

MASK = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15


def python_mix(z: int) -> int:
    """splitmix64's finaliser on Python ints: an oracle independent of NumPy's uint64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def python_bits(seed: int, counter: int, stream: int, index: int) -> int:
    key64 = python_mix((python_mix((seed * GOLDEN + stream) & MASK) + counter) & MASK)
    return python_mix((key64 + (index + 1) * GOLDEN) & MASK)


def key(seed, counter):
    return np.array([seed, counter], np.int64)


def uniform(seed, counter, shape, dtype="float64", stream=0):
    return run_op("random_uniform", [key(seed, counter)], shape=shape, dtype=dtype, stream=stream)


def test_mix_is_splitmix64():
    # The first output of splitmix64 seeded with 0 is the published 0xE220A8397B1DCDAF.
    with np.errstate(over="ignore"):
        assert rng_ops.mix(np.uint64(GOLDEN)) == 0xE220A8397B1DCDAF
    assert python_mix(GOLDEN) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("seed,counter,stream", [(0, 0, 0), (42, 7, 3), (-1, 2**62, 1), (-(2**63), -5, 0)])
def test_uniform_bits_match_the_formula_on_python_ints(seed, counter, stream):
    out = uniform(seed, counter, (2, 3), stream=stream)
    expected = [(python_bits(seed & MASK, counter & MASK, stream, i) >> 11) * 2.0**-53 for i in range(6)]
    np.testing.assert_array_equal(out.ravel(), expected)
    out32 = uniform(seed, counter, (6,), dtype="float32", stream=stream)
    expected32 = [(python_bits(seed & MASK, counter & MASK, stream, i) >> 40) * 2.0**-24 for i in range(6)]
    np.testing.assert_array_equal(out32, np.array(expected32, np.float32))


def test_deterministic_and_sensitive_to_seed_counter_stream_and_index():
    base = uniform(3, 10, (64,))
    np.testing.assert_array_equal(base, uniform(3, 10, (64,)))
    np.testing.assert_array_equal(base[:16], uniform(3, 10, (4, 4)).ravel())  # flat index, C order
    assert len(np.unique(base)) == base.size
    for other in (uniform(4, 10, (64,)), uniform(3, 11, (64,)), uniform(3, 10, (64,), stream=1)):
        assert np.mean(other == base) < 0.05


def test_uniform_dtype_shape_range_and_resolution():
    for dtype, bits in (("float32", 24), ("float64", 53)):
        out = uniform(5, 0, (50, 40), dtype=dtype)
        assert out.dtype == np.dtype(dtype) and out.shape == (50, 40)
        assert out.min() >= 0.0 and out.max() < 1.0
        scaled = out.astype(np.float64) * 2.0**bits
        np.testing.assert_array_equal(scaled, np.floor(scaled))  # exact multiples of 2**-bits
    # float32 takes the top 24 of the same bits the float64 path takes the top 53 of
    np.testing.assert_array_equal(uniform(5, 0, (99,), "float32"),
                                  (np.floor(uniform(5, 0, (99,)) * 2.0**24) * 2.0**-24).astype(np.float32))
    assert uniform(5, 0, (0, 3)).shape == (0, 3) and uniform(5, 0, ()).shape == ()


def test_uniform_statistics():
    n = 200_000
    x = uniform(123, 4, (n,))
    assert abs(x.mean() - 0.5) < 5 * np.sqrt(1 / 12 / n)
    assert abs(x.var() - 1 / 12) < 5 * np.sqrt(1 / 180 / n)  # var of (x-1/2)^2 is 1/180
    counts = np.bincount((x * 10).astype(int), minlength=10)
    assert np.all(np.abs(counts - n / 10) < 5 * np.sqrt(n / 10))
    assert abs(np.corrcoef(x[:-1], x[1:])[0, 1]) < 5 / np.sqrt(n)  # neighbours look independent


@pytest.mark.parametrize("p", [0.0, 0.01, 0.3, 0.5, 1.0])
def test_bernoulli_rate_and_bits(p):
    n = 100_000
    out = run_op("random_bernoulli", [key(9, 1)], p=p, shape=(n,), stream=2)
    assert out.dtype == np.bool_
    assert abs(out.mean() - p) <= 5 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_array_equal(out, uniform(9, 1, (n,), stream=2) < p)


def test_reference_path_suppresses_overflow_warnings():
    with pytest.warns(RuntimeWarning, match="overflow"):  # the scalar formula alone does warn...
        rng_ops.key_bits(np.uint64(MASK), np.uint64(MASK), np.uint64(0))
    with warnings.catch_warnings():  # ...the reference implementation must not
        warnings.simplefilter("error")
        uniform(-1, -1, (3,))


def test_no_cotangent_for_the_key():
    b = Builder()
    k = b.add_input(TensorType((2,), "int64"), "key")
    out = b.random_uniform(k, shape=(3,))
    assert get("random_uniform").vjp(b, out, k, out=out, shape=(3,), dtype="float32", stream=0) == (None,)


def test_errors():
    with pytest.raises(DTypeError, match=r"random_uniform: key must be int64\[2\] \(seed, counter\), got i32\[2\]"):
        run_op("random_uniform", [np.zeros(2, np.int32)], shape=(3,))
    with pytest.raises(ShapeError, match=r"random_bernoulli: key must be int64\[2\] \(seed, counter\), got i64\[3\]"):
        run_op("random_bernoulli", [np.zeros(3, np.int64)], p=0.5, shape=(3,))
    with pytest.raises(DTypeError, match=r"random_uniform: dtype must be float32 or float64, got int32"):
        run_op("random_uniform", [key(0, 0)], shape=(3,), dtype="int32")
    with pytest.raises(AttributeSchemaError, match=r"random_bernoulli: p must lie in \[0, 1\], got 1.5"):
        run_op("random_bernoulli", [key(0, 0)], p=1.5, shape=(3,))
    with pytest.raises(AttributeSchemaError, match=r"random_uniform: shape \(2, -1\) has a negative dimension"):
        run_op("random_uniform", [key(0, 0)], shape=(2, -1))
    with pytest.raises(AttributeSchemaError, match=r"random_uniform: stream must lie in \[0, 2\*\*63\)"):
        run_op("random_uniform", [key(0, 0)], shape=(2,), stream=-1)


def test_numba_kernel_from_the_shared_source_gives_the_same_bits():
    numba = pytest.importorskip("numba")
    namespace = {"np": np, "numba": numba}
    exec(rng_ops.rng_source("numba.njit(inline='always')"), namespace)
    exec(KERNEL, namespace)
    seed_counter = key(-77, 12)
    out32, out64, coin = np.empty(40, np.float32), np.empty(40), np.empty(40, np.bool_)
    namespace["kernel"](seed_counter, np.uint64(5), out32, out64, coin, 0.25)
    np.testing.assert_array_equal(out32, run_op("random_uniform", [seed_counter], shape=(40,), stream=5))
    np.testing.assert_array_equal(out64, uniform(-77, 12, (40,), stream=5))
    np.testing.assert_array_equal(
        coin, run_op("random_bernoulli", [seed_counter], p=0.25, shape=(40,), stream=5))


KERNEL = """
@numba.njit
def kernel(key, stream, out32, out64, coin, p):
    key64 = key_bits(np.uint64(key[0]), np.uint64(key[1]), stream)
    for i in range(out32.size):
        bits = element_bits(key64, np.uint64(i))
        out32[i] = uniform_float32(bits)
        out64[i] = uniform_float64(bits)
        coin[i] = bernoulli(bits, p)
"""


@pytest.mark.parametrize("op, attrs", [("random_uniform", {"dtype": "float32"}),
                                       ("random_uniform", {"dtype": "float64"}),
                                       ("random_bernoulli", {"p": 0.5})])
def test_a_one_element_random_value_keeps_its_shape_on_the_reference(op, attrs):
    """np.float32(array) of one element is a scalar before NumPy 2 (found on the numpy floor)."""
    from graphc.ir.registry import get
    key = np.array([3, 4], np.int64)
    for shape in [(1,), (1, 1)]:
        assert get(op).impl(key, shape=shape, stream=0, **attrs).shape == shape


def test_threads_drawing_keys_at_once_each_get_their_own():
    """The counter was read, then advanced, with no lock: two threads could draw one key (two
    identical dropout masks) and skip another."""
    import sys
    import threading

    from graphc import random as gc_random

    keys, interval = [], sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
    try:
        def draw():
            keys.extend(tuple(gc_random.next_key()) for _ in range(2000))
        threads = [threading.Thread(target=draw) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert len(set(keys)) == len(keys) == 8000


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_traced_rand_randn_and_randint_draw_pytorchs_distributions(backend):
    """torch.randn_like (a VAE's noise), rand and randint inside traced code: there were only
    gc.uniform and gc.bernoulli."""
    import graphc as gc
    x = np.zeros((400, 500), np.float32)
    draw = gc.jit(lambda t: (gc.randn_like(t), gc.rand(1000), gc.randint(3, 7, (4000,)),
                             gc.randint(5, size=(2,)), gc.randn(3, dtype="float64")), backend=backend)
    gc.manual_seed(0)
    normal, uniform, ints, small, wide = draw(x)
    assert normal.dtype == np.float32 and wide.dtype == np.float64
    assert abs(normal.mean()) < 0.01 and abs(normal.std() - 1) < 0.01
    assert abs((np.abs(normal) < 1).mean() - 0.6827) < 0.01  # the normal's mass within 1 sd
    assert 0 <= uniform.min() and uniform.max() < 1
    assert ints.dtype == np.int64 and set(np.unique(ints)) == {3, 4, 5, 6}
    assert small.shape == (2,) and ((0 <= small) & (small < 5)).all()
    keywords = gc.jit(lambda t: (gc.randint(low=2, high=5, size=(500,)), gc.randint(high=3, size=(500,))),
                      backend=backend)(x)
    assert set(np.unique(keywords[0])) == {2, 3, 4} and set(np.unique(keywords[1])) == {0, 1, 2}
    gc.manual_seed(0)
    np.testing.assert_array_equal(draw(x)[0], normal)  # replayed from the seed


def test_the_reparametrisation_trick_differentiates_through_randn_like():
    import graphc as gc
    mu, log_std = np.zeros(1000, np.float32), np.full(1000, -1.0, np.float32)

    def loss(m, s):
        z = m + s.exp() * gc.randn_like(s)
        return (z * z).mean()  # E = m^2 + exp(2s): d/ds = 2 exp(2s) on average

    gc.manual_seed(1)
    _, grad_s = gc.grad(loss, argnums=(0, 1), backend="reference")(mu, log_std)
    assert abs(grad_s.sum() - 2 * np.exp(-2.0)) < 0.02
    with pytest.raises(gc.GraphcError, match="low < high"):
        gc.jit(lambda t: gc.randint(5, 5, (2,)) + t)(np.zeros(2, np.int64))
