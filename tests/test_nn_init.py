"""graphc.nn.init: PyTorch's initialisers, in place on a module's arrays, from graphc's seeded
generator. Distributions are checked statistically (10^5 draws: the mean's standard error is
std/316, so tolerances of 4-5 standard errors), fans and gains against PyTorch's own."""
import math

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
from graphc.ir.errors import GraphcError

N = 100_000


def _weight(*shape):
    return np.zeros(shape, np.float32)


@pytest.mark.parametrize("shape", [(3, 4), (8, 3, 5, 5), (2, 6, 7), (5, 1)])
def test_fans_match_pytorch(shape):
    torch = pytest.importorskip("torch")
    expected = torch.nn.init._calculate_fan_in_and_fan_out(torch.zeros(shape))
    assert nn.init._calculate_fan_in_and_fan_out(_weight(*shape)) == expected


def test_gains_match_pytorch():
    torch = pytest.importorskip("torch")
    for name, param in [("linear", None), ("conv2d", None), ("sigmoid", None), ("tanh", None),
                        ("relu", None), ("leaky_relu", None), ("leaky_relu", 0.2),
                        ("selu", None)]:
        assert nn.init.calculate_gain(name, param) == pytest.approx(
            torch.nn.init.calculate_gain(name, param)), name
    with pytest.raises(GraphcError, match="unsupported nonlinearity"):
        nn.init.calculate_gain("swish")


def test_fans_need_two_dimensions():
    with pytest.raises(GraphcError, match="at least 2 dimensions"):
        nn.init.xavier_uniform_(_weight(5))


def _assert_uniform(x, low, high):
    assert x.min() >= low and x.max() <= high
    assert x.min() < low + 0.01 * (high - low) and x.max() > high - 0.01 * (high - low)
    assert abs(x.mean() - (low + high) / 2) < 5 * (high - low) / math.sqrt(12 * x.size)
    assert x.std() == pytest.approx((high - low) / math.sqrt(12), rel=0.02)


def _assert_normal(x, mean, std):
    assert abs(x.mean() - mean) < 5 * std / math.sqrt(x.size)
    assert x.std() == pytest.approx(std, rel=0.02)


def test_uniform_and_normal_write_in_place_and_return_the_array():
    w = _weight(N)
    assert nn.init.uniform_(w, -2.0, 3.0) is w
    _assert_uniform(w, -2.0, 3.0)
    assert nn.init.normal_(w, 1.5, 0.5) is w
    _assert_normal(w, 1.5, 0.5)
    assert w.dtype == np.float32


def test_constants():
    w = _weight(3, 2)
    assert nn.init.ones_(w) is w and (w == 1).all()
    nn.init.constant_(w, 0.25)
    assert (w == 0.25).all()
    nn.init.zeros_(w)
    assert (w == 0).all()


def test_xavier_bounds_and_std():
    fan_out, fan_in = 200, 500  # N elements
    w = _weight(fan_out, fan_in)
    nn.init.xavier_uniform_(w, gain=2.0)
    bound = 2.0 * math.sqrt(6.0 / (fan_in + fan_out))
    _assert_uniform(w, -bound, bound)
    nn.init.xavier_normal_(w)
    _assert_normal(w, 0.0, math.sqrt(2.0 / (fan_in + fan_out)))


@pytest.mark.parametrize("mode", ["fan_in", "fan_out"])
def test_kaiming(mode):
    w = _weight(400, 10, 5, 5)  # fan_in 250, fan_out 10000
    fan = 250 if mode == "fan_in" else 10000
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), mode=mode)  # nn.Linear's reset_parameters
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (1 + 5)) / math.sqrt(fan)
    _assert_uniform(w, -bound, bound)
    nn.init.kaiming_normal_(w, mode=mode, nonlinearity="relu")
    _assert_normal(w, 0.0, math.sqrt(2.0) / math.sqrt(fan))


def test_trunc_normal_against_the_truncated_distribution():
    scipy_stats = pytest.importorskip("scipy.stats")
    w = _weight(N)
    nn.init.trunc_normal_(w, mean=0.5, std=2.0, a=-1.0, b=1.5)
    assert w.min() >= -1.0 and w.max() <= 1.5
    truth = scipy_stats.truncnorm((-1.0 - 0.5) / 2.0, (1.5 - 0.5) / 2.0, loc=0.5, scale=2.0)
    _assert_normal(w, truth.mean(), truth.std())
    narrow = _weight(1000)
    nn.init.trunc_normal_(narrow, std=1.0, a=5.0, b=5.01)  # far in the tail: no rejection loop
    assert narrow.min() >= 5.0 and narrow.max() <= 5.01


@pytest.mark.parametrize("shape", [(6, 4), (3, 8), (4, 2, 3)])
def test_orthogonal(shape):
    w = _weight(*shape)
    nn.init.orthogonal_(w, gain=3.0)
    flat = w.reshape(shape[0], -1).astype(np.float64) / 3.0
    small = flat.T @ flat if flat.shape[0] >= flat.shape[1] else flat @ flat.T
    np.testing.assert_allclose(small, np.eye(len(small)), atol=1e-5)


@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (0, 3, 3), (4, 0)])
def test_orthogonal_of_an_empty_array_draws_nothing(shape):
    """A bare ZeroDivisionError before (PyTorch: a no-op)."""
    w = np.zeros(shape, np.float32)
    assert nn.init.orthogonal_(w) is w and w.shape == shape


def test_seeded_by_manual_seed():
    gc.manual_seed(7)
    a = nn.init.normal_(_weight(5))
    gc.manual_seed(7)
    b = nn.init.normal_(_weight(5))
    np.testing.assert_array_equal(a, b)
    g = np.random.default_rng(1)
    c = nn.init.normal_(_weight(5), generator=g)
    assert not np.array_equal(a, c)


def test_initialising_a_parameter_before_and_after_assignment():
    p = nn.init.ones_(nn.Parameter(np.zeros(3, np.float32)))
    m = nn.Module()
    m.p = p
    assert (m.p == 1).all()
    nn.init.constant_(m.p, 2.0)
    assert (m.state_dict()["p"] == 2).all()


def test_a_compiled_function_sees_the_new_values():
    net = nn.Linear(3, 1)
    f = gc.jit(net)
    x = np.ones((1, 3), np.float32)
    f(x)
    nn.init.constant_(net.weight, 1.0)
    nn.init.zeros_(net.bias)
    np.testing.assert_allclose(f(x), [[3.0]])


def test_refuses_integer_arrays_and_traced_tensors():
    with pytest.raises(GraphcError, match="floating-point"):
        nn.init.zeros_(np.zeros(3, np.int64))

    @gc.jit
    def f(x):
        nn.init.zeros_(x)
        return x
    with pytest.raises(GraphcError, match="Tensor of a trace"):
        f(np.ones(2, np.float32))
