"""lower and compile_plan for numba.cuda: kernels launched in the memory plan's order over device memory
allocated once.

Device memory, all allocated at compile time: the arena (one allocation holding every
intermediate and kernel scratch), one buffer per graph input and one per output. A call
uploads its inputs, launches every kernel and downloads the outputs as fresh host arrays; a
donated input's new value (written into its buffer) is downloaded into the caller's array.

Resident inputs (`keep_on_device`; compile_train_step and gc.load's train steps keep their
parameters, buffers, optimizer state, step count and RNG key there): such an input is uploaded
only when its buffer does not hold that very host array's values yet (the first call, another
array passed, or after `invalidate`), and when donated its new value stays on the device, the
caller's array going stale until `sync_to_host()`. A training step then uploads only the batch
and the learning rate, and downloads only the loss. Residency is asked for, not the default:
callers such as gc.jit's donation and the data-parallel step read the updated arrays after
every call, or pass them to other executables.

`transfers` counts the bytes copied each way; `cache_stats` the kernel cache's work (cache.py).
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Iterable

import numpy as np

from graphc.backends import DeviceResident, LoweredGraph, PlannedExecutable
from graphc.backends.bounds import IndexChecks, plan_index_checks
from graphc.backends.kernels.arrays import SCRATCH
from graphc.backends.kernel_files import CacheStats, signature_of
from graphc.backends.signature import prepare_inputs
from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.memory import MemoryPlan

from .cache import get_cache
from .codegen import CudaCall, CudaKernelSource, generate
from .scan_loop import device_scan_loop


def numba_cuda_module() -> Any:
    """numba.cuda, after patching the NumPy 2.5 alias numba-cuda 0.30.4 still uses."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack
    from numba import cuda
    return cuda


def _cupy() -> Any:
    """CuPy, when importable on a real GPU (not under the simulator): its cuBLAS runs matmuls."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return None
    try:
        import cupy
    except ImportError:
        return None
    return cupy


def _cublas_matmul(cupy: Any, transposed: tuple[bool, bool]) -> Callable[..., None]:
    """out = a @ b through cuBLAS on the same device memory (zero-copy through
    __cuda_array_interface__); transposed operands are strided views, as BLAS takes them."""
    def as_operand(array: Any, transpose: bool) -> Any:
        view = cupy.asarray(array)
        return view.swapaxes(-1, -2) if transpose else view

    def matmul(a: Any, b: Any, out: Any) -> None:
        cupy.matmul(as_operand(a, transposed[0]), as_operand(b, transposed[1]), out=cupy.asarray(out))
    return matmul


def _argument_types(node: Node, source: CudaKernelSource, call: CudaCall) -> list[TensorType | int]:
    """What each argument of `call` is at launch: a kernel array's type (reshaped as the call
    views it), or an int."""
    result: list[TensorType | int] = []
    for k, arg in enumerate(call.args):
        if isinstance(arg, int):
            result.append(arg)
            continue
        t = arg.pick([v.type for v in node.inputs], [v.type for v in node.outputs], source.scratch)
        view = call.views[k] if k < len(call.views) else None
        result.append(TensorType(view, t.dtype) if view is not None else t)
    return result


def _load(node: Node, source: CudaKernelSource, call: CudaCall, stats: CacheStats) -> Callable[..., None]:
    """The launchable kernel `function[grid, block](*args)` of a call."""
    cupy = _cupy()
    if call.gemm is not None and cupy is not None:
        return _HostLaunch(_cublas_matmul(cupy, call.gemm))
    return get_cache().load(call, signature_of(_argument_types(node, source, call)), stats)


class _HostLaunch:
    """A host function that enqueues device work, launched like a kernel (the launch
    configuration is ignored)."""

    def __init__(self, function: Callable[..., None]) -> None:
        self.function = function

    def __getitem__(self, configuration: Any) -> Callable[..., None]:
        return self.function


class Executable(PlannedExecutable, DeviceResident):
    """A graph compiled for numba.cuda. Call it with one array per graph input; it returns one
    fresh NumPy array per output, and a donated input's own array for its output (stale while
    that input is resident: see the module docstring). `kernels` holds each kernel's generated
    source. Calls from several threads take turns: they share the device buffers."""

    def __init__(self, graph: Graph, plan: MemoryPlan, sources: dict[Node, CudaKernelSource],
                 functions: dict[Node, list[Callable[..., None]]], cache_stats: CacheStats,
                 compile_seconds: float, checks: IndexChecks) -> None:
        self.graph = graph
        self.plan = plan
        self.kernels = [sources[n] for n in plan.schedule if n in sources]
        self.cache_stats = cache_stats
        self.compile_seconds = compile_seconds
        self.transfers = {"to_device": 0, "to_host": 0}  # bytes copied since compiling
        self._cuda = numba_cuda_module()
        self._arena = self._cuda.device_array(max(plan.peak_bytes, 1), np.uint8)
        self._inputs = [self._cuda.device_array(v.type.shape, v.type.np_dtype) for v in graph.input_values]
        self._env = self._bind()
        self._launches = [(function, call.grid, call.block, self._arguments(call, node))
                          for node in plan.schedule if node in sources
                          for call, function in zip(sources[node].calls, functions[node])]
        # Index arrays: those of graph inputs checked on the host before anything is uploaded;
        # the others (computed on the device: rare) downloaded before the first kernel reading them.
        self._input_checks = [(check, checks.input_of[check]) for check in checks.on_inputs]
        first_launch, position = {}, 0
        for node in plan.schedule:
            if node in sources:
                first_launch[node] = position
                position += len(sources[node].calls)
        self._device_checks = {first_launch[node]: [(c, self._env[c.indices]) for c in node_checks]
                               for node, node_checks in checks.before.items()}
        # inputs written in place before a device check: put back where it fails
        self._restore_on_failure = checks.restore_on_failure
        self._donated = {**plan.donated_in_place, **plan.donated_by_copy}  # input -> output
        self._donor_of = {j: k for k, j in self._donated.items()}
        # by-copy donations whose value is not already in the input's buffer (a view of it)
        self._copies = [(self._inputs[k], self._env[graph.output_values[j]])
                        for k, j in plan.donated_by_copy.items()
                        if plan.root(graph.output_values[j]) is not graph.input_values[k]]
        self._resident: frozenset[int] = frozenset()
        self._held: dict[int, np.ndarray] = {}  # resident input -> host array its buffer holds
        self._newer: set[int] = set()  # resident inputs the kernels updated since (not synced)
        self._lock = threading.Lock()

    # -- binding (once) -----------------------------------------------------------------------
    def _arena_view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._arena[offset:offset + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape) if shape else raw.view(dtype).reshape(())

    def _bind(self) -> dict[Value, Any]:
        """The device array of every value: the same on every call."""
        cuda, plan = self._cuda, self.plan
        env = dict(zip(self.graph.input_values, self._inputs))
        for node in plan.schedule:
            for v in node.outputs:
                loc = plan.locations[v]
                if loc.kind == "arena":
                    storage = plan.storages[loc.index]
                    env[v] = self._arena_view(storage.offset, v.type.shape, v.type.np_dtype)
                elif loc.kind == "constant":
                    # np.array, not np.ascontiguousarray: that one turns a 0-d constant into
                    # shape (1,), which kernels indexing it with () and callers reject
                    value = np.array(node.subgraph.nodes[0].attrs["value"], dtype=v.type.np_dtype, order="C")
                    env[v] = cuda.to_device(value)
                elif loc.kind == "output":
                    env[v] = cuda.device_array(v.type.shape, v.type.np_dtype)
                elif loc.kind == "donated":
                    env[v] = env[self.graph.input_values[loc.index]]
                elif loc.kind == "view":
                    env[v] = env[loc.base].reshape(v.type.shape)
        return env

    def _arguments(self, call: CudaCall, node: Node) -> list[Any]:
        scratch = [self._arena_view(s.offset, t.shape, t.np_dtype) for s, t in self.plan.scratch.get(node, ())]
        args = []
        for k, arg in enumerate(call.args):
            if isinstance(arg, int):
                args.append(arg)
                continue
            if arg.kind is SCRATCH:
                value = scratch[arg.index]
            else:
                value = self._env[arg.pick(node.inputs, node.outputs, ())]
            view = call.views[k] if k < len(call.views) else None
            args.append(value.reshape(view) if view is not None else value)
        return args

    # -- calling ------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> list[np.ndarray]:
        arrays = prepare_inputs(self.graph, args, tuple(self._donated))
        with self._lock:
            for check, ks in self._input_checks:
                check(*[self._current(k, arrays[k]).reshape(v.shape) for k, v in zip(ks, check.sources)])
            self._upload(arrays)
            kept = [(self._inputs[k], self._inputs[k].copy_to_host()) for k in self._restore_on_failure]
            for position, (function, grid, block, arguments) in enumerate(self._launches):
                for check, buffer in self._device_checks.get(position, ()):
                    try:
                        check(buffer.copy_to_host())
                    except Exception:  # a call stopped by a bad index changes nothing
                        for buffer_written, before in kept:
                            buffer_written.copy_to_device(before)
                        raise
                # configured at each launch: the simulator's kernel keeps one configuration,
                # and the cache hands the same kernel to every call of identical source
                function[grid, block](*arguments)
            self._store_donated(arrays)
            return [arrays[self._donor_of[j]] if j in self._donor_of else self._download(self._env[v])
                    for j, v in enumerate(self.graph.output_values)]

    def _current(self, k: int, array: np.ndarray) -> np.ndarray:
        """Input k's value as the kernels will read it: a resident input the kernels updated
        since its host array was synced is read from its buffer (the host array is stale, and
        an index checked there is not the index a kernel reads)."""
        if k in self._newer and self._held.get(k) is array:
            return self._download(self._inputs[k])
        return array

    def _upload(self, arrays: list[np.ndarray]) -> None:
        for k, array in enumerate(arrays):
            if k in self._resident:
                if self._held.get(k) is array:
                    continue
                self._give_back(k)
                self._held[k] = array
            self._to_device(array, self._inputs[k])

    def _store_donated(self, arrays: list[np.ndarray]) -> None:
        """Donated outputs into their inputs' buffers, and on to the host unless resident."""
        for buffer, value in self._copies:
            buffer.copy_to_device(value)  # device to device
        for k in self._donated:
            if k in self._resident:
                self._newer.add(k)
            else:
                self._download(self._inputs[k], arrays[k])

    def _give_back(self, k: int) -> None:
        """The host array resident input k held gets the updates it has not seen."""
        if k in self._newer:
            self._download(self._inputs[k], self._held[k])
            self._newer.discard(k)

    def _to_device(self, array: np.ndarray, buffer: Any) -> None:
        buffer.copy_to_device(array)
        self.transfers["to_device"] += array.nbytes

    def _download(self, buffer: Any, array: np.ndarray | None = None) -> np.ndarray:
        array = buffer.copy_to_host(array)
        self.transfers["to_host"] += array.nbytes
        return array

    # -- resident inputs ----------------------------------------------------------------------
    @property
    def resident(self) -> frozenset[int]:
        """Indices of the inputs kept on the device between calls."""
        return self._resident

    def keep_on_device(self, inputs: Iterable[int]) -> None:
        """Keep these inputs on the device between calls (and no others: one dropped from
        the set first gets its updates back into its host array)."""
        inputs = frozenset(inputs)
        if not inputs <= set(range(len(self._inputs))):
            raise ValueError(f"{self.graph.name}: no inputs {sorted(inputs - set(range(len(self._inputs))))}")
        with self._lock:
            for k in self._resident - inputs:
                self._give_back(k)
                self._held.pop(k, None)
            self._resident = inputs

    def sync_to_host(self) -> None:
        """Copy every resident input the kernels updated into the host array it came from."""
        with self._lock:
            for k in sorted(self._newer):
                self._give_back(k)

    def invalidate(self, array: np.ndarray | None = None) -> None:
        """Forget the device copy of `array` (of every resident input when None): the next
        call uploads the host array again, and updates not synced to it are dropped."""
        with self._lock:
            for k in [k for k, held in self._held.items() if array is None or held is array]:
                del self._held[k]
                self._newer.discard(k)

    def scan_driver(self, node: Node) -> Callable[[list[np.ndarray]], list[np.ndarray]] | None:
        """A loop running `node`'s steps (this executable being its body) on the device, or None
        where the steps need the host (scan_loop.py)."""
        return device_scan_loop(node, self)

    def __repr__(self) -> str:
        return (f"<numba-cuda Executable {self.graph.name!r}: {len(self.kernels)} kernels, "
                f"{self.plan.summary()}; {self.cache_stats}>")


def lower(fused: Graph) -> LoweredGraph:
    """The CUDA source of every kernel of `fused` that runs code."""
    return LoweredGraph(fused, {n: generate(n) for n in fused.nodes
                                if n.attrs["pattern"] not in ("view", "constant")})


def compile_plan(lowered: LoweredGraph, plan: MemoryPlan) -> Executable:
    """Compile the kernels of `lowered` for numba.cuda, launched in `plan`'s order over its
    device arena. The plan's donations (input index -> output index) write that output into
    the input's (caller's) array."""
    start = time.perf_counter()
    fused, sources = lowered.graph, lowered.sources
    checks = plan_index_checks(fused, plan)  # first: constant indices out of range fail here
    stats = CacheStats()
    functions = {node: [_load(node, source, call, stats) for call in source.calls]
                 for node, source in sources.items()}
    return Executable(fused, plan, sources, functions, stats, time.perf_counter() - start, checks)
