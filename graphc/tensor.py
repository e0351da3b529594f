"""`Tensor`: the proxy users' code sees while graphc traces it.

Every operator on a Tensor appends a node to the graph being traced (through the IR builder)
and returns a new Tensor; nothing is computed. Shapes are static, so errors surface at trace
time and point at the user's line.
"""
from __future__ import annotations

import itertools
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from graphc.ir import Builder, Value
from graphc.ir.errors import DTypeError, GraphcError, ShapeError, user_location
from graphc.ir.graph import safe_module_path
from graphc.ir.types import SHORT_NAMES, TensorType, canonical_dtype, is_float


class _TraceState(threading.local):
    def __init__(self) -> None:
        self.stack: list[Trace] = []


_STATE = _TraceState()


class StateRef(NamedTuple):
    """A module's parameter or buffer, by owner and attribute: what a compiled graph reads
    afresh at each call (so in-place updates, load_state_dict and reassignment are all seen)."""

    module: Any  # graphc.nn.Module
    table: str  # "_parameters" or "_buffers"
    attr: str

    def read(self) -> np.ndarray | None:
        """The array now held under that name (None if the module no longer has it)."""
        return self.module.__dict__[self.table].get(self.attr)


@dataclass(frozen=True)
class ModuleReads:
    """What a traced graph took from modules besides its arguments: the parameters and buffers
    it reads as implicit inputs (in input order, with the names and types they had when traced)
    and the modules it called, whose train/eval modes it was traced in."""

    refs: tuple[StateRef, ...] = ()
    names: tuple[str, ...] = ()
    types: tuple[TensorType, ...] = ()
    modules: tuple[Any, ...] = ()
    module_names: tuple[str, ...] = ()
    modes: tuple[bool, ...] = ()

    def __post_init__(self) -> None:
        # Precomputed for the per-call reads and checks: the arrays' owners, the (table, name)
        # each is read from (a module's tables are never replaced), and (shape, dtype) pairs.
        object.__setattr__(self, "_owners", tuple({id(r.module): r.module for r in self.refs}.values()))
        object.__setattr__(self, "_slots", tuple((r.module.__dict__[r.table], r.attr) for r in self.refs))
        object.__setattr__(self, "_expected", tuple((t.shape, t.np_dtype) for t in self.types))

    def excluding(self, modules: Iterable[Any]) -> ModuleReads:
        """Without the modes of `modules` (a caller that sets their modes itself)."""
        ids = {id(m) for m in modules}
        kept = [i for i, m in enumerate(self.modules) if id(m) not in ids]
        return replace(self, modules=tuple(self.modules[i] for i in kept),
                       module_names=tuple(self.module_names[i] for i in kept),
                       modes=tuple(self.modes[i] for i in kept))

    def arrays(self) -> list[np.ndarray | None]:
        """The implicit inputs' arrays now; a training step holding newer values on a device
        copies them back first."""
        if self._owners:
            nn_module = sys.modules["graphc.nn.module"]  # loaded: it made the owners
            if nn_module.state_claimed():
                for module in self._owners:
                    nn_module.sync_state_holders(module)
        return [table.get(name) for table, name in self._slots]

    def matches(self, arrays: list[np.ndarray | None]) -> bool:
        """Whether the graph still computes what the modules would: same modes, same types."""
        for module, mode in zip(self.modules, self.modes):
            if module.training != mode:
                return False
        for array, (shape, dtype) in zip(arrays, self._expected):
            if array is None or array.shape != shape or (array.dtype is not dtype
                                                         and array.dtype != dtype):
                return False
        return True

    def changes(self, arrays: list[np.ndarray | None]) -> list[str]:
        """What differs now from when the graph was traced, in words, for the retrace log."""
        mode = {True: "train", False: "eval"}
        found = [f"mode of {name}: {mode[old]} -> {mode[m.training]}"
                 for m, name, old in zip(self.modules, self.module_names, self.modes)
                 if m.training != old]
        if len(found) > 3:  # model.train() flips every module: name a few
            found[3:] = [f"and of {len(found) - 3} more modules"]
        for name, array, old in zip(self.names, arrays, self.types):
            if array is None:
                found.append(f"{name}: no longer a parameter or buffer")
            elif array.shape != old.shape or array.dtype != old.np_dtype:
                found.append(f"{name}: {old} -> {TensorType.of(array)}")
        return found


class Trace:
    """One tracing session: the builder, the implicit RNG key input (created on first use) and
    the implicit inputs lifted from modules' parameters and buffers.

    A parameter or buffer a traced function reads, unless `bound` to a Tensor of this trace,
    becomes a graph input of its own (role "param" or "state", named by the module's path), so
    the compiled graph reads the module's current array at each call instead of baking in the
    value it had when traced. Implicit inputs come after all others but the RNG key.
    """

    def __init__(self, name: str) -> None:
        self.builder = Builder(name)
        self.rng_key: Value | None = None
        self.next_stream = 0
        # Set by compiled training steps: buffer updates recorded by modules (running stats).
        self.buffer_updates: dict | None = None
        self.implicit: dict[tuple[int, str], tuple[StateRef, Value, str]] = {}
        self.modules: dict[int, Any] = {}  # modules called: the graph depends on their modes
        self._calling: list[Any] = []  # modules whose forward is running, outermost first
        self._module_names: dict[int, str] = {}

    def random_key(self) -> tuple[Value, int]:
        """The (seed, counter) key input and a fresh stream number for one random op."""
        if self.rng_key is None:
            self.rng_key = self.builder.add_input(TensorType((2,), "int64"), "rng", role="rng")
        stream = self.next_stream
        self.next_stream += 1
        return self.rng_key, stream

    @contextmanager
    def calling(self, module: Any) -> Iterator[None]:
        """Within the block, `module`'s forward runs (names its submodules' inputs)."""
        if id(module) not in self.modules:
            self.modules[id(module)] = module
            self.module_name(module)  # while its callers are known
        outer_path = self.builder.module
        self.builder.module = self._module_path(module)  # the nodes it makes are stamped with it
        self._calling.append(module)
        try:
            yield
        finally:
            self._calling.pop()
            self.builder.module = outer_path

    def _module_path(self, module: Any) -> str | None:
        """`module`'s path from the outermost module being called ("encoder.layers.1"), None
        for that module itself: the provenance its nodes carry."""
        if not self._calling:
            return None
        parent, parent_path = self._calling[-1], self.builder.module
        name = next((n for n, m in parent._modules.items() if m is module), None)
        if name is None:  # not the caller's own child: look it up from the outermost module
            outermost = self._calling[0]
            found = next((p for p, m in outermost.named_modules() if m is module), None)
            name, parent_path = (found[:-1], None) if found else (type(module).__name__, parent_path)
            if not name:  # the outermost module, called again inside itself
                return None
        return safe_module_path(f"{parent_path}.{name}" if parent_path else name)

    def read_state(self, ref: StateRef, name: str | None = None) -> Tensor:
        """The implicit input standing for a module's parameter or buffer (one per ref), named
        `name` (an inner trace's name for it) or by the module's path."""
        key = (id(ref.module), ref.attr)
        found = self.implicit.get(key)
        if found is None:
            array = ref.read()
            role = "param" if ref.table == "_parameters" else "state"
            name = self._unique_input_name(name or f"{self.module_name(ref.module)}.{ref.attr}")
            value = self.builder.add_input(TensorType.of(array), name, role)
            inputs = self.builder.graph.inputs
            if self.rng_key is not None:  # the RNG key stays last
                lifted = inputs.pop()
                inputs.insert(next(i for i, inp in enumerate(inputs) if inp.value is self.rng_key),
                              lifted)
            found = self.implicit[key] = (ref, value, name)
        return Tensor(found[1])

    def module_name(self, module: Any) -> str:
        """The module's path from the outermost module being called that holds it
        ("Sequential.0"); a module outside them all is named by its type."""
        name = self._module_names.get(id(module))
        if name is None:
            for outer in self._calling:
                path = next((p for p, m in outer.named_modules() if m is module), None)
                if path is not None and outer is not module:
                    name = f"{self.module_name(outer)}.{path[:-1]}"
                    break
            else:
                name = self._fresh_root_name(type(module).__name__)
            self._module_names[id(module)] = name
        return name

    def _unique_input_name(self, name: str) -> str:
        taken = {i.name for i in self.builder.graph.inputs}
        unique, n = name, 1
        while unique in taken:
            n += 1
            unique = f"{name}_{n}"
        return unique

    def _fresh_root_name(self, base: str) -> str:
        taken = set(self._module_names.values()) | {i.name for i in self.builder.graph.inputs}
        name, n = base, 1
        while name in taken or any(t.startswith(name + ".") for t in taken):
            n += 1
            name = f"{base}_{n}"
        return name

    def module_reads(self) -> ModuleReads:
        implicit = list(self.implicit.values())
        modules = list(self.modules.values())
        return ModuleReads(
            refs=tuple(ref for ref, _, _ in implicit), names=tuple(name for _, _, name in implicit),
            types=tuple(value.type for _, value, _ in implicit),
            modules=tuple(modules), module_names=tuple(
                f"{self.module_name(m)} ({type(m).__name__})" for m in modules),
            modes=tuple(m.training for m in modules))


def matching_variant(last: Any, variants: Iterable[Any], signature: tuple) -> tuple[Any, list]:
    """Of the compiled variants (each with `.signature` and `.reads`), the one for these
    arguments whose module reads match the modules as they are now, with its implicit inputs'
    arrays; (None, []) when none does. The variant used last is tried first: the usual case."""
    others = (v for v in variants if v is not last)
    for variant in itertools.chain((last,) if last is not None else (), others):
        if variant.signature == signature:
            implicit = variant.reads.arrays()
            if variant.reads.matches(implicit):
                return variant, implicit
    return None, []


@contextmanager
def tracing(name: str) -> Iterator[Trace]:
    trace = Trace(name)
    _STATE.stack.append(trace)
    try:
        yield trace
    finally:
        _STATE.stack.pop()


def current_trace() -> Trace:
    if not _STATE.stack:
        raise GraphcError("this operation needs a trace: call it inside a function given to "
                          "gc.jit / gc.trace / gc.grad")
    return _STATE.stack[-1]


def is_tracing() -> bool:
    return bool(_STATE.stack)


def bind(op: str, *inputs: Tensor, **attrs: Any) -> Tensor:
    return Tensor(current_trace().builder.bind(op, *(t.value for t in inputs), **attrs))


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    """Tensors pass through; Python numbers take `like`'s dtype; arrays become constants."""
    if isinstance(x, Tensor):
        return x
    b = current_trace().builder
    if isinstance(x, (bool, int, float, np.number)) and like is not None:
        if isinstance(x, float) and not float(x).is_integer() and not is_float(like.dtype):
            raise DTypeError(f"cannot combine {x!r} with a {like.dtype} tensor without a cast "
                             f"(at {user_location()})")
        return Tensor(b.const(x, like.dtype))
    arr = np.asarray(x)
    if arr.dtype == np.float64 and isinstance(x, float):
        arr = arr.astype(np.float32)  # Python floats default to float32, as in PyTorch
    return Tensor(b.const(arr, canonical_dtype(arr.dtype)))


def _normalize_axes(axis: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    out = []
    for a in axes:
        if not -ndim <= a < max(ndim, 1):
            raise ShapeError(f"axis {a} is out of range for a tensor of rank {ndim} (at {user_location()})")
        out.append(a % ndim if ndim else 0)
    return tuple(out)


class Tensor:
    """A traced value: an SSA value of the graph under construction with Python operators."""

    __slots__ = ("value",)
    __array_priority__ = 1000  # numpy scalars/arrays on the left defer to Tensor's operators

    def __init__(self, value: Value) -> None:
        self.value = value

    # -- static facts ----------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.value.shape

    @property
    def dtype(self) -> str:
        return self.value.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return self.value.type.size

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Tensor({SHORT_NAMES[self.dtype]}{list(self.shape)})"

    def __bool__(self) -> bool:
        raise GraphcError("a traced Tensor has no value yet, so it cannot decide Python control "
                          f"flow (if/while on a tensor at {user_location()}); use gc.where instead")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # -- arithmetic ------------------------------------------------------------------------
    def _binary(self, op: str, other: Any, reverse: bool = False) -> Tensor:
        other = as_tensor(other, like=self)
        return bind(op, other, self) if reverse else bind(op, self, other)

    def __add__(self, o): return self._binary("add", o)
    def __radd__(self, o): return self._binary("add", o, True)
    def __sub__(self, o): return self._binary("sub", o)
    def __rsub__(self, o): return self._binary("sub", o, True)
    def __mul__(self, o): return self._binary("mul", o)
    def __rmul__(self, o): return self._binary("mul", o, True)
    def __truediv__(self, o): return self._binary("div", o)
    def __rtruediv__(self, o): return self._binary("div", o, True)
    def __pow__(self, o):
        if isinstance(o, (int, float)) and o == 2:
            return bind("square", self)
        return self._binary("pow", o)
    def __rpow__(self, o): return self._binary("pow", o, True)
    def __matmul__(self, o): return matmul(self, as_tensor(o, like=self))
    def __rmatmul__(self, o): return matmul(as_tensor(o, like=self), self)
    def __neg__(self): return bind("neg", self)
    def __pos__(self): return self
    def __abs__(self): return bind("abs", self)
    def __lt__(self, o): return self._binary("lt", o)
    def __le__(self, o): return self._binary("le", o)
    def __gt__(self, o): return self._binary("gt", o)
    def __ge__(self, o): return self._binary("ge", o)
    def __eq__(self, o): return self._binary("eq", o)  # type: ignore[override]
    def __ne__(self, o): return self._binary("ne", o)  # type: ignore[override]
    def __and__(self, o): return self._binary("logical_and", o)
    def __or__(self, o): return self._binary("logical_or", o)
    def __invert__(self): return bind("logical_not", self)
    __hash__ = object.__hash__

    # -- elementwise methods -------------------------------------------------------------------
    def exp(self): return bind("exp", self)
    def log(self): return bind("log", self)
    def sqrt(self): return bind("sqrt", self)
    def tanh(self): return bind("tanh", self)
    def sigmoid(self): return bind("sigmoid", self)
    def relu(self): return bind("relu", self)
    def abs(self): return bind("abs", self)
    def square(self): return bind("square", self)

    def astype(self, dtype: Any) -> Tensor:
        return bind("cast", self, dtype=canonical_dtype(dtype))

    float = lambda self: self.astype("float32")  # noqa: E731

    # -- reductions ------------------------------------------------------------------------
    def sum(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return bind("sum", self, axes=_normalize_axes(axis, self.ndim), keepdims=keepdims)

    def mean(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        axes = _normalize_axes(axis, self.ndim)
        count = int(np.prod([self.shape[a] for a in axes], dtype=np.int64))
        return self.sum(axes, keepdims) * (1.0 / max(count, 1))

    def max(self, axis: int | Sequence[int] | None = None, keepdims: bool = False) -> Tensor:
        return bind("max", self, axes=_normalize_axes(axis, self.ndim), keepdims=keepdims)

    def argmax(self, axis: int | None = None, keepdims: bool = False) -> Tensor:
        if axis is None:
            return self.reshape(-1).argmax(0)
        (axis,) = _normalize_axes(axis, self.ndim)
        return bind("argmax", self, axis=axis, keepdims=keepdims)

    # -- shape -----------------------------------------------------------------------------
    def reshape(self, *shape: int | Sequence[int]) -> Tensor:
        dims = list(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else list(shape)
        if dims.count(-1) > 1:
            raise ShapeError(f"reshape: at most one -1 in {tuple(dims)} (at {user_location()})")
        if -1 in dims:
            known = int(np.prod([d for d in dims if d != -1], dtype=np.int64))
            if known == 0 or self.size % known:
                raise ShapeError(f"reshape: cannot reshape {self.shape} into {tuple(dims)} "
                                 f"(at {user_location()})")
            dims[dims.index(-1)] = self.size // known
        return bind("reshape", self, shape=tuple(dims))

    view = reshape

    def transpose(self, *dims: int) -> Tensor:
        """PyTorch's meaning: swap two axes. With no arguments, reverse all axes (NumPy's)."""
        if not dims:
            return bind("transpose", self, perm=tuple(reversed(range(self.ndim))))
        if len(dims) != 2:
            raise GraphcError(f"transpose takes two axes to swap; use permute for a permutation "
                              f"(at {user_location()})")
        a, b = _normalize_axes(dims, self.ndim)
        perm = list(range(self.ndim))
        perm[a], perm[b] = perm[b], perm[a]
        return bind("transpose", self, perm=tuple(perm))

    def permute(self, *dims: int) -> Tensor:
        dims = tuple(dims[0]) if len(dims) == 1 and not isinstance(dims[0], int) else dims
        return bind("transpose", self, perm=_normalize_axes(dims, self.ndim))

    @property
    def T(self) -> Tensor:
        return self.transpose()

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        if self.ndim == 0:
            return self.reshape(1)
        start, end = _normalize_axes((start_dim, end_dim), self.ndim)
        merged = int(np.prod(self.shape[start:end + 1], dtype=np.int64))
        return self.reshape(self.shape[:start] + (merged,) + self.shape[end + 1:])

    def unsqueeze(self, dim: int) -> Tensor:
        return bind("expand_dims", self, axes=(dim % (self.ndim + 1),))

    def squeeze(self, dim: int | Sequence[int] | None = None) -> Tensor:
        axes = (tuple(i for i, d in enumerate(self.shape) if d == 1) if dim is None
                else _normalize_axes(dim, self.ndim))
        return bind("squeeze", self, axes=axes) if axes else self

    def broadcast_to(self, shape: Sequence[int]) -> Tensor:
        return bind("broadcast_to", self, shape=tuple(shape))

    expand = broadcast_to

    def __getitem__(self, index: Any) -> Tensor:
        return _getitem(self, index)

    # -- NumPy and PyTorch functions called on a Tensor (see graphc/interop.py) --------------
    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Tensor:
        from . import interop
        return interop.array_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        from . import interop
        return interop.array_function(func, args, kwargs)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        from . import interop
        return interop.torch_function(func)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    """NumPy matmul semantics, 1-D operands included (promoted, then squeezed)."""
    if a.ndim == 0 or b.ndim == 0:
        raise ShapeError(f"matmul: operands must have at least one dimension, got {a.shape} and "
                         f"{b.shape} (at {user_location()})")
    a_vector, b_vector = a.ndim == 1, b.ndim == 1
    out = bind("matmul", a.reshape(1, -1) if a_vector else a, b.reshape(-1, 1) if b_vector else b)
    if b_vector:
        out = out.squeeze(-1)
    if a_vector:
        out = out.squeeze(-1 if b_vector else -2)
    return out


def _getitem(x: Tensor, index: Any) -> Tensor:
    """Basic indexing: ints, slices (positive steps), None and Ellipsis."""
    index = index if isinstance(index, tuple) else (index,)
    if any(isinstance(i, Tensor) or isinstance(i, (list, np.ndarray)) for i in index):
        raise GraphcError(f"advanced (tensor) indexing is not supported by []: use gc.gather or "
                          f"take_along_axis (at {user_location()})")
    if index.count(Ellipsis) > 1:
        raise ShapeError("an index can only have a single ellipsis")
    explicit = sum(1 for i in index if i is not None and i is not Ellipsis)
    if explicit > x.ndim:
        raise ShapeError(f"too many indices for a tensor of shape {x.shape} (at {user_location()})")
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (x.ndim - explicit) + index[at + 1:]
    else:
        index = index + (slice(None),) * (x.ndim - explicit)
    starts, stops, steps, drop, new_axes = [], [], [], [], []
    axis = 0
    out_axis = 0
    for item in index:
        if item is None:
            new_axes.append(out_axis)
            out_axis += 1
            continue
        dim = x.shape[axis]
        if isinstance(item, (int, np.integer)):
            if not -dim <= item < dim:
                raise ShapeError(f"index {item} is out of bounds for axis {axis} with size {dim} "
                                 f"(at {user_location()})")
            start = int(item) % dim
            starts.append(start), stops.append(start + 1), steps.append(1), drop.append(axis)
        elif isinstance(item, slice):
            start, stop, step = item.indices(dim)
            if step <= 0:
                raise GraphcError(f"slices with non-positive steps are not supported (at {user_location()})")
            starts.append(start), stops.append(max(stop, start)), steps.append(step)
            out_axis += 1
        else:
            raise GraphcError(f"unsupported index {item!r} (at {user_location()})")
        axis += 1
    out = x
    if (tuple(starts), tuple(stops), tuple(steps)) != ((0,) * x.ndim, x.shape, (1,) * x.ndim):
        out = bind("slice", x, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))
    if drop:
        out = bind("squeeze", out, axes=tuple(drop))
    if new_axes:
        out = bind("expand_dims", out, axes=tuple(new_axes))
    return out
