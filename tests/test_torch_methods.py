"""PyTorch's Tensor methods and functions that graphc builds from its own ops (`x.add(y,
alpha=2)`, `x.isnan()`, `x.index_select(1, i)`, `x.roll(1, 0)`, `x.masked_fill_(m, v)`,
...), checked against PyTorch on the reference backend and, for a sample, on numba-cpu."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F

torch = pytest.importorskip("torch")
TF = torch.nn.functional

rng = np.random.default_rng(0)
X = rng.standard_normal((3, 4)).astype(np.float32)
X[0, 1], X[1, 2], X[2, 0] = np.nan, np.inf, -np.inf  # the special values isnan/isinf tell apart
Y = rng.standard_normal((3, 4)).astype(np.float32)
XI = rng.integers(-7, 8, (3, 4))
YI = rng.integers(1, 4, (3, 4)) * np.where(rng.random((3, 4)) < 0.5, -1, 1)


def _index(values, like):
    return torch.tensor(values) if isinstance(like, torch.Tensor) else np.array(values)


FLOAT_CASES = {
    "add": lambda a, b: a.add(b, alpha=2), "sub": lambda a, b: a.sub(b, alpha=0.5),
    "mul": lambda a, b: a.mul(b), "div": lambda a, b: a.div(b), "pow": lambda a, b: b.abs().pow(2),
    "neg": lambda a, b: a.neg(), "eq": lambda a, b: a.eq(b), "lt": lambda a, b: a.lt(b),
    "ge": lambda a, b: a.ge(b), "isnan": lambda a, b: a.isnan(), "isinf": lambda a, b: a.isinf(),
    "isfinite": lambda a, b: a.isfinite(), "sign": lambda a, b: b.sign(),
    "rsqrt": lambda a, b: b.abs().rsqrt(), "reciprocal": lambda a, b: b.reciprocal(),
    "log1p": lambda a, b: b.abs().log1p(),
    "clamp_min": lambda a, b: b.clamp_min(0.1), "clamp_max": lambda a, b: b.clamp_max(0.1),
    "where": lambda a, b: a.where(b > 0, b), "maximum": lambda a, b: a.maximum(b),
    "minimum": lambda a, b: a.minimum(b), "lerp": lambda a, b: b.lerp(a, 0.3),
    "addcmul": lambda a, b: b.addcmul(b, b, value=2), "addcdiv": lambda a, b: b.addcdiv(b, b + 3, value=0.5),
    "new_zeros": lambda a, b: a.new_zeros(2, 3), "new_ones": lambda a, b: a.new_ones((2, 3)),
    "new_full": lambda a, b: a.new_full((2,), 7.0), "new_tensor": lambda a, b: a.new_tensor([1, 2, 3]),
    "unflatten": lambda a, b: b.unflatten(1, (2, -1)), "view_as": lambda a, b: b.view_as(b.t()),
    "logical_not": lambda a, b: b.logical_not(), "logical_and": lambda a, b: b.logical_and(a),
    "logical_xor": lambda a, b: b.logical_xor(b > 0),
    "index_select": lambda a, b: b.index_select(1, _index([3, 0, 0], b)),
    "narrow": lambda a, b: b.narrow(1, -3, 2), "select": lambda a, b: b.select(1, -1),
    "unbind": lambda a, b: b.unbind(1)[2], "roll": lambda a, b: b.roll(1, 1),
    "roll_dims": lambda a, b: b.roll((-1, 5), (0, 1)), "roll_flat": lambda a, b: b.roll(5),
    "repeat_interleave": lambda a, b: b.repeat_interleave(2, dim=0),
    "repeat_interleave_flat": lambda a, b: b.repeat_interleave(3),
    "outer": lambda a, b: b[0].outer(b[1]), "mm": lambda a, b: b.mm(b.t()),
    "bmm": lambda a, b: b.reshape(1, 3, 4).bmm(b.reshape(1, 4, 3)),
}


def _written(method, *args, **keywords):
    """A function writing a copy of its second argument in place with `method`, on a view
    (`[1]`, `[:, 1]`) where a method is usually called on one."""
    def write(a, b):
        c = b * 1
        target = {"zero_": c[1], "fill_": c[:, 1], "copy_": c[0]}.get(method, c)
        getattr(target, method)(*[arg(a, b) if callable(arg) else arg for arg in args], **keywords)
        return c
    return write


IN_PLACE_CASES = {
    "add_": _written("add_", lambda a, b: b, alpha=3), "sub_": _written("sub_", lambda a, b: b, alpha=2),
    "mul_": _written("mul_", 2), "div_": _written("div_", 4), "clamp_": _written("clamp_", -0.5, 0.5),
    "relu_": _written("relu_"), "masked_fill_": _written("masked_fill_", lambda a, b: b > 0, -1.0),
    "zero_": _written("zero_"), "fill_": _written("fill_", 3.0), "copy_": _written("copy_", lambda a, b: b[2]),
}


def _check(fn, a, b, backend="reference"):
    expected = fn(torch.tensor(a), torch.tensor(b)).numpy()
    got = np.asarray(gc.jit(fn, backend=backend)(a, b))
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, equal_nan=True)


@pytest.mark.parametrize("name", sorted(FLOAT_CASES))
def test_a_method_computes_as_pytorchs(name):
    _check(FLOAT_CASES[name], X, Y)


@pytest.mark.parametrize("name", sorted(IN_PLACE_CASES))
def test_an_in_place_method_writes_the_tensor_and_the_one_it_views(name):
    _check(IN_PLACE_CASES[name], X, Y)


@pytest.mark.parametrize("name", ["isnan", "isfinite", "roll_dims", "index_select", "repeat_interleave"])
def test_numba_cpu_computes_the_compositions_as_the_reference(name):
    _check(FLOAT_CASES[name], X, Y, backend="numba-cpu")


@pytest.mark.parametrize("fn", [lambda a, b: a.div(b, rounding_mode="trunc"),
                                lambda a, b: a.div(b, rounding_mode="floor"),
                                lambda a, b: a.isnan(), lambda a, b: a.isinf(),
                                lambda a, b: a.logical_not(), lambda a, b: a.sign(),
                                lambda a, b: a.roll(-2, 1)])
def test_integer_tensors_keep_their_dtype_as_in_pytorch(fn):
    expected = fn(torch.tensor(XI), torch.tensor(YI)).numpy()
    got = gc.jit(fn)(XI, YI)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fill", [lambda t: t.fill_(2.7), lambda t: t.masked_fill_(t > 0, 2.7),
                                  lambda t: t.masked_fill(t > 0, -2.7), lambda t: (t > 0).fill_(0.3)])
def test_a_fill_value_takes_the_tensors_dtype_as_in_pytorch(fill):
    """A float value for an int or bool tensor was refused (`cannot combine 2.7 with a int64
    tensor`), where x[i] = 2.7 and PyTorch's fills cast it."""
    def written(t):
        t = t * 1
        result = fill(t)
        return t if result is t else result
    expected = written(torch.tensor(XI)).numpy()
    got = gc.jit(written)(XI)
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def test_functions_match_pytorchs_and_numpys():
    a, b = X[1], Y[0]
    np.testing.assert_array_equal(gc.jit(gc.isnan)(X), np.isnan(X))
    np.testing.assert_array_equal(gc.jit(lambda x: gc.logical_or(x, x > 0))(XI), np.logical_or(XI, XI > 0))
    np.testing.assert_allclose(gc.jit(gc.outer)(a, b), np.outer(a, b))
    np.testing.assert_allclose(gc.jit(lambda: gc.eye(3, 4, dtype="float64"))(), np.eye(3, 4))
    np.testing.assert_allclose(gc.jit(lambda: gc.linspace(-1, 2, 7))(), np.linspace(-1, 2, 7, dtype=np.float32))
    np.testing.assert_allclose(gc.jit(lambda y: gc.roll(y, (1, -1), (0, 1)))(Y), np.roll(Y, (1, -1), (0, 1)))
    parts = gc.jit(lambda y: gc.unbind(y, -1))(Y)
    assert len(parts) == 4
    np.testing.assert_array_equal(parts[3], Y[:, 3])


def test_gradients_flow_through_the_compositions():
    def loss(y):
        moved = y.roll(1, 0).index_select(1, _index([0, 2, 2], y)).repeat_interleave(2, 1)
        return (moved * moved.narrow(0, 1, 1)).sum()
    torch_y = torch.tensor(Y, requires_grad=True)
    loss(torch_y).backward()
    np.testing.assert_allclose(gc.grad(loss)(Y), torch_y.grad.numpy(), rtol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda y: y.index_select(2, np.array([0])), r"index_select: dim 2 is not an axis of a tensor of shape \(3, 4\)"),
    (lambda y: y.index_select(0, np.array([[0]])), r"index_select: the index must be a 0-d or 1-D integer"),
    (lambda y: y.narrow(1, 2, 3), r"narrow: start 2 \(in \[-4, 4\]\) and length 3 do not fit axis 1 of size 4"),
    (lambda y: y.narrow(1, -5, 1), r"narrow: start -5 \(in \[-4, 4\]\) and length 1"),
    (lambda y: y.repeat_interleave(np.array([1, 2])), r"repeat_interleave: repeats must be an int"),
    (lambda y: y.roll((1, 2), 0), r"roll: 2 shifts for 1 dims"),
    (lambda y: y.mm(y[0]), r"mm: both operands must be 2-D"),
    (lambda y: y.bmm(y), r"bmm: both operands must be 3-D"),
    (lambda y: y.div(2, rounding_mode="round"), r"div: rounding_mode must be None, 'floor' or 'trunc'"),
    (lambda y: y.copy_(np.ones(3)), r"copy_: a source of shape \(3,\) does not broadcast to \(3, 4\)"),
    (lambda y: y.fill_(np.ones(2)), r"fill_: the value must be a number or a 0-d tensor"),
])
def test_wrong_arguments_are_named_at_the_users_line(call, message):
    with pytest.raises(gc.GraphcError, match=message + r".*test_torch_methods.py"):
        gc.jit(call)(Y)


def test_an_integer_tensor_to_a_constant_power_stays_integer_as_in_pytorch():
    """i ** 3 was refused (`pow: expects floating-point operands`); only ** 2 ran."""
    for exponent in (0, 1, 3, 7, np.int64(5)):
        expected = (torch.tensor(XI) ** int(exponent)).numpy()
        got = gc.jit(lambda i: i ** exponent)(XI)
        assert got.dtype == expected.dtype
        np.testing.assert_array_equal(got, expected)
    with pytest.raises(gc.GraphcError, match="integers to negative integer powers are not allowed"):
        gc.jit(lambda i: i ** -1)(XI)
    for power in (lambda i: 2 ** i.abs(), lambda i: i.pow(i.abs())):
        with pytest.raises(gc.GraphcError, match="pow: .* is not supported .*cast to float first"):
            gc.jit(power)(XI)


def test_sign_of_nan_is_pytorchs_zero_as_a_method_and_numpys_nan_as_gc_sign():
    x = np.array([np.nan, 2.0, -3.0, 0.0])
    np.testing.assert_array_equal(gc.jit(lambda a: a.sign())(x), torch.tensor(x).sign().numpy())
    np.testing.assert_array_equal(gc.jit(gc.sign)(x), np.sign(x))


def test_gather_reads_the_leading_part_of_the_other_axes_as_pytorch():
    """NumPy's take_along_axis broadcast an index of length 1 along the other axes: [[3, 0]]
    gathered from a (3, 4) tensor gave three rows, and a shorter index was refused."""
    x = np.arange(12.0).reshape(3, 4)
    for index in (np.array([[3, 0]]), np.array([[3, 0], [1, 1]])):
        expected = torch.tensor(x).gather(1, torch.tensor(index)).numpy()
        np.testing.assert_array_equal(gc.jit(lambda a: a.gather(1, index))(x), expected)
    with pytest.raises(gc.GraphcError, match=r"gather: the index \(4, 1\) must have the tensor's 2 dims"):
        gc.jit(lambda a: a.gather(1, np.zeros((4, 1), np.int64)))(x)


@pytest.mark.parametrize("make", [lambda c: c.roll(0, 1), lambda c: c.roll(3, 1),
                                  lambda c: c.repeat_interleave(1, 0), lambda c: c.repeat(1, 1),
                                  lambda c: gc.cat([c]), lambda c: gc.stack([c])[0], lambda c: c.clone()])
def test_a_copy_written_in_place_leaves_its_source(make):
    """roll by nothing, one repeat and cat or stack of one tensor returned the tensor itself
    (or a view of it): writing the result in place wrote the source, where PyTorch copies."""
    c = np.arange(6.0).reshape(2, 3)
    np.testing.assert_array_equal(gc.jit(lambda t: (make(t).add_(100), t)[1])(c), c)


@pytest.mark.parametrize("write", [lambda t: t[:, 1:].unflatten(1, (5, 1)).add_(100),
                                   lambda t: t[1:3].view(12).add_(1),
                                   lambda t: t[:, 2:4].reshape(4, 2, 1).add_(1),
                                   lambda t: t[:, ::3].view(2, 2, 2).add_(1),
                                   lambda t: t.t().reshape(24).add_(1)])
def test_views_of_strided_tensors_write_their_base_where_pytorchs_do(write):
    """A reshape (view, view_as, unflatten) of a tensor that is not contiguous was always a
    copy, so writes through one PyTorch makes a view were lost."""
    c = np.arange(24.0).reshape(4, 6)
    def written(t):
        write(t)
        return t
    np.testing.assert_array_equal(gc.jit(written)(c), written(torch.tensor(c)).numpy())


def test_view_refuses_what_only_a_copy_could_give():
    with pytest.raises(gc.GraphcError, match=r"view: a tensor of shape \(6, 4\) and strides \(1, 6\) "
                                             r"cannot be viewed as \(24,\).*use .reshape"):
        gc.jit(lambda t: t.t().view(24))(np.zeros((4, 6)))


def test_truncated_integer_division_is_exact_beyond_float64():
    x, y = np.array([2**62 + 1, -(2**60 + 7), 2**53 + 1, -7, 7]), np.array([1, 3, 1, 2, -2])
    expected = torch.tensor(x).div(torch.tensor(y), rounding_mode="trunc").numpy()
    np.testing.assert_array_equal(gc.jit(lambda a, b: a.div(b, rounding_mode="trunc"))(x, y), expected)


def test_keyword_names_and_tensor_factors_as_pytorchs():
    """alpha as a traced learning rate failed with a bool(tensor) error; PyTorch's keyword
    names (tensor1, vec2, mat2) were refused; new_full of a traced 0-d value failed."""
    w, g, lr = np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0]), np.array(0.1)
    np.testing.assert_allclose(gc.jit(lambda w, g, lr: (w * 1).add_(g, alpha=-lr))(w, g, lr), [0.9, 0.8, 0.7])
    np.testing.assert_allclose(gc.jit(lambda w, g: w.addcmul(tensor1=g, tensor2=g, value=0.5))(w, g),
                               [1.5, 3.0, 5.5])
    np.testing.assert_allclose(gc.jit(lambda w, g: w.outer(vec2=g))(w, g), np.outer(w, g))
    np.testing.assert_allclose(gc.jit(lambda w, lr: w.new_full((2,), lr))(w, lr), [0.1, 0.1])
    np.testing.assert_allclose(gc.jit(lambda w: (w * 8).div_(3, rounding_mode="floor"))(w), [2.0, 2.0, 2.0])


def test_a_square_root_power_is_pytorchs_sqrt_on_every_backend():
    """numba-cpu computed x ** 0.5 with C's pow: +inf at -inf and +0 at -0, where the
    reference and PyTorch give NaN and -0."""
    x = np.array([-np.inf, -0.0, -4.0, 4.0])
    expected = torch.tensor(x).pow(0.5).numpy()
    for backend in ("reference", "numba-cpu"):
        got = gc.jit(lambda a: a.pow(0.5), backend=backend)(x)
        np.testing.assert_array_equal(got, expected)
        assert np.signbit(got[1])


def test_add_and_sub_with_alpha_keep_the_operands_dtype_as_pytorchs():
    """other * alpha was computed with a Python int first: int32 became int64, bools int64
    (True.add(True, alpha=2) gave 3); a fractional alpha of integers was accepted."""
    i32, b = np.array([5, -3, 7], np.int32), np.array([True, False, True])
    for got, want in [(gc.jit(lambda x, y: x.add(y, alpha=2))(i32, b), torch.tensor(i32).add(torch.tensor(b), alpha=2)),
                      (gc.jit(lambda x: x.sub(x * 2, alpha=3))(i32), torch.tensor(i32).sub(torch.tensor(i32) * 2, alpha=3))]:
        assert got.dtype == np.int32 and np.array_equal(got, want.numpy())
    with pytest.raises(gc.GraphcError, match="alpha=2.5 is a float"):
        gc.jit(lambda x: x.add(x, alpha=2.5))(i32)
    with pytest.raises(gc.GraphcError, match="bool"):
        gc.jit(lambda x: x.add(x, alpha=2))(b)


def test_lerp_reaches_end_exactly_however_far_start_is():
    start = np.array([1e8, 3e7, 1], np.float32)
    end = np.array([1, -2, 1e8], np.float32)
    for weight in (1.0, np.full(3, 1.0, np.float32), np.float32([0.2, 0.7, 1.0])):
        got = gc.jit(lambda s, e, w=weight: s.lerp(e, w))(start, end)
        want = torch.tensor(start).lerp(torch.tensor(end), torch.tensor(weight) if not isinstance(weight, float) else weight)
        np.testing.assert_array_equal(got, want.numpy())


@pytest.mark.parametrize("equation, dtypes", [("ij,jk->ik", ("int64", "int64")), ("i,i->", ("int32", "int32")),
                                              ("i,i->i", ("float32", "bool")), ("i,j->ij", ("float32", "float64"))])
def test_einsum_promotes_its_operands_and_takes_integers(equation, dtypes):
    rng = np.random.default_rng(0)
    shapes = {"ij,jk->ik": [(2, 3), (3, 4)]}.get(equation, [(3,), (3,)])
    operands = [(rng.integers(0, 5, s) > 2 if d == "bool" else rng.integers(-4, 5, s)).astype(d)
                for s, d in zip(shapes, dtypes)]
    got = gc.jit(lambda *a: gc.einsum(equation, *a))(*operands)
    want = torch.einsum(equation, *[torch.tensor(o) for o in operands]).numpy()
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_expand_is_a_view_that_reads_later_writes_and_takes_a_fill():
    def read_after_write(t):
        row = t[:1].expand(2, 4)
        t[0, 0] = 100
        return row

    def fill_through(t):
        t[:1].expand_as(t).fill_(-1)
        return t
    t = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(gc.jit(read_after_write)(t), [[100, 1, 2, 3]] * 2)
    np.testing.assert_array_equal(gc.jit(fill_through)(t)[0], [-1] * 4)
    with pytest.raises(gc.GraphcError, match="expanded view"):
        gc.jit(lambda t: t[:1].expand(2, 4).add_(1))(t)
    with pytest.raises(gc.GraphcError, match="expanded view"):
        gc.jit(lambda t: t[:1].expand(2, 4)[1].fill_(1))(t)


def test_zero_dim_and_empty_tensor_edges_as_pytorchs():
    assert float(gc.jit(lambda x: x.transpose(0, 0) + x.transpose(0, -1))(np.float32(1.25))) == 2.5
    assert gc.jit(lambda x: x.unflatten(-1, (2, -1)))(np.zeros((0, 4), np.float32)).shape == (0, 2, 2)
    x = np.ones((3, 3), np.float32)
    for bad in (lambda x: x.triu(0.5), lambda x: x.tril(True), lambda x: x.sum(True)):
        with pytest.raises(TypeError):
            gc.jit(bad)(x)


def test_new_tensors_are_their_own_and_take_in_place_writes():
    """new_zeros/new_ones/new_full were expanded views of one number: every write was refused."""
    def fill_rows(x):
        z = x.new_zeros(2, 3)
        z[0] = 5.0
        return z.add_(x)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = torch.tensor(x).new_zeros(2, 3)
    want[0] = 5.0
    np.testing.assert_array_equal(gc.jit(fill_rows)(x), want.add_(torch.tensor(x)).numpy())
    np.testing.assert_array_equal(gc.jit(lambda x: x.new_ones(2, 3).mul_(x))(x), x)


def test_more_argument_checks_as_pytorchs():
    i32, f32 = np.array([1, 2, 3], np.int32), np.float32([1, 2, -3])
    assert float(gc.jit(lambda x: x.flip(0) + x.flip(-1))(np.float32(1.5))) == 3.0  # 0-d
    for bad, message in [(lambda x: x.add(x, alpha=2.0), "alpha=2.0 is a float"),
                         (lambda x: x.lerp(x, 0.5), "lerp: expects floating-point")]:
        with pytest.raises(gc.GraphcError, match=message):
            gc.jit(bad)(i32)
    with pytest.raises(gc.GraphcError, match="bool alpha"):
        gc.jit(lambda x: x.add(x, alpha=True))(f32)
    for sizes in ((3.7, -1), (True, -1)):
        with pytest.raises(TypeError, match="sizes must be ints"):
            gc.jit(lambda x, s=sizes: x.unflatten(1, s))(np.zeros((2, 12), np.float32))


def test_scatter_add_index_add_kthvalue_and_axis_moves_as_pytorchs():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    idx, src = rng.integers(0, 5, (3, 4)), rng.standard_normal((3, 6)).astype(np.float32)
    tx = torch.tensor(x)
    np.testing.assert_allclose(gc.jit(lambda x, i, s: x.scatter_add(1, i, s))(x, idx, src),
                               tx.scatter_add(1, torch.tensor(idx), torch.tensor(src)).numpy(), rtol=1e-6, atol=1e-6)
    picks, rows = np.array([0, 2, 2, 4]), rng.standard_normal((3, 4)).astype(np.float32)
    np.testing.assert_allclose(gc.jit(lambda x, i, s: x.index_add(1, i, s, alpha=2.0))(x, picks, rows),
                               tx.index_add(1, torch.tensor(picks), torch.tensor(rows), alpha=2.0).numpy(),
                               rtol=1e-6, atol=1e-6)
    small = src[:, :4]  # gradients (PyTorch's own backward refuses a src larger than the index)
    grads = gc.grad(lambda x, s: x.scatter_add(1, idx, s).square().sum(), argnums=(0, 1))(x, small)
    tx, ts = torch.tensor(x, requires_grad=True), torch.tensor(small, requires_grad=True)
    tx.scatter_add(1, torch.tensor(idx), ts).square().sum().backward()
    np.testing.assert_allclose(grads[0], tx.grad.numpy(), rtol=1e-5)
    np.testing.assert_allclose(grads[1], ts.grad.numpy(), rtol=1e-5)
    for k in (1, 3, 5):
        values, indices = gc.jit(lambda x: tuple(x.kthvalue(k, 1)))(x)
        want = torch.tensor(x).kthvalue(k, 1)
        assert np.array_equal(values, want.values.numpy()) and np.array_equal(indices, want.indices.numpy())
    y = rng.standard_normal((2, 3, 4)).astype(np.float32)
    ty = torch.tensor(y)
    for k in range(-1, 5):
        assert np.array_equal(gc.jit(lambda y: y.rot90(k, (1, 2)))(y), ty.rot90(k, (1, 2)).numpy())
    assert np.array_equal(gc.jit(lambda y: y.movedim((0, 1), (2, 0)))(y), ty.movedim((0, 1), (2, 0)).numpy())
    assert np.array_equal(gc.jit(lambda y: y.swapaxes(0, 2))(y), ty.swapaxes(0, 2).numpy())
    with pytest.raises(gc.GraphcError, match="static shapes"):
        gc.jit(lambda x: x.masked_select(x > 0))(x)
    # a NumPy mask selects as x[mask] does (it was refused as a traced one)
    mask = np.array([True, False, True, True])
    assert np.array_equal(gc.jit(lambda y: y.masked_select(mask))(y),
                          ty.masked_select(torch.tensor(mask)).numpy())
    with pytest.raises(gc.DTypeError, match="masked_select: the mask must be boolean, got int64"):
        gc.jit(lambda y: y.masked_select(mask.astype(np.int64)))(y)  # it gathered rows 1, 0, 1...


def test_scatter_writes_src_or_a_value_and_differentiates_as_pytorchs():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5)).astype(np.float32)
    idx = np.array([[0, 2, 1], [2, 0, 2]])  # no index repeats along dim 0 within a column
    src = rng.standard_normal((2, 4)).astype(np.float32)
    tx, tidx = torch.tensor(x), torch.tensor(idx)
    np.testing.assert_array_equal(gc.jit(lambda x, i, s: x.scatter(0, i, s))(x, idx, src),
                                  tx.scatter(0, tidx, torch.tensor(src)).numpy())
    along_rows = np.array([[4, 0], [1, 3], [2, 2]])
    np.testing.assert_array_equal(gc.jit(lambda x, i: x.scatter(1, i, 7.5))(x, along_rows),
                                  tx.scatter(1, torch.tensor(along_rows), 7.5).numpy())

    def in_place(x, i):
        y = x * 1
        y.scatter_(1, i, value=-1.0)
        y.scatter_add_(1, i, np.ones((3, 2), np.float32))
        return y.index_add_(0, np.array([2, 0]), np.ones((2, 5), np.float32), alpha=3)

    expected = tx.clone().scatter_(1, torch.tensor(along_rows), -1.0)
    expected.scatter_add_(1, torch.tensor(along_rows), torch.ones(3, 2))
    expected.index_add_(0, torch.tensor([2, 0]), torch.ones(2, 5), alpha=3)
    np.testing.assert_array_equal(gc.jit(in_place)(x, along_rows), expected.numpy())
    small = src[:, :3]  # PyTorch's backward refuses a src larger than the index
    grads = gc.grad(lambda x, s: (x.scatter(0, idx, s) ** 2).sum(), argnums=(0, 1))(x, small)
    tx, ts = torch.tensor(x, requires_grad=True), torch.tensor(small, requires_grad=True)
    (tx.scatter(0, tidx, ts) ** 2).sum().backward()
    np.testing.assert_allclose(grads[0], tx.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(grads[1], ts.grad.numpy(), rtol=1e-6)
    with pytest.raises(gc.GraphcError, match="reduce='multiply' is not supported"):
        gc.jit(lambda x: x.scatter(0, idx, small, reduce="multiply"))(x)
    with pytest.raises(gc.ShapeError, match=r"scatter: the index \(2, 3\) must have"):
        gc.jit(lambda x: x.scatter(0, idx, np.ones((2, 2), np.float32)))(x)


def test_scatter_add_takes_an_index_covering_part_of_the_other_axes():
    idx = np.array([[0, 1], [4, 3], [0, 1]])
    src = np.full((3, 2), 3.0, np.float32)
    expected = torch.zeros(5, 4).scatter_add(0, torch.tensor(idx), torch.tensor(src)).numpy()
    np.testing.assert_array_equal(gc.jit(lambda z: z.scatter_add(0, idx, src))(np.zeros((5, 4), np.float32)),
                                  expected)
    grad = gc.grad(lambda s: (np.arange(20, dtype=np.float32).reshape(5, 4) * gc.zeros((5, 4)).scatter_add(0, idx, s)).sum())(src)
    np.testing.assert_array_equal(grad, [[0, 5], [16, 13], [0, 5]])  # w[idx[i, j], j]


def test_scatter_refuses_negative_indices_and_src_of_another_dtype_as_pytorch():
    x = np.zeros((1, 5), np.float32)
    with pytest.raises(gc.GraphcError, match=r"scatter: index -1 at position \(0, 0\) .* \[0, 5\)"):
        gc.jit(lambda a: a.scatter(1, np.array([[-1]]), 9.0))(x)
    with pytest.raises(gc.GraphcError, match="out of range"):  # traced: refused when run
        gc.jit(lambda a, i: a.scatter(1, i, 9.0))(x, np.array([[-2]]))
    ints = np.zeros((1, 3), np.int64)
    with pytest.raises(gc.GraphcError, match="src is float32 where this tensor is int64"):
        gc.jit(lambda a: a.scatter(1, np.array([[0]]), np.full((1, 1), 2.7, np.float32)))(ints)
    np.testing.assert_array_equal(gc.jit(lambda a: a.scatter(1, np.array([[1]]), 2.7))(ints),
                                  torch.zeros(1, 3, dtype=torch.int64).scatter(1, torch.tensor([[1]]), 2.7).numpy())


def test_dtype_keywords_and_module_to_another_tensor_as_pytorch():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    tx = torch.tensor(x)
    for ours, theirs in ((lambda t: t.sum(dtype=np.float64), lambda t: t.sum(dtype=torch.float64)),
                         (lambda t: t.mean(1, dtype="float64"), lambda t: t.mean(1, dtype=torch.float64)),
                         (lambda t: F.softmax(t, 1, dtype=np.float64), lambda t: TF.softmax(t, 1, dtype=torch.float64)),
                         (lambda t: F.log_softmax(t, 1, dtype=np.float64), lambda t: TF.log_softmax(t, 1, dtype=torch.float64))):
        got, expected = gc.jit(ours)(x), theirs(tx).numpy()
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=1e-12)
    model = gc.nn.Linear(2, 2).to(torch.zeros(1, dtype=torch.float64))
    assert model.weight.dtype == np.float64
    with pytest.raises(gc.GraphcError, match="dtype bfloat16 is not supported"):
        gc.jit(lambda t: t * 2)(torch.ones(3, dtype=torch.bfloat16))


@pytest.mark.parametrize("loss", ["mse_loss", "l1_loss", "smooth_l1_loss", "kl_div",
                                  "binary_cross_entropy_with_logits"])
def test_a_float64_target_promotes_a_loss_of_float32_predictions_as_pytorch(loss):
    prediction = np.array([0.25, 0.5], np.float32)
    target = np.array([0.25 + 1e-9, 0.5 - 3e-9])
    got = gc.jit(lambda p, t: getattr(F, loss)(p, t))(prediction, target)
    expected = getattr(TF, loss)(torch.tensor(prediction), torch.tensor(target))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected.item(), rtol=1e-7 if "logits" in loss else 1e-12)
