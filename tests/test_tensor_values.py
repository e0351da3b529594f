"""A traced Tensor has no value: conversions to Python or NumPy values refuse clearly. dtype
constants under PyTorch's names. Type promotion of mixed-dtype arithmetic, as in PyTorch."""
import os

import numpy as np
import pytest

import graphc as gc

REF = "reference"
HERE = os.path.basename(__file__)


def run(fn, *args):
    return gc.jit(fn, backend=REF)(*args)


# -- 1. a traced Tensor refuses to be a value ---------------------------------------------------
VALUE_CALLS = {
    "np.asarray": (lambda x: np.asarray(x), r"np.asarray\(x\)"),
    "np.array": (lambda x: np.array(x), r"np.array\(x\)"),
    "float": (lambda x: float(x.sum()), r"float\(x\)"),
    "int": (lambda x: int(x.sum()), r"int\(x\)"),
    "if": (lambda x: x if x.sum() > 0 else -x, r"bool\(x\).*gc.where"),
    "item": (lambda x: x.sum().item(), r"x.item\(\)"),
    "numpy": (lambda x: x.numpy(), r"x.numpy\(\)"),
    "tolist": (lambda x: x.tolist(), r"x.tolist\(\)"),
    "range": (lambda x: range(x.sum()), r"Python int.*x.shape"),
    "list index": (lambda x: [1, 2][x.argmax()], r"Python int"),
}


@pytest.mark.parametrize("call", VALUE_CALLS)
def test_asking_a_traced_tensor_for_its_value_names_the_call_and_the_users_line(call):
    fn, pattern = VALUE_CALLS[call]
    with pytest.raises(gc.TracedValueError, match=pattern) as info:
        run(fn, np.ones(2, np.float32))
    message = str(info.value)
    assert "has no value while graphc traces" in message and f"{HERE}:" in message, message
    assert isinstance(info.value, TypeError)  # what Python's own conversions raise


def test_torch_tensor_of_a_traced_tensor_is_refused_clearly():
    torch = pytest.importorskip("torch")
    for convert in (torch.tensor, torch.as_tensor):
        with pytest.raises(gc.TracedValueError, match=r"torch.tensor\(x\).*no value") as info:
            run(lambda x: convert(x), np.ones(2, np.float32))
        assert f"{HERE}:" in str(info.value)


def test_numpy_math_on_traced_tensors_still_traces():
    x = np.array([0.5, -1.0, 2.0], np.float32)
    out = run(lambda t: np.exp(t) + np.maximum(t, 0) + np.sum(t) + np.arange(3), x)
    np.testing.assert_allclose(out, np.exp(x) + np.maximum(x, 0) + x.sum() + np.arange(3),
                               rtol=1e-6)


def test_module_parameters_are_arrays_outside_a_trace():
    layer = gc.nn.Linear(2, 3)
    weight = np.asarray(layer.weight)
    assert isinstance(weight, np.ndarray) and weight.shape == (3, 2)
    assert float(np.asarray(layer.bias).sum()) == float(layer.bias.sum())


def test_detach_stops_the_gradient_as_in_pytorch():
    torch = pytest.importorskip("torch")
    x = np.array([0.5, -1.0, 2.0], np.float32)
    g = gc.grad(lambda t: (t * t.detach()).sum(), backend=REF)(x)
    tx = torch.tensor(x, requires_grad=True)
    (tx * tx.detach()).sum().backward()
    np.testing.assert_allclose(g, tx.grad.numpy())


@pytest.mark.parametrize("backend", [REF, "numba-cpu"])
def test_a_write_into_a_detached_view_keeps_the_bases_gradient_as_in_pytorch(backend):
    """y.detach()[0] = 5 took the view's value for y wholesale: every element of y lost its
    gradient (all zeros), where PyTorch's autograd does not see the write."""
    torch = pytest.importorskip("torch")
    x = np.array([[1.0, 2.0], [3.0, 4.0], [-1.0, 0.5]])

    def f(x):
        y = x * 1.0
        y.detach()[0] = 5.0
        y[1:].detach()[0, 0] = 7.0
        y.detach().mul_(2)
        return (y ** 3).sum()

    value, grad = gc.value_and_grad(f, backend=backend)(x)
    tx = torch.tensor(x, requires_grad=True)
    expected = f(tx)
    assert gc.grad(lambda t: (t * t.data).sum(), backend=backend)(x).tolist() == x.tolist()  # x.data
    expected.backward()
    assert value == pytest.approx(expected.item())
    np.testing.assert_allclose(grad, tx.grad.numpy())


@pytest.mark.parametrize("backend", [REF, "numba-cpu"])
def test_second_derivatives_at_the_edges_of_pow_and_relu_match_pytorch(backend):
    """d2/dx2 of x ** 0 at 0 was NaN (the power the first derivative selects away was still
    differentiated: 0 * inf); relu passed no gradient at a NaN input, PyTorch does."""
    torch = pytest.importorskip("torch")
    x = np.array([0.0, 1.0, -2.0])
    second = gc.grad(lambda t: gc.grad(lambda u: (u ** 0.0).sum() + (u ** 1.0).sum())(t).sum(),
                     backend=backend)(x)
    np.testing.assert_array_equal(second, [0.0, 0.0, 0.0])
    masked = np.array([np.nan, 1.0, -1.0])
    weights = np.array([2.0, 3.0, 4.0])
    grad = gc.grad(lambda t: (t.relu() * weights).sum(), backend=backend)(masked)
    tm = torch.tensor(masked, requires_grad=True)
    (torch.relu(tm) * torch.tensor(weights)).sum().backward()
    np.testing.assert_array_equal(grad, tm.grad.numpy())  # [2, 3, 0]


# -- 2. dtype constants ---------------------------------------------------------------------
def test_dtype_constants_under_pytorchs_names():
    assert (gc.float32, gc.float64, gc.int32, gc.int64, gc.bool) == (
        "float32", "float64", "int32", "int64", "bool")
    assert (gc.float, gc.double, gc.int, gc.long) == ("float32", "float64", "int32", "int64")

    def f(x):
        return (x.to(gc.float64), gc.zeros(2, dtype=gc.int64), gc.ones(2, dtype=gc.bool),
                gc.arange(3, dtype=gc.long), gc.cast(x, gc.int32), x.to(dtype=gc.double),
                gc.full((2,), 7, dtype=gc.int), x.astype(gc.float) * 2)

    outs = run(f, np.array([1.5, 2.5], np.float64))
    assert [o.dtype.name for o in outs] == ["float64", "int64", "bool", "int64", "int32",
                                            "float64", "int32", "float32"]
    np.testing.assert_array_equal(outs[4], [1, 2])


def test_dtype_comparisons_read_as_in_pytorch():
    def f(x):
        assert x.dtype == gc.float32 and x.long().dtype == gc.long
        return x
    run(f, np.ones(2, np.float32))


def test_star_import_leaves_pythons_bool_int_and_float_alone():
    namespace: dict = {}
    exec("from graphc import *", namespace)
    for name in ("bool", "int", "float", "long", "double"):
        assert name not in namespace, name
    assert "TracedValueError" in namespace


# -- 3. type promotion, against PyTorch -------------------------------------------------------
VALUES = {"bool": [True, False, True], "int32": [1, 2, 3], "int64": [3, 1, 2],
          "float32": [0.5, 1.5, -2.0], "float64": [-1.25, 2.0, 4.0]}
# Operands: (kind, dtype) with kind "tensor" (shape (3,)), "0d" (a 0-d tensor), "number".
TENSORS = [(kind, d) for kind in ("tensor", "0d") for d in VALUES]
NUMBERS = [("number", True), ("number", 2), ("number", 2.5)]
OPS = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b, "lt": lambda a, b: a < b, "eq": lambda a, b: a == b,
    "maximum": "maximum", "where": "where",
}


def _array(kind, dtype):
    values = np.array(VALUES[dtype], dtype)
    return values if kind == "tensor" else values[1]


def _apply(lib, op, a, b):
    """`op` on a and b with `lib` (graphc or torch: the same names)."""
    fn = OPS[op]
    if fn == "maximum":
        return lib.maximum(a, b)
    if fn == "where":
        return lib.where(lib.arange(3) != 1, a, b)
    return fn(a, b)


def _cases(torch, op):
    """(left, right) operand pairs PyTorch defines for `op`, with PyTorch's result; arithmetic
    on booleans (PyTorch's logical or/and in disguise, refused by graphc) is left out."""
    cases = []
    for left in TENSORS:
        for right in TENSORS + NUMBERS:
            a = torch.tensor(_array(*left))
            b = right[1] if right[0] == "number" else torch.tensor(_array(*right))
            if op == "maximum" and right[0] == "number":
                b = torch.tensor(right[1])  # torch.maximum takes tensors only
                right = ("0d-number", right[1])
            try:
                expected = _apply(torch, op, a, b)
            except RuntimeError:  # e.g. `-` on booleans
                continue
            if expected.dtype == torch.bool and op in ("add", "sub", "mul", "maximum", "where"):
                continue
            cases.append((left, right, expected))
    return cases


def _graphc_operand(operand, args):
    kind, v = operand
    if kind == "number":
        return v
    if kind == "0d-number":  # torch's 0-d tensor made from a Python number: its default dtype
        return gc.full((), v, dtype={bool: "bool", int: "int64", float: "float32"}[type(v)])
    return args.pop(0)


@pytest.mark.parametrize("op", OPS)
def test_mixed_dtypes_promote_as_in_pytorch(op):
    torch = pytest.importorskip("torch")
    cases = _cases(torch, op)
    inputs = [_array(*o) for left, right, _ in cases for o in (left, right)
              if o[0] in ("tensor", "0d")]

    def f(*xs):
        args = list(xs)
        return tuple(_apply(gc, op, _graphc_operand(left, args), _graphc_operand(right, args))
                     for left, right, _ in cases)

    outs = run(f, *[np.asarray(x) for x in inputs])
    for (left, right, expected), out in zip(cases, outs):
        case = f"{op}({left}, {right})"
        assert out.dtype == expected.numpy().dtype, case
        np.testing.assert_allclose(out, expected.numpy(), rtol=1e-6, err_msg=case)


def test_a_python_number_never_widens_a_tensor_of_its_kind():
    x32 = np.ones(3, np.float32)
    outs = run(lambda x: (x + 2.5, x * 2, x - True, x.long() + 7, x.int() * 3, x.int() + 0.5),
               x32)
    assert [o.dtype.name for o in outs] == ["float32"] * 3 + ["int64", "int32", "float32"]


def test_the_integer_operand_of_promoted_arithmetic_gets_no_gradient():
    torch = pytest.importorskip("torch")
    x = np.array([0.5, -1.0, 2.0], np.float32)
    n = np.array([3, 1, 2], np.int64)
    y = np.array([2.0, 0.25, -1.0], np.float64)

    def loss(x, n, y):
        return ((x + n) * (x * y) / n + (x < n)).sum()

    gx = gc.grad(loss, argnums=0, backend=REF)(x, n, y)
    tx = torch.tensor(x, requires_grad=True)
    tloss = loss(tx, torch.tensor(n), torch.tensor(y))
    tloss.backward()
    assert gx.dtype == np.float32
    np.testing.assert_allclose(gx, tx.grad.numpy(), rtol=1e-6)
    value = run(loss, x, n, y)
    assert value.dtype == np.float64 and tloss.dtype == torch.float64
    np.testing.assert_allclose(value, tloss.item(), rtol=1e-12)


def test_integer_powers_and_squares_follow_the_promoted_dtype():
    n = np.array([1, 2, 3], np.int64)
    square, half = run(lambda n: (n ** 2, n ** 2.0), n)
    assert square.dtype == np.int64 and half.dtype == np.float32
    np.testing.assert_array_equal(half, [1, 4, 9])
