"""The pointwise expression engine both Numba backends share.

A pointwise member is evaluated at one index of its output: `PointwiseEmitter.emit` writes
``tK = <expr>`` for it, where the op's rule (its lowering in ir/lowering.py's registry; for
elementwise ops the kind default, which composes the registry's `scalar` expression) reads its
operands at the indices it needs: values computed in the kernel are locals (fusion only lets a
member read them at its own index), kernel inputs are loads at a computed index, scalar
constants are literals declared once before the loops, or parameters of the kernel
(`KernelTarget.scalar_arguments`).

The rules are the same for every target (both backends generate Python for Numba, so both
evaluate exactly the same expressions); what differs is given by a `KernelTarget`.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, TypeVar

import numpy as np

from graphc.ir import Graph, Node, Value
from graphc.ir.kernels import is_literal
from graphc.ir.lowering import lowering_for, register_kind_default, register_lowering
from graphc.ir.ops.random import rng_source
from graphc.ir.registry import ELEMENTWISE, get

from .arrays import INPUT, OUTPUT, KernelArray
from .source import Writer, cast, index_text, literal

Index = tuple[str, ...]
F = TypeVar("F", bound=Callable)
RANDOM_OPS = ("random_uniform", "random_bernoulli")


@dataclass(frozen=True)
class KernelTarget:
    """What the shared emitters need to know about the backend they write for: its name in the
    lowering registry (whose rules `emit` applies) and the decorator of a helper function the
    kernel calls (``njit(...)``, ``cuda.jit(device=True)``)."""

    name: str
    helper_decorator: str
    scalar_arguments: bool = False  # kernels take offsets and float constants as parameters

    @cached_property
    def rng_helpers(self) -> str:
        """The random generator's functions, as helpers of the kernel that calls them."""
        return rng_source(self.helper_decorator)


@dataclass(frozen=True)
class Domain:
    """Where members are being evaluated: the index variables and the extents they run over."""

    index: Index
    dims: tuple[str, ...]
    flat: bool = False

    def flat_index(self) -> str:
        """C-order position of `index` within `dims` (the random generator's element number)."""
        if self.flat:
            return self.index[0]
        text = "0"
        for i, n in zip(self.index, self.dims):
            text = i if text == "0" else f"({text}) * {n} + {i}"
        return text


class PointwiseEmitter:
    """Turns pointwise subgraph nodes into statements; shared by every kernel generator."""

    def __init__(self, sub: Graph, arrays: dict[Value, str], target: KernelTarget, flat: bool = False,
                 views: dict[Value, tuple[int, ...]] | None = None) -> None:
        self.sub = sub
        self.target = target            # whose registered pointwise rules `emit` applies
        self.arrays = arrays            # kernel inputs/outputs -> their names in the source
        self.flat = flat
        self.views = views or {}        # arrays (and members) passed and indexed reshaped
        self.literals: dict[Value, str] = {}
        self.locals: dict[Value, str] = {}
        self.prelude = Writer()         # statements before the loops
        self.helpers: list[str] = []
        self.hoisted: dict[str, str] = {}  # load expression -> local holding it
        self.arguments: dict[str, int | np.floating] = {}  # scalar parameter -> the value to pass
        self._counters: dict[str, int] = {}
        for node in sub.nodes:
            if is_literal(node):
                self.literals[node.output] = self._constant(node)

    def fresh(self, prefix: str) -> str:
        count = self._counters.get(prefix, 0)
        self._counters[prefix] = count + 1
        return f"{prefix}{count}"

    def _constant(self, node: Node) -> str:
        """A one-element constant's name in the kernel. A float one is a parameter where the
        target passes scalars: a mean's 1/B and BatchNorm's n/(n-1) change with the batch size,
        and a step called at another batch size reuses the fused graph with new values
        (passes/rebatch.py); the kernel's text, the cache key, stays the same, so nothing
        compiles again. Others (ints, bools, or on other targets) are literals before the loops."""
        name = self.fresh("c")
        value, dtype = node.attrs["value"].reshape(())[()], node.output.dtype
        if self.target.scalar_arguments and np.issubdtype(np.dtype(dtype), np.floating):
            self.arguments[name] = np.dtype(dtype).type(value)
        else:
            self.prelude.line(f"{name} = {literal(value, dtype)}")
        return name

    def integer_argument(self, value: int) -> str:
        """`value`, an offset into an array, as a parameter of the kernel where its target passes
        scalars (`arguments`: the generator appends them to the kernel's parameters and
        arguments), else as a literal. Kernels then differ in fewer constants of their text, the
        cache key: one compiled slice serves each of an unrolled LSTM's 28 time steps.

        The parameter is read as `max(s, 0)` where it is used: Numba wraps negative indices
        around (`i < 0 ? i + n : i`), and with an offset of unknown sign that select stays in
        the loop, each lane's address is its own and LLVM gathers instead of loading a vector
        (the LSTM's fused gate kernel, four slices: 36 -> 50 us). Knowing the offset is not
        negative, LLVM drops the wrap. The clamp must sit in the loop's own function, not before
        it: a parallel loop is outlined and gets the clamped value as an argument of unknown sign
        again. LLVM hoists it out of the loop. (A slice's canonical start is negative only where
        it selects nothing: -1 with a negative step; its loop never runs.)"""
        if not self.target.scalar_arguments:
            return str(value)
        name = self.fresh("s")
        self.arguments[name] = value
        return f"max({name}, 0)"

    def require_helper(self, source: str) -> None:
        if source not in self.helpers:
            self.helpers.append(source)

    # -- reading operands ----------------------------------------------------------------------
    def load(self, value: Value, index: Index) -> str:
        if value in self.literals:
            return self.literals[value]
        if value in self.locals:
            return self.locals[value]
        if self.flat and value.type.size == 1:
            index = ("0",)  # a one-element array, passed flattened
        load = f"{self.arrays[value]}[{index_text(index)}]"
        if all(part.isdigit() for part in index):
            # A fixed element (a scalar operand, a random key): read once, before the loops.
            # (Numba's parallel loops cannot index a 0-d array with () either.)
            if load not in self.hoisted:
                self.hoisted[load] = name = self.fresh("h")
                self.prelude.line(f"{name} = {load}")
            return self.hoisted[load]
        return load

    def operand(self, node: Node, position: int, index: Index) -> str:
        return self.load(node.inputs[position], index)

    def extent(self, value: Value, axis: int) -> str:
        """Run-time length of `value` along `axis` (static for literals and locals)."""
        if value in self.arrays and not self.flat:
            return f"{self.arrays[value]}.shape[{axis}]"
        return str(value.shape[axis])

    def broadcast_operand(self, node: Node, position: int, index: Index) -> str:
        """Operand `position` of `node` read at output `index`, NumPy broadcasting applied."""
        value = node.inputs[position]
        if self.flat:
            return self.load(value, index if value.shape == node.output.shape else ("0",))
        shape, out = (self.views.get(v, v.shape) for v in (value, node.output))
        return self.load(value, broadcast_index(index, shape, out))

    # -- writing members -------------------------------------------------------------------------
    def emit(self, w: Writer, node: Node, domain: Domain) -> str:
        """Write `tK = <node's value at domain.index>` and return the local's name."""
        rule = lowering_for(self.target.name, node.op)
        expr = cast(rule(self, node, domain), node.output.dtype)
        name = self.fresh("t")
        w.line(f"{name} = {expr}  # {node.op}")
        self.locals[node.output] = name
        return name


def broadcast_index(index: Index, shape: tuple[int, ...], out_shape: tuple[int, ...]) -> Index:
    """Index into an operand of `shape` broadcast to `out_shape` (trailing dims aligned)."""
    lead = len(out_shape) - len(shape)
    return tuple("0" if d == 1 and out_shape[lead + j] != 1 else index[lead + j]
                 for j, d in enumerate(shape))


def _affine(i: str, start: int | str, step: int) -> str:
    text = i if step == 1 else f"{i} * {step}"
    return text if start == 0 else f"{text} + {start}"


# -- rules: op -> expression of its value at an output index ------------------------------------
# Registered under a target by `register_pointwise_lowerings`, not here: each backend that
# uses this emitter names itself in the registry.
_RULES: dict[str, Callable[[PointwiseEmitter, Node, Domain], str]] = {}


def _rule(*ops: str) -> Callable[[F], F]:
    def record(fn: F) -> F:
        _RULES.update(dict.fromkeys(ops, fn))
        return fn
    return record


def _elementwise_rule(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    scalar = get(node.op).scalar
    operands = [e.broadcast_operand(node, k, domain.index) for k in range(len(node.inputs))]
    return scalar(*operands, **node.attrs)


# On the CPU, LLVM vectorises a loop only if every call in it has a vector version, and Numba's
# llvmlite has no vector math library (no SVML: `numba -s` reports "SVML Operational: False"),
# so one libm expf/tanhf call keeps a whole fused loop scalar: a GELU epilogue ran ~27x slower
# than the polynomials below, which are plain arithmetic and vectorise. (CUDA's expf and tanhf
# are fast; float64 keeps libm, whose accuracy a float32 polynomial cannot give.)
SCALAR_LIBM_TARGETS = frozenset({"numba-cpu"})


def _exp_reduction(x: str, p: str) -> str:
    """Lines giving n and r with x = n ln 2 + r (Cody-Waite: ln 2 in two parts), then the
    Cephes expf polynomial `p` with e**r = p r**2 + r + 1."""
    lines = [f"n = np.float32(np.floor({x} * np.float32(1.44269504088896341) + np.float32(0.5)))",
             f"r = ({x} - n * np.float32(0.693359375)) - n * np.float32(-2.12194440e-4)",
             f"{p} = np.float32(1.9875691500e-4)"]
    lines += [f"{p} = {p} * r + np.float32({c})"
              for c in ("1.3981999507e-3", "8.3334519073e-3", "4.1665795894e-2", "1.6666665459e-1",
                        "5.0000001201e-1")]
    return "".join(f"    {line}\n" for line in lines)


# float32 exp, tanh and sigmoid in float32 arithmetic, within 1.0, 1.83 and 2.47 ulp of the exact
# value (NumPy's: 2.44, 1.32, 3.21; tests/test_transcendentals.py measures both). Selects rather
# than branches, so NaN passes through and loops stay vectorisable.
# exp: e**x = 2**n * e**r, r = x - n ln 2 in [-ln 2 / 2, ln 2 / 2] (Cody and Waite's two-part
# ln 2), e**r by Cephes' expf polynomial, 2**n as two powers of two built from exponent bits so
# that results from overflow (inf) down to the smallest subnormal round once.
# tanh: E / (E + 2) with E = e**2|x| - 1 and the sign of x, |x| clamped at 10 (tanh rounds to 1
# from 9.01). E is 2**n (e**r - 1) + 2**n - 1 from exp's reduction, the exact part 2**n r + 2**n - 1
# summed before the polynomial's, so that it stays accurate near 0 (1.83 ulp at worst). One path
# for all x: the earlier Cephes odd polynomial below |x| = 0.625 and 1 - 2 / (e**2|x| + 1) above
# were both computed for every element (a vector loop computes both sides of a select), and the
# LSTM gate kernels (two tanhs and three sigmoids an element) took 1.14-1.18x as long. It computes
# e**2|x| - 1 itself (one power of two suffices on [0, 20]): calling exp_float32 made it too large
# for LLVM to inline, and a call keeps the loop scalar.
# The helpers are compiled with one of the kernels' fast-math flags, contraction (a callee
# inherits its caller's flags unless it sets its own): reassociation would merge the two parts
# of ln 2 and the two powers of two (2**64 * 2**64 is inf), while a multiply-add fused into one
# instruction only rounds once where it rounded twice. Without it the polynomials ran as
# separate multiplies and adds: an LSTM's gate kernel (three sigmoids and two tanhs per
# element) took 1.15-1.3x as long.
_FLOAT32_MATH = """\
@{decorator}
def exp_float32(x):
    c = min(max(x, np.float32(-104.0)), np.float32(89.0))
{exp_reduction_c}    k = np.int32(n)
    half = k >> 1
    low = np.int32((half + 127) << 23).view(np.float32)
    high = np.int32((k - half + 127) << 23).view(np.float32)
    y = (p * (r * r) + r + np.float32(1.0)) * low * high
    return y if x == x else x


@{decorator}
def tanh_float32(x):
    t = np.float32(2.0) * min(abs(x), np.float32(10.0))
{exp_reduction_t}    power = np.int32((np.int32(n) + 127) << 23).view(np.float32)
    expm1_t = power * (q * (r * r)) + (power * r + (power - np.float32(1.0)))
    y = np.copysign(expm1_t / (expm1_t + np.float32(2.0)), x)
    return y if x == x else x


@{decorator}
def sigmoid_float32(x):
    return np.float32(1.0) / (np.float32(1.0) + exp_float32(-x))
"""


def _math_helper_decorator(target: KernelTarget) -> str:
    """`target`'s helper decorator with contraction as the only fast-math flag."""
    return target.helper_decorator.replace("(", "(fastmath={'contract'}, ", 1)


def float32_math_helpers(target: KernelTarget) -> str:
    """Source of the helpers exp_float32, tanh_float32 and sigmoid_float32 for `target` (library
    kernels call them too)."""
    return _FLOAT32_MATH.format(decorator=_math_helper_decorator(target),
                                exp_reduction_c=_exp_reduction("c", "p"),
                                exp_reduction_t=_exp_reduction("t", "q"))


@_rule("exp", "tanh", "sigmoid")
def _float32_transcendental(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    if node.output.dtype != "float32" or e.target.name not in SCALAR_LIBM_TARGETS:
        return _elementwise_rule(e, node, domain)
    e.require_helper(float32_math_helpers(e.target))
    return f"{node.op}_float32({e.broadcast_operand(node, 0, domain.index)})"


# float32 erf in float32 arithmetic, within 1.3 ulp of the exact value (tests/test_pointwise_erf.py
# measures it), branch-free so that its loops vectorise as exp's do (math.erf is a libm call).
# Two fits to the exact function, least squares driven to equal ripple (Lawson's iteration):
# below |x| = 475/512, erf(x) = x + x P(x**2) with P of degree 5 (P(0) = 2/sqrt(pi) - 1);
# above, erf(|x|) = 1 - e**Q(|x|) with Q of degree 6 fitted to log(erfc), |x| clamped at 4
# (erf rounds to 1 from 3.92) and e**Q as exp_float32 computes it (Q in [-18, -1.6]: one power
# of two suffices). The kernel calls the two halves apart, `erf_float32(x, erf_far_float32(x))`:
# LLVM inlines each call by its callee's size, and as one function erf was too large to inline.
_ERF_FLOAT32 = """\
@{decorator}
def erf_far_float32(x):
    a = min(abs(x), np.float32(4.0))
    q = np.float32(0.00019407201)
    q = q * a + np.float32(-0.00302505796)
    q = q * a + np.float32(0.0221551303)
    q = q * a + np.float32(-0.103784002)
    q = q * a + np.float32(-0.637348771)
    q = q * a + np.float32(-1.12757778)
    q = q * a + np.float32(-0.000219119203)
{exp_reduction}    return np.float32(1.0) - (e * (r * r) + r + np.float32(1.0)) * np.int32((np.int32(n) + 127) << 23).view(np.float32)


@{decorator}
def erf_float32(x, far):
    s = x * x
    p = np.float32(-0.000598738145)
    p = p * s + np.float32(0.00499302289)
    p = p * s + np.float32(-0.0267669465)
    p = p * s + np.float32(0.112818405)
    p = p * s + np.float32(-0.376124978)
    p = p * s + np.float32(0.128379151)
    y = x + x * p if abs(x) < np.float32(0.927734375) else (far if x > 0 else -far)
    return y if x == x else x
"""


@_rule("erf")
def _erf(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    """float32 on the CPU: erf_float32; otherwise the registry's scalar (math.erf: NumPy has
    none), with the import it needs."""
    if node.output.dtype != "float32" or e.target.name not in SCALAR_LIBM_TARGETS:
        e.require_helper("import math")
        return _elementwise_rule(e, node, domain)
    e.require_helper(_ERF_FLOAT32.format(decorator=_math_helper_decorator(e.target),
                                         exp_reduction=_exp_reduction("q", "e")))
    x = e.broadcast_operand(node, 0, domain.index)
    return f"erf_float32({x}, erf_far_float32({x}))"


@_rule("broadcast_to")
def _broadcast_to(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    return e.broadcast_operand(node, 0, domain.index)


@_rule("transpose")
def _transpose(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    index = [""] * len(domain.index)
    for k, axis in enumerate(node.attrs["perm"]):
        index[axis] = domain.index[k]
    return e.operand(node, 0, tuple(index))


@_rule("slice")
def _slice(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    """Where the slice starts along an axis it cuts is an argument of the kernel (on targets
    that pass integers), even at 0: x[:, t] compiles once for every t."""
    a, shape = node.attrs, node.inputs[0].shape
    index = []
    for i, n, start, stop, step in zip(domain.index, shape, a["starts"], a["stops"], a["steps"]):
        whole = start == 0 and stop == n and step == 1
        index.append(i if whole else _affine(i, e.integer_argument(start), step))
    return e.operand(node, 0, tuple(index))


@_rule("flip")
def _flip(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    x, flipped = node.inputs[0], node.attrs["axes"]
    return e.operand(node, 0, tuple(f"{e.extent(x, axis)} - 1 - {i}" if axis in flipped else i
                                    for axis, i in enumerate(domain.index)))


@_rule("slice_grad")
def _slice_grad(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    a = node.attrs
    conditions, index = [], []
    for i, n, start, stop, step in zip(domain.index, a["shape"], a["starts"], a["stops"], a["steps"]):
        if start == 0 and step == 1 and stop == n:
            index.append(i)
            continue
        conditions.append(f"{start} <= {i} and {i} < {stop}")
        if step != 1:
            conditions.append(f"({i} - {start}) % {step} == 0")
        index.append(i if start == 0 and step == 1 else
                     f"({i} - {start})" + (f" // {step}" if step != 1 else ""))
    value = e.operand(node, 0, tuple(index))
    if not conditions:
        return value
    return f"({value} if {' and '.join(conditions)} else {literal(0, node.output.dtype)})"


@_rule("pad")
def _pad(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    x = node.inputs[0]
    conditions, index = [], []
    for axis, (i, (lo, hi)) in enumerate(zip(domain.index, node.attrs["pads"])):
        index.append(f"{i} - {lo}" if lo else i)
        if lo:
            conditions.append(f"{lo} <= {i}")
        if lo or hi:
            conditions.append(f"{i} < {lo} + {e.extent(x, axis)}" if lo else f"{i} < {e.extent(x, axis)}")
    value = e.operand(node, 0, tuple(index))
    if not conditions:
        return value
    fill = literal(node.attrs["value"], node.output.dtype)
    return f"({value} if {' and '.join(conditions)} else {fill})"


@_rule("concatenate")
def _concatenate(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    axis = node.attrs["axis"]
    i = domain.index[axis]
    offsets = ["0"]
    for k, x in enumerate(node.inputs[:-1]):
        name = e.fresh("offset")
        previous = "" if offsets[-1] == "0" else f"{offsets[-1]} + "
        e.prelude.line(f"{name} = {previous}{e.extent(x, axis)}")
        offsets.append(name)

    def part(k: int) -> str:
        shifted = i if offsets[k] == "0" else f"{i} - {offsets[k]}"
        return e.operand(node, k, domain.index[:axis] + (shifted,) + domain.index[axis + 1:])

    def select(lo: int, hi: int) -> str:
        """Inputs lo..hi-1 chosen by halves: nested log2(n) deep, not n (Python's parser takes
        200 nested parentheses at most: a concatenation of 200 parts failed to compile)."""
        if hi - lo == 1:
            return part(lo)
        mid = (lo + hi) // 2
        return f"({select(lo, mid)} if {i} < {offsets[mid]} else {select(mid, hi)})"

    return select(0, len(node.inputs))


@_rule("take_along_axis")
def _take_along_axis(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    x, indices = node.inputs
    axis = node.attrs["axis"]
    out = node.output.shape
    position = e.operand(node, 1, broadcast_index(domain.index, indices.shape, out))
    index = broadcast_index(domain.index, x.shape, out)
    return e.operand(node, 0, index[:axis] + (position,) + index[axis + 1:])


@_rule("gather")
def _gather(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    axis = node.attrs["axis"]
    rank = node.inputs[1].type.ndim
    position = e.operand(node, 1, domain.index[axis:axis + rank])
    return e.operand(node, 0, domain.index[:axis] + (position,) + domain.index[axis + rank:])


@_rule("one_hot")
def _one_hot(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    dtype = node.output.dtype
    position = e.operand(node, 0, domain.index[:-1])
    return f"({literal(1, dtype)} if {position} == {domain.index[-1]} else {literal(0, dtype)})"


def _random_bits(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    e.require_helper(e.target.rng_helpers)
    key = e.fresh("key")
    seed, counter = e.operand(node, 0, ("0",)), e.operand(node, 0, ("1",))
    e.prelude.line(f"{key} = key_bits(np.uint64({seed}), np.uint64({counter}), "
                   f"np.uint64({node.attrs['stream']}))")
    return f"element_bits({key}, np.uint64({domain.flat_index()}))"


@_rule("random_uniform")
def _random_uniform(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    return f"uniform_{node.attrs['dtype']}({_random_bits(e, node, domain)})"


@_rule("random_bernoulli")
def _random_bernoulli(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    return f"bernoulli({_random_bits(e, node, domain)}, {literal(node.attrs['p'], 'float64')})"



def kernel_arrays(sub: Graph) -> dict[Value, KernelArray]:
    """The kernel array each of `sub`'s inputs and outputs is passed as: input i, output j."""
    arrays = {v: KernelArray(INPUT, i) for i, v in enumerate(sub.input_values)}
    arrays.update({v: KernelArray(OUTPUT, j) for j, v in enumerate(sub.output_values)})
    return arrays


def source_names(arrays: dict[Value, KernelArray]) -> dict[Value, str]:
    """What the generated source calls each array: 'x0', 'y1'."""
    return {v: array.name for v, array in arrays.items()}


def members_of(sub: Graph) -> list[Node]:
    return [n for n in sub.nodes if not is_literal(n)]


def register_pointwise_lowerings(target: str) -> None:
    """Register the shared pointwise rules as `target`'s lowerings (the elementwise kind
    default and each shape, gather and random op)."""
    register_kind_default(target, ELEMENTWISE, _elementwise_rule)
    for op, rule in _RULES.items():
        register_lowering(target, op, rule)
