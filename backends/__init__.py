"""graphc.backends: turn an optimized graph into something that runs.

A backend never fuses or plans memory itself (graphc.lowering runs those passes and hands it
their results). Kernel backends (numba-cpu, numba-cuda) expose ``lower(fused) -> LoweredGraph``,
the generated source of every kernel (which tells the memory planner each kernel's scratch), and
``compile_plan(lowered, plan, memory_of=None) -> executable``, where `memory_of` is an executable
it compiled before for the same program at another batch size: the new one may share its memory
(their calls then take turns). The reference interpreter runs the primitive graph
as it is: ``compile_graph(graph, donate=None) -> executable``. Executables are called with NumPy
arrays (one per graph input) and return a list of arrays (one per output); `donate` maps input
index -> output index: that output is written into the input's buffer.

What callers may ask of an executable is stated by the protocols below (`Executable`,
`PlannedExecutable`, `DeviceResident`), checked with isinstance, never by probing attributes.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ContextManager, Iterable, Protocol, runtime_checkable

import numpy as np

from graphc.ir import Graph, Node, TensorType
from graphc.ir.errors import GraphcError
from graphc.ir.memory import MemoryPlan

from .profile import ProfileReport

_MODULES = {
    "reference": "graphc.backends.reference",
    "numba-cpu": "graphc.backends.numba_cpu",
    "numba-cuda": "graphc.backends.numba_cuda",
}


def _usable(name: str) -> bool:
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError:
        return False
    return getattr(mod, "is_available", lambda: True)()


def available_backends() -> list[str]:
    return [name for name in _MODULES if _usable(name)]


def default_backend() -> str:
    """numba-cpu when it loads, else the reference (probing only those two: asking CUDA costs
    most of a second)."""
    return "numba-cpu" if _usable("numba-cpu") else "reference"


def get_backend(name: str | None = None) -> Any:
    name = name or default_backend()
    if name not in _MODULES:
        raise GraphcError(f"unknown backend {name!r}; available: {', '.join(available_backends())}")
    try:
        mod = importlib.import_module(_MODULES[name])
    except ImportError as exc:
        raise GraphcError(f"backend {name!r} cannot be loaded ({exc}); available: "
                          f"{', '.join(available_backends())}") from None
    if not getattr(mod, "is_available", lambda: True)():
        raise GraphcError(f"backend {name!r} is not usable on this machine: "
                          f"{getattr(mod, 'unavailable_reason', lambda: '')()}; available: "
                          f"{', '.join(available_backends())}")
    return mod


def lowers_kernels(backend: Any) -> bool:
    """Does `backend` (a module from get_backend) compile a fused, memory-planned graph?"""
    return hasattr(backend, "compile_plan")


@dataclass
class LoweredGraph:
    """A fused graph and the generated source of each kernel that runs code (not views and
    constants); a source lists the `scratch` tensors its kernel needs while it runs."""

    graph: Graph
    sources: dict[Node, Any]

    def scratch(self, kernel: Node) -> list[TensorType]:
        source = self.sources.get(kernel)
        return list(source.scratch) if source is not None else []


@runtime_checkable
class Executable(Protocol):
    """A compiled graph: called with one array per input of `graph`, returns one per output.
    `graph` is the graph it runs (fused into kernels on the kernel backends)."""

    graph: Graph

    def __call__(self, *args: np.ndarray) -> list[np.ndarray]: ...


@runtime_checkable
class PlannedExecutable(Executable, Protocol):
    """An executable of a kernel backend: its memory plan and its kernels' generated sources,
    in execution order."""

    plan: MemoryPlan
    kernels: list[Any]


@runtime_checkable
class Profiled(Protocol):
    """An executable that times its kernels (numba-cpu): every call with GRAPHC_PROFILE=1 set at
    compile time, or the calls inside `recording_profile()`. `profile_report` is None when
    neither is on. `profile_printed_at_exit`: whether GRAPHC_PROFILE's table of it is printed at
    exit (a program made of several executables prints one table of them all instead)."""

    profile_printed_at_exit: bool

    @property
    def profile_report(self) -> ProfileReport | None: ...

    def recording_profile(self) -> ContextManager[None]: ...


@runtime_checkable
class DeviceResident(Protocol):
    """An executable that can keep inputs on its device between calls (numba-cuda), so that a
    training step's state is not copied to and from the host at every step. The host arrays
    go stale meanwhile: `sync_to_host` before they are read, `invalidate` after they are
    written."""

    @property
    def resident(self) -> frozenset[int]:
        """Indices of the inputs kept on the device."""

    def keep_on_device(self, inputs: Iterable[int]) -> None:
        """Keep exactly these inputs on the device between calls."""

    def sync_to_host(self) -> None:
        """Copy the resident inputs the kernels updated into their host arrays."""

    def invalidate(self, array: np.ndarray | None = None) -> None:
        """Forget the device copy of `array` (of all when None): the next call uploads it."""
