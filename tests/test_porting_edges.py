"""What code ported from PyTorch and JAX passes graphc: empty dims, NumPy integers as sizes and
argnums, Python integers where a size must be static, convolution and pooling arguments, nearest
and linear resampling, and the arrays a training step is called with."""
import numpy as np
import pytest

import graphc as gc

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("op", ["sum", "mean", "amax", "amin", "var", "std", "norm"])
@pytest.mark.parametrize("empty", [(), []])
def test_an_empty_dim_reduces_every_axis_as_pytorch_and_an_empty_axis_none_as_numpy(op, empty):
    """`dim=()` kept every axis (NumPy's meaning of axis=()): ported code building its dims, as
    `x.sum(dim=tuple(range(1, x.ndim)))` of a vector, got the tensor back unreduced."""
    x = np.arange(6.0).reshape(2, 3)
    expected = getattr(torch.tensor(x), op)(dim=empty).numpy()
    np.testing.assert_allclose(gc.jit(lambda a: getattr(a, op)(dim=empty))(x), expected)
    if op != "norm":
        np.testing.assert_allclose(gc.jit(lambda a: getattr(gc, op)(a, dim=empty))(x), expected)
    numpy_name = {"amax": "max", "amin": "min"}.get(op, op)
    if hasattr(np, numpy_name) and op != "norm":
        np_op = getattr(np, numpy_name)
        np.testing.assert_allclose(gc.jit(lambda a: np_op(a, axis=()))(x), np_op(x, axis=()))


@pytest.mark.parametrize("use", [lambda x, n: gc.zeros(n), lambda x, n: x.split(n),
                                 lambda x, n: x.repeat(n), lambda x, n: x.sum(n),
                                 lambda x, n: gc.cumsum(x, n)])
def test_a_number_argument_used_as_a_size_says_sizes_are_static(use):
    """A jitted function's int argument is a traced 0-d tensor: as a size it failed with a bare
    `TypeError: len() of a 0-d tensor`, naming neither the cause nor the user's line."""
    with pytest.raises(gc.ir.errors.TracedValueError,
                       match=r"a number argument of a traced function is a tensor.*shapes are "
                             r"static.*test_porting_edges.py"):
        gc.jit(use)(np.arange(6.0), 0)


def test_argnums_takes_numpy_integers_and_names_anything_else():
    x = np.arange(3.0)
    loss = lambda a, b: (a * b * b).sum()  # noqa: E731
    np.testing.assert_array_equal(gc.grad(loss, argnums=np.int64(1))(x, x), 2 * x * x)
    grads = gc.grad(loss, argnums=(np.int32(0), 1))(x, x)
    np.testing.assert_array_equal(grads[0], x * x)
    for bad in ("0", 1.0, True, (0, None)):
        with pytest.raises(gc.ir.GraphcError, match="argnums must be an integer or a tuple"):
            gc.grad(loss, argnums=bad)(x, x)


def test_the_gradient_of_a_vector_says_how_to_take_a_vector_jacobian_product():
    with pytest.raises(gc.ir.GraphcError, match=r"grad needs a scalar.*\(y \* cotangent\)\.sum"):
        gc.grad(lambda x: x ** 2)(np.arange(3.0))


# -- convolution, pooling and resampling arguments ----------------------------------------------
F = gc.nn.functional
TF = torch.nn.functional


def test_numpy_integers_are_sizes_of_convolutions_and_pools():
    """np.int64 kernel sizes, strides and paddings (sizes computed with NumPy) failed inside
    graphc (`'numpy.int64' object is not iterable`, `invalid index to scalar variable`)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 4, 7, 7)).astype(np.float32)
    w = rng.standard_normal((4, 4, 3, 3)).astype(np.float32)
    k, s, p = np.int64(3), np.int64(2), np.int64(1)
    tx, tw = torch.tensor(x), torch.tensor(w)
    for got, want in [
        (gc.jit(lambda a: F.conv2d(a, w, stride=s, padding=p, dilation=(np.int32(1), 1)))(x),
         TF.conv2d(tx, tw, stride=2, padding=1)),
        (gc.jit(lambda a: F.conv_transpose2d(a, w, stride=s, padding=p))(x),
         TF.conv_transpose2d(tx, tw, stride=2, padding=1)),
        (gc.jit(lambda a: F.max_pool2d(a, k, s, p))(x), TF.max_pool2d(tx, 3, 2, 1)),
        (gc.jit(lambda a: F.avg_pool2d(a, k, s))(x), TF.avg_pool2d(tx, 3, 2)),
    ]:
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    layers = [gc.nn.Conv2d(4, 4, k, stride=s, padding=p), gc.nn.ConvTranspose2d(4, 4, k, stride=s),
              gc.nn.MaxPool2d(k, s)]
    assert [gc.jit(layer)(x).shape for layer in layers] == [(1, 4, 4, 4), (1, 4, 15, 15), (1, 4, 3, 3)]


@pytest.mark.parametrize("call, message", [
    (lambda x, w: F.conv_transpose2d(x, w, stride=0), "conv_transpose2d: stride must be positive"),
    (lambda x, w: F.conv_transpose2d(x, w, stride=-1), "conv_transpose2d: stride must be positive"),
    (lambda x, w: F.conv_transpose2d(x, w, groups=0), "conv_transpose2d: groups must be a positive"),
    (lambda x, w: F.conv2d(x, w, stride=(1, 1, 5)), r"conv2d: stride must be one int or a pair"),
    (lambda x, w: F.avg_pool2d(x, (2, 2, 2)), r"avg_pool2d: kernel_size must be one int or a pair"),
    (lambda x, w: F.max_pool2d(x, 2, stride=2.0), r"max_pool2d: stride must be one int or a pair"),
])
def test_wrong_convolution_and_pool_sizes_name_the_argument(call, message):
    """A stride of 0 recursed until Python's limit, groups=0 divided by zero, and a third size
    was dropped silently; PyTorch refuses each."""
    x, w = np.ones((1, 4, 6, 6), np.float32), np.ones((4, 4, 3, 3), np.float32)
    with pytest.raises(ValueError, match=message):
        gc.jit(lambda a: call(a, w))(x)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_nearest_resampling_of_images_copies_and_halves_as_pytorch(backend):
    """PyTorch's 2-D nearest kernel copies an axis whose output has the input's size and halves
    the positions of one twice its size, whatever scale_factor gave those sizes; graphc took
    floor(i / scale) there (5 rows at 2.1: [0 0 0 1 1 ...] where PyTorch gives [0 0 1 1 ...])."""
    for n, factor in [(5, 2.1), (4, 1.2), (5, (2.05, 1.0)), (3, (2.2, 2.7)), (4, 2.3), (4, 0.9)]:
        x = np.arange(n * (n + 1), dtype=np.float32).reshape(1, 1, n, n + 1)
        got = gc.jit(lambda a: F.interpolate(a, scale_factor=factor), backend=backend)(x)
        np.testing.assert_array_equal(got, TF.interpolate(torch.tensor(x), scale_factor=factor).numpy())
    line = np.arange(5, dtype=np.float32).reshape(1, 1, 5)  # the 1-D kernel has no such rule
    got = gc.jit(lambda a: F.interpolate(a, scale_factor=2.1), backend=backend)(line)
    np.testing.assert_array_equal(got, TF.interpolate(torch.tensor(line), scale_factor=2.1).numpy())


def test_linear_resampling_of_integers_is_refused():
    """Its fractional weights were cast to the input's integer type, all 0: the lower neighbour
    came back, silently (PyTorch refuses integer input too)."""
    x = np.array([[[0, 100, 200]]], np.int64)
    with pytest.raises(gc.ir.DTypeError, match="interpolate: mode 'linear' expects floating-point"):
        gc.jit(lambda a: F.interpolate(a, size=5, mode="linear", align_corners=True))(x)
    np.testing.assert_array_equal(
        gc.jit(lambda a: F.interpolate(a.float(), size=5, mode="linear", align_corners=True))(x),
        [[[0, 50, 100, 150, 200]]])


def test_dropout2d_of_a_3d_input_drops_channels_of_each_sample_as_pytorch():
    """PyTorch reads (N, C, L) into dropout2d as channels of a batch (and warns); graphc read
    it as one (C, H, W) image and dropped whole samples. dropout1d says it without a warning."""
    x = np.ones((16, 64, 5), np.float32)  # 64 channels: a sample kept whole has odds 2^-64
    with pytest.warns(UserWarning, match="read as \\(N, C, L\\)"):
        out = gc.jit(lambda a: F.dropout2d(a, 0.5, True))(x)
    for got in (out, gc.jit(lambda a: F.dropout1d(a, 0.5, True))(x),
                gc.jit(gc.nn.Dropout1d(0.5))(x)):
        kept = got[:, :, 0] > 0
        assert (got.min(axis=2) == got.max(axis=2)).all()  # a channel is kept or dropped whole
        assert kept.any(axis=1).all() and not kept.all(axis=1).any()  # no sample kept or lost whole
    np.testing.assert_array_equal(gc.jit(lambda a: F.dropout1d(a, 0.5, False))(x), x)
    with pytest.raises(gc.ir.ShapeError, match=r"dropout1d: expects \(N, C, L\) or \(C, L\)"):
        gc.jit(lambda a: F.dropout1d(a, 0.5, True))(np.ones((2, 3, 4, 5), np.float32))


# -- the arrays a compiled step or model is called with -----------------------------------------
def _twin_models():
    import copy
    gc.manual_seed(0)
    a = gc.nn.Sequential(gc.nn.Linear(4, 4), gc.nn.Tanh(), gc.nn.Linear(4, 3))
    return a, copy.deepcopy(a)


@pytest.mark.parametrize("alias", [
    lambda w: np.lib.stride_tricks.as_strided(w, shape=(3, 4)),
    lambda w: torch.from_numpy(w).numpy(),
    lambda w: np.ctypeslib.as_array(w.ctypes.data_as(np.ctypeslib.ctypes.POINTER(
        np.ctypeslib.ctypes.c_float)), shape=(3, 4)),
], ids=["as_strided", "torch", "ctypes"])
def test_a_batch_in_a_weights_memory_is_read_before_the_weight_is_written(alias):
    """A batch viewing a trained weight through memory NumPy does not own (its .base chain
    does not lead to the weight) was read after the step wrote the new weight over it."""
    a, b = _twin_models()
    y = np.random.default_rng(0).standard_normal((3, 3)).astype(np.float32)
    steps = [gc.compile_train_step(m, F.mse_loss, gc.optim.SGD(m.parameters(), lr=0.5),
                                   example_inputs=(m[2].weight.copy(), y)) for m in (a, b)]
    steps[0](alias(a[2].weight), y)
    steps[1](b[2].weight.copy(), y)
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[key])


def test_an_export_takes_the_batch_the_step_ran_at_not_the_last_short_one(tmp_path):
    """After fit over 100 samples in batches of 32 the file held the step at batch 4 (the last
    batch), and `graphc train` on it trained at 4; a plain export after one with max_batch
    held batch 64 for a model only ever called at batch 1."""
    from graphc.data import DataLoader, TensorDataset
    from graphc.train import fit
    gc.manual_seed(0)
    model = gc.nn.Sequential(gc.nn.Linear(4, 8), gc.nn.ReLU(), gc.nn.Linear(8, 3))
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((100, 4)).astype(np.float32), rng.integers(0, 3, 100)
    step = gc.compile_train_step(model, F.cross_entropy, gc.optim.Adam(model.parameters(), lr=1e-2),
                                 example_inputs=(x[:32], y[:32]))
    fit(step, DataLoader(TensorDataset(x, y), 32), epochs=1, progress=False)
    step.export(tmp_path / "step.gcx")
    loaded = gc.load(tmp_path / "step.gcx")
    assert [i.value.type.shape for i in loaded.graph.inputs if i.role == "data"][:2] == [(32, 4), (32,)]
    assert np.isfinite(loaded(x[:32], y[:32]))
    assert step.graph.inputs[0].value.type.shape == (4, 4)  # it goes on as it ran last
    compiled = gc.compile(gc.nn.Linear(4, 2), example_inputs=np.zeros((1, 4), np.float32))
    compiled(np.zeros((5, 4), np.float32))
    compiled(np.zeros((1, 4), np.float32))
    compiled(np.zeros((1, 4), np.float32))  # batch 1 ran most (on a tie the larger would win)
    for _ in range(3):  # the export's own compiles at 64 are no runs of the model
        compiled.export(tmp_path / "any.gcx", max_batch=64)
    compiled.export(tmp_path / "one.gcx")
    assert gc.load(tmp_path / "one.gcx")(np.zeros((1, 4), np.float32)).shape == (1, 2)
    assert compiled.graph.inputs[0].value.type.shape == (1, 4)


def test_a_tuple_of_arrays_given_to_a_compiled_model_is_refused_as_a_structure():
    """np.asarray stacked LSTM(x, (h0, c0))'s state pair into one array: the LSTM then said the
    state must be a pair, which the caller had passed."""
    lstm = gc.nn.LSTM(3, 5, num_layers=2, batch_first=True)
    x, h0 = np.zeros((4, 6, 3), np.float32), np.zeros((2, 4, 5), np.float32)
    assert gc.jit(lstm)(x, (h0, h0))[0].shape == (4, 6, 5)
    with pytest.raises(gc.ir.InputError, match="input 1 is a tuple holding arrays.*separate arguments"):
        gc.compile(lstm, example_inputs=(x, (h0, h0)))
    compiled = gc.compile(gc.nn.Linear(3, 2), example_inputs=(np.zeros((2, 3), np.float32),))
    for nested in ((torch.zeros(3), torch.zeros(3)), [[np.zeros(3)], [np.zeros(3)]]):
        with pytest.raises(gc.ir.InputError, match="input 0 is a (tuple|list) holding arrays"):
            compiled(nested)
    assert compiled([[1.0, 2.0, 3.0]]).shape == (1, 2)  # nested lists of numbers are arrays


def test_a_torch_tensor_that_requires_grad_and_a_big_endian_batch_are_taken_as_they_are(caplog, tmp_path):
    """torch's 'Can't call numpy() on Tensor that requires grad' came out of graphc; a batch
    in big-endian byte order (the same float32 values) compiled the step again."""
    model = gc.nn.Linear(3, 2)
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    expected = gc.jit(model)(x)
    np.testing.assert_array_equal(gc.jit(model)(torch.tensor(x, requires_grad=True)), expected)
    compiled = gc.compile(model, example_inputs=(x,))
    np.testing.assert_array_equal(compiled(torch.tensor(x, requires_grad=True)), expected)
    with caplog.at_level("WARNING"):
        np.testing.assert_array_equal(compiled(x.astype(">f4")), expected)
    assert "recompiling" not in caplog.text and len(compiled._compiled) == 1
    compiled.export(str(tmp_path / "linear.gcx"))
    loaded = gc.load(str(tmp_path / "linear.gcx"))
    np.testing.assert_array_equal(loaded(torch.tensor(x, requires_grad=True)), expected)


def test_dtypes_graphc_lacks_are_refused_by_input_and_float16_parameters_widened():
    model = gc.nn.Linear(4, 3)
    step = gc.compile_train_step(model, F.cross_entropy, gc.optim.SGD(model.parameters(), lr=0.1),
                                 example_inputs=(np.zeros((2, 4), np.float32), np.zeros(2, np.int64)))
    for dtype in (np.int8, np.int16, np.uint16, np.longdouble):
        with pytest.raises(gc.ir.InputError, match=f"input 1: dtype {np.dtype(dtype)} is not supported"):
            step(np.zeros((2, 4), np.float32), np.ones(2, dtype))
    assert gc.nn.Parameter(np.ones(2, np.float16)).data.dtype == np.float32
    with pytest.raises(gc.ir.GraphcError, match="Parameter: dtype float128 is not supported"):
        gc.nn.Parameter(np.ones(2, np.longdouble))


def test_max_pool_of_integers_names_itself_with_ceil_mode_too():
    """With ceil_mode the error named an internal pad (-inf is not an int32)."""
    x = np.zeros((1, 1, 5, 5), np.int32)
    for ceil_mode in (False, True):
        with pytest.raises(gc.ir.DTypeError, match="max_pool2d: expects a floating-point operand"):
            gc.jit(lambda a: F.max_pool2d(a, 3, 2, ceil_mode=ceil_mode))(x)


@pytest.mark.parametrize("backend", ["reference", "numba-cpu"])
def test_a_padded_max_pool_window_of_minus_infinity_gives_its_gradient_to_a_real_cell(backend):
    """The padding (-inf) counted as the window's first maximum where every real cell was -inf
    (a masked region), and the window's cotangent was dropped; PyTorch never picks padding."""
    for masked in ((0, 0), (slice(0, 2), slice(0, 2))):
        x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        x[(0, 0) + masked] = -np.inf
        tx = torch.tensor(x, requires_grad=True)
        want = torch.autograd.grad(TF.max_pool2d(tx, 3, 2, 1).sum(), tx)[0].numpy()
        got = gc.grad(lambda a: F.max_pool2d(a, 3, 2, 1).sum(), backend=backend)(x)
        np.testing.assert_array_equal(got, want)


def test_a_negative_padding_idx_set_after_building_an_embedding_counts_from_the_end():
    """Only the constructor wrapped -1 to the last row: assigned later, the padding row (5)
    still took gradient."""
    table = gc.nn.Embedding(6, 3)
    table.padding_idx = -1
    idx = np.array([5, 1, 5])
    grads = gc.grad(lambda p: gc.nn.functional_call(table, p, idx).sum())({"weight": table.weight})
    np.testing.assert_array_equal(grads["weight"][5], 0)
    np.testing.assert_array_equal(grads["weight"][1], 1)


def test_reductions_over_no_axes_follow_the_right_convention():
    """max/min(axis=()) reduced everything after `dim=()` came to mean all axes, argmax over
    () failed unpacking, and any/all(dim=()) reduced everything where PyTorch reduces none."""
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert gc.jit(lambda a: a.max(axis=()))(x).shape == (2, 3)
    assert gc.jit(lambda a: gc.min(a, axis=()))(x).shape == (2, 3)
    assert gc.jit(lambda a: a.max(dim=()))(x).shape == torch.tensor(x).amax(dim=()).shape
    with pytest.raises(gc.ir.ShapeError, match=r"argmax/argmin: dim must be one axis or None"):
        gc.jit(lambda a: a.argmax(axis=()))(x)
    b = np.array([[1.0, -1.0], [2.0, 3.0]], np.float32)
    for op in ("any", "all"):
        np.testing.assert_array_equal(gc.jit(lambda a: getattr(a > 0, op)(dim=()))(b),
                                      getattr(torch.tensor(b) > 0, op)(dim=()).numpy())


@pytest.mark.parametrize("call", [
    lambda: gc.nn.Conv1d(2, 3, np.int64(3), stride=np.int64(2)),
    lambda: gc.jit(gc.nn.AdaptiveMaxPool2d(np.int64(3)))(np.ones((1, 2, 6, 6), np.float32)),
    lambda: gc.jit(lambda a: F.adaptive_avg_pool2d(a, np.int64(3)))(np.ones((1, 2, 6, 6), np.float32)),
])
def test_numpy_integers_size_one_dimensional_convolutions_and_adaptive_pools(call):
    call()


@pytest.mark.parametrize("call, message", [
    (lambda x3, x4: F.conv1d(x3, np.ones((2, 2, 3), np.float32), stride=1.5), "conv1d: stride must be one int"),
    (lambda x3, x4: F.conv1d(x3, np.ones((2, 2, 3), np.float32), stride="2"), "conv1d: stride must be one int"),
    (lambda x3, x4: gc.nn.Conv1d(2, 2, "3"), "Conv1d: kernel_size must be one int"),
    (lambda x3, x4: gc.nn.Conv1d(2, 2, 3, stride=True), "Conv1d: stride must be one int"),
    (lambda x3, x4: F.conv2d(x4, np.ones((2, 2, 3, 3), np.float32), padding=(1.5, 2.7)),
     "conv2d: padding must be one int or a pair"),
    (lambda x3, x4: F.conv2d(x4, np.ones((2, 2, 3, 3), np.float32), padding=1.5),
     "conv2d: padding must be one int or a pair"),
    (lambda x3, x4: F.adaptive_avg_pool2d(x4, (2.5, 3)), "output_size must be an int or a pair"),
    (lambda x3, x4: F.adaptive_avg_pool2d(x4, True), "output_size must be an int or a pair"),
    (lambda x3, x4: F.conv_transpose2d(x4, np.ones((2, 2, 3, 3), np.float32), padding=-1),
     "conv_transpose2d: padding .* must not be negative"),
    (lambda x3, x4: F.conv_transpose2d(x4, np.ones((2, 2, 3, 3), np.float32), stride=2,
                                       output_padding=-1), "must not be negative"),
])
def test_sizes_that_are_no_integers_are_refused_by_name(call, message):
    """Floats, strings and bools were truncated by int() (stride 1.5 ran as 1); negative
    transposed-convolution paddings failed inside an internal op."""
    x3, x4 = np.ones((1, 2, 8), np.float32), np.ones((1, 2, 7, 7), np.float32)
    with pytest.raises(ValueError, match=message):
        gc.jit(lambda a, b: call(a, b))(x3, x4)


@pytest.mark.parametrize("text", ["f32[", "f32[4]]", "f32[4,]", "f32[\u0663]", "f32[1, 2]",
                                  "x[1]", "f32[-1]"])
def test_malformed_type_texts_are_refused_not_read_as_another_shape(text):
    """`graphc trace --example-shapes f32[4,]` traced f32[4] (and a file's 'f32[' read as a
    scalar): the parser stripped and split whatever it got."""
    from graphc.ir import TensorType
    with pytest.raises(ValueError, match="is not a tensor type"):
        TensorType.parse(text)
    assert TensorType.parse("f32[2,3]") == TensorType((2, 3), "float32")
    assert TensorType.parse("i64[]") == TensorType((), "int64")


def test_buffers_of_dtypes_graphc_lacks_are_widened_or_refused_by_name():
    """A float16 or int8 buffer failed at compile time with a bare TypeError naming neither
    the buffer nor the user's line."""
    layer = gc.nn.Linear(3, 3)
    layer.register_buffer("scale", np.full(3, 2.0, np.float16))
    assert layer.scale.dtype == np.float32
    for dtype in (np.int8, np.uint8, np.int16):
        with pytest.raises(gc.ir.GraphcError, match=rf"buffer 'mask': dtype {np.dtype(dtype)} is not"):
            layer.register_buffer("mask", np.ones(3, dtype))
    with pytest.raises(gc.ir.GraphcError, match=r"buffer 'scale': dtype uint8"):
        layer.scale = np.ones(3, np.uint8)


def test_dropout1d_refuses_the_wrong_rank_in_eval_mode_too():
    x = np.ones((2, 3, 4, 5), np.float32)
    for training in (True, False):
        with pytest.raises(gc.ir.ShapeError, match=r"dropout1d: expects \(N, C, L\) or \(C, L\)"):
            gc.jit(lambda a: F.dropout1d(a, 0.5, training=training))(x)


def test_nll_loss_over_no_class_names_the_cause():
    """It failed in an internal reshape (cross_entropy named the empty class axis)."""
    with pytest.raises(gc.ir.ShapeError, match=r"nll_loss: the log-probabilities \(3, 0\) have no class"):
        gc.jit(lambda a, t: F.nll_loss(a, t))(np.zeros((3, 0), np.float32), np.zeros(3, np.int64))


def test_a_model_whose_later_rows_read_earlier_ones_is_marked_as_mixing_rows(tmp_path):
    """Only the first row of a batch was compared with that row alone: a running sum over the
    batch (x.cumsum(0), x + x[0:1]) passed, and the server batched clients together through
    it (one client's answer held another's inputs). Padding after a request's rows keeps them,
    so such a model still exports with max_batch, but is marked, and served a request a call."""
    from graphc.serve import GraphcRunner

    class Running(gc.nn.Module):
        def forward(self, x):
            return x.cumsum(dim=0)

    class First(gc.nn.Module):
        def forward(self, x):
            return x + x[0:1]

    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    for model in (Running(), First()):
        compiled = gc.compile(model, example_inputs=np.ones((4, 3), np.float32))
        compiled.export(str(tmp_path / "m.gcx"))
        assert gc.load(str(tmp_path / "m.gcx")).metadata["rows_apart"] is False
        compiled.export(str(tmp_path / "m8.gcx"), max_batch=8)
        assert gc.load(str(tmp_path / "m8.gcx")).metadata["rows_apart"] is False
        runner = GraphcRunner.from_file(str(tmp_path / "m8.gcx"))
        assert runner.batches_requests is False
        np.testing.assert_allclose(runner.run(x), gc.jit(model)(x), rtol=1e-6)
    plain = gc.compile(gc.nn.Linear(3, 2), example_inputs=np.ones((4, 3), np.float32))
    plain.export(str(tmp_path / "p8.gcx"), max_batch=8)
    assert GraphcRunner.from_file(str(tmp_path / "p8.gcx")).batches_requests is True


def test_a_fixed_batch_export_whose_padding_rows_are_invalid_is_not_padded(tmp_path):
    """Ids from 1 (ids - 1 into a table): the server padded a smaller batch with zeros and
    answered every valid smaller request with a 400 blaming the client's padding row."""
    from graphc.serve import GraphcRunner

    class FromOne(gc.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = gc.nn.Embedding(5, 2)

        def forward(self, ids):
            return self.table(ids - 1).sum(dim=1)

    gc.compile(FromOne(), example_inputs=np.ones((4, 3), np.int64)).export(str(tmp_path / "e.gcx"))
    assert gc.load(str(tmp_path / "e.gcx")).metadata["rows_apart"] is False
    with pytest.raises(gc.ir.errors.LoadError, match="a row of zeros is no valid input"):
        GraphcRunner.from_file(str(tmp_path / "e.gcx"))


def test_parameters_of_complex_or_text_values_are_refused():
    for values in (np.array([1 + 2j], np.complex64), np.array(["1.5"])):
        with pytest.raises(gc.ir.GraphcError, match="Parameter: dtype .* is not supported"):
            gc.nn.Parameter(values)
    assert gc.nn.Parameter([1.0, 2.0]).data.dtype == np.float32
    assert gc.nn.Parameter(np.ones(2)).data.dtype == np.float64


def test_a_zero_dimensional_parameter_stays_zero_dimensional():
    """np.ascontiguousarray made a learnable temperature (N,) = (1,): its PyTorch weights did
    not load, and a loss multiplied by it was no scalar."""
    class Temperature(gc.nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = gc.nn.Parameter(np.array(2.0, np.float32))

        def forward(self, x):
            return x.sum() * self.logit_scale.exp()

    model = Temperature()
    assert model.state_dict()["logit_scale"].shape == ()
    assert gc.jit(model)(np.ones(3, np.float32)).shape == ()
    model.load_state_dict({"logit_scale": np.array(1.0, np.float32)})


def test_pytorch_gather_ports_as_the_tensor_method_and_gc_gather_says_what_it_is():
    x = np.arange(12.0).reshape(3, 4)
    index = np.array([[1], [3], [0]])
    np.testing.assert_array_equal(gc.jit(lambda a, i: a.gather(1, i))(x, index),
                                  torch.tensor(x).gather(1, torch.tensor(index)).numpy())
    with pytest.raises(gc.ir.GraphcError, match=r"gc.gather is NumPy's take.*take_along_axis"):
        gc.jit(lambda a, i: gc.gather(a, 1, i))(x, index)


def test_building_an_array_outside_a_trace_points_to_numpy():
    with pytest.raises(gc.ir.GraphcError, match=r"outside one .* use NumPy"):
        gc.nn.Linear(2, 2).register_buffer("mask", gc.ones(2, 2))


def test_a_loss_calling_the_trained_model_again_updates_its_running_statistics_twice():
    """A consistency term calling the model a second time failed with batch norm in it, told
    to make the model a submodule of the model it is: PyTorch updates the statistics twice."""
    def build(nn):
        return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    torch.manual_seed(0)
    torch_model = build(torch.nn).double()
    model = build(gc.nn).double()
    model.load_state_dict({k: v.numpy().copy() for k, v in torch_model.state_dict().items()})
    rng = np.random.default_rng(0)
    x, y, x2 = rng.standard_normal((8, 4)), rng.integers(0, 2, 8), rng.standard_normal((8, 4))
    TF = torch.nn.functional
    out = torch_model(torch.tensor(x))
    expected = TF.cross_entropy(out, torch.tensor(y)) + TF.mse_loss(torch_model(torch.tensor(x2)), out)
    step = gc.compile_train_step(
        model, lambda out, y, x2: F.cross_entropy(out, y) + F.mse_loss(model(x2), out),
        gc.optim.SGD(model.parameters(), lr=0.1), example_inputs=(x, y, x2), targets=2,
        backend="reference")
    np.testing.assert_allclose(step(x, y, x2), expected.item(), rtol=1e-12)
    np.testing.assert_allclose(model[1].running_mean, torch_model[1].running_mean.numpy(), rtol=1e-12)
    assert int(model[1].num_batches_tracked) == 2


def test_a_module_outside_the_model_updating_statistics_in_the_loss_is_refused():
    teacher = gc.nn.BatchNorm1d(3)  # in training mode, not the trained model
    model = gc.nn.Linear(3, 3)
    with pytest.raises(gc.GraphcError, match="BatchNorm1d: buffer '[a-z_]+' can only be updated by a compiled "
                                             "training step, as a part of the model it trains"):
        gc.compile_train_step(model, lambda out, x: F.mse_loss(out, teacher(x)),
                               gc.optim.SGD(model.parameters(), lr=0.1),
                               example_inputs=(np.ones((4, 3), np.float32),) * 2)


def test_labels_computed_from_constants_alone_are_checked_on_numba_cpu():
    """SimCLR's labels, cat([arange(n, 2n), arange(0, n)]): the index check read no array, and
    numba-cpu's executor failed in operator.itemgetter() with a batch-norm model."""
    def build():
        gc.manual_seed(0)
        return gc.nn.Sequential(gc.nn.Linear(3, 4), gc.nn.BatchNorm1d(4))
    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    loss = lambda z, unused: F.cross_entropy(z, gc.cat([gc.arange(2, 4), gc.arange(0, 2)]))
    losses = []
    for backend in ("reference", "numba-cpu"):
        model = build()
        step = gc.compile_train_step(model, loss, gc.optim.SGD(model.parameters(), lr=0.1),
                                     example_inputs=(x, np.zeros(1, np.float32)), backend=backend)
        losses.append([step(x, np.zeros(1, np.float32)) for _ in range(2)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


@pytest.mark.parametrize("call", [lambda q, a: q.gather(1, a[:, None]), lambda q, a: q.index_select(1, a)])
def test_pytorchs_gather_and_index_select_refuse_a_negative_index(call):
    """They took -1 as the last entry (NumPy's take): a DQN's invalid action trained the last
    action's value, where PyTorch raises."""
    q = np.arange(6, dtype=np.float32).reshape(2, 3)
    with pytest.raises(gc.IndexOutOfRangeError, match=r"index -1 .*valid indices are \[0, 3\)"):
        gc.jit(call)(q, np.array([-1, 0]))
    np.testing.assert_array_equal(gc.jit(lambda q: q.gather(1, np.array([[2], [0]])))(q).ravel(), [2, 3])


def test_a_gradient_penalty_through_a_batch_norm_model_in_training_says_what_is_unsupported():
    """It told the user to make the trained model a submodule of the trained model."""
    model = gc.nn.Sequential(gc.nn.Linear(3, 4), gc.nn.BatchNorm1d(4), gc.nn.Linear(4, 1))
    x = np.ones((4, 3), np.float32)

    def loss(out, target):
        penalty = gc.grad(lambda xi: model(xi).sum())(target)
        return F.mse_loss(out, out * 0) + (penalty ** 2).mean()
    with pytest.raises(gc.GraphcError, match="cannot be updated inside a gc.grad or gc.jit traced "
                                             "within a training step"):
        gc.compile_train_step(model, loss, gc.optim.SGD(model.parameters(), lr=0.1), (x, x),
                              backend="reference")


def test_functional_ops_take_their_first_argument_as_input_by_name():
    """PyTorch names it `input`: F.softmax(input=t, dim=1) raised "missing 1 required
    positional argument: 'x'"."""
    import inspect
    public = [getattr(F, name) for name in F.__all__
              if getattr(getattr(F, name), "__module__", None) == F.__name__]  # F's own
    named_x = [f.__name__ for f in public if list(inspect.signature(f).parameters)[:1] == ["x"]]
    assert named_x == []
    t = np.array([[-1.0, 2.0]], np.float32)
    out = gc.jit(lambda a: F.softmax(input=F.relu(input=a), dim=1) + F.dropout(input=a, p=0.0))(t)
    np.testing.assert_allclose(out, np.exp([[0, 2]]) / np.exp([[0, 2]]).sum() + t, rtol=1e-6)


def test_torch_mm_and_bmm_as_functions():
    """torch.bmm(a, b) ported as gc.bmm(a, b) raised a plain AttributeError."""
    a, b = np.ones((2, 3, 4), np.float32), np.ones((2, 4, 5), np.float32)
    np.testing.assert_array_equal(gc.jit(lambda x, y: gc.bmm(x, y))(a, b), a @ b)
    np.testing.assert_array_equal(gc.jit(lambda x, y: gc.mm(x, y))(a[0], b[0]), a[0] @ b[0])
    with pytest.raises(gc.GraphcError, match="bmm: both operands must be 3-D"):
        gc.jit(lambda x, y: gc.bmm(x, y))(a[0], b[0])


def test_a_0d_tensor_reduced_over_dim_given_as_a_list_is_pytorchs():
    """dim=[0] (a list) on a 0-d tensor raised IndexError from inside graphc; dim=0 worked."""
    s = np.array(2.5, np.float32)
    got = gc.jit(lambda t: (t.var(dim=[0], correction=0), t.sum(dim=[0]), t.mean(dim=[-1])))(s)
    assert [float(v) for v in got] == [0.0, 2.5, 2.5] and all(v.shape == () for v in got)
