"""The passes' directed graph (graphc.passes.dag) answers as networkx does: reachability,
acyclicity, the key-ordered topological sort, and edits (edges added, nodes removed)."""
import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from graphc.passes.dag import DiGraph

# Random graphs on up to 9 nodes; forward edges only (i < j) make a DAG, any edge may close a cycle.
NODES = st.integers(0, 8)
EDGES = st.lists(st.tuples(NODES, NODES).filter(lambda e: e[0] != e[1]), max_size=24)


def both(nodes, edges):
    ours, theirs = DiGraph(nodes), nx.DiGraph()
    theirs.add_nodes_from(nodes)
    ours.add_edges_from(edges)
    theirs.add_edges_from(edges)
    return ours, theirs


@settings(max_examples=200, deadline=None)
@given(EDGES, st.permutations(range(9)), st.booleans())
def test_reachability_and_order_match_networkx(edges, rank, acyclic):
    if acyclic:
        edges = [(min(e), max(e)) for e in edges]
    ours, theirs = both(range(9), edges)
    for source in range(9):
        for target in range(9):
            assert ours.has_path(source, target) == nx.has_path(theirs, source, target)
        targets = set(rank[:source])  # some nodes: reached when any one is
        assert ours.reaches_any(source, targets) == any(nx.has_path(theirs, source, t) for t in targets)
    assert ours.is_acyclic() == nx.is_directed_acyclic_graph(theirs)
    if ours.is_acyclic():
        key = rank.__getitem__  # a random priority among the ready nodes
        assert ours.topological_order(key) == list(nx.lexicographical_topological_sort(theirs, key=key))
    else:
        with pytest.raises(ValueError, match="cycle"):
            ours.topological_order(key=lambda n: n)


@settings(max_examples=100, deadline=None)
@given(EDGES, st.lists(NODES, max_size=4))
def test_edits_match_networkx(edges, removed):
    ours, theirs = both(range(9), edges)
    copy = ours.copy()
    for node in dict.fromkeys(removed):
        ours.remove_node(node)
        theirs.remove_node(node)
    assert len(ours) == len(theirs) and len(copy) == 9  # the copy kept what was removed
    for node in theirs:
        assert sorted(ours.successors(node)) == sorted(theirs.successors(node))
        assert sorted(ours.predecessors(node)) == sorted(theirs.predecessors(node))
    for node in dict.fromkeys(removed):
        assert node not in ours and node in copy


def test_equal_keys_keep_insertion_order():
    graph = DiGraph(["c", "a", "b"])
    assert graph.topological_order(key=lambda n: 0) == ["c", "a", "b"]
