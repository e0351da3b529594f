"""NumPy ufuncs and functions on graphc Tensors trace as graphc ops (the same Python function
run on arrays is the oracle); unsupported NumPy calls and every PyTorch call raise a GraphcError
that names the call, what to write instead, and the user's line."""
import numpy as np
import pytest

import graphc as gc

rng = np.random.default_rng(0)
X = rng.standard_normal((2, 3))
INDICES = np.array([[2, 0, 1], [1, 1, 0]])


def ufuncs(x):
    y = np.exp(x) + np.float32(2.0) * x - np.ones(3) * x / 3 + np.power(x, 2) + 2 ** x
    y = np.maximum(y, 0.5) / np.sqrt(np.abs(x) + 1) + np.minimum(np.tanh(x), np.log1p(np.square(x)))
    y = np.negative(np.log(np.fabs(y) + 1)) * np.sign(x) + np.reciprocal(np.abs(x) + 1)
    masks = (np.greater(x, 0) & (x <= 0.5)) | np.logical_not(np.equal(x, x))
    flags = [np.less(x, y), np.less_equal(x, y), np.greater_equal(x, y), np.not_equal(x, y),
             np.logical_and(x > 0, y > 0), np.logical_or(x > 0, y > 0), masks]
    return y, np.matmul(x, np.ones((3, 2))), np.ones((4, 2)) @ x, flags


def functions(x):
    z = np.transpose(np.reshape(x, (3, 2)))
    return [np.sum(x, axis=0), np.sum(x, 1, keepdims=True), np.mean(x), np.max(x, axis=1),
            np.argmax(x, axis=1), np.concatenate([x, z], axis=1), np.stack([x, z]),
            np.where(x > 0, x, 0.0), np.dot(x, x.T), np.dot(x[0], x[1]), np.dot(2.0, x),
            np.squeeze(np.expand_dims(x, 0), 0), np.broadcast_to(x[:1], (4, 3)),
            np.take(x, [2, 0], axis=1), np.take_along_axis(x, INDICES, axis=1),
            np.pad(x, ((1, 0), (0, 2)), constant_values=1.5), np.transpose(np.stack([x, x]), (2, 0, 1)),
            np.reshape(x, (6,)), np.shape(x), np.ndim(x), np.size(x)]  # (shape= needs numpy >= 2.1)


def assert_same(actual, expected):
    if isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e)
    else:
        assert np.asarray(actual).dtype == np.asarray(expected).dtype
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [ufuncs, functions])
def test_numpy_calls_trace_as_graphc_ops(fn):
    traced = gc.jit(fn, backend="reference")
    assert_same(traced(X), fn(X))


def test_numpy_calls_are_differentiated():
    grad = gc.grad(lambda x: np.sum(np.exp(x) * np.tanh(x)), backend="reference")(X)
    np.testing.assert_allclose(grad, np.exp(X) * (np.tanh(X) + 1 - np.tanh(X) ** 2), rtol=1e-12)


def test_a_numpy_call_traces_as_the_graphc_op():
    graph = gc.trace(lambda x: np.maximum(np.exp(x), 0.0), X)
    assert [node.op for node in graph.nodes if node.op != "constant"] == ["exp", "maximum"]


@pytest.mark.parametrize("call, expected", [
    (lambda x: np.arcsinh(x), r"np\.arcsinh on a graphc Tensor: graphc has no equivalent op"),
    (lambda x: np.add.reduce(x), r"np\.add\.reduce on a graphc Tensor: write gc\.sum"),
    (lambda x: np.round(x), r"np\.round on a graphc Tensor: write gc\.round\(x"),
    (lambda x: np.linalg.norm(x, axis=1), r"np\.linalg\.norm on a graphc Tensor takes "
                                          r"np\.linalg\.norm\(x\)"),
    (lambda x: np.exp(x, out=x), r"np\.exp on a graphc Tensor takes the operands only, got out="),
    (lambda x: np.sum(x, initial=1.0), r"np\.sum on a graphc Tensor takes np\.sum\(a, axis"),
    (lambda x: np.where(x > 0), r"np\.where on a graphc Tensor takes np\.where\(condition, x, y\)"),
    (lambda x: np.dot(np.stack([x, x]), x.T), r"np\.dot .* use gc\.matmul"),
    (lambda x: np.pad(x, 1, mode="edge"), r"np\.pad .* only mode='constant'"),
])
def test_unsupported_numpy_calls_say_what_to_write(call, expected):
    with pytest.raises(gc.GraphcError, match=expected) as info:
        gc.jit(call, backend="reference")(X)
    assert "test_interop.py" in str(info.value)  # the user's line


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def test_torch_calls_name_the_graphc_equivalent(torch):
    cases = [
        (lambda x: torch.exp(x), "torch.exp", "use gc.exp"),
        (lambda x: torch.cat([x, x]), "torch.cat", "use gc.cat"),
        (lambda x: torch.nn.functional.softmax(x, 1), "torch.nn.functional.softmax",
         "use gc.nn.functional.softmax"),
        (lambda x: torch.ones(3) + x, "torch.Tensor.add", "make it a NumPy array"),
        (lambda x: torch.nn.Linear(3, 2)(x), "torch.nn.functional.linear",
         "use gc.nn.functional.linear"),
        (lambda x: torch.lgamma(x), "torch.lgamma", "graphc has no equivalent op"),
    ]
    for call, name, advice in cases:
        with pytest.raises(gc.GraphcError) as info:
            gc.jit(call, backend="reference")(X)
        message = str(info.value)
        assert name in message and advice in message, message
        assert "PyTorch functions and modules cannot run inside a graphc trace" in message
        assert "test_interop.py" in message, message  # not a line inside torch


def numpy_model_math(x):
    """NumPy math a model may hold, each call graphc has an op for."""
    return [np.sin(x), np.cos(x), np.min(x, 1), np.amin(x), np.argmin(x, axis=0), np.var(x, 1),
            np.std(x, ddof=1), np.clip(x, -0.5, 0.5), np.cumsum(x), np.cumsum(x, axis=1),
            np.linalg.norm(x), np.prod(x), np.prod(x, axis=1, keepdims=True), np.cumprod(x),
            np.cumprod(x, axis=0)]


def test_numpy_math_with_a_graphc_op_traces_as_it():
    assert_same(gc.jit(numpy_model_math, backend="reference")(X), numpy_model_math(X))


def test_torch_calls_point_at_what_graphc_has_now(torch):
    cases = [
        (lambda x: torch.clamp(x, -1, 1), "torch.clamp", "use gc.clamp"),
        (lambda x: torch.t(x), "torch.t", "use the Tensor method x.t(...)"),
        (lambda x: torch.add(x, 1), "torch.add", "use +"),
        # not gc.gather, np.take's namesake: following that advice gave another result
        (lambda x: torch.gather(x, 1, torch.zeros((2, 2), dtype=torch.int64)), "torch.gather",
         "use gc.take_along_axis"),
    ]
    for call, name, advice in cases:
        with pytest.raises(gc.GraphcError) as info:
            gc.jit(call, backend="reference")(X)
        message = str(info.value)
        assert name in message and advice in message, message


class _Ported(gc.nn.Module):
    """A model whose forward still holds a NumPy or PyTorch call."""

    def __init__(self, call):
        super().__init__()
        self.linear = gc.nn.Linear(3, 3)
        self.call = call

    def forward(self, x):
        return self.call(self.linear(x))


def test_calls_in_a_compiled_model_and_a_training_step_refuse_with_the_users_line(torch):
    x, y = X.astype(np.float32), np.array([0, 2])
    cases = [(lambda h: torch.relu(h), "torch.relu was called on a graphc Tensor", "use gc.nn.functional.relu"),
             (lambda h: torch.cat([h, h], 1), "torch.cat was called", "use gc.cat"),
             (lambda h: torch.nn.functional.gelu(h), "torch.nn.functional.gelu", "use gc.nn.functional.gelu"),
             (lambda h: np.arcsinh(h), "np.arcsinh on a graphc Tensor", "no equivalent op")]
    for call, name, advice in cases:
        for build in (lambda m: gc.compile(m, x, backend="reference"),
                      lambda m: gc.compile_train_step(m, gc.nn.functional.cross_entropy,
                                                      gc.optim.SGD(m.parameters(), lr=0.1), (x, y),
                                                      backend="reference")):
            with pytest.raises(gc.GraphcError) as info:
                build(_Ported(call))
            message = str(info.value)
            assert name in message and advice in message and "test_interop.py" in message, message


def test_numpy_math_in_a_training_step_trains():
    """np.sin and np.clip in a model's forward are its graphc ops, differentiated."""
    x, y = X.astype(np.float32), np.array([0, 2])
    model = _Ported(lambda h: np.clip(np.sin(h), -0.9, 0.9))
    step = gc.compile_train_step(model, gc.nn.functional.cross_entropy,
                                 gc.optim.SGD(model.parameters(), lr=0.5), (x, y), backend="reference")
    losses = [step(x, y) for _ in range(5)]
    assert losses[-1] < losses[0]
