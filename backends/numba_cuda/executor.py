"""compile_graph for numba.cuda: one device arena, kernels launched in the memory plan's order.

Per call, the inputs are copied to the device, every kernel is launched, and the outputs are
copied back as fresh host arrays; donated inputs are updated in the caller's arrays by a copy
back from the device. (Parameters do not yet stay resident on the device between calls.)
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from graphc.backends.signature import prepare_inputs
from graphc.ir import Graph, Node, Value
from graphc.ir.verify import KERNEL_OP
from graphc.passes.fusion import fuse
from graphc.passes.memplan import MemoryPlan, plan_memory

from .codegen import CudaCall, CudaKernelSource, generate


def _cuda():
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


def _load(call: CudaCall) -> Callable[..., None]:
    """The launchable kernel `function[grid, block](*args)` of a call."""
    cupy = _cupy()
    if call.gemm is not None and cupy is not None:
        host = _cublas_matmul(cupy, call.gemm)
        return _HostLaunch(host)
    namespace: dict[str, Any] = {}
    exec(compile(call.source, f"<graphc-cuda {call.entry}>", "exec"), namespace)
    return namespace[call.entry]


class _HostLaunch:
    """A host function that enqueues device work, launched like a kernel (the launch
    configuration is ignored)."""

    def __init__(self, function: Callable[..., None]) -> None:
        self.function = function

    def __getitem__(self, configuration: Any) -> Callable[..., None]:
        return self.function


class Executable:
    """A graph compiled for numba.cuda. Call it with one array per graph input; it returns one
    fresh NumPy array per output. `kernels` holds each kernel's generated source."""

    def __init__(self, graph: Graph, plan: MemoryPlan, sources: dict[Node, CudaKernelSource],
                 compile_seconds: float) -> None:
        self.graph = graph
        self.plan = plan
        self.kernels = [sources[n] for n in plan.schedule if n in sources]
        self.compile_seconds = compile_seconds
        self._cuda = _cuda()
        self._arena = self._cuda.device_array(max(plan.peak_bytes, 1), np.uint8)
        self._fixed: dict[Value, Any] = {}
        self._bind_fixed()
        self._launches = [(call, _load(call), node) for node in plan.schedule if node in sources
                          for call in sources[node].calls]
        self._scratch = {node: [self._arena_view(s.offset, t.shape, t.np_dtype) for s, t in pieces]
                         for node, pieces in plan.scratch.items()}
        self._lock = threading.Lock()

    def _arena_view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Any:
        count = int(np.prod(shape, dtype=np.int64))
        raw = self._arena[offset:offset + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape) if shape else raw.view(dtype).reshape(())

    def _bind_fixed(self) -> None:
        """Arena views and constants: the same device arrays on every call."""
        for node in self.plan.schedule:
            for v in node.outputs:
                loc = self.plan.locations[v]
                if loc.kind == "arena":
                    storage = self.plan.storages[loc.index]
                    self._fixed[v] = self._arena_view(storage.offset, v.type.shape, v.type.np_dtype)
                elif loc.kind == "constant":
                    value = np.array(node.subgraph.nodes[0].attrs["value"], dtype=v.type.np_dtype)
                    self._fixed[v] = self._cuda.to_device(np.ascontiguousarray(value))

    def __call__(self, *args: Any) -> list[np.ndarray]:
        donated = tuple(self.plan.donated_in_place) + tuple(self.plan.donated_by_copy)
        arrays = prepare_inputs(self.graph, args, donated)
        with self._lock:
            env = self._device_values(arrays)
            for call, function, node in self._launches:
                args = [self._argument(a, node, env) for a in call.args]
                for k, shape in enumerate(call.views):
                    if shape is not None:
                        args[k] = args[k].reshape(shape)
                function[call.grid, call.block](*args)
            outputs = [env[v].copy_to_host() for v in self.graph.output_values]
            for k, j in self.plan.donated_in_place.items():
                outputs[j] = arrays[k]
                env[self.graph.input_values[k]].copy_to_host(arrays[k])
            for k, j in self.plan.donated_by_copy.items():
                np.copyto(arrays[k], outputs[j])
                outputs[j] = arrays[k]
            return outputs

    def _device_values(self, arrays: Sequence[np.ndarray]) -> dict[Value, Any]:
        cuda, plan = self._cuda, self.plan
        env = dict(self._fixed)
        for v, array in zip(self.graph.input_values, arrays):
            env[v] = cuda.to_device(array)
        for node in plan.schedule:
            for v in node.outputs:
                loc = plan.locations[v]
                if loc.kind == "output":
                    env[v] = cuda.device_array(v.type.shape, v.type.np_dtype)
                elif loc.kind == "donated":
                    env[v] = env[self.graph.input_values[loc.index]]
                elif loc.kind == "view":
                    env[v] = env[loc.base].reshape(v.type.shape)
        return env

    def _argument(self, arg: str | int, node: Node, env: dict[Value, Any]) -> Any:
        if isinstance(arg, int):
            return arg
        position = int(arg[1:])
        if arg[0] == "s":
            return self._scratch[node][position]
        return env[(node.inputs if arg[0] == "x" else node.outputs)[position]]

    def __repr__(self) -> str:
        return (f"<numba-cuda Executable {self.graph.name!r}: {len(self.kernels)} kernels, "
                f"{self.plan.summary()}>")


def compile_graph(graph: Graph, donate: dict[int, int] | None = None) -> Executable:
    """Compile `graph` (primitive nodes, or already fused) for numba.cuda. `donate` maps a graph
    input index to the output index written into that input's (caller's) array."""
    start = time.perf_counter()
    fused = graph if any(n.op == KERNEL_OP for n in graph.nodes) else fuse(graph)
    sources = {n: generate(n) for n in fused.nodes if n.attrs["pattern"] not in ("view", "constant")}
    plan = plan_memory(fused, donate, scratch=lambda n: list(sources[n].scratch) if n in sources else [])
    return Executable(fused, plan, sources, time.perf_counter() - start)
