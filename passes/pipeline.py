"""Named passes and the pipeline that runs them.

A pass is a named function Graph -> Graph. The pipeline verifies the graph after each pass
when asked (always in tests: GRAPHC_VERIFY=1) and, with GRAPHC_DUMP=dir, writes every stage's
IR as text and DOT, numbered in order, so a user can see what each pass did.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from graphc.ir import Graph
from graphc.ir.verify import verify as verify_graph


@dataclass(frozen=True)
class Pass:
    name: str
    run: Callable[[Graph], Graph]

    def __call__(self, graph: Graph) -> Graph:
        return self.run(graph)


def run_pipeline(graph: Graph, passes: Sequence[Pass], verify: bool | None = None,
                 dump_dir: str | None = None) -> Graph:
    """Run `passes` in order. `verify`/`dump_dir` default to GRAPHC_VERIFY / GRAPHC_DUMP."""
    verify = os.environ.get("GRAPHC_VERIFY", "") not in ("", "0") if verify is None else verify
    dump_dir = os.environ.get("GRAPHC_DUMP") or None if dump_dir is None else dump_dir
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
        _dump(graph, dump_dir, 0, "input")
    for index, p in enumerate(passes, start=1):
        graph = p(graph)
        if verify:
            verify_graph(graph)
        if dump_dir:
            _dump(graph, dump_dir, index, p.name)
    return graph


def _dump(graph: Graph, directory: str, index: int, stage: str) -> None:
    stem = os.path.join(directory, f"{graph.name}.{index:02d}.{stage}")
    with open(stem + ".txt", "w") as f:
        f.write(str(graph) + "\n")
    with open(stem + ".dot", "w") as f:
        f.write(graph.to_dot())
