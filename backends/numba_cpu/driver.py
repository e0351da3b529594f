"""The compiled loop of a scan on numba-cpu: one generated @njit driver per scan body.

The body is compiled as an Executable of its own (fused, memory-planned, kernels loaded): its
pre-bound kernel list says which array every call takes. The driver is that list written out as
Python inside a loop over the steps, compiled by Numba, so no Python runs per step:

- loop-invariant arrays (the scan's consts, the body's arena views, constants, scratch and the
  integer extents) are arguments of the driver, passed once per call;
- step t's slice of each stacked input is `xs[t]`, a view;
- each per-step output is computed straight into `ys[t]` (in place, no copy) and each new carry
  into the carry's second buffer; the two buffers of a carry swap after every step.

A body output the kernels do not write themselves (an input or constant returned as it is, or one
value returned twice) is copied into its destination at the end of the step.

The driver calls each kernel's compiled code by its symbol, with the exact argument types it was
compiled for (`_unlinked_call`): the driver compiles once per body (its trip count is an
argument), no kernel compiles again, and the kernels' code is not linked into the driver to be
optimized once more. The driver goes through the kernel cache like a kernel: its text names the
kernel modules and symbols it calls (so they key it too) and a later process loads it in
milliseconds. No driver is built where the body has index checks (their checks are Python, run per
step) or where its kernels are being profiled (GRAPHC_PROFILE times each call from Python): the
scan then steps the body executable from Python (graphc/scan_lowering.py).
"""
from __future__ import annotations

import hashlib
import time
from typing import Any, Callable

import numba
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic

from graphc.backends.kernel_files import CacheStats
from graphc.backends.source_guard import identifier
from graphc.ir import Graph, Node
from graphc.ir.ops.control import split_inputs

from .cache import cache_key, get_cache
from .codegen_common import Call, kernel_threads, requested_threads, serial_kernels
from .executor import Executable, aligned_bytes
from .team import run_side_by_side
from .thread_choice import ThreadChoice


class ScanDriver:
    """One scan run by its compiled driver. Call it with the scan node's operands (consts,
    initial carry, stacked xs); it returns the final carry and the stacked per-step outputs.

    Attributes: `source` (the generated driver module), `cache_stats` (loading the driver,
    compiled or from the disk cache, on the first call), `compile_seconds` (that load)."""

    def __init__(self, node: Node, body: Executable, row_block: bool = False) -> None:
        self.node = node
        self.body = body
        self.length = node.attrs["length"]
        self.num_carry = node.attrs["num_carry"]
        self.source, self._fixed, self._kernels = _generate(node, body, row_block)
        self._shareable = _shareable_stacks(node, body)
        # node input positions whose arrays the caller hands over: read by nothing after the scan
        # (compile_with_scans sets it), so a stacked output may be written over them
        self.overwritable: frozenset[int] = frozenset()
        self.allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty  # stacked outputs
        self.cache_stats = CacheStats()
        self.compile_seconds = 0.0
        self._driver: Any = None

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        consts, current, following, xs, ys = self._arrays(args)
        length = self.length
        rows = [a.reshape(length, int(np.prod(a.shape[1:]))) for a in xs + ys]
        body = self.body
        with body._lock:
            if body._threads is not None and numba.get_num_threads() != body._threads:
                numba.set_num_threads(body._threads)
            arguments = (length, *consts, *current, *following, *rows, *self._fixed)
            if self._driver is None:
                self._driver = self._load(arguments)
            self._driver(*arguments)
        # the driver swaps each carry's two buffers after every step
        return (current if length % 2 == 0 else following) + ys

    def _arrays(self, args: list[np.ndarray]) -> tuple[list[np.ndarray], ...]:
        """(consts, the carries' two buffers, stacked inputs, stacked outputs) of one call."""
        consts, carry, xs = split_inputs(self.node, [_usable(a) for a in args])
        k = self.num_carry
        current = [np.array(c, order="C") for c in carry]  # the caller's arrays stay as they are
        following = [np.empty_like(c) for c in current]
        ys: list[np.ndarray | None] = [None] * (len(self.node.outputs) - k)
        first_x = len(self.node.inputs) - len(xs)
        for j, i in self._shareable:
            if first_x + i in self.overwritable and ys[j] is None and all(y is not xs[i] for y in ys):
                ys[j] = xs[i]
        ys = [self.allocate(v.type.shape, v.type.np_dtype) if y is None else y
              for y, v in zip(ys, self.node.outputs[k:])]
        return consts, current, following, xs, ys

    def _load(self, arguments: tuple) -> Any:
        """The driver compiled for `arguments`' types, through the kernel cache."""
        start = time.perf_counter()
        signature = tuple(numba.typeof(a) for a in arguments)
        kernels = {f"kernel{i}": kernel for i, kernel in enumerate(self._kernels)}
        driver = get_cache().load_bound(Call(self.source, "scan_driver", ()), signature, kernels,
                                        self.cache_stats)
        self.compile_seconds = time.perf_counter() - start
        return driver


class RowBlockDriver(ScanDriver):
    """One scan whose rows are independent (passes/row_blocks.py), run as one loop per block of
    rows, side by side on `blocks` threads (team.py). Each loop is the compiled driver of the body
    retyped for a block, with serial kernels and an arena of its own; it reads and writes its rows
    of the carries and stacks in place. Run as one loop over the whole batch, every step's product
    and gates would be parallel regions of their own, their results crossing between the cores
    every step (lstm-64, 2 threads: the forward loop 8.1 ms that way, 6.6 ms in two blocks).

    `body` is the block's body executable (`rows` rows), `last_body` the last block's where the
    blocks do not divide the batch (fewer rows; the loop, which takes its shapes as arguments,
    is the same compiled code). Profiles step them from Python, block after block
    (graphc/scan_lowering.py ScanLoop); the whole batch's body is never compiled."""

    def __init__(self, node: Node, body: Executable, blocks: int, last_body: Executable | None = None) -> None:
        super().__init__(node, body, row_block=True)
        self.blocks = blocks
        self.batch = node.inputs[node.attrs["num_consts"]].type.shape[0]
        self.rows = body.graph.input_values[node.attrs["num_consts"]].type.shape[0]
        self.last_body = last_body
        self._last = ScanDriver(node, last_body, row_block=True) if last_body is not None else None
        if self._last is not None:
            self._last.cache_stats = self.cache_stats  # loading both loops counts as this one's
        # each block's loop-invariant values: the first block runs over the block body's own
        # arena, every other over a copy; the last over its own body's, where it has one
        copies = blocks - 1 - (last_body is not None)
        self._block_fixed = [self._fixed] + [_rebased(self._fixed, body._memory) for _ in range(copies)]
        if self._last is not None:
            self._block_fixed.append(self._last._fixed)
        # Side by side, the blocks wait for the slowest: where another process holds a core, its
        # block waits for a scheduler slice (lstm-28's forward loop, 2 blocks of 32 rows, helpers
        # running beside it: 7.8 ms a call side by side, ~3.4 ms one block after the other). So
        # unless GRAPHC_NUM_THREADS pins the count, the loop times its calls and keeps the faster,
        # as executables do (thread_choice.py); the blocks compute the same either way.
        self._choice = ThreadChoice(blocks) if blocks > 1 and requested_threads() is None else None
        self._untimed_calls = 1  # the first call pages the blocks' stacks in

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        consts, current, following, xs, ys = self._arrays(args)
        length, rows = self.length, self.rows
        shared = (*consts, *current, *following, *(a.reshape(length, self.batch, -1) for a in xs + ys))
        calls = [(length, b * rows, min(self.batch, (b + 1) * rows), *shared, *fixed)
                 for b, fixed in enumerate(self._block_fixed)]
        with self.body._lock:
            if self._driver is None:
                self._driver = self._load(calls[0])
            drivers = [self._driver] * self.blocks
            if self._last is not None:
                if self._last._driver is None:
                    self._last._driver = self._last._load(calls[-1])
                drivers[-1] = self._last._driver
            self._run_blocks(list(zip(drivers, calls)))
        return (current if length % 2 == 0 else following) + ys

    def _run_blocks(self, jobs: list[tuple[Any, tuple]]) -> None:
        """Side by side, or one after the other on this thread where that has been faster."""
        choice = self._choice
        if choice is None:
            run_side_by_side(jobs)
            return
        threads = choice.threads()
        start = time.perf_counter()
        if threads == 1:
            for driver, arguments in jobs:
                driver(*arguments)
        else:
            run_side_by_side(jobs)
        if self._untimed_calls:
            self._untimed_calls -= 1
        else:
            choice.record(threads, time.perf_counter() - start)


def _rebased(values: list[Any], memory: np.ndarray) -> list[Any]:
    """A block loop's loop-invariant values over a copy of its body's arena `memory`: each array
    of the arena at its offset in the copy (arrays sharing bytes keep sharing them), any other
    array copied (a constant, scratch of its own), ints and floats as they are."""
    copy, start = aligned_bytes(memory.nbytes), memory.ctypes.data
    rebased: list[Any] = []
    for value in values:
        if not isinstance(value, np.ndarray):
            rebased.append(value)
            continue
        at = value.ctypes.data - start
        if value.nbytes and 0 <= at and at + value.nbytes <= memory.nbytes:
            rebased.append(copy[at:at + value.nbytes].view(value.dtype).reshape(value.shape))
        else:
            rebased.append(np.array(value, order="C"))
    return rebased


def _usable(array: Any) -> np.ndarray:
    """`array` as the kernels were compiled for it: C-contiguous, aligned and writeable."""
    array = np.asarray(array)  # (np.ascontiguousarray would make a shape () array (1,))
    ready = array.flags.c_contiguous and array.flags.writeable and array.flags.aligned
    return array if ready else np.array(array, order="C")


def scan_driver(node: Node, body: Executable) -> ScanDriver | None:
    """A compiled driver for `node` over its compiled `body`, or None where the body's steps need
    Python (index checks, GRAPHC_PROFILE)."""
    return ScanDriver(node, body) if _steps_compiled(body) else None


def row_blocks(batch: int) -> int:
    """How many row blocks of a scan over `batch` rows run side by side: as many as kernels have
    threads (1: none), each of ceil(batch / threads) rows, the last of the rest (63 rows on 2
    threads: 32 and 31; 7 on 4: 2, 2, 2 and 1)."""
    if batch < 2:  # nothing to split (an empty batch too)
        return 1
    rows = -(-batch // min(kernel_threads(), batch))
    return -(-batch // rows)


def splits_rows() -> bool:
    """Whether scans whose rows are independent may run in row blocks here: kernels have several
    threads (a batch they divide splits; another runs whole)."""
    return kernel_threads() > 1


def row_block_driver(node: Node, block: Graph, blocks: int, compile_part: Callable[[Graph], Any],
                     last: Graph | None = None) -> tuple[tuple[Any, Any], RowBlockDriver | None]:
    """((`block`, `last`) compiled with serial kernels by `compile_part`: the body of scan `node`
    retyped for a block of rows (passes/row_blocks.py), and for the last block's fewer rows where
    the blocks do not divide the batch (else None); the driver running `node` as `blocks` row
    blocks side by side through them, or None where their steps need Python: GRAPHC_PROFILE's
    timing, under which the blocks step from Python, graphc/scan_lowering.py)."""
    with serial_kernels():
        body = compile_part(block)
        last_body = compile_part(last) if last is not None else None
    compiled = [b for b in (body, last_body) if b is not None]
    driver = (RowBlockDriver(node, body, blocks, last_body)
              if all(isinstance(b, Executable) and _steps_compiled(b) for b in compiled) else None)
    return (body, last_body), driver


def _steps_compiled(body: Executable) -> bool:
    """Whether no step of `body` needs Python: no index check, no profiled kernel."""
    return (body._profile_totals is None and not body._donated_slots
            and not any(step.checks for step in body._steps))


def _shareable_stacks(node: Node, body: Executable) -> list[tuple[int, int]]:
    """(j, i) pairs: stacked output j may be written into stacked input i's array, step t's row
    over row t. That holds where they have one type and every kernel reading x_t (or a view of
    it) runs before the kernel writing y_t: step t reads row t only, and rows of other steps are
    not touched. (The VJP of a scan reads each step's saved residuals once, before it writes
    that step's cotangent of the same shape: the residual stack's memory serves for both.) An
    x_t read by an end-of-step copy (an output that is a view of it) is read after them all."""
    graph, env = body.graph, body._env
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    xs, ys = graph.input_values[c + k:], graph.output_values[k:]
    views = {slot: base for slot, base, _ in body._views}

    def origin(slot: int) -> int:
        while slot in views:
            slot = views[slot]
        return slot
    calls = [{origin(s) for s in slots} for step in body._steps for _, slots in step.calls]
    fresh = {slot for slot, _, _ in body._fresh}
    inputs = set(body._inputs)
    # outputs no kernel writes (a view of x_t, such as its reshape) are copied out at the end
    # of the step, after every kernel: what they read must not have been overwritten by then
    late_reads = {origin(env.slot[(v, False)]) for v in graph.output_values
                  if env.slot[(v, False)] not in fresh or env.slot[(v, False)] in inputs}
    pairs = []
    for j, y in enumerate(ys):
        y_slot = env.slot[(y, False)]
        writer = min((n for n, slots in enumerate(calls) if y_slot in slots), default=None)
        if writer is None or y_slot not in fresh or y_slot in inputs or ys.count(y) != 1:
            continue  # copied at the end of the step, not written by a kernel
        for i, x in enumerate(xs):
            x_slot = body._inputs[c + k + i]
            readers = [n for n, slots in enumerate(calls) if x_slot in slots]
            if (x.type == y.type and x not in ys and max(readers, default=-1) < writer
                    and x_slot not in late_reads):
                pairs.append((j, i))
    return pairs


def _unlinked_call(dispatcher: Any, entry_point: Callable) -> tuple[Callable, str]:
    """(the overload of `dispatcher` whose entry point is `entry_point`, callable from the driver
    by its symbol alone; that symbol). Calling the dispatcher itself would link the kernel's code
    into the driver, which Numba would optimize and compile to machine code once more. The symbol
    is defined in Numba's JIT already (the body executable loaded the kernel), and the driver's
    cached machine code resolves it again in a later process, whose executor loads the kernels
    first. The symbol carries a number Numba gives each compile, so the driver's text names it
    (hashed): a kernel compiled again makes another driver, never a stale reference."""
    (compiled,) = [c for c in dispatcher.overloads.values() if c.entry_point is entry_point]
    function = compiled.fndesc

    @intrinsic
    def call(typingctx: Any, *args: Any) -> Any:
        def codegen(context: Any, builder: Any, signature: Any, values: Any) -> Any:
            callee = context.declare_function(builder.module, function)
            status, _ = context.call_conv.call_function(builder, callee, function.restype, function.argtypes,
                                                        cgutils.unpack_tuple(builder, values[0]))
            with cgutils.if_unlikely(builder, status.is_error):
                context.call_conv.return_status_propagate(builder, status)
            return context.get_dummy_value()
        if tuple(args) != tuple(function.argtypes):
            return None  # a typing error, never a call with other argument types than compiled
        return types.none(types.StarArgTuple.from_types(args)), codegen
    return call, function.mangled_name


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _generate(node: Node, body: Executable, row_block: bool = False) -> tuple[str, list[Any], list[Callable]]:
    """(the driver module's source, the loop-invariant values the driver takes after the per-call
    arrays, the kernels its placeholders `kernel0`, `kernel1`, ... stand for). With `row_block`,
    `body` is the scan's body for a block of rows (RowBlockDriver) and the driver runs the loop
    over rows row0:row1 of the carries (and of the consts the body has fewer rows of) and of the
    stacked arrays, which it takes as (length, batch, rest). Its shapes and sizes are then
    parameters too, so that blocks of other row counts (the last block's fewer rows, another
    batch size) run the same compiled driver."""
    graph, env = body.graph, body._env
    extents: list[tuple[int, ...] | int] = []  # a row block driver's shapes and sizes, in order

    def extent(value: tuple[int, ...] | int) -> str:
        if not row_block or value == ():
            return repr(value)
        extents.append(value)
        return f"extent{len(extents) - 1}"
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    step_types = [v.type for v in graph.input_values[c + k:]] + [v.type for v in graph.output_values[k:]]
    consts = [f"const{i}" for i in range(c)]
    current = [f"carry{i}" for i in range(k)]
    following = [f"next_carry{i}" for i in range(k)]
    xs = [f"xs{i}" for i in range(len(graph.input_values) - c - k)]
    ys = [f"ys{i}" for i in range(len(graph.output_values) - k)]
    # Stacked arrays come as (length, elements of a step): row t, reshaped, is step t's array
    # (also for a step of shape (), which indexing alone would turn into a scalar). A block's
    # come as (length, batch, rest): its step is rows row0:row1 of step t.
    row = "t, row0:row1" if row_block else "t"
    step_slices = [f"{name}[{row}].reshape({extent(t.shape)})" for name, t in zip(xs + ys, step_types)]

    names: dict[int, str] = {}  # env slot -> what the driver reads it from
    for i, slot in enumerate(body._inputs):
        names[slot] = (consts + current + step_slices)[i]
    # An output a kernel writes is computed in its destination; the others are copied there,
    # element by element (`rows`: each destination as one dimension).
    destinations = following + step_slices[len(xs):]
    rows = [f"{name}.reshape({extent(v.type.size)})" for name, v in zip(following, graph.output_values)]
    rows += [f"{name}[{row}].reshape({extent(t.size)})" for name, t in zip(ys, step_types[len(xs):])]
    fresh = {slot for slot, _, _ in body._fresh}
    copies: list[tuple[int, str, int]] = []  # (slot, destination row, elements)
    for j, v in enumerate(graph.output_values):
        slot = env.slot[(v, False)]
        if slot in fresh and slot not in names:
            names[slot] = destinations[j]
        else:
            copies.append((slot, rows[j], v.type.size))
    fixed = [slot for slot, value in enumerate(env.template) if value is not None]
    names.update({slot: f"fixed{i}" for i, slot in enumerate(fixed)})
    views = {slot: (base, shape) for slot, base, shape in body._views}  # bases bound first

    kernels: list[Callable] = []
    calls = []
    for step in body._steps:
        compiled = zip(step.kernel.functions, step.kernel.entry_points, step.calls, step.kernel.generated.calls)
        for function, entry_point, (_, slots), call in compiled:
            kernel, symbol = _unlinked_call(function, entry_point)
            calls.append(f"kernel{len(kernels)}({', '.join(f'a{s}' for s in slots)})"
                         f"  # {identifier(step.kernel.name)}: {identifier(call.entry)} of "
                         f"k_{cache_key(call.source)}, symbol {_digest(symbol)}")
            kernels.append(kernel)
    needed = {s for step in body._steps for _, slots in step.calls for s in slots}
    needed |= {slot for slot, _, _ in copies}
    for slot in needed & views.keys():
        while slot in views:  # a view needs its base (bound before it: a lower slot)
            slot = views[slot][0]
            needed.add(slot)

    step_index = "length - 1 - i" if node.attrs["reverse"] else "i"
    arrays = [*consts, *current, *following, *xs, *ys]
    rows_of_block = ["row0", "row1"] if row_block else []
    view_lines = [f"        a{slot} = a{views[slot][0]}.reshape({extent(views[slot][1])})"
                  for slot in sorted(needed) if slot in views]
    copy_lines = []
    for slot, row, size in copies:  # a loop: Numba compiles `row[:] = array` for seconds
        size_text = extent(size)
        copy_lines += [f"        copy_to, copy_from = {row}, a{slot}.reshape({size_text})",
                       f"        for e in range({size_text}):", "            copy_to[e] = copy_from[e]"]
    parameters = ["length", *rows_of_block, *arrays, *(names[s] for s in fixed),
                  *(f"extent{i}" for i in range(len(extents)))]
    lines = [f'"""The loop of a scan body: {len(calls)} kernel calls per step, each by the symbol of '
             'its compiled code; generated by graphc (backends/numba_cpu/driver.py)."""',
             "import numba", ""]
    # the kernels, set before the driver compiles (named with their modules in the calls' comments)
    lines += [f"kernel{i} = None" for i in range(len(kernels))]
    lines += ["", "", "@numba.njit(cache=True, nogil=True)",
              f"def scan_driver({', '.join(parameters)}):"]
    if row_block:  # a block reads its rows of the carries and of the consts the block body has fewer of
        split = [name for name, v, whole in zip(consts, graph.input_values, node.inputs) if v.type != whole.type]
        lines += [f"    {name} = {name}[row0:row1]" for name in split + current + following]
    lines += ["    for i in range(length):",
              f"        t = {step_index}"]
    lines += [f"        a{slot} = {names[slot]}" for slot in sorted(needed) if slot not in views]
    lines += view_lines
    lines += [f"        {call}" for call in calls]
    lines += copy_lines
    if k:
        lines.append(f"        {', '.join(current + following)} = {', '.join(following + current)}")
    return "\n".join(lines) + "\n", [env.template[s] for s in fixed] + extents, kernels


__all__ = ["RowBlockDriver", "ScanDriver", "row_block_driver", "row_blocks", "scan_driver"]
