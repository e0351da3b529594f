"""Linear algebra, convolution and pooling primitives: the library-style (OPAQUE) kernels.

Layouts follow PyTorch: activations are NCHW, conv weights (out_channels, in_channels/groups,
kh, kw), padding is symmetric. Spatial attributes are (height, width) pairs; a single int is
accepted and used for both.

The NumPy oracles gather every receptive field as a strided view (im2col without a copy, via
`sliding_window_view`) and contract it with one BLAS call per group; the gradient ops scatter
per-window values back with one strided add per kernel offset (col2im). Every VJP is written
with primitives that have VJPs themselves, so grad of grad works; the one exception is
max_pool2d_grad (see its rule).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import GraphcError
from ..registry import OPAQUE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, broadcast_shapes, is_float

Pair = tuple[int, int]
Shape = tuple[int, ...]


# -- shared checks ---------------------------------------------------------------------------
def _same_float_dtype(x: TensorType, y: TensorType) -> str:
    if x.dtype != y.dtype:
        raise OpTypeError(f"dtype mismatch {x.dtype} vs {y.dtype}; cast one operand first", dtype=True)
    if not is_float(x.dtype):
        raise OpTypeError(f"expects floating-point operands, got {x.dtype}", dtype=True)
    return x.dtype


def _float_operand(x: TensorType) -> str:
    if not is_float(x.dtype):
        raise OpTypeError(f"expects a floating-point operand, got {x.dtype}", dtype=True)
    return x.dtype


def _check_nchw(shape: Shape, what: str) -> None:
    if len(shape) != 4 or any(d < 0 for d in shape):
        raise OpTypeError(f"{what} must be 4-D (N, C, H, W), got shape {shape}")


def _check_pair(name: str, value: tuple[int, ...], minimum: int) -> None:
    if len(value) != 2 or any(v < minimum for v in value):
        raise OpTypeError(f"{name} must be two ints >= {minimum} (height, width), got {value}")


def _expand_pairs(*names: str) -> Callable[..., dict]:
    """A canon rule turning a single int (stored as a 1-tuple) into a (height, width) pair."""
    def canon(types: list[TensorType], attrs: dict) -> dict:
        return {k: v * 2 if k in names and len(v) == 1 else v for k, v in attrs.items()}
    return canon


def _window_count(size: int, kernel: int, stride: int, pad: int, dilation: int, axis: str) -> int:
    """Output positions of a sliding window along one spatial axis (floor mode)."""
    span = dilation * (kernel - 1) + 1
    if span > size + 2 * pad:
        extent = f"kernel {kernel}" + (f" (dilated to {span})" if dilation > 1 else "")
        raise OpTypeError(f"{extent} is larger than the padded input {axis} {size} + 2*{pad}")
    return (size + 2 * pad - span) // stride + 1


def _window_counts(hw: Shape, kernel: Shape, stride: Pair, padding: Pair,
                   dilation: Pair = (1, 1)) -> Pair:
    return (_window_count(hw[0], kernel[0], stride[0], padding[0], dilation[0], "height"),
            _window_count(hw[1], kernel[1], stride[1], padding[1], dilation[1], "width"))


# -- im2col / col2im ---------------------------------------------------------------------------
def _pad(x: np.ndarray, padding: Pair, fill: float) -> np.ndarray:
    ph, pw = padding
    if not (ph or pw):
        return x
    return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)


def _windows(x: np.ndarray, kernel: Shape, stride: Pair, padding: Pair, dilation: Pair,
             fill: float = 0.0) -> np.ndarray:
    """Every receptive field of NCHW `x` as a view of shape (N, C, Ho, Wo, kh, kw) (im2col
    without copying; the contraction that reads it makes the one copy)."""
    dh, dw = dilation
    span = (dh * (kernel[0] - 1) + 1, dw * (kernel[1] - 1) + 1)
    view = sliding_window_view(_pad(x, padding, fill), span, axis=(2, 3))
    return view[:, :, ::stride[0], ::stride[1], ::dh, ::dw]


def _window_cells(x: np.ndarray, kernel: Shape, stride: Pair, padding: Pair,
                  fill: float = 0.0) -> list[np.ndarray]:
    """One (N, C, Ho, Wo) view per kernel offset, in row-major order: the same cell of every
    window. Pooling reduces over these with whole-array ufuncs, several times faster than
    reducing the trailing axes of `_windows`."""
    windows = _windows(x, kernel, stride, padding, (1, 1), fill)
    return [windows[:, :, :, :, i, j] for i in range(kernel[0]) for j in range(kernel[1])]


def _combine(ufunc: np.ufunc, cells: list[np.ndarray]) -> np.ndarray:
    """ufunc over all cells into a fresh array (never a view of the input, even for 1x1)."""
    result = cells[0].copy()
    for cell in cells[1:]:
        ufunc(result, cell, out=result)
    return result


def _fold_cells(cells: list[np.ndarray], input_shape: Shape, kernel: Shape, stride: Pair,
                padding: Pair, dilation: Pair = (1, 1)) -> np.ndarray:
    """Adjoint of `_window_cells`: add each offset's (N, C, Ho, Wo) values back onto the input
    positions they were read from (overlapping windows accumulate; padding is dropped)."""
    n, c, h, w = input_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    ho, wo = cells[0].shape[2:]
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), cells[0].dtype)
    for (i, j), cell in zip(np.ndindex(*kernel), cells):
        rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
        columns = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
        out[:, :, rows, columns] += cell
    return np.ascontiguousarray(out[:, :, ph:ph + h, pw:pw + w])


def _split_groups(a: np.ndarray, groups: int, axis: int) -> list[np.ndarray]:
    return np.split(a, groups, axis=axis) if groups > 1 else [a]


def _join(parts: list[np.ndarray], axis: int) -> np.ndarray:
    """Concatenate per-group results (without a copy when there is one group)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=axis)


# -- matmul ------------------------------------------------------------------------------------
def _matmul_type(x: TensorType, y: TensorType) -> TensorType:
    dtype = _same_float_dtype(x, y)
    if x.ndim < 2 or y.ndim < 2:
        raise OpTypeError(f"operands must have at least 2 dimensions, got shapes {x.shape} and "
                          f"{y.shape}; reshape vectors to matrices first")
    if x.shape[-1] != y.shape[-2]:
        raise OpTypeError(f"contraction dimensions differ: {x.shape} @ {y.shape} "
                          f"({x.shape[-1]} != {y.shape[-2]})")
    try:
        batch = broadcast_shapes(x.shape[:-2], y.shape[:-2])
    except ValueError:
        raise OpTypeError(f"batch dimensions {x.shape[:-2]} and {y.shape[:-2]} do not broadcast "
                          f"in {x.shape} @ {y.shape}") from None
    return TensorType(batch + (x.shape[-2], y.shape[-1]), dtype)


def _swap_last_two(b, x):
    ndim = len(x.shape)
    perm = tuple(range(ndim - 2)) + (ndim - 1, ndim - 2)
    return b.transpose(x, perm=perm)


def _matmul_vjp(b, g, x, y, *, out):
    gx = b.matmul(g, _swap_last_two(b, y))
    if len(y.shape) == 2 and len(x.shape) > 2:
        # One matrix shared by a stack (a linear layer over a sequence): its gradient sums
        # x_i.T @ g_i over the stack, which is the one product of the stacked rows. Per element,
        # it was a GEMM each with only the element's rows to contract, and a stack of partial
        # gradients written out and summed afterwards.
        rows = int(np.prod(x.shape[:-1]))
        gy = b.matmul(_swap_last_two(b, b.reshape(x, shape=(rows, x.shape[-1]))),
                      b.reshape(g, shape=(rows, g.shape[-1])))
    else:
        gy = b.matmul(_swap_last_two(b, x), g)
    return b.unbroadcast(gx, x.shape), b.unbroadcast(gy, y.shape)


register(Primitive(
    "matmul", OPAQUE, _matmul_type, lambda x, y: np.matmul(x, y), _matmul_vjp, num_inputs=2,
    transposed_operands=True,
    doc="(..., m, k) @ (..., k, n) -> (..., m, n); batch dimensions broadcast as in NumPy."))


# -- conv2d and its gradient ops -------------------------------------------------------------
_CONV_ATTRS = {"stride": Attr("ints", (1, 1)), "padding": Attr("ints", (0, 0)),
               "dilation": Attr("ints", (1, 1)), "groups": Attr("int", 1)}
_conv_canon = _expand_pairs("stride", "padding", "dilation")


def _conv2d_out_shape(input_shape: Shape, weight_shape: Shape, stride: Pair, padding: Pair,
                      dilation: Pair, groups: int) -> Shape:
    _check_pair("stride", stride, 1)
    _check_pair("padding", padding, 0)
    _check_pair("dilation", dilation, 1)
    _check_nchw(input_shape, "input")
    if len(weight_shape) != 4:
        raise OpTypeError("weight must be 4-D (out_channels, in_channels/groups, kh, kw), "
                          f"got shape {weight_shape}")
    n, c, h, w = input_shape
    out_channels, group_channels, kh, kw = weight_shape
    if groups < 1:
        raise OpTypeError(f"groups must be >= 1, got {groups}")
    if c % groups or out_channels % groups:
        raise OpTypeError(f"groups={groups} must divide both the input channels ({c}) and the "
                          f"output channels ({out_channels})")
    if group_channels * groups != c:
        raise OpTypeError(f"weight {weight_shape} expects {group_channels} input channels per group "
                          f"(x groups={groups}), but the input {input_shape} has {c} channels")
    if kh < 1 or kw < 1:
        raise OpTypeError(f"kernel must be at least 1x1, got weight shape {weight_shape}")
    return (n, out_channels) + _window_counts((h, w), (kh, kw), stride, padding, dilation)


def _conv2d_type(x: TensorType, w: TensorType, *, stride, padding, dilation, groups) -> TensorType:
    dtype = _same_float_dtype(x, w)
    return TensorType(_conv2d_out_shape(x.shape, w.shape, stride, padding, dilation, groups), dtype)


def _conv2d_input_grad_type(g: TensorType, w: TensorType, *, input_shape, stride, padding,
                            dilation, groups) -> TensorType:
    dtype = _same_float_dtype(g, w)
    expected = _conv2d_out_shape(input_shape, w.shape, stride, padding, dilation, groups)
    if g.shape != expected:
        raise OpTypeError(f"cotangent shape {g.shape} is not conv2d's output shape {expected} "
                          f"for input {input_shape} and weight {w.shape}")
    return TensorType(input_shape, dtype)


def _conv2d_weight_grad_type(x: TensorType, g: TensorType, *, weight_shape, stride, padding,
                             dilation, groups) -> TensorType:
    dtype = _same_float_dtype(x, g)
    expected = _conv2d_out_shape(x.shape, weight_shape, stride, padding, dilation, groups)
    if g.shape != expected:
        raise OpTypeError(f"cotangent shape {g.shape} is not conv2d's output shape {expected} "
                          f"for input {x.shape} and weight {weight_shape}")
    return TensorType(weight_shape, dtype)


def _conv2d(x, w, *, stride, padding, dilation, groups):
    cols = _windows(x, w.shape[2:], stride, padding, dilation)
    # (N, Cg, Ho, Wo, kh, kw) . (Og, Cg, kh, kw) -> (N, Ho, Wo, Og), one GEMM per group
    parts = [np.tensordot(cols_g, w_g, axes=([1, 4, 5], [1, 2, 3]))
             for cols_g, w_g in zip(_split_groups(cols, groups, 1), _split_groups(w, groups, 0))]
    return np.ascontiguousarray(_join(parts, axis=3).transpose(0, 3, 1, 2))


def _conv2d_input_grad(g, w, *, input_shape, stride, padding, dilation, groups):
    kernel = w.shape[2:]
    g_nhwc = np.ascontiguousarray(g.transpose(0, 2, 3, 1))
    # (N, Ho, Wo, Og) @ (Og, kh*kw*Cg) -> (N, Ho, Wo, kh*kw, Cg): one GEMM per group, laid out
    # so that each kernel offset's input cotangents form one dense block for the fold
    # (Cg spelled out: NumPy cannot infer a -1 in an empty batch's reshape)
    parts = [(g_g @ w_g.transpose(0, 2, 3, 1).reshape(len(w_g), -1)).reshape(
                 g_g.shape[:3] + (kernel[0] * kernel[1], w_g.shape[1]))
             for g_g, w_g in zip(_split_groups(g_nhwc, groups, 3), _split_groups(w, groups, 0))]
    cols = _join(parts, axis=4)
    cells = [cols[:, :, :, k].transpose(0, 3, 1, 2) for k in range(cols.shape[3])]
    return _fold_cells(cells, input_shape, kernel, stride, padding, dilation)


def _conv2d_weight_grad(x, g, *, weight_shape, stride, padding, dilation, groups):
    cols = _windows(x, weight_shape[2:], stride, padding, dilation)
    # (N, Og, Ho, Wo) . (N, Cg, Ho, Wo, kh, kw) -> (Og, Cg, kh, kw)
    parts = [np.tensordot(g_g, cols_g, axes=([0, 2, 3], [0, 2, 3]))
             for g_g, cols_g in zip(_split_groups(g, groups, 1), _split_groups(cols, groups, 1))]
    return _join(parts, axis=0)


# conv2d is bilinear: <conv2d(x, w), g> = <x, input_grad(g, w)> = <w, weight_grad(x, g)>.
# Every VJP below reads off one of these identities, so all three ops differentiate twice.
def _conv2d_vjp(b, g, x, w, *, out, **geometry):
    return (b.conv2d_input_grad(g, w, input_shape=x.shape, **geometry),
            b.conv2d_weight_grad(x, g, weight_shape=w.shape, **geometry))


def _conv2d_input_grad_vjp(b, ct, g, w, *, out, input_shape, **geometry):
    return (b.conv2d(ct, w, **geometry),
            b.conv2d_weight_grad(ct, g, weight_shape=w.shape, **geometry))


def _conv2d_weight_grad_vjp(b, ct, x, g, *, out, weight_shape, **geometry):
    return (b.conv2d_input_grad(g, ct, input_shape=x.shape, **geometry),
            b.conv2d(x, ct, **geometry))


register(Primitive(
    "conv2d", OPAQUE, _conv2d_type, _conv2d, _conv2d_vjp, attrs=dict(_CONV_ATTRS),
    canon=_conv_canon, num_inputs=2,
    doc="2-D cross-correlation of NCHW x with weight (O, C/groups, kh, kw), zero padding."))
register(Primitive(
    "conv2d_input_grad", OPAQUE, _conv2d_input_grad_type, _conv2d_input_grad,
    _conv2d_input_grad_vjp, attrs={"input_shape": Attr("ints"), **_CONV_ATTRS},
    canon=_conv_canon, num_inputs=2, doc="conv2d's VJP w.r.t. its input: (g, w) -> dx."))
register(Primitive(
    "conv2d_weight_grad", OPAQUE, _conv2d_weight_grad_type, _conv2d_weight_grad,
    _conv2d_weight_grad_vjp, attrs={"weight_shape": Attr("ints"), **_CONV_ATTRS},
    canon=_conv_canon, num_inputs=2, doc="conv2d's VJP w.r.t. its weight: (x, g) -> dw."))


# -- pooling ---------------------------------------------------------------------------------
_pool_canon = _expand_pairs("kernel", "stride", "padding")


def _pool_out_shape(input_shape: Shape, kernel: Pair, stride: Pair, padding: Pair) -> Shape:
    _check_pair("kernel", kernel, 1)
    _check_pair("stride", stride, 1)
    _check_pair("padding", padding, 0)
    _check_nchw(input_shape, "input")
    # Keeps every window overlapping real input (PyTorch has the same rule).
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise OpTypeError(f"padding {padding} must be at most half the kernel {kernel}")
    return input_shape[:2] + _window_counts(input_shape[2:], kernel, stride, padding)


def _pool_type(x: TensorType, *, kernel, stride, padding, **_) -> TensorType:
    return TensorType(_pool_out_shape(x.shape, kernel, stride, padding), _float_operand(x))


def _check_pool_cotangent(g: TensorType, input_shape: Shape, kernel, stride, padding) -> None:
    expected = _pool_out_shape(input_shape, kernel, stride, padding)
    if g.shape != expected:
        raise OpTypeError(f"cotangent shape {g.shape} is not the pooled shape {expected} of "
                          f"input {input_shape}")


def _max_pool2d_grad_type(x: TensorType, g: TensorType, *, kernel, stride, padding) -> TensorType:
    _same_float_dtype(x, g)
    _check_pool_cotangent(g, x.shape, kernel, stride, padding)
    return x


def _avg_pool2d_grad_type(g: TensorType, *, input_shape, kernel, stride, padding,
                          count_include_pad) -> TensorType:
    _check_pool_cotangent(g, input_shape, kernel, stride, padding)
    return TensorType(input_shape, _float_operand(g))


def _max_pool2d(x, *, kernel, stride, padding):
    return _combine(np.maximum, _window_cells(x, kernel, stride, padding, fill=-np.inf))


def _max_pool2d_grad(x, g, *, kernel, stride, padding):
    # The first maximum in row-major window order among the window's real cells wins (a NaN
    # counting as the maximum): padding never takes the cotangent, even from a window whose
    # real cells are all -inf, as in PyTorch.
    cells = np.stack(_window_cells(x, kernel, stride, padding, fill=-np.inf))
    real = np.stack(_window_cells(np.ones((1, 1) + x.shape[2:]), kernel, stride, padding)) > 0
    top = cells.max(axis=0)
    first_max = (((cells == top) | np.isnan(cells)) & real).argmax(axis=0)
    zero = np.zeros((), g.dtype)
    routed = [np.where(first_max == k, g, zero) for k in range(len(cells))]
    return _fold_cells(routed, x.shape, kernel, stride, padding)


def _avg_divisor(input_shape: Shape, kernel, stride, padding, count_include_pad: bool,
                 dtype: np.dtype) -> np.ndarray:
    """Per-window divisor: the kernel area, or the number of real (unpadded) inputs it covers."""
    if count_include_pad:
        return np.asarray(kernel[0] * kernel[1], dtype)
    ones = np.ones((1, 1) + tuple(input_shape[2:]), dtype)
    return _combine(np.add, _window_cells(ones, kernel, stride, padding))


def _avg_pool2d(x, *, kernel, stride, padding, count_include_pad):
    sums = _combine(np.add, _window_cells(x, kernel, stride, padding))
    return sums / _avg_divisor(x.shape, kernel, stride, padding, count_include_pad, x.dtype)


def _avg_pool2d_grad(g, *, input_shape, kernel, stride, padding, count_include_pad):
    share = g / _avg_divisor(input_shape, kernel, stride, padding, count_include_pad, g.dtype)
    return _fold_cells([share] * (kernel[0] * kernel[1]), input_shape, kernel, stride, padding)


def _max_pool2d_vjp(b, g, x, *, out, **window):
    return (b.max_pool2d_grad(x, g, **window),)


def _max_pool2d_grad_vjp(b, ct, x, g, *, out, **window):
    # The cotangent of g is ct gathered at each window's argmax: no primitive expresses that
    # gather, and returning None would silently drop the term, so refuse clearly instead.
    raise GraphcError("max_pool2d_grad: second-order gradients through max_pool2d are not "
                      "supported" + (f" (max_pool2d used at {out.producer.loc})"
                                     if out.producer is not None and out.producer.loc else ""))


def _avg_pool2d_vjp(b, g, x, *, out, **window):
    return (b.avg_pool2d_grad(g, input_shape=x.shape, **window),)


def _avg_pool2d_grad_vjp(b, ct, g, *, out, input_shape, **window):
    return (b.avg_pool2d(ct, **window),)  # avg_pool2d_grad is the adjoint of avg_pool2d


_POOL_ATTRS = {"kernel": Attr("ints"), "stride": Attr("ints"), "padding": Attr("ints", (0, 0))}
_AVG_ATTRS = {**_POOL_ATTRS, "count_include_pad": Attr("bool", True)}

register(Primitive(
    "max_pool2d", OPAQUE, _pool_type, _max_pool2d, _max_pool2d_vjp, attrs=dict(_POOL_ATTRS),
    canon=_pool_canon, num_inputs=1, doc="Max over each NCHW window; padding counts as -inf."))
register(Primitive(
    "max_pool2d_grad", OPAQUE, _max_pool2d_grad_type, _max_pool2d_grad, _max_pool2d_grad_vjp,
    attrs=dict(_POOL_ATTRS), canon=_pool_canon, num_inputs=2,
    doc="max_pool2d's VJP: (x, g) -> dx; each window's g goes to its first maximum."))
register(Primitive(
    "avg_pool2d", OPAQUE, _pool_type, _avg_pool2d, _avg_pool2d_vjp, attrs=dict(_AVG_ATTRS),
    canon=_pool_canon, num_inputs=1, doc="Mean over each NCHW window, zero padding."))
register(Primitive(
    "avg_pool2d_grad", OPAQUE, _avg_pool2d_grad_type, _avg_pool2d_grad, _avg_pool2d_grad_vjp,
    attrs={"input_shape": Attr("ints"), **_AVG_ATTRS}, canon=_pool_canon, num_inputs=1,
    doc="avg_pool2d's VJP (its adjoint): g -> dx."))
