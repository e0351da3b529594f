"""The verifier: re-checks every invariant of a graph (run after every pass in tests)."""
from __future__ import annotations

from .errors import GraphcError, VerificationError
from .graph import ROLES, Graph
from .ops.control import SCAN_OP, verify_scan
from .registry import PRIMITIVES, OpTypeError

KERNEL_OP = "kernel"  # a fused kernel: a node holding its subgraph


def verify(graph: Graph, depth: int = 0) -> None:
    """Raise VerificationError naming the first broken invariant. `depth` counts the scan
    bodies `graph` is nested in."""
    where = f"graph {graph.name!r}"
    defined = set()
    names = set()
    for inp in graph.inputs:
        if inp.role not in ROLES:
            raise VerificationError(f"{where}: input {inp.name!r} has unknown role {inp.role!r}")
        if inp.name in names:
            raise VerificationError(f"{where}: duplicate input name {inp.name!r}")
        if inp.value in defined:
            raise VerificationError(f"{where}: input {inp.name!r} reuses a value")
        names.add(inp.name)
        defined.add(inp.value)
    for index, node in enumerate(graph.nodes):
        label = f"{where}, node {index} ({node.op})"
        for pos, v in enumerate(node.inputs):
            if v not in defined:
                raise VerificationError(f"{label}: input {pos} is used before it is defined")
        for v in node.outputs:
            if v in defined:
                raise VerificationError(f"{label}: redefines a value")
            if v.producer is not node:
                raise VerificationError(f"{label}: output's producer link is wrong")
            defined.add(v)
        if node.op == KERNEL_OP:
            _verify_kernel(node, label)
        elif node.op == SCAN_OP:
            verify_scan(node, label, lambda body: verify(body, depth + 1), depth)
        else:
            _verify_primitive(node, label)
    out_names = set()
    for name, v in graph.outputs:
        if name in out_names:
            raise VerificationError(f"{where}: duplicate output name {name!r}")
        out_names.add(name)
        if v not in defined:
            raise VerificationError(f"{where}: output {name!r} is not defined in the graph")


def _verify_primitive(node, label: str) -> None:
    prim = PRIMITIVES.get(node.op)
    if prim is None:
        raise VerificationError(f"{label}: unknown op")
    if node.subgraph is not None:
        raise VerificationError(f"{label}: a primitive node must not hold a subgraph")
    if len(node.outputs) != 1:
        raise VerificationError(f"{label}: primitives have exactly one output")
    if prim.num_inputs is not None and len(node.inputs) != prim.num_inputs:
        raise VerificationError(f"{label}: expects {prim.num_inputs} inputs, has {len(node.inputs)}")
    try:
        attrs = prim.check_attrs(node.attrs)
        expected = prim.infer(*(v.type for v in node.inputs), **attrs)
    except (OpTypeError, GraphcError) as exc:
        raise VerificationError(f"{label}: {exc}") from None
    if expected != node.output.type:
        raise VerificationError(f"{label}: output type is {node.output.type}, the op's rule gives {expected}")


def _verify_kernel(node, label: str) -> None:
    sub = node.subgraph
    if sub is None:
        raise VerificationError(f"{label}: a kernel node needs a subgraph")
    verify(sub)
    if [v.type for v in node.inputs] != [v.type for v in sub.input_values]:
        raise VerificationError(f"{label}: input types differ from its subgraph's inputs")
    if [v.type for v in node.outputs] != [v.type for v in sub.output_values]:
        raise VerificationError(f"{label}: output types differ from its subgraph's outputs")
