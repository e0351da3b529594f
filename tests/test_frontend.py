"""Tracing frontend: Tensor operators and methods, jit caching/retracing, pytrees, errors."""
import logging

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F

REF = "reference"
rng = np.random.default_rng(1)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(1)


def run(fn, *args):
    return gc.jit(fn, backend=REF)(*args)


def test_operators_match_numpy():
    x = rng.standard_normal((3, 4)).astype(np.float32)
    y = rng.standard_normal((4,)).astype(np.float32)
    got = run(lambda x, y: (x + y, x - 1, 2 * x, x / (y * y + 1), -x, x ** 2, abs(x),
                            x @ x.T, 1 - x, (x > y), x <= 0.5), x, y)
    expected = (x + y, x - 1, 2 * x, x / (y * y + 1), -x, x ** 2, abs(x), x @ x.T, 1 - x,
                x > y, x <= 0.5)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-6)
        assert g.dtype == e.dtype


def test_methods_and_indexing_match_numpy():
    x = rng.standard_normal((2, 3, 4))
    cases = {
        "sum": (lambda t: t.sum(), lambda a: a.sum()),
        "sum_axis": (lambda t: t.sum(axis=-1, keepdims=True), lambda a: a.sum(-1, keepdims=True)),
        "mean": (lambda t: t.mean((0, 2)), lambda a: a.mean((0, 2))),
        "max": (lambda t: t.max(1).values, lambda a: a.max(1)),
        "argmax": (lambda t: t.argmax(2), lambda a: a.argmax(2)),
        "reshape": (lambda t: t.reshape(4, -1), lambda a: a.reshape(4, -1)),
        "transpose": (lambda t: t.transpose(0, 2), lambda a: a.swapaxes(0, 2)),
        "permute": (lambda t: t.permute(2, 0, 1), lambda a: a.transpose(2, 0, 1)),
        "flatten": (lambda t: t.flatten(1), lambda a: a.reshape(2, 12)),
        "T": (lambda t: t.T, lambda a: a.T),
        "slice": (lambda t: t[1, ::2, 1:3], lambda a: a[1, ::2, 1:3]),
        "negative": (lambda t: t[-1, -2:], lambda a: a[-1, -2:]),
        "newaxis": (lambda t: t[None, ..., 0], lambda a: a[None, ..., 0]),
        "unsqueeze": (lambda t: t.unsqueeze(1), lambda a: a[:, None]),
    }
    for name, (traced, direct) in cases.items():
        np.testing.assert_allclose(run(traced, x), direct(x), rtol=1e-12, err_msg=name)


def test_functions_match_numpy():
    x = rng.standard_normal((3, 5))
    np.testing.assert_allclose(run(lambda t: F.softmax(t, 1), x),
                               np.exp(x) / np.exp(x).sum(1, keepdims=True), rtol=1e-12)
    np.testing.assert_allclose(run(lambda t: F.log_softmax(t, 1), x),
                               x - np.log(np.exp(x).sum(1, keepdims=True)), rtol=1e-12)
    np.testing.assert_allclose(run(lambda t: gc.logsumexp(t * 1000, 1), x),
                               (x * 1000).max(1), rtol=1e-6)  # stable: no overflow
    np.testing.assert_allclose(run(lambda t: gc.concatenate([t, t * 2], 1), x),
                               np.concatenate([x, 2 * x], 1))
    np.testing.assert_allclose(run(lambda t: gc.stack([t, t], 0), x), np.stack([x, x]))


def test_jit_caches_per_signature_and_logs_retraces(caplog):
    calls = []

    def f(x):
        calls.append(x.shape)
        return x * 2

    jf = gc.jit(f, backend=REF)
    jf(np.ones((2, 3)))
    jf(np.ones((2, 3)) * 5)
    assert calls == [(2, 3)]
    with caplog.at_level(logging.WARNING, logger="graphc"):
        out = jf(np.ones((4, 3)))
    assert calls == [(2, 3), (4, 3)] and out.shape == (4, 3)
    assert "retracing f" in caplog.text and "x: f64[2,3] -> f64[4,3]" in caplog.text


def test_pytree_arguments_and_results():
    params = {"w": np.ones((2, 2)), "b": [np.zeros(2), np.ones(2)]}
    out = run(lambda p, x: {"y": x @ p["w"] + p["b"][1], "z": (p["b"][0],)}, params, np.eye(2))
    np.testing.assert_allclose(out["y"], np.ones((2, 2)) + 1)
    assert isinstance(out["z"], tuple)


def test_keyword_arguments(caplog):
    """Keyword arguments, keyword-only ones too, as in JAX: each call pattern is traced once;
    gradients' argnums count the positional arguments; a module's forward takes them."""
    f = gc.jit(lambda x, y=None, *, scale=1.0: (x * 2 if y is None else x + y) * scale)
    x, ones = np.arange(3, dtype=np.float32), np.ones(3, np.float32)
    np.testing.assert_allclose(f(x, y=ones), x + 1)
    np.testing.assert_allclose(f(y=ones, x=x), x + 1)
    np.testing.assert_allclose(f(x, scale=np.float32(3)), 6 * x)
    np.testing.assert_allclose(f(x, scale=np.float32(4)), 8 * x)
    with caplog.at_level(logging.WARNING, logger="graphc"):
        caplog.clear()
        np.testing.assert_allclose(f(x, y=2 * ones), x + 2)  # compiled already: no retrace
        assert "retracing" not in caplog.text
        f(np.ones(4, np.float32), y=np.ones(4, np.float32))
        assert "y: f32[3] -> f32[4]" in caplog.text
    with pytest.raises(TypeError, match="unexpected keyword argument 'z'"):
        f(x, z=x)
    loss = lambda w, x, *, target: ((w * x - target) ** 2).sum()  # noqa: E731
    value, (dw, dx) = gc.value_and_grad(loss, argnums=(0, 1))(ones, x, target=x)
    np.testing.assert_allclose(value, 0.0)
    np.testing.assert_allclose(dw, 0.0)
    np.testing.assert_allclose(gc.grad(loss)(2 * ones, x, target=x), 2 * x * x)
    layer = gc.nn.Linear(3, 2)
    np.testing.assert_allclose(gc.jit(layer)(x=x[None]), gc.jit(layer)(x[None]))


def test_argnums_never_names_a_keyword_argument():
    """argnums counted the keyword arguments too, in the order the caller wrote them: grad(f)
    (b=b, a=x) gave d/db, and argnums=1 gave d/db or d/dc as the keywords were ordered. As in
    JAX, the differentiated arguments are passed positionally, or the call is refused."""
    x = np.array([1.0, 2.0], np.float32)

    def g(a, b=1.0, c=1.0):
        return (a * b * c * c).sum()
    np.testing.assert_allclose(gc.grad(g, argnums=1)(x, np.float32(2), c=np.float32(3)), 27.0)
    for call in (lambda: gc.grad(g)(b=np.float32(3), a=x),
                 lambda: gc.grad(g, argnums=1)(x, c=np.float32(3), b=np.float32(2))):
        with pytest.raises(gc.GraphcError, match=r"argnums \(\d,\) counts the positional .*test_frontend"):
            call()


def test_negative_argnums_count_from_the_last_positional_argument():
    """As in torch.func.grad (graphc refused them): -1 is the last positional argument, also
    when more follow by keyword, and one before the first is refused."""
    x, y = np.array([1.0, 2.0]), np.array([3.0, 4.0])

    def f(a, b, c=1.0):
        return (a * b * b * c).sum()
    np.testing.assert_allclose(gc.grad(f, argnums=-1)(x, y), 2 * x * y)
    dx, dy = gc.grad(f, argnums=(0, -1))(x, y)
    np.testing.assert_allclose(dx, y * y)
    np.testing.assert_allclose(dy, 2 * x * y)
    np.testing.assert_allclose(gc.grad(f, argnums=-1)(x, y, c=2.0), 4 * x * y)
    np.testing.assert_allclose(gc.grad(f, argnums=-2)(x, y, c=2.0), 2 * y * y)
    with pytest.raises(gc.GraphcError, match=r"argnums \(-3,\) out of range for 2 arguments"):
        gc.grad(f, argnums=-3)(x, y)
    with pytest.raises(gc.GraphcError, match=r"argnums \(-3,\) counts the positional"):
        gc.grad(f, argnums=-3)(x, y, c=2.0)


def test_namedtuples_keep_their_class_in_arguments_results_and_gradients():
    """They came back as lists: p.w in the traced function failed, results lost their fields."""
    from collections import namedtuple
    Pair = namedtuple("Pair", "w b")
    p = Pair(np.full(3, 2.0, np.float32), np.ones(3, np.float32))
    out = gc.jit(lambda p: Pair(p.w * 2, p.b))(p)
    assert type(out) is Pair
    np.testing.assert_allclose(out.w, 4.0)
    grads = gc.grad(lambda p: (p.w * p.b).sum())(p)
    assert type(grads) is Pair
    np.testing.assert_allclose(grads.w, p.b)
    np.testing.assert_allclose(grads.b, p.w)
    carry, _ = gc.scan(lambda c, x: (Pair(c.w + x, c.b), None), p, np.ones((4, 3), np.float32))
    np.testing.assert_allclose(carry.w, 6.0)


@pytest.mark.parametrize("bad", [np.array([object(), 1], dtype=object), [[1, 2], [3]], "text",
                                 np.array(["a"])])
def test_wrong_kinds_of_array_get_a_clear_error(bad):
    with pytest.raises(gc.InputError, match="x"):
        run(lambda x: x * 2, bad)


def test_shape_error_points_at_the_users_line():
    def model(x, w):
        return x @ w  # the line the error must name

    line = model.__code__.co_firstlineno + 1
    with pytest.raises(gc.ShapeError) as info:
        run(model, np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))
    message = str(info.value)
    assert "matmul" in message and "(2, 3)" in message and "(4, 5)" in message
    assert f"test_frontend.py:{line}" in message
    frames = [f.filename for f in __import__("traceback").extract_tb(info.value.__traceback__)]
    internal = [f for f in frames if "/tests/" not in f]
    assert internal == [frames[-2]] and internal[0].endswith("api.py"), frames  # only the re-raise


def test_python_control_flow_on_tensors_is_refused():
    with pytest.raises(gc.GraphcError, match="control flow"):
        run(lambda x: x if x.sum() > 0 else -x, np.ones(2))


def test_python_scalars_take_the_tensor_dtype():
    out = run(lambda x: x * 0.5 + 1, np.ones(3, np.float32))
    assert out.dtype == np.float32
    # A float scalar raises an integer tensor to float32, as in PyTorch.
    out = run(lambda x: x * 0.5, np.ones(3, np.int64))
    assert out.dtype == np.float32 and np.array_equal(out, [0.5, 0.5, 0.5])


def test_dropout_is_reproducible_and_scales():
    x = np.ones((200, 50), np.float32)
    f = gc.jit(lambda x: F.dropout(x, 0.25), backend=REF)
    gc.manual_seed(3)
    a, b = f(x), f(x)
    gc.manual_seed(3)
    a2 = f(x)
    np.testing.assert_array_equal(a, a2)
    assert not np.array_equal(a, b)  # the counter advances per call
    assert set(np.unique(a)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((a == 0).mean() - 0.25) < 0.02


def test_trace_returns_a_verified_graph():
    g = gc.trace(lambda x, w: F.relu(x @ w).sum(), np.ones((2, 3)), np.ones((3, 4)))
    g.verify()
    assert [i.name for i in g.inputs] == ["x", "w"]
    assert [n.op for n in g.nodes] == ["matmul", "relu", "sum"]


def test_python_float_lists_are_float32_and_dict_keys_of_several_types_work():
    """A list of Python floats became float64 (a float Python number float32, as in PyTorch,
    where torch.tensor([1.0, 2.0]) is float32 too); a dict with keys of several types failed
    with a bare TypeError from sorting them."""
    f = gc.jit(lambda a: a * 2)
    assert f([1.0, 2.0]).dtype == np.float32 and f([[1.0], [2.0]]).dtype == np.float32
    assert f([np.float64(1.0), 2.0]).dtype == np.float64 and f([1, 2]).dtype == np.int64
    np.testing.assert_allclose(gc.jit(lambda d: d[1] + d["a"])({1: np.ones(2), "a": np.ones(2)}), 2.0)
