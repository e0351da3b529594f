"""Export of inference graphs to ONNX.

The optimized inference IR maps almost one to one onto ONNX operators: each primitive's converter
is its "onnx" lowering in the registry (ir/lowering.py), emitting the ONNX nodes that compute it.
Data inputs stay graph inputs with their static shapes; parameters and buffers become
initializers holding the model's current values; graph outputs keep their names. Every
intermediate value is declared with its static type, so the checker's strict shape inference
re-verifies each converter's output type. A `scan` becomes an ONNX `Scan` whose body is the
scan's body graph, converted the same way (nested scans nest).

onnx is an optional dependency (`pip install 'graphc[onnx]'`), imported only when exporting.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import numpy as np

from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.errors import GraphcError
from graphc.ir.types import is_float
from graphc.ir.lowering import find_lowering, lowered_primitives, lowering, register_lowering
from graphc.ir.ops.control import SCAN_OP, split_inputs

from .api import to_array, user_facing
from .compile import CompiledModel, compile
from .nn.module import Module
from .train import atomic_write

__all__ = ["DEFAULT_OPSET", "MIN_OPSET", "TARGET", "export_onnx", "graph_to_onnx"]

TARGET = "onnx"  # the exporter's name in the lowering registry
DEFAULT_OPSET = 17
# Opset 14 gives Reshape its `allowzero` flag (graphc has zero-size dimensions); ReduceSum,
# Squeeze and Unsqueeze already take their axes as inputs there.
MIN_OPSET = 14


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise GraphcError("export_onnx needs the onnx package: pip install 'graphc[onnx]' "
                          "(or pip install onnx)") from None
    return onnx


class OnnxGraphBuilder:
    """Collects the ONNX nodes and initializers of one graph; converters write through it."""

    def __init__(self, onnx: Any, opset: int, reserved: set[str]) -> None:
        self.onnx, self.opset = onnx, opset
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []
        self.source: Node | None = None  # the graphc node being converted, for names and docs
        self._taken = set(reserved)

    def fresh(self, hint: str) -> str:
        """A name no input, output, node or other value of the model uses."""
        index = len(self._taken)
        while f"{hint}_{index}" in self._taken:
            index += 1
        name = f"{hint}_{index}"
        self._taken.add(name)
        return name

    def body_builder(self) -> OnnxGraphBuilder:
        """A builder for a loop body: nodes of its own, but this model's names (ONNX wants every
        name unique across the model, subgraphs included) and initializers (a body reads outer
        values by name)."""
        body = OnnxGraphBuilder(self.onnx, self.opset, reserved=set())
        body._taken, body.initializers = self._taken, self.initializers
        return body

    def emit(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        """Append one ONNX node; returns its output name (`output`, or a fresh one)."""
        output = output or self.fresh(op_type.lower())
        self.emit_multi(op_type, inputs, [output], **attrs)
        return output

    def emit_multi(self, op_type: str, inputs: list[str], outputs: list[str], **attrs: Any) -> None:
        """Append one ONNX node writing several outputs."""
        source, doc = self.source, ""
        if source is not None:  # tools such as Netron show where each node came from
            doc = f"graphc {source.op}" + (f" at {source.loc}" if source.loc else "")
        self.nodes.append(self.onnx.helper.make_node(
            op_type, inputs, outputs, name=self.fresh(source.op if source else op_type),
            doc_string=doc, **attrs))

    def constant(self, array: np.ndarray, name: str | None = None) -> str:
        """An initializer holding `array`; returns its name."""
        name = name or self.fresh("const")
        array = np.asarray(array, order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def ints(self, values: tuple[int, ...]) -> str:
        """An int64 vector initializer: the form ONNX takes shapes, axes and bounds in."""
        return self.constant(np.asarray(values, np.int64).reshape(len(values)))

    def elem_type(self, dtype: str) -> int:
        return self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def value_info(self, name: str, type: TensorType) -> Any:
        return self.onnx.helper.make_tensor_value_info(name, self.elem_type(type.dtype), type.shape)


# A converter emits ONNX nodes computing `node` from the ONNX names of its inputs, and writes the
# result to the name `out`.
Converter = Callable[[OnnxGraphBuilder, Node, list[str], str], None]


def _one_to_one(op_type: str) -> Converter:
    def convert(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
        g.emit(op_type, xs, out)
    return convert


# -- elementwise --------------------------------------------------------------------------------
for _op, _op_type in {
        "neg": "Neg", "exp": "Exp", "log": "Log", "sqrt": "Sqrt", "tanh": "Tanh",
        "sigmoid": "Sigmoid", "abs": "Abs", "sign": "Sign", "sin": "Sin",
        "cos": "Cos", "erf": "Erf", "floor": "Floor", "ceil": "Ceil", "round": "Round",
        "reciprocal": "Reciprocal", "stop_gradient": "Identity", "logical_not": "Not",
        "add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow", "maximum": "Max",
        "minimum": "Min", "eq": "Equal", "logical_and": "And", "logical_or": "Or",
        "where": "Where", "matmul": "MatMul"}.items():
    register_lowering(TARGET, _op, _one_to_one(_op_type))


@lowering(TARGET, "detached_write")
def _detached_write(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Identity", xs[:1], out)  # the written value (of the base's shape: a view's write)


@lowering(TARGET, "relu")
def _relu(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    if is_float(node.output.dtype):
        g.emit("Relu", xs, out)
    else:  # onnxruntime has Relu for floats and int32 only: max(x, 0), as valid
        g.emit("Max", [xs[0], g.constant(np.zeros((), node.output.type.np_dtype))], out)


@lowering(TARGET, "square")
def _square(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Mul", [xs[0], xs[0]], out)


@lowering(TARGET, "log1p")
def _log1p(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """ONNX has no Log1p, and Log(1 + x) rounds away every |x| below the dtype's epsilon. With
    u = 1 + x rounded, log(u) * x / (u - 1) corrects that rounding (Goldberg 1991, theorem 4):
    x itself where u is 1, and log(u) where u is infinite (inf / inf would be NaN)."""
    x, dtype = xs[0], node.inputs[0].dtype
    one, inf = g.constant(np.asarray(1, dtype)), g.constant(np.asarray(np.inf, dtype))
    u = g.emit("Add", [x, one])
    log_u = g.emit("Log", [u])
    corrected = g.emit("Mul", [log_u, g.emit("Div", [x, g.emit("Sub", [u, one])])])
    exact = g.emit("Or", [g.emit("Equal", [u, one]), g.emit("Equal", [u, inf])])
    g.emit("Where", [exact, g.emit("Where", [g.emit("Equal", [u, one]), x, log_u]), corrected], out)


@lowering(TARGET, "expm1")
def _expm1(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """ONNX has no Expm1, and Exp(x) - 1 loses every digit of x below the dtype's epsilon. With
    u = exp(x) rounded, (u - 1) * x / log(u) corrects that rounding (Kahan's): x itself where u
    is 1, and u - 1 where u - 1 is -1 or u is infinite (where log(u) is not finite)."""
    x, dtype = xs[0], node.inputs[0].dtype
    one, inf = g.constant(np.asarray(1, dtype)), g.constant(np.asarray(np.inf, dtype))
    u = g.emit("Exp", [x])
    u_minus_one = g.emit("Sub", [u, one])
    corrected = g.emit("Mul", [u_minus_one, g.emit("Div", [x, g.emit("Log", [u])])])
    saturated = g.emit("Or", [g.emit("Equal", [u_minus_one, g.emit("Neg", [one])]), g.emit("Equal", [u, inf])])
    g.emit("Where", [g.emit("Equal", [u, one]), x,
                     g.emit("Where", [saturated, u_minus_one, corrected])], out)


@lowering(TARGET, "trunc")
def _trunc(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """ONNX has no Trunc: ceil below zero, floor above."""
    negative = g.emit("Less", [xs[0], g.constant(np.asarray(0, node.inputs[0].dtype))])
    g.emit("Where", [negative, g.emit("Ceil", xs), g.emit("Floor", xs)], out)


@lowering(TARGET, "fmod")
def _fmod(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Mod", xs, out, fmod=1)  # C's fmod: the dividend's sign


@lowering(TARGET, "rsqrt")
def _rsqrt(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Reciprocal", [g.emit("Sqrt", xs)], out)


@lowering(TARGET, "cast")
def _cast(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Cast", xs, out, to=g.elem_type(node.attrs["dtype"]))


@lowering(TARGET, "ne")
def _not_equal(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Not", [g.emit("Equal", xs)], out)


def _ordering(op_type: str) -> Converter:
    def convert(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
        if node.inputs[0].dtype == "bool":  # ONNX orders numbers only; False < True as 0 < 1
            xs = [g.emit("Cast", [x], to=g.elem_type("int32")) for x in xs]
        g.emit(op_type, xs, out)
    return convert


for _op, _op_type in {"lt": "Less", "le": "LessOrEqual", "gt": "Greater",
                      "ge": "GreaterOrEqual"}.items():
    register_lowering(TARGET, _op, _ordering(_op_type))


@lowering(TARGET, "constant")
def _constant(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.constant(node.attrs["value"], name=out)


# -- shape ops ----------------------------------------------------------------------------------
@lowering(TARGET, "reshape")
def _reshape(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    shape = node.attrs["shape"]
    # Without allowzero, ONNX reads a 0 in the target shape as "keep the input's dimension".
    flags = {"allowzero": 1} if 0 in shape else {}
    g.emit("Reshape", [xs[0], g.ints(shape)], out, **flags)


@lowering(TARGET, "transpose")
def _transpose(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Transpose", xs, out, perm=list(node.attrs["perm"]))


@lowering(TARGET, "flip")
def _flip(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    axes = node.attrs["axes"]
    if not axes:
        g.emit("Identity", xs, out)
        return
    # Slice from the last element backwards, past the first (ONNX clamps the end to -1).
    lowest = np.iinfo(np.int64).min
    g.emit("Slice", [xs[0], g.ints((-1,) * len(axes)), g.ints((lowest,) * len(axes)),
                     g.ints(axes), g.ints((-1,) * len(axes))], out)


@lowering(TARGET, "broadcast_to")
def _broadcast_to(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Expand", [xs[0], g.ints(node.attrs["shape"])], out)


def _with_axes_input(op_type: str) -> Converter:
    """Ops taking `axes` as an input, where an empty list would not mean "no axes" to ONNX
    (Squeeze and ReduceSum would act on every axis): those become an Identity."""
    def convert(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
        axes = node.attrs["axes"]
        if not axes:
            g.emit("Identity", xs, out)
        elif "keepdims" in node.attrs:
            g.emit(op_type, [xs[0], g.ints(axes)], out, keepdims=int(node.attrs["keepdims"]))
        else:
            g.emit(op_type, [xs[0], g.ints(axes)], out)
    return convert


register_lowering(TARGET, "expand_dims", _with_axes_input("Unsqueeze"))
register_lowering(TARGET, "squeeze", _with_axes_input("Squeeze"))
register_lowering(TARGET, "sum", _with_axes_input("ReduceSum"))


_reduce_max_axes_input = _with_axes_input("ReduceMax")


@lowering(TARGET, "moments")
def _moments(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """Mean and biased variance (sums times 1/n: ReduceSum takes its axes as an input from
    opset 13 on, ReduceMean only from 18), stacked on a new leading axis."""
    x, axes = node.inputs[0], node.attrs["axes"]
    inverse = g.constant(np.asarray(1 / np.prod([x.shape[a] for a in axes]), x.dtype))

    def mean(v: str) -> str:
        return g.emit("Mul", [g.emit("ReduceSum", [v, g.ints(axes)], keepdims=1), inverse])

    average = mean(xs[0])
    centred = g.emit("Sub", [xs[0], average])
    var = mean(g.emit("Mul", [centred, centred]))
    first = g.ints((0,))
    g.emit("Concat", [g.emit("Unsqueeze", [average, first]), g.emit("Unsqueeze", [var, first])], out,
           axis=0)


@lowering(TARGET, "softmax")
def _softmax(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """Softmax along one axis (its meaning from opset 13 on). ONNX's gives NaN on a line of
    -inf; with zero_masked_rows, lines whose max is -inf are set to 0."""
    axis = node.attrs["axis"]
    if not node.attrs["zero_masked_rows"]:
        g.emit("Softmax", xs, out, axis=axis)
        return
    probabilities = g.emit("Softmax", xs, axis=axis)
    dtype = node.inputs[0].dtype
    if g.opset >= 18:  # ReduceMax took its axes as an attribute before opset 18
        peak = g.emit("ReduceMax", [xs[0], g.ints((axis,))], keepdims=1)
    else:
        peak = g.emit("ReduceMax", xs, axes=[axis], keepdims=1)
    masked = g.emit("Equal", [peak, g.constant(np.asarray(-np.inf, dtype))])
    g.emit("Where", [masked, g.constant(np.asarray(0, dtype)), probabilities], out)


@lowering(TARGET, "normalize")
def _normalize(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """(x - mean) / sqrt(var + epsilon) over `axes`, from ReduceSum as `moments` is (the axes
    need not be trailing, as LayerNormalization's are)."""
    x, axes = node.inputs[0], node.attrs["axes"]
    inverse = g.constant(np.asarray(1 / np.prod([x.shape[a] for a in axes]), x.dtype))

    def mean(v: str) -> str:
        return g.emit("Mul", [g.emit("ReduceSum", [v, g.ints(axes)], keepdims=1), inverse])

    centred = g.emit("Sub", [xs[0], mean(xs[0])])
    var = mean(g.emit("Mul", [centred, centred]))
    epsilon = g.constant(np.asarray(node.attrs["epsilon"], x.dtype))
    g.emit("Div", [centred, g.emit("Sqrt", [g.emit("Add", [var, epsilon])])], out)


def _emit_reduce_max(g: OnnxGraphBuilder, node: Node, x: str, out: str) -> None:
    if g.opset >= 18:  # ReduceMax took its axes as an attribute before opset 18
        _reduce_max_axes_input(g, node, [x], out)
    elif not node.attrs["axes"]:
        g.emit("Identity", [x], out)
    else:
        g.emit("ReduceMax", [x], out, axes=list(node.attrs["axes"]),
               keepdims=int(node.attrs["keepdims"]))


def _nan_flags(g: OnnxGraphBuilder, x: str, dtype: str) -> str:
    """1 where x is NaN, else 0, in x's dtype."""
    return g.emit("Cast", [g.emit("IsNaN", [x])], to=g.elem_type(dtype))


@lowering(TARGET, "max")
def _reduce_max(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """A NaN is the maximum, as in graphc and NumPy (onnxruntime's ReduceMax passes over it)."""
    dtype = node.inputs[0].dtype
    if not is_float(dtype):
        _emit_reduce_max(g, node, xs[0], out)
        return
    peak, any_nan = g.fresh("peak"), g.fresh("any_nan")
    _emit_reduce_max(g, node, xs[0], peak)
    _emit_reduce_max(g, node, _nan_flags(g, xs[0], dtype), any_nan)
    nan = g.constant(np.asarray(np.nan, dtype))
    g.emit("Where", [g.emit("Greater", [any_nan, g.constant(np.asarray(0, dtype))]), nan, peak], out)


@lowering(TARGET, "slice")
def _slice(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    starts, stops, steps = (node.attrs[k] for k in ("starts", "stops", "steps"))
    axes = tuple(axis for axis, size in enumerate(node.inputs[0].shape)
                 if (starts[axis], stops[axis], steps[axis]) != (0, size, 1))
    if not axes:
        g.emit("Identity", xs, out)
        return
    bounds = [g.ints(tuple(values[a] for a in axes)) for values in (starts, stops)]
    g.emit("Slice", [xs[0], *bounds, g.ints(axes), g.ints(tuple(steps[a] for a in axes))], out)


@lowering(TARGET, "pad")
def _pad(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    pads = node.attrs["pads"]
    widths = tuple(lo for lo, _ in pads) + tuple(hi for _, hi in pads)  # all befores, all afters
    fill = g.constant(np.asarray(node.attrs["value"], node.inputs[0].dtype))
    g.emit("Pad", [xs[0], g.ints(widths), fill], out)


# -- reductions and indexing ----------------------------------------------------------------------
def _with_axis(op_type: str) -> Converter:
    def convert(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
        g.emit(op_type, xs, out, axis=node.attrs["axis"])
    return convert


register_lowering(TARGET, "concatenate", _with_axis("Concat"))
register_lowering(TARGET, "gather", _with_axis("Gather"))


@lowering(TARGET, "argmax")
def _argmax(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """The first NaN's index where a line holds one, as in graphc and NumPy (onnxruntime's
    ArgMax passes over NaN)."""
    axis, keepdims = node.attrs["axis"], int(node.attrs["keepdims"])
    dtype = node.inputs[0].dtype
    if not is_float(dtype):
        g.emit("ArgMax", xs, out, axis=axis, keepdims=keepdims)
        return
    flags = _nan_flags(g, xs[0], dtype)
    first_nan = g.emit("ArgMax", [flags], axis=axis, keepdims=keepdims)
    any_nan = g.emit("Greater", [g.emit("ReduceMax", [flags], axes=[axis], keepdims=keepdims)
                                 if g.opset < 18 else
                                 g.emit("ReduceMax", [flags, g.ints((axis,))], keepdims=keepdims),
                                 g.constant(np.asarray(0, dtype))])
    g.emit("Where", [any_nan, first_nan, g.emit("ArgMax", xs, axis=axis, keepdims=keepdims)], out)


@lowering(TARGET, "take_along_axis")
def _take_along_axis(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    # GatherElements does not broadcast: give both operands the output's shape off the axis.
    (x, indices), axis, shape = node.inputs, node.attrs["axis"], node.output.shape
    operands = []
    for value, name in zip((x, indices), xs):
        full = shape[:axis] + (value.shape[axis],) + shape[axis + 1:]
        operands.append(name if value.shape == full else g.emit("Expand", [name, g.ints(full)]))
    g.emit("GatherElements", operands, out, axis=axis)


@lowering(TARGET, "one_hot")
def _one_hot(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    # indices[..., None] == arange(n), as graphc defines it. ONNX's OneHot would count negative
    # indices from the end, where graphc gives an all-zero row.
    indices, n = node.inputs[0], node.attrs["num_classes"]
    classes = g.constant(np.arange(n, dtype=indices.dtype))
    hits = g.emit("Equal", [g.emit("Unsqueeze", [xs[0], g.ints((-1,))]), classes])
    g.emit("Cast", [hits], out, to=g.elem_type(node.attrs["dtype"]))


# -- cumulative ops ---------------------------------------------------------------------------
@lowering(TARGET, "cumsum")
def _cumsum(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    axis = g.constant(np.asarray(node.attrs["axis"], np.int64))
    g.emit("CumSum", [xs[0], axis], out, reverse=int(node.attrs["reverse"]))


@lowering(TARGET, "argsort")
def _argsort(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    # TopK of the whole axis: its ties come out lowest index first, in both directions, as ours
    axis = node.attrs["axis"]
    k = g.constant(np.asarray([node.inputs[0].shape[axis]], np.int64))
    g.emit_multi("TopK", [xs[0], k], [g.fresh("sorted"), out], axis=axis,
                 largest=int(node.attrs["descending"]), sorted=1)


@lowering(TARGET, "cumprod")
def _cumprod(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """ONNX has no CumProd, and exp(CumSum(log x)) fails at zeros and negative numbers: each
    output is the product of its line with the elements it does not include set to one, an
    (n, n) mask per line (n the axis length)."""
    x, axis = node.inputs[0], node.attrs["axis"]
    n, trailing = x.shape[axis], (1,) * (len(x.shape) - axis - 1)
    i, k = np.arange(n).reshape(n, 1), np.arange(n).reshape(1, n)
    included = (k >= i) if node.attrs["reverse"] else (k <= i)
    # axis `axis` of the masked lines is the output position i, axis + 1 the factor k
    lines = g.emit("Unsqueeze", [xs[0], g.ints((axis,))])
    masked = g.emit("Where", [g.constant(included.reshape((n, n) + trailing)), lines,
                              g.constant(np.ones((), x.dtype))])
    if g.opset >= 18:  # ReduceProd took its axes as an attribute before opset 18
        g.emit("ReduceProd", [masked, g.ints((axis + 1,))], out, keepdims=0)
    else:
        g.emit("ReduceProd", [masked], out, axes=[axis + 1], keepdims=0)


# -- convolution and pooling ----------------------------------------------------------------------
def _window_attrs(attrs: dict[str, Any], kernel: tuple[int, ...]) -> dict[str, Any]:
    ph, pw = attrs["padding"]
    return {"kernel_shape": list(kernel), "strides": list(attrs["stride"]),
            "pads": [ph, pw, ph, pw]}  # begins then ends; graphc pads symmetrically


@lowering(TARGET, "conv2d")
def _conv2d(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("Conv", xs, out, **_window_attrs(node.attrs, node.inputs[1].shape[2:]),
           dilations=list(node.attrs["dilation"]), group=node.attrs["groups"])


@lowering(TARGET, "conv2d_input_grad")
def _conv2d_input_grad(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    """A convolution's input gradient is ONNX's ConvTranspose (ConvTranspose2d's forward); the
    output_padding gives the input's exact size where the stride left rows unread."""
    a = node.attrs
    kernel, size = node.inputs[1].shape[2:], node.output.shape[2:]
    natural = [(n - 1) * s - 2 * p + d * (k - 1) + 1 for n, s, p, d, k
               in zip(node.inputs[0].shape[2:], a["stride"], a["padding"], a["dilation"], kernel)]
    g.emit("ConvTranspose", xs, out, **_window_attrs(a, kernel), dilations=list(a["dilation"]),
           group=a["groups"], output_padding=[n - m for n, m in zip(size, natural)])


@lowering(TARGET, "max_pool2d")
def _max_pool2d(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("MaxPool", xs, out, **_window_attrs(node.attrs, node.attrs["kernel"]))


@lowering(TARGET, "avg_pool2d")
def _avg_pool2d(g: OnnxGraphBuilder, node: Node, xs: list[str], out: str) -> None:
    g.emit("AveragePool", xs, out, **_window_attrs(node.attrs, node.attrs["kernel"]),
           count_include_pad=int(node.attrs["count_include_pad"]))


# -- whole graphs ---------------------------------------------------------------------------------
def _converter(node: Node) -> Converter:
    convert = find_lowering(TARGET, node.op)
    if convert is None and node.op.startswith("random"):
        raise GraphcError(f"export_onnx: the graph draws random numbers ({node.op!r}, used at "
                          f"{node.loc or 'an unknown source line'}): only inference graphs export; "
                          "call .eval() on every module the forward calls (dropout in training "
                          "mode draws), those outside the model too")
    if convert is None:
        operands = ", ".join(str(v.type) for v in node.inputs) or "no operands"
        raise GraphcError(
            f"export_onnx: op {node.op!r} ({operands}) has no ONNX converter; used at "
            f"{node.loc or 'an unknown source line'}. "
            f"Ops that export: {', '.join(lowered_primitives(TARGET))}")
    return convert


def _check_opset(onnx: Any, opset: int) -> None:
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, (bool, np.bool_)) or not isinstance(opset, (int, np.integer)) or \
            not MIN_OPSET <= opset <= newest:
        raise GraphcError(f"export_onnx: opset {opset!r} is not supported; choose one from "
                          f"{MIN_OPSET} to {newest} (the newest onnx {onnx.__version__} knows)")


def _initializer_array(graph: Graph, name: str, type: TensorType,
                       arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    if name not in arrays:
        raise GraphcError(f"export_onnx: no value given for input {name!r} of graph {graph.name!r}")
    array = np.asarray(arrays[name])
    if TensorType.of(array) != type:
        raise GraphcError(f"export_onnx: the value of {name!r} is {TensorType.of(array)}, but the "
                          f"graph was compiled for {type}; recompile after changing the model")
    return array


def _convert_nodes(g: OnnxGraphBuilder, graph: Graph, names: dict[Value, str],
                   output_names: list[str]) -> list[Any]:
    """Emit the nodes of `graph` through `g`, reading its inputs under `names` and writing its
    outputs under `output_names` (one per graph output); returns the declared types of the
    intermediate values."""
    # A node's value takes its first graph output's name; a constant's does not, since it
    # becomes an initializer of the whole model, and a body's outputs must be made in the body.
    output_name: dict[Value, str] = {}
    for name, (_, value) in zip(output_names, graph.outputs):
        if value.producer is None or value.producer.op != "constant":
            output_name.setdefault(value, name)
    value_info = []
    for node in graph.nodes:
        outs = [output_name.get(v) or g.fresh(node.op) for v in node.outputs]
        g.source = node
        xs = [names[v] for v in node.inputs]
        if node.op == SCAN_OP:
            _scan(g, node, xs, outs)
        else:
            _converter(node)(g, node, xs, outs[0])
        for value, out in zip(node.outputs, outs):
            names[value] = out
            if value not in output_name:
                value_info.append(g.value_info(out, value.type))
    g.source = None
    for name, (_, value) in zip(output_names, graph.outputs):
        if names[value] != name:  # an input, a constant, or a value under a second name
            g.emit("Identity", [names[value]], name)
    return value_info


def _scan(g: OnnxGraphBuilder, node: Node, xs: list[str], outs: list[str]) -> None:
    """graphc's scan as ONNX's Scan: the carry is Scan's state, the stacked inputs and outputs
    its scan inputs and outputs, the loop invariants outer values the body reads by name."""
    body, length, reverse = node.subgraph, node.attrs["length"], node.attrs["reverse"]
    consts, carry, stacked = split_inputs(node, xs)
    _, carry_inputs, slice_inputs = split_inputs(node, body.inputs)
    inner = g.body_builder()
    names = {inp.value: outer for inp, outer in zip(body.inputs, consts)}
    body_inputs = []
    for inp in carry_inputs + slice_inputs:
        names[inp.value] = inner.fresh(inp.name)
        body_inputs.append(inner.value_info(names[inp.value], inp.value.type))
    if not stacked:  # Scan takes its trip count from its scan inputs: give it one to count
        stacked = [g.constant(np.zeros(length, np.bool_))]
        unused = inner.fresh("step")
        body_inputs.append(inner.value_info(unused, TensorType((), "bool")))
    output_names = [inner.fresh(name) for name in body.output_names]
    value_info = _convert_nodes(inner, body, names, output_names)
    body_outputs = [inner.value_info(name, value.type)
                    for name, value in zip(output_names, body.output_values)]
    body_proto = g.onnx.helper.make_graph(inner.nodes, g.fresh("scan_body"), body_inputs,
                                          body_outputs, value_info=value_info)
    num_ys = len(node.outputs) - len(carry)
    # Reversed, the steps read the scan inputs from the end and write the outputs from the end
    # (ONNX's direction 1), so ys[t] is the output of the step that read xs[t], as in graphc.
    # An empty list has no attribute type onnx can infer: a scan without per-step inputs or
    # outputs (an LSTM read only through h_n) leaves the attribute out (all forward).
    directions = {name: [int(reverse)] * count for name, count in
                  (("scan_input_directions", len(stacked)), ("scan_output_directions", num_ys)) if count}
    g.emit_multi("Scan", carry + stacked, outs, body=body_proto, num_scan_inputs=len(stacked),
                 **directions)


def _used_values(graph: Graph) -> set[Value]:
    return {v for node in graph.nodes for v in node.inputs} | set(graph.output_values)


def graph_to_onnx(graph: Graph, arrays: Mapping[str, np.ndarray],
                  opset: int = DEFAULT_OPSET) -> Any:
    """The checked `onnx.ModelProto` computing `graph` (an unfused graph of primitives).

    Data inputs become graph inputs; parameter and state inputs become initializers holding
    `arrays[name]` (those no node reads, such as batch norm's `num_batches_tracked` in eval
    mode, are left out).
    """
    onnx = _import_onnx()
    _check_opset(onnx, opset)
    input_names = {inp.name: inp.value for inp in graph.inputs}
    for name, value in graph.outputs:
        if input_names.get(name, value) is not value:
            raise GraphcError(f"export_onnx: output {name!r} has the name of a different input")
    g = OnnxGraphBuilder(onnx, opset, reserved=set(input_names) | set(graph.output_names))

    names = {inp.value: inp.name for inp in graph.inputs}
    value_info = _convert_nodes(g, graph, names, graph.output_names)

    inputs, used = [], _used_values(graph)
    for inp in graph.inputs:
        if inp.role == "data":
            inputs.append(g.value_info(inp.name, inp.value.type))
        elif inp.role in ("param", "state"):
            if inp.value in used:
                g.constant(_initializer_array(graph, inp.name, inp.value.type, arrays), inp.name)
        else:
            raise GraphcError(f"export_onnx: input {inp.name!r} has role {inp.role!r}; only "
                              "inference graphs (no random numbers) export to ONNX")
    outputs = [g.value_info(name, value.type) for name, value in graph.outputs]
    return _checked_model(onnx, opset, onnx.helper.make_graph(
        g.nodes, graph.name, inputs, outputs, initializer=g.initializers, value_info=value_info))


def _checked_model(onnx: Any, opset: int, graph_proto: Any) -> Any:
    from graphc import __version__

    opset_id = onnx.helper.make_opsetid("", opset)
    model = onnx.helper.make_model(
        graph_proto, opset_imports=[opset_id], producer_name="graphc",
        producer_version=__version__,
        ir_version=onnx.helper.find_min_ir_version_for([opset_id]))  # the oldest that runtimes load
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphcError(f"export_onnx: the ONNX model graphc built does not validate (a bug in "
                          f"its converters, please report it): {exc}") from None
    return model


def _inference_graph(model_or_compiled: Module | CompiledModel,
                     example_inputs: Any) -> tuple[Graph, dict[str, np.ndarray]]:
    """The optimized inference graph and the arrays of its parameters and buffers."""
    if isinstance(model_or_compiled, CompiledModel):
        compiled = model_or_compiled
        if example_inputs is not None:  # the graph of that signature, compiled if new
            batch = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
            arrays = [to_array(x, f"input {i}") for i, x in enumerate(batch)]
        else:  # the latest signature's, for the model as it is now (traced again if it changed)
            arrays = [np.zeros(inp.value.type.shape, inp.value.type.np_dtype)
                      for inp in compiled.graph.inputs if inp.role == "data"]
        compiled.follow_module_tree()
        graph = compiled._get(arrays).optimized
    elif isinstance(model_or_compiled, Module):
        if example_inputs is None:
            raise GraphcError("export_onnx: example_inputs are needed to compile a Module "
                              "(or pass a CompiledModel)")
        # Export never runs the graph: the reference backend compiles it without building kernels.
        compiled = compile(model_or_compiled, example_inputs, backend="reference")
        graph = compiled.graph
    else:
        raise GraphcError(f"export_onnx: expected a graphc.nn.Module or a CompiledModel, got "
                          f"{type(model_or_compiled).__name__}")
    # and the arrays of modules outside the model that its forward calls (graph inputs too)
    others = {key.removeprefix("implicit/"): array for key, array in compiled.implicit_state().items()}
    return graph, {**compiled.params, **compiled.buffers, **others}


@user_facing
def export_onnx(model_or_compiled: Module | CompiledModel, path: str | os.PathLike,
                example_inputs: Any = None, opset: int = DEFAULT_OPSET) -> None:
    """Write the model's inference graph (eval mode: no dropout, batch-norm running statistics)
    to `path` as an ONNX model of the given opset.

    A Module is compiled for `example_inputs` first; a CompiledModel exports the graph of its
    latest input signature, or of `example_inputs`' signature when given. The file is written
    atomically, and only once it has passed `onnx.checker.check_model(full_check=True)`.
    """
    graph, arrays = _inference_graph(model_or_compiled, example_inputs)
    model = graph_to_onnx(graph, arrays, opset)
    atomic_write(os.fspath(path), lambda f: f.write(model.SerializeToString()))
