"""The PyTorch surface for shapes and indexing: each call traced by graphc against PyTorch
(values and gradients, float64), the flip primitive's VJP against finite differences, and the
indexing kernels compiled by numba-cpu against the reference interpreter."""
import numpy as np
import pytest

import graphc as gc

from opcheck import check_vjp

torch = pytest.importorskip("torch")

REF = "reference"
rng = np.random.default_rng(0)


def _clone_set(index, value):
    """torch: x with x[index] = value (on a copy); graphc's setitem is functional anyway."""
    def torch_fn(x):
        y = x.clone()
        y[index] = value if not callable(value) else value(y)
        return y

    def graphc_fn(x):
        x[index] = value if not callable(value) else value(x)
        return x
    return graphc_fn, torch_fn


_SET_ROW = _clone_set((slice(None), 0), 0.0)
_SET_BLOCK = _clone_set(slice(1, 3), lambda x: x[0:2] * 2.0)
_SET_ADD_LIST = _clone_set([0, 2], lambda x: x[[0, 2]] + 1.5)
_SET_REVERSED = (_clone_set((slice(None), slice(None, None, -2)), lambda x: x[:, 2:] * 3.0)[0],
                 _clone_set((slice(None), [4, 2, 0]), lambda x: x[:, 2:] * 3.0)[1])

# name: (graphc function, torch function, input shape); both see one float64 tensor.
CASES = {
    "cat": (lambda x: gc.cat([x, x * 2.0], dim=1), lambda x: torch.cat([x, x * 2.0], dim=1), (2, 3)),
    "cat_negative_dim": (lambda x: gc.cat([x, x[:1]], -2), lambda x: torch.cat([x, x[:1]], -2), (2, 3)),
    "stack_dim": (lambda x: gc.stack([x, -x], dim=2), lambda x: torch.stack([x, -x], dim=2), (2, 3)),
    "split_size": (lambda x: x.split(2, dim=1), lambda x: x.split(2, dim=1), (2, 5)),
    "split_sections": (lambda x: gc.split(x, [1, 3, 1], 1), lambda x: torch.split(x, [1, 3, 1], 1),
                       (2, 5)),
    "chunk": (lambda x: x.chunk(3, 1), lambda x: x.chunk(3, 1), (2, 7)),
    "chunk_fewer": (lambda x: gc.chunk(x, 4, 0), lambda x: torch.chunk(x, 4, 0), (3, 2)),
    "repeat": (lambda x: x.repeat(2, 1, 3), lambda x: x.repeat(2, 1, 3), (2, 3)),
    "expand": (lambda x: x[:, :1].expand(-1, 4), lambda x: x[:, :1].expand(-1, 4), (2, 3)),
    "expand_new_axis": (lambda x: x.expand(2, -1, -1), lambda x: x.expand(2, -1, -1), (3, 2)),
    "flip": (lambda x: x.flip(0, 2), lambda x: x.flip(0, 2), (2, 3, 2)),
    "gc_flip": (lambda x: gc.flip(x, -1), lambda x: torch.flip(x, (-1,)), (2, 3)),
    "negative_step": (lambda x: x[:, ::-1], lambda x: x.flip(1), (2, 4)),
    "negative_step_2": (lambda x: x[::-2], lambda x: x.flip(0)[::2], (5, 2)),
    "negative_step_bounds": (lambda x: x[3:0:-2, 1], lambda x: x[[3, 1], 1], (5, 2)),
    "int_list_index": (lambda x: x[:, [0, 2]], lambda x: x[:, [0, 2]], (2, 3)),
    "int_tensor_index": (lambda x: x[x.argmax(1)], lambda x: x[x.argmax(1)], (3, 3)),
    "negative_list_index": (lambda x: x[[-1, 0, -1]], lambda x: x[[-1, 0, -1]], (3, 2)),
    "paired_arrays": (lambda x: x[[0, 1, 1], [2, 0, 2]], lambda x: x[[0, 1, 1], [2, 0, 2]], (2, 3)),
    "adjacent_arrays": (lambda x: x[:, [1, 0], [2, 2]], lambda x: x[:, [1, 0], [2, 2]], (2, 2, 3)),
    "split_arrays": (lambda x: x[[1, 0], :, [2, 2]], lambda x: x[[1, 0], :, [2, 2]], (2, 2, 3)),
    "int_beside_array": (lambda x: x[0, :, [1, 2]], lambda x: x[0, :, [1, 2]], (2, 2, 3)),
    "constant_bool_mask": (lambda x: x[np.array([True, False, True])],
                           lambda x: x[torch.tensor([True, False, True])], (3, 2)),
    "masked_fill": (lambda x: x.masked_fill(x > 0.5, -1.0), lambda x: x.masked_fill(x > 0.5, -1.0),
                    (2, 3)),
    "masked_fill_broadcast": (lambda x: gc.masked_fill(x, np.array([True, False, True]), 0.0),
                              lambda x: x.masked_fill(torch.tensor([True, False, True]), 0.0), (2, 3)),
    "set_row": (*_SET_ROW, (3, 2)),
    "set_block": (*_SET_BLOCK, (4, 2)),
    "set_add_list": (*_SET_ADD_LIST, (3, 2)),
    "set_reversed_step": (*_SET_REVERSED, (2, 5)),
    "set_paired_arrays": (*_clone_set(([0, 2], [1, 0]), lambda x: x[0:2, 1] * -1.0), (3, 2)),
    "t": (lambda x: x.t(), lambda x: x.t(), (2, 3)),
    "mT": (lambda x: x.mT, lambda x: x.mT, (2, 3, 4)),
    "view": (lambda x: x.view(-1, 2), lambda x: x.view(-1, 2), (3, 4)),
    "contiguous": (lambda x: x.t().contiguous() * 2.0, lambda x: x.t().contiguous() * 2.0, (2, 3)),
    "type_as": (lambda x: x.float().double().type_as(x), lambda x: x.float().double().type_as(x),
                (2, 2)),
    "sum_dim_keepdim": (lambda x: x.sum(dim=1, keepdim=True), lambda x: x.sum(dim=1, keepdim=True),
                        (2, 3)),
    "mean_dims": (lambda x: gc.mean(x, dim=(0, 2)), lambda x: torch.mean(x, dim=(0, 2)), (2, 3, 2)),
    "max_values": (lambda x: x.max(dim=1, keepdim=True).values,
                   lambda x: x.max(dim=1, keepdim=True).values, (2, 3)),
    "max_all": (lambda x: x.max(), lambda x: x.max(), (2, 3)),
    "logsumexp_dim": (lambda x: gc.logsumexp(x, dim=0, keepdim=True),
                      lambda x: torch.logsumexp(x, dim=0, keepdim=True), (3, 2)),
    "softmax_method": (lambda x: x.softmax(dim=-1), lambda x: x.softmax(dim=-1), (2, 3)),
}


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_pytorch_values_and_gradients(name):
    graphc_fn, torch_fn, shape = CASES[name]
    x = rng.standard_normal(shape)
    got = _as_tuple(gc.jit(graphc_fn, backend=REF)(x))
    tx = torch.tensor(x, requires_grad=True)
    want = _as_tuple(torch_fn(tx))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == tuple(w.shape)
        np.testing.assert_allclose(g, w.detach().numpy(), rtol=1e-12, atol=1e-12)
    # The gradient of a weighted sum of every output reaches each element the outputs read.
    weights = [rng.standard_normal(w.shape) for w in want]

    def loss(x):
        outs = _as_tuple(graphc_fn(x))
        return sum((o * w).sum() for o, w in zip(outs, weights))
    grad = gc.grad(loss, backend=REF)(x)
    sum((w * torch.tensor(v)).sum() for w, v in zip(want, weights)).backward()
    np.testing.assert_allclose(grad, tx.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_max_over_an_axis_returns_values_and_indices():
    """Regression: `v, i = x.max(1)` unpacked two rows of maxima (x.max returned the values)."""
    x = np.array([[1.0, 5.0, 2.0], [7.0, 0.0, 3.0]], np.float32)
    values, indices = gc.jit(lambda x: x.max(1), backend=REF)(x)
    np.testing.assert_array_equal(values, [5.0, 7.0])
    np.testing.assert_array_equal(indices, [1, 0])
    assert indices.dtype == np.int64

    def named(x):
        out = gc.max(x, dim=0, keepdim=True)
        return out.values, out.indices
    values, indices = gc.jit(named, backend=REF)(x)
    np.testing.assert_array_equal(values, [[7.0, 5.0, 3.0]])
    np.testing.assert_array_equal(indices, [[1, 0, 1]])
    # No axis: the value alone, a 0-d tensor; several axes: values only, as amax.
    assert gc.jit(lambda x: x.max(), backend=REF)(x).shape == ()
    np.testing.assert_array_equal(gc.jit(lambda x: x.max((0, 1)), backend=REF)(x), 7.0)
    # np.max on a traced Tensor keeps NumPy's meaning.
    np.testing.assert_array_equal(gc.jit(lambda x: np.max(x, axis=1), backend=REF)(x), [5.0, 7.0])


def test_sizes_and_dtype_conversions():
    seen = {}

    def fn(x):
        seen.update(size=x.size(), size1=x.size(1), size_last=x.size(-1), dim=x.dim(),
                    numel=x.numel(), gc_numel=gc.numel(x))
        return (x.long(), x.int(), x.double(), x.bool(), x.to("float64"), x.to(np.int32),
                x.to(torch.float64), x.to("cpu"), x.to(x.long()), x.long().float(),
                x.to("cuda:0", torch.float64), x.to(dtype=np.int64))
    x = np.array([[1.5, -2.0, 0.0]], np.float32)
    outs = gc.jit(fn, backend=REF)(x)
    assert seen == dict(size=(1, 3), size1=3, size_last=3, dim=2, numel=3, gc_numel=3)
    t = torch.tensor(x)
    want = (t.long(), t.int(), t.double(), t.bool(), t.to(torch.float64), t.to(torch.int32),
            t.to(torch.float64), t, t.to(torch.int64), t.long().float(), t.double(), t.long())
    assert len(outs) == len(want)
    for out, w in zip(outs, want):
        assert out.dtype == w.numpy().dtype
        np.testing.assert_array_equal(out, w.numpy())


def test_summing_booleans_gives_int64():
    x = np.array([[1.0, -1.0, 2.0], [0.5, 3.0, -4.0]], np.float32)
    total, per_row = gc.jit(lambda x: ((x > 0).sum(), gc.sum(x > 0, dim=1)), backend=REF)(x)
    assert total.dtype == per_row.dtype == np.int64
    assert total == 4
    np.testing.assert_array_equal(per_row, [2, 2])


def test_index_assignment_rebinds_and_differentiates_both_parts():
    """x[idx] += v with an int tensor index; the old value outside the region and the written
    value inside both receive gradients."""
    x = rng.standard_normal((4, 3))
    v = rng.standard_normal((2, 3))
    idx = np.array([3, 1])

    def fn(x, v, idx):
        y = x * 1.0
        y[idx] += v
        y[:, 0] = 0
        return (y * y).sum()
    tx, tv = torch.tensor(x, requires_grad=True), torch.tensor(v, requires_grad=True)
    y = tx.clone()
    y[torch.tensor(idx)] += tv
    y[:, 0] = 0
    (y * y).sum().backward()
    np.testing.assert_allclose(gc.jit(fn, backend=REF)(x, v, idx), (y * y).sum().item())
    dx, dv = gc.grad(fn, argnums=(0, 1), backend=REF)(x, v, idx)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-12)
    np.testing.assert_allclose(dv, tv.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("backend", [REF, "numba-cpu"])
@pytest.mark.parametrize("traced", [False, True], ids=["constant_index", "traced_index"])
def test_a_position_written_twice_keeps_the_last_write(traced, backend):
    """The scatters behind x[idx] = v add: a position idx names twice got the sum of both
    writes, and x[[1, 1]] += 1 gave 2 * x + 2. NumPy's and PyTorch's last write wins."""
    x = np.arange(12.0).reshape(4, 3)
    rows, cols = np.array([1, 3, 1, 0, 1]), np.array([2, 0, 2, 1, 0])

    def fn(x, rows, cols):
        y = x * 1.0
        y[rows] += 1.0
        y[rows, cols] = gc.arange(5).astype("float64") * 10
        y[rows[::-1], 1] = -y[rows, 1]
        return y
    expected = x.copy()
    expected[rows] += 1.0
    expected[rows, cols] = np.arange(5) * 10
    expected[rows[::-1], 1] = -expected[rows, 1]
    f = gc.jit(fn, backend=backend) if traced else gc.jit(lambda x: fn(x, rows, cols), backend=backend)
    got = f(x, rows, cols) if traced else f(x)
    np.testing.assert_array_equal(got, expected)
    # y[[1, 1]] += v: y[1] = x[1] + v[1], the gradient of the write that stays
    grad = gc.grad(lambda x, v: (fn2(x, v) ** 2).sum(), argnums=(0, 1), backend=REF)
    v = np.array([0.5, 2.0])
    dx, dv = grad(np.array([1.0, 3.0, 5.0]), v)
    np.testing.assert_allclose(dx, [2.0, 2 * (3.0 + 2.0), 10.0])
    np.testing.assert_allclose(dv, [0.0, 2 * (3.0 + 2.0)])


def fn2(x, v):
    y = x * 1.0
    y[np.array([1, 1])] += v
    return y


ALL = slice(None)


@pytest.mark.parametrize("index", [lambda i, j: (i, ALL, j), lambda i, j: (ALL, i, j), lambda i, j: (j, ALL, i),
                                   lambda i, j: (i, j), lambda i, j: (i,), lambda i, j: (j, i)],
                         ids=["i:j", ":ij", "j:i", "ij", "i", "ji"])
def test_a_0d_index_beside_arrays_is_an_int_as_in_pytorch(index):
    """x[i0, :, j] with a 0-d tensor i0 put the broadcast axis first (NumPy's rule for a 0-d
    array); PyTorch takes a 0-d index as an int, as graphc takes x[2, :, j]."""
    x = np.arange(4 * 5 * 6, dtype=np.float64).reshape(4, 5, 6)
    i, j = np.array(-2), np.array([1, 3])
    expected = torch.tensor(x)[index(torch.tensor(i), torch.tensor(j))].numpy()
    np.testing.assert_array_equal(gc.jit(lambda x, i, j: x[index(i, j)], backend=REF)(x, i, j), expected)
    np.testing.assert_array_equal(gc.jit(lambda x, j: x[index(i, j)], backend=REF)(x, j), expected)

    def written(x, i, j):
        y = x * 1.0
        y[index(i, j)] = -1.0
        return y
    t = torch.tensor(x)
    t[index(torch.tensor(i), torch.tensor(j))] = -1.0
    np.testing.assert_array_equal(gc.jit(written, backend=REF)(x, i, j), t.numpy())


def test_a_write_into_a_view_writes_the_tensor_it_views():
    """y[0][1] = v, y.T[2] = v, F.relu(y[0], inplace=True) and a reshaped view's += changed a
    temporary and never y (PyTorch's are views of y); integer-array indexing copies, there too."""
    import graphc.nn.functional as F

    def fn(x, idx):
        y = x * 1.0
        y[0][1] = 9.0
        y.T[2] += 1.0
        F.relu(y[1], inplace=True)
        flat = y.reshape(-1)
        flat[-1] = -5.0
        y.unsqueeze(0)[0, :, 0] = 3.0
        y[idx][0] = 100.0  # a copy: no change
        return y
    x = np.arange(-6.0, 6.0).reshape(3, 4)
    idx = np.array([0, 2])
    t = torch.tensor(x).clone()
    t[0][1] = 9.0
    t.T[2] += 1.0
    torch.relu_(t[1])
    t.reshape(-1)[-1] = -5.0
    t.unsqueeze(0)[0, :, 0] = 3.0
    t[torch.tensor(idx)][0] = 100.0
    np.testing.assert_array_equal(gc.jit(fn, backend=REF)(x, idx), t.numpy())
    # gradients through the writes (not the in-place relu, whose input PyTorch's autograd keeps)
    def differentiable(y):
        y = y * 1.0
        y[0][1] = 9.0
        y.T[2] += 1.0
        y.reshape(-1)[-1] = -5.0
        y.unsqueeze(0)[0, :, 0] = 3.0
        return (y ** 2).sum()
    tx = torch.tensor(x, requires_grad=True)
    differentiable(tx).backward()
    np.testing.assert_allclose(gc.grad(differentiable, backend=REF)(x), tx.grad.numpy())


def test_views_follow_pytorch_copies_contiguity_detach_and_later_writes():
    """Each case differed from PyTorch: a contiguous() or reshape of a transposed tensor (copies)
    was written back; detach() (a view) was a copy; a 0-d index made a copy; a view taken before
    its base was written put its stale values back; np.squeeze(x, 0) was a copy."""
    import graphc.nn.functional as F

    def fn(x, i, lib):
        y = x * 1.0
        t = y.T.contiguous()
        t[0] = -1.0  # a copy: y unchanged
        flat = y[:, 1:].reshape(-1)
        flat[0] = -2.0  # a copy too
        row = y[0]
        y[0, 2] = 5.0
        row[0] = 7.0  # sees the write above, keeps it
        d = y.detach()
        d[1, 1] = 42.0
        picked = y[i]
        picked += 100.0  # a 0-d index is a view
        y[2] = y[0].reshape(1, 4) * 2  # leading axes of one dropped
        return y, row, t, flat
    x = np.arange(12.0).reshape(3, 4)
    expected = [t.numpy() for t in fn(torch.tensor(x), torch.tensor(1), torch)]
    for backend in (REF, "numba-cpu"):
        for got, want in zip(gc.jit(lambda x, i: fn(x, i, gc), backend=backend)(x, np.array(1)), expected):
            np.testing.assert_array_equal(got, want)

    def squeezed(x):
        y = x * 1.0
        np.squeeze(y[None], 0)[0] = -1.0
        return y
    np.testing.assert_array_equal(gc.jit(squeezed, backend=REF)(x)[0], -1.0)


def test_writes_that_change_the_dtype_or_a_float_into_ints():
    import graphc.nn.functional as F

    def truncated(x):
        x[0] = 2.7  # stored truncated, as PyTorch and NumPy
        return x
    np.testing.assert_array_equal(gc.jit(truncated, backend=REF)(np.arange(4)), [2, 1, 2, 3])
    with pytest.raises(gc.DTypeError, match=r"inplace=True: the result is float32, which cannot be "
                                            r"written into x \(int64\)"):
        gc.jit(lambda x: F.hardtanh(x, -1.5, 1.5, inplace=True), backend=REF)(np.arange(4))


def test_an_inner_trace_writing_an_enclosing_functions_tensor_is_refused_at_the_write():
    """It failed later as reading 'tensors of another traced function (kept from an earlier
    trace)', naming no line."""
    def outer(x):
        y = x * 2

        def loss(z):
            y[0] = z[0]
            return (y * z).sum()
        return gc.grad(loss)(x)
    with pytest.raises(gc.GraphcError, match=r"x\[index\] = value writes a tensor of an enclosing traced "
                                             r"function.*test_tensor_surface.py"):
        gc.jit(outer, backend=REF)(np.ones(3))


def test_a_write_into_a_view_of_a_parameter_is_refused():
    class Net(gc.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = gc.nn.Linear(3, 2)

        def forward(self, x):
            row = self.lin.weight[0]
            row += 1.0
            return self.lin(x)
    with pytest.raises(gc.GraphcError, match=r"x \+= y: Net.lin.weight is a module's parameter"):
        gc.jit(Net(), backend=REF)(np.ones((1, 3), np.float32))


def test_assignment_through_a_traced_mask_is_a_where():
    x = rng.standard_normal((3, 2))

    def fn(x):
        x[x < 0] = 0.0
        return x
    np.testing.assert_array_equal(gc.jit(fn, backend=REF)(x), np.maximum(x, 0))


def test_assignment_keeps_integer_and_boolean_dtypes():
    def fn(n, flags, idx):
        n[idx] += 10
        n[:, -1] = -1
        flags[idx, 0] = True
        return n, flags
    n = np.arange(6, dtype=np.int32).reshape(3, 2)
    flags = np.zeros((3, 2), bool)
    got_n, got_flags = gc.jit(fn, backend=REF)(n, flags, np.array([2, 0]))
    want_n, want_flags = n.copy(), flags.copy()
    want_n[[2, 0]] += 10
    want_n[:, -1] = -1
    want_flags[[2, 0], 0] = True
    assert got_n.dtype == np.int32 and got_flags.dtype == np.bool_
    np.testing.assert_array_equal(got_n, want_n)
    np.testing.assert_array_equal(got_flags, want_flags)


def test_an_index_tensor_out_of_range_is_refused():
    x = np.ones((3, 2), np.float32)
    with pytest.raises(gc.IndexOutOfRangeError, match="gather"):
        gc.jit(lambda x, i: x[i], backend=REF)(x, np.array([0, 3]))


def test_refusals_name_the_static_way():
    x = np.ones((2, 3), np.float32)
    with pytest.raises(gc.GraphcError, match=r"x\[mask\].*gc\.where.*masked_fill"):
        gc.jit(lambda x: x[x > 0], backend=REF)(x)
    with pytest.raises(gc.ShapeError, match="cannot assign a value of shape \\(4,\\)"):
        def assign(x):
            x[0] = gc.cat([x[0], x[0, :1]])
            return x
        gc.jit(assign, backend=REF)(x)
    with pytest.raises(gc.ShapeError, match="split: sizes \\[1, 1\\] do not add up to 3"):
        gc.jit(lambda x: x.split([1, 1], 1), backend=REF)(x)
    with pytest.raises(gc.ShapeError, match="t\\(\\) expects a tensor of at most 2"):
        gc.jit(lambda x: x.reshape(1, 2, 3).t(), backend=REF)(x)
    with pytest.raises(gc.GraphcError, match="give dim or axis, not both"):
        gc.jit(lambda x: x.sum(0, axis=1), backend=REF)(x)


def test_flip_vjp_matches_finite_differences():
    check_vjp("flip", [rng.standard_normal((2, 3, 2))], axes=(0, 2))
    check_vjp("flip", [rng.standard_normal((3,))], axes=(-1,))


def test_indexing_kernels_on_numba_cpu_match_the_reference():
    """One compiled function exercising every kernel indexing adds: flip, the slice-and-flip of
    a negative step, gathers and take_along_axis from integer arrays, and the scatters of
    index assignment, with their gradients."""
    x = rng.standard_normal((4, 5)).astype(np.float32)
    idx = np.array([2, 0, 3], np.int64)

    def fn(x, idx):
        y = x.flip(0) + x[:, ::-1] * 0.5 + x[::-2].repeat(2, 1)
        y[idx] += 1.0
        y[1:3, ::2] = x[[0, 1], 1:4:1][:, [0, 1, 2]]
        picked = x[[0, 3, 1], [4, 0, 2]]
        return (y * y).sum() + (picked * picked).sum(), y
    value_and_grad = lambda backend: gc.value_and_grad(fn, has_aux=True, backend=backend)(x, idx)  # noqa: E731
    (ref_loss, ref_y), ref_grad = value_and_grad(REF)
    (loss, y), grad = value_and_grad("numba-cpu")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(y, ref_y, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)

