"""Random programs over graphc's public API, as users write them, and the checks they run.

A strategy draws a `Program`: the Python source of a function `f(x0, x1, ...)` that calls
graphc tensor methods, `gc.*` and `F.*` (convolution, pooling, strided slices, gathers, views,
reductions, matmuls, dropout and random numbers, closure constants, and `gc.jit` / `gc.grad`
called inside) and returns a scalar loss, plus the transform applied to it from outside
(`gc.value_and_grad(gc.jit(f))`, `gc.jit(gc.grad(f))`, ...). The source is what runs (through
`exec`), so a failure prints as a program a person can paste and rerun.

Checks, from cheap to dear (see `check_reference` and `check_backend`):
- reference backend, float64: the transformed function equals the plain traced graph and its
  unsimplified gradient (simplify and transform composition change nothing), the gradient
  matches central differences along random directions, and the graph fused into kernels,
  memory-planned and run buffer by buffer through the interpreter computes the same numbers;
- a compiled backend (numba-cpu, numba-cuda) against the reference at the program's dtype,
  values and gradients, with the same random key.

Shapes are tracked with NumPy stand-ins (zero-stride arrays) while drawing, independently of
graphc's own shape rules.
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from hypothesis import strategies as st

import graphc as gc
from graphc.backends.reference import evaluate
from graphc.ir import Graph
from graphc.passes import SIMPLIFY, Stages, autodiff
# Fusion and memory planning run through the interpreter, buffer by buffer. Imported here, not
# in a test: the module defines @given tests, which must not be created inside one.
from test_memplan import plan_for, run_plan

# Programs run per check and failures seen, printed at the end of a pytest session.
COUNTS: collections.Counter = collections.Counter()

# The CPU backend parallelises loops over at least this many elements (PARALLEL_MIN_ELEMENTS).
PARALLEL_ELEMENTS = 1 << 16

SMOOTH_UNARY = {
    "tanh": "gc.tanh({x})",
    "sigmoid": "{x}.sigmoid()",
    "square": "{x} ** 2",
    "neg": "-{x}",
    "exp_tanh": "gc.exp(gc.tanh({x}))",
    "log1p_square": "gc.log1p({x} * {x})",
    "sqrt_shifted": "gc.sqrt({x} * {x} + 1.0)",
    "rsqrt_shifted": "gc.rsqrt({x} * {x} + 0.5)",
    "reciprocal_shifted": "gc.reciprocal({x} * {x} + 1.0)",
    "pow_shifted": "({x} * {x} + 1.0) ** 1.5",
    "affine": "{x} * 0.5 + 1.0",
    "rdiv": "1.0 / ({x} * {x} + 2.0)",
    "rpow": "2.0 ** gc.tanh({x})",
    "cast_round_trip": "({x}.astype(OTHER) * 2.0).astype(DTYPE)",
}
KINKED_UNARY = {
    "abs": "abs({x})",
    "relu": "F.relu({x})",
    "sign_times": "gc.sign({x}) * {x}",
}
BINARY = {
    "add": "{x} + {y}",
    "sub": "{x} - {y}",
    "mul": "{x} * {y}",
    "div": "{x} / ({y} * {y} + 1.0)",
    "maximum": "gc.maximum({x}, {y})",
    "minimum": "gc.minimum({x}, {y})",
    "where": "gc.where({x} > {y}, {x}, {y} * 0.5)",
    "pow": "({x} * {x} + 1.0) ** gc.tanh({y})",
}
# Forms simplify rewrites (identities, inverse pairs, folding) or must not (broadcasts).
IDENTITIES = ("{x} * 1.0", "1.0 * {x}", "{x} + 0.0", "{x} - 0.0", "{x} / 1.0", "{x} ** 1",
              "-(-{x})", "{x}.reshape(-1).reshape({s})", "{x}.T.T", "{x}.sum(axis=())",
              "{x}.astype(DTYPE)", "{x}.broadcast_to({s})", "{x} + np.zeros((2,) + {s}, DTYPE)",
              "{x} * np.ones((2,) + {s}, DTYPE)", "{x} * gc.tanh(np.full({s}, 0.5, DTYPE))",
              "({x} @ {x}.T).T")
# Bodies of functions transformed inside the program: smooth, of one tensor t.
INNER_BODIES = ("gc.tanh(t) * t", "gc.sigmoid(t) ** 2", "gc.exp(gc.tanh(t)) * 0.5", "t * t * t")
INNER_FORMS = ("jit", "grad", "value_and_grad", "grad_jit", "grad_grad")



@dataclass
class Program:
    """One generated program: `source` defines `f`, `loss` (f, or the squared norm of its
    gradient) and `step`, the transformed `loss`."""

    source: str
    dtype: str
    arg_shapes: list[tuple[int, ...]]
    wrapper: str
    size: int  # elements of the largest value

    def arguments(self, dtype: str | None = None, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s).astype(dtype or self.dtype) for s in self.arg_shapes]

    def compile(self, dtype: str | None = None, backend: str | None = None,
                other: str | None = None) -> dict[str, Any]:
        """Run the source with DTYPE / BACKEND / OTHER (the dtype of a cast round trip) bound;
        returns its namespace (f, step, ...)."""
        dtype = dtype or self.dtype
        other = other or ("float32" if dtype == "float64" else "float64")
        namespace: dict[str, Any] = {"DTYPE": dtype, "BACKEND": backend, "OTHER": other}
        exec(compile(self.source, "<random program>", "exec"), namespace)
        return namespace

    def __str__(self) -> str:
        return (f"# dtype={self.dtype} arguments={self.arg_shapes}\n"
                f"DTYPE, BACKEND, OTHER = {self.dtype!r}, 'reference', "
                f"{'float32' if self.dtype == 'float64' else 'float64'!r}\n{self.source}")


# -- drawing programs ---------------------------------------------------------------------------
def _stand_in(shape: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(np.zeros((), np.int8), shape)


@dataclass
class _Draft:
    draw: Callable
    values: list[tuple[str, np.ndarray]]  # (name, stand-in of its shape)
    args: list[tuple[str, tuple[int, ...]]]
    preamble: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    used: set[str] = field(default_factory=set)
    second_order: bool = False  # the loss differentiates f twice
    max_elements: int = 4096  # a larger value is not emitted (x @ x.T of a long axis is huge)

    def name(self, prefix: str) -> str:
        return f"{prefix}{len(self.preamble) + len(self.body) + len(self.args)}"

    def constant(self, shape: tuple[int, ...]) -> str:
        name = self.name("c")
        # Seeds apart from the arguments' (seed 0): equal values would tie at maximum's kink.
        self.preamble.append(f"{name} = np.random.default_rng({100 + len(self.preamble)})"
                             f".standard_normal({shape!r}).astype(DTYPE)")
        return name

    def indices(self, high: int, shape: tuple[int, ...]) -> str:
        """Indices in range, negative ones (counted from the end, as NumPy's) included."""
        name = self.name("i")
        self.preamble.append(f"{name} = np.random.default_rng({len(self.preamble)})"
                             f".integers({-high}, {high}, size={shape!r})")
        return name

    def weight(self, shape: tuple[int, ...]) -> str:
        """A closure constant or a new argument (differentiated), drawn."""
        if self.draw(st.booleans()):
            return self.constant(shape)
        name = f"x{len(self.args)}"
        self.args.append((name, shape))
        return name

    def emit(self, expression: str, shape: tuple[int, ...]) -> None:
        if int(np.prod(shape)) > self.max_elements:
            return
        name = self.name("v")
        self.body.append(f"{name} = {expression}")
        self.used.update(re.findall(r"\b[vx]\d+\b", expression))
        self.values.append((name, _stand_in(shape)))


def _axis(draw, rank: int) -> int:
    axis = draw(st.integers(0, rank - 1))
    return axis - rank if draw(st.booleans()) else axis  # negative axes too


def _partner(d: _Draft, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """A value, closure constant or Python number that broadcasts against `shape`."""
    same = [(n, s.shape) for n, s in d.values if _broadcasts(s.shape, shape)]
    kind = d.draw(st.sampled_from(["value", "value", "constant", "number"]))
    if kind == "value" and same:
        return d.draw(st.sampled_from(same))
    if kind == "number":
        return repr(d.draw(st.sampled_from([0.5, -1.5, 2.0]))), ()
    suffix = shape[d.draw(st.integers(0, len(shape))):]
    suffix = tuple(1 if d.draw(st.booleans()) else n for n in suffix)
    return d.constant(suffix), suffix


def _broadcasts(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    try:
        return np.broadcast_shapes(a, b) == b
    except ValueError:
        return False


def _slice_text(draw, dim: int) -> tuple[str, slice | int]:
    kind = draw(st.sampled_from(["full", "range", "range", "int"]))
    if kind == "int":
        i = draw(st.integers(-dim, dim - 1))
        return str(i), i
    if kind == "full":
        return ":", slice(None)
    start = draw(st.integers(0, dim - 1))
    stop = draw(st.integers(start + 1, dim))
    step = draw(st.sampled_from([1, 2, 3]))
    text = f"{start or ''}:{stop if stop < dim else ''}" + (f":{step}" if step > 1 else "")
    return text, slice(start, stop, step)


def _window(draw, size: int, kernel_max: int = 3) -> tuple[int, int, int, int] | None:
    """(kernel, stride, padding, dilation) giving at least one output along an axis of `size`."""
    kernel = draw(st.integers(1, kernel_max))
    padding = draw(st.integers(0, kernel // 2))
    stride = draw(st.sampled_from([1, 1, 2]))
    dilation = draw(st.sampled_from([1, 1, 2]))
    if size + 2 * padding < dilation * (kernel - 1) + 1:
        return None
    return kernel, stride, padding, dilation


def _out(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _step(d: _Draft) -> None:
    """Append one operation on a drawn value."""
    draw = d.draw
    # Mostly the latest value, so programs are chains with some fan-out, not many short branches.
    name, x = d.values[-1] if draw(st.integers(0, 2)) else draw(st.sampled_from(d.values))
    s, r = x.shape, x.ndim
    kinds = ["unary", "unary", "kinked", "binary", "binary", "reduce", "softmax", "reshape",
             "unsqueeze", "squeeze", "broadcast", "join", "transpose", "slice", "pad", "gather",
             "take_along_axis", "matmul", "random", "inner", "one_hot", "where_constant",
             "identity"]
    if r == 4:  # images: mostly convolution and pooling
        kinds = ["conv", "pool", "conv", "pool"] + kinds
    kind = draw(st.sampled_from(kinds))
    if kind == "unary":
        d.emit(SMOOTH_UNARY[draw(st.sampled_from(sorted(SMOOTH_UNARY)))].format(x=name), s)
    elif kind == "kinked":
        d.emit(KINKED_UNARY[draw(st.sampled_from(sorted(KINKED_UNARY)))].format(x=name), s)
    elif kind == "binary":
        other, o = _partner(d, s)
        op = draw(st.sampled_from(sorted(BINARY)))
        x_text, y_text = (name, other) if draw(st.booleans()) or op == "where" else (other, name)
        template = BINARY[op]
        if op == "pow" and y_text[0] in "-0123456789":  # gc.tanh(0.5) would be float32
            template = "({x} * {x} + 1.0) ** {y}"
        d.emit(template.format(x=x_text, y=y_text), np.broadcast_shapes(s, o))
    elif kind == "reduce":
        op = draw(st.sampled_from(["sum", "mean", "max"]))
        keep = draw(st.booleans())
        if r == 0 or draw(st.integers(0, 3)) == 0:
            axes, text = tuple(range(r)), ""
        elif draw(st.integers(0, 5)) == 0:
            axes, text = (), "axis=()"  # reduces nothing
        elif draw(st.booleans()) or r == 1:
            a = _axis(draw, r)
            axes, text = (a % r,), f"axis={a}"
        else:
            axes = tuple(sorted(draw(st.sets(st.integers(0, r - 1), min_size=2, max_size=r))))
            text = f"axis={axes}"
        args = ", ".join(t for t in (text, "keepdims=True" if keep else "") if t)
        op = "amax" if op == "max" else op  # max over one axis gives (values, indices)
        call = f"{name}.{op}({args})" if draw(st.booleans()) else f"gc.{op}({name}{', ' if args else ''}{args})"
        shape = tuple(1 if i in axes else n for i, n in enumerate(s)) if keep else \
            tuple(n for i, n in enumerate(s) if i not in axes)
        d.emit(call, shape)
    elif kind == "softmax" and r:
        a = _axis(draw, r)
        fn = draw(st.sampled_from(["F.softmax({x}, dim={a})", "F.log_softmax({x}, dim={a})",
                                   "gc.logsumexp({x}, axis={a}, keepdims=True)"]))
        shape = tuple(1 if i == a % r else n for i, n in enumerate(s)) if "logsumexp" in fn else s
        d.emit(fn.format(x=name, a=a), shape)
    elif kind == "reshape":
        size = x.size
        choices = [(size,), (1, size), s + (1,), (-1,)]
        if r >= 2:
            choices += [s[:-2] + (s[-2] * s[-1],), (-1, s[-1]), (s[0], -1)]
        for i, n in enumerate(s):
            for f in (2, 3):
                if n % f == 0 and n > f:
                    choices.append(s[:i] + (f, n // f) + s[i + 1:])
        target = draw(st.sampled_from(choices))
        text = f"{name}.reshape({', '.join(map(str, target))})" if target else f"{name}.reshape(())"
        d.emit(text, np.reshape(np.zeros(size), target).shape)
    elif kind == "unsqueeze":
        where_ = draw(st.integers(0, r))
        text = draw(st.sampled_from([f"{name}.unsqueeze({where_})",
                                     f"{name}[{', '.join([':'] * where_ + ['None'])}]"]))
        d.emit(text, s[:where_] + (1,) + s[where_:])
    elif kind == "squeeze" and 1 in s:
        ones = [i for i, n in enumerate(s) if n == 1]
        if draw(st.booleans()):
            a = draw(st.sampled_from(ones))
            d.emit(f"{name}.squeeze({a})", s[:a] + s[a + 1:])
        else:
            d.emit(f"{name}.squeeze()", tuple(n for n in s if n != 1))
    elif kind == "broadcast":
        target = tuple(draw(st.integers(2, 3)) if n == 1 and draw(st.booleans()) else n for n in s)
        if draw(st.booleans()) or target == s:
            target = (draw(st.integers(1, 3)),) + target
        method = draw(st.sampled_from(["broadcast_to", "expand"]))
        d.emit(f"{name}.{method}({target!r})", target)
    elif kind == "join":
        same = [n for n, v in d.values if v.shape == s]
        parts = [name] + draw(st.lists(st.sampled_from(same), min_size=1, max_size=2))
        if draw(st.booleans()) or r == 0:
            a = draw(st.integers(0, r))
            d.emit(f"gc.stack([{', '.join(parts)}], axis={a})", s[:a] + (len(parts),) + s[a:])
        else:  # parts of other lengths along the axis: the value sliced
            a = draw(st.integers(0, r - 1))
            lengths = [draw(st.integers(1, s[a])) for _ in parts]
            texts = [p if n == s[a] else f"{p}[{', '.join([':'] * a + [f':{n}'])}]"
                     for p, n in zip(parts, lengths)]
            d.emit(f"gc.concatenate([{', '.join(texts)}], axis={a})",
                   s[:a] + (sum(lengths),) + s[a + 1:])
    elif kind == "transpose" and r >= 2:
        form = draw(st.sampled_from(["T", "swap", "permute"]))
        if form == "T":
            d.emit(f"{name}.T", s[::-1])
        elif form == "swap":
            a, b = draw(st.integers(0, r - 1)), draw(st.integers(0, r - 1))
            d.emit(f"{name}.transpose({a}, {b})", np.swapaxes(x, a, b).shape)
        else:
            perm = draw(st.permutations(range(r)))
            d.emit(f"{name}.permute({', '.join(map(str, perm))})", x.transpose(perm).shape)
    elif kind == "slice" and r:
        count = draw(st.integers(1, r))
        texts, index = zip(*(_slice_text(draw, n) for n in s[:count]))
        d.emit(f"{name}[{', '.join(texts)}]", x[tuple(index)].shape)
    elif kind == "pad" and r:
        pads = [(draw(st.integers(0, 1)), draw(st.integers(0, 2))) for _ in s]
        d.emit(f"gc.pad({name}, {pads!r}, value={draw(st.sampled_from([0.0, 0.5]))})",
               tuple(n + a + b for n, (a, b) in zip(s, pads)))
    elif kind == "gather" and r:
        a = _axis(draw, r)
        idx_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
        idx = d.indices(s[a], idx_shape)
        d.emit(f"gc.gather({name}, {idx}, axis={a})", s[:a % r] + idx_shape + s[a % r + 1:])
    elif kind == "take_along_axis" and r:
        a = _axis(draw, r)
        shape = s[:a % r] + (draw(st.integers(1, 3)),) + s[a % r + 1:]
        idx = d.indices(s[a], shape)
        d.emit(f"gc.take_along_axis({name}, {idx}, axis={a})", shape)
    elif kind == "matmul" and r:
        form = draw(st.sampled_from(["weight", "self"]))
        if form == "self" and r >= 2:
            d.emit(f"{name} @ {name}.transpose(-1, -2)", s[:-1] + (s[-2],))
        else:
            n = draw(st.integers(1, 4))
            w_shape = (s[-1], n) if draw(st.booleans()) or r == 1 else s[:-2][-1:] + (s[-1], n)
            w = d.weight(w_shape)
            out = np.matmul(np.zeros(s), np.zeros(w_shape)).shape
            d.emit(f"{name} @ {w}", out)
    elif kind == "conv" and r == 4:
        windows = [_window(draw, n) for n in s[2:]]
        if None in windows:
            return
        (kh, sh, ph, dh), (kw, sw, pw, dw) = windows
        cin = s[1]
        groups = cin if cin > 1 and draw(st.booleans()) else 1
        cout = groups * draw(st.integers(1, 2))
        w = d.weight((cout, cin // groups, kh, kw))
        bias = d.weight((cout,)) if draw(st.booleans()) else "None"
        image = name
        if draw(st.integers(0, 3)) == 0:
            image = d.constant(s)  # the weight is then the only thing differentiated
        d.emit(f"F.conv2d({image}, {w}, {bias}, stride=({sh}, {sw}), padding=({ph}, {pw}), "
               f"dilation=({dh}, {dw}), groups={groups})",
               (s[0], cout, _out(s[2], kh, sh, ph, dh), _out(s[3], kw, sw, pw, dw)))
    elif kind == "pool" and r == 4:
        kernel = draw(st.integers(1, min(3, s[2] + 1, s[3] + 1)))
        stride = draw(st.sampled_from([1, 2, None]))
        padding = draw(st.integers(0, kernel // 2))
        st_ = stride or kernel
        oh, ow = (_out(n, kernel, st_, padding) for n in s[2:])
        if min(oh, ow) < 1:
            return
        # max_pool2d has no second-order gradient (ir/ops/nn.py says so, naming the op)
        if not d.second_order and draw(st.booleans()):
            d.emit(f"F.max_pool2d({name}, {kernel}, stride={stride}, padding={padding})",
                   s[:2] + (oh, ow))
        else:
            include = draw(st.booleans())
            d.emit(f"F.avg_pool2d({name}, {kernel}, stride={stride}, padding={padding}, "
                   f"count_include_pad={include})", s[:2] + (oh, ow))
    elif kind == "identity":
        form = draw(st.sampled_from(IDENTITIES))
        text = form.format(x=name, s=repr(s))
        shape = (2,) + s if "(2,) +" in form else s
        if form.startswith("({x} @"):
            if r != 2:
                return
            text, shape = f"({name} @ {name}.T).T", (s[0], s[0])
        d.emit(text, shape)
    elif kind == "where_constant":
        c = d.constant(s)
        form = draw(st.sampled_from([f"gc.where({name} > 0, {c}, 0)", f"F.dropout({c}, p=0.5) * {name}"]))
        d.emit(form, s)
    elif kind == "random":
        form = draw(st.sampled_from(["dropout", "uniform", "bernoulli"]))
        if form == "dropout":
            d.emit(f"F.dropout({name}, p={draw(st.sampled_from([0.25, 0.5]))})", s)
        elif form == "uniform":
            d.emit(f"{name} * gc.uniform({s!r}, dtype=DTYPE)", s)
        else:
            d.emit(f"gc.where(gc.bernoulli(0.5, {s!r}), {name}, -{name})", s)
    elif kind == "inner":
        body = draw(st.sampled_from(INNER_BODIES))
        body_of_u = re.sub(r"\bt\b", "u", body)
        form = draw(st.sampled_from(INNER_FORMS))
        text = {
            "jit": f"gc.jit(lambda t: {body})({name})",
            "grad": f"gc.grad(lambda t: ({body}).sum())({name})",
            "value_and_grad": f"gc.value_and_grad(lambda t: ({body}).sum())({name})[1]",
            "grad_jit": f"gc.grad(gc.jit(lambda t: ({body}).sum()))({name})",
            "grad_grad": f"gc.grad(lambda t: gc.grad(lambda u: ({body_of_u}).sum())(t)"
                         f".sum())({name})",
        }[form]
        d.emit(text, s)
    elif kind == "one_hot" and r:
        d.emit(f"{name} * gc.one_hot({name}.argmax(-1), {s[-1]}, dtype=DTYPE)", s)


# How `step` is made from `loss`, the function differentiated: f itself, or (second order) the
# squared norm of f's gradient, whose gradient is a Hessian-vector product.
WRAPPERS = {
    "value_and_grad": "gc.value_and_grad(loss, argnums={argnums}, backend=BACKEND)",
    "value_and_grad(jit)": "gc.value_and_grad(gc.jit(loss), argnums={argnums}, backend=BACKEND)",
    "jit(value_and_grad)": "gc.jit(gc.value_and_grad(loss, argnums={argnums}), backend=BACKEND)",
    "grad(jit)": "gc.grad(gc.jit(loss), argnums={argnums}, backend=BACKEND)",
    "jit(grad)": "gc.jit(gc.grad(loss, argnums={argnums}), backend=BACKEND)",
}
SECOND_ORDER_LOSS = """def loss({args}):
    return sum((g * g).sum() for g in gc.grad(f, argnums={argnums})({args}))"""


def _input_shape(draw, large: bool) -> tuple[int, ...]:
    if draw(st.integers(0, 3)) == 0:  # an image batch for convolution and pooling
        shape = [draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(2, 5)),
                 draw(st.integers(2, 5))]
    else:
        shape = draw(st.lists(st.integers(1, 6), min_size=0 if not large else 1, max_size=4))
    if large:  # one long axis: the CPU backend's loops over it run in parallel
        axis = draw(st.integers(0, len(shape) - 1))
        rest = int(np.prod(shape)) // shape[axis]
        shape[axis] = -(-PARALLEL_ELEMENTS // rest)
    return tuple(shape)


@st.composite
def programs(draw, max_steps: int = 8, large: bool = False,
             dtypes: tuple[str, ...] = ("float32", "float64"), wrappers: tuple[str, ...] | None = None
             ) -> Program:
    """A random program; `large` gives its first argument one axis over the parallel threshold."""
    shape = _input_shape(draw, large)
    d = _Draft(draw, values=[("x0", _stand_in(shape))], args=[("x0", shape)],
               second_order=draw(st.integers(0, 3)) == 0,
               max_elements=4 * PARALLEL_ELEMENTS if large else 4096)
    if draw(st.booleans()):  # a second argument broadcasting against the first
        second = tuple(1 if draw(st.booleans()) else n for n in shape[draw(st.integers(0, len(shape))):])
        d.args.append(("x1", second))
        d.values.append(("x1", _stand_in(second)))
    steps = draw(st.integers(min(3, max_steps), max_steps))
    for _ in range(4 * steps):  # a drawn op that does not apply to its operand adds nothing
        if len(d.body) == steps:
            break
        _step(d)
    # Every value nothing else reads feeds the loss: no step is dead code.
    outputs = [(n, v) for n, v in d.values if n not in d.used and not n.startswith("x")]
    outputs = outputs or [d.values[-1]]
    terms = [f"({n} * {d.constant(v.shape)}).sum()" for n, v in outputs]
    argnums = tuple(range(len(d.args)))
    wrapper = draw(st.sampled_from(wrappers or sorted(WRAPPERS)))
    names = ", ".join(n for n, _ in d.args)
    loss = SECOND_ORDER_LOSS.format(args=names, argnums=argnums) if d.second_order else "loss = f"
    lines = ["import numpy as np", "import graphc as gc", "import graphc.nn.functional as F", "",
             *d.preamble, "", "", f"def f({names}):",
             *(f"    {line}" for line in d.body), f"    return {' + '.join(terms)}", "", "",
             loss, "", f"step = {WRAPPERS[wrapper].format(argnums=argnums)}"]
    size = max(v.size for _, v in d.values)
    return Program("\n".join(lines) + "\n", draw(st.sampled_from(dtypes)),
                   [s for _, s in d.args], wrapper, size)


# -- checks -------------------------------------------------------------------------------------
RNG_SEED = 7
TOLERANCE = {"float32": dict(rtol=2e-4, atol=2e-4), "float64": dict(rtol=1e-9, atol=1e-9)}


def run_step(program: Program, args: list[np.ndarray], backend: str, dtype: str | None = None,
             other: str | None = None) -> tuple[np.ndarray | None, list[np.ndarray]]:
    """(loss or None, gradients) from the program's transformed function on `backend`."""
    step = program.compile(dtype, backend, other)["step"]
    gc.manual_seed(RNG_SEED)
    out = step(*args)
    if program.wrapper.startswith(("grad", "jit(grad")):
        return None, [np.asarray(g) for g in out]
    value, grads = out
    return np.asarray(value), [np.asarray(g) for g in grads]


def _key_args(graph: Graph, args: list[np.ndarray]) -> list[np.ndarray]:
    """The graph's arguments: `args`, then the random key (seed, first call) if it takes one."""
    if graph.inputs and graph.inputs[-1].role == "rng":
        return [*args, np.array([RNG_SEED, 0], np.int64)]
    return list(args)


def _close(got: np.ndarray, want: np.ndarray, what: str, rtol: float, atol: float) -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    scale = max(1.0, float(np.max(np.abs(want), initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)


def check_reference(program: Program, directions: int = 2) -> None:
    """The float64 reference checks (see the module docstring); counts one reference program."""
    COUNTS["reference"] += 1
    try:
        _check_reference(program, directions)
    except BaseException:
        COUNTS["reference failures"] += 1
        raise


def _check_reference(program: Program, directions: int) -> None:
    args = program.arguments("float64")
    # Cast round trips through float64 too: a float32 one would defeat finite differences.
    f = program.compile("float64", "reference", "float64")["loss"]
    traced = gc.trace(f, *args).verify()
    wrt = list(range(len(args)))
    gradient = autodiff(traced, wrt, output=traced.output_names[0]).verify()
    inputs = _key_args(traced, args)
    (loss,) = evaluate(traced, inputs)
    plain = evaluate(gradient, inputs)
    assert np.isfinite(loss), f"loss {loss} is not finite"
    value, grads = run_step(program, args, "reference", "float64", "float64")
    tol = TOLERANCE["float64"]
    if value is not None:
        _close(value, loss, "transformed value vs traced graph", **tol)
    for i, (g, p) in enumerate(zip(grads, plain[1:])):
        _close(g, p, f"transformed gradient {i} vs unsimplified autodiff", **tol)

    # The optimized gradient graph, fused and memory-planned, run buffer by buffer; x0 is
    # donated to its gradient (same type), as a training step donates a parameter to its update.
    stages = Stages(gradient.name, verify=True)
    optimized = stages.run(stages.record("input", gradient), [SIMPLIFY])
    donate = {0: 1} if optimized.output_values[1].type == optimized.input_values[0].type else None
    planned, updated = run_plan(plan_for(optimized, donate), inputs)
    for name, got, want in zip(optimized.output_names, planned, plain):
        _close(got, want, f"fused and planned {name}", **tol)
    if donate:
        _close(updated[0], plain[1], "gradient written into the donated x0", **tol)

    # At the program's own dtype the step traces, types and runs too (no float64 leaks in).
    if program.dtype != "float64":
        value, grads = run_step(program, program.arguments(), "reference")
        for i, (g, a) in enumerate(zip(grads, program.arguments())):
            assert (g.dtype, g.shape) == (a.dtype, a.shape), (
                f"gradient {i}: {g.dtype}{list(g.shape)} for an argument {a.dtype}{list(a.shape)}")

    # Central differences along random directions: d/de f(x + e v) = <grad f(x), v>.
    rng = np.random.default_rng(1)
    eps = 1e-6
    for _ in range(directions):
        v = [rng.standard_normal(a.shape) for a in args]
        plus = evaluate(traced, _key_args(traced, [a + eps * d for a, d in zip(args, v)]))[0]
        minus = evaluate(traced, _key_args(traced, [a - eps * d for a, d in zip(args, v)]))[0]
        numeric = (plus - minus) / (2 * eps)
        analytic = sum(float(np.sum(g * d)) for g, d in zip(plain[1:], v))
        scale = max(1.0, abs(numeric), float(np.sum([np.abs(g).sum() for g in plain[1:]])))
        assert abs(numeric - analytic) <= 1e-5 * scale, (
            f"directional derivative {analytic} differs from central differences {numeric}")


def check_backend(program: Program, backend: str) -> None:
    """The program on `backend` against the reference, at the program's dtype, same random key."""
    COUNTS[backend] += 1
    try:
        args = program.arguments()
        want_value, want_grads = run_step(program, args, "reference")
        value, grads = run_step(program, args, backend)
        tol = TOLERANCE[program.dtype]
        if value is not None:
            _close(value, want_value, f"{backend} value", **tol)
        for i, (g, w) in enumerate(zip(grads, want_grads)):
            assert g.dtype == w.dtype, f"{backend} gradient {i}: dtype {g.dtype}, expected {w.dtype}"
            _close(g, w, f"{backend} gradient {i}", **tol)
    except BaseException:
        COUNTS[f"{backend} failures"] += 1
        raise
