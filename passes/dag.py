"""A small directed graph for the passes' scheduling questions: edges, reachability, acyclicity
and a deterministic topological order.

networkx answers the same questions (tests/test_dag.py checks this module against it), but
importing it takes 0.2-0.25 s, measured: a sixth of a first call with a warm kernel cache,
paid by every process that compiles a graph. Fusion and memory planning need only this much.
"""
from __future__ import annotations

import heapq
from typing import Any, Callable, Container, Generic, Hashable, Iterable, TypeVar

N = TypeVar("N", bound=Hashable)


class DiGraph(Generic[N]):
    """Nodes and directed edges; iteration follows insertion order (dicts as ordered sets)."""

    def __init__(self, nodes: Iterable[N] = ()) -> None:
        self._successors: dict[N, dict[N, None]] = {}
        self._predecessors: dict[N, dict[N, None]] = {}
        for node in nodes:
            self.add_node(node)

    def __contains__(self, node: N) -> bool:
        return node in self._successors

    def __len__(self) -> int:
        return len(self._successors)

    def add_node(self, node: N) -> None:
        if node not in self._successors:
            self._successors[node] = {}
            self._predecessors[node] = {}

    def add_edge(self, source: N, target: N) -> None:
        self.add_node(source)
        self.add_node(target)
        self._successors[source][target] = None
        self._predecessors[target][source] = None

    def add_edges_from(self, edges: Iterable[tuple[N, N]]) -> None:
        for source, target in edges:
            self.add_edge(source, target)

    def remove_node(self, node: N) -> None:
        for successor in self._successors.pop(node):
            del self._predecessors[successor][node]
        for predecessor in self._predecessors.pop(node):
            del self._successors[predecessor][node]

    def successors(self, node: N) -> list[N]:
        return list(self._successors[node])

    def predecessors(self, node: N) -> list[N]:
        return list(self._predecessors[node])

    def copy(self) -> DiGraph[N]:
        other: DiGraph[N] = DiGraph()
        other._successors = {n: dict(s) for n, s in self._successors.items()}
        other._predecessors = {n: dict(p) for n, p in self._predecessors.items()}
        return other

    def has_path(self, source: N, target: N) -> bool:
        """Whether `target` is reachable from `source` (always, from itself)."""
        return self.reaches_any(source, (target,))

    def reaches_any(self, source: N, targets: Container[N]) -> bool:
        """Whether some node of `targets` is reachable from `source` (itself included): one
        search, where asking has_path of each target would search again for each."""
        seen, stack = {source}, [source]
        while stack:
            node = stack.pop()
            if node in targets:
                return True
            for successor in self._successors[node]:
                if successor not in seen:
                    seen.add(successor)
                    stack.append(successor)
        return False

    def is_acyclic(self) -> bool:
        return len(self._kahn(lambda node: 0)) == len(self)

    def topological_order(self, key: Callable[[N], Any]) -> list[N]:
        """Every node after its predecessors; of the nodes ready at each step, the one with the
        smallest `key` first (networkx's lexicographical_topological_sort). ValueError on a
        cycle."""
        order = self._kahn(key)
        if len(order) != len(self):
            raise ValueError("the graph has a cycle: no topological order")
        return order

    def _kahn(self, key: Callable[[N], Any]) -> list[N]:
        """Kahn's algorithm with a heap on `key`: the order of the nodes not on or after a cycle."""
        waiting = {node: len(preds) for node, preds in self._predecessors.items()}
        index = {node: i for i, node in enumerate(waiting)}  # equal keys: insertion order
        ready = [(key(node), index[node], node) for node, count in waiting.items() if count == 0]
        heapq.heapify(ready)
        order = []
        while ready:
            node = heapq.heappop(ready)[2]
            order.append(node)
            for successor in self._successors[node]:
                waiting[successor] -= 1
                if waiting[successor] == 0:
                    heapq.heappush(ready, (key(successor), index[successor], successor))
        return order
