"""The numba-cpu backend against the reference interpreter: every primitive, fused patterns,
random graphs, a small CNN and its gradient, and the executor's contract (inputs, outputs,
donation, threads, profiling).

Tolerances: float32 rtol 1e-5 / atol 1e-6 (fastmath contracts a*b+c into one FMA, and float32
sums accumulate in float64), BLAS-backed ops rtol 1e-4 / atol 1e-5 (another summation order),
float64 rtol 1e-11; integers, bools and random bits exactly.
"""
import os

import numba
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings

from graphc.backends.kernels.arrays import INPUT, OUTPUT, KernelArray
from graphc.backends.numba_cpu import unlowered_primitives
from graphc.lowering import compile_graph
from graphc.backends.kernels.source import Writer
from graphc.backends.numba_cpu.codegen import generate
from graphc.backends.numba_cpu.codegen_common import module
from graphc.backends.numba_cpu.codegen_elementwise import collapsed_axes
from graphc.backends.numba_cpu.gemm import gemm
from graphc.backends.reference import evaluate
from graphc.ir import PRIMITIVES, Builder, InputError, TensorType
from graphc.ir.ops.comm import COMM_OPS
from graphc.passes.autodiff import autodiff
from graphc.passes.fusion import fuse
from opcheck import build_graph
from random_graphs import random_arguments, random_graphs

rng = np.random.default_rng(0)
TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-11, atol=1e-12)}
# Sums of hundreds of float32 products of magnitude ~1: an element that cancels to near zero
# keeps the rounding of its large terms, which depends on the summation order (a 300-term dot
# product of ~0.05 was 1.9e-5 off the reference's, in one order of the suite's tests).
BLAS_TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def normal(*shape, dtype="float32"):
    return rng.standard_normal(shape).astype(dtype)


def positive(*shape, dtype="float32"):
    return (np.abs(rng.standard_normal(shape)) + 0.5).astype(dtype)


def integers(low, high, *shape, dtype="int64"):
    return rng.integers(low, high, size=shape).astype(dtype)


def check(graph, arrays, tolerance=None):
    """Compile `graph`, run it, compare every output with the reference; return the executable."""
    executable = compile_graph(graph, "numba-cpu")
    got = executable(*arrays)
    want = evaluate(graph, [np.asarray(a) for a in arrays])
    assert len(got) == len(want)
    for name, g, w in zip(graph.output_names, got, want):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, equal_nan=True, err_msg=name,
                                       **(tolerance or TOLERANCE[w.dtype.name]))
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)
    return executable


def fused_together(b, values):
    """Also output a sum of all `values` (same shape), which fuses them into one kernel."""
    total = None
    for v in values:
        v = v if v.dtype == "float32" else b.cast(v, dtype="float32")
        total = v if total is None else b.add(total, v)
    return list(values) + [total]


# -- every primitive -------------------------------------------------------------------------
UNARY = ["neg", "exp", "tanh", "sigmoid", "relu", "abs", "sign", "square", "stop_gradient", "sin",
         "cos", "erf", "expm1", "floor", "ceil", "trunc", "round"]
UNARY_POSITIVE = ["log", "log1p", "sqrt", "rsqrt", "reciprocal"]
BINARY = ["add", "sub", "mul", "div", "maximum", "minimum", "floor_divide", "remainder", "fmod",
          "detached_write"]
COMPARE = ["eq", "ne", "lt", "le", "gt", "ge"]


def unary_case(dtype):
    arrays = [normal(3, 5, dtype=dtype), positive(3, 5, dtype=dtype)]
    return build_graph(f"unary_{dtype}", arrays, lambda b, x, p: fused_together(
        b, [b.bind(op, x) for op in UNARY] + [b.bind(op, p) for op in UNARY_POSITIVE])), arrays


def binary_case(shapes):
    arrays = [normal(*shapes[0]), normal(*shapes[1])]

    def fn(b, x, y):
        values = [b.bind(op, x, y) for op in BINARY + COMPARE]
        values.append(b.pow(b.add(b.abs(x), b.scalar_like(0.5, x)), y))
        values.append(b.where(b.gt(x, y), x, y))
        return fused_together(b, values)
    return build_graph("binary", arrays, fn), arrays


CASES = {
    "unary_f32": lambda: unary_case("float32"),
    "unary_f64": lambda: unary_case("float64"),
    "binary_same": lambda: binary_case(((3, 4), (3, 4))),
    "binary_broadcast": lambda: binary_case(((2, 1, 4), (3, 1))),
    "binary_scalar": lambda: binary_case(((), (2, 3))),
    "cumulative": lambda: (lambda arrays: (build_graph("cumulative", arrays, lambda b, x, z, i: [
        b.cumsum(x, axis=1), b.cumsum(x, axis=0, reverse=True), b.cumprod(z, axis=2),
        b.cumprod(z, axis=1, reverse=True), b.cumsum(i, axis=-1), b.cumsum(b.exp(x), axis=2)]), arrays))(
        [normal(2, 3, 4), np.where(rng.random((2, 3, 4)) < 0.2, 0, normal(2, 3, 4, dtype="float64")),
         integers(-9, 9, 3, 4, dtype="int32")]),
    # ties (few distinct values) keep their order both ways; NaN sorts as the largest
    "argsort": lambda: (lambda arrays: (build_graph("argsort", arrays, lambda b, x, z, i: [
        b.argsort(x, axis=1), b.argsort(x, axis=0, descending=True), b.argsort(z, axis=2),
        b.argsort(z, axis=2, descending=True), b.argsort(i, axis=-1, descending=True),
        b.argsort(b.neg(x), axis=2)]), arrays))(
        [np.round(normal(3, 5, 4)), np.where(rng.random((2, 3, 6)) < 0.2, np.nan, np.round(normal(2, 3, 6, dtype="float64"))),
         integers(-3, 3, 4, 9, dtype="int32")]),
    "moments": lambda: (lambda arrays: (build_graph("moments", arrays, lambda b, x, r: [
        b.moments(x, axes=(0, 2, 3)), b.moments(r, axes=(1,)), b.moments(r, axes=(0,))]), arrays))(
        [normal(3, 4, 2, 5), normal(6, 7, dtype="float64")]),
    "normalize": lambda: (lambda arrays: (build_graph("normalize", arrays, lambda b, x, g, r: [
        b.normalize(x, axes=(0, 2, 3), epsilon=1e-5), b.normalize_grad(g, x, axes=(0, 2, 3), epsilon=1e-5),
        b.normalize(r, axes=(1,), epsilon=1e-3), b.normalize_grad(r, r, axes=(0,), epsilon=1e-3)]), arrays))(
        [normal(3, 4, 2, 5), normal(3, 4, 2, 5), normal(6, 7, dtype="float64")]),
    "softmax": lambda: (lambda arrays: (build_graph("softmax", arrays, lambda b, x, g, r: [
        b.softmax(x, axis=2), b.softmax_grad(g, b.softmax(x, axis=1), axis=1),
        b.softmax(r, axis=0, zero_masked_rows=True), b.softmax_grad(r, r, axis=1)]), arrays))(
        [normal(3, 4, 5), normal(3, 4, 5), normal(6, 7, dtype="float64")]),
    "logical": lambda: (lambda arrays: (build_graph("logical", arrays, lambda b, p, q: [
        b.logical_and(p, q), b.logical_or(p, q), b.logical_not(p),
        b.where(p, b.cast(q, dtype="int32"), b.cast(p, dtype="int32"))]), arrays))(
        [integers(0, 2, 3, 4).astype(bool), integers(0, 2, 4).astype(bool)]),
    "integer_arithmetic": lambda: (lambda arrays: (build_graph("ints", arrays, lambda b, i, j: [
        b.add(i, j), b.sub(i, j), b.mul(i, j), b.maximum(i, j), b.minimum(i, j), b.neg(i),
        b.abs(i), b.sign(i), b.square(j), b.cast(i, dtype="float32")]), arrays))(
        [integers(-9, 9, 3, 4, dtype="int32"), integers(-9, 9, 4, dtype="int32")]),
    "cast": lambda: (lambda arrays: (build_graph("cast", arrays, lambda b, x: [
        b.cast(x, dtype=d) for d in ("float64", "int32", "int64", "bool")]
        + [b.cast(b.cast(x, dtype="bool"), dtype="float32")]), arrays))(
        [normal(4, 5) * 3]),
    "nan_and_inf": lambda: (lambda arrays: (build_graph("nan", arrays, lambda b, x, y: [
        b.maximum(x, y), b.minimum(y, x), b.relu(x), b.max(x, axes=(1,)), b.argmax(x, axis=1),
        b.argmax(y, axis=0), b.log(b.abs(x))]), arrays))(
        [np.array([[1, np.nan, 3], [np.inf, -1, np.nan], [0, -np.inf, 2]], np.float32),
         np.array([[np.nan, 2, 1], [1, 5, 1], [np.nan, np.nan, 7]], np.float32)]),
    "constants": lambda: (lambda arrays: (build_graph("constants", arrays, lambda b, x: [
        b.mul(x, b.const(np.arange(6, dtype=np.float32).reshape(2, 3), "float32")),
        b.add(x, b.const(np.float32(np.inf), "float32")),
        b.const(np.array([1, 2], np.int64), "int64")]), arrays))([normal(2, 3)]),
    "reductions": lambda: (lambda arrays: (build_graph("reductions", arrays, lambda b, x, i: [
        b.sum(x, axes=(0, 2)), b.sum(x, axes=(1,), keepdims=True), b.max(x, axes=(2,)),
        b.max(x, axes=(0, 1, 2), keepdims=True), b.argmax(x, axis=0), b.argmax(x, axis=2, keepdims=True),
        b.sum(i, axes=(0,)), b.max(i, axes=(1,)), b.sum(x, axes=())]), arrays))(
        [normal(3, 4, 5), integers(-2**30, 2**30, 6, 3, dtype="int32")]),
    "reductions_float64": lambda: (lambda arrays: (build_graph("reductions64", arrays, lambda b, x: [
        b.sum(b.square(x), axes=(1,)), b.max(x, axes=(0,))]), arrays))([normal(4, 6, dtype="float64")]),
    "reductions_parallel": lambda: (lambda arrays: (build_graph("big_reductions", arrays, lambda b, x: [
        b.sum(x, axes=(0, 1)), b.max(b.tanh(x), axes=(0, 1), keepdims=True),
        b.sum(b.mul(x, x), axes=(1,)), b.argmax(x, axis=1)]), arrays))([normal(300, 300)]),
    "views": lambda: (lambda arrays: (build_graph("views", arrays, lambda b, x: [
        b.reshape(x, shape=(6, 4)), b.exp(b.reshape(b.neg(x), shape=(4, 6))),
        b.squeeze(b.expand_dims(b.tanh(x), axes=(0, 3)), axes=(0,))]), arrays))([normal(2, 3, 4)]),
    "shape_ops": lambda: (lambda arrays: (build_graph("shape_ops", arrays, lambda b, x, y, z: [
        b.transpose(x, perm=(2, 0, 1)), b.broadcast_to(y, shape=(3, 2, 4)),
        b.slice(x, starts=(0, 1, 0), stops=(2, 3, 4), steps=(1, 1, 3)),
        b.slice_grad(y, shape=(5, 9), starts=(1, 2), stops=(4, 9), steps=(2, 2)),
        b.concatenate(y, z, b.neg(y), axis=1), b.pad(z, pads=((1, 2), (0, 3)), value=-1.5),
        b.flip(x, axes=(0, 2)), b.flip(b.tanh(y), axes=(1,))]), arrays))(
        [normal(2, 3, 4), normal(2, 4), normal(2, 1)]),
    "indexing": lambda: (lambda arrays: (build_graph("indexing", arrays, lambda b, x, i, j, g: [
        b.take_along_axis(x, i, axis=1), b.take_along_axis(x, b.slice(i, starts=(0, 0), stops=(1, 3), steps=(1, 1)), axis=1),
        b.scatter_add_along_axis(g, i, axis=1, shape=(5, 4)),
        b.gather(x, j, axis=1), b.gather(x, j, axis=0),
        b.scatter_add(b.gather(x, j, axis=1), j, axis=1, size=4),
        b.scatter_add(b.gather(x, j, axis=0), j, axis=0, size=5),
        b.one_hot(j, num_classes=5), b.one_hot(i, num_classes=3, dtype="int32")]), arrays))(
        [normal(5, 4), integers(-4, 4, 5, 3), integers(-4, 4, 2, 3), normal(5, 3)]),
    "random": lambda: (lambda arrays: (build_graph("random", arrays, lambda b, k: [
        b.random_uniform(k, shape=(3, 7)), b.random_uniform(k, shape=(2, 2), dtype="float64", stream=5),
        b.random_bernoulli(k, p=0.3, shape=(50,), stream=2),
        b.mul(b.random_uniform(k, shape=(4,)), b.scalar_like(2.0, b.random_uniform(k, shape=(4,))))]),
        arrays))([np.array([-3, 2**40], np.int64)]),
}
BLAS_CASES = {
    "matmul": lambda: (lambda arrays: (build_graph("matmul", arrays, lambda b, x, y, z: [
        b.matmul(x, y), b.matmul(z, y), b.relu(b.add(b.matmul(x, y), b.const(np.ones(3), "float32")))]),
        arrays))([normal(5, 7), normal(7, 3), normal(2, 4, 5, 7)]),
    # large enough for blocks on the threads: of columns (more columns than rows) or of rows,
    # with each operand stored as it is or transposed
    "matmul_blocks": lambda: (lambda arrays: (build_graph("matmul_blocks", arrays, lambda b, x, y, xt, yt: [
        b.matmul(x, y), b.matmul(b.transpose(xt, perm=(1, 0)), y),
        b.matmul(x, b.transpose(yt, perm=(1, 0))),
        b.matmul(b.transpose(xt, perm=(1, 0)), b.transpose(yt, perm=(1, 0))),
        b.matmul(b.transpose(y, perm=(1, 0)), b.transpose(x, perm=(1, 0))),
        b.matmul(yt, xt)]),
        arrays))([normal(40, 300), normal(300, 500), normal(300, 40), normal(500, 300)]),
    "conv2d": lambda: (lambda arrays: (build_graph("conv2d", arrays, lambda b, x, w, v, u: [
        b.conv2d(x, w, stride=2, padding=1), b.conv2d(v, u, padding=2, dilation=2, groups=2)]),
        arrays))([normal(2, 3, 8, 8), normal(4, 3, 3, 3), normal(2, 4, 9, 9), normal(6, 2, 3, 3)]),
    "conv2d_grads": lambda: (lambda arrays: (build_graph("conv2d_grads", arrays, lambda b, x, w, g: [
        b.conv2d_input_grad(g, w, input_shape=(2, 3, 8, 8), stride=2, padding=1),
        b.conv2d_weight_grad(x, g, weight_shape=(4, 3, 3, 3), stride=2, padding=1)]),
        arrays))([normal(2, 3, 8, 8), normal(4, 3, 3, 3), normal(2, 4, 4, 4)]),
    "conv2d_grads_grouped": lambda: (lambda arrays: (build_graph("conv2d_grads_g", arrays, lambda b, x, w, g: [
        b.conv2d_input_grad(g, w, input_shape=(2, 4, 9, 9), padding=2, dilation=2, groups=2),
        b.conv2d_weight_grad(x, g, weight_shape=(6, 2, 3, 3), padding=2, dilation=2, groups=2)]),
        arrays))([normal(2, 4, 9, 9), normal(6, 2, 3, 3), normal(2, 6, 9, 9)]),
    # large enough for the per-thread chunks of images; 3 images split unevenly over 2 threads
    "conv2d_batch_chunks": lambda: (lambda arrays: (build_graph("conv2d_chunks", arrays, lambda b, x, w, g: [
        b.conv2d(x, w, padding=1, groups=2),
        b.conv2d_input_grad(g, w, input_shape=(3, 4, 26, 26), padding=1, groups=2),
        b.conv2d_weight_grad(x, g, weight_shape=(6, 2, 3, 3), padding=1, groups=2)]),
        arrays))([normal(3, 4, 26, 26), normal(6, 2, 3, 3), normal(3, 6, 26, 26)]),
    # 3x3, stride 1, >= 16 channels: Winograd F(2x2, 3x3); odd planes (a half tile at the edge),
    # paddings 0-2 (the input gradient pads by 2 - padding), 3 images over the threads
    "conv2d_winograd": lambda: (lambda arrays: (build_graph("conv2d_winograd", arrays, lambda b, x, w, g, h: [
        b.conv2d(x, w), b.conv2d(x, w, padding=1), b.conv2d(x, w, padding=(2, 1)),
        b.conv2d_input_grad(g, w, input_shape=(3, 16, 9, 7), padding=1),
        b.conv2d_input_grad(h, w, input_shape=(3, 16, 9, 7)),
        b.conv2d_weight_grad(x, h, weight_shape=(17, 16, 3, 3)),
        b.conv2d_weight_grad(x, g, weight_shape=(17, 16, 3, 3), padding=1)]),
        arrays))([normal(3, 16, 9, 7), normal(17, 16, 3, 3), normal(3, 17, 9, 7), normal(3, 17, 7, 5)]),
    "conv2d_winograd_float64": lambda: (lambda arrays: (build_graph("conv2d_winograd64", arrays, lambda b, x, w, g: [
        b.conv2d(x, w, padding=(0, 2)), b.conv2d_input_grad(g, w, input_shape=(2, 16, 6, 5), padding=(0, 2)),
        b.conv2d_weight_grad(x, g, weight_shape=(16, 16, 3, 3), padding=(0, 2))]),
        arrays))([normal(2, 16, 6, 5, dtype="float64"), normal(16, 16, 3, 3, dtype="float64"),
                  normal(2, 16, 4, 7, dtype="float64")]),
    # one image, large enough for two threads: the second thread's partial sum stays zero
    # (inputs scaled for sums of order 1, which the absolute tolerance assumes: 784 terms)
    "conv2d_winograd_one_image": lambda: (lambda arrays: (build_graph("conv2d_winograd1", arrays, lambda b, x, g: [
        b.conv2d_weight_grad(x, g, weight_shape=(16, 32, 3, 3))]),
        arrays))([normal(1, 32, 30, 30) * 0.2, normal(1, 16, 28, 28) * 0.2]),
    "pooling": lambda: (lambda arrays: (build_graph("pooling", arrays, lambda b, x, g, h: [
        b.max_pool2d(x, kernel=3, stride=2, padding=1), b.max_pool2d_grad(x, g, kernel=3, stride=2, padding=1),
        b.avg_pool2d(x, kernel=3, stride=2, padding=1, count_include_pad=False),
        b.avg_pool2d(x, kernel=2, stride=2),
        b.avg_pool2d_grad(g, input_shape=(2, 3, 8, 8), kernel=3, stride=2, padding=1, count_include_pad=False),
        b.avg_pool2d_grad(h, input_shape=(2, 3, 8, 8), kernel=2, stride=2)]),
        arrays))([normal(2, 3, 8, 8), normal(2, 3, 4, 4), normal(2, 3, 4, 4)]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_primitives_match_the_reference(case):
    graph, arrays = CASES[case]()
    check(graph, arrays)


@pytest.mark.parametrize("case", sorted(BLAS_CASES))
def test_library_primitives_match_the_reference(case):
    graph, arrays = BLAS_CASES[case]()
    check(graph, arrays, BLAS_TOLERANCE)


def test_winograd_lowers_3x3_stride_1_convolutions_with_enough_channels():
    graph, _ = BLAS_CASES["conv2d_winograd"]()
    entries = {n.attrs["name"]: [c.entry for c in generate(n).calls] for n in fuse(graph).nodes}
    calls = sorted(c for calls in entries.values() for c in calls if c.startswith("conv"))
    # three forward convolutions, two input gradients and two weight gradients: one function
    assert calls == ["conv3x3_winograd"] * 7
    # few channels (the MNIST CNN's first layer), a stride or a 5x5 filter: im2col
    small = build_graph("small", [normal(2, 1, 8, 8), normal(32, 1, 3, 3), normal(16, 16, 5, 5), normal(2, 16, 8, 8)],
                  lambda b, x, w, u, v: [b.conv2d(x, w), b.conv2d(v, u), b.conv2d(v, b.slice(
                      u, starts=(0, 0, 0, 0), stops=(16, 16, 3, 3), steps=(1, 1, 1, 1)), stride=2)])
    calls = [c.entry for n in fuse(small).nodes for c in generate(n).calls]
    assert not any("winograd" in c for c in calls) and calls.count("conv2d_im2col") == 3


def test_im2col_convolution_and_its_weight_gradient_share_one_function():
    """A layer's forward and weight gradient are modes of one compiled function (its input
    gradient, col2im, is another), and both modes match the reference."""
    arrays = [normal(2, 3, 8, 8), normal(4, 3, 3, 3), normal(2, 4, 4, 4)]
    graph = build_graph("layer", arrays, lambda b, x, w, g: [
        b.conv2d(x, w, stride=2, padding=1),
        b.conv2d_weight_grad(x, g, weight_shape=(4, 3, 3, 3), stride=2, padding=1),
        b.conv2d_input_grad(g, w, input_shape=(2, 3, 8, 8), stride=2, padding=1)])
    executable = check(graph, arrays, BLAS_TOLERANCE)
    calls = [(call, function) for k in executable.kernels
             for call, function in zip(k.generated.calls, k.functions) if call.entry.startswith("conv2d")]
    assert sorted(call.entry for call, _ in calls) == ["conv2d_im2col"] * 2 + ["conv2d_input_grad"]
    im2col = [(call, function) for call, function in calls if call.entry == "conv2d_im2col"]
    assert sorted(call.args[-1] for call, _ in im2col) == [False, True]  # `grad`
    assert im2col[0][0].source == im2col[1][0].source and im2col[0][1] is im2col[1][1]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_reads_and_writes_sub_matrices_by_offset_and_leading_dimension(dtype):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((7, 5)).astype(dtype), rng.standard_normal((5, 6)).astype(dtype)
    c = np.full((9, 8), np.nan, dtype)
    gemm(False, False, 7, 6, 5, a, 0, 5, b, 0, 6, 0.0, c, 1 * 8 + 2, 8)  # into c[1:8, 2:8]
    np.testing.assert_allclose(c[1:8, 2:8], a @ b, rtol=1e-5)
    assert np.isnan(c[0]).all() and np.isnan(c[:, :2]).all()  # nothing outside is touched
    # both operands stored transposed; beta = 1 accumulates into what c held
    d = np.ones((7, 6), dtype)
    gemm(True, True, 7, 6, 5, np.ascontiguousarray(a.T), 0, 7, np.ascontiguousarray(b.T), 0, 5,
         1.0, d, 0, 6)
    np.testing.assert_allclose(d, a @ b + 1, rtol=1e-5)
    # rows 2..4 of x.T @ b: a block of x's stored columns, at offset 2
    x, e = rng.standard_normal((5, 7)).astype(dtype), np.zeros((3, 6), dtype)
    gemm(True, False, 3, 6, 5, x, 2, 7, b, 0, 6, 0.0, e, 0, 6)
    np.testing.assert_allclose(e, x.T[2:5] @ b, rtol=1e-5)
    # an empty sum (k = 0) is zero, even over NaN
    z = np.full((2, 2), np.nan, dtype)
    gemm(False, False, 2, 2, 0, a, 0, 5, b, 0, 6, 0.0, z, 0, 2)
    assert (z == 0).all()


def test_every_primitive_is_covered_and_lowered():
    # communication ops never reach a backend: the pipeline's StageExecutable cuts them off
    assert unlowered_primitives() == sorted(COMM_OPS)
    covered = {n.op for cases in (CASES, BLAS_CASES) for make in cases.values()
               for n in make()[0].nodes}
    assert set(PRIMITIVES) - covered == set(COMM_OPS)


def test_max_pool_gradient_routes_ties_and_nans_like_the_reference():
    x = np.array([[[[1, 1, 0, 2], [1, 1, 2, 2], [np.nan, 0, -np.inf, -np.inf],
                    [0, np.nan, -np.inf, -np.inf]]]], np.float32)
    # flipped and padded, the top-left window holds padding first, then only -inf
    arrays = [x, np.ascontiguousarray(x[..., ::-1, ::-1]), normal(1, 1, 2, 2), normal(1, 1, 3, 3)]
    check(build_graph("pool_ties", arrays, lambda b, v, f, g, h: [
        b.max_pool2d(v, kernel=2, stride=2), b.max_pool2d_grad(v, g, kernel=2, stride=2),
        b.max_pool2d(f, kernel=2, stride=2, padding=1),
        b.max_pool2d_grad(f, h, kernel=2, stride=2, padding=1)]), arrays)


def test_tiled_max_pool_gradient_matches_the_reference_on_edges_and_non_finite_values():
    """Windows that tile the plane take the branch-free path: planes not a multiple of the
    window (uncovered cells), 3x3 windows, all -inf windows, and inf/NaN cotangents (which
    take the general search, since inf * 0 would be NaN)."""
    x = normal(2, 3, 7, 5)
    x[0, 0, :2, :2] = -np.inf
    x[1, 2, 3, 4] = np.nan
    g = normal(2, 3, 3, 2)
    g[0, 1, 0, 0], g[1, 0, 2, 1], g[1, 1, 1, 1] = np.inf, -np.inf, np.nan
    y, h = normal(1, 2, 9, 10), normal(1, 2, 3, 3)
    arrays = [x, g, y, h]
    executable = check(build_graph("pool_tiled", arrays, lambda b, v, d, u, e: [
        b.max_pool2d_grad(v, d, kernel=2, stride=2), b.max_pool2d_grad(u, e, kernel=3, stride=3)]),
        arrays)
    assert "top = max(v0, v1, v2, v3)" in executable.kernels[0].source


def test_adjacent_reduced_axes_are_merged_when_every_array_allows():
    """sum over (0, 2, 3) of (N, C, H, W) runs over H*W as one axis: arrays are passed as
    views, and read broadcast (size 1 over both merged axes) or full; keepdims too. An operand
    spanning only one of two adjacent reduced axes keeps the loops as they are."""
    x, bias, scale, row = normal(4, 3, 5, 6), normal(1, 3, 1, 1), normal(3), normal(5, 1)
    arrays = [x, bias, scale, row]
    executable = check(build_graph("merged_axes", arrays, lambda b, v, c, s, r: [
        b.mul(b.sum(b.square(b.add(v, c)), axes=(0, 2, 3)), s),
        b.sum(b.mul(v, c), axes=(0, 2, 3), keepdims=True),
        b.max(b.add(v, r), axes=(2, 3))]), arrays)
    sources = [k.source for k in executable.kernels if k.pattern == "reduction"]
    merged = [src for src in sources if "for i2 in range(n2):" in src and "i3" not in src]
    assert len(merged) == 2 and len(sources) == 3

def test_leading_axis_reductions_accumulate_a_row_at_a_time():
    """A sum or max over leading axes (a bias gradient) runs the kept axes innermost over a
    row of accumulators: with body outputs, an epilogue, keepdims, NaNs and two kept axes."""
    x, m, bias = normal(7, 5), normal(3, 4, 6), normal(5)
    m[1, 2, 3] = np.nan
    arrays = [x, m, bias]
    executable = check(build_graph("leading_axes", arrays, lambda b, v, w, c: [
        b.sub(b.mul(b.sum(b.mul(v, v), axes=(0,)), c), c), b.exp(v),
        b.sum(v, axes=(0,), keepdims=True), b.max(w, axes=(0,)), b.max(w, axes=(0, 1)),
        b.sum(w, axes=(0,), keepdims=True)]), arrays)
    sources = [k.source for k in executable.kernels if k.pattern == "reduction"]
    assert len(sources) == 5 and all("accs = np.empty(" in src for src in sources)


def test_float_max_is_branch_free_and_propagates_nans_like_the_reference():
    """A float max folds with LLVM's `maximum` (no branch, so it vectorises): a row with a NaN
    (either sign) reduces to NaN, a row of -inf to -inf, in rows, columns, a full reduction
    split in parallel, float64 and an epilogue; an integer max keeps the compare."""
    x = normal(5, 7)
    x[1, 3], x[2, :] = np.nan, -np.inf
    x[3, 0] = -np.float32(np.nan)
    big = normal(301, 303, dtype="float64")
    big[7, 11] = np.nan
    ints = integers(-9, 9, 3, 5)
    arrays = [x, big, ints]
    executable = check(build_graph("nan_max", arrays, lambda b, v, w, n: [
        b.max(v, axes=(1,), keepdims=True), b.exp(b.max(v, axes=(1,))), b.max(v, axes=(0,)),
        b.max(v, axes=(0, 1)), b.max(w, axes=(0, 1)), b.max(w, axes=(1,)), b.max(n, axes=(1,))]),
        arrays)
    sources = [k.source for k in executable.kernels if k.pattern == "reduction"]
    assert sum("nan_maximum(" in src for src in sources) >= 5
    assert any("v > acc" in src and "nan_maximum(" not in src for src in sources)


def test_column_sum_over_a_concatenation_loops_once_per_part():
    """A sum over leading axes of inputs concatenated along the last axis (a qkv bias gradient)
    runs its innermost loop once per part, reading each part directly: with the concatenation
    also stored, an epilogue, a NaN, parts of odd widths, a concatenation along another axis
    (left as it is), and large enough to run in parallel blocks of rows."""
    q, k, v = normal(3, 5, 2), normal(3, 5, 3), normal(3, 5, 1)
    k[1, 2, 0] = np.nan
    scale = normal(6)
    a, b_ = normal(2, 7, 3), normal(2, 5, 3)
    big = [normal(97, 130, w) for w in (5, 7, 4)]
    arrays = [q, k, v, scale, a, b_, *big]
    executable = check(build_graph("concat_column", arrays, lambda b, x, y, z, s, u, w, p, r, t: [
        b.concatenate(x, y, z, axis=2), b.mul(b.sum(b.concatenate(x, y, z, axis=2), axes=(0, 1)), s),
        b.sum(b.concatenate(u, w, axis=1), axes=(0,)),
        b.sum(b.concatenate(p, r, t, axis=2), axes=(0, 1))]), arrays)
    sources = [k.source for k in executable.kernels if k.pattern == "reduction"]
    assert sum("# concatenate, part 2" in src for src in sources) == 2


# -- fused patterns and random graphs ----------------------------------------------------------
def test_matmul_bias_relu_is_one_kernel():
    arrays = [normal(16, 32), normal(32, 8), normal(8)]
    graph = build_graph("dense", arrays, lambda b, x, w, c: b.relu(b.add(b.matmul(x, w), c)))
    executable = check(graph, arrays, BLAS_TOLERANCE)
    assert [k.pattern for k in executable.kernels] == ["library"]


def test_large_elementwise_kernel_runs_in_parallel():
    arrays = [normal(300, 300), normal(300)]
    graph = build_graph("big", arrays, lambda b, x, y: b.tanh(b.add(b.mul(x, y), x)))
    executable = check(graph, arrays)
    assert executable.kernels[0].generated.parallel and "prange" in executable.kernels[0].source


def test_collapsed_axes_group_the_axes_every_operand_reads_alike():
    nchw, channel = (64, 32, 26, 26), (1, 32, 1, 1)
    assert collapsed_axes(nchw, [nchw, channel, nchw]) == [[0], [1], [2, 3]]
    assert collapsed_axes(nchw, [nchw, (32, 1, 1)]) == [[0], [1], [2, 3]]  # fewer dims
    assert collapsed_axes((1, 8, 1, 5), [(1, 8, 1, 5), (5,)]) == [[0, 1, 2], [3]]  # extent 1 joins
    assert collapsed_axes((4, 5, 6), [(4, 5, 6), (4, 5, 6)]) == [[0, 1, 2]]
    assert collapsed_axes((4, 5), [(4, 5), (4, 1)]) == [[0], [1]]


@pytest.mark.parametrize("shape, bias_shape, rank", [((16, 8, 24, 24), (1, 8, 1, 1), 3),  # parallel
                                                     ((6, 3, 5, 7), (3, 1, 1), 3),          # serial
                                                     ((4, 9, 130, 20), (20,), 2)])          # parallel
def test_broadcast_kernels_loop_over_collapsed_axes(shape, bias_shape, rank):
    """A bias add and ReLU over (N, C, H, W) runs over (N, C, H*W) views (or (N*C*H, W) for a
    bias along W); a parallel one of rank 3 as one prange over N*C rows; dropout's random bits
    keep their C-order element numbers."""
    arrays = [normal(*shape), normal(*bias_shape), np.array([3, 4], np.int64)]
    graph = build_graph("bias_relu", arrays, lambda b, x, c, key: [
        b.relu(b.add(x, c)), b.where(b.random_bernoulli(key, p=0.5, shape=shape), b.exp(c), x)])
    executable = check(graph, arrays)
    calls = [c for k in executable.kernels for c in k.generated.calls if c.views]
    assert len(calls) == 2  # relu(x + c), and dropout's where (exp(c) is a kernel of its own)
    for call in calls:
        assert all(view is None or len(view) == rank for view in call.views)
        # Large loops run in parallel; a small one may too, when this kernel's always-parallel
        # variant is already compiled (a larger size of the same source, reused rather than
        # compiled again serially: executor.choose_variants), so that side depends on test order.
        if np.prod(shape) >= 1 << 16:
            assert call.parallel
        if call.parallel and rank == 3:
            assert "for k in prange(n0 * n1):" in call.source and "i1 = k % n1" in call.source


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs())
def test_random_graphs_match_the_reference(graph):
    check(graph, random_arguments(graph), BLAS_TOLERANCE)


def small_cnn():
    b = Builder("cnn")
    x = b.add_input(TensorType((4, 1, 8, 8), "float32"), "x")
    w1 = b.add_input(TensorType((3, 1, 3, 3), "float32"), "w1", role="param")
    b1 = b.add_input(TensorType((3,), "float32"), "b1", role="param")
    w2 = b.add_input(TensorType((48, 5), "float32"), "w2", role="param")
    b2 = b.add_input(TensorType((5,), "float32"), "b2", role="param")
    h = b.relu(b.add(b.conv2d(x, w1, padding=1), b.reshape(b1, shape=(1, 3, 1, 1))))
    h = b.reshape(b.max_pool2d(h, kernel=2, stride=2), shape=(4, 48))
    logits = b.add(b.matmul(h, w2), b2)
    loss = b.mul(b.sum(b.square(logits), axes=(0, 1)), b.scalar_like(0.25, logits))
    b.add_output("loss", loss)
    b.add_output("logits", logits)
    return b.graph.verify()


def test_small_cnn_forward_and_gradient_match_the_reference():
    graph = small_cnn()
    arrays = [normal(*v.shape) for v in graph.input_values]
    check(graph, arrays, BLAS_TOLERANCE)
    grads = autodiff(graph, wrt=["w1", "b1", "w2", "b2"], output="loss").verify()
    executable = check(grads, arrays, BLAS_TOLERANCE)
    ops = {m.op for k in executable.graph.nodes for m in k.subgraph.nodes}
    assert {"conv2d_weight_grad", "max_pool2d_grad", "matmul"} <= ops


# -- the executor's contract -------------------------------------------------------------------
def affine():
    b = Builder("affine")
    x = b.add_input(TensorType((2, 3), "float32"), "x")
    y = b.add_input(TensorType((3,), "int32"), "y")
    b.add_output("z", b.add(b.mul(x, b.scalar_like(2.0, x)), b.cast(y, dtype="float32")))
    return b.graph


def test_inputs_are_checked_before_running():
    executable = compile_graph(affine(), "numba-cpu")
    x, y = normal(2, 3), np.arange(3, dtype=np.int32)
    with pytest.raises(InputError, match=r"input 'x'.*expected shape \(2, 3\).*got \(3, 2\)"):
        executable(normal(3, 2), y)
    with pytest.raises(InputError, match=r"input 'x'.*expected dtype float32, got float64"):
        executable(x.astype(np.float64), y)
    with pytest.raises(InputError, match="expected 2 inputs"):
        executable(x)
    # lossless conversions are accepted: Python lists, int32 -> float32-safe bools, strided views
    (from_list,) = executable(x.tolist(), [0, 1, 2])
    (from_view,) = executable(np.asfortranarray(x), y)
    np.testing.assert_array_equal(from_list, from_view)


def test_outputs_are_fresh_arrays_the_caller_keeps():
    executable = compile_graph(affine(), "numba-cpu")
    y = np.arange(3, dtype=np.int32)
    first = executable(np.ones((2, 3), np.float32), y)[0]
    kept = first.copy()
    second = executable(np.zeros((2, 3), np.float32), y)[0]
    assert first is not second and not np.shares_memory(first, second)
    np.testing.assert_array_equal(first, kept)


def test_donated_inputs_are_updated_in_place():
    b = Builder("sgd")
    w = b.add_input(TensorType((8, 4), "float32"), "w", role="param")
    x = b.add_input(TensorType((5, 8), "float32"), "x")
    y = b.matmul(x, w)
    b.add_output("y", y)
    b.add_output("w", b.sub(w, b.mul(b.sum(y, axes=(0, 1)), b.scalar_like(0.01, w))))
    graph = b.graph.verify()
    w0, x0 = normal(8, 4), normal(5, 8)
    want = evaluate(graph, [w0, x0])
    executable = compile_graph(graph, "numba-cpu", donate={0: 1})
    w_arg = w0.copy()
    y_out, w_out = executable(w_arg, x0)
    assert w_out is w_arg
    np.testing.assert_allclose(w_arg, want[1], **BLAS_TOLERANCE)
    np.testing.assert_allclose(y_out, want[0], **BLAS_TOLERANCE)
    with pytest.raises(InputError, match="donated"):
        executable(np.asfortranarray(w_arg), x0)


def test_views_of_arguments_follow_the_arrays_passed_to_each_call():
    """Kernels take 1-D views of the arguments; the view of the array the last call had is
    reused, so a call with another array (or the same array changed in place) must still read
    and write that call's array."""
    b = Builder("views")
    w = b.add_input(TensorType((6, 5), "float32"), "w", role="param")
    x = b.add_input(TensorType((6, 5), "float32"), "x")
    b.add_output("w", b.add(b.mul(w, b.scalar_like(0.5, w)), x))
    graph = b.graph.verify()
    executable = compile_graph(graph, "numba-cpu", donate={0: 0})
    assert executable._views, "the kernel should take per-call views of its arguments"
    first, second, x0 = normal(6, 5), normal(6, 5), normal(6, 5)
    first_before, second_before = first.copy(), second.copy()
    assert executable(first, x0)[0] is first
    np.testing.assert_allclose(first, first_before * 0.5 + x0, rtol=1e-6)
    assert executable(second, x0)[0] is second
    np.testing.assert_allclose(second, second_before * 0.5 + x0, rtol=1e-6)
    np.testing.assert_allclose(first, first_before * 0.5 + x0, rtol=1e-6)  # untouched
    first_after = first.copy()
    executable(first, x0)
    np.testing.assert_allclose(first, first_after * 0.5 + x0, rtol=1e-6)


def test_outputs_sharing_an_input_buffer_are_written_through_the_input():
    """A kernel output in a dying input's buffer, or in a donated input, is written through
    that input's parameter (through two, LLVM would find them overlapping at run time and fall
    back to its unvectorised loop). Results match the reference."""
    b = Builder("in_place")
    w = b.add_input(TensorType((300, 256), "float32"), "w", role="param")
    keep = b.add_input(TensorType((300, 256), "bool"), "keep")
    g = b.add_input(TensorType((300, 256), "float32"), "g")
    t = b.reshape(b.tanh(g), shape=(256, 300))  # a view between: the where cannot fuse with tanh
    masked = b.where(b.reshape(keep, shape=(256, 300)), t, b.scalar_like(0.0, t))
    b.add_output("masked", b.transpose(masked, perm=(1, 0)))
    b.add_output("w", b.sub(w, b.mul(b.reshape(masked, shape=(300, 256)), b.scalar_like(0.1, w))))
    graph = b.graph.verify()
    arrays = [normal(300, 256), integers(0, 2, 300, 256).astype(bool), normal(300, 256)]
    want = evaluate(graph, arrays)
    executable = compile_graph(graph, "numba-cpu", donate={0: 1})
    w_arg = arrays[0].copy()
    got = executable(w_arg, *arrays[1:])
    assert got[1] is w_arg
    for g_, w_ in zip(got, want):
        np.testing.assert_allclose(g_, w_, **TOLERANCE["float32"])
    in_place = [k for k in executable.kernels if executable.plan.written_in_place(k.node)]
    assert len(in_place) == 2
    for k in in_place:
        call = k.generated.calls[-1]
        params = call.source.split(f"def {call.entry}(")[1].split(")")[0].split(", ")
        stores = [line.split("[")[0].strip() for line in call.source.splitlines() if "] = " in line]
        for p, q in executable.plan.written_in_place(k.node):
            assert KernelArray(OUTPUT, q) not in call.args  # no parameter of its own
            assert params[call.args.index(KernelArray(INPUT, p))] in stores


def test_an_in_place_kernel_reads_and_writes_one_parameter():
    """The emitter is told which output the memory plan puts in which input's buffer (here a
    donated parameter updated by w - 0.1 * g) and writes the loop through that one parameter."""
    b = Builder("sgd")
    w = b.add_input(TensorType((4, 3), "float32"), "w", role="param")
    g = b.add_input(TensorType((4, 3), "float32"), "g")
    b.add_output("w", b.sub(w, b.mul(g, b.scalar_like(0.1, g))))
    executable = compile_graph(b.graph.verify(), "numba-cpu", donate={0: 0})
    (kernel,) = executable.kernels
    (call,) = kernel.generated.calls
    ((p, q),) = executable.plan.written_in_place(kernel.node)
    assert kernel.node.inputs[p] is executable.graph.input_values[0]  # w's buffer
    assert call.args == (KernelArray(INPUT, 0), KernelArray(INPUT, 1), 12, np.float32(0.1))
    assert "def kernel_mul_sub(x0, x1, n, c0):" in call.source
    assert f"        x{p}[i] = t1\n" in call.source and "y0" not in call.source
    w_arg, g_arg = normal(4, 3), normal(4, 3)
    want = w_arg - g_arg * np.float32(0.1)
    assert executable(w_arg, g_arg)[0] is w_arg
    np.testing.assert_allclose(w_arg, want, **TOLERANCE["float32"])


def test_an_output_of_another_dtype_in_an_input_buffer_keeps_its_own_parameter():
    """int32(8 * tanh(x)) takes the bytes of tanh(x), a float32 array of the same size dying
    there; stored through the float32 parameter, each integer would be converted to a float
    and its bits read back as an integer."""
    b = Builder("cast_in_place")
    x = b.add_input(TensorType((8, 8), "float32"), "x")
    flat = b.reshape(b.tanh(x), shape=(64,))  # a view between: the cast cannot fuse with tanh
    rounded = b.cast(b.mul(flat, b.scalar_like(8.0, flat)), dtype="int32")
    b.add_output("z", b.transpose(b.reshape(rounded, shape=(8, 8)), perm=(1, 0)))
    graph = b.graph.verify()
    executable = compile_graph(graph, "numba-cpu")
    assert len(executable.plan.inplace) == 1  # the cast's output shares tanh's buffer
    x_arg = normal(8, 8)
    np.testing.assert_array_equal(executable(x_arg)[0], evaluate(graph, [x_arg])[0])


def test_kernel_modules_import_what_their_writers_declare():
    """The module header follows what the code generator declares (a GEMM call, the fastmath
    flags), not what the text happens to contain."""
    body = Writer()
    with body.block("def kernel_note(x0):"):
        body.line("x0[0] = 1  # no gemm(...) call here, and no FASTMATH decorator")
    plain = module("kernel_note", body)
    assert "import gemm" not in plain and "FASTMATH =" not in plain
    declared = module("kernel_note", body, gemm=True, fastmath=True)
    assert "from graphc.backends.numba_cpu.gemm import gemm\n" in declared
    assert "FASTMATH = {" in declared


def test_thread_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    executable = compile_graph(affine(), "numba-cpu")
    previous = numba.get_num_threads()
    try:
        executable(normal(2, 3), np.arange(3, dtype=np.int32))
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(previous)


def test_profile_reports_every_kernel():
    arrays = [normal(16, 32), normal(32, 8)]
    graph = build_graph("profiled", arrays, lambda b, x, w: b.sum(b.tanh(b.matmul(x, w)), axes=(1,)))
    report = compile_graph(graph, "numba-cpu").profile(*arrays, repeat=3)
    assert report.calls == 3 and len(report.rows) == 2
    matmul = next(r for r in report.rows if r.pattern == "library")
    assert matmul.flops == 2 * 16 * 32 * 8 + 16 * 8
    assert all(r.seconds > 0 for r in report.rows)
    text = str(report)
    assert "GFLOP/s" in text and "share" in text and matmul.name in text


# -- golden generated source -------------------------------------------------------------------
GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")


def golden_elementwise_chain():
    arrays = [normal(8, 16), normal(16)]
    return build_graph("chain", arrays, lambda b, x, c: b.tanh(b.mul(b.add(x, c), b.scalar_like(0.5, x))))


def golden_softmax_sum():
    arrays = [normal(8, 16)]
    return build_graph("softmax", arrays, lambda b, x: (lambda e: b.div(e, b.sum(e, axes=(1,), keepdims=True)))(
        b.exp(b.sub(x, b.max(x, axes=(1,), keepdims=True)))))


def golden_matmul_bias_relu():
    arrays = [normal(8, 16), normal(16, 4), normal(4)]
    return build_graph("dense", arrays, lambda b, x, w, c: b.relu(b.add(b.matmul(x, w), c)))


def golden_conv2d():
    arrays = [normal(2, 3, 8, 8), normal(4, 3, 3, 3)]
    return build_graph("conv", arrays, lambda b, x, w: b.conv2d(x, w, stride=2, padding=1))


GOLDEN = {  # name -> (graph, which kernel of the fused graph)
    "elementwise_chain": (golden_elementwise_chain, 0),
    "reduction_softmax_sum": (golden_softmax_sum, 1),
    "matmul_bias_relu": (golden_matmul_bias_relu, 0),
    "conv2d": (golden_conv2d, 0),
}


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_generated_source_matches_golden_file(name):
    """Set GRAPHC_UPDATE_GOLDEN=1 to rewrite the files after reviewing a code generator change."""
    make, index = GOLDEN[name]
    # The compiled modules only: the origin comment in front names this file's line numbers.
    source = "\n\n".join(call.source for call in generate(fuse(make()).nodes[index]).calls)
    path = os.path.join(GOLDEN_DIR, f"{name}.py")
    if os.environ.get("GRAPHC_UPDATE_GOLDEN"):
        os.makedirs(GOLDEN_DIR, exist_ok=True)
        with open(path, "w") as f:
            f.write(source)
    with open(path) as f:
        assert source == f.read(), f"generated source differs from {path}"


def test_profiling_every_call_from_the_environment(monkeypatch):
    arrays = [normal(16, 32), normal(32, 8)]
    graph = build_graph("env_profiled", arrays, lambda b, x, w: b.relu(b.matmul(x, w)))
    assert compile_graph(graph, "numba-cpu").profile_report is None
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    executable = compile_graph(graph, "numba-cpu")
    for _ in range(3):
        executable(*arrays)
    report = executable.profile_report
    assert report.calls == 3 and [r.name for r in report.rows] == [k.name for k in executable.kernels]
    assert [entry for entry, _ in report.rows[0].parts] == ["matmul", "epilogue_relu"]
    assert "matmul" in report.table(parts=True)


def test_division_by_zero_gives_ieee_results_as_the_reference():
    """x / 0 is +-inf and 0 / 0 nan, in a fused kernel and after a reduction, as in NumPy (the
    numerics check then finds them): no ZeroDivisionError raised from a kernel."""
    x = np.array([[1.0, -2.0, 0.0, 3.0]], np.float32)
    y = np.array([[0.0, 0.0, 0.0, 2.0]], np.float32)
    graph = build_graph("divide_by_zero", [x, y], lambda b, x, y: [
        b.div(x, y), b.pow(y, b.scalar_like(-1.0, y)), b.div(x, b.sum(y, axes=(0,), keepdims=True))])
    with np.errstate(divide="ignore", invalid="ignore"):
        check(graph, [x, y])


def test_degenerate_graphs_and_empty_arrays():
    x = np.arange(3, dtype=np.float32)
    identity = build_graph("identity", [x], lambda b, v: [v, v])
    outputs = compile_graph(identity, "numba-cpu")(x)
    assert all(np.array_equal(o, x) and not np.shares_memory(o, x) for o in outputs)
    constants = build_graph("constants", [], lambda b: [b.const(np.arange(4.0), "float64"), b.const(2.0, "float32")])
    check(constants, [])
    empty = [np.zeros((0, 2, 5, 5), np.float32), np.ones((3, 2, 3, 3), np.float32),
             np.zeros((3, 0), np.float32), np.zeros((0, 4), np.float32)]
    check(build_graph("empty", empty, lambda b, v, w, p, q: [
        b.conv2d(v, w, padding=1), b.max_pool2d(v, kernel=2, stride=2),
        b.conv2d_weight_grad(v, b.conv2d(v, w, padding=1), weight_shape=(3, 2, 3, 3), padding=1),
        b.sum(b.exp(p), axes=(1,)), b.matmul(p, q), b.max(q, axes=(1,))]), empty)

