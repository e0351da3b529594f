"""Running scans on the kernel backends (issue 20 item 4).

The graph is cut at its scan nodes; every part between them is compiled as usual (fusion,
memory plan, kernels) and each scan's body is compiled on its own as one executable, once,
whatever the trip count. A body executable that can run as a compiled loop offers
`scan_driver(node)`: on numba-cpu that is one generated @njit driver per scan
(backends/numba_cpu/driver.py), which runs every step's kernels over the body's planned arena,
reads step t's slices of the stacked inputs and writes its outputs straight into the stacked
results, with no Python per step. On numba-cuda it is a loop on the host that launches each step's
kernels over device buffers (backends/numba_cuda/scan_loop.py): the stacked inputs go up once and
the results come down once, with no host round trip between steps. Elsewhere the scan runs as a
`ScanLoop`: a Python loop calling the body executable once per step (~tens of microseconds
each). That is a body holding a scan of its own (its inner scans get drivers; the outer steps
from Python), and bodies whose steps need the host (index checks, GRAPHC_PROFILE's per-kernel
timing). The parts do not share one arena.
"""
from __future__ import annotations

import atexit
import math
import os
import sys
import threading
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np

from graphc.backends import Profiled
from graphc.backends.profile import ProfileReport, merged_report
from graphc.backends.signature import InputSignature, store_donated, unaliased
from graphc.ir import Graph, Node, Value
from graphc.ir.memory import MemoryPlan
from graphc.ir.ops.control import SCAN_OP, split_inputs
from graphc.ir.ops.indexing import index_bounds
from graphc.passes.row_blocks import row_block_body

Run = Callable[[list[np.ndarray]], list[np.ndarray]]
Compile = Callable[..., Any]  # (a graph without scans at its top level, donate=None) -> an executable


class ScanLoop:
    """One scan run step by step: its compiled body called from Python per step (where the
    body offers no compiled driver). With `rows`, `body` is the body for that many rows of the
    batch (a row block driver's, passes/row_blocks.py), run over one block after another;
    `last_body` the body for the last block's fewer rows, where `rows` does not divide the batch."""

    def __init__(self, node: Node, body: Any, rows: int | None = None, last_body: Any = None) -> None:
        self.node = node
        self.body = body
        self.allocate: Callable[[tuple[int, ...], np.dtype], np.ndarray] = np.empty  # stacked outputs
        self.steps = range(node.attrs["length"])[::-1] if node.attrs["reverse"] else range(node.attrs["length"])
        c = node.attrs["num_consts"]
        # each block's rows and body, and which consts it has rows of (a block body has fewer of
        # them); without `rows`, the one block is the whole batch: no array is sliced (a carry may
        # be 0-d)
        self.blocks: list[tuple[slice | None, Any]] = (
            [(slice(start, start + rows), body) for start in range(0, node.inputs[c].type.shape[0], rows)]
            if rows else [(None, body)])
        if last_body is not None:
            self.blocks[-1] = (self.blocks[-1][0], last_body)
        self.split = ([v.type != whole.type for v, whole in zip(body.graph.input_values[:c], node.inputs[:c])]
                      if rows else [False] * c)

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        consts, carry, xs = split_inputs(self.node, args)
        k = self.node.attrs["num_carry"]
        ys = [self.allocate(v.type.shape, v.type.np_dtype) for v in self.node.outputs[k:]]
        finals = []
        for rows, body in self.blocks:
            def of_block(a: Any) -> Any:
                return a if rows is None else a[rows]
            block_consts = [of_block(c) if split else c for c, split in zip(consts, self.split)]
            block_carry = [of_block(c) for c in carry]
            for t in self.steps:
                outs = body(*block_consts, *block_carry, *(of_block(x[t]) for x in xs))
                block_carry = outs[:k]
                for y, out in zip(ys, outs[k:]):
                    if rows is None:
                        y[t] = out
                    else:
                        y[t][rows] = out
            finals.append(block_carry)
        # the body executable may hand back an input as an output: never return the caller's array
        return [np.concatenate(parts) if len(parts) > 1 else np.array(parts[0]) for parts in zip(*finals)] + ys


@dataclass(frozen=True)
class SegmentedMemoryPlan:
    """The memory of a program with scans: each compiled part's and loop body's own arena (a
    body run in row blocks has one per block: `plans` holds (label, plan, copies)), and the
    loops' stacked outputs, arrays outside the arenas."""

    plans: list[tuple[str, MemoryPlan, int]]
    stack_bytes: int

    @property
    def peak_bytes(self) -> int:
        return sum(plan.peak_bytes * copies for _, plan, copies in self.plans) + self.stack_bytes

    @property
    def naive_bytes(self) -> int:
        return sum(plan.naive_bytes * copies for _, plan, copies in self.plans) + self.stack_bytes

    def summary(self) -> str:
        saved = 1 - self.peak_bytes / self.naive_bytes if self.naive_bytes else 0.0
        lines = [f"{self.peak_bytes} bytes in {len(self.plans)} arenas of parts and loop bodies and "
                 f"{self.stack_bytes} bytes of loop outputs stacked (naive {self.naive_bytes} bytes, "
                 f"{saved:.0%} saved)"]
        lines += [f"  {label}: {plan.summary()}" + (f", {copies} blocks" if copies > 1 else "")
                  for label, plan, copies in self.plans]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"peak_bytes": self.peak_bytes, "naive_bytes": self.naive_bytes,
                "stack_bytes": self.stack_bytes,
                "pieces": [{"label": label, "copies": copies, **plan.to_dict()}
                           for label, plan, copies in self.plans]}


class SegmentedExecutable:
    """A graph with scans, run as its compiled parts and loops in order. A donated input is
    written in place by the part computing its new value where nothing after that part reads
    it (compile_with_scans), else it receives its output by copy at the end. A part's values
    that only later parts read stay in the part's own memory (`lend_outputs`).

    The scans' stacked outputs come from `stack()`: arrays of the last call that it did not
    return are used again. A fresh array of that size (tens of MiB over hundreds of steps) is
    mapped anew by the system on every call and each of its pages faults when first written:
    on lstm-784 that cost ~14 ms of a ~380 ms step, and up to 0.2 s of system time in the first
    call at another batch size (88 MiB of stacks at 33 after 64). So `memory_of`, the
    SegmentedExecutable of the same program at another batch size, shares its spare arrays:
    a stack is the front of the smallest spare one of its dtype that holds it. Calls take turns
    (those of `memory_of` too).

    Profiles (GRAPHC_PROFILE=1, `profile(*args)`) report the kernels of every part and scan body
    in one table, per call of the program."""

    def __init__(self, graph: Graph, parts: list[tuple[Run, list[Value], list[Value]]],
                 pieces: list[tuple[str, Any, int]], donate: dict[int, int] | None = None,
                 memory_of: Any = None, arenas: Sequence[int] | None = None) -> None:
        self.graph = graph
        self.parts = parts
        # (label, executable, runs per call) of every compiled part and scan body, for profiles
        self.pieces = pieces
        self.arenas = list(arenas or [1] * len(pieces))  # per piece: the copies of its arena a call uses
        self.profile_printed_at_exit = True
        for _, executable, _ in pieces:
            if isinstance(executable, Profiled):  # this program's table includes theirs
                executable.profile_printed_at_exit = False
        if os.environ.get("GRAPHC_PROFILE", "") not in ("", "0"):
            atexit.register(_print_profile_at_exit, weakref.ref(self))
        self.donate = dict(donate or {})
        self._signature = InputSignature(graph, tuple(self.donate))
        if isinstance(memory_of, SegmentedExecutable):
            self._lock, self._spare = memory_of._lock, memory_of._spare
        else:
            self._lock = threading.Lock()
            self._spare: dict[np.dtype, list[np.ndarray]] = {}  # flat arrays, by dtype
        self._lent: list[np.ndarray] = []  # the spare arrays this call's stacks are the front of
        for run, _, _ in parts:
            if hasattr(run, "allocate"):  # a scan's loop (ScanLoop, a backend's driver)
                run.allocate = self.stack

    def stack(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """An uninitialised array for a scan's stacked output."""
        dtype, size = np.dtype(dtype), math.prod(shape)
        spares = self._spare.get(dtype, [])
        fitting = [i for i, a in enumerate(spares) if a.size >= size]
        if fitting:
            spare = spares.pop(min(fitting, key=lambda i: spares[i].size))
        else:
            spare = np.empty(size, dtype)
        array = spare[:size].reshape(shape)
        self._lent.append(spare)
        return array

    def __call__(self, *args: Any) -> list[np.ndarray]:
        with self._lock:
            return self._run(args)

    def _run(self, args: Sequence[Any]) -> list[np.ndarray]:
        arrays = self._signature.prepare(args)
        env: dict[Value, np.ndarray] = dict(zip(self.graph.input_values, arrays))
        for run, inputs, outputs in self.parts:
            env.update(zip(outputs, run([env[v] for v in inputs])))
        results = [env[v] for v in self.graph.output_values]
        store_donated(arrays, results, self.donate)  # those a part did not write in place
        # an input returned as it is (a module's weight included), one value returned twice
        results = unaliased(results, arrays, set(self.donate.values()))
        # a stack is kept for the next call unless the caller gets it or a view of it: an array
        # whose memory's owner (NumPy's base of a view) is the stack's spare array
        returned = {id(r) if r.base is None else id(r.base) for r in results}
        for spare in self._lent:
            if id(spare) not in returned:
                self._spare.setdefault(spare.dtype, []).append(spare)
        self._lent = []
        return results

    @property
    def memory_plan(self) -> SegmentedMemoryPlan:
        """The memory plans of its compiled parts and loop bodies, and its loops' stacks."""
        plans = [(label, executable.plan, copies) for (label, executable, _), copies
                 in zip(self.pieces, self.arenas) if getattr(executable, "plan", None) is not None]
        stacks = sum(v.type.nbytes for run, _, _ in self.parts if hasattr(run, "node")
                     for v in run.node.outputs[run.node.attrs["num_carry"]:])
        return SegmentedMemoryPlan(plans, stacks)

    # -- profiling (the kernel backends' Profiled protocol) ---------------------------------------
    @property
    def profile_report(self) -> ProfileReport | None:
        """The kernel times of every part and scan body, per call of the program, while they
        are recorded (GRAPHC_PROFILE=1, recording_profile); None otherwise."""
        reports = [(label, executable.profile_report, runs) for label, executable, runs in self.pieces
                   if isinstance(executable, Profiled)]
        reports = [(label, report, runs) for label, report, runs in reports if report is not None]
        return merged_report(self.graph.name, reports) if reports else None

    @contextmanager
    def recording_profile(self) -> Iterator[None]:
        """Time every kernel of the calls made inside the block. Meanwhile the scans step from
        Python: a compiled driver runs its body's kernels out of the profiler's sight."""
        with ExitStack() as recording:
            for _, executable, _ in self.pieces:
                if isinstance(executable, Profiled):
                    recording.enter_context(executable.recording_profile())
            with self._lock:
                compiled_loops = self.parts
                self.parts = [(self._stepped(run), inputs, outputs) for run, inputs, outputs in self.parts]
            try:
                yield
            finally:
                with self._lock:
                    self.parts = compiled_loops

    def _stepped(self, run: Run) -> Run:
        if isinstance(run, ScanLoop) or not hasattr(run, "body"):  # a part, or stepped already
            return run
        # rows, last_body: a row block driver's
        loop = ScanLoop(run.node, run.body, getattr(run, "rows", None), getattr(run, "last_body", None))
        loop.allocate = self.stack
        return loop

    def profile(self, *args: Any, repeat: int = 10, show: bool = False) -> ProfileReport | None:
        """Run the program `repeat` times (after one warm-up call), timing every kernel; None
        where no part can be timed (a backend without profiles). Donated inputs (a training
        step's weights) are copied first: the caller's stay as they are."""
        args = self._signature.spared(args)
        self(*args)
        with self.recording_profile():
            for _ in range(repeat):
                self(*args)
            report = self.profile_report
        if show and report is not None:
            print(report)
        return report


def _print_profile_at_exit(ref: weakref.ref) -> None:
    executable = ref()
    if executable is None or not executable.profile_printed_at_exit:
        return
    report = executable.profile_report
    if report is not None and report.calls:
        print(report.table(parts=True), file=sys.stderr)


class RowBlocks(Protocol):
    """A backend running a scan as blocks of its batch's rows side by side (numba-cpu: driver.py)."""

    def row_blocks(self, batch: int) -> int:
        """How many blocks a scan over `batch` rows would run in (1: none): each of ceil(batch /
        blocks) rows, the last of the rest."""

    def row_block_driver(self, node: Node, block: Graph, blocks: int, compile_part: Compile,
                         last: Graph | None = None) -> tuple[tuple[Any, Any], Any]:
        """((`block`, `last`) compiled by `compile_part`: the body of scan `node` for a block's
        rows, and for the last block's fewer rows where the blocks do not divide the batch, else
        None; a driver running `node` as `blocks` blocks through them, or None where their steps
        need Python)."""


def compile_with_scans(graph: Graph, compile_part: Compile, donate: dict[int, int] | None = None,
                       memory_of: Any = None, row_blocks: RowBlocks | None = None) -> SegmentedExecutable:
    """Cut `graph` at its scans; compile each run of other nodes and each scan's body with
    `compile_part(graph, donate=None)` (a body with scans of its own comes back here through it;
    a run of nodes gets the donations it can write in place). `memory_of`: the
    executable of the same program at another batch size (SegmentedExecutable). `row_blocks`:
    the backend's way to run a scan whose rows are independent (passes/row_blocks.py) as blocks
    of rows side by side; its body is then compiled for a block instead of whole."""
    last_read = _last_reads(graph)
    position = {node: i for i, node in enumerate(graph.nodes)}
    # an index checked after a part may fail the call: the part then must not have written a
    # donated input in place (a bad id read after a scan, BatchNorm's statistics before it)
    last_check = max((position[n] for n in graph.nodes if _reads_indices(n)), default=-1)
    parts: list[tuple[Run, list[Value], list[Value]]] = []
    pieces: list[tuple[str, Any, int]] = []
    arenas: list[int] = []  # per piece: the copies of its arena a call uses
    pending: list[Node] = []
    stacked_by_scans: set[Value] = set()  # stacked outputs of scans: fresh arrays of their own
    returned = set(graph.output_values)
    donated = [(graph.input_values[k], graph.output_values[j]) for k, j in (donate or {}).items()
               if graph.output_values.count(graph.output_values[j]) == 1]  # one position to write

    def close_segment() -> None:
        if not pending:
            return
        end = position[pending[-1]]
        read_later = {v for n in pending for v in n.outputs if last_read.get(v, -1) > end}
        segment, inputs, outputs = _segment(graph, pending, read_later, len(parts))
        pending.clear()
        if outputs:
            # a donated input read by nothing after this part is written by it in place (a
            # training step's parameters and optimizer state, else copied in after the call),
            # unless an index is checked after it
            part_donate = {inputs.index(u): outputs.index(v) for u, v in donated
                           if u in inputs and v in outputs and last_read[u] <= end and last_check <= end}
            executable = compile_part(segment, part_donate)
            if hasattr(executable, "lend_outputs"):  # each part runs once a call: what only later
                # parts read needs no copy out of its memory (an LSTM's input projection, 3.7 MiB
                # on lstm-28)
                executable.lend_outputs(i for i, v in enumerate(outputs) if v not in returned)
            parts.append((lambda args, run=executable: list(run(*args)), inputs, outputs))
            pieces.append((f"part{len(parts) - 1}", executable, 1))
            arenas.append(1)

    for node in graph.nodes:
        if node.op != SCAN_OP:
            pending.append(node)
            continue
        close_segment()
        body = node.subgraph.copy()
        body.name = f"{graph.name}_scan{len(parts)}_body"
        blocked = _row_block_runner(node, body, compile_part, row_blocks) if row_blocks is not None else None
        if blocked is not None:  # its block bodies run once per step and block
            runner, bodies = blocked
            for i, (block_body, blocks) in enumerate(bodies):
                label = f"scan{len(parts)}" + (".last" if i else "")  # the last block's fewer rows
                pieces.append((label, block_body, node.attrs["length"] * blocks))
                arenas.append(blocks)  # each block runs the body over an arena of its own
        else:
            executable = compile_part(body)
            pieces.append((f"scan{len(parts)}", executable, node.attrs["length"]))
            arenas.append(1)
            runner = _scan_runner(node, executable)
        if hasattr(runner, "overwritable"):
            runner.overwritable = _handed_over(node, position[node], last_read, stacked_by_scans)
        stacked_by_scans.update(v for v in node.outputs[node.attrs["num_carry"]:])
        parts.append((runner, list(node.inputs), list(node.outputs)))
    close_segment()
    return SegmentedExecutable(graph, parts, pieces, donate, memory_of, arenas)


def _row_block_runner(node: Node, body: Graph, compile_part: Compile, backend: RowBlocks
                      ) -> tuple[Run, list[tuple[Any, int]]] | None:
    """(the run of `node` in row blocks, [(a block body's executable, how many blocks run it)])
    where its body's rows are independent and the backend would run more than one block: the
    backend's driver, or a Python loop over the blocks where their steps need Python
    (GRAPHC_PROFILE). Every block has the first's rows but the last, which may have fewer."""
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    if k == 0 or not node.inputs[c].type.shape:
        return None
    batch = node.inputs[c].type.shape[0]
    blocks = backend.row_blocks(batch)
    if blocks < 2:
        return None
    rows = -(-batch // blocks)
    last_rows = batch - rows * (blocks - 1)
    block = row_block_body(body, c, k, rows)
    last = row_block_body(body, c, k, last_rows) if last_rows != rows else None
    if block is None or (last is None and last_rows != rows):
        return None
    (block_body, last_body), driver = backend.row_block_driver(node, block, blocks, compile_part, last)
    runner = driver if driver is not None else ScanLoop(node, block_body, rows, last_body)
    if last_body is None:
        return runner, [(block_body, blocks)]
    return runner, [(block_body, blocks - 1), (last_body, 1)]


def _reads_indices(node: Node) -> bool:
    """Does `node`, or a node of its body, read memory at indices that a call checks?"""
    if node.subgraph is not None:
        return any(_reads_indices(n) for n in node.subgraph.nodes)
    return index_bounds(node) is not None


def _scan_runner(node: Node, body: Any) -> Run:
    """The body's compiled driver for `node` where it offers one, else a Python loop."""
    make_driver = getattr(body, "scan_driver", None)
    driver = make_driver(node) if make_driver is not None else None
    return driver if driver is not None else ScanLoop(node, body)


def _handed_over(node: Node, at: int, last_read: dict[Value, int | float],
                 stacked_by_scans: set[Value]) -> frozenset[int]:
    """The positions of `node`'s inputs whose arrays it may overwrite: stacks an earlier scan
    made (arrays no other value shares), read by nothing after `node`, and passed once."""
    return frozenset(p for p, v in enumerate(node.inputs)
                     if v in stacked_by_scans and last_read.get(v) == at and node.inputs.count(v) == 1)


def _last_reads(graph: Graph) -> dict[Value, int | float]:
    """The position of the last node reading each value (infinity for the graph's outputs)."""
    last: dict[Value, int | float] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last[v] = i
    last.update({v: float("inf") for v in graph.output_values})
    return last


def _segment(graph: Graph, nodes: Sequence[Node], read_later: set[Value], index: int
             ) -> tuple[Graph, list[Value], list[Value]]:
    """`nodes` as a graph of their own: (graph, the outer values it reads, those it defines
    that are read later)."""
    defined = {v for n in nodes for v in n.outputs}
    inputs = list(dict.fromkeys(v for n in nodes for v in n.inputs if v not in defined))
    outputs = [v for n in nodes for v in n.outputs if v in read_later]
    part = Graph(f"{graph.name}_part{index}")
    mapping = {v: part.add_input(v.type, f"in{i}") for i, v in enumerate(inputs)}
    for n in nodes:
        clone = n.clone(mapping[v] for v in n.inputs)
        part.nodes.append(clone)
        mapping.update(zip(n.outputs, clone.outputs))
    for i, v in enumerate(outputs):
        part.add_output(f"out{i}", mapping[v])
    return part, inputs, outputs


__all__ = ["ScanLoop", "SegmentedExecutable", "compile_with_scans"]
