"""ONNX export: onnxruntime (CPU) runs exported models and single primitives, and matches
graphc's own outputs; parameters become initializers; unsupported ops fail clearly."""
import inspect
import os
import sys

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

import graphc as gc  # noqa: E402
from graphc import models, nn  # noqa: E402
from graphc.backends.reference import evaluate  # noqa: E402
from graphc.ir import Builder, GraphcError, TensorType  # noqa: E402
from graphc.ir.lowering import lowered_primitives  # noqa: E402
from graphc.onnx_export import DEFAULT_OPSET, MIN_OPSET, TARGET, graph_to_onnx  # noqa: E402

REF = "reference"  # graphc's own outputs come from the NumPy oracle, whatever the default backend
rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def f32(*shape, low=-2.0, high=2.0):
    return rng.uniform(low, high, shape).astype(np.float32)


def session(model_or_path):
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") \
        else model_or_path
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def run_onnx(model_or_path, *inputs):
    sess = session(model_or_path)
    return sess.run(None, {i.name: x for i, x in zip(sess.get_inputs(), inputs)})


def assert_export_matches(model, x, tmp_path, opset=DEFAULT_OPSET):
    path = tmp_path / "model.onnx"
    gc.export_onnx(model, path, x, opset=opset)
    (got,) = run_onnx(str(path), x)
    expected = gc.compile(model, x, backend=REF)(x)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    return onnx.load(str(path))


# -- whole models -----------------------------------------------------------------------------
def test_mlp(tmp_path):
    gc.manual_seed(0)
    model = models.mlp()
    exported = assert_export_matches(model, f32(4, 784), tmp_path)
    graph = exported.graph
    assert [i.name for i in graph.input] == ["input0"]
    assert [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim] == [4, 784]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [o.name for o in graph.output] == ["out"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    for name, value in model.state_dict().items():
        np.testing.assert_array_equal(initializers[name], value)
    assert {n.op_type for n in graph.node} == {"Transpose", "MatMul", "Add", "Relu"}


@pytest.mark.parametrize("image_size", [8, 28])
def test_mnist_cnn(tmp_path, image_size):
    gc.manual_seed(0)
    model = models.mnist_cnn(image_size)  # dropout layers vanish in eval mode
    exported = assert_export_matches(model, f32(2, 1, image_size, image_size), tmp_path)
    op_types = {n.op_type for n in exported.graph.node}
    assert {"Conv", "MaxPool"} <= op_types and not op_types & {"RandomUniform", "Dropout"}


def set_batch_norm_state(model):
    """Running statistics and affine parameters far from their initial values."""
    for name, value in model.state_dict().items():
        if name.endswith("running_var"):
            value[...] = rng.uniform(0.5, 2.0, value.shape)
        elif value.dtype == np.float32:
            value[...] = rng.standard_normal(value.shape)


@pytest.mark.parametrize("opset", [DEFAULT_OPSET, 18])
def test_batch_norm_eval_mode(tmp_path, opset):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 4 * 4, 6), nn.BatchNorm1d(6), nn.LogSoftmax(dim=1))
    set_batch_norm_state(model)
    exported = assert_export_matches(model, f32(2, 3, 6, 6), tmp_path, opset)
    names = {t.name for t in exported.graph.initializer}
    assert {"1.running_mean", "1.running_var", "5.running_mean", "5.running_var"} <= names
    assert not any(n.endswith("num_batches_tracked") for n in names)  # read by training only


@pytest.mark.parametrize("layer,shape", [(nn.BatchNorm1d, (5, 3)), (nn.BatchNorm1d, (5, 3, 4)),
                                         (nn.BatchNorm2d, (2, 3, 4, 5))])
def test_batch_norm_uses_running_statistics(tmp_path, layer, shape):
    model = layer(3)
    set_batch_norm_state(model)
    x = f32(*shape)
    path = tmp_path / "bn.onnx"
    gc.export_onnx(model, path, x)
    state = {k: v.reshape((1, 3) + (1,) * (len(shape) - 2)) for k, v in model.state_dict().items()
             if v.ndim == 1}
    expected = ((x - state["running_mean"]) / np.sqrt(state["running_var"] + model.eps)
                * state["weight"] + state["bias"])
    np.testing.assert_allclose(run_onnx(str(path), x)[0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head", [nn.Softmax, nn.LogSoftmax])
@pytest.mark.parametrize("opset", [MIN_OPSET, DEFAULT_OPSET, 18])  # ReduceMax's axes: attr, input
def test_softmax_heads(tmp_path, head, opset):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), head(dim=1))
    exported = assert_export_matches(model, f32(3, 5), tmp_path, opset)
    assert exported.opset_import[0].version == opset


def test_avg_pool_and_strided_grouped_conv(tmp_path):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2),
                          nn.Sigmoid(), nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False),
                          nn.Flatten(), nn.Linear(6 * 2 * 2, 3))
    assert_export_matches(model, f32(2, 4, 7, 7), tmp_path)


def test_compiled_model_exports_current_weights_and_new_signatures(tmp_path):
    gc.manual_seed(0)
    model = models.mlp((6, 5, 3))
    compiled = gc.compile(model, f32(4, 6), backend=REF)
    model.state_dict()["0.weight"][...] *= -3  # in place: the compiled model sees it too
    x = f32(4, 6)
    gc.export_onnx(compiled, tmp_path / "current.onnx")
    np.testing.assert_allclose(run_onnx(str(tmp_path / "current.onnx"), x)[0], compiled(x),
                               rtol=1e-5, atol=1e-6)

    x3 = f32(3, 6)  # another batch size: exported for that signature
    gc.export_onnx(compiled, tmp_path / "batch3.onnx", (x3,))
    sess = session(str(tmp_path / "batch3.onnx"))
    assert sess.get_inputs()[0].shape == [3, 6]
    np.testing.assert_allclose(sess.run(None, {"input0": x3})[0], compiled(x3), rtol=1e-5, atol=1e-6)


# -- single primitives ------------------------------------------------------------------------
def single_op_graph(op, arrays, attrs):
    b = Builder(op)
    inputs = [b.add_input(TensorType.of(a), f"x{i}") for i, a in enumerate(arrays)]
    b.add_output("y", b.bind(op, *inputs, **attrs))
    return b.graph


POSITIVE = f32(2, 3, low=0.2, high=3.0)
BOOLS = rng.random((2, 3)) < 0.5
INTS = rng.integers(-5, 5, (2, 3)).astype(np.int32)
IMAGE = f32(2, 4, 7, 6)

OP_CASES = [
    *[(op, [f32(2, 3)], {}) for op in ("neg", "exp", "tanh", "sigmoid", "relu", "abs", "sign",
                                       "square", "stop_gradient")],
    *[(op, [POSITIVE], {}) for op in ("log", "sqrt", "rsqrt", "reciprocal")],
    *[(op, [f32(2, 3)], {}) for op in ("sin", "cos", "erf")],
    # halves included: Round takes them to the even integer, as graphc and NumPy do
    *[(op, [np.float32([[-2.5, -1.7, -0.5], [0.5, 1.5, 2.3]])], {}) for op in ("floor", "ceil", "trunc", "round")],
    ("sin", [f32(2, 3).astype(np.float64)], {}),  # (onnxruntime implements Erf for float32 only)
    ("log1p", [POSITIVE], {}),
    ("expm1", [f32(2, 3)], {}),
    ("cumsum", [f32(2, 3, 4)], {"axis": 1}),
    ("cumsum", [INTS], {"axis": 1, "reverse": True}),
    ("argsort", [np.round(f32(3, 5, 4))], {"axis": 1}),  # rounded: ties, kept in order both ways
    ("argsort", [np.round(f32(3, 5, 4))], {"axis": 2, "descending": True}),
    ("argsort", [INTS.astype(np.int64)], {"axis": 1, "descending": True}),
    ("moments", [f32(2, 3, 4, 5)], {"axes": (0, 2, 3)}),
    ("moments", [f32(2, 3, 4)], {"axes": (2,)}),
    ("normalize", [f32(2, 3, 4) * 3 + 2], {"axes": (2,), "epsilon": 1e-5}),
    ("normalize", [f32(2, 3, 4, 5)], {"axes": (0, 2, 3), "epsilon": 0.1}),
    ("cumprod", [np.array([[1.5, 0.0, -2.0, 3.0], [0.5, -1.0, 2.0, 0.0]], np.float32)], {"axis": 1}),
    ("softmax", [f32(2, 3, 4)], {"axis": 1}),
    ("softmax", [np.array([[-np.inf] * 3, [0.5, -np.inf, 1.0]], np.float32)],  # a masked row: zeros
     {"axis": 1, "zero_masked_rows": True}),
    ("cumprod", [f32(3, 2, 2)], {"axis": 0, "reverse": True}),
    ("exp", [f32(2, 3).astype(np.float64)], {}),
    ("neg", [INTS], {}),
    ("abs", [INTS.astype(np.int64)], {}),
    ("logical_not", [BOOLS], {}),
    *[(op, [f32(2, 3), f32(3)], {}) for op in ("add", "sub", "mul", "div", "maximum", "minimum",
                                               "eq", "ne", "lt", "le", "gt", "ge")],
    ("pow", [POSITIVE, f32(1, 3)], {}),
    ("detached_write", [f32(2, 3), f32(2, 3)], {}),
    ("fmod", [f32(2, 3) * 5, np.float32([1.5, -2.0, 0.7])], {}),
    # a NaN is the maximum and argmax's answer (onnxruntime's ReduceMax and ArgMax pass over it)
    ("max", [np.float32([[1.0, np.nan, 3.0], [2.0, 5.0, 4.0]])], {"axes": (1,)}),
    ("argmax", [np.float32([[1.0, np.nan, 3.0], [2.0, 5.0, np.nan]])], {"axis": 1}),
    ("mul", [INTS, INTS[:1]], {}),
    ("eq", [INTS, INTS[::-1]], {}),
    *[(op, [BOOLS, BOOLS[::-1]], {}) for op in ("lt", "ge", "ne", "logical_and", "logical_or")],
    ("where", [BOOLS, f32(2, 3), f32(1, 3)], {}),
    ("cast", [f32(2, 3) * 3], {"dtype": "int32"}),
    ("cast", [f32(2, 3)], {"dtype": "bool"}),
    ("cast", [INTS.astype(np.int64)], {"dtype": "float64"}),
    ("reshape", [f32(2, 3, 4)], {"shape": (4, 6)}),
    ("reshape", [f32(0, 3)], {"shape": (3, 0)}),
    ("transpose", [f32(2, 3, 4)], {"perm": (2, 0, 1)}),
    ("broadcast_to", [f32(3, 1)], {"shape": (2, 3, 4)}),
    ("expand_dims", [f32(2, 3)], {"axes": (0, 2)}),
    ("expand_dims", [f32(2, 3)], {"axes": ()}),
    ("squeeze", [f32(2, 1, 3, 1)], {"axes": (1,)}),
    ("squeeze", [f32(2, 1, 3)], {"axes": ()}),
    ("slice", [f32(4, 5, 3)], {"starts": (1, 0, 0), "stops": (4, 5, 2), "steps": (2, 1, 1)}),
    ("slice", [f32(4, 5)], {"starts": (0, 0), "stops": (4, 5), "steps": (1, 1)}),
    ("flip", [f32(2, 3, 2)], {"axes": (0, 2)}),
    ("concatenate", [f32(2, 1), f32(2, 3), f32(2, 2)], {"axis": 1}),
    ("pad", [f32(2, 3)], {"pads": ((1, 0), (2, 1)), "value": 1.5}),
    ("pad", [INTS], {"pads": ((0, 2), (1, 1)), "value": -1.0}),
    ("sum", [f32(2, 3, 4)], {"axes": (0, 2), "keepdims": False}),
    ("sum", [f32(2, 3, 4)], {"axes": (1,), "keepdims": True}),
    ("sum", [f32(2, 3)], {"axes": (), "keepdims": False}),
    ("sum", [INTS], {"axes": (0, 1), "keepdims": False}),
    ("max", [f32(2, 3, 4)], {"axes": (0, 2), "keepdims": True}),
    ("max", [f32(2, 3, 4)], {"axes": (1,), "keepdims": False}),
    ("max", [f32(2, 3)], {"axes": (), "keepdims": True}),
    ("argmax", [f32(2, 3, 4)], {"axis": 1, "keepdims": False}),
    ("argmax", [f32(2, 3, 4)], {"axis": 2, "keepdims": True}),
    ("take_along_axis", [f32(3, 4), rng.integers(-4, 4, (3, 2))], {"axis": 1}),
    ("take_along_axis", [f32(1, 4, 3), rng.integers(0, 4, (2, 5, 1)).astype(np.int32)], {"axis": 1}),
    ("gather", [f32(5, 3), rng.integers(-5, 5, (2, 4))], {"axis": 0}),
    ("gather", [f32(2, 5, 3), np.array([4, 0, -1], np.int32)], {"axis": 1}),
    ("one_hot", [np.array([[0, 3, -1], [5, 2, 4]])], {"num_classes": 5}),
    ("one_hot", [np.array([1, 0], np.int32)], {"num_classes": 3, "dtype": "bool"}),
    ("matmul", [f32(3, 4), f32(4, 2)], {}),
    ("matmul", [f32(2, 1, 3, 4), f32(5, 4, 2)], {}),
    ("conv2d", [IMAGE, f32(6, 2, 3, 2)],
     {"stride": (2, 1), "padding": (1, 2), "dilation": (2, 1), "groups": 2}),
    ("conv2d_input_grad", [f32(2, 4, 4, 5), f32(4, 3, 3, 2)],  # ConvTranspose, output_padding (1, 0)
     {"input_shape": (2, 3, 8, 6), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 1), "groups": 1}),
    ("max_pool2d", [IMAGE], {"kernel": (3, 2), "stride": (2, 1), "padding": (1, 1)}),
    *[("avg_pool2d", [IMAGE], {"kernel": (3, 3), "stride": (2, 2), "padding": (1, 1),
                                "count_include_pad": include}) for include in (True, False)],
]


def case_id(case):
    op, arrays, attrs = case
    return f"{op}-" + "-".join(str(TensorType.of(np.asarray(a))) for a in arrays) + (
        f"-{attrs}" if attrs else "")


@pytest.mark.parametrize("opset", [MIN_OPSET, DEFAULT_OPSET, 18])
@pytest.mark.parametrize("case", OP_CASES, ids=case_id)
def test_primitive_matches_reference(case, opset):
    op, arrays, attrs = case
    graph = single_op_graph(op, arrays, attrs)
    (got,) = run_onnx(graph_to_onnx(graph, {}, opset), *arrays)
    (expected,) = evaluate(graph, arrays)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    else:
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("op, numpy_fn, edges", [
    ("log1p", np.log1p, [-1.0, -0.5, 80.0, 1e30]),
    ("expm1", np.expm1, [-0.5, 3.0, 80.0, 100.0, -100.0, 800.0, -np.inf]),
])
def test_log1p_and_expm1_keep_the_digits_of_small_operands(op, numpy_fn, edges, dtype):
    """log(1 + x) and exp(x) - 1 would give 0 for |x| below epsilon, and few right digits near
    it: the converters correct the rounding of 1 + x and exp(x), to a few units in the last
    place of NumPy's, with its infinities and NaN."""
    tiny = [s * m for s in (1, -1) for m in (1e-30, 1e-10, 3e-8, 1e-4, 0.01)]
    x = np.array([0.0, *tiny, *edges, np.inf, np.nan], dtype)
    graph = single_op_graph(op, [x], {})
    (got,) = run_onnx(graph_to_onnx(graph, {}, DEFAULT_OPSET), x)
    with np.errstate(divide="ignore", over="ignore"):
        expected = numpy_fn(x)
    np.testing.assert_allclose(got, expected, rtol=8 * np.finfo(dtype).eps, atol=0)


def test_every_inference_op_family_has_cases():
    assert {op for op, _, _ in OP_CASES} == set(lowered_primitives(TARGET)) - {"constant"}


def test_constants_params_state_and_output_names():
    b = Builder("mixed")
    x = b.add_input(TensorType((2, 3), "float32"), "x")
    w = b.add_input(TensorType((3,), "float32"), "w", "param")
    b.add_input(TensorType((), "int64"), "unused_counter", "state")
    scale = b.add_input(TensorType((1, 3), "float32"), "scale", "state")
    y = b.mul(b.add(x, w), b.add(scale, b.const(0.5, "float32")))
    b.add_output("y", y)
    b.add_output("y_again", y)
    b.add_output("x_out", x)  # an input passed straight through
    arrays = {"w": f32(3), "unused_counter": np.array(7), "scale": f32(1, 3)}
    model = graph_to_onnx(b.graph, arrays)
    assert [i.name for i in model.graph.input] == ["x"]
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert {"w", "scale"} <= set(initializers) and "unused_counter" not in initializers
    np.testing.assert_array_equal(initializers["w"], arrays["w"])
    assert [o.name for o in model.graph.output] == ["y", "y_again", "x_out"]
    xv = f32(2, 3)
    y, y_again, x_out = run_onnx(model, xv)
    np.testing.assert_allclose(y, (xv + arrays["w"]) * (arrays["scale"] + 0.5), rtol=1e-6)
    np.testing.assert_array_equal(y_again, y)
    np.testing.assert_array_equal(x_out, xv)


# -- errors -------------------------------------------------------------------------------------
class FloorDivideHead(nn.Module):
    def forward(self, x):
        return x // 2.0  # floor_divide has no ONNX converter


FLOOR_DIVIDE_LINE = inspect.getsourcelines(FloorDivideHead.forward)[1] + 1


def test_unsupported_op_names_op_and_user_line(tmp_path):
    path = tmp_path / "never.onnx"
    with pytest.raises(GraphcError) as info:
        gc.export_onnx(nn.Sequential(nn.Linear(3, 2), FloorDivideHead()), path, f32(2, 3))
    message = str(info.value)
    assert "'floor_divide' (f32[2,2], f32[]) has no ONNX converter" in message
    assert f"test_onnx.py:{FLOOR_DIVIDE_LINE}" in message
    assert not path.exists()


def test_missing_onnx_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(GraphcError, match=r"pip install 'graphc\[onnx\]'"):
        gc.export_onnx(models.mlp((3, 2)), tmp_path / "m.onnx", f32(1, 3))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, onnx.defs.onnx_opset_version() + 1])
def test_unsupported_opset(tmp_path, opset):
    with pytest.raises(GraphcError, match=f"opset {opset} is not supported"):
        gc.export_onnx(models.mlp((3, 2)), tmp_path / "m.onnx", f32(1, 3), opset=opset)


def test_bad_arguments(tmp_path):
    with pytest.raises(GraphcError, match="example_inputs are needed"):
        gc.export_onnx(models.mlp((3, 2)), tmp_path / "m.onnx")
    with pytest.raises(GraphcError, match="expected a graphc.nn.Module or a CompiledModel, got int"):
        gc.export_onnx(3, tmp_path / "m.onnx")


SHARED_LAYER = nn.Linear(4, 4)  # a module the exported model calls but does not own


class CallsAnOutsideLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(SHARED_LAYER(x))


def test_the_weights_of_a_module_the_model_calls_but_does_not_own_are_exported(tmp_path):
    """export_onnx failed with "no value given for input 'Linear.weight'" (.gcx files hold them)."""
    gc.manual_seed(0)
    assert_export_matches(CallsAnOutsideLayer(), f32(3, 4), tmp_path)


def test_an_export_of_a_compiled_model_follows_changes_to_the_model(tmp_path):
    """export_onnx(compiled) wrote the graph compiled before a setting changed or a layer was
    replaced (onnxruntime gave the old slope), though the compiled model's own calls traced
    again."""
    from graphc.onnx_export import export_onnx
    x = np.array([[-1.0, 2.0]], np.float32)
    model = nn.Sequential(nn.LeakyReLU(0.5))
    compiled = gc.compile(model, x)
    compiled(x)
    model[0].negative_slope = 0.1
    export_onnx(compiled, tmp_path / "slope.onnx")
    np.testing.assert_allclose(run_onnx(str(tmp_path / "slope.onnx"), x)[0], [[-0.1, 2.0]])
    model[0] = nn.ReLU()
    export_onnx(compiled, tmp_path / "relu.onnx", example_inputs=x)
    np.testing.assert_allclose(run_onnx(str(tmp_path / "relu.onnx"), x)[0], [[0.0, 2.0]])


def test_parameters_named_like_inputs_or_outputs_export(tmp_path):
    """A parameter called `input0` shared its name with the data input (the model did not
    validate), and one called `out0` with an output."""
    from graphc.onnx_export import export_onnx

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.input0 = nn.Parameter(np.full((3,), 5.0, np.float32))
            self.out0 = nn.Parameter(np.full((3,), 1.0, np.float32))

        def forward(self, a):
            return a + self.input0, a * self.out0

    x = np.ones((2, 3), np.float32)
    export_onnx(Named(), tmp_path / "named.onnx", example_inputs=x)
    got = run_onnx(str(tmp_path / "named.onnx"), x)
    np.testing.assert_allclose(got[0], x + 5)
    np.testing.assert_allclose(got[1], x)


def test_integer_relu_runs_in_onnxruntime(tmp_path):
    """Relu of int64 is valid ONNX that onnxruntime has no kernel for: it is max(x, 0)."""
    from graphc.onnx_export import export_onnx

    class IntRelu(nn.Module):
        def forward(self, a):
            return gc.nn.functional.relu(a)

    x = np.array([[-3, 2]], np.int64)
    export_onnx(IntRelu(), tmp_path / "r.onnx", example_inputs=x)
    np.testing.assert_array_equal(run_onnx(str(tmp_path / "r.onnx"), x)[0], [[0, 2]])


@pytest.mark.parametrize("opset", [None, "17", 17.0, True, 3])
def test_an_opset_that_is_no_supported_integer_is_refused_by_name(opset, tmp_path):
    from graphc.onnx_export import export_onnx
    with pytest.raises(GraphcError, match=f"opset {opset!r} is not supported"):
        export_onnx(nn.Linear(3, 2), tmp_path / "m.onnx", example_inputs=np.ones((1, 3), np.float32),
                    opset=opset)


def test_a_graph_drawing_random_numbers_says_to_call_eval(tmp_path):
    from graphc.onnx_export import export_onnx
    head = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5))  # outside the model, in training mode

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return head(self.lin(x))

    net = Net()
    net.eval()
    with pytest.raises(GraphcError, match=r"draws random numbers.*call .eval\(\) on every module"):
        export_onnx(net, tmp_path / "m.onnx", example_inputs=np.ones((2, 3), np.float32))
