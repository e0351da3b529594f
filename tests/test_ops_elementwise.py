"""Elementwise primitives: NumPy forward and finite-difference VJP checks."""
import numpy as np
import pytest

from graphc.ir import DTypeError, ShapeError
from opcheck import check_vjp, run_op

rng = np.random.default_rng(0)

UNARY = {
    "neg": (np.negative, None), "exp": (np.exp, None), "log": (np.log, "pos"),
    "log1p": (np.log1p, "pos"), "sqrt": (np.sqrt, "pos"), "rsqrt": (lambda x: 1 / np.sqrt(x), "pos"),
    "tanh": (np.tanh, None), "sigmoid": (lambda x: 1 / (1 + np.exp(-x)), None),
    "relu": (lambda x: np.maximum(x, 0), "nonzero"), "abs": (np.abs, "nonzero"),
    "square": (np.square, None), "reciprocal": (np.reciprocal, "nonzero"),
}


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def sample(shape, domain=None):
    x = rng.standard_normal(shape)
    if domain == "pos":
        x = np.abs(x) + 0.5
    elif domain == "nonzero":
        x = np.where(np.abs(x) < 0.1, 0.5, x)
    return x


@pytest.mark.parametrize("op", sorted(UNARY))
def test_unary_forward_and_vjp(op):
    fn, domain = UNARY[op]
    x = sample((3, 4), domain)
    np.testing.assert_allclose(run_op(op, [x]), fn(x), rtol=1e-12)
    np.testing.assert_allclose(run_op(op, [x.astype(np.float32)]), fn(x.astype(np.float32)), rtol=1e-6)
    check_vjp(op, [x])


def test_sign_and_cast():
    x = np.array([-2.0, 0.0, 3.0])
    np.testing.assert_array_equal(run_op("sign", [x]), [-1, 0, 1])
    assert run_op("cast", [x], dtype="int32").dtype == np.int32
    check_vjp("cast", [x], dtype="float32", rtol=1e-3, atol=1e-3, eps=1e-2)


@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 4), (4,)), ((), (2, 3))], ids=str)
def test_fmod_forward_and_vjp(shapes):
    """fmod's VJP by central differences, at points away from its jumps (where x / y is whole):
    x = n + 0.5 + u with |u| <= 0.1 over y in {-2, -1, 1, 2} leaves x / y at least 0.2 from one."""
    y = rng.choice([-2.0, -1.0, 1.0, 2.0], shapes[1])
    x = rng.integers(-5, 5, shapes[0]) + 0.5 + rng.uniform(-0.1, 0.1, shapes[0])
    np.testing.assert_array_equal(run_op("fmod", [x, y]), np.fmod(x, y))
    check_vjp("fmod", [x, y])


BINARY = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
          "pow": np.power, "maximum": np.maximum, "minimum": np.minimum}
SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((5, 1), (1, 6))]


@pytest.mark.parametrize("op", sorted(BINARY))
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_binary_broadcasting_forward_and_vjp(op, shapes):
    x, y = sample(shapes[0]), sample(shapes[1])
    if op == "pow":
        x = np.abs(x) + 0.5
    np.testing.assert_allclose(run_op(op, [x, y]), BINARY[op](x, y), rtol=1e-12)
    check_vjp(op, [x, y])


@pytest.mark.parametrize("op,fn", [("eq", np.equal), ("ne", np.not_equal), ("lt", np.less),
                                   ("le", np.less_equal), ("gt", np.greater), ("ge", np.greater_equal)])
def test_comparisons(op, fn):
    x, y = rng.integers(0, 3, (4, 3)), rng.integers(0, 3, (3,))
    out = run_op(op, [x, y])
    assert out.dtype == np.bool_
    np.testing.assert_array_equal(out, fn(x, y))


def test_where_forward_and_vjp():
    c = rng.random((3, 4)) > 0.5
    x, y = sample((3, 4)), sample((4,))
    np.testing.assert_array_equal(run_op("where", [c, x, y]), np.where(c, x, y))
    check_vjp("where", [c, x, y])


def test_shape_and_dtype_errors_name_the_op_and_operands():
    with pytest.raises(ShapeError, match=r"add: shapes \(2, 3\) and \(4,\) do not broadcast"):
        run_op("add", [np.ones((2, 3)), np.ones(4)])
    with pytest.raises(DTypeError, match=r"mul: dtype mismatch float64 vs float32"):
        run_op("mul", [np.ones(2), np.ones(2, np.float32)])
    with pytest.raises(DTypeError, match="exp: expects a floating-point operand"):
        run_op("exp", [np.ones(2, np.int64)])


@pytest.mark.parametrize("op", ["maximum", "minimum"])
def test_maximum_minimum_propagate_nan_from_either_operand(op):
    """NumPy's rule, in the registry's scalar expression (which every code generator composes)
    and in the reference and numba-cpu backends."""
    from graphc.ir import Builder, Graph, TensorType
    from graphc.ir.registry import get
    from graphc.lowering import compile_graph

    nan = float("nan")
    x = np.array([nan, 1.0, nan, 2.0, -1.0], np.float32)
    y = np.array([1.0, nan, nan, -3.0, 4.0], np.float32)
    want = getattr(np, op)(x, y)
    expression = get(op).scalar("a", "b")
    scalar_results = [eval(expression, {"np": np}, {"a": a, "b": b}) for a, b in zip(x, y)]
    np.testing.assert_array_equal(np.array(scalar_results, np.float32), want)

    graph = Graph(op)
    a = graph.add_input(TensorType((5,), "float32"), "x")
    b = graph.add_input(TensorType((5,), "float32"), "y")
    graph.add_output("out", getattr(Builder(graph), op)(a, b))
    for backend in ("reference", "numba-cpu"):
        np.testing.assert_array_equal(compile_graph(graph, backend)(x, y)[0], want, err_msg=backend)
