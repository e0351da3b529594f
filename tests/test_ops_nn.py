"""matmul, conv2d, pooling and their gradient ops: forward against naive NumPy loops, every VJP
against finite differences (float64), second-order gradients, and shape errors."""
import numpy as np
import pytest

from graphc.backends.reference import evaluate
from graphc.ir import AttributeSchemaError, Builder, DTypeError, GraphcError, ShapeError, TensorType
from graphc.passes.autodiff import autodiff
from opcheck import check_vjp, numeric_vjp, run_op, vjp_graph

rng = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def fresh_rng():
    """Each test draws from `rng` seeded afresh: its values never depend on which tests ran
    before it."""
    global rng
    rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape)


# -- naive references (loops over every output element; tiny shapes only) ----------------------
def naive_conv2d(x, w, g, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """conv2d's output, and the cotangents of x and w for output cotangent g, by direct loops."""
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out, dxp, dwt = np.zeros((n, o, ho, wo)), np.zeros_like(xp), np.zeros_like(w)
    for b, oc, i, j, ci, p, q in np.ndindex(n, o, ho, wo, cg, kh, kw):
        channel = (oc // (o // groups)) * cg + ci
        r, s = i * sh + p * dh, j * sw + q * dw
        out[b, oc, i, j] += xp[b, channel, r, s] * w[oc, ci, p, q]
        dxp[b, channel, r, s] += g[b, oc, i, j] * w[oc, ci, p, q]
        dwt[oc, ci, p, q] += g[b, oc, i, j] * xp[b, channel, r, s]
    return out, dxp[:, :, ph:ph + h, pw:pw + wd], dwt


def naive_pool(x, g, kernel, stride, padding, mode, count_include_pad=True):
    """max/avg pooling's output and x's cotangent for output cotangent g, by direct loops."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, w = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out, dx = np.zeros((n, c, ho, wo)), np.zeros_like(x)
    for b, ch, i, j in np.ndindex(n, c, ho, wo):
        cells = [(r, s) for r in range(i * sh - ph, i * sh - ph + kh)
                 for s in range(j * sw - pw, j * sw - pw + kw)]
        real = [(r, s) for r, s in cells if 0 <= r < h and 0 <= s < w]
        if mode == "max":
            best = real[0]
            for cell in real:  # strict '>' keeps the first maximum
                if x[b, ch][cell] > x[b, ch][best]:
                    best = cell
            out[b, ch, i, j] = x[b, ch][best]
            dx[b, ch][best] += g[b, ch, i, j]
        else:
            divisor = len(cells) if count_include_pad else len(real)
            out[b, ch, i, j] = sum(x[b, ch][cell] for cell in real) / divisor
            for cell in real:
                dx[b, ch][cell] += g[b, ch, i, j] / divisor
    return out, dx


# -- matmul --------------------------------------------------------------------------------------
MATMUL_SHAPES = [((3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((2, 3, 4), (4, 5)),
                 ((3, 4), (2, 4, 5)), ((2, 1, 3, 4), (5, 4, 2)), ((1, 3, 4), (2, 4, 2))]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_forward_and_vjp(shapes):
    x, y = randn(*shapes[0]), randn(*shapes[1])
    np.testing.assert_allclose(run_op("matmul", [x, y]), np.matmul(x, y), rtol=1e-12)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    out32 = run_op("matmul", [x32, y32])
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, np.matmul(x32, y32), rtol=1e-5, atol=1e-6)
    check_vjp("matmul", [x, y])


def second_order_check(graph, arrays, wrt, atol=1e-6):
    """Differentiate `graph`'s gradient graph again and compare with finite differences."""
    first = autodiff(graph, wrt=wrt, cotangent=True, keep_outputs=False)
    first.input("cotangent").name = "first_cotangent"  # the second pass adds its own
    first.verify()
    arrays = [np.array(a) for a in arrays] + [randn(*graph.output_values[0].shape)]
    for position, name in enumerate(first.output_names):
        second = autodiff(first, wrt=list(range(len(first.inputs))), output=name, cotangent=True,
                          keep_outputs=False)
        second.verify()
        seed = randn(*first.output(name).shape)
        analytic = evaluate(second, [*arrays, seed])
        for index, grad in enumerate(analytic):
            expected = numeric_vjp(lambda xs: evaluate(first, xs)[position], arrays, seed, index)
            np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=atol,
                                       err_msg=f"d({name})/d(input {index})")


def test_grad_of_grad_through_batched_matmul():
    b = Builder("mm")
    x = b.add_input(TensorType((2, 1, 3, 4), "float64"), "x")
    y = b.add_input(TensorType((5, 4, 2), "float64"), "y")
    b.add_output("out", b.matmul(b.tanh(x), y))  # tanh makes the second derivative non-trivial
    second_order_check(b.graph, [randn(2, 1, 3, 4), randn(5, 4, 2)], wrt=["x", "y"])


def test_matmul_errors_name_both_shapes():
    with pytest.raises(ShapeError, match=r"matmul: contraction dimensions differ: \(2, 3\) @ \(4, 5\)"):
        run_op("matmul", [np.ones((2, 3)), np.ones((4, 5))])
    with pytest.raises(ShapeError, match=r"at least 2 dimensions, got shapes \(3,\) and \(3, 2\)"):
        run_op("matmul", [np.ones(3), np.ones((3, 2))])
    with pytest.raises(ShapeError, match=r"batch dimensions \(2,\) and \(3,\) do not broadcast"):
        run_op("matmul", [np.ones((2, 3, 4)), np.ones((3, 4, 5))])
    with pytest.raises(DTypeError, match="matmul: dtype mismatch float64 vs float32"):
        run_op("matmul", [np.ones((2, 2)), np.ones((2, 2), np.float32)])
    with pytest.raises(DTypeError, match="matmul: expects floating-point operands, got int64"):
        run_op("matmul", [np.ones((2, 2), np.int64), np.ones((2, 2), np.int64)])


# -- conv2d ------------------------------------------------------------------------------------
CONV_CASES = {
    "plain": ((2, 3, 5, 6), (4, 3, 3, 2), {}),
    "stride": ((2, 2, 7, 6), (3, 2, 3, 3), {"stride": (2, 3)}),
    "padding": ((1, 2, 4, 5), (3, 2, 3, 3), {"padding": (1, 2)}),
    "dilation": ((1, 2, 7, 6), (2, 2, 3, 2), {"dilation": (2, 3)}),
    "groups": ((2, 4, 5, 5), (6, 2, 3, 3), {"groups": 2}),
    "depthwise": ((1, 3, 5, 4), (3, 1, 2, 2), {"groups": 3, "padding": (1, 1)}),
    "everything": ((1, 4, 8, 7), (4, 2, 2, 3), {"stride": (2, 1), "padding": (1, 2),
                                                 "dilation": (2, 2), "groups": 2}),
    "uncovered_rows": ((1, 1, 6, 6), (2, 1, 3, 3), {"stride": 2}),  # last row in no window
}


def conv_case(name):
    x_shape, w_shape, attrs = CONV_CASES[name]
    x, w = randn(*x_shape), randn(*w_shape)
    geometry = {k: (v, v) if isinstance(v, int) and k != "groups" else v for k, v in attrs.items()}
    return x, w, attrs, geometry


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv2d_and_gradient_ops_forward(name):
    x, w, attrs, geometry = conv_case(name)
    out = run_op("conv2d", [x, w], **attrs)
    g = randn(*out.shape)
    expected_out, expected_dx, expected_dw = naive_conv2d(x, w, g, **geometry)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run_op("conv2d_input_grad", [g, w], input_shape=x.shape, **attrs),
                               expected_dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run_op("conv2d_weight_grad", [x, g], weight_shape=w.shape, **attrs),
                               expected_dw, rtol=1e-12, atol=1e-12)
    out32 = run_op("conv2d", [x.astype(np.float32), w.astype(np.float32)], **attrs)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, expected_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv2d_vjps(name):
    x, w, attrs, _ = conv_case(name)
    check_vjp("conv2d", [x, w], **attrs)
    g = randn(*run_op("conv2d", [x, w], **attrs).shape)
    check_vjp("conv2d_input_grad", [g, w], input_shape=x.shape, **attrs)
    check_vjp("conv2d_weight_grad", [x, g], weight_shape=w.shape, **attrs)


def test_grad_of_grad_through_conv2d():
    b = Builder("conv")
    x = b.add_input(TensorType((1, 2, 5, 5), "float64"), "x")
    w = b.add_input(TensorType((2, 1, 3, 3), "float64"), "w")
    b.add_output("out", b.conv2d(b.tanh(x), w, stride=2, padding=1, groups=2))
    second_order_check(b.graph, [randn(1, 2, 5, 5), randn(2, 1, 3, 3)], wrt=["x", "w"])


def test_conv2d_accepts_single_ints_for_pairs():
    b = Builder()
    x = b.add_input(TensorType((1, 1, 6, 6), "float32"), "x")
    w = b.add_input(TensorType((1, 1, 3, 3), "float32"), "w")
    out = b.conv2d(x, w, stride=2, padding=1, dilation=1)
    assert out.shape == (1, 1, 3, 3)
    assert out.producer.attrs == {"stride": (2, 2), "padding": (1, 1), "dilation": (1, 1), "groups": 1}


@pytest.mark.parametrize("x_shape,w_shape,attrs,message", [
    ((1, 3, 5, 5), (2, 4, 3, 3), {}, r"weight \(2, 4, 3, 3\) expects 4 input channels per group "
                                     r"\(x groups=1\), but the input \(1, 3, 5, 5\) has 3 channels"),
    ((1, 4, 5, 5), (3, 2, 3, 3), {"groups": 2}, r"groups=2 must divide both the input channels "
                                                r"\(4\) and the output channels \(3\)"),
    ((1, 1, 4, 4), (1, 1, 5, 3), {"padding": (0, 0)}, r"kernel 5 is larger than the padded input "
                                                      r"height 4 \+ 2\*0"),
    ((1, 1, 5, 5), (1, 1, 3, 3), {"dilation": 3}, r"kernel 3 \(dilated to 7\) is larger"),
    ((1, 1, 5, 5), (1, 1, 3, 3), {"stride": 0}, r"stride must be two ints >= 1"),
    ((1, 1, 5, 5), (1, 1, 3, 3), {"padding": (1, 1, 1)}, r"padding must be two ints >= 0"),
    ((1, 5, 5), (1, 1, 3, 3), {}, r"input must be 4-D \(N, C, H, W\), got shape \(1, 5, 5\)"),
    ((1, 1, 5, 5), (1, 3, 3), {}, r"weight must be 4-D"),
])
def test_conv2d_shape_errors(x_shape, w_shape, attrs, message):
    with pytest.raises(ShapeError, match="conv2d: " + message):
        run_op("conv2d", [np.ones(x_shape), np.ones(w_shape)], **attrs)


def test_conv2d_gradient_op_errors():
    with pytest.raises(DTypeError, match="conv2d: dtype mismatch float64 vs float32"):
        run_op("conv2d", [np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2), np.float32)])
    with pytest.raises(ShapeError, match=r"conv2d_input_grad: cotangent shape \(1, 1, 3, 3\) is not "
                                         r"conv2d's output shape \(1, 1, 2, 2\)"):
        run_op("conv2d_input_grad", [np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2))],
               input_shape=(1, 1, 3, 3))
    with pytest.raises(ShapeError, match=r"conv2d_weight_grad: cotangent shape \(1, 2, 2, 2\)"):
        run_op("conv2d_weight_grad", [np.ones((1, 1, 3, 3)), np.ones((1, 2, 2, 2))],
               weight_shape=(1, 1, 2, 2))


# -- pooling -----------------------------------------------------------------------------------
POOL_CASES = {
    "2x2": ((2, 3, 4, 6), {"kernel": (2, 2), "stride": (2, 2)}),
    "overlapping_padded": ((1, 2, 5, 5), {"kernel": (3, 3), "stride": (1, 1), "padding": (1, 1)}),
    "rectangular": ((1, 2, 6, 5), {"kernel": (3, 2), "stride": (2, 1), "padding": (1, 0)}),
    "uncovered_rows": ((1, 1, 5, 7), {"kernel": (2, 3), "stride": (2, 2)}),
}


def pool_case(name):
    shape, attrs = POOL_CASES[name]
    return randn(*shape), attrs, {"padding": (0, 0), **attrs}


@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_max_pool2d_forward_and_vjp(name):
    x, attrs, geometry = pool_case(name)
    out = run_op("max_pool2d", [x], **attrs)
    g = randn(*out.shape)
    expected_out, expected_dx = naive_pool(x, g, mode="max", **geometry)
    np.testing.assert_array_equal(out, expected_out)
    np.testing.assert_allclose(run_op("max_pool2d_grad", [x, g], **attrs), expected_dx, rtol=1e-12)
    check_vjp("max_pool2d", [x], **attrs)


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("name", sorted(POOL_CASES))
def test_avg_pool2d_forward_and_vjps(name, count_include_pad):
    x, attrs, geometry = pool_case(name)
    attrs = {**attrs, "count_include_pad": count_include_pad}
    out = run_op("avg_pool2d", [x], **attrs)
    g = randn(*out.shape)
    expected_out, expected_dx = naive_pool(x, g, mode="avg", count_include_pad=count_include_pad,
                                           **geometry)
    np.testing.assert_allclose(out, expected_out, rtol=1e-12)
    np.testing.assert_allclose(run_op("avg_pool2d_grad", [g], input_shape=x.shape, **attrs),
                               expected_dx, rtol=1e-12)
    out32 = run_op("avg_pool2d", [x.astype(np.float32)], **attrs)
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, expected_out, rtol=1e-5, atol=1e-6)
    check_vjp("avg_pool2d", [x], **attrs)
    check_vjp("avg_pool2d_grad", [g], input_shape=x.shape, **attrs)


def test_max_pool2d_grad_ties_go_to_the_first_maximum_and_overlaps_accumulate():
    x = np.array([[[[1.0, 3.0, 3.0],
                    [3.0, 2.0, 3.0],
                    [0.0, 3.0, 1.0]]]])
    g = np.array([[[[1.0, 10.0], [100.0, 1000.0]]]])
    dx = run_op("max_pool2d_grad", [x, g], kernel=2, stride=1)
    # windows (row-major): top-left picks (0,1); top-right (0,1); bottom-left (1,0); bottom-right (1,2)
    expected = np.array([[[[0.0, 11.0, 0.0],
                           [100.0, 0.0, 1000.0],
                           [0.0, 0.0, 0.0]]]])
    np.testing.assert_array_equal(dx, expected)


def test_max_pool2d_pads_with_minus_infinity():
    x = -np.ones((1, 1, 2, 2)) - np.arange(4.0).reshape(1, 1, 2, 2)
    out = run_op("max_pool2d", [x], kernel=3, stride=1, padding=1)
    np.testing.assert_array_equal(out, np.full((1, 1, 2, 2), -1.0))  # not the zero padding


def test_second_order_through_max_pool2d_is_refused_clearly():
    with pytest.raises(GraphcError, match="max_pool2d_grad: second-order gradients through "
                                          "max_pool2d are not supported"):
        vjp_graph("max_pool2d_grad", [TensorType((1, 1, 4, 4), "float64"),
                                      TensorType((1, 1, 2, 2), "float64")], kernel=2, stride=2)


def test_pool_errors():
    with pytest.raises(ShapeError, match=r"max_pool2d: padding \(2, 2\) must be at most half the "
                                         r"kernel \(3, 3\)"):
        run_op("max_pool2d", [np.ones((1, 1, 6, 6))], kernel=3, stride=1, padding=2)
    with pytest.raises(ShapeError, match=r"avg_pool2d: kernel 4 is larger than the padded input "
                                         r"width 3 \+ 2\*0"):
        run_op("avg_pool2d", [np.ones((1, 1, 6, 3))], kernel=4, stride=1)
    with pytest.raises(ShapeError, match=r"max_pool2d: input must be 4-D"):
        run_op("max_pool2d", [np.ones((6, 6))], kernel=2, stride=2)
    with pytest.raises(DTypeError, match="avg_pool2d: expects a floating-point operand, got int64"):
        run_op("avg_pool2d", [np.ones((1, 1, 4, 4), np.int64)], kernel=2, stride=2)
    with pytest.raises(AttributeSchemaError, match="max_pool2d: missing required attribute 'stride'"):
        run_op("max_pool2d", [np.ones((1, 1, 4, 4))], kernel=2)
    with pytest.raises(ShapeError, match=r"max_pool2d_grad: cotangent shape \(1, 1, 3, 3\) is not "
                                         r"the pooled shape \(1, 1, 2, 2\)"):
        run_op("max_pool2d_grad", [np.ones((1, 1, 4, 4)), np.ones((1, 1, 3, 3))], kernel=2, stride=2)
