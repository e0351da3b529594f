"""The back half of every compilation: fusion and memory planning as stages of the pipeline,
then the backend.

The passes never import a backend and the backends never import a pass: this layer joins them.
It fuses the optimized graph, asks the backend for each kernel's source (which says how much
scratch the kernel needs), plans memory with those sizes and hands the backend the plan (which
also says which kernel outputs share an input's buffer: numba-cpu generates those kernels again
to write them through the input's parameter). Both stages are recorded like the others (GRAPHC_DUMP,
GRAPHC_VERIFY: passes/pipeline.py). A graph holding scans is compiled in parts around them, each
body on its own (graphc/scan_lowering.py).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator

from graphc.backends import get_backend, lowers_kernels
from graphc.ir import Graph
from graphc.ir.ops.control import SCAN_OP
from graphc.ir.verify import KERNEL_OP
from graphc.passes import FUSION, Stages

from .scan_lowering import compile_with_scans


@contextmanager
def collecting_new_objects_only() -> Iterator[None]:
    """While a compilation runs, the cyclic garbage collector looks only at the objects made
    since it began (gc.freeze sets the others aside; gc.unfreeze after gives them back).

    Tracing, the passes and Numba allocate many short-lived objects, which trigger full
    collections, and a full collection of every object the process holds (Numba's alone are
    ~250k once a model is compiled) cost 0.10-0.27 s: one landed in most compilations at a second
    batch size (transformer-m: 0.32-0.38 s of CPU). Turning the collector off instead, as graphc
    did, kept every graph the passes discarded until the compilation ended (IR nodes and their
    values refer to each other, so only the collector frees them: 63k objects in transformer-m's
    training step), and the heap stayed that large. With collections: training peak RSS (warm
    kernel cache, 2 threads) transformer-m 179.1 -> 174.7 MiB, lstm-28 134.3 -> 127.6 MiB; the
    compilations' CPU time is unchanged (transformer-m, 1 thread: 0.77 s, another batch size
    0.23-0.24 s).

    Where objects are frozen already (by an enclosing compilation, or by the program, before it
    forks say), they stay frozen: unfreezing is theirs to do."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def compile_graph(graph: Graph, backend: str | None = None, donate: dict[int, int] | None = None,
                  stages: Stages | None = None, memory_of: Any = None) -> Any:
    """Compile `graph` (primitive nodes, or already fused) for `backend` (the default when None).

    `donate` maps a graph input index to the output index written into that input's buffer;
    `stages` records fusion and the memory plan after the compilation's earlier stages (a new
    record named after the graph when None); `memory_of` is an executable compiled before for
    the same program at another batch size, whose memory the new one may share (calls of the
    two then take turns).
    """
    module = get_backend(backend)
    if not lowers_kernels(module):  # the interpreter runs the primitive graph as it is
        return module.compile_graph(graph, donate)
    if any(n.op == SCAN_OP for n in graph.nodes):  # bodies compiled once, stepped from Python for now
        def compile_part(part: Graph, part_donate: dict[int, int] | None = None) -> Any:
            return compile_graph(part, backend, part_donate)
        return compile_with_scans(graph, compile_part, donate, memory_of,
                                  module if hasattr(module, "row_block_driver") else None)
    stages = stages if stages is not None else Stages(graph.name)
    fused = graph if any(n.op == KERNEL_OP for n in graph.nodes) else stages.run(graph, [FUSION])
    lowered = module.lower(fused)
    return module.compile_plan(lowered, stages.plan_memory(fused, donate, lowered.scratch), memory_of)
