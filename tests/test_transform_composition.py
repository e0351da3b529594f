"""jit, grad, value_and_grad and compile compose as in JAX: a wrapper means the same thing
whatever it wraps, and the outermost wrapper alone compiles, on its own backend."""
import itertools

import numpy as np
import pytest

import graphc as gc
from graphc import nn
from graphc.ir.errors import GraphcError

REF = "reference"


def f(x):
    return x.exp() * x  # f^(k)(x) = exp(x) (x + k)


def derivative(k, x):
    return np.exp(x) * (x + k)


# What each wrapper does to a function whose output is a tree of derivative orders of f.
def _apply(wrapper, orders):
    if wrapper == "jit":
        return orders
    if not isinstance(orders, int):
        return None  # grad needs one scalar output: an error, in JAX too
    return orders + 1 if wrapper == "grad" else (orders, orders + 1)


def _expected(wrappers, x):
    orders = 0
    for w in reversed(wrappers):  # innermost first
        orders = _apply(w, orders)
        if orders is None:
            return None
    return (tuple(derivative(k, x) for k in orders) if isinstance(orders, tuple)
            else derivative(orders, x))


def _wrap(wrappers, fn):
    """wrappers[0] is outermost; only it gets an explicit backend: inner ones never compile."""
    staged = []
    for depth, w in enumerate(reversed(wrappers)):
        backend = REF if depth == len(wrappers) - 1 else None
        fn = {"jit": gc.jit, "grad": gc.grad, "value_and_grad": gc.value_and_grad}[w](
            fn, backend=backend)
        staged.append(fn)
    return fn, staged


WRAPPERS = ("jit", "grad", "value_and_grad")
COMPOSITIONS = [c for n in (2, 3) for c in itertools.product(WRAPPERS, repeat=n)]


@pytest.mark.parametrize("wrappers", COMPOSITIONS, ids="-".join)
def test_composition_means_the_same_as_the_math(wrappers):
    x = np.asarray(0.3, np.float64)
    fn, staged = _wrap(wrappers, f)
    expected = _expected(wrappers, float(x))
    if expected is None:
        with pytest.raises(GraphcError, match="scalar"):
            fn(x)
        return
    result = fn(x)
    if isinstance(expected, tuple):
        assert isinstance(result, tuple) and len(result) == 2
        for r, e in zip(result, expected):
            np.testing.assert_allclose(r, e, rtol=1e-12)
    else:
        np.testing.assert_allclose(result, expected, rtol=1e-12)
    outer, inner = staged[-1], staged[:-1]
    (entry,) = outer._cache.values()
    assert type(entry.executable).__module__ == "graphc.backends.reference"
    assert all(not s._cache for s in inner), "an inner wrapper compiled a graph of its own"


def test_wrapping_a_jitted_function_keeps_the_outer_wrappers_own_state():
    inner = gc.jit(f, backend="numba-cpu")
    outer = gc.grad(inner, backend=REF)
    assert outer.fn is inner and inner.fn is f
    assert outer.backend == REF and inner.backend == "numba-cpu"
    assert outer.stage is not None and inner.stage is None
    assert outer.__name__ == "f" and outer.__wrapped__ is inner


def loss_with_aux(w, b, x):
    pred = x @ w + b
    return (pred * pred).mean(), pred.sum()


def _grads_reference(w, b, x):
    pred = x @ w + b
    dpred = 2 * pred / pred.size
    return (pred * pred).mean(), pred.sum(), x.T @ dpred, dpred.sum()


@pytest.mark.parametrize("argnums", [0, 1, (0, 1), (1, 0)])
def test_argnums_and_has_aux_through_jit(argnums):
    rng = np.random.default_rng(0)
    w, b, x = rng.standard_normal(3), rng.standard_normal(()), rng.standard_normal((4, 3))
    loss, aux, dw, db = _grads_reference(w, b, x)
    by_arg = {0: dw, 1: db}
    expected = by_arg[argnums] if isinstance(argnums, int) else tuple(by_arg[a] for a in argnums)

    def check(grads):
        for g, e in zip(*(((grads,), (expected,)) if isinstance(argnums, int) else (grads, expected))):
            np.testing.assert_allclose(g, e, rtol=1e-12)

    for fn in (loss_with_aux, gc.jit(loss_with_aux)):  # (grads, aux), as in JAX
        grads, got_aux = gc.grad(fn, argnums, has_aux=True, backend=REF)(w, b, x)
        check(grads)
        np.testing.assert_allclose(got_aux, aux, rtol=1e-12)
    (value, got_aux), grads = gc.jit(gc.value_and_grad(loss_with_aux, argnums, has_aux=True),
                                     backend=REF)(w, b, x)
    check(grads)
    np.testing.assert_allclose((value, got_aux), (loss, aux), rtol=1e-12)
    (value, got_aux), grads = gc.value_and_grad(gc.jit(gc.jit(loss_with_aux)), argnums,
                                                has_aux=True, backend=REF)(w, b, x)
    check(grads)
    np.testing.assert_allclose((value, got_aux), (loss, aux), rtol=1e-12)


def test_value_and_grad_of_a_jitted_gradient():
    """value_and_grad(jit(h)) where h is itself a gradient's sum."""
    x = np.array([0.1, -0.4, 0.7])
    h = gc.jit(lambda v: gc.grad(lambda u: (u.exp() * u).sum())(v).sum())
    value, grad = gc.value_and_grad(h, backend=REF)(x)
    np.testing.assert_allclose(value, derivative(1, x).sum(), rtol=1e-12)
    np.testing.assert_allclose(grad, derivative(2, x), rtol=1e-12)


def test_inner_jit_on_constants_inside_a_trace_is_staged_not_run():
    calls = []

    def g(c):
        calls.append(1)
        return c * 2.0

    inner = gc.jit(g)
    outer = gc.jit(lambda x: x + inner(np.ones(3)), backend=REF)
    np.testing.assert_allclose(outer(np.zeros(3)), np.full(3, 2.0))
    assert not inner._cache and calls == [1]


@pytest.mark.parametrize("outer_backend,inner_backend", [("numba-cpu", REF), (REF, "numba-cpu")])
def test_the_outer_backend_runs_the_composition(outer_backend, inner_backend):
    x = np.array([0.2, 0.5], np.float64)
    fn = gc.jit(gc.grad(gc.jit(lambda v: (v.exp() * v).sum(), backend=inner_backend)),
                backend=outer_backend)
    np.testing.assert_allclose(fn(x), derivative(1, x), rtol=1e-6)
    (entry,) = fn._cache.values()
    module = type(entry.executable).__module__
    assert module.startswith("graphc.backends." + outer_backend.replace("-", "_")), module


def test_compiled_model_composes_with_grad_and_jit():
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    compiled = gc.compile(model, x, backend=REF)
    np.testing.assert_allclose(gc.jit(compiled, backend=REF)(x), compiled(x), rtol=1e-6)
    expected = gc.grad(lambda v: model(v).sum(), backend=REF)(x)
    got = gc.grad(lambda v: compiled(v).sum(), backend=REF)(x)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert model.training, "compile traced in eval mode and left the model's mode as it was"


@pytest.mark.parametrize("backend", [REF, "numba-cpu"])
def test_a_transform_inside_a_trace_may_close_over_the_traces_tensors(backend):
    """grad, value_and_grad and jit of a function reading the outer function's tensors from
    its closure (JAX converts the closure): those are constants of the inner function, inputs
    of what it is inlined into. A KeyError before."""
    def outer(w, x):
        g = gc.grad(lambda w: ((w * x) ** 2).sum())(w)
        value, g2 = gc.value_and_grad(lambda w: (gc.tanh(w * x) * x).sum())(w)
        shifted = gc.jit(lambda a: a * x + 1.0)(w)
        curvature = gc.grad(lambda w: gc.grad(lambda v: ((v * x) ** 3).sum())(w).sum())(w)
        return g, value, g2, shifted, curvature

    w, x = np.array([1.0, 0.5, -2.0]), np.array([0.0, 1.0, 2.0])
    got = gc.jit(outer, backend=backend)(w, x)
    want = (2 * w * x ** 2, (np.tanh(w * x) * x).sum(), x ** 2 * (1 - np.tanh(w * x) ** 2), w * x + 1,
            6 * w * x ** 3)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-12)


def test_a_tensor_kept_from_an_earlier_trace_is_refused_with_a_clear_error():
    kept = []
    gc.jit(lambda a: kept.append(a) or a * 2, backend=REF)(np.ones(3))
    with pytest.raises(GraphcError, match="reads 1 tensor.* of another traced function.*as an argument"):
        gc.jit(lambda a: a + kept[0], backend=REF)(np.ones(3))
    with pytest.raises(GraphcError, match="of another traced function"):
        gc.trace(lambda a: a + kept[0], np.ones(3))
