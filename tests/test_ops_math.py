"""Math and activation ops (issue 19): the primitives erf, sin, cos, cumsum, cumprod and argsort
against closed forms, naive versions and finite differences; the composite functions (activations, clamp, norm, var/std,
min/argmin, einsum, triangles, constants) against PyTorch, values and gradients, on the reference
backend; a numba-cpu compile and an ONNX export of them; and the refusals' messages."""
import math

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn
from graphc.ir import DTypeError, GraphcError, ShapeError
from opcheck import check_vjp, run_op

rng = np.random.default_rng(0)


def normal(*shape, dtype="float64"):
    return rng.standard_normal(shape).astype(dtype)


# -- primitives -----------------------------------------------------------------------------------
def test_sin_cos_erf_match_closed_forms():
    x = np.array([-3.0, -1.0, -0.25, 0.0, 0.5, 2.0, 6.0])
    np.testing.assert_allclose(run_op("sin", [x]), [math.sin(v) for v in x], rtol=1e-15)
    np.testing.assert_allclose(run_op("cos", [x]), [math.cos(v) for v in x], rtol=1e-15)
    np.testing.assert_allclose(run_op("erf", [x]), [math.erf(v) for v in x], rtol=1e-15)
    assert run_op("erf", [x.astype(np.float32)]).dtype == np.float32


@pytest.mark.parametrize("op", ["sin", "cos", "erf"])
def test_unary_vjp_matches_finite_differences(op):
    check_vjp(op, [normal(3, 4)])


def test_integer_operands_are_refused_by_float_math():
    with pytest.raises(DTypeError, match="erf.*floating-point"):
        run_op("erf", [np.arange(3)])


def naive_cumulative(x, axis, reverse, combine):
    """Each output element combined from its prefix (or suffix) one element at a time."""
    x = np.moveaxis(x, axis, -1)
    out = np.empty_like(x)
    n = x.shape[-1]
    for index in np.ndindex(*x.shape[:-1]):
        order = range(n - 1, -1, -1) if reverse else range(n)
        acc = None
        for i in order:
            acc = x[index + (i,)] if acc is None else combine(acc, x[index + (i,)])
            out[index + (i,)] = acc
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("op, combine", [("cumsum", np.add), ("cumprod", np.multiply)])
def test_cumulative_forward_and_vjp(op, combine, axis, reverse):
    x = normal(2, 3, 4)
    np.testing.assert_allclose(run_op(op, [x], axis=axis, reverse=reverse),
                               naive_cumulative(x, axis, reverse, combine), rtol=1e-14)
    check_vjp(op, [x], axis=axis, reverse=reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_cumprod_vjp_is_exact_at_zeros(reverse):
    """One zero and two zeros in a line: out / x would be 0/0 there."""
    x = normal(3, 5)
    x[0, 2] = 0
    x[1, 1] = x[1, 3] = 0
    check_vjp("cumprod", [x], axis=1, reverse=reverse)
    # d/dx[0, 2] of sum(cumprod(x)[0]) is the products of the other factors of every later prefix
    grad = gc.grad(lambda t: gc.cumprod(t, 1).sum(), backend="reference")(x)
    row = x[0]
    expected = sum(np.prod(row[:i + 1][np.arange(i + 1) != 2]) for i in range(2, 5))
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad[0, 2], expected, rtol=1e-13)


def test_cumprod_vjp_takes_linear_memory():
    """The gradient of a running product over 40,000 elements: an n x n intermediate per line
    would hold 1.6e9 elements (12.8 GB in float64)."""
    n = 40_000
    x = np.full(n, 1.0 + 1e-5)
    x[n // 2] = 0.0
    grad = gc.grad(lambda t: gc.cumprod(t, 0)[-1], backend="reference")(x)
    expected = np.zeros(n)
    expected[n // 2] = (1.0 + 1e-5) ** (n - 1)
    np.testing.assert_allclose(grad, expected, rtol=1e-9)


def test_cumprod_second_order_gradient_at_zeros_matches_torch():
    x = np.array([[0.5, 0.0, -2.0, 0.0, 3.0], [1.5, -0.5, 0.0, 2.0, 0.25]])
    fn = lambda v: (v.cumprod(1) * v.cumprod(1)).sum()  # noqa: E731
    t = torch.tensor(x, requires_grad=True)
    (first,) = torch.autograd.grad(fn(t), t, create_graph=True)
    (second,) = torch.autograd.grad((first * first).sum(), t)
    got = gc.grad(lambda v: (gc.grad(fn)(v) ** 2).sum(), backend="reference")(x)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, second.numpy(), rtol=1e-12)


def test_second_order_gradients_of_prod_and_cumprod_at_zeros_match_torch():
    """After a line's first zero the first-order gradient is 0, but not its derivative with
    respect to that zero: the Hessian of prod([0, 3]) was [[0, 1], [0, 0]]."""
    hessian = np.stack([gc.grad(lambda v, k=k: gc.grad(lambda u: u.prod())(v)[k], backend="reference")(
        np.array([0.0, 3.0])) for k in range(2)])
    np.testing.assert_array_equal(hessian, [[0.0, 1.0], [1.0, 0.0]])
    lines = [rng.standard_normal(7) for _ in range(12)]
    for x in lines:
        x[rng.choice(7, rng.integers(1, 4), replace=False)] = 0.0
        w, v = rng.standard_normal(7), rng.standard_normal(7)
        t = torch.tensor(x, requires_grad=True)
        (first,) = torch.autograd.grad((torch.cumprod(t, 0) * torch.tensor(w)).sum(), t, create_graph=True)
        (expected,) = torch.autograd.grad((first * torch.tensor(v)).sum(), t)
        got = gc.grad(lambda u: (gc.grad(lambda s: (s.cumprod(0) * w).sum())(u) * v).sum(),
                      backend="reference")(x)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-10, atol=1e-12)


def test_prod_dtype_duplicate_dims_and_a_single_factor():
    ints = np.array([[2**20, 2**20, 3], [1, 2, 3]], np.int32)
    for dtype in ("int32", "bool"):
        got = gc.jit(lambda v: v.prod(1, dtype=dtype), backend="reference")(ints)
        expected = torch.from_numpy(ints).prod(1, dtype=getattr(torch, dtype)).numpy()
        assert got.dtype == expected.dtype  # int32 wraps as PyTorch's; bool: all nonzero
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(ShapeError, match=r"prod: dims \(1, -1\) name an axis twice"):
        gc.jit(lambda v: v.prod((1, -1)), backend="reference")(ints)
    for value in (np.inf, np.nan, 5.0):  # x.prod(0) of a 0-d x is x: gradient 1
        assert gc.grad(lambda v: v.prod(0), backend="reference")(np.float64(value)) == 1.0


def test_prod_over_dims_dtypes_and_empty_axes_matches_torch():
    x = normal(2, 3, 4)
    np.testing.assert_allclose(gc.jit(lambda v: v.prod((0, 2)), backend="reference")(x),
                               np.prod(x, axis=(0, 2)), rtol=1e-14)
    ints = np.array([[3, -2, 4], [1, 5, 7]], np.int32)
    for fn, torch_fn in [(lambda v: v.prod(1), lambda t: t.prod(1)), (lambda v: v.prod(), lambda t: t.prod()),
                         (lambda v: (v > 2).prod(0), lambda t: (t > 2).prod(0)),
                         (lambda v: v.prod(1, dtype="float32"), lambda t: t.prod(1, dtype=torch.float32))]:
        got, expected = gc.jit(fn, backend="reference")(ints), torch_fn(torch.from_numpy(ints)).numpy()
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    empty = np.zeros((3, 0), np.float32)
    for fn, torch_fn in [(lambda v: v.prod(1), lambda t: t.prod(1)), (lambda v: v.prod(), lambda t: t.prod()),
                         (lambda v: v.prod(0, keepdim=True), lambda t: t.prod(0, keepdim=True))]:
        got, expected = gc.jit(fn, backend="reference")(empty), torch_fn(torch.from_numpy(empty)).numpy()
        assert got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    scalar = np.float32(2.5)
    assert gc.jit(lambda v: v.prod(0), backend="reference")(scalar) == np.float32(2.5)


def test_einsum_keeps_broadcast_axes_unexpanded_and_takes_the_sublist_form():
    """'...i,...i->...' of (N, 1, D) and (1, N, D) copied both operands out to (N, N, D)."""
    a, b = normal(30, 1, 4), normal(1, 30, 4)
    graph = gc.trace(lambda x, y: gc.einsum("...i,...i->...", x, y), a, b)
    assert max(v.type.size for node in graph.nodes for v in node.outputs) == 30 * 30
    np.testing.assert_allclose(gc.jit(lambda x, y: gc.einsum("...i,...i->...", x, y), backend="reference")(a, b),
                               np.einsum("...i,...i->...", a, b), rtol=1e-12)
    x = normal(2, 3)
    np.testing.assert_allclose(gc.jit(lambda v: gc.einsum(v, [0, 1], v, [2, 1], [0, 2]), backend="reference")(x),
                               x @ x.T, rtol=1e-12)
    np.testing.assert_allclose(gc.jit(lambda v: gc.einsum(v, [Ellipsis, 1], [1]), backend="reference")(x),
                               x.sum(0), rtol=1e-12)
    with pytest.raises(ShapeError, match=r"the axes '\.\.\.' covers do not broadcast: 2 and 4"):
        gc.jit(lambda v, w: gc.einsum("...i,...i->...", v, w), backend="reference")(normal(2, 3), normal(4, 3))
    with pytest.raises(GraphcError, match=r"einsum: the equation must be a string, or the sublist form"):
        gc.jit(lambda v: gc.einsum(None, v), backend="reference")(x)


def test_einsum_diagonal_leaves_what_is_off_it_out():
    """An infinite element off the diagonal must not make the diagonal NaN (inf * 0)."""
    x = np.array([[1.0, np.inf], [-np.inf, 2.0]])
    np.testing.assert_array_equal(gc.jit(lambda v: gc.einsum("ii->i", v), backend="reference")(x), [1.0, 2.0])
    grad = gc.grad(lambda v: gc.einsum("ii", v), backend="reference")(x)
    np.testing.assert_array_equal(grad, np.eye(2))


def test_cumulative_integers_and_errors():
    ints = np.array([[1, -2, 3], [4, 5, -6]], np.int32)
    out = run_op("cumsum", [ints], axis=1)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, np.cumsum(ints, axis=1))
    with pytest.raises(DTypeError, match="cumsum.*bool"):
        run_op("cumsum", [ints > 0], axis=0)
    with pytest.raises(ShapeError, match="cumprod.*0-d"):
        run_op("cumprod", [np.float64(2.0)], axis=0)
    with pytest.raises(ShapeError, match="axis 2 is out of range"):
        run_op("cumsum", [ints], axis=2)


def naive_argsort(x, axis, descending):
    """Each line's positions ordered by a Python sort on (rank of the value, position): NaN
    ranks above every number, and equal values keep their order either way."""
    x = np.moveaxis(x, axis, -1)
    out = np.empty(x.shape, np.int64)
    for index in np.ndindex(*x.shape[:-1]):
        line = x[index]

        def key(i):
            value = line[i]
            nan = bool(value != value)
            rank = (nan, 0 if nan else value)
            return (tuple(-r for r in rank) if descending else rank), i
        out[index] = sorted(range(len(line)), key=key)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_argsort_is_stable_and_sorts_nan_as_the_largest(axis, descending):
    x = np.round(normal(3, 6, 5))  # few distinct values: many ties
    x[0, 2, 1] = x[2, 0, 4] = np.nan
    x[1, 1, 1] = -np.inf
    ints = np.random.default_rng(1).integers(-2, 3, (3, 6, 5)).astype(np.int32)
    for operand in (x, x.astype(np.float32), ints):
        out = run_op("argsort", [operand], axis=axis, descending=descending)
        assert out.dtype == np.int64
        np.testing.assert_array_equal(out, naive_argsort(operand, axis, descending))


def test_argsort_errors():
    with pytest.raises(DTypeError, match="argsort.*bool"):
        run_op("argsort", [np.array([True, False])], axis=0)
    with pytest.raises(ShapeError, match="argsort.*0-d"):
        run_op("argsort", [np.float64(2.0)], axis=0)
    with pytest.raises(ShapeError, match="axis 2 is out of range"):
        run_op("argsort", [normal(2, 3)], axis=2)


@pytest.mark.parametrize("descending", [False, True])
def test_long_lines_sort_on_numba_cpu_as_on_the_reference(descending):
    """Lines of 1000 with ties and NaN, 64 of them: enough for the parallel loop over lines."""
    x = np.round(normal(64, 1000) * 4).astype(np.float32)
    x[::7, ::13] = np.nan

    def f(v):
        values, indices = v.sort(1, descending=descending)
        return values, indices, v.T.argsort(0, descending=descending)
    for got, want in zip(gc.jit(f)(x), gc.jit(f, backend="reference")(x)):
        np.testing.assert_array_equal(got, want)


# -- composite functions against PyTorch ----------------------------------------------------------
torch = pytest.importorskip("torch")
TF = torch.nn.functional

# name -> (graphc function, torch function, input shape); each is checked in float64, values
# and the gradient of sum(out * g) for a random g.
COMPOSITES = {
    "gelu": (F.gelu, TF.gelu, (3, 5)),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda t: TF.gelu(t, approximate="tanh"), (3, 5)),
    "silu": (F.silu, TF.silu, (3, 5)),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.2), lambda t: TF.leaky_relu(t, 0.2), (3, 5)),
    "leaky_relu_default": (F.leaky_relu, TF.leaky_relu, (3, 5)),
    "elu": (lambda x: F.elu(x * 40, 0.7), lambda t: TF.elu(t * 40, 0.7), (3, 5)),
    "softplus": (lambda x: F.softplus(x * 30, 2.0, 15.0), lambda t: TF.softplus(t * 30, 2.0, 15.0), (3, 5)),
    "softplus_default": (F.softplus, TF.softplus, (3, 5)),
    "normalize": (F.normalize, TF.normalize, (3, 4)),
    "normalize_p1_dim0": (lambda x: F.normalize(x, 1, 0), lambda t: TF.normalize(t, 1.0, 0), (3, 4)),
    "clamp": (lambda x: x.clamp(-0.5, 0.7), lambda t: t.clamp(-0.5, 0.7), (4, 5)),
    "clamp_min_only": (lambda x: gc.clamp(x, min=0.1), lambda t: torch.clamp(t, min=0.1), (4, 5)),
    "clip_max_only": (lambda x: gc.clip(x, max=0.1), lambda t: torch.clip(t, max=0.1), (4, 5)),
    "clamp_tensor_bounds": (lambda x: x.clamp(x[0] * 0, x[1].abs()),
                            lambda t: t.clamp(t[0] * 0, t[1].abs()), (3, 4)),
    "sin_cos_erf": (lambda x: x.sin() * x.cos() + x.erf(), lambda t: t.sin() * t.cos() + t.erf(), (3, 4)),
    "cumsum": (lambda x: x.cumsum(1), lambda t: t.cumsum(1), (3, 4)),
    "cumsum_dim_keyword": (lambda x: gc.cumsum(x, dim=0), lambda t: torch.cumsum(t, dim=0), (3, 4)),
    "cumprod": (lambda x: x.cumprod(-1), lambda t: t.cumprod(-1), (3, 4)),
    "cumprod_of_zeros": (lambda x: (x * (x.abs() > 0.4)).cumprod(1),
                         lambda t: (t * (t.abs() > 0.4)).cumprod(1), (3, 6)),
    "prod": (lambda x: x.prod(), lambda t: t.prod(), (3, 4)),
    "prod_dim_keepdim": (lambda x: x.prod(1, keepdim=True), lambda t: t.prod(1, keepdim=True), (3, 4)),
    "prod_dim0_of_3d": (lambda x: gc.prod(x, 0), lambda t: torch.prod(t, 0), (3, 2, 4)),
    "prod_middle_dim": (lambda x: x.prod(dim=1), lambda t: t.prod(dim=1), (2, 3, 4)),
    "prod_with_zeros": (lambda x: (x * (x.abs() > 0.4)).prod(1), lambda t: (t * (t.abs() > 0.4)).prod(1), (4, 6)),
    "var": (lambda x: x.var(), lambda t: t.var(), (3, 4)),
    "var_dim_keepdim": (lambda x: x.var(1, keepdim=True), lambda t: t.var(1, keepdim=True), (3, 4)),
    "var_unbiased_false": (lambda x: gc.var(x, 0, unbiased=False), lambda t: torch.var(t, 0, unbiased=False), (3, 4)),
    "var_correction": (lambda x: x.var(dim=(0, 1), correction=2), lambda t: t.var(dim=(0, 1), correction=2), (3, 4)),
    "std": (lambda x: x.std(0), lambda t: t.std(0), (3, 4)),
    "std_population": (lambda x: gc.std(x, 1, correction=0), lambda t: torch.std(t, 1, correction=0), (3, 4)),
    "min": (lambda x: x.min(), lambda t: t.min(), (3, 4)),
    "min_dim_values": (lambda x: x.min(1).values, lambda t: t.min(1).values, (3, 4)),
    "amin": (lambda x: gc.amin(x, (0, 1)), lambda t: torch.amin(t, (0, 1)), (3, 4)),
    "norm": (lambda x: x.norm(), lambda t: t.norm(), (3, 4)),
    "norm_p1_dim": (lambda x: x.norm(1, dim=1), lambda t: t.norm(1, dim=1), (3, 4)),
    "norm_p3_keepdim": (lambda x: gc.norm(x, 3, 0, keepdim=True), lambda t: torch.norm(t, 3, 0, keepdim=True), (3, 4)),
    "norm_inf": (lambda x: x.norm(float("inf"), dim=0), lambda t: t.norm(float("inf"), dim=0), (3, 4)),
    "norm_fro": (lambda x: gc.norm(x, "fro", dim=(0, 1)), lambda t: torch.norm(t, "fro", dim=(0, 1)), (3, 4)),
    "einsum_matmul": (lambda x: gc.einsum("ij,jk->ik", x, x.T), lambda t: torch.einsum("ij,jk->ik", t, t.T), (3, 4)),
    "einsum_batched": (lambda x: gc.einsum("bij,bjk->bik", x, x.transpose(1, 2)),
                       lambda t: torch.einsum("bij,bjk->bik", t, t.transpose(1, 2)), (2, 3, 4)),
    "einsum_attention": (lambda x: gc.einsum("bhqd,bhkd->bhqk", x, x * 2),
                         lambda t: torch.einsum("bhqd,bhkd->bhqk", t, t * 2), (2, 2, 3, 4)),
    "einsum_dot": (lambda x: gc.einsum("i,i->", x, x + 1), lambda t: torch.einsum("i,i->", t, t + 1), (5,)),
    "einsum_outer": (lambda x: gc.einsum("i,j->ij", x, x[:3]), lambda t: torch.einsum("i,j->ij", t, t[:3]), (5,)),
    "einsum_transpose": (lambda x: gc.einsum("ij->ji", x), lambda t: torch.einsum("ij->ji", t), (3, 4)),
    "einsum_implicit_output": (lambda x: gc.einsum("ji,jk", x, x), lambda t: torch.einsum("ji,jk", t, t), (3, 4)),
    "einsum_three_operands": (lambda x: gc.einsum("ij,jk,k->i", x, x.T, x[:, 0]),
                              lambda t: torch.einsum("ij,jk,k->i", t, t.T, t[:, 0]), (3, 4)),
    "einsum_sum_free_label": (lambda x: gc.einsum("bij,bk->bi", x, x[:, 0]),
                              lambda t: torch.einsum("bij,bk->bi", t, t[:, 0]), (2, 3, 4)),
    "einsum_ellipsis_batched": (lambda x: gc.einsum("...ij,...jk->...ik", x, x.transpose(-1, -2)),
                                lambda t: torch.einsum("...ij,...jk->...ik", t, t.transpose(-1, -2)), (2, 3, 4)),
    "einsum_ellipsis_broadcast": (lambda x: gc.einsum("...ij,...jk", x[:, None], x[0].T),
                                  lambda t: torch.einsum("...ij,...jk", t[:, None], t[0].T), (2, 3, 4)),
    "einsum_ellipsis_summed": (lambda x: gc.einsum("...ij->j", x), lambda t: torch.einsum("...ij->j", t), (2, 3, 4)),
    "einsum_ellipsis_moved": (lambda x: gc.einsum("i...->...i", x), lambda t: torch.einsum("i...->...i", t), (2, 3, 4)),
    "einsum_ellipsis_of_nothing": (lambda x: gc.einsum("i...,i...->...", x, x[:, 0]),
                                   lambda t: torch.einsum("i...,i...->...", t, t[:, 0]), (3, 2)),
    "einsum_size_one_label": (lambda x: gc.einsum("ij,ij->ij", x[:1], x), lambda t: torch.einsum("ij,ij->ij", t[:1], t), (3, 4)),
    "einsum_diagonal": (lambda x: gc.einsum("ii->i", x[:, :3]), lambda t: torch.einsum("ii->i", t[:, :3]), (3, 4)),
    "einsum_trace_implicit": (lambda x: gc.einsum("ii", x[:, :3]), lambda t: torch.einsum("ii", t[:, :3]), (3, 4)),
    "einsum_batched_diagonal": (lambda x: gc.einsum("bii,bij->bj", x[:, :, :3], x),
                                lambda t: torch.einsum("bii,bij->bj", t[:, :, :3], t), (2, 3, 4)),
    "einsum_triple_diagonal": (lambda x: gc.einsum("iii->i", x[:3, :3, :3]),
                               lambda t: torch.einsum("iii->i", t[:3, :3, :3]), (3, 3, 4)),
    "triu": (lambda x: gc.triu(x, 1), lambda t: torch.triu(t, 1), (2, 3, 4)),
    "sort_values": (lambda x: x.sort().values, lambda t: t.sort().values, (3, 5)),
    "sort_descending_dim0": (lambda x: gc.sort(x, 0, descending=True)[0],
                             lambda t: torch.sort(t, 0, descending=True)[0], (4, 3)),
    "topk_values": (lambda x: x.topk(2).values, lambda t: t.topk(2).values, (3, 5)),
    "topk_smallest_dim0": (lambda x: gc.topk(x, 3, dim=0, largest=False)[0],
                           lambda t: torch.topk(t, 3, dim=0, largest=False)[0], (4, 3)),
    "topk_of_a_sum": (lambda x: (x + x[:1]).topk(1, dim=1).values * x[:, :1],
                      lambda t: (t + t[:1]).topk(1, dim=1).values * t[:, :1], (3, 4)),
    "tril": (lambda x: x.tril(-1), lambda t: t.tril(-1), (4, 3)),
}


@pytest.mark.parametrize("name", sorted(COMPOSITES))
def test_composite_matches_torch(name):
    fn, torch_fn, shape = COMPOSITES[name]
    x = normal(*shape)
    t = torch.tensor(x, requires_grad=True)
    expected = torch_fn(t)
    g = normal(*expected.shape)
    expected.backward(torch.from_numpy(g))
    got = gc.jit(fn, backend="reference")(x)
    assert got.shape == tuple(expected.shape) and got.dtype == np.float64
    np.testing.assert_allclose(got, expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    grad = gc.grad(lambda v: (fn(v) * g).sum(), backend="reference")(x)
    np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_maximum_minimum_and_clamp_gradients_at_ties_nans_and_crossed_bounds_match_torch():
    """maximum and minimum gave a tie's whole gradient to x (PyTorch: half each); clamp, built
    on them, now has PyTorch's own rule: x's where min <= x <= max, min's where x < min < max,
    max's where x > max or max < min, and max's values (NaN staying NaN) where max < min."""
    grid = np.array([-1.0, 0.0, 1.0, 2.0, np.nan])
    picks = np.array(list(np.ndindex(5, 4, 4)))  # every x against every ordered or crossed pair
    x, low, high = grid[picks[:, 0]], grid[picks[:, 1]], grid[picks[:, 2]]
    g = rng.standard_normal(len(x))
    cases = [(gc.maximum, torch.maximum, (x, low)), (gc.minimum, torch.minimum, (x, low)),
             (lambda a, b, c: gc.clamp(a, b, c), lambda a, b, c: torch.clamp(a, b, c), (x, low, high)),
             (lambda a, b: gc.clamp(a, min=b), lambda a, b: torch.clamp(a, min=b), (x, low)),
             (lambda a, b: a.clamp(max=b), lambda a, b: a.clamp(max=b), (x, high))]
    for fn, torch_fn, arrays in cases:
        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        expected = torch_fn(*tensors)
        expected.backward(torch.from_numpy(g))
        np.testing.assert_array_equal(gc.jit(fn, backend="reference")(*arrays), expected.detach().numpy())
        grads = gc.grad(lambda *a: (fn(*a) * g).sum(), argnums=tuple(range(len(arrays))),
                        backend="reference")(*arrays)
        for got, t in zip(grads, tensors):
            np.testing.assert_allclose(got, t.grad.numpy(), rtol=1e-15)


def test_activation_gradients_at_zero_and_beyond_the_thresholds_match_torch():
    """The kinks (0 for leaky_relu and elu, the threshold for softplus), far into the branch
    not taken (exp would overflow), and a zero vector for norm and normalize."""
    x = np.array([[0.0, -800.0, 800.0, 20.0, -1e-3, 1e-3]])
    for fn, torch_fn in [(F.leaky_relu, TF.leaky_relu), (F.elu, TF.elu), (F.softplus, TF.softplus),
                         (F.gelu, TF.gelu), (F.silu, TF.silu),
                         (lambda v: F.normalize(v * 0, dim=1), lambda t: TF.normalize(t * 0, dim=1)),
                         (lambda v: (v * 0).norm(), lambda t: (t * 0).norm())]:
        t = torch.tensor(x, requires_grad=True)
        torch_fn(t).sum().backward()
        grad = gc.grad(lambda v: fn(v).sum(), backend="reference")(x)
        np.testing.assert_allclose(grad, t.grad.numpy(), rtol=1e-12, atol=1e-300)


def test_min_and_argmin_follow_torch():
    x = np.array([[3.0, -1.0, -1.0], [np.nan, 2.0, 0.0]])
    t = torch.tensor(x)
    values, indices = gc.jit(lambda v: v.min(1), backend="reference")(x)
    np.testing.assert_array_equal(values, t.min(1).values.numpy())
    np.testing.assert_array_equal(indices, t.min(1).indices.numpy())  # first minimum; NaN wins
    np.testing.assert_array_equal(gc.jit(lambda v: gc.argmin(v, dim=0), backend="reference")(x),
                                  t.argmin(0).numpy())
    assert gc.jit(lambda v: v.argmin(), backend="reference")(x) == t.argmin().item()
    ints = np.array([5, np.iinfo(np.int64).min, 7, np.iinfo(np.int64).max], np.int64)
    smallest, where = gc.jit(lambda v: (v.min(), v.argmin()), backend="reference")(ints)
    assert smallest == np.iinfo(np.int64).min and where == 1  # -x would overflow there
    assert gc.jit(lambda v: gc.minimum(v, 6).min(), backend="reference")(ints[[0, 2, 3]]) == 5


def test_sort_argsort_and_topk_indices_follow_torch():
    """Ties and NaN: sort and argsort give torch's stable order; topk's values are torch's and
    its indices the first k of that order (torch leaves the order of tied indices open)."""
    x = np.round(normal(4, 9) * 2)
    x[1, 3] = x[2, 0] = np.nan
    t = torch.tensor(x)

    def f(v):
        return (v.sort(1), gc.sort(v, 0, descending=True), v.argsort(stable=True), v.topk(3),
                gc.topk(v, 2, dim=0, largest=False), np.sort(v), np.argsort(v, axis=0),
                np.sort(v, axis=None), np.argsort(v, axis=None, kind="quicksort"))
    (sort, sort_down, order, top, bottom, np_sort, np_order, np_flat_sort, np_flat_order
     ) = gc.jit(f, backend="reference")(x)
    for (values, indices), (t_values, t_indices) in [
            (sort, torch.sort(t, dim=1, stable=True)),
            (sort_down, torch.sort(t, dim=0, descending=True, stable=True))]:
        np.testing.assert_array_equal(values, t_values.numpy())
        np.testing.assert_array_equal(indices, t_indices.numpy())
    np.testing.assert_array_equal(order, torch.argsort(t, stable=True).numpy())
    np.testing.assert_array_equal(np_sort, np.sort(x))
    np.testing.assert_array_equal(np_order, np.argsort(x, axis=0, kind="stable"))
    np.testing.assert_array_equal(np_flat_sort, np.sort(x, axis=None))  # NumPy's: flattened
    np.testing.assert_array_equal(np_flat_order, np.argsort(x, axis=None, kind="stable"))
    np.testing.assert_array_equal(top[0], t.topk(3).values.numpy())
    np.testing.assert_array_equal(top[1], torch.sort(t, descending=True, stable=True).indices[:, :3])
    np.testing.assert_array_equal(bottom[0], torch.topk(t, 2, dim=0, largest=False).values.numpy())
    np.testing.assert_array_equal(bottom[1], torch.sort(t, dim=0, stable=True).indices[:2])


def test_topk_refuses_k_outside_the_axis():
    x = normal(2, 5)
    with pytest.raises(ShapeError, match=r"topk: k=6 is out of range for dim 1 of size 5 \(shape \(2, 5\)\).*test_ops_math.py"):
        gc.jit(lambda v: v.topk(6, dim=1), backend="reference")(x)
    with pytest.raises(ShapeError, match="k=-1"):
        gc.jit(lambda v: v.topk(-1), backend="reference")(x)
    values, indices = gc.jit(lambda v: v.topk(0), backend="reference")(x)
    assert values.shape == indices.shape == (2, 0)


def test_constants_take_torch_dtypes():
    def build(x):
        return (gc.arange(5), gc.arange(1, 2, 0.25), gc.arange(2, 11, 3, dtype="float64"),
                gc.zeros_like(x), gc.ones_like(x, dtype="int32"), gc.full((2, 2), 7),
                gc.full((2,), True), gc.full((1, 2), 0.5), gc.full_like(x, 2.5), gc.zeros(2, 3),
                gc.ones((2,)))
    x = normal(2, 3).astype(np.float32)
    got = gc.jit(build, backend="reference")(x)
    t = torch.tensor(x)
    expected = (torch.arange(5), torch.arange(1, 2, 0.25), torch.arange(2, 11, 3, dtype=torch.float64),
                torch.zeros_like(t), torch.ones_like(t, dtype=torch.int32), torch.full((2, 2), 7),
                torch.full((2,), True), torch.full((1, 2), 0.5), torch.full_like(t, 2.5),
                torch.zeros(2, 3), torch.ones((2,)))
    for a, e in zip(got, expected):
        e = e.numpy()
        assert (a.dtype, a.shape) == (e.dtype, e.shape)
        np.testing.assert_array_equal(a, e)


def test_cumsum_promotes_integers_and_booleans_to_int64_as_torch():
    ints = np.array([[1, 2], [3, 4]], np.int32)
    got = gc.jit(lambda v: (v.cumsum(1), (v > 1).cumsum(0), v.cumsum(0, dtype="float64"), gc.cumsum(v)),
                 backend="reference")(ints)
    t = torch.tensor(ints)
    for a, e in zip(got[:3], (t.cumsum(1), (t > 1).cumsum(0), t.cumsum(0, dtype=torch.float64))):
        assert a.dtype == e.numpy().dtype
        np.testing.assert_array_equal(a, e.numpy())
    np.testing.assert_array_equal(got[3], np.cumsum(ints))  # NumPy's: no axis flattens


def test_activation_modules_match_torch():
    x = normal(2, 6).astype(np.float32)
    pairs = [(nn.GELU(), torch.nn.GELU()), (nn.GELU("tanh"), torch.nn.GELU("tanh")),
             (nn.SiLU(), torch.nn.SiLU()), (nn.LeakyReLU(0.3), torch.nn.LeakyReLU(0.3)),
             (nn.ELU(0.5), torch.nn.ELU(0.5)), (nn.Softplus(2, 1), torch.nn.Softplus(2, 1))]
    for module, torch_module in pairs:
        got = gc.jit(module, backend="reference")(x)
        # against PyTorch in float64: its vectorised float32 erf is a few ulp off (GELU(-2.37)
        # 7e-6 off), which the float32 results near a cancellation show
        want = torch_module(torch.tensor(x, dtype=torch.float64)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert repr(nn.LeakyReLU(0.3)) == "LeakyReLU(negative_slope=0.3)"


# -- numba-cpu and ONNX ---------------------------------------------------------------------------
def activations_and_math(x):
    return (F.gelu(x), F.gelu(x, approximate="tanh"), F.silu(x), F.elu(x), F.softplus(x),
            F.leaky_relu(x), x.cumsum(1), x.cumprod(0), (x * (x > 0)).cumprod(1), x.prod(1),
            x.norm(dim=1), x.var(0), gc.einsum("ij,kj->ik", x, x), x.clamp(-0.5, 0.5).sin(),
            gc.einsum("...ij,...kj", x[None], x), gc.einsum("ii->i", x[:, :3]))


@pytest.mark.slow  # ~11-15 s: the forward and gradient kernels compile
def test_numba_cpu_matches_the_reference():
    x = normal(3, 4).astype(np.float32)
    got = gc.jit(activations_and_math, backend="numba-cpu")(x)
    want = gc.jit(activations_and_math, backend="reference")(x)
    for a, b in zip(got, want):
        assert (a.dtype, a.shape) == (b.dtype, b.shape)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    grad = gc.grad(lambda v: sum(o.sum() for o in activations_and_math(v)), backend="numba-cpu")(x)
    want_grad = gc.grad(lambda v: sum(o.sum() for o in activations_and_math(v)), backend="reference")(x)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_elu_keeps_the_digits_of_small_negative_inputs(backend):
    """exp(x) - 1 in float32 gave ELU(-1e-6) 5% off PyTorch's (its expm1 keeps every digit), and
    expm1's derivative as expm1(x) + 1 gave the gradient at -17 44% off (exp(x) keeps them)."""
    x = np.array([-1e-6, -3e-5, -1e-3, -0.3, -17.0, -20.0, -30.0, 0.0, 2.0], np.float32)
    got = gc.jit(lambda v: F.elu(v, 0.7), backend=backend)(x)
    np.testing.assert_allclose(got, TF.elu(torch.from_numpy(x), 0.7).numpy(), rtol=4e-7, atol=0)
    grad = gc.grad(lambda v: F.elu(v, 0.7).sum(), backend=backend)(x)
    np.testing.assert_allclose(grad, np.where(x > 0, 1.0, 0.7 * np.exp(x.astype(np.float64))), rtol=4e-7, atol=0)


def test_onnx_export_of_activation_modules_runs_under_onnxruntime(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 4),
                          nn.ELU(), nn.LeakyReLU(), nn.GELU("tanh"), nn.Softplus())
    x = normal(3, 6).astype(np.float32)
    path = tmp_path / "activations.onnx"
    gc.export_onnx(model, path, x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, gc.compile(model, x, backend="reference")(x), rtol=1e-5, atol=1e-6)


# -- refusals -------------------------------------------------------------------------------------
def trace(fn, *arrays):
    return gc.jit(fn, backend="reference")(*arrays)


@pytest.mark.parametrize("fn, error, message", [
    (lambda x: gc.einsum("i.j->j", x), GraphcError, r"labels must be letters, with at most one '\.\.\.'"),
    (lambda x: gc.einsum("...i...->i", x), GraphcError, r"labels must be letters"),
    (lambda x: gc.einsum("...ijk->i", x), ShapeError, r"'\.\.\.ijk' names 3 axes of an operand of shape"),
    (lambda x: gc.einsum("ij,jk->ik", x, x), ShapeError, r"label 'j' has sizes 4 and 3"),
    (lambda x: gc.einsum("ijk->i", x), ShapeError, r"'ijk' names 3 axes of an operand of shape \(3, 4\)"),
    (lambda x: gc.einsum("ij->z", x), GraphcError, r"output 'z' must name distinct labels"),
    (lambda x: x.clamp(), GraphcError, "clamp: give min, max or both"),
    (lambda x: x.norm("nuc"), GraphcError, "norm: p='nuc' is not supported"),
    (lambda x: x.astype("int32").var(), DTypeError, r"var/std: expects a floating-point tensor, got int32"),
    (lambda x: x.var(0, unbiased=True, correction=0), GraphcError, "give one of unbiased, correction"),
    (lambda x: gc.arange(0, 3, 0), GraphcError, "arange: step must be non-zero"),
    (lambda x: gc.triu(x[0]), ShapeError, r"triu: expects at least two dimensions, got shape \(4,\)"),
    (lambda x: F.gelu(x, approximate="fast"), GraphcError, "gelu: approximate must be 'none' or 'tanh'"),
])
def test_refusals_name_the_problem_and_the_users_line(fn, error, message):
    with pytest.raises(error, match=message) as info:
        trace(fn, normal(3, 4))
    assert "test_ops_math.py" in str(info.value)
