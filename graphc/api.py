"""Function transformations: trace, jit, grad, value_and_grad.

Each turns a Python function over tensors into a graph, transforms the graph (autodiff,
simplify) and runs it on a backend, caching one compiled graph per input signature. Called
inside another trace, a transformed function is inlined instead, so they compose:
``gc.jit(gc.grad(gc.grad(f)))`` is one graph.
"""
from __future__ import annotations

import functools
import inspect
import logging
import sys
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from graphc.backends.signature import host_array
from graphc.ir import Graph, InputError, Node, TensorType, Value
from graphc.ir.types import DTYPES
from graphc.ir.errors import GraphcError, user_location, without_internal_frames
from graphc.ir.graph import GraphInput, safe_module_path
from graphc.passes import SIMPLIFY, Stages, autodiff
from graphc.tree import TreeDef, flatten, unflatten

from . import random as gc_random
from .lowering import collecting_new_objects_only, compile_graph
from .tensor import (ModuleReads, Tensor, current_trace, is_tracing, keep_recent_variants,
                     matching_variant, tracing, variant_key)

log = logging.getLogger("graphc")


def user_facing(fn: Callable) -> Callable:
    """Re-raise graphc errors with graphc's own frames removed from the traceback."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # noqa: F841  (pytest hides this re-raising frame too)
        try:
            return fn(*args, **kwargs)
        except GraphcError as exc:
            raise exc.with_traceback(without_internal_frames(exc.__traceback__)) from None
    return wrapper


# -- arguments -----------------------------------------------------------------------------
def _leaf_type(leaf: Any, path: str, number_dtype: type = np.float32) -> TensorType:
    if isinstance(leaf, TensorType):
        return leaf
    if isinstance(leaf, Tensor):
        return leaf.value.type
    return TensorType.of(to_array(leaf, path, number_dtype))


def python_number_dtype(leaves: Sequence[Any]) -> type:
    """The dtype a Python float argument takes: float64 beside a float64 array argument (in
    PyTorch a Python number keeps double precision, so x64 * 0.1 is exact), float32 otherwise."""
    wide = any(str(getattr(leaf, "dtype", "")) in ("float64", "torch.float64")
               and not isinstance(leaf, np.floating) for leaf in leaves)
    return np.float64 if wide else np.float32


def to_array(leaf: Any, path: str = "argument", number_dtype: type = np.float32) -> np.ndarray:
    """A call argument as an array; Python floats become `number_dtype` (float32 by default,
    see python_number_dtype), and float32 in (nested) lists, as in PyTorch
    (torch.tensor([1.0, 2.0]) is float32)."""
    if isinstance(leaf, np.ndarray):
        arr = leaf
    elif isinstance(leaf, (dict, str, bytes)):
        raise InputError(f"{path}: is a {type(leaf).__name__}, not an array; pass each array as "
                         f"an argument of its own (a batch (inputs..., target) as step(*batch))")
    elif isinstance(leaf, float) and not isinstance(leaf, np.floating):  # np.float64 stays float64
        arr = np.asarray(leaf, dtype=number_dtype)
    elif str(getattr(leaf, "dtype", "")) == "torch.bfloat16":  # NumPy has no bfloat16
        raise InputError(f"{path}: dtype bfloat16 is not supported; use float32/float64 "
                         f"(x.float()) or int32/int64/bool")
    else:
        try:
            arr = host_array(leaf)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{path}: cannot be read as an array ({exc}); ragged nested lists "
                             "are not tensors") from None
        if isinstance(leaf, list) and arr.dtype == np.float64 and not _holds_numpy_floats(leaf):
            arr = arr.astype(np.float32)
    if arr.dtype.kind == "O" and not isinstance(leaf, (np.ndarray, list)):
        raise InputError(f"{path}: is a {type(leaf).__name__}, which a traced function cannot "
                         f"take as an argument: pass its arrays (tuples, lists, dicts and "
                         f"namedtuples of arrays are taken apart), or close over it")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: arrays of dtype {arr.dtype} ({type(leaf).__name__}) are not "
                         "supported; pass numeric or bool arrays")
    if arr.dtype.name not in DTYPES:  # uint8, int16, float16, float128...
        raise InputError(f"{path}: dtype {arr.dtype} is not supported; use float32/float64/int32/"
                         "int64/bool")
    return arr


def _holds_numpy_floats(numbers: list) -> bool:
    return any(_holds_numpy_floats(v) if isinstance(v, list) else isinstance(v, np.floating)
               for v in numbers)


def _arg_names(fn: Callable, count: int) -> list[str]:
    if hasattr(type(fn), "forward"):  # a module: its forward's parameters name the inputs
        fn = fn.forward
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(count)]


def _input_names(fn: Callable, paths: list[str], count: int) -> list[str]:
    """'[0][\'w\']' -> "params['w']" using the function's own parameter names."""
    names = _arg_names(fn, count)
    result = []
    for path in paths:
        index, _, rest = path[1:].partition("]")
        result.append(names[int(index)] + rest)
    return result


# -- tracing -------------------------------------------------------------------------------
class Traced(NamedTuple):
    """A traced (and staged) function: its graph takes the explicit arguments' leaves, then
    the tensors of an enclosing trace it closes over (`captured`, that trace's values), then the
    modules' parameters and buffers it reads (`reads`), then the RNG key if it draws."""

    graph: Graph
    out_tree: TreeDef
    reads: ModuleReads
    captured: tuple[Value, ...] = ()


def _trace(fn: Callable, args: Sequence[Any], name: str) -> tuple[Traced, list[str]]:
    """Trace fn on example args into a graph; returns it with the output paths."""
    leaves, paths, treedef = flatten(tuple(args), is_leaf=lambda x: isinstance(x, TensorType))
    names = _input_names(fn, paths, len(args))
    with tracing(name) as t:
        owner = getattr(fn, "__self__", None)  # a module's method: its mode and settings count
        nn_module = sys.modules.get("graphc.nn.module")
        if nn_module is not None and isinstance(owner, nn_module.Module):
            t.modules.setdefault(id(owner), owner)
            t.note_settings(owner)
        number_dtype = python_number_dtype(leaves)
        tensors = [Tensor(t.builder.add_input(_leaf_type(l, p, number_dtype), n))
                   for l, p, n in zip(leaves, paths, names)]
        result = fn(*unflatten(treedef, tensors))
        out_leaves, out_paths, out_tree = flatten(result)
        if not out_leaves:
            raise GraphcError(f"{name}: the traced function returned no tensors")
        for path, leaf in zip(out_paths, out_leaves):
            if not isinstance(leaf, Tensor):
                from .tensor import as_tensor
                leaf = as_tensor(leaf)
            t.builder.add_output(path or "out", leaf.value)
        if t.rng_key is not None:
            # Keep the RNG key last: callers append it after the user's arguments.
            rng = t.builder.graph.inputs.pop(next(i for i, inp in enumerate(t.builder.graph.inputs)
                                                  if inp.value is t.rng_key))
            t.builder.graph.inputs.append(rng)
    escaped = [v for v in _outer_values(t.builder.graph) if v in t.scan_body_values]
    if escaped:
        where = escaped[0].producer.loc if escaped[0].producer is not None else None
        raise GraphcError(f"{name}: a value computed inside a gc.scan body is read after the loop "
                          f"(kept in an outer variable or a list){f' (computed at {where})' if where else ''}; "
                          f"the body's values exist only inside it: return it from the body in y or "
                          f"in the carry")
    captured = _lift_captured(t.builder.graph, len(leaves))
    return Traced(t.builder.graph, out_tree, t.module_reads(), captured), out_paths


def _outer_values(graph: Graph) -> tuple[Value, ...]:
    """The values `graph` reads (as operands or outputs) that it does not define."""
    defined = set(graph.input_values) | {v for node in graph.nodes for v in node.outputs}
    outer = [v for node in graph.nodes for v in node.inputs if v not in defined]
    return tuple(dict.fromkeys(outer + [v for v in graph.output_values if v not in defined]))


def _lift_captured(graph: Graph, position: int) -> tuple[Value, ...]:
    """The values of enclosing traces that `graph` reads (a function traced inside another,
    gc.grad's inside gc.jit's, closing over the outer function's tensors), each made an input
    of `graph` inserted at `position`, after the function's arguments, as JAX converts closures."""
    outer = _outer_values(graph)
    if not outer:
        return ()
    lifted = {v: Value(v.type) for v in outer}
    for node in graph.nodes:
        node.inputs = tuple(lifted.get(v, v) for v in node.inputs)
    graph.outputs = [(name, lifted.get(v, v)) for name, v in graph.outputs]
    graph.inputs[position:position] = [GraphInput(f"captured{i}", "data", lifted[v])
                                       for i, v in enumerate(outer)]
    return outer


@user_facing
def trace(fn: Callable, *example_args: Any) -> Graph:
    """Trace `fn` on example arguments (arrays, numbers or TensorTypes) into a graph."""
    name = getattr(fn, "__name__", "fn")
    traced = _trace(fn, example_args, name)[0]
    _refuse_captured(traced, name)
    return traced.graph


def _refuse_captured(traced: Traced, name: str) -> None:
    """A function traced on its own reads no other trace's tensors: one kept from an earlier
    trace (a global, a closure) has no value at the call."""
    if traced.captured:
        raise GraphcError(f"{name} reads {len(traced.captured)} tensor(s) of another traced function "
                          f"(kept from an earlier trace: a closure or a global); pass the array as an "
                          f"argument instead")


def inline_graph(graph: Graph, args: Sequence[Tensor], reads: ModuleReads = ModuleReads()
                 ) -> list[Tensor]:
    """Copy `graph` into the trace in progress, reading its inputs from `args`; its implicit
    inputs (`reads`, after `args`) become the modules' Tensors in this trace, its RNG key
    input this trace's key (its random streams renumbered after the trace's own). Nodes keep
    their user lines and their module paths, below the module calling them."""
    from .nn.module import traced_state

    t = current_trace()
    mapping: dict[Value, Value] = {}
    for inp, arg in zip(graph.inputs, args):
        mapping[inp.value] = arg.value
    for inp, ref in zip(graph.inputs[len(args):], reads.refs):
        mapping[inp.value] = traced_state(ref, inp.name).value
    for module in reads.modules:
        t.modules.setdefault(id(module), module)
    for module, _, attr, array, values in reads.attribute_arrays:
        t.attribute_arrays.setdefault((id(module), attr), (module, attr, array, values))
    for cls, attr, value in reads.class_settings:
        t.class_settings.setdefault((id(cls), attr), (cls, attr, value))
    if graph.inputs and graph.inputs[-1].role == "rng":
        key, first_stream = t.random_key()
        mapping[graph.inputs[-1].value] = key
    stream_offset = None
    caller_module = t.builder.module  # inlined nodes keep their module paths below the caller's
    for node in graph.nodes:
        attrs = node.attrs
        if "stream" in attrs and node.op.startswith("random_"):
            # Keep the inlined graph's random streams distinct from the caller's.
            if stream_offset is None:
                stream_offset = first_stream
            attrs = {**attrs, "stream": attrs["stream"] + stream_offset}
            t.next_stream = max(t.next_stream, attrs["stream"] + 1)
        t.builder.loc = node.loc
        t.builder.module = safe_module_path(".".join(p for p in (caller_module, node.module) if p)) or None
        if node.subgraph is not None:  # a scan: its body is closed, copied as it is
            clone = Node(node.op, tuple(mapping[v] for v in node.inputs), attrs,
                         tuple(v.type for v in node.outputs), node.loc, node.subgraph, t.builder.module)
            t.builder.graph.nodes.append(clone)
            mapping.update(zip(node.outputs, clone.outputs))
            continue
        mapping[node.output] = t.builder.bind(node.op, *(mapping[v] for v in node.inputs), **attrs)
    t.builder.loc, t.builder.module = None, caller_module
    return [Tensor(mapping[v]) for v in graph.output_values]


# -- staged functions ------------------------------------------------------------------------
class _Entry(NamedTuple):
    signature: tuple
    executable: Any
    graph: Graph
    out_tree: TreeDef
    reads: ModuleReads


class Staged:
    """A traced-and-compiled function with one compiled graph per input signature.

    `stage(graph, in_tree, out_tree) -> (graph, out_tree)` transforms the traced
    graph (e.g. differentiates it) before it is simplified and compiled; `stage_name` names its
    result among the compilation's stages (GRAPHC_DUMP).

    Called inside another trace (a function given to an outer jit, grad or compile), a Staged
    function is inlined into that trace instead of compiled: only the outermost wrapper
    compiles, on its own backend. Parameters and buffers of the modules it reaches are read at
    each call; the modules' train/eval modes and the arrays' types are part of the signature.
    """

    def __init__(self, fn: Callable, backend: str | None = None,
                 stage: Callable[..., tuple[Graph, TreeDef]] | None = None, name: str | None = None,
                 stage_name: str = "stage") -> None:
        self.fn = fn
        self.backend = backend
        self.stage = stage
        self.stage_name = stage_name
        self.name = name or getattr(fn, "__name__", type(fn).__name__)
        self._cache: dict[tuple, _Entry] = {}
        self._last: _Entry | None = None
        self._keyword_variants: dict[tuple[int, tuple[str, ...]], Staged] = {}
        # Name, doc and __wrapped__ only: the wrapped function's __dict__ (an inner Staged's
        # backend, stage and cache) must not overwrite this wrapper's own.
        functools.update_wrapper(self, fn, updated=())

    def __reduce_ex__(self, protocol: Any) -> Any:  # copy, deepcopy and pickle
        raise GraphcError(f"{self.name}: a gc.jit, gc.grad or gc.value_and_grad function cannot "
                          "be copied or pickled (it holds compiled code): wrap the copied model or "
                          "function again")

    def build(self, args: Sequence[Any], stages: Stages) -> Traced:
        traced, _ = _trace(self.fn, args, self.name)
        graph, out_tree = stages.record("trace", traced.graph), traced.out_tree
        in_tree = flatten(tuple(args), is_leaf=lambda x: isinstance(x, TensorType))[2]
        if self.stage is not None:
            graph, out_tree = self.stage(graph, in_tree, out_tree)
            stages.record(self.stage_name, graph)
        return Traced(stages.run(graph, [SIMPLIFY]), out_tree, traced.reads, traced.captured)

    @user_facing
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs:
            return self._keyword_variant(len(args), tuple(kwargs))(*args, *kwargs.values())
        leaves, paths, treedef = flatten(args)
        if is_tracing():  # staged into the caller's graph, even on constant arguments
            from .tensor import as_tensor
            tensors = [as_tensor(l) for l in leaves]
            traced = self.build(unflatten(treedef, tensors), Stages(self.name))
            tensors += [Tensor(v) for v in traced.captured]
            return unflatten(traced.out_tree, inline_graph(traced.graph, tensors, traced.reads))
        names = _input_names(self.fn, paths, len(args))
        number_dtype = python_number_dtype(leaves)
        arrays = [to_array(l, n, number_dtype) for l, n in zip(leaves, names)]
        signature = (treedef, tuple((a.shape, a.dtype.name) for a in arrays))
        entry, implicit = matching_variant(self._last, self._cache, signature)
        if entry is None:
            self._log_retrace(signature, names)
            stages = Stages(self.name)
            with collecting_new_objects_only():
                traced = self.build(arrays_like(treedef, arrays), stages)
                _refuse_captured(traced, self.name)
                executable = compile_graph(traced.graph, self.backend, stages=stages)
            reads = traced.reads
            entry = _Entry(signature, executable, traced.graph, traced.out_tree, reads)
            self._cache[variant_key(signature, reads)] = entry
            keep_recent_variants(self._cache, keep=(entry,))
            implicit = reads.arrays()
        self._last = entry
        arrays += implicit
        if entry.graph.inputs and entry.graph.inputs[-1].role == "rng":
            arrays.append(gc_random.next_key())
        return unflatten(entry.out_tree, entry.executable(*arrays))

    def _keyword_variant(self, count: int, keys: tuple[str, ...]) -> Staged:
        """This function called with `count` positional arguments and then keyword arguments
        `keys` (in that order), as a function of them all in that order: each such call pattern
        is traced and compiled once. Gradients' argnums count the positional ones alone."""
        differentiated = getattr(self.stage, "argnums", ())
        if any(not -count <= a < count for a in differentiated):
            # as JAX: the keywords' order is the caller's, so no position can name one of them
            raise GraphcError(f"{self.name}: argnums {differentiated} counts the positional arguments, "
                              f"but this call passes {count} positionally and {', '.join(keys)} by "
                              f"keyword: pass the differentiated arguments positionally "
                              f"(at {user_location()})")
        variant = self._keyword_variants.get((count, keys))
        if variant is None:
            fn = self.fn

            def with_keywords(*values: Any) -> Any:
                return fn(*values[:count], **dict(zip(keys, values[count:])))
            names = _arg_names(fn, count) + list(keys)  # the inputs' names in errors and graphs
            with_keywords.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
                [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in names])
            stage = self.stage
            if any(a < 0 for a in differentiated):
                stage = stage.counted_from(count)
            variant = Staged(with_keywords, self.backend, stage, self.name, self.stage_name)
            self._keyword_variants[(count, keys)] = variant
        return variant

    def _log_retrace(self, signature: tuple, names: list[str]) -> None:
        previous = self._last
        if previous is None:
            return
        if previous.signature == signature:
            changes = previous.reads.changes(previous.reads.arrays())
            log.warning("graphc: retracing %s: %s", self.name, "; ".join(changes))
            return
        if previous.signature[0] != signature[0]:
            log.warning("graphc: retracing %s: the structure of its arguments changed", self.name)
            return
        changes = [f"{n}: {TensorType(*old)} -> {TensorType(*new)}"
                   for n, old, new in zip(names, previous.signature[1], signature[1]) if old != new]
        log.warning("graphc: retracing %s for a new input signature (%s)", self.name, "; ".join(changes))

    def lower(self, *args: Any) -> Graph:
        """The optimized graph this function compiles for these arguments."""
        return self.build(args, Stages(self.name)).graph


def arrays_like(treedef: TreeDef, arrays: list[np.ndarray]) -> Any:
    return unflatten(treedef, [TensorType.of(a) for a in arrays])


def staged(fn: Callable | None) -> Staged | None:
    """`fn` jitted, unless it is already (or None)."""
    return fn if fn is None or isinstance(fn, Staged) else jit(fn)


def jit(fn: Callable | None = None, *, backend: str | None = None) -> Any:
    """Trace `fn` on its first call for each input signature, compile it, and run it.

    Parameters and buffers of every `graphc.nn.Module` the function reaches (called, or read
    as attributes) are inputs of the compiled graph, read from the module at each call: after
    training, `load_state_dict` or reassigning a parameter, the function computes with the new
    weights. A weight of a new shape or dtype, or a module switched between train() and eval(),
    compiles again (and says so). Arrays captured from a closure are constants, as in JAX:
    their values at the first call are baked in; pass arrays that change as arguments.
    """
    if fn is None:
        return lambda f: jit(f, backend=backend)
    return Staged(fn, backend=backend)


def _argnum_leaf_indices(in_tree: TreeDef, argnums: tuple[int, ...]) -> list[list[int]]:
    offsets = np.cumsum([0] + [c.num_leaves for c in in_tree.children])
    return [list(range(offsets[a], offsets[a + 1])) for a in argnums]


def _argnums(argnums: Any) -> tuple[int, ...]:
    """`argnums` as a tuple: an integer (NumPy's too, as JAX takes it) or a tuple or list of them."""
    nums = argnums if isinstance(argnums, (tuple, list)) else (argnums,)
    if not all(isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in nums):
        raise GraphcError(f"grad: argnums must be an integer or a tuple or list of integers, got "
                          f"{argnums!r}")
    return tuple(int(a) for a in nums)


def _grad_stage(argnums: int | Sequence[int], has_aux: bool, with_value: bool):
    nums = _argnums(argnums)
    single = not isinstance(argnums, (tuple, list))

    def stage(graph: Graph, in_tree: TreeDef, out_tree: TreeDef):
        if has_aux:
            if out_tree.kind not in ("tuple", "list") or len(out_tree.children) != 2:
                raise GraphcError("has_aux=True needs the function to return (loss, aux)")
            value_tree, aux_tree = out_tree.children
        else:
            value_tree, aux_tree = out_tree, None
        if value_tree.kind != "leaf":
            raise GraphcError("grad needs the function to return one scalar tensor"
                              + (" as the first element of (loss, aux)" if has_aux else ""))
        count = len(in_tree.children)
        if any(not -count <= a < count for a in nums):
            raise GraphcError(f"grad: argnums {nums} out of range for {count} arguments")
        positions = tuple(a % count for a in nums)  # a negative one counts from the last argument
        groups = _argnum_leaf_indices(in_tree, positions)
        wrt = [i for g in groups for i in g]
        for a, g in zip(positions, groups):
            if not g:
                raise GraphcError(f"grad: argument {a} holds no arrays to differentiate")
        loss_name = graph.outputs[0][0]
        grad_graph = autodiff(graph, wrt, output=loss_name)
        n_out = len(graph.outputs)
        values, aux, grads = (grad_graph.outputs[:n_out], grad_graph.outputs[1:n_out],
                              grad_graph.outputs[n_out:])
        # Leaves in the order of the output structure below.
        grad_graph.outputs = values + grads if with_value else grads + aux if has_aux else grads
        # Output structure: grads shaped like the differentiated arguments.
        arg_trees = [in_tree.children[a] for a in positions]
        grads_tree = arg_trees[0] if single else TreeDef("tuple", len(arg_trees), tuple(arg_trees))
        if with_value:
            tree = TreeDef("tuple", 2, (out_tree, grads_tree))
        elif has_aux:
            tree = TreeDef("tuple", 2, (grads_tree, aux_tree))
        else:
            tree = grads_tree
        return grad_graph, tree

    stage.argnums = nums  # type: ignore[attr-defined]  (positions among the positional arguments)

    def counted_from(count: int):
        """This stage for a call passing `count` arguments positionally and more by keyword:
        its negative argnums count from the last positional one, as in torch.func.grad."""
        positions = tuple(a % count for a in nums)
        return _grad_stage(positions[0] if single else positions, has_aux, with_value)
    stage.counted_from = counted_from  # type: ignore[attr-defined]
    return stage


def grad(fn: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         backend: str | None = None) -> Staged:
    """The gradient of a scalar function w.r.t. argument(s) `argnums`, by symbolic autodiff."""
    return Staged(fn, backend, _grad_stage(argnums, has_aux, with_value=False), stage_name="autodiff")


def value_and_grad(fn: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                   backend: str | None = None) -> Staged:
    """Like grad, returning (value, gradients); with has_aux, ((value, aux), gradients)."""
    return Staged(fn, backend, _grad_stage(argnums, has_aux, with_value=True), stage_name="autodiff")
