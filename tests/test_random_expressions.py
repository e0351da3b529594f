"""Hypothesis-generated expressions: trace -> autodiff -> simplify -> reference backend equals a
direct NumPy evaluation of the same expression and its finite-difference gradient."""
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import graphc as gc

SHAPES = {"x": (3, 4), "y": (4,), "z": (3, 1)}
UNARY = {
    "tanh": (gc.tanh, np.tanh),
    "sigmoid": (gc.sigmoid, lambda a: 1 / (1 + np.exp(-a))),
    "square": (gc.square, np.square),
    "neg": (lambda t: -t, np.negative),
    "exp_tanh": (lambda t: gc.exp(gc.tanh(t)), lambda a: np.exp(np.tanh(a))),
    "softplus": (lambda t: gc.log1p(gc.exp(gc.tanh(t))), lambda a: np.log1p(np.exp(np.tanh(a)))),
}
BINARY = {
    "add": (lambda a, b: a + b, np.add),
    "sub": (lambda a, b: a - b, np.subtract),
    "mul": (lambda a, b: a * b, np.multiply),
    "div": (lambda a, b: a / (b * b + 1), lambda a, b: a / (b * b + 1)),
    "max": (gc.maximum, np.maximum),
}


def expressions():
    leaves = st.sampled_from(sorted(SHAPES)).map(lambda n: ("var", n))

    def extend(children):
        return st.one_of(
            st.tuples(st.just("unary"), st.sampled_from(sorted(UNARY)), children),
            st.tuples(st.just("binary"), st.sampled_from(sorted(BINARY)), children, children),
            st.tuples(st.just("sum"), st.sampled_from([0, 1]), children),
            st.tuples(st.just("matmul"), children),
        )
    return st.recursive(leaves, extend, max_leaves=8)


def evaluate(expr, env, lib):
    """Evaluate with graphc ops (lib=0) or NumPy (lib=1); shapes stay broadcast-compatible."""
    kind = expr[0]
    if kind == "var":
        return env[expr[1]]
    if kind == "unary":
        return UNARY[expr[1]][lib](evaluate(expr[2], env, lib))
    if kind == "binary":
        return BINARY[expr[1]][lib](evaluate(expr[2], env, lib), evaluate(expr[3], env, lib))
    if kind == "sum":
        # keepdims keeps every operand broadcastable against (3, 4)
        a = evaluate(expr[2], env, lib)
        return a.sum(axis=min(expr[1], a.ndim - 1), keepdims=True)
    a = evaluate(expr[1], env, lib)
    # a @ ones(k, k) keeps the shape: (.., k) @ (k, k); 1-D operands are promoted to 2-D
    a2 = a.reshape(1, -1) if a.ndim == 1 else a
    out = a2 @ (np.ones((a2.shape[-1],) * 2) * 0.5)
    return out.reshape(a.shape)


def loss(expr, lib):
    def f(x, y, z):
        out = evaluate(expr, {"x": x, "y": y, "z": z}, lib)
        return (out * 1.0).sum() if lib == 0 else np.sum(out)
    return f


@settings(max_examples=40, deadline=None)
@given(expressions(), st.integers(0, 1000))
def test_random_expression_value_and_gradient(expr, seed):
    rng = np.random.default_rng(seed)
    args = [rng.standard_normal(SHAPES[n]) for n in ("x", "y", "z")]
    value, grads = gc.value_and_grad(loss(expr, 0), argnums=(0, 1, 2), backend="reference")(*args)
    direct = loss(expr, 1)
    np.testing.assert_allclose(value, direct(*args), rtol=1e-10, atol=1e-10)
    eps = 1e-6
    for i, g in enumerate(grads):
        numeric = np.zeros_like(args[i])
        for idx in np.ndindex(*args[i].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            numeric[idx] = (direct(*plus) - direct(*minus)) / (2 * eps)
        # maximum has a kink where operands tie: finite differences are meaningless there
        np.testing.assert_allclose(g, numeric, rtol=1e-4, atol=1e-5)
