"""lower, compile_plan and the Executable: one arena, a pre-bound kernel list, minimal Python
per call.

Compilation: `lower` generates every kernel's source of a fused graph; memory is planned from it
(kernel scratch included, by graphc.lowering); `compile_plan` then generates again the kernels
the plan writes in place, telling their emitters which outputs share an input's buffer, and
loads each kernel through the cache, compiled eagerly for the exact argument types the executor
will pass (a large model's parallel kernels compile in the background while serial stand-ins
run: serial_stand_ins). A call then checks its inputs, allocates the fresh output arrays, and
runs the kernel list; each step is a compiled function and the indices of its arguments in one
flat list of arrays, most of which (arena views, constants, scratch) never change.
"""
from __future__ import annotations

import atexit
import operator
import os
import sys
import threading
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Sequence

import numba
import numpy as np

from graphc.backends import LoweredGraph, PlannedExecutable
from graphc.backends.bounds import ComputedIndexCheck, IndexCheck, IndexChecks, plan_index_checks
from graphc.backends.kernels.arrays import INPUT, OUTPUT, SCRATCH, KernelArray
from graphc.backends.kernel_files import signature_of
from graphc.backends.profile import ProfileReport, ProfileRow
from graphc.backends.signature import InputSignature
from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.errors import GraphcError, IndexOutOfRangeError
from graphc.ir.memory import ALIGNMENT, MemoryPlan, Storage

from .blas import single_threaded_scipy_blas
from .cache import CacheStats, get_cache
from .codegen import POINTWISE_GENERATORS, generate
from .codegen_common import (_ALWAYS_PARALLEL, _SERIAL, Call, KernelSource, always_parallel, kernel_threads,
                             requested_threads, serial_kernels)
from .codegen_winograd import im2col_only
from .compile_pool import BackgroundCompile, estimated_compile_seconds
from .team import OPENMP_PROCESS
from .thread_choice import ThreadChoice

# Serial stand-ins run while an executable's parallel kernels compile in the background when
# those would take this long by estimate (compile_pool.estimated_compile_seconds: a parallel
# elementwise kernel ~1-1.5, resnet-s's 22 parallel kernels 70): small models compile them at
# once.
STAND_IN_MIN_SECONDS = 10.0


@dataclass
class CompiledKernel:
    """One kernel of an Executable: its node, generated source and compiled functions (one per
    call of the generated code, run in order)."""

    node: Node
    generated: KernelSource
    functions: list[Callable[..., None]]  # Numba dispatchers
    entry_points: list[Callable[..., None]]  # their machine code for the executor's argument types

    @property
    def name(self) -> str:
        return self.generated.name

    @property
    def pattern(self) -> str:
        return self.generated.pattern

    @property
    def flops(self) -> int:
        return self.generated.flops

    @property
    def source(self) -> str:
        """The generated Python module."""
        return self.generated.source


@dataclass
class _Step:
    kernel: CompiledKernel
    calls: tuple[tuple[Callable[..., None], tuple[int, ...]], ...]  # function, env slots of its args
    # run first: index checks and the env slots of the arrays each takes
    checks: tuple[tuple[IndexCheck | ComputedIndexCheck, tuple[int, ...]], ...] = ()


def _picker(slots: tuple[int, ...]) -> Callable[[list[Any]], tuple[Any, ...]]:
    """env -> the tuple of env[s] for s in slots (itemgetter returns a bare item for one, and
    takes no zero: an index check computed from constants alone reads no slot)."""
    if not slots:
        return lambda env: ()
    if len(slots) == 1:
        return lambda env, slot=slots[0]: (env[slot],)
    return operator.itemgetter(*slots)


def _thread_count() -> int | None:
    return kernel_threads() if requested_threads() is not None else None


class _Environment:
    """Slots for every array a call touches: fixed ones filled once, the rest per call."""

    def __init__(self) -> None:
        self.template: list[Any] = []
        # (value, False) -> the value's array; (value, shape) -> that array reshaped (a view)
        self.slot: dict[tuple[Value, bool | tuple[int, ...]], int] = {}

    def add(self, key: tuple[Value, bool | tuple[int, ...]], array: Any = None) -> int:
        self.slot[key] = self.constant(array)
        return self.slot[key]

    def constant(self, value: Any) -> int:
        """A slot holding `value` on every call (scratch arrays, integer arguments)."""
        self.template.append(value)
        return len(self.template) - 1


class Executable(PlannedExecutable):
    """A compiled graph. Call it with one array per graph input; it returns one array per output.

    Attributes: `graph` (the fused graph), `plan` (the MemoryPlan), `kernels` (CompiledKernel
    list in execution order), `cache_stats` (CacheStats of this compilation),
    `compile_seconds`. `profile(*args, repeat=N)` times every kernel; with GRAPHC_PROFILE=1
    every call is timed, `profile_report` holds the totals and they are printed at exit.
    Calls from several threads take turns: they share one arena. With `memory_of`, an executable
    of the same program at another batch size whose memory is large enough, the arena is the
    front of that memory and calls of the two take turns too: a fresh arena of tens of MiB is
    paged in by its first call, for up to a tenth of a second more than the step (resnet-m at
    batch 17 after 32, 56 MiB: 0.13 s of system time). Unless GRAPHC_NUM_THREADS pins the count,
    the calls of an executable with parallel kernels run on all of Numba's threads or on one,
    whichever its timed calls found faster (thread_choice.py: on a busy machine, one).
    `lend_outputs(positions)`: those outputs that live in the arena are returned in it instead
    of copied out; they stay valid until the next call (graphc/scan_lowering.py: a part of a
    program, whose values only later parts of the same call read). `uncopied_outputs` lists them.
    """

    def __init__(self, graph: Graph, plan: MemoryPlan, kernels: dict[Node, CompiledKernel],
                 cache_stats: CacheStats, compile_seconds: float, checks: IndexChecks,
                 memory_of: Any = None, upgrade: _Upgrade | None = None) -> None:
        self.graph = graph
        self.plan = plan
        self.cache_stats = cache_stats
        self.compile_seconds = compile_seconds
        self._threads = _thread_count()
        self._checks = checks
        self._upgrade = upgrade
        if upgrade is not None:
            _UPGRADING.add(self)
            weakref.finalize(self, upgrade.stop)  # also at exit: the worker goes with the program
        self._donated = tuple(plan.donated_in_place) + tuple(plan.donated_by_copy)
        self.uncopied_outputs: frozenset[int] = frozenset()
        self._signature = InputSignature(graph, self._donated)
        if isinstance(memory_of, Executable) and memory_of._memory.nbytes >= plan.peak_bytes:
            self._memory, self._lock = memory_of._memory, memory_of._lock
        else:
            self._memory, self._lock = aligned_bytes(plan.peak_bytes), threading.Lock()
        self._arena = self._memory[:plan.peak_bytes]
        self._bind(kernels)
        self._profile_totals: dict[tuple[str, int], float] | None = None
        self._profile_calls = 0
        self.profile_printed_at_exit = True  # False where a program's report includes this one's
        if os.environ.get("GRAPHC_PROFILE", "") not in ("", "0"):
            self._profile_totals = {}
            atexit.register(_print_profile_at_exit, weakref.ref(self))

    # -- binding (once, and again for the final kernels) ---------------------------------------
    def _bind(self, kernels: dict[Node, CompiledKernel]) -> None:
        plan, checks = self.plan, self._checks
        self.kernels = [kernels[n] for n in plan.schedule if n in kernels]
        # unpinned, with threads to spare and parallel kernels to run on them: calls pick all of
        # the threads or one by their times (thread_choice.py)
        parallel = any(call.parallel for k in self.kernels for call in k.generated.calls)
        self._parallel = parallel
        self._thread_choice = (ThreadChoice(kernel_threads())
                               if self._threads is None and kernel_threads() > 1 and parallel else None)
        self._untimed_calls = 1  # the first call pages the arena in
        self._env = env = _Environment()
        self._inputs = [env.add((v, False)) for v in self.graph.input_values]
        self._fresh: list[tuple[int, tuple[int, ...], np.dtype]] = []
        self._donated_slots: list[tuple[int, int]] = []
        self._views: list[tuple[int, int, tuple[int, ...]]] = []  # filled per call
        for node in plan.schedule:
            for v in node.outputs:
                self._bind_value(v, node)
        self._steps = [self._step(kernels[n], checks.before.get(n, [])) for n in plan.schedule if n in kernels]
        if checks.on_inputs:  # before any kernel: a bad label stops the step before it changes anything
            first = self._steps[0]
            first.checks = tuple((c, tuple(self._slot(v, None) for v in c.sources))
                                 for c in checks.on_inputs) + first.checks
        # every call in order, index checks included: the function and what picks its
        # arguments out of the env list
        self._run = []
        for step in self._steps:
            self._run += [(check, _picker(slots)) for check, slots in step.checks]
            self._run += [(function, _picker(slots)) for function, slots in step.calls]
        self._view_memo: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(self._views)

    def _bind_value(self, v: Value, node: Node) -> None:
        loc, env = self.plan.locations[v], self._env
        if loc.kind == "arena":
            storage = self.plan.storages[loc.index]
            env.add((v, False), self._arena_view(storage.offset, v.type.shape, v.type.np_dtype))
        elif loc.kind == "constant":
            value = node.subgraph.nodes[0].attrs["value"]
            env.add((v, False), np.array(value, dtype=v.type.np_dtype, order="C"))
        elif loc.kind == "output":
            self._fresh.append((env.add((v, False)), v.type.shape, v.type.np_dtype))
        elif loc.kind == "donated":
            self._donated_slots.append((env.add((v, False)), loc.index))
        elif loc.kind == "view":
            base = env.slot[(loc.base, False)]
            if env.template[base] is not None:
                env.add((v, False), env.template[base].reshape(v.type.shape))
            else:
                self._views.append((env.add((v, False)), base, v.type.shape))
        else:
            raise AssertionError(f"{v}: unexpected location {loc}")

    def _arena_view(self, offset: int, shape: tuple[int, ...], dtype: np.dtype, memory: np.ndarray | None = None
                    ) -> np.ndarray:
        count = int(np.prod(shape, dtype=np.int64))
        raw = (self._arena if memory is None else memory)[offset:offset + count * dtype.itemsize]
        return raw.view(dtype).reshape(shape)

    def _scratch(self, kernel: CompiledKernel) -> list[np.ndarray]:
        """The kernel's scratch arrays: in the storage planned for them (scratch_offsets), or for
        a serial stand-in the plan has no room for (im2col's columns where Winograd's tiles were
        planned), in memory of its own, freed when the final kernel takes over."""
        types = kernel.generated.scratch
        offsets = scratch_offsets(types, self.plan.scratch.get(kernel.node, ()))
        if offsets is not None:
            return [self._arena_view(offset, t.shape, t.np_dtype) for offset, t in zip(offsets, types)]
        sizes = [-(-t.nbytes // ALIGNMENT) * ALIGNMENT for t in types]
        memory = aligned_bytes(sum(sizes))
        starts = [sum(sizes[:i]) for i in range(len(types))]
        return [self._arena_view(start, t.shape, t.np_dtype, memory) for start, t in zip(starts, types)]

    def _slot(self, v: Value, view: tuple[int, ...] | None) -> int:
        """The slot of `v`'s array, or of a view of it with shape `view`."""
        env = self._env
        base = env.slot[(v, False)]
        if view is None or view == v.type.shape:
            return base
        if (v, view) in env.slot:
            return env.slot[(v, view)]
        if env.template[base] is not None:
            return env.add((v, view), env.template[base].reshape(view))
        slot = env.add((v, view))
        self._views.append((slot, base, view))
        return slot

    def _step(self, kernel: CompiledKernel, checks: list[IndexCheck]) -> _Step:
        node, env = kernel.node, self._env
        scratch = [env.constant(array) for array in self._scratch(kernel)]
        calls = []
        for call, function in zip(kernel.generated.calls, kernel.entry_points):
            slots = []
            for k, arg in enumerate(call.args):
                if isinstance(arg, (int, np.floating)):
                    slots.append(env.constant(arg))
                elif arg.kind is SCRATCH:
                    slots.append(scratch[arg.index])
                else:
                    value = arg.pick(node.inputs, node.outputs, ())
                    slots.append(self._slot(value, call.view_of(k, value.type)))
            calls.append((function, tuple(slots)))
        return _Step(kernel, tuple(calls), tuple((c, (self._slot(c.indices, None),)) for c in checks))

    def lend_outputs(self, positions: Iterable[int]) -> None:
        """Return the outputs at `positions` that live in the arena without copying them. Not
        those in an input's buffer (a view of a parameter): a later part may update it in place."""
        buffers = [self.plan.buffer_of(v) for v in self.graph.output_values]
        self.uncopied_outputs = frozenset(j for j in positions if buffers[j] and buffers[j][0] == "arena")

    # -- calling ------------------------------------------------------------------------------
    def __call__(self, *args: Any) -> list[np.ndarray]:
        if self._parallel:
            _refuse_a_forked_child(self.graph.name)
        try:
            return self._call(args)
        finally:
            if self._parallel and OPENMP_PROCESS[0] is None:
                _refuse_a_forked_child(self.graph.name)  # notes this process as OpenMP's

    def _call(self, args: Sequence[Any]) -> list[np.ndarray]:
        with self._lock:
            if self._upgrade is not None and self._upgrade.ready():
                self._take_upgrade()
            env = self._prepare(args)
            choice = self._thread_choice
            if choice is None:
                self._run_kernels(env)
                return self._finish(env)
            before, threads = numba.get_num_threads(), choice.threads()
            if threads != before:
                numba.set_num_threads(threads)
            start = time.perf_counter()
            try:
                self._run_kernels(env)
            finally:
                if threads != before:  # the caller's own parallel code keeps its count
                    numba.set_num_threads(before)
            if self._untimed_calls:
                self._untimed_calls -= 1
            else:
                choice.record(threads, time.perf_counter() - start)
            return self._finish(env)

    # -- the final kernels ------------------------------------------------------------------------
    @property
    def compiling(self) -> bool:
        """Whether serial stand-ins run while parallel kernels compile in the background."""
        return self._upgrade is not None

    def finish_compiling(self) -> None:
        """Wait for the kernels compiling in the background and run them from the next call."""
        with self._lock:
            if self._upgrade is not None and self._upgrade.owned():
                self._take_upgrade()

    def _take_upgrade(self) -> None:
        upgrade, self._upgrade = self._upgrade, None
        _UPGRADING.discard(self)
        try:
            final = upgrade.load(self.cache_stats)
        except Exception as error:  # the serial kernels stay: they compute the same, to rounding
            warnings.warn(f"graphc: the parallel kernels of {self.graph.name} failed to compile; "
                          f"their serial forms keep running ({type(error).__name__}: {error})")
            return
        self._bind({**{k.node: k for k in self.kernels}, **final})
        if self._profile_totals is not None:  # the report shows the final kernels alone
            self._profile_totals, self._profile_calls = {}, 0

    def _run_kernels(self, env: list[Any]) -> None:
        kept = [(env[self._inputs[k]], env[self._inputs[k]].copy()) for k in self._checks.restore_on_failure]
        try:
            if self._profile_totals is None:
                for function, arguments in self._run:
                    function(*arguments(env))
            else:
                self._timed_run(env, self._profile_totals)
                self._profile_calls += 1
        except IndexOutOfRangeError:  # a check after a kernel wrote a donated input in place
            for array, copy in kept:
                np.copyto(array, copy)
            raise

    def _prepare(self, args: Sequence[Any]) -> list[Any]:
        arrays = self._signature.prepare(args)
        if self._threads is not None and numba.get_num_threads() != self._threads:
            numba.set_num_threads(self._threads)
        env = list(self._env.template)
        for slot, array in zip(self._inputs, arrays):
            if not (array.flags.writeable and array.flags.aligned):
                array = array.copy()  # keeps the argument types the kernels were compiled for
            env[slot] = array
        for slot, shape, dtype in self._fresh:
            env[slot] = np.empty(shape, dtype)
        for slot, k in self._donated_slots:
            env[slot] = env[self._inputs[k]]
        # in binding order: a view's base comes first. The view of the array the last call
        # had (a parameter, optimizer state: the same array every step) is reused.
        memo = self._view_memo
        for i, (slot, base, shape) in enumerate(self._views):
            array = env[base]
            if memo[i] is None or memo[i][0] is not array:
                memo[i] = (array, array.reshape(shape))
            env[slot] = memo[i][1]
        return env

    def _finish(self, env: list[Any]) -> list[np.ndarray]:
        slot = self._env.slot
        outputs = [env[slot[(v, False)]] for v in self.graph.output_values]
        for j in self.plan.output_copies:
            if j not in self.uncopied_outputs:
                outputs[j] = outputs[j].copy()
        for k, j in self.plan.donated_by_copy.items():
            np.copyto(env[self._inputs[k]], outputs[j])
            outputs[j] = env[self._inputs[k]]
        return outputs

    # -- as a scan's body ------------------------------------------------------------------------
    def scan_driver(self, node: Node) -> Callable[[list[np.ndarray]], list[np.ndarray]] | None:
        """A compiled loop running this executable as the body of scan `node`, no Python per
        step (driver.py); None where its steps need Python."""
        from .driver import scan_driver
        self.finish_compiling()  # the driver calls the kernels it is made with
        return scan_driver(node, self)

    # -- profiling ------------------------------------------------------------------------------
    def _timed_run(self, env: list[Any], totals: dict[tuple[str, int], float]) -> None:
        """Add each call's time to totals[(kernel name, call index)]."""
        clock = time.perf_counter
        for step in self._steps:
            for check, slots in step.checks:
                check(*[env[s] for s in slots])
            for index, (function, slots) in enumerate(step.calls):
                start = clock()
                function(*[env[s] for s in slots])
                key = (step.kernel.name, index)
                totals[key] = totals.get(key, 0.0) + clock() - start

    def profile(self, *args: Any, repeat: int = 10, show: bool = False) -> ProfileReport:
        """Run the graph `repeat` times (after one warm-up call), timing every kernel. Donated
        inputs (a training step's weights) are copied first: the caller's stay as they are."""
        args = self._signature.spared(args)
        self(*args)
        totals: dict[tuple[str, int], float] = {}
        with self._lock:
            for _ in range(repeat):
                env = self._prepare(args)
                self._timed_run(env, totals)
                self._finish(env)
        report = self._report(totals, repeat)
        if show:
            print(report)
        return report

    @contextmanager
    def recording_profile(self) -> Iterator[None]:
        """Time every kernel of the calls made inside the block, as GRAPHC_PROFILE=1 does for
        every call: `profile_report` shows them until the block ends. Scan drivers built before
        the block do not time their bodies' kernels (a SegmentedExecutable's `profile` steps
        its scans from Python)."""
        with self._lock:
            saved = self._profile_totals, self._profile_calls
            self._profile_totals, self._profile_calls = {}, 0
        try:
            yield
        finally:
            with self._lock:
                self._profile_totals, self._profile_calls = saved

    @property
    def profile_report(self) -> ProfileReport | None:
        """Kernel times of every call so far, when GRAPHC_PROFILE=1 was set at compile time."""
        if self._profile_totals is None:
            return None
        return self._report(self._profile_totals, self._profile_calls)

    def _report(self, totals: dict[tuple[str, int], float], calls: int) -> ProfileReport:
        rows = []
        for k in self.kernels:
            parts = [(call.entry, totals.get((k.name, i), 0.0) / max(calls, 1))
                     for i, call in enumerate(k.generated.calls)]
            rows.append(ProfileRow(k.name, k.pattern, sum(t for _, t in parts), k.flops, parts,
                                   k.node.module_paths()))
        return ProfileReport(self.graph.name, rows, calls)

    def __repr__(self) -> str:
        return (f"<numba-cpu Executable {self.graph.name!r}: {len(self.kernels)} kernels, "
                f"{self.plan.summary()}; {self.cache_stats}>")


# Executables whose final kernels compile in the background (finish_compiling).
_UPGRADING: weakref.WeakSet[Executable] = weakref.WeakSet()


def _refuse_a_forked_child(name: str) -> None:
    """Raise in a process forked after its parent ran parallel kernels on GNU OpenMP; note the
    first process that runs them."""
    owner, pid = OPENMP_PROCESS[0], os.getpid()
    if owner == pid:
        return
    if owner is not None:
        raise GraphcError(f"{name}: graphc's parallel kernels cannot run in a process forked after "
                          "its parent ran them (GNU OpenMP kills the child): start worker processes "
                          "with multiprocessing's 'spawn' or 'forkserver' method, or set "
                          "GRAPHC_NUM_THREADS=1 before importing graphc in the parent")
    try:
        if numba.threading_layer() == "omp":  # after the first parallel kernel: known from here
            OPENMP_PROCESS[0] = pid
    except ValueError:  # no parallel kernel has run yet
        pass


def finish_compiling() -> None:
    """Wait for every kernel compiling in the background; each executable runs its final kernels
    from its next call."""
    for executable in list(_UPGRADING):
        executable.finish_compiling()


def _print_profile_at_exit(ref: weakref.ref) -> None:
    executable = ref()
    if executable is not None and executable.profile_printed_at_exit and executable.profile_report.calls:
        print(executable.profile_report.table(parts=True), file=sys.stderr)


def aligned_bytes(nbytes: int) -> np.ndarray:
    """Uninitialised bytes starting at an ALIGNMENT boundary (an arena)."""
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


# -- compilation -----------------------------------------------------------------------------
def _argument_types(node: Node, kernel: KernelSource, call: Call) -> list[TensorType | int | np.floating]:
    """What each argument of `call` is: the type of the kernel array (as the call views it),
    or the scalar itself."""
    types = []
    for k, arg in enumerate(call.args):
        if isinstance(arg, (int, np.floating)):
            types.append(arg)
        else:
            t = arg.pick([v.type for v in node.inputs], [v.type for v in node.outputs], kernel.scratch)
            view = call.view_of(k, t)
            types.append(t if view is None else TensorType(view, t.dtype))
    return types


_BLAS_LIMITED: list[bool] = []


def _limit_blas_threads() -> None:
    """Once per process: graphc splits GEMMs across threads itself (see blas.py)."""
    if not _BLAS_LIMITED:
        _BLAS_LIMITED.append(single_threaded_scipy_blas())


def lower(fused: Graph) -> LoweredGraph:
    """The generated source of every kernel of `fused` that runs code."""
    nodes = [n for n in fused.nodes if n.attrs["pattern"] not in ("view", "constant")]
    return LoweredGraph(fused, choose_variants({n: generate(n) for n in nodes}, {}, planned=False))


def choose_variants(sources: dict[Node, KernelSource], aliases: dict[Node, dict[KernelArray, KernelArray]],
                    planned: bool) -> dict[Node, KernelSource]:
    """`sources`, except that a call the cache would compile becomes its always-parallel
    variant where that one is already compiled (in this process or on disk) or, once memory is
    `planned`, is another kernel's code.

    Kernel sources are generic over extents; their one size-dependent choice is running a loop
    serially below PARALLEL_MIN_ELEMENTS. So a model compiled for batch 64 and then called with
    batch 1 would compile its kernels again, serial, for seconds: the parallel ones it has serve
    as well (a parallel region costs ~10 us); and so, within one model, the same loop under
    and over that size compiles once. Only that way round: a serial kernel left by a
    smaller batch never replaces a parallel one. Chosen call by call: a convolution may be
    parallel at batch 64 and its epilogue serial. `aliases` are the in-place outputs to generate
    with; once memory is `planned`, a kernel keeps its scratch (an always-parallel convolution
    wants a column matrix per thread)."""
    if _SERIAL.get():  # the caller asked for serial code (row blocks running side by side)
        return sources
    cache = get_cache()
    found = iter(cache.compiled([c.source for s in sources.values() for c in s.calls]))
    missing = [n for n, s in sources.items() if not all([next(found) for _ in s.calls])]
    variants = {n: _parallel_variant(n, aliases.get(n), sources[n]) for n in missing}
    variants = {n: v for n, v in variants.items()
                if v is not None and not (planned and v.scratch != sources[n].scratch)}
    candidates = list({c.source for n, v in variants.items() for c in (*v.calls, *sources[n].calls)})
    ready = {source for source, compiled in zip(candidates, cache.compiled(candidates)) if compiled}
    # Once memory is planned the sources are final: a call whose parallel variant is another
    # kernel's own code, compiled in this load anyway, shares it (one compile fewer).
    compiled_now = {c.source for s in sources.values() for c in s.calls} if planned else set()
    chosen = dict(sources)
    for node, variant in variants.items():
        mask = tuple(d.source not in ready and p.source != d.source
                     and (p.source in ready or p.source in compiled_now)
                     for d, p in zip(sources[node].calls, variant.calls))
        chosen[node] = _mixed(sources[node], variant, mask)
    return chosen


def _parallel_variant(node: Node, aliases: dict[KernelArray, KernelArray] | None,
                      default: KernelSource) -> KernelSource | None:
    """`node`'s kernel generated inside always_parallel(), if its calls and scratch arrays
    correspond one to one with `default`'s."""
    with always_parallel():
        variant = generate(node, aliases)
    if len(variant.calls) != len(default.calls) or len(variant.scratch) != len(default.scratch):
        return None
    return variant


def _mixed(default: KernelSource, variant: KernelSource | None, mask: tuple[bool, ...]) -> KernelSource:
    """`default` with the calls `mask` picks (and those it already took) from `variant`, whose
    scratch it then takes: the calls read their extents, thread counts included, from it."""
    mask = tuple(a or b for a, b in zip(mask, default.parallel_calls or mask))
    if variant is None or not any(mask):
        return default
    calls = [v if m else d for d, v, m in zip(default.calls, variant.calls, mask)]
    return replace(default, calls=calls, scratch=variant.scratch, parallel_calls=mask)


def in_place_aliases(plan: MemoryPlan, kernel: Node) -> dict[KernelArray, KernelArray]:
    """The outputs of `kernel` that `plan` writes into an input's buffer, each mapped to that
    input (the first, should one buffer be passed as several inputs), or into an earlier
    output's buffer (a library epilogue writing over the library call's result). Only one of
    the same dtype: a store converts to its array's dtype, so an int32 output in a float32
    input's bytes keeps a parameter of its own."""
    aliases: dict[KernelArray, KernelArray] = {}
    for p, q in sorted(plan.written_in_place(kernel)):
        if kernel.inputs[p].type.dtype == kernel.outputs[q].type.dtype:
            aliases.setdefault(KernelArray(OUTPUT, q), KernelArray(INPUT, p))
    buffers = [plan.buffer_of(v) for v in kernel.outputs]
    for q, buffer in enumerate(buffers):
        if buffer is not None and buffers.index(buffer) < q:
            aliases.setdefault(KernelArray(OUTPUT, q), KernelArray(OUTPUT, buffers.index(buffer)))
    return aliases


def compile_plan(lowered: LoweredGraph, plan: MemoryPlan, memory_of: Any = None) -> Executable:
    """Compile the kernels of `lowered` for the CPU through Numba, run in `plan`'s order over its
    arena. The plan's donations (input index -> output index written into that input's buffer)
    update the caller's array in place and return it as that output. `memory_of`: an executable
    of the same program at another batch size, whose memory the arena may share (Executable)."""
    start = time.perf_counter()
    _limit_blas_threads()
    fused, sources = lowered.graph, lowered.sources
    checks = plan_index_checks(fused, plan)  # first: constant indices out of range fail here
    # Lowering came first because it tells the planner each kernel's scratch (the algorithm a
    # convolution picks decides it); now that the plan says which outputs share an input's
    # buffer, the kernels writing in place are generated again, through one parameter per buffer.
    # A call lowered as its always-parallel variant stays one (its scratch was planned so).
    aliases = {node: in_place_aliases(plan, node) for node in sources
               if node.attrs["pattern"] in POINTWISE_GENERATORS}
    for node, source in sources.items():
        if aliases.get(node):
            default = generate(node, aliases[node])
            variant = _parallel_variant(node, aliases[node], default) if any(source.parallel_calls) else None
            sources[node] = _mixed(default, variant, source.parallel_calls)
    sources.update(choose_variants(sources, aliases, planned=True))
    stand_ins = serial_stand_ins(sources, aliases)
    stats = CacheStats()
    kernels = _load_kernels({**sources, **stand_ins}, stats)
    upgrade = None
    if stand_ins:
        final = {node: sources[node] for node in stand_ins}
        upgrade = _Upgrade(final, get_cache().compile_in_background(_requests(final)))
    return Executable(fused, plan, kernels, stats, time.perf_counter() - start, checks, memory_of, upgrade)


def _requests(sources: dict[Node, KernelSource]) -> list[tuple[Call, tuple]]:
    return [(call, signature_of(_argument_types(node, source, call)))
            for node, source in sources.items() for call in source.calls]


def _load_kernels(sources: dict[Node, KernelSource], stats: CacheStats) -> dict[Node, CompiledKernel]:
    """Each kernel of `sources` compiled (or loaded from the disk cache)."""
    requests = _requests(sources)
    dispatchers = get_cache().load_all(requests, stats)
    # The executor passes exactly the compiled argument types (inputs checked and made contiguous,
    # writeable and aligned; every other array its own), so it calls the machine code directly:
    # a dispatcher resolves the types again on every call, ~2-3 us for a kernel's dozen arrays.
    entry_points = iter([d.overloads[signature].entry_point
                         for d, (_, signature) in zip(dispatchers, requests)])
    functions = iter(dispatchers)
    kernels = {}
    for node, source in sources.items():
        calls = range(len(source.calls))
        kernels[node] = CompiledKernel(node, source, [next(functions) for _ in calls],
                                       [next(entry_points) for _ in calls])
    return kernels


def background_compiles_enabled() -> bool:
    """$GRAPHC_BACKGROUND_COMPILE (default on) and compile workers allowed
    ($GRAPHC_COMPILE_WORKERS not 0), outside an MPI job: data-parallel ranks that switched to
    their final kernels at different steps would update their replicas of the weights with
    differently compiled code, and the replicas could drift apart by rounding."""
    mpi = sys.modules.get("mpi4py.MPI")
    return (os.environ.get("GRAPHC_BACKGROUND_COMPILE", "1") not in ("", "0")
            and os.environ.get("GRAPHC_COMPILE_WORKERS", "1") != "0"
            and not (mpi is not None and mpi.Is_initialized()))


def serial_stand_ins(sources: dict[Node, KernelSource], aliases: dict[Node, dict[KernelArray, KernelArray]]
                     ) -> dict[Node, KernelSource]:
    """Serial kernels to run while the parallel ones of `sources` that the cache lacks compile in
    the background, where those would take STAND_IN_MIN_SECONDS or more (by estimate): a parallel
    kernel compiles 2-4 times as long as its serial form (Numba compiles each parallel loop's
    body, a wrapper and the caller as separate modules). None inside always_parallel(), whose
    caller asked for the parallel code."""
    if _ALWAYS_PARALLEL.get() or not background_compiles_enabled():
        return {}
    parallel = list({c.source: c for s in sources.values() for c in s.calls if c.parallel}.values())
    missing = {c.source for c, found in zip(parallel, get_cache().compiled([c.source for c in parallel]))
               if not found}
    if sum(estimated_compile_seconds(c) for c in parallel if c.source in missing) < STAND_IN_MIN_SECONDS:
        return {}
    # Convolutions stand in as im2col rather than Winograd, whose serial module takes longest to
    # compile (resnet-m's cold first call, 2 threads: 9.5-10.1 s with Winograd stand-ins, 6.7-6.9 s
    # with im2col). Their scratch may not fit the plan's: Executable._scratch.
    with serial_kernels(), im2col_only():
        return {node: generate(node, aliases.get(node)) for node, source in sources.items()
                if any(c.source in missing for c in source.calls)}


def scratch_offsets(scratch: Sequence[TensorType], planned: Sequence[tuple[Storage, TensorType]]
                    ) -> list[int] | None:
    """Where in the arena a kernel's scratch tensors go: in the storage planned for each, where
    they pair up in order (the kernel the plan was made for, or a serial form of it with smaller
    scratch); else packed, largest first, into the first planned storage with room left (a
    stand-in whose scratch differs: im2col's columns for Winograd's tiles). None if they do not
    fit. The storages are the kernel's own while it runs."""
    if len(scratch) == len(planned) and all(
            t.dtype == p.dtype and t.size <= p.size for t, (_, p) in zip(scratch, planned)):
        return [storage.offset for storage, _ in planned]
    room = [[storage.offset, storage.nbytes] for storage, _ in planned]  # [next free, bytes left]
    offsets: list[int] = [0] * len(scratch)
    for i in sorted(range(len(scratch)), key=lambda i: -scratch[i].nbytes):
        free = next((r for r in room if r[1] >= scratch[i].nbytes), None)
        if free is None:
            return None
        offsets[i] = free[0]
        taken = -(-scratch[i].nbytes // ALIGNMENT) * ALIGNMENT  # the next one starts aligned
        free[0], free[1] = free[0] + taken, free[1] - taken
    return offsets


class _Upgrade:
    """An executable's final kernels, compiled by `background` (cache.compile_in_background)
    while serial stand-ins run."""

    def __init__(self, sources: dict[Node, KernelSource], background: list[BackgroundCompile]) -> None:
        self.sources, self.background = sources, background
        self.owner = os.getpid()  # a forked child keeps its stand-ins: the workers are not its own

    def owned(self) -> bool:
        return os.getpid() == self.owner

    def ready(self) -> bool:
        return self.owned() and all(job.done() for job in self.background)

    def load(self, stats: CacheStats) -> dict[Node, CompiledKernel]:
        """The final kernels, once the workers are done (waiting for them); any they could not
        compile compile here."""
        for job in self.background:
            job.finish()
        return _load_kernels(self.sources, stats)

    def stop(self) -> None:
        if self.owned():
            for job in self.background:
                job.stop()
