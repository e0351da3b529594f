"""Elementwise primitives: unary math, binary arithmetic with NumPy broadcasting, comparisons,
where, cast, and constants.

Each entry gives: the shape/dtype rule, the NumPy oracle, the VJP in IR ops and the scalar
expression that code generators place inside their loops (operands arrive as local names).
"""
from __future__ import annotations

import numpy as np

from ..registry import ELEMENTWISE, SOURCE, Attr, OpTypeError, Primitive, register
from ..types import TensorType, broadcast_shapes, is_float


# -- shape/dtype rules -----------------------------------------------------------------------
def _float_unary(x: TensorType) -> TensorType:
    if not is_float(x.dtype):
        raise OpTypeError(f"expects a floating-point operand, got {x.dtype}", dtype=True)
    return x


def _numeric_unary(x: TensorType) -> TensorType:
    if x.dtype == "bool":
        raise OpTypeError("expects a numeric operand, got bool", dtype=True)
    return x


def _broadcast(*types: TensorType) -> tuple[int, ...]:
    try:
        return broadcast_shapes(*(t.shape for t in types))
    except ValueError:
        raise OpTypeError("shapes " + " and ".join(str(t.shape) for t in types)
                          + " do not broadcast") from None


def _same_dtype(x: TensorType, y: TensorType) -> str:
    if x.dtype != y.dtype:
        raise OpTypeError(f"dtype mismatch {x.dtype} vs {y.dtype}; cast one operand first", dtype=True)
    return x.dtype


def _arith(x: TensorType, y: TensorType) -> TensorType:
    dtype = _same_dtype(x, y)
    if dtype == "bool":
        raise OpTypeError("expects numeric operands, got bool", dtype=True)
    return TensorType(_broadcast(x, y), dtype)


def _float_binary(x: TensorType, y: TensorType) -> TensorType:
    out = _arith(x, y)
    if not is_float(out.dtype):
        raise OpTypeError(f"expects floating-point operands, got {out.dtype}", dtype=True)
    return out


def _compare(x: TensorType, y: TensorType) -> TensorType:
    _same_dtype(x, y)
    return TensorType(_broadcast(x, y), "bool")


def _bool_unary(x: TensorType) -> TensorType:
    if x.dtype != "bool":
        raise OpTypeError(f"expects a bool operand, got {x.dtype}", dtype=True)
    return x


def _logical(x: TensorType, y: TensorType) -> TensorType:
    out = _compare(x, y)
    if x.dtype != "bool":
        raise OpTypeError(f"expects bool operands, got {x.dtype}", dtype=True)
    return out


def _where(c: TensorType, x: TensorType, y: TensorType) -> TensorType:
    if c.dtype != "bool":
        raise OpTypeError(f"condition must be bool, got {c.dtype}", dtype=True)
    return TensorType(_broadcast(c, x, y), _same_dtype(x, y))


# -- registration helpers ---------------------------------------------------------------------
def _grad_if_float(x, g):
    return g if is_float(x.dtype) else None


# recompute_cost: 1 for arithmetic, comparisons and selection (a vectorised instruction or two);
# the registry's default for the others.
ARITHMETIC = 1


def unary(name, impl, vjp, scalar, infer=_float_unary, doc="", **fields):
    register(Primitive(name, ELEMENTWISE, infer, impl, vjp, scalar=scalar, num_inputs=1, doc=doc, **fields))


def binary(name, impl, vjp, scalar, infer=_arith, doc="", **fields):
    register(Primitive(name, ELEMENTWISE, infer, impl, vjp, scalar=scalar, num_inputs=2, doc=doc, **fields))


def _quiet(fn):
    """NumPy oracle without floating-point warnings (log(0) is -inf, as in every backend)."""
    def run(*args, **kwargs):
        with np.errstate(all="ignore"):
            return np.asarray(fn(*args, **kwargs))
    run.__name__ = getattr(fn, "__name__", "impl")
    return run


def _selected(b, cond, g):
    """g where `cond`, else 0: a selection, not a product with a 0/1 mask, so that an infinite
    cotangent where the op passes none gives 0, not 0 * inf = NaN (sqrt(relu(x)) at x < 0), as
    in PyTorch."""
    return b.where(cond, g, b.scalar_like(0, g))


# -- unary --------------------------------------------------------------------------------------
unary("neg", _quiet(np.negative), lambda b, g, x, *, out: (b.neg(g),),
      lambda x: f"(-{x})", infer=_numeric_unary, recompute_cost=ARITHMETIC)
unary("exp", _quiet(np.exp), lambda b, g, x, *, out: (b.mul(g, out),), lambda x: f"np.exp({x})")
unary("log", _quiet(np.log), lambda b, g, x, *, out: (b.div(g, x),), lambda x: f"np.log({x})")
unary("log1p", _quiet(np.log1p),
      lambda b, g, x, *, out: (b.div(g, b.add(x, b.scalar_like(1, x))),), lambda x: f"np.log1p({x})")
unary("sqrt", _quiet(np.sqrt),
      lambda b, g, x, *, out: (b.div(b.mul(g, b.scalar_like(0.5, x)), out),), lambda x: f"np.sqrt({x})")
unary("rsqrt", _quiet(lambda x: 1 / np.sqrt(x)),
      lambda b, g, x, *, out: (b.mul(b.mul(g, b.scalar_like(-0.5, x)), b.div(out, x)),),
      lambda x: f"(1 / np.sqrt({x}))")
unary("tanh", _quiet(np.tanh),
      lambda b, g, x, *, out: (b.mul(g, b.sub(b.scalar_like(1, x), b.square(out))),),
      lambda x: f"np.tanh({x})")
# expm1's derivative is exp(x), not out + 1: that sum keeps no digit of exp(x) below epsilon
# (ELU's gradient at -17 in float32 was 44% off)
unary("expm1", _quiet(np.expm1), lambda b, g, x, *, out: (b.mul(g, b.exp(x)),), lambda x: f"np.expm1({x})")
# Rounding: piecewise constant, so no gradient reaches x (PyTorch's is 0 too); round is NumPy's
# and PyTorch's, to the nearest even integer at halves.
for _name, _fn in (("floor", np.floor), ("ceil", np.ceil), ("trunc", np.trunc), ("round", np.rint)):
    unary(_name, _quiet(_fn), lambda b, g, x, *, out: (None,), lambda x, _f=_fn.__name__: f"np.{_f}({x})",
          recompute_cost=ARITHMETIC)
unary("sin", _quiet(np.sin), lambda b, g, x, *, out: (b.mul(g, b.cos(x)),), lambda x: f"np.sin({x})")
unary("cos", _quiet(np.cos), lambda b, g, x, *, out: (b.neg(b.mul(g, b.sin(x))),),
      lambda x: f"np.cos({x})")


def _erf(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf  # NumPy has no erf; scipy is a dependency (BLAS in njit)
    return erf(x).astype(x.dtype, copy=False)


def _erf_vjp(b, g, x, *, out):
    """d/dx erf(x) = 2/sqrt(pi) exp(-x^2)."""
    slope = b.mul(b.exp(b.neg(b.square(x))), b.scalar_like(2 / np.sqrt(np.pi), x))
    return (b.mul(g, slope),)


# The code generators import `math` for it (NumPy has no erf; Numba compiles math.erf for the
# CPU and for CUDA): see the "erf" rule in backends/kernels/pointwise.py.
unary("erf", _quiet(_erf), _erf_vjp, lambda x: f"math.erf({x})")
unary("sigmoid", _quiet(lambda x: np.asarray(1 / (1 + np.exp(-x)), dtype=x.dtype)),
      lambda b, g, x, *, out: (b.mul(b.mul(g, out), b.sub(b.scalar_like(1, x), out)),),
      lambda x: f"(1 / (1 + np.exp(-{x})))")
# relu(x) = x where not x <= 0: propagates NaN, as PyTorch does. The gradient is 0 where the
# output is <= 0 (exactly where x <= 0), so a NaN passes its cotangent on, as PyTorch's (a NaN
# masked out later); it reads the output, which the backward pass keeps anyway as the next
# layer's input: no mask is stored between the passes.
unary("relu", _quiet(lambda x: np.where(x <= 0, np.zeros((), x.dtype), x)),
      lambda b, g, x, *, out: (b.where(b.le(out, b.scalar_like(0, x)), b.scalar_like(0, g), g),),
      lambda x: f"(0 if {x} <= 0 else {x})", infer=_numeric_unary, recompute_cost=ARITHMETIC)
unary("abs", _quiet(np.abs), lambda b, g, x, *, out: (_grad_if_float(x, b.mul(g, b.sign(x))),),
      lambda x: f"abs({x})", infer=_numeric_unary, recompute_cost=ARITHMETIC)
unary("sign", _quiet(np.sign), lambda b, g, x, *, out: (None,), lambda x: f"np.sign({x})",
      infer=_numeric_unary, recompute_cost=ARITHMETIC)
unary("square", _quiet(np.square),
      lambda b, g, x, *, out: (_grad_if_float(x, b.mul(g, b.mul(x, b.scalar_like(2, x)))),),
      lambda x: f"({x} * {x})", infer=_numeric_unary, recompute_cost=ARITHMETIC)
unary("reciprocal", _quiet(np.reciprocal),
      lambda b, g, x, *, out: (b.neg(b.mul(g, b.square(out))),), lambda x: f"(1 / {x})")
# Identity forward, zero cotangent: marks values that gradients must not flow through.
unary("stop_gradient", _quiet(np.copy), lambda b, g, x, *, out: (None,), lambda x: x,
      infer=lambda x: x, recompute_cost=ARITHMETIC)
unary("logical_not", _quiet(np.logical_not), lambda b, g, x, *, out: (None,),
      lambda x: f"(not {x})", infer=_bool_unary, recompute_cost=ARITHMETIC)


def _cast_vjp(b, g, x, *, out, dtype):
    if is_float(x.dtype) and is_float(dtype):
        return (b.cast(g, dtype=x.dtype),)
    return (None,)


register(Primitive(
    "cast", ELEMENTWISE, lambda x, *, dtype: x.with_dtype(dtype),
    _quiet(lambda x, *, dtype: x.astype(dtype)), _cast_vjp,
    attrs={"dtype": Attr("dtype")}, num_inputs=1,
    scalar=lambda x, *, dtype: f"np.{'bool_' if dtype == 'bool' else dtype}({x})",
    recompute_cost=ARITHMETIC))


# -- binary ---------------------------------------------------------------------------------
def _add_vjp(b, g, x, y, *, out):
    return b.unbroadcast(g, x.shape), b.unbroadcast(g, y.shape)


def _sub_vjp(b, g, x, y, *, out):
    return b.unbroadcast(g, x.shape), b.unbroadcast(b.neg(g), y.shape)


def _mul_vjp(b, g, x, y, *, out):
    return b.unbroadcast(b.mul(g, y), x.shape), b.unbroadcast(b.mul(g, x), y.shape)


def _div_vjp(b, g, x, y, *, out):
    gx = b.div(g, y)
    return b.unbroadcast(gx, x.shape), b.unbroadcast(b.neg(b.mul(gx, out)), y.shape)


def _nonzero_constant(v) -> bool:
    node = v.producer
    return node is not None and node.op == "constant" and bool(np.all(node.attrs["value"] != 0))


def _pow_vjp(b, g, x, y, *, out):
    one = b.scalar_like(1, y)
    exponent = b.sub(y, one)
    if _nonzero_constant(y):
        dx = b.mul(y, b.pow(x, exponent))
    else:
        # d/dx x**0 is 0, at x = 0 too, where y * x**(y-1) is 0 * inf (JAX's rule), so the
        # second derivative of x**1 is finite at 0; and the power it selects away takes exponent
        # 1 there, so that its own derivative (the second of x**0) is not 0 * inf either.
        zero_power = b.eq(y, b.scalar_like(0, y))
        dx = b.mul(y, b.pow(x, b.where(zero_power, one, exponent)))
        dx = b.where(zero_power, b.scalar_like(0, dx), dx)
    gx = b.mul(g, dx)
    zero = b.scalar_like(0, x)
    positive = b.gt(x, zero)
    # d/dy x**y = x**y * log(x); taken as 0 where x <= 0 (the real derivative is undefined there)
    safe_log = b.where(positive, b.log(b.where(positive, x, one)), zero)
    gy = b.mul(g, b.mul(out, safe_log))
    return b.unbroadcast(gx, x.shape), b.unbroadcast(gy, y.shape)


def _select_vjp(pick_x_op):
    def vjp(b, g, x, y, *, out):
        take_x = b.bind(pick_x_op, x, y)
        gx = _selected(b, take_x, g)
        gy = _selected(b, b.logical_not(take_x), g)
        return b.unbroadcast(gx, x.shape), b.unbroadcast(gy, y.shape)
    return vjp


# What a tensor becomes once a write into its detach()ed view gave that view the value `new`:
# the written values, with the tensor's gradient passing straight through to what it was, as
# PyTorch's autograd, which does not see a write into a detached view (y.detach()[0] = 5 kept
# the gradient of every element of y, where taking the view's value cut them all).
binary("detached_write", _quiet(lambda new, base: np.broadcast_to(new, np.broadcast(new, base).shape).copy()),
       lambda b, g, new, base, *, out: (None, b.unbroadcast(g, base.shape)),
       lambda new, base: new, recompute_cost=ARITHMETIC)
binary("add", _quiet(np.add), _add_vjp, lambda x, y: f"({x} + {y})", recompute_cost=ARITHMETIC)
binary("sub", _quiet(np.subtract), _sub_vjp, lambda x, y: f"({x} - {y})", recompute_cost=ARITHMETIC)
binary("mul", _quiet(np.multiply), _mul_vjp, lambda x, y: f"({x} * {y})", recompute_cost=ARITHMETIC)
binary("div", _quiet(np.true_divide), _div_vjp, lambda x, y: f"({x} / {y})", infer=_float_binary)
binary("pow", _quiet(np.power), _pow_vjp, lambda x, y: f"({x} ** {y})", infer=_float_binary)


def _remainder_vjp(b, g, x, y, *, out):
    """x - y * floor(x / y): 1 for x, -floor(x / y) for y (piecewise; floats only)."""
    if not is_float(x.dtype):
        return (None, None)
    return (b.unbroadcast(g, x.shape),
            b.unbroadcast(b.neg(b.mul(g, b.floor_divide(x, y))), y.shape))


# Python's, NumPy's and PyTorch's floor division and remainder (the remainder takes the divisor's
# sign); Numba compiles Python's operators with those semantics on the CPU and on CUDA. An integer
# divided by 0 gives 0, as in NumPy (PyTorch raises).
binary("floor_divide", _quiet(np.floor_divide), lambda b, g, x, y, *, out: (None, None),
       lambda x, y: f"({x} // {y})", recompute_cost=ARITHMETIC)
binary("remainder", _quiet(np.remainder), _remainder_vjp, lambda x, y: f"({x} % {y})",
       recompute_cost=ARITHMETIC)


def _fmod_vjp(b, g, x, y, *, out):
    """x - y * trunc(x / y): 1 for x, -trunc(x / y) for y (PyTorch's rule)."""
    return (b.unbroadcast(g, x.shape),
            b.unbroadcast(b.neg(b.mul(g, b.trunc(b.div(x, y)))), y.shape))


# C's fmod (PyTorch's torch.fmod): the remainder of the quotient truncated toward zero, with the
# dividend's sign. Floats only: Numba's np.fmod of integers takes the divisor's sign (np.fmod(-7,
# 2) is 1 there, -1 in NumPy); graphc.fmod builds the integer one from remainder.
binary("fmod", _quiet(np.fmod), _fmod_vjp, lambda x, y: f"np.fmod({x}, {y})", infer=_float_binary,
       recompute_cost=ARITHMETIC)
def _tie_splitting_vjp(x_loses, y_loses):
    """PyTorch's rule for maximum and minimum: the operand that is not beaten (`x_loses`(x, y)
    false for x) gets the cotangent, each half of it on a tie."""
    def vjp(b, g, x, y, *, out):
        if not is_float(g.dtype):
            return (None, None)
        share = b.where(b.eq(x, y), b.mul(g, b.scalar_like(0.5, g)), g)
        nothing = b.scalar_like(0, g)
        gx = b.where(b.bind(x_loses, x, y), nothing, share)
        gy = b.where(b.bind(y_loses, x, y), nothing, share)
        return b.unbroadcast(gx, x.shape), b.unbroadcast(gy, y.shape)
    return vjp


# Their scalar is NumPy's, which returns a NaN from either operand: Python's max/min drop a NaN
# in the second operand (max(1.0, nan) == 1.0, max(nan, 1.0) is nan). clamp has its own
# gradient rule (graphc/functions.py).
binary("maximum", _quiet(np.maximum), _tie_splitting_vjp("lt", "gt"), lambda x, y: f"np.maximum({x}, {y})",
       recompute_cost=ARITHMETIC)
binary("minimum", _quiet(np.minimum), _tie_splitting_vjp("gt", "lt"), lambda x, y: f"np.minimum({x}, {y})",
       recompute_cost=ARITHMETIC)

for _name, _fn, _sym in [("eq", np.equal, "=="), ("ne", np.not_equal, "!="), ("lt", np.less, "<"),
                         ("le", np.less_equal, "<="), ("gt", np.greater, ">"),
                         ("ge", np.greater_equal, ">=")]:
    binary(_name, _quiet(_fn), lambda b, g, x, y, *, out: (None, None),
           (lambda s: lambda x, y: f"({x} {s} {y})")(_sym), infer=_compare,
           recompute_cost=ARITHMETIC)

for _name, _fn, _sym in [("logical_and", np.logical_and, "and"), ("logical_or", np.logical_or, "or")]:
    binary(_name, _quiet(_fn), lambda b, g, x, y, *, out: (None, None),
           (lambda s: lambda x, y: f"({x} {s} {y})")(_sym), infer=_logical,
           recompute_cost=ARITHMETIC)


def _where_vjp(b, g, c, x, y, *, out):
    zero = b.scalar_like(0, g)
    return (None, b.unbroadcast(b.where(c, g, zero), x.shape),
            b.unbroadcast(b.where(c, zero, g), y.shape))


register(Primitive("where", ELEMENTWISE, _where, _quiet(np.where), _where_vjp, num_inputs=3,
                   scalar=lambda c, x, y: f"({x} if {c} else {y})", recompute_cost=ARITHMETIC))


# -- constants ----------------------------------------------------------------------------
register(Primitive(
    "constant", SOURCE, lambda *, value: TensorType(value.shape, value.dtype.name),
    lambda *, value: value.copy(), lambda b, g, *, out, value: (),
    attrs={"value": Attr("array")}, num_inputs=0))
