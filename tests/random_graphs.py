"""A hypothesis strategy for small random graphs: elementwise chains with broadcasting,
reductions, reshapes, transposes, matmuls, fan-out. Values stay bounded (no exp/log), so every
backend computes finite numbers that compare with float32 tolerances."""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from graphc.ir import Builder, Graph, TensorType

UNARY = ("tanh", "sigmoid", "neg", "relu", "abs")
BINARY = ("add", "sub", "mul", "maximum", "minimum")


def broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


@st.composite
def random_graphs(draw, max_ops: int = 8) -> Graph:
    rows, cols = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 4, 5]))
    b = Builder("random")
    shapes = draw(st.lists(st.sampled_from([(rows, cols), (cols,), (rows, 1), ()]),
                           min_size=1, max_size=3))
    values = [b.add_input(TensorType((rows, cols), "float32"), "x")]
    values += [b.add_input(TensorType(s, "float32"), f"x{i}") for i, s in enumerate(shapes)]
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(["unary", "binary", "binary", "reduce", "reshape",
                                     "transpose", "matmul"]))
        x = draw(st.sampled_from(values))
        if kind == "unary":
            values.append(b.bind(draw(st.sampled_from(UNARY)), x))
        elif kind == "binary":
            partners = [v for v in values if broadcasts(v.shape, x.shape)]
            y = draw(st.sampled_from(partners))
            values.append(b.bind(draw(st.sampled_from(BINARY)), x, y))
        elif kind == "reduce" and x.shape:
            axis = draw(st.integers(0, len(x.shape) - 1))
            op = draw(st.sampled_from(["sum", "max"]))
            values.append(b.bind(op, x, axes=(axis,), keepdims=draw(st.booleans())))
        elif kind == "reshape":
            values.append(b.reshape(x, shape=(x.type.size,)))
        elif kind == "transpose" and len(x.shape) == 2:
            values.append(b.transpose(x, perm=(1, 0)))
        elif kind == "matmul" and len(x.shape) == 2:
            values.append(b.matmul(x, b.transpose(x, perm=(1, 0))))
    b.add_output("out", values[-1])
    computed = values[len(shapes) + 1:-1]
    for i, v in enumerate(draw(st.lists(st.sampled_from(computed), max_size=2)) if computed else []):
        b.add_output(f"extra{i}", v)
    return b.graph.verify()


def random_arguments(graph: Graph, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(v.shape).astype(v.dtype) for v in graph.input_values]
