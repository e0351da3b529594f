"""A hypothesis strategy for small random IR graphs, built with the Builder (below the public API):
elementwise chains with broadcasting, reductions, reshapes and views, transposes, strided
slices, pads, concatenations, selects, gathers and scatters with in-range indices, matmuls,
fan-out, in float32 or float64. Values stay bounded (no exp/log), so every backend computes
finite numbers that compare with the dtype's tolerances. Random programs over the public API,
convolution and pooling included, are in random_programs.py."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from graphc.ir import Builder, Graph, TensorType, Value

UNARY = ("tanh", "sigmoid", "neg", "relu", "abs")
BINARY = ("add", "sub", "mul", "maximum", "minimum")


def broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def _view_or_copy(draw, b: Builder, x: Value) -> Value | None:
    """One shape op: expand_dims, squeeze, broadcast_to, a strided slice, pad or concatenate."""
    s = x.shape
    kind = draw(st.sampled_from(["expand_dims", "squeeze", "broadcast_to", "slice", "pad",
                                 "concatenate"]))
    if kind == "expand_dims":
        return b.expand_dims(x, axes=(draw(st.integers(0, len(s))),))
    if kind == "squeeze" and 1 in s:
        return b.squeeze(x, axes=(s.index(1),))
    if kind == "broadcast_to":
        return b.broadcast_to(x, shape=(draw(st.integers(1, 3)),) + s)
    if not s:
        return None
    if kind == "slice":
        starts = tuple(draw(st.integers(0, n - 1)) for n in s)
        stops = tuple(draw(st.integers(a + 1, n)) for a, n in zip(starts, s))
        steps = tuple(draw(st.integers(1, 3)) for _ in s)
        return b.slice(x, starts=starts, stops=stops, steps=steps)
    if kind == "pad":
        pads = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in s)
        return b.pad(x, pads=pads, value=draw(st.sampled_from([0.0, -1.0])))
    axis = draw(st.integers(0, len(s) - 1))
    return b.concatenate(x, b.neg(x), axis=axis)


def _indexed(draw, b: Builder, x: Value) -> Value | None:
    """gather, scatter_add or take_along_axis with constant in-range indices."""
    if not x.shape:
        return None
    axis = draw(st.integers(0, len(x.shape) - 1))
    n = x.shape[axis]
    kind = draw(st.sampled_from(["gather", "scatter_add", "take_along_axis"]))
    rng = np.random.default_rng(draw(st.integers(0, 100)))
    if kind == "gather":
        indices = rng.integers(-n, n, size=(draw(st.integers(1, 4)),))
        return b.gather(x, b.const(indices, "int64"), axis=axis)
    if kind == "scatter_add":  # sums x's slices along `axis` into `size` slots, some twice
        size = draw(st.integers(1, 4))
        indices = rng.integers(0, size, size=(n,))
        return b.scatter_add(x, b.const(indices, "int64"), axis=axis, size=size)
    shape = x.shape[:axis] + (draw(st.integers(1, 3)),) + x.shape[axis + 1:]
    return b.take_along_axis(x, b.const(rng.integers(0, n, size=shape), "int64"), axis=axis)


@st.composite
def random_graphs(draw, max_ops: int = 8, dtypes: tuple[str, ...] = ("float32", "float64")) -> Graph:
    rows, cols = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 4, 5]))
    dtype = draw(st.sampled_from(dtypes))
    b = Builder("random")
    shapes = draw(st.lists(st.sampled_from([(rows, cols), (cols,), (rows, 1), ()]),
                           min_size=1, max_size=3))
    values = [b.add_input(TensorType((rows, cols), dtype), "x")]
    values += [b.add_input(TensorType(s, dtype), f"x{i}") for i, s in enumerate(shapes)]
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce", "reshape",
                                     "transpose", "matmul", "shape", "indexed", "where"]))
        x = draw(st.sampled_from(values))
        result = None
        if kind == "unary":
            result = b.bind(draw(st.sampled_from(UNARY)), x)
        elif kind == "binary":
            partners = [v for v in values if broadcasts(v.shape, x.shape)]
            y = draw(st.sampled_from(partners))
            result = b.bind(draw(st.sampled_from(BINARY)), x, y)
        elif kind == "reduce" and x.shape:
            axis = draw(st.integers(0, len(x.shape) - 1))
            op = draw(st.sampled_from(["sum", "max"]))
            result = b.bind(op, x, axes=(axis,), keepdims=draw(st.booleans()))
        elif kind == "reshape":
            result = b.reshape(x, shape=(x.type.size,))
        elif kind == "transpose" and len(x.shape) == 2:
            result = b.transpose(x, perm=(1, 0))
        elif kind == "matmul" and len(x.shape) == 2:
            result = b.matmul(x, b.transpose(x, perm=(1, 0)))
        elif kind == "shape":
            result = _view_or_copy(draw, b, x)
        elif kind == "indexed":
            result = _indexed(draw, b, x)
        elif kind == "where":
            partners = [v for v in values if broadcasts(v.shape, x.shape)]
            y = draw(st.sampled_from(partners))
            result = b.where(b.gt(x, y), x, y)
        if result is not None:
            values.append(result)
    b.add_output("out", values[-1])
    computed = values[len(shapes) + 1:-1]
    for i, v in enumerate(draw(st.lists(st.sampled_from(computed), max_size=2)) if computed else []):
        b.add_output(f"extra{i}", v)
    return b.graph.verify()


def random_arguments(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape).astype(v.dtype) for v in graph.input_values]
