"""Normalisation statistics: `moments`, the mean and the biased variance over some axes in one
pass over the operand.

Batch norm and layer norm need both statistics of the same elements. As two reductions, the
variance's `mean((x - mean)^2)` reads the operand a second time after the mean, and its VJP
carries the dependence of the variance on the mean, a third full-size reduction that sums to
zero. `moments` reads the operand once (the Numba backends accumulate x - x0 and its square
in float64, x0 the line's first element, so the variance does not lose the digits E[x^2] and
E[x]^2 share), and its VJP is elementwise: d/dx of the variance is 2 (x - mean) / n exactly,
because the variance does not change when the mean moves.

The output stacks the two statistics on a new leading axis, each in the keepdims shape:
`moments(x (N, C, H, W), axes=(0, 2, 3))` is (2, 1, C, 1, 1). The kept axes are one run of
consecutive axes (a channel axis, or the leading rows), so the backends view the operand as
(before, kept, after) and reduce the outer two.

`normalize` and `normalize_grad` are the normalisation of layer norm and batch norm,
(x - mean) / sqrt(var + epsilon) over the same axes as `moments`, and its VJP, one kernel each:
lines are independent, and a line (a row of layer norm's, a channel of batch norm's) stays in
cache while a kernel takes its statistics and then writes it. The affine `* weight + bias`
stays outside as elementwise ops that fuse into the kernel's epilogue, so the weight's and the
bias's gradients are the usual sums. As `moments` plus elementwise ops and reductions, layer
norm took five kernels forward and six backward.
"""
from __future__ import annotations

import numpy as np

from ..registry import OPAQUE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, is_float
from .shape import normalize_axes, reduced_shape, require_canonical


def _check_axes(x: TensorType, axes: tuple[int, ...]) -> None:
    """Statistics over `axes` of x: float, some axes, each of them non-empty, and the axes kept
    one run of consecutive axes."""
    if not is_float(x.dtype):
        raise OpTypeError(f"expects a floating-point operand, got {x.dtype}; cast it first", dtype=True)
    require_canonical("axes", axes, normalize_axes(axes, x.ndim))
    if not axes:
        raise OpTypeError("needs at least one axis to take the statistics over")
    kept = [a for a in range(x.ndim) if a not in axes]
    if kept and kept != list(range(kept[0], kept[-1] + 1)):
        raise OpTypeError(f"the axes kept, {tuple(kept)}, must be consecutive (reducing {axes} of "
                          f"shape {x.shape}); transpose the operand first")
    for axis in axes:
        if x.shape[axis] == 0:
            raise OpTypeError(f"cannot take the mean over axis {axis} of size 0 (shape {x.shape})")


def _moments_type(x: TensorType, *, axes: tuple[int, ...]) -> TensorType:
    _check_axes(x, axes)
    return x.with_shape((2,) + reduced_shape(x.shape, axes, keepdims=True))


def _axes_canon(types, attrs):
    (x,) = types
    return {**attrs, "axes": normalize_axes(attrs["axes"], x.ndim)}


def lines_view(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, int, int]:
    """The operand of `moments`, `normalize` and `normalize_grad` as (before, kept, after): the
    statistics are over axes 0 and 2."""
    kept = [a for a in range(len(shape)) if a not in axes]
    start, stop = (kept[0], kept[-1] + 1) if kept else (len(shape), len(shape))
    size = lambda dims: int(np.prod(dims, dtype=np.int64))
    return size(shape[:start]), size(shape[start:stop]), size(shape[stop:])


def _moments(x: np.ndarray, *, axes: tuple[int, ...]) -> np.ndarray:
    """Two passes in float64: the oracle the one-pass kernels are tested against."""
    mean = x.mean(axis=axes, keepdims=True, dtype=np.float64)
    var = np.square(x - mean).mean(axis=axes, keepdims=True)
    return np.stack([mean, var]).astype(x.dtype)


def statistic(b, stats, which: int):
    """The mean (which=0) or the variance (1) out of a `moments` output, in the keepdims shape."""
    shape = stats.shape
    starts = (which,) + (0,) * (len(shape) - 1)
    part = b.slice(stats, starts=starts, stops=(which + 1,) + shape[1:], steps=(1,) * len(shape))
    return b.reshape(part, shape=shape[1:])


def _moments_vjp(b, g, x, *, out, axes):
    """d mean / dx = 1/n and d var / dx = 2 (x - mean) / n, each element alike."""
    n = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    centred = b.sub(x, statistic(b, out, 0))
    g_var = b.mul(statistic(b, g, 1), b.scalar_like(2.0 / n, x))
    g_mean = b.mul(statistic(b, g, 0), b.scalar_like(1.0 / n, x))
    return (b.add(b.mul(centred, g_var), g_mean),)


register(Primitive(
    "moments", OPAQUE, _moments_type, _moments, _moments_vjp, attrs={"axes": Attr("ints")},
    canon=_axes_canon, num_inputs=1,
    doc="Mean and biased variance over `axes` in one pass, stacked: (2,) + the keepdims shape; "
        "the axes kept must be consecutive."))



# -- normalize, normalize_grad -----------------------------------------------------------------
def _normalize_type(x: TensorType, *, axes: tuple[int, ...], epsilon: float) -> TensorType:
    _check_axes(x, axes)
    return x


def _normalize_grad_type(g: TensorType, x: TensorType, *, axes: tuple[int, ...],
                         epsilon: float) -> TensorType:
    _check_axes(x, axes)
    if g != x:
        raise OpTypeError(f"the cotangent {g} must have the operand's type {x}")
    return x


def _statistics(x: np.ndarray, axes: tuple[int, ...],
                epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """float64 x - mean and 1 / sqrt(var + epsilon), two passes: the oracle the kernels meet."""
    centred = x - x.mean(axis=axes, keepdims=True, dtype=np.float64)
    return centred, 1 / np.sqrt(np.square(centred).mean(axis=axes, keepdims=True) + epsilon)


def _normalize(x: np.ndarray, *, axes: tuple[int, ...], epsilon: float) -> np.ndarray:
    centred, rstd = _statistics(x, axes, epsilon)
    return (centred * rstd).astype(x.dtype)


def _normalize_grad(g: np.ndarray, x: np.ndarray, *, axes: tuple[int, ...],
                    epsilon: float) -> np.ndarray:
    centred, rstd = _statistics(x, axes, epsilon)
    normalised, g = centred * rstd, g.astype(np.float64)
    mean = lambda v: v.mean(axis=axes, keepdims=True)
    return (rstd * (g - mean(g) - normalised * mean(g * normalised))).astype(x.dtype)


def _normalize_vjp(b, g, x, *, out, axes, epsilon):
    return (b.normalize_grad(g, x, axes=axes, epsilon=epsilon),)


def _normalize_grad_vjp(b, c, g, x, *, out, axes, epsilon):
    """With rstd = 1 / sqrt(var + epsilon), xhat = normalize(x) and n the elements per line,
    out = rstd (g - mean(g) - xhat mean(g xhat)), linear in g through a symmetric Jacobian, so
    d/dg is normalize_grad(c, x). Through x, <c, out> depends on xhat, whose own VJP is
    normalize_grad again, and on rstd, with d rstd / dx = -rstd^2 xhat / n:
    d/dx = normalize_grad(-rstd (c <g, xhat> + g <c, xhat>) / n, x) - <c, out> rstd xhat / n,
    the inner products over each line."""
    n = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
    normalised = b.normalize(x, axes=axes, epsilon=epsilon)
    variance = statistic(b, b.moments(x, axes=axes), 1)
    rstd = b.rsqrt(b.add(variance, b.scalar_like(epsilon, x)))
    scale = b.mul(rstd, b.scalar_like(-1.0 / n, x))  # -rstd / n per line
    line_dot = lambda u, v: b.sum(b.mul(u, v), axes=axes, keepdims=True)
    through_normalised = b.mul(scale, b.add(b.mul(c, line_dot(g, normalised)),
                                            b.mul(g, line_dot(c, normalised))))
    through_rstd = b.mul(b.mul(scale, line_dot(c, out)), normalised)
    return (b.normalize_grad(c, x, axes=axes, epsilon=epsilon),
            b.add(b.normalize_grad(through_normalised, x, axes=axes, epsilon=epsilon), through_rstd))


def _last_operand_axes_canon(types, attrs):
    return {**attrs, "axes": normalize_axes(attrs["axes"], types[-1].ndim)}


_NORMALIZE_ATTRS = {"axes": Attr("ints"), "epsilon": Attr("float")}

register(Primitive(
    "normalize", OPAQUE, _normalize_type, _normalize, _normalize_vjp, attrs=_NORMALIZE_ATTRS,
    canon=_last_operand_axes_canon, num_inputs=1,
    doc="(x - mean) / sqrt(var + epsilon), the mean and the biased variance over `axes` (the "
        "axes kept consecutive): layer norm and batch norm without their affine part."))

register(Primitive(
    "normalize_grad", OPAQUE, _normalize_grad_type, _normalize_grad, _normalize_grad_vjp,
    attrs=_NORMALIZE_ATTRS, canon=_last_operand_axes_canon, num_inputs=2,
    doc="The VJP of normalize for cotangent g at x: rstd (g - mean(g) - xhat mean(g xhat)) per "
        "line, recomputing the line's statistics."))
