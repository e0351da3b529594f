"""Named passes, the pipeline that runs them, and the record of one compilation's stages.

A pass is a named function Graph -> Graph. Every stage of a compilation (the traced graph, the
autodiff result, each pass, fusion and the memory plan) goes through `Stages.record`, which
verifies it when asked (GRAPHC_VERIFY=1; the test suite sets it) and, with GRAPHC_DUMP=dir,
writes it as text and DOT, numbered in order (`<name>.<NN>.<stage>.txt/.dot`), so a user can see
what each stage did.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Sequence

from graphc.ir import Graph
from graphc.ir.errors import GraphcError
from graphc.ir.dot import graph_to_dot
from graphc.ir.verify import verify as verify_graph

from .memplan import MemoryPlan, ScratchFn, plan_memory, validate


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]

    def __call__(self, graph: Graph) -> Graph:
        return self.run(graph)


class Stages:
    """The stages of one compilation named `name`, verified and dumped in the order they come.

    `verify`/`dump_dir` default to GRAPHC_VERIFY / GRAPHC_DUMP, read when the compilation starts.
    """

    def __init__(self, name: str, verify: bool | None = None, dump_dir: str | None = None) -> None:
        self.name = name
        self.verify = os.environ.get("GRAPHC_VERIFY", "") not in ("", "0") if verify is None else verify
        self.dump_dir = (os.environ.get("GRAPHC_DUMP") or None) if dump_dir is None else dump_dir
        self.count = 0

    def record(self, stage: str, graph: Graph) -> Graph:
        """Verify and dump `graph` as the next stage; returns it."""
        if self.verify:
            verify_graph(graph)
        self._write(stage, lambda: str(graph) + "\n", lambda: graph_to_dot(graph))
        return graph

    def run(self, graph: Graph, passes: Sequence[Pass]) -> Graph:
        """Run `passes` in order, recording each result."""
        for p in passes:
            graph = self.record(p.name, p(graph))
        return graph

    def plan_memory(self, fused: Graph, donate: dict[int, int] | None = None,
                    scratch: ScratchFn | None = None) -> MemoryPlan:
        """Memory planning as a stage: the plan is validated under GRAPHC_VERIFY and dumped as a
        table of buffers (text) and the fused graph with values coloured by arena slot (DOT)."""
        plan = plan_memory(fused, donate, scratch)
        if self.verify:
            validate(plan)
        self._write("memory_plan", lambda: describe_plan(plan),
                    lambda: graph_to_dot(fused, plan.slot_of))
        return plan

    def _write(self, stage: str, text: Callable[[], str], dot: Callable[[], str]) -> None:
        """Number the stage; with a dump directory, write its text and DOT (made only then:
        printing a large step's graph costs tens of milliseconds a stage)."""
        index, self.count = self.count, self.count + 1
        if not self.dump_dir:
            return
        stem = os.path.join(self.dump_dir, f"{file_stem(self.name)}.{index:02d}.{stage}")
        try:
            os.makedirs(self.dump_dir, exist_ok=True)
            if index == 0:  # an earlier compilation's stages go: the folder shows this one's whole
                earlier = re.compile(re.escape(file_stem(self.name)) + r"\.\d{2}\.\w+\.(txt|dot)$")
                for entry in os.listdir(self.dump_dir):
                    if earlier.match(entry):
                        os.remove(os.path.join(self.dump_dir, entry))
            with open(stem + ".txt", "w") as f:
                f.write(text())
            with open(stem + ".dot", "w") as f:
                f.write(dot())
        except OSError as exc:
            raise GraphcError(f"GRAPHC_DUMP={self.dump_dir!r}: cannot write the stages' graphs there "
                              f"({exc.strerror or exc}); set it to a directory you can write to, "
                              "or unset it") from None


def file_stem(name: str) -> str:
    """`name` (a graph's: a function's name, or a loaded file's) as a file name inside the dump
    folder: no separators or '..' that would lead out of it, nothing but [A-Za-z0-9_.-]."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:100].lstrip(".")
    return stem or "graph"


def describe_plan(plan: MemoryPlan) -> str:
    """The plan as text: its summary, then one line per arena buffer (slot, offset, size, the
    schedule positions it is live between, and the kernel outputs or scratch it holds)."""
    position = {node: t for t, node in enumerate(plan.schedule)}
    names = {v: f"{node.attrs['name']}.y{q}" for node in plan.schedule for q, v in enumerate(node.outputs)}
    lines = [plan.summary(), "",
             "schedule: " + ", ".join(f"{position[n]}:{n.attrs['name']}" for n in plan.schedule), "",
             f"{'slot':>4} {'offset':>10} {'bytes':>10} {'live':>9}  holds"]
    for s in plan.storages:
        holds = (f"scratch of {s.scratch_of.attrs['name']}" if s.scratch_of is not None
                 else ", ".join(names.get(v, str(v)) for v in s.values))
        lines.append(f"{s.slot:>4} {s.offset:>10} {s.nbytes:>10} {f'{s.start}-{s.end}':>9}  {holds}")
    return "\n".join(lines) + "\n"
