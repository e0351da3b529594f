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
from typing import Any, Callable, Sequence

import numpy as np

from graphc.backends import compile_graph
from graphc.ir import Graph, InputError, TensorType, Value
from graphc.ir.errors import GraphcError, without_internal_frames
from graphc.passes import SIMPLIFY, autodiff, run_pipeline
from graphc.tree import TreeDef, flatten, unflatten

from . import random as gc_random
from .tensor import Tensor, current_trace, is_tracing, tracing

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
def _leaf_type(leaf: Any, path: str) -> TensorType:
    if isinstance(leaf, TensorType):
        return leaf
    if isinstance(leaf, Tensor):
        return leaf.value.type
    return TensorType.of(to_array(leaf, path))


def to_array(leaf: Any, path: str = "argument") -> np.ndarray:
    """A call argument as an array; Python floats become float32, as in PyTorch."""
    if isinstance(leaf, np.ndarray):
        arr = leaf
    elif isinstance(leaf, float):
        arr = np.asarray(leaf, dtype=np.float32)
    else:
        try:
            arr = np.asarray(leaf)
        except (ValueError, TypeError) as exc:
            raise InputError(f"{path}: cannot be read as an array ({exc}); ragged nested lists "
                             "are not tensors") from None
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: arrays of dtype {arr.dtype} ({type(leaf).__name__}) are not "
                         "supported; pass numeric or bool arrays")
    if arr.dtype.kind == "u" or arr.dtype == np.float16:
        raise InputError(f"{path}: dtype {arr.dtype} is not supported; use float32/float64/int32/"
                         "int64/bool")
    return arr


def _arg_names(fn: Callable, count: int) -> list[str]:
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
def _trace(fn: Callable, args: Sequence[Any], name: str) -> tuple[Graph, TreeDef, list[str]]:
    """Trace fn on example args into a graph; returns (graph, output structure, output paths)."""
    leaves, paths, treedef = flatten(tuple(args), is_leaf=lambda x: isinstance(x, TensorType))
    names = _input_names(fn, paths, len(args))
    with tracing(name) as t:
        tensors = [Tensor(t.builder.add_input(_leaf_type(l, p), n))
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
    return t.builder.graph, out_tree, out_paths


@user_facing
def trace(fn: Callable, *example_args: Any) -> Graph:
    """Trace `fn` on example arguments (arrays, numbers or TensorTypes) into a graph."""
    graph, _, _ = _trace(fn, example_args, getattr(fn, "__name__", "fn"))
    return graph


def _inline(graph: Graph, args: list[Tensor]) -> list[Tensor]:
    """Copy `graph` into the trace in progress, reading its inputs from `args`."""
    t = current_trace()
    mapping: dict[Value, Value] = {}
    for inp, arg in zip(graph.inputs, args):
        mapping[inp.value] = arg.value
    if graph.inputs and graph.inputs[-1].role == "rng":
        key, first_stream = t.random_key()
        mapping[graph.inputs[-1].value] = key
    stream_offset = None
    for node in graph.nodes:
        attrs = node.attrs
        if "stream" in attrs and node.op.startswith("random_"):
            # Keep the inlined graph's random streams distinct from the caller's.
            if stream_offset is None:
                stream_offset = first_stream
            attrs = {**attrs, "stream": attrs["stream"] + stream_offset}
            t.next_stream = max(t.next_stream, attrs["stream"] + 1)
        t.builder.loc = node.loc
        mapping[node.output] = t.builder.bind(node.op, *(mapping[v] for v in node.inputs), **attrs)
    t.builder.loc = None
    return [Tensor(mapping[v]) for v in graph.output_values]


# -- staged functions ------------------------------------------------------------------------
class Staged:
    """A traced-and-compiled function with one compiled graph per input signature.

    `stage(graph, in_tree, out_tree) -> (graph, out_tree)` transforms the traced
    graph (e.g. differentiates it) before it is simplified and compiled.
    """

    def __init__(self, fn: Callable, backend: str | None = None,
                 stage: Callable[..., tuple[Graph, TreeDef]] | None = None, name: str | None = None) -> None:
        self.fn = fn
        self.backend = backend
        self.stage = stage
        self.name = name or getattr(fn, "__name__", "fn")
        self._cache: dict[tuple, tuple[Any, Graph, TreeDef]] = {}
        self._last_signature: tuple | None = None
        functools.update_wrapper(self, fn)

    def build(self, args: Sequence[Any]) -> tuple[Graph, TreeDef]:
        graph, out_tree, _ = _trace(self.fn, args, self.name)
        in_tree = flatten(tuple(args), is_leaf=lambda x: isinstance(x, TensorType))[2]
        if self.stage is not None:
            graph, out_tree = self.stage(graph, in_tree, out_tree)
        return run_pipeline(graph, [SIMPLIFY]), out_tree

    @user_facing
    def __call__(self, *args: Any) -> Any:
        leaves, paths, treedef = flatten(args)
        if is_tracing() and any(isinstance(l, Tensor) for l in leaves):
            from .tensor import as_tensor
            graph, out_tree = self.build(args)
            tensors = [as_tensor(l) for l in leaves]
            return unflatten(out_tree, _inline(graph, tensors))
        names = _input_names(self.fn, paths, len(args))
        arrays = [to_array(l, n) for l, n in zip(leaves, names)]
        signature = (treedef, tuple((a.shape, a.dtype.name) for a in arrays))
        entry = self._cache.get(signature)
        if entry is None:
            self._log_retrace(signature, names)
            graph, out_tree = self.build(arrays_like(treedef, arrays))
            entry = self._cache[signature] = (compile_graph(graph, self.backend), graph, out_tree)
        executable, graph, out_tree = entry
        self._last_signature = signature
        if graph.inputs and graph.inputs[-1].role == "rng":
            arrays.append(gc_random.next_key())
        return unflatten(out_tree, executable(*arrays))

    def _log_retrace(self, signature: tuple, names: list[str]) -> None:
        previous = self._last_signature
        if previous is None:
            return
        if previous[0] != signature[0]:
            log.warning("graphc: retracing %s: the structure of its arguments changed", self.name)
            return
        changes = [f"{n}: {TensorType(*old)} -> {TensorType(*new)}"
                   for n, old, new in zip(names, previous[1], signature[1]) if old != new]
        log.warning("graphc: retracing %s for a new input signature (%s)", self.name, "; ".join(changes))

    def lower(self, *args: Any) -> Graph:
        """The optimized graph this function compiles for these arguments."""
        return self.build(args)[0]


def arrays_like(treedef: TreeDef, arrays: list[np.ndarray]) -> Any:
    return unflatten(treedef, [TensorType.of(a) for a in arrays])


def jit(fn: Callable | None = None, *, backend: str | None = None) -> Any:
    """Trace `fn` on its first call for each input signature, compile it, and run it."""
    if fn is None:
        return lambda f: jit(f, backend=backend)
    return Staged(fn, backend=backend)


def _argnum_leaf_indices(in_tree: TreeDef, argnums: tuple[int, ...]) -> list[list[int]]:
    offsets = np.cumsum([0] + [c.num_leaves for c in in_tree.children])
    return [list(range(offsets[a], offsets[a + 1])) for a in argnums]


def _grad_stage(argnums: int | Sequence[int], has_aux: bool, with_value: bool):
    single = isinstance(argnums, int)
    nums = (argnums,) if single else tuple(argnums)

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
        if any(not 0 <= a < len(in_tree.children) for a in nums):
            raise GraphcError(f"grad: argnums {nums} out of range for {len(in_tree.children)} arguments")
        groups = _argnum_leaf_indices(in_tree, nums)
        wrt = [i for g in groups for i in g]
        for a, g in zip(nums, groups):
            if not g:
                raise GraphcError(f"grad: argument {a} holds no arrays to differentiate")
        loss_name = graph.outputs[0][0]
        grad_graph = autodiff(graph, wrt, output=loss_name)
        n_out = len(graph.outputs)
        keep = (list(range(n_out)) if with_value else list(range(1, n_out)) if has_aux else [])
        grad_graph.outputs = [grad_graph.outputs[i] for i in keep] + grad_graph.outputs[n_out:]
        # Output structure: grads shaped like the differentiated arguments.
        arg_trees = [in_tree.children[a] for a in nums]
        grads_tree = arg_trees[0] if single else TreeDef("tuple", len(arg_trees), tuple(arg_trees))
        if with_value:
            tree = TreeDef("tuple", 2, (out_tree, grads_tree))
        elif has_aux:
            tree = TreeDef("tuple", 2, (grads_tree, aux_tree))
        else:
            tree = grads_tree
        return grad_graph, tree

    return stage


def grad(fn: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
         backend: str | None = None) -> Staged:
    """The gradient of a scalar function w.r.t. argument(s) `argnums`, by symbolic autodiff."""
    return Staged(fn, backend, _grad_stage(argnums, has_aux, with_value=False))


def value_and_grad(fn: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                   backend: str | None = None) -> Staged:
    """Like grad, returning (value, gradients); with has_aux, ((value, aux), gradients)."""
    return Staged(fn, backend, _grad_stage(argnums, has_aux, with_value=True))
