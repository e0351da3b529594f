"""Elementwise and shape kernels, and the pointwise expression engine every generator uses.

A pointwise member is evaluated at one index of its output: `PointwiseEmitter.emit` writes
``tK = <expr>`` for it, where the op's rule (its lowering in ir/lowering.py's registry; for
elementwise ops the kind default, which composes the registry's `scalar` expression) reads its
operands at the indices it needs: values computed in the kernel are locals (fusion only lets a
member read them at its own index), kernel inputs are loads at a computed index, scalar
constants are literals declared once before the loops.

A kernel whose members read their operands only at the loop index, or whole-array scalars, is
*flat*: it loops over one 1-D index and the executor passes 1-D views, so the same kernel (and
cache entry) serves every shape and rank.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace

from graphc.ir import Graph, Node, Value
from graphc.ir.kernels import is_literal
from graphc.ir.lowering import lowering, lowering_for, register_kind_default
from graphc.ir.ops.random import rng_source
from graphc.ir.registry import ELEMENTWISE, get

from .codegen_common import (HELPER_OPTIONS, PARALLEL_MIN_ELEMENTS, TARGET, Call, KernelSource, Writer, cast,
                             decorator, entry_name, index_text, literal, loop_header, module, size_of)

Index = tuple[str, ...]
RANDOM_OPS = ("random_uniform", "random_bernoulli")
# The generator's functions as helpers of the kernel that calls them: without the wrappers that
# let Python or C call them, a dropout kernel compiles in 0.74-0.97 s instead of 1.07-1.23 s.
RNG_HELPERS = rng_source(f"njit({HELPER_OPTIONS})")


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

    def __init__(self, sub: Graph, arrays: dict[Value, str], flat: bool = False,
                 views: dict[Value, tuple[int, ...]] | None = None, target: str = TARGET) -> None:
        self.sub = sub
        self.target = target            # whose registered pointwise rules `emit` applies
        self.arrays = arrays            # kernel inputs/outputs -> parameter names
        self.flat = flat
        self.views = views or {}        # arrays (and members) passed and indexed reshaped
        self.literals: dict[Value, str] = {}
        self.locals: dict[Value, str] = {}
        self.prelude = Writer()         # statements before the loops
        self.helpers: list[str] = []
        self.hoisted: dict[str, str] = {}  # load expression -> local holding it
        self._counters: dict[str, int] = {}
        for node in sub.nodes:
            if is_literal(node):
                name = f"c{len(self.literals)}"
                value = node.attrs["value"].reshape(())
                self.prelude.line(f"{name} = {literal(value[()], node.output.dtype)}")
                self.literals[node.output] = name

    def fresh(self, prefix: str) -> str:
        count = self._counters.get(prefix, 0)
        self._counters[prefix] = count + 1
        return f"{prefix}{count}"

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
        rule = lowering_for(self.target, node.op)
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


def _affine(i: str, start: int, step: int) -> str:
    text = i if step == 1 else f"{i} * {step}"
    return text if start == 0 else f"{text} + {start}"


# -- rules: op -> expression of its value at an output index ------------------------------------
def _elementwise_rule(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    scalar = get(node.op).scalar
    operands = [e.broadcast_operand(node, k, domain.index) for k in range(len(node.inputs))]
    return scalar(*operands, **node.attrs)


register_kind_default(TARGET, ELEMENTWISE, _elementwise_rule)


@lowering(TARGET, "broadcast_to")
def _broadcast_to(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    return e.broadcast_operand(node, 0, domain.index)


@lowering(TARGET, "transpose")
def _transpose(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    index = [""] * len(domain.index)
    for k, axis in enumerate(node.attrs["perm"]):
        index[axis] = domain.index[k]
    return e.operand(node, 0, tuple(index))


@lowering(TARGET, "slice")
def _slice(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    a = node.attrs
    return e.operand(node, 0, tuple(_affine(i, start, step) for i, start, step
                                    in zip(domain.index, a["starts"], a["steps"])))


@lowering(TARGET, "slice_grad")
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


@lowering(TARGET, "pad")
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


@lowering(TARGET, "concatenate")
def _concatenate(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    axis = node.attrs["axis"]
    i = domain.index[axis]
    offsets = ["0"]
    for k, x in enumerate(node.inputs[:-1]):
        name = e.fresh("offset")
        previous = "" if offsets[-1] == "0" else f"{offsets[-1]} + "
        e.prelude.line(f"{name} = {previous}{e.extent(x, axis)}")
        offsets.append(name)
    expr = ""
    for k in reversed(range(len(node.inputs))):
        shifted = i if offsets[k] == "0" else f"{i} - {offsets[k]}"
        index = domain.index[:axis] + (shifted,) + domain.index[axis + 1:]
        value = e.operand(node, k, index)
        expr = value if not expr else f"({value} if {i} < {offsets[k + 1]} else {expr})"
    return expr


@lowering(TARGET, "take_along_axis")
def _take_along_axis(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    x, indices = node.inputs
    axis = node.attrs["axis"]
    out = node.output.shape
    position = e.operand(node, 1, broadcast_index(domain.index, indices.shape, out))
    index = broadcast_index(domain.index, x.shape, out)
    return e.operand(node, 0, index[:axis] + (position,) + index[axis + 1:])


@lowering(TARGET, "gather")
def _gather(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    axis = node.attrs["axis"]
    rank = node.inputs[1].type.ndim
    position = e.operand(node, 1, domain.index[axis:axis + rank])
    return e.operand(node, 0, domain.index[:axis] + (position,) + domain.index[axis + rank:])


@lowering(TARGET, "one_hot")
def _one_hot(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    dtype = node.output.dtype
    position = e.operand(node, 0, domain.index[:-1])
    return f"({literal(1, dtype)} if {position} == {domain.index[-1]} else {literal(0, dtype)})"


def _random_bits(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    e.require_helper(RNG_HELPERS)
    key = e.fresh("key")
    seed, counter = e.operand(node, 0, ("0",)), e.operand(node, 0, ("1",))
    e.prelude.line(f"{key} = key_bits(np.uint64({seed}), np.uint64({counter}), "
                   f"np.uint64({node.attrs['stream']}))")
    return f"element_bits({key}, np.uint64({domain.flat_index()}))"


@lowering(TARGET, "random_uniform")
def _random_uniform(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    return f"uniform_{node.attrs['dtype']}({_random_bits(e, node, domain)})"


@lowering(TARGET, "random_bernoulli")
def _random_bernoulli(e: PointwiseEmitter, node: Node, domain: Domain) -> str:
    return f"bernoulli({_random_bits(e, node, domain)}, {literal(node.attrs['p'], 'float64')})"


# -- the elementwise / shape kernel -------------------------------------------------------------
def is_flat(members: list[Node]) -> bool:
    """Can these members run over one flat index? Every operand is read at the output index or
    is a one-element array; random ops only need the flat index itself."""
    for m in members:
        if m.op in RANDOM_OPS:
            continue
        if get(m.op).kind != ELEMENTWISE:
            return False
        if any(v.shape != m.output.shape and v.type.size != 1 for v in m.inputs):
            return False
    return True


def collapsed_axes(shape: tuple[int, ...], operand_shapes: list[tuple[int, ...]]) -> list[list[int]]:
    """Runs of adjacent axes of `shape` that every operand (broadcast to `shape`) reads alike:
    along all of them or along none. Each run can loop as one axis over reshaped views; a bias
    add over (N, C, H, W) becomes (N, C, H*W). Axes of extent 1 join any run."""
    rank = len(shape)

    def varies(operand: tuple[int, ...], axis: int) -> bool:
        lead = rank - len(operand)
        return axis >= lead and operand[axis - lead] != 1

    runs: list[list[int]] = []
    signature = None  # of the current run; None while it holds only axes of extent 1
    for axis, extent in enumerate(shape):
        reads = tuple(varies(s, axis) for s in operand_shapes)
        if runs and (extent == 1 or signature in (None, reads)):
            runs[-1].append(axis)
        else:
            runs.append([axis])
            signature = None
        if extent != 1:
            signature = reads
    return runs


def _collapsed_views(members: list[Node], sub: Graph) -> dict[Value, tuple[int, ...]] | None:
    """Each array's (and each member's) shape over the collapsed axes, when collapsing the
    loop nest drops an axis and every member is an elementwise op at the common shape."""
    shape = members[0].output.shape
    if any(m.op not in ("broadcast_to", *RANDOM_OPS) and get(m.op).kind != ELEMENTWISE
           or m.output.shape != shape for m in members):
        return None
    keys = {m.inputs[0] for m in members if m.op in RANDOM_OPS}  # read whole, not broadcast
    arrays = [v for v in [*sub.input_values, *sub.output_values] if v not in keys]
    runs = collapsed_axes(shape, [v.shape for v in arrays])
    if len(runs) == len(shape):
        return None

    def view(v: Value) -> tuple[int, ...]:
        padded = (1,) * (len(shape) - len(v.shape)) + v.shape
        return tuple(size_of(tuple(padded[a] for a in run)) for run in runs)
    # Every value a member reads is indexed over the collapsed axes, literals included: a
    # gradient's seed is a rank-n literal of ones broadcast to the loss's operand.
    literals = [n.output for n in sub.nodes if is_literal(n)]
    return {v: view(v) for v in [*arrays, *literals, *(m.output for m in members)]}


def _parallel_rows(loop: Writer, domain: Domain) -> None:
    """Open a parallel loop over all axes but the last as one index `k` (one prange over
    N*C rows instead of prange(N) around range(C): an inner loop fewer in the parallel
    function, whose loop nests LLVM compiles several times over), each axis index from `k`,
    then the loop over the last axis."""
    *outer, last = domain.index
    *extents, last_extent = domain.dims
    loop.line(loop_header("k", " * ".join(extents), True))
    loop.depth += 1
    for d, i in enumerate(outer):
        inner = " * ".join(extents[d + 1:])  # the rows one step of axis d spans
        quotient = "k" if not inner else f"k // ({inner})" if "*" in inner else f"k // {inner}"
        loop.line(f"{i} = {quotient}" if d == 0 else f"{i} = {quotient} % {extents[d]}")
    loop.line(loop_header(last, last_extent, False))
    loop.depth += 1


def argument_names(sub: Graph) -> dict[Value, str]:
    names = {v: f"x{i}" for i, v in enumerate(sub.input_values)}
    names.update({v: f"y{i}" for i, v in enumerate(sub.output_values)})
    return names


def members_of(sub: Graph) -> list[Node]:
    return [n for n in sub.nodes if not is_literal(n)]


def elementwise_flops(members: list[Node]) -> int:
    return sum(m.output.type.size for m in members if get(m.op).kind == ELEMENTWISE)


def elementwise_call(entry: str, sub: Graph) -> Call:
    """One loop nest computing every member of `sub` at each index of their common shape.
    Its parameters are named after `sub`'s inputs and outputs (x0.., y0..), then the extents."""
    members = members_of(sub)
    shape = members[0].output.shape
    flat = is_flat(members)
    size = size_of(shape)
    parallel = size >= PARALLEL_MIN_ELEMENTS
    arrays = argument_names(sub)
    views = None if flat else _collapsed_views(members, sub)
    emitter = PointwiseEmitter(sub, arrays, flat, views)
    if flat:
        dims, domain = (size,), Domain(("i",), ("n",), flat=True)
    else:
        dims = views[members[0].output] if views else shape
        domain = Domain(tuple(f"i{d}" for d in range(len(dims))),
                        tuple(f"n{d}" for d in range(len(dims))))

    loop = Writer(depth=1)
    if parallel and len(dims) > 2:
        _parallel_rows(loop, domain)
    else:
        for d, (i, n) in enumerate(zip(domain.index, domain.dims)):
            loop.line(loop_header(i, n, parallel and d == 0))
            loop.depth += 1
    for m in members:
        emitter.emit(loop, m, domain)
    for v in sub.output_values:
        loop.line(f"{arrays[v]}[{index_text(domain.index)}] = {emitter.locals[v]}")

    body = Writer()
    body.line(decorator(parallel))
    with body.block(f"def {entry}({', '.join(list(arrays.values()) + list(domain.dims))}):"):
        body.extend(emitter.prelude)
    body.extend(loop)
    passed = tuple(views.get(v) for v in arrays) + (None,) * len(dims) if views else ()
    return Call(module(entry, body, emitter.helpers), entry, tuple(arrays.values()) + tuple(dims),
                flat=flat, parallel=parallel, views=passed, pointwise=True)


def write_in_place(call: Call, pairs: set[tuple[str, str]]) -> Call:
    """`call` with each output that the memory plan puts in an input's buffer (kernel array
    names (input, output) in `pairs`) accessed through that input's parameter. The two are one
    array then, so nothing changes but what LLVM sees: through two parameters it must assume
    they might overlap, checks at run time, finds they do, and runs its unvectorised loop
    instead (the MNIST CNN's dropout gradient, 590k elements in place: 1059 -> 197 us)."""
    if not call.pointwise:
        return call
    head, _, body = call.source.partition(f"def {call.entry}(")
    params = [p.strip() for p in body[:body.index(")")].split(",")]
    for x, y in pairs:
        if x in call.args and y in call.args:
            read, written = params[call.args.index(x)], params[call.args.index(y)]
            body = re.sub(rf"\b{written}\[", f"{read}[", body)
    return replace(call, source=f"{head}def {call.entry}({body}")


def generate_elementwise(kernel: Node) -> KernelSource:
    call = elementwise_call(entry_name(kernel.attrs["name"]), kernel.subgraph)
    return KernelSource(kernel.attrs["name"], kernel.attrs["pattern"], [call],
                        flops=elementwise_flops(members_of(kernel.subgraph)))
