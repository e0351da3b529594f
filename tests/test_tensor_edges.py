"""Edge cases of the Tensor surface, each once silently wrong: boolean masks of the wrong shape,
bool indices, logsumexp of infinite lines, rsqrt at 0 and inf on numba-cpu, integer sums,
means over empty axes, and the argument checks of unsqueeze, flatten and squeeze. Checked
against NumPy or hand-computed values on the reference interpreter and numba-cpu."""
import numpy as np
import pytest

import graphc as gc
from graphc.ir.errors import GraphcError, ShapeError

BACKENDS = pytest.mark.parametrize("backend", ["reference", None], ids=["reference", "numba-cpu"])
USER_LINE = r"\(at .*test_tensor_edges\.py:\d+\)"
X = np.arange(24, dtype=np.float32).reshape(4, 6)


# -- 1. constant boolean masks must match the axes they index -----------------------------------
@BACKENDS
@pytest.mark.parametrize("mask, axis, sizes", [
    ((np.array([True, False]),), 0, "4 .* 2"),
    ((np.ones((2, 3), bool),), 0, "4 .* 2"),
    ((np.ones(5, bool),), 0, "4 .* 5"),  # too long: was an IndexOutOfRangeError from gather
    ((slice(None), np.ones(4, bool)), 1, "6 .* 4"),
], ids=["short", "2d", "long", "second_axis"])
def test_boolean_mask_of_the_wrong_shape_is_refused(backend, mask, axis, sizes):
    with pytest.raises(IndexError, match=rf"along axis {axis}: size of axis is {sizes}.*{USER_LINE}"):
        gc.jit(lambda t: t[mask], backend=backend)(X)


@BACKENDS
def test_boolean_masks_of_the_right_shape_still_select(backend):
    rows, cols = np.array([True, False, True, True]), np.array([0, 1, 1, 0, 0, 1], bool)
    np.testing.assert_array_equal(gc.jit(lambda t: t[rows], backend=backend)(X), X[rows])
    np.testing.assert_array_equal(gc.jit(lambda t: t[..., cols], backend=backend)(X), X[..., cols])
    block = X > 10
    np.testing.assert_array_equal(gc.jit(lambda t: t[block], backend=backend)(X), X[block])


# -- 2. a bool index is a 0-d mask, not the integer 0 or 1 ---------------------------------------
@BACKENDS
@pytest.mark.parametrize("index", [
    True, False, np.bool_(True), np.bool_(False), np.array(True), (slice(None), True),
    (slice(None), False), (True, 1), (Ellipsis, True), (None, True, slice(1, 3)),
], ids=["true", "false", "np_true", "np_false", "0d_array", "inner_true", "inner_false",
        "with_int", "after_ellipsis", "with_none"])
def test_bool_index_adds_an_axis_as_in_numpy(backend, index):
    got = gc.jit(lambda t: t[index], backend=backend)(X)
    assert got.shape == X[index].shape
    np.testing.assert_array_equal(got, X[index])


def test_bool_index_gradient_and_assignment():
    grad = gc.grad(lambda t: (t[True] * 2.0).sum() + t[:, False].sum())(X)
    np.testing.assert_array_equal(grad, np.full_like(X, 2.0))

    def assign(t, flag):
        t = t * 1.0
        t[flag] = -1.0
        return t
    np.testing.assert_array_equal(gc.jit(lambda t: assign(t, True))(X), np.full_like(X, -1.0))
    np.testing.assert_array_equal(gc.jit(lambda t: assign(t, False))(X), X)


def test_bool_index_beside_integer_arrays_is_refused():
    with pytest.raises(GraphcError, match=rf"a bool .* integer-array indices.*{USER_LINE}"):
        gc.jit(lambda t: t[[0, 1], True])(X)


# -- 3. logsumexp of lines holding infinities ----------------------------------------------------
@BACKENDS
def test_logsumexp_of_infinite_lines(backend):
    x = np.array([[-np.inf, -np.inf], [np.inf, 1.0], [1.0, 2.0], [-np.inf, 0.5]], np.float32)
    expected = [-np.inf, np.inf, np.log(np.exp(1.0) + np.exp(2.0)), 0.5]
    np.testing.assert_allclose(gc.jit(lambda t: gc.logsumexp(t, 1), backend=backend)(x), expected,
                               rtol=1e-6)
    np.testing.assert_allclose(gc.jit(lambda t: t.logsumexp(0), backend=backend)(x.T), expected,
                               rtol=1e-6)
    empty = np.zeros((0, 3), np.float32)  # an empty line: -inf, as PyTorch (it raised)
    np.testing.assert_array_equal(gc.jit(lambda t: gc.logsumexp(t, 0), backend=backend)(empty), [-np.inf] * 3)


@BACKENDS
def test_logsumexp_gradient_is_softmax_for_finite_lines(backend):
    x = np.array([[1.0, 2.0, 3.0], [-1000.0, 0.0, 1000.0]], np.float64)
    softmax = np.exp(x - x.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    grad = gc.grad(lambda t: gc.logsumexp(t, 1).sum(), backend=backend)(x)
    np.testing.assert_allclose(grad, softmax, rtol=1e-12)


# -- 4. rsqrt and 1/sqrt at 0 and inf on numba-cpu (vectorised loops) ----------------------------
ZERO_FOUR_INF = np.tile(np.array([0.0, 4.0, np.inf], np.float32), 86)  # 258 elements


@BACKENDS
@pytest.mark.parametrize("fn", [gc.rsqrt, lambda t: 1 / t.sqrt()], ids=["rsqrt", "one_over_sqrt"])
def test_reciprocal_square_root_at_zero_and_inf(backend, fn):
    got = gc.jit(fn, backend=backend)(ZERO_FOUR_INF)
    np.testing.assert_array_equal(got, np.tile(np.array([np.inf, 0.5, 0.0], np.float32), 86))


@BACKENDS
def test_sqrt_gradient_at_zero(backend):
    x = np.tile(np.array([0.0, 4.0], np.float32), 128)
    grad = gc.grad(lambda t: t.sqrt().sum(), backend=backend)(x)
    np.testing.assert_array_equal(grad, np.tile(np.array([np.inf, 0.25], np.float32), 128))


# -- 5. integer sums accumulate in int64 ----------------------------------------------------------
@BACKENDS
def test_int32_sum_accumulates_in_int64(backend):
    got = gc.jit(lambda t: t.sum(), backend=backend)(np.full(3, 2**30, np.int32))
    assert got.dtype == np.int64 and got == 3 * 2**30
    rows = gc.jit(lambda t: gc.sum(t, 1), backend=backend)(np.full((2, 3), 2**30, np.int32))
    assert rows.dtype == np.int64
    np.testing.assert_array_equal(rows, [3 * 2**30] * 2)
    flags = gc.jit(lambda t: t.sum(), backend=backend)(np.ones(5, bool))
    assert flags.dtype == np.int64 and flags == 5
    running = gc.jit(lambda t: t.cumsum(0), backend=backend)(np.full(3, 2**30, np.int32))
    assert running.dtype == np.int64 and running[-1] == 3 * 2**30


def test_float_sum_keeps_its_dtype_and_gradient():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert gc.jit(lambda t: t.sum(1))(x).dtype == np.float32
    np.testing.assert_array_equal(gc.grad(lambda t: (t.sum(0) * 2.0).sum())(x), np.full_like(x, 2.0))


# -- 6. the mean of no elements is NaN -----------------------------------------------------------
@BACKENDS
def test_mean_over_an_empty_axis_is_nan(backend):
    empty = np.zeros((0, 3), np.float32)
    with np.errstate(all="raise"):  # no division by zero at trace time either
        columns = gc.jit(lambda t: t.mean(0), backend=backend)(empty)
        everything = gc.jit(lambda t: t.mean(), backend=backend)(empty)
    assert columns.shape == (3,) and np.isnan(columns).all()
    assert np.isnan(everything)
    np.testing.assert_array_equal(gc.jit(lambda t: t.mean(1), backend=backend)(empty), np.zeros(0))


# -- 7-9. the dim arguments of unsqueeze, flatten and squeeze ------------------------------------
@pytest.mark.parametrize("dim", [3, -4, 7])
def test_unsqueeze_out_of_range_is_refused(dim):
    with pytest.raises(ShapeError, match=rf"unsqueeze: dim {dim} .* expected it in \[-3, 2\] {USER_LINE}"):
        gc.jit(lambda t: t.unsqueeze(dim))(X)


@pytest.mark.parametrize("dim, shape", [(0, (1, 4, 6)), (2, (4, 6, 1)), (-1, (4, 6, 1)),
                                        (-3, (1, 4, 6))])
def test_unsqueeze_in_range(dim, shape):
    assert gc.jit(lambda t: t.unsqueeze(dim), backend="reference")(X).shape == shape


def test_flatten_start_after_end_is_refused():
    x = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(ShapeError, match=rf"flatten: start_dim 2 .* comes after end_dim 1.*{USER_LINE}"):
        gc.jit(lambda t: t.flatten(2, 1))(x)
    assert gc.jit(lambda t: t.flatten(1, 1), backend="reference")(x).shape == (2, 3, 4)
    assert gc.jit(lambda t: t.flatten(0, -1), backend="reference")(x).shape == (24,)
    assert gc.jit(lambda t: gc.flatten(t, 1), backend="reference")(x).shape == (2, 12)


@BACKENDS
def test_squeeze_skips_named_axes_whose_length_is_not_one(backend):
    x = np.arange(6, dtype=np.float32).reshape(1, 3, 1, 2)
    for dim, expected in [(1, x), ((0, 1), x[0]), ((0, 1, 2), x[0, :, 0]), (None, x[0, :, 0]),
                          (-1, x), (-2, x[:, :, 0])]:
        got = gc.jit(lambda t: t.squeeze(dim), backend=backend)(x)
        assert got.shape == expected.shape, dim
        np.testing.assert_array_equal(got, expected)
    scalar = np.float32(2.0)
    assert gc.jit(lambda t: t.squeeze(0), backend=backend)(scalar).shape == ()


def test_numpys_squeeze_of_a_named_axis_longer_than_one_is_refused_as_numpy_refuses_it():
    x = np.zeros((2, 3, 1), np.float32)
    with pytest.raises(ShapeError, match="cannot squeeze axis 1 of size 3"):
        gc.jit(lambda t: np.squeeze(t, 1))(x)
    assert gc.jit(lambda t: np.squeeze(t, 2))(x).shape == (2, 3)
    assert gc.jit(lambda t: t.squeeze(1))(x).shape == (2, 3, 1)  # the Tensor method is PyTorch's


def test_numpy_reductions_take_numpys_positional_order():
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(gc.jit(lambda a: np.var(a, 0, None))(x), np.var(x, 0, None))
    np.testing.assert_allclose(gc.jit(lambda a: np.std(a, 1, None))(x), np.std(x, 1, None), rtol=1e-6)
    assert gc.jit(lambda a: np.sum(a, 0, np.float64))(x).dtype == np.float64
    with pytest.raises(GraphcError, match="takes no out="):
        gc.jit(lambda a: np.sum(a, 0, None, np.empty(3)))(x)
    for f in (np.argmax, np.argmin):
        assert gc.jit(lambda a: f(a, keepdims=True))(x).shape == (1, 1)
    assert gc.jit(lambda a: a.argmax(keepdim=True))(x).shape == (1, 1)


def test_numpy_shape_functions_take_numpys_argument_forms():
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(gc.jit(lambda a: np.concatenate([a, a], axis=None))(x),
                                  np.concatenate([x, x], axis=None))
    assert gc.jit(lambda a: np.expand_dims(a, (0, 2)))(x).shape == np.expand_dims(x, (0, 2)).shape
    assert gc.jit(lambda a: np.expand_dims(a, -1))(x).shape == (2, 3, 1)
    np.testing.assert_array_equal(gc.jit(lambda a: np.broadcast_to(a[0], 3))(x), x[0])
    with pytest.raises(ShapeError, match="out of bounds for a 0-d array"):
        gc.jit(lambda a: np.sort(a.sum()))(x)


def test_pad_refuses_to_crop_more_than_an_axis_and_replicates_any_width():
    import graphc.nn.functional as F
    x = np.arange(6.0, dtype=np.float32).reshape(2, 3)
    for widths in ((-5, 1), (-2, -2)):
        with pytest.raises(ShapeError, match="crop more than the 3 elements"):
            gc.jit(lambda a: F.pad(a, widths))(x)
    assert gc.jit(lambda a: F.pad(a, (-3, 0)))(x).shape == (2, 0)
    wide = gc.jit(lambda a: F.pad(a, (5, 1), mode="replicate"))(x.reshape(1, 2, 3))
    np.testing.assert_array_equal(wide[0, 0], [0, 0, 0, 0, 0, 0, 1, 2, 2])


def _transposed_convolution(x, w, stride, padding, output_padding, dilation):
    """By definition: every input pixel adds its weighted kernel into the output."""
    n, c_in, h, wd = x.shape
    k = w.shape[2]
    full = np.zeros((n, w.shape[1], (h - 1) * stride + dilation * (k - 1) + 1 + output_padding,
                     (wd - 1) * stride + dilation * (k - 1) + 1 + output_padding))
    for i in range(h):
        for j in range(wd):
            for a in range(k):
                for b in range(k):
                    full[:, :, i * stride + a * dilation, j * stride + b * dilation] += (
                        x[:, :, i, j] @ w[:, :, a, b])
    size = full.shape[2] - 2 * padding, full.shape[3] - 2 * padding
    return full[:, :, padding:padding + size[0], padding:padding + size[1]]


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
@pytest.mark.parametrize("stride, dilation, padding, output_padding",
                         [(1, 2, 0, 1), (2, 3, 0, 2), (1, 3, 1, 2)])
def test_conv_transpose_with_output_padding_past_the_stride(backend, stride, dilation, padding,
                                                            output_padding):
    import graphc.nn.functional as F
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((3, 2, 3, 3))
    got = gc.jit(lambda a, b: F.conv_transpose2d(a, b, stride=stride, padding=padding,
                                                 output_padding=output_padding, dilation=dilation),
                 backend=backend)(x, w)
    np.testing.assert_allclose(got, _transposed_convolution(x, w, stride, padding, output_padding,
                                                            dilation), rtol=1e-10, atol=1e-12)


# -- gradients PyTorch gives as 0 where an infinite cotangent meets a blocked input -------------
@BACKENDS
@pytest.mark.parametrize("blocked", [lambda t: gc.clamp(t, min=0.0), lambda t: gc.nn.functional.relu(t),
                                     lambda t: gc.maximum(t, 0.0)], ids=["clamp", "relu", "maximum"])
def test_sqrt_of_a_clamped_square_distance_has_pytorchs_gradient(backend, blocked):
    """sqrt(clamp(d2, min=0)) at a d2 rounded below 0: 0 * inf made the gradient NaN."""
    d2 = np.array([-1e-12, 0.25, 4.0], np.float32)
    grad = gc.grad(lambda t: gc.sqrt(blocked(t)).sum(), backend=backend)(d2)
    np.testing.assert_allclose(grad, [0.0, 1.0, 0.25])


@BACKENDS
@pytest.mark.parametrize("p", [3, 1.5, 4])
def test_the_p_norm_of_a_zero_vector_has_gradient_zero(backend, p):
    rows = np.array([[0.0, 0.0], [1.0, -2.0]], np.float32)
    grad = gc.grad(lambda t: gc.norm(t, p, dim=1).sum(), backend=backend)(rows)
    expected = np.sign(rows[1]) * np.abs(rows[1]) ** (p - 1) / (np.abs(rows[1]) ** p).sum() ** (1 - 1 / p)
    np.testing.assert_allclose(grad, [[0.0, 0.0], expected], rtol=1e-5)


# -- elementwise kernels keep IEEE arithmetic on numba-cpu --------------------------------------
@pytest.mark.parametrize("f, args", [
    (lambda x, y: (x + y) - y, ([-2.0, 1.0], [np.inf, 3.0])),   # reassociated: x
    (lambda x, y: x * 1e30 * 1e30 + y, ([0.0, 1e-30], [0.0, 0.0])),  # x * inf: NaN at 0
    (lambda x, y: x + (-x) + y, ([np.inf, np.nan], [1.0, 1.0])),  # cancelled to 0
    (lambda x, y: gc.exp(x) * gc.exp(-x) + y, ([800.0, 1.0], [0.0, 0.0])),  # 1
    (lambda x, y: (x + 12582912.0) - 12582912.0 + y, ([2.3, -1.5], [0.0, 0.0])),  # rounding trick
], ids=["add_sub", "scaled_twice", "cancelled", "exp_product", "round"])
def test_numba_cpu_elementwise_kernels_compute_what_the_reference_computes(f, args):
    """Fastmath reassociation rewrote elementwise expressions as algebra: NaN from finite
    inputs, infinities lost, the float32 rounding trick undone."""
    arrays = [np.array(a, np.float32) for a in args]
    with np.errstate(all="ignore"):
        expected = gc.jit(f, backend="reference")(*arrays)
    np.testing.assert_array_equal(gc.jit(f, backend="numba-cpu")(*arrays), expected)


def test_a_python_integer_too_wide_for_the_tensor_is_refused_at_the_users_line():
    """A bare NumPy OverflowError from inside the tracer, naming nothing of the user's."""
    x = np.array([1, 2, -3], np.int32)
    with pytest.raises(gc.GraphcError,
                       match=rf"2147483648 does not fit the int32 operand.*astype\('int64'\).*{USER_LINE}"):
        gc.jit(lambda t: t + 2**31)(x)
    with pytest.raises(gc.GraphcError, match=rf"int64, the widest integer, cannot hold it {USER_LINE}"):
        gc.jit(lambda t: t == 2**70)(x.astype(np.int64))
    np.testing.assert_array_equal(gc.jit(lambda t: t < 2**31 - 1)(x), [True] * 3)


# -- a 0-d tensor reduced over dim 0 or -1, as PyTorch takes it: as one of shape (1,) ------------
SCALAR_REDUCTIONS = {  # (graphc, the value PyTorch gives for the 0-d tensor 3.0 over dim 0 / -1)
    "sum": (lambda t, d: t.sum(d), 3.0), "mean": (lambda t, d: t.mean(dim=d), 3.0),
    "amax": (lambda t, d: t.amax(d), 3.0), "max_values": (lambda t, d: t.max(d).values, 3.0),
    "min_indices": (lambda t, d: t.min(d).indices, 0), "argmax": (lambda t, d: t.argmax(d), 0),
    "argmin": (lambda t, d: gc.argmin(t, d), 0), "logsumexp": (lambda t, d: gc.logsumexp(t, d), 3.0),
    "softmax": (lambda t, d: t.softmax(d), 1.0),
    "log_softmax": (lambda t, d: gc.nn.functional.log_softmax(t, d), 0.0),
    "var": (lambda t, d: t.var(d, unbiased=False), 0.0),
    "std_keepdim": (lambda t, d: t.std(d, keepdim=True), np.nan),
}
OVER_SEVERAL_AXES = ("sum", "mean", "amax", "logsumexp", "var", "std_keepdim")


@BACKENDS
@pytest.mark.parametrize("name, dim", [(name, dim) for name in SCALAR_REDUCTIONS for dim in (0, -1)]
                         + [(name, (0,)) for name in OVER_SEVERAL_AXES])
def test_a_scalar_reduces_over_dim_0_or_minus_1_as_in_pytorch(backend, name, dim):
    reduce, expected = SCALAR_REDUCTIONS[name]
    out = np.asarray(gc.jit(lambda t: reduce(t, dim), backend=backend)(np.float32(3.0)))
    assert out.shape == ()
    np.testing.assert_allclose(out, expected)


def test_a_scalar_refuses_other_dims():
    with pytest.raises(ShapeError, match=r"axis 1 is out of range .* rank 0"):
        gc.jit(lambda t: t.sum(1), backend="reference")(np.float32(3.0))


# -- in-place operators change the Tensor object, as PyTorch's --------------------------------
@BACKENDS
def test_in_place_operators_change_the_tensor_every_name_refers_to(backend):
    def f(x):
        y = x * 1
        z = y  # a second name: PyTorch's z sees y += 1 (graphc's rebound y and left z alone)
        y += 1
        y *= 2
        y[0, 0] = 100
        return z
    np.testing.assert_array_equal(gc.jit(f, backend=backend)(np.zeros((2, 2), np.float32)), [[100, 2], [2, 2]])
    # gradients flow through them as through x = x * 3
    np.testing.assert_allclose(gc.grad(lambda x: _tripled_in_place(x).sum(), backend=backend)(X), np.full_like(X, 3))


def _tripled_in_place(x):
    y = x + 0
    y *= 3
    return y


def test_in_place_operators_keep_the_shape_and_dtype_or_say_why_not():
    def run(f, *xs):
        return gc.jit(f, backend="reference")(*xs)
    ints, floats = np.arange(3), np.ones(3, np.float32)
    out = run(lambda a, b: _in_place_add(a, b), floats, np.ones(3, np.float64))
    assert out.dtype == np.float32  # float32 += float64 stays float32, as in PyTorch
    with pytest.raises(gc.GraphcError, match=rf"x \+= y: the result is float32, .* into x \(int64\) in place.*{USER_LINE}"):
        run(lambda a, b: _in_place_add(a, b), ints, floats)
    with pytest.raises(ShapeError, match=rf"x \+= y: the result's shape \(2, 3\) differs from x's \(3,\).*{USER_LINE}"):
        run(lambda a, b: _in_place_add(a, b), floats, np.ones((2, 3), np.float32))


def _in_place_add(a, b):
    a += b
    return a


def test_a_power_with_int32_exponents_runs_on_numba_cpu():
    """LLVM's 'afn' fastmath turned pow(x, float(n)) with an int32 n into powi, whose runtime
    function is not linked: the process aborted (LLVM ERROR: Symbol not found: __powisf2). Run
    in a child process, so that a regression fails this test rather than the whole run."""
    import subprocess
    import sys
    script = """
import numpy as np, graphc as gc
x, n = np.array([1.0, 2.0, 3.0], np.float32), np.array([3, -7, 0], np.int32)
print(gc.jit(lambda x, n: x ** n)(x, n).tolist(), gc.jit(lambda x, n: (x.abs() ** n).sum(0))(x, n).tolist(),
      gc.jit(lambda n: 2.0 ** n)(n).tolist())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["[1.0,", "0.0078125,", "1.0]", "2.0078125", "[8.0,", "0.0078125,", "1.0]"]


def test_triangles_of_a_bool_tensor_stay_bool():
    b = np.ones((2, 3), bool)
    for f in (lambda b: b.tril(), lambda b: gc.triu(b, 1)):
        out = gc.jit(f, backend="reference")(b)
        assert out.dtype == np.bool_ and out.sum() == 3


@BACKENDS
def test_cat_and_max_with_another_tensor_promote_mixed_dtypes_as_pytorch(backend):
    """They raised DTypeError where PyTorch promotes (gc.maximum already did)."""
    floats, ints, bools = np.ones((2, 2), np.float32), np.arange(4).reshape(2, 2), np.eye(2, dtype=bool)
    out = gc.jit(lambda a, b, c: gc.cat([a, b, c]), backend=backend)(floats, ints, bools)
    assert out.dtype == np.float32 and out.shape == (6, 2)
    np.testing.assert_array_equal(out[2:4], ints)
    assert gc.jit(lambda b, c: gc.cat([b, c], 1), backend=backend)(ints, bools).dtype == np.int64
    np.testing.assert_array_equal(gc.jit(lambda a, b: b.max(a), backend=backend)(floats, ints),
                                  np.maximum(floats, ints))
    np.testing.assert_array_equal(gc.jit(lambda a, b: a.min(b), backend=backend)(floats, ints),
                                  np.minimum(floats, ints))
    grad = gc.grad(lambda a: gc.cat([a, ints]).sum(), backend=backend)(floats)
    np.testing.assert_array_equal(grad, np.ones((2, 2)))


@BACKENDS
@pytest.mark.parametrize("dim", [0, 1])
def test_softmax_of_an_empty_tensor_is_empty(backend, dim):
    """As PyTorch's (the softmax op refused an axis of size 0)."""
    x = np.zeros((0, 2), np.float32)
    assert gc.jit(lambda x: gc.nn.functional.softmax(x, dim), backend=backend)(x).shape == (0, 2)
    assert gc.grad(lambda x: x.softmax(dim).sum(), backend=backend)(x).shape == (0, 2)


BOOL_REDUCTIONS = {  # on [[T, F, T], [F, F, F]]: PyTorch's results
    "amax": (lambda t: t.amax(1), [True, False]), "max_indices": (lambda t: t.max(1).indices, [0, 0]),
    "amin": (lambda t: t.amin(1), [False, False]), "argmin": (lambda t: t.argmin(1), [1, 0]),
    "any": (lambda t: t.any(1), [True, False]), "all_columns": (lambda t: t.all(0), [False, False, False]),
    "any_of_ints": (lambda t: t.astype("int64").any(), True), "all_of_none": (lambda t: t[:0].all(), True),
}


@BACKENDS
@pytest.mark.parametrize("name", BOOL_REDUCTIONS)
def test_booleans_reduce_as_in_pytorch(backend, name):
    """max, min and their indices of a bool tensor raised (naming an internal op for min);
    any and all did not exist."""
    reduce, expected = BOOL_REDUCTIONS[name]
    out = gc.jit(reduce, backend=backend)(np.array([[True, False, True], [False, False, False]]))
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.asarray(expected).dtype


def test_max_pool_names_only_the_option_it_lacks():
    x = np.zeros((1, 1, 6, 6), np.float32)
    with pytest.raises(gc.GraphcError, match=rf"max_pool2d: dilation 2 \(use 1\) is not supported {USER_LINE}"):
        gc.jit(lambda x: gc.nn.functional.max_pool2d(x, 2, dilation=2), backend="reference")(x)
    with pytest.raises(gc.GraphcError, match=rf"max_pool2d: return_indices=True is not supported {USER_LINE}"):
        gc.jit(lambda x: gc.nn.functional.max_pool2d(x, 2, return_indices=True), backend="reference")(x)


@BACKENDS
def test_the_elementwise_maximum_and_minimum_of_booleans_are_or_and_and(backend):
    a, b = np.array([True, False, False]), np.array([False, False, True])
    np.testing.assert_array_equal(gc.jit(lambda x, y: x.max(y), backend=backend)(a, b), [True, False, True])
    np.testing.assert_array_equal(gc.jit(lambda x, y: gc.minimum(x, y), backend=backend)(a, b), [False] * 3)


def _written(x, value):
    x[0] = value
    return x


@pytest.mark.parametrize("fn, error, message", [
    (lambda x: _written(x, 2**31 + 5), gc.DTypeError, r"the number 2147483653 does not fit the int32 tensor"),
    (lambda x: x.masked_fill(x > 0, -2**31 - 1), gc.DTypeError, r"-2147483649 does not fit the int32"),
    (lambda x: x[::0], ShapeError, r"the slice ::0 of axis 0: slice step cannot be zero"),
])
def test_bad_writes_and_slices_are_refused_at_the_users_line(fn, error, message):
    """A bare OverflowError and a bare ValueError from inside graphc before."""
    with pytest.raises(error, match=rf"{message}.*{USER_LINE}"):
        gc.jit(fn, backend="reference")(np.arange(3, dtype=np.int32))
