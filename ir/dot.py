"""Graph views for people and for graph algorithms: Graphviz DOT and networkx.

DOT: one box per node (op, result type and module path; its user line in the tooltip; a send or
recv an arrow naming its peer, tag and bytes), inputs and outputs drawn distinctly, fused
kernels as clusters holding their subgraph (the module paths they cover in the tooltip), scans
as clusters holding their body (its inputs drawn as the consts, carry and per-step slices they
are, its outputs gathered into the scan's result box), and optionally values coloured by
memory slot.
"""
from __future__ import annotations

from typing import Callable

from .graph import Graph, Node, Value
from .ops.comm import COMM_OPS, SEND
from .ops.control import SCAN_OP, split_inputs
from .printer import UNPRINTABLE, format_attr, format_origin

_ROLE_COLORS = {"data": "#cfe8ff", "param": "#ffe4b5", "state": "#e6d5ff", "rng": "#d8f5d0"}
_SLOT_COLORS = ["#fbb4ae", "#b3cde3", "#ccebc5", "#decbe4", "#fed9a6", "#ffffcc", "#e5d8bd",
                "#fddaec", "#f2f2f2", "#b3e2cd", "#fdcdac", "#cbd5e8"]


def _quote(text: str) -> str:
    """`text` as a DOT string: line breaks as DOT's, other control characters and unpaired
    surrogates shown escaped (Graphviz rejects a NUL; a surrogate cannot be written)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    text = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + UNPRINTABLE.sub(lambda m: f"\\\\x{ord(m.group()):02x}", text) + '"'


def _label(node) -> str:
    attrs = [f"{k}={format_attr(v)}" for k, v in node.attrs.items()
             if k not in ("value", "name", "pattern")]
    text = node.op + ("\n" + ", ".join(attrs) if attrs and len(", ".join(attrs)) < 60 else "")
    text += "\n" + ", ".join(str(v.type) for v in node.outputs)
    return text + (f"\n[{node.module}]" if node.module else "")


def _comm_label(node: Node) -> str:
    """A message's end: its peer, tag and size, then the tensor's type."""
    a = node.attrs
    direction = "to" if node.op == SEND else "from"
    return (f"{node.op} {direction} peer {a['peer']}\ntag {a['tag']}, {a['bytes']} bytes\n"
            f"{node.outputs[0].type}")


def graph_to_dot(graph: Graph, slot_of: Callable[[Value], int | None] | None = None,
                 rankdir: str = "TB") -> str:
    """DOT source. `slot_of(value)` (e.g. a memory plan's) colours values by arena slot."""
    lines = [f"digraph {_quote(graph.name)} {{", f"  rankdir={rankdir};",
             '  node [fontname="Helvetica", fontsize=10]; edge [fontname="Helvetica", fontsize=9];']
    ids: dict[Value, str] = {}
    counter = [0]

    def fresh(prefix: str) -> str:
        counter[0] += 1
        return f"{prefix}{counter[0]}"

    def fill(v: Value, default: str) -> str:
        slot = slot_of(v) if slot_of is not None else None
        return _SLOT_COLORS[slot % len(_SLOT_COLORS)] if slot is not None else default

    for inp in graph.inputs:
        nid = fresh("in")
        ids[inp.value] = nid
        label = f"{inp.name}\n{inp.value.type}\n[{inp.role}]"
        lines.append(f"  {nid} [shape=ellipse, style=filled, fillcolor={_quote(_ROLE_COLORS[inp.role])}, "
                     f"label={_quote(label)}];")

    def emit_scan(node: Node, indent: str) -> None:
        cid = fresh("cluster_scan")
        a = node.attrs
        title = f"scan: {a['length']} steps" + (", reversed" if a["reverse"] else "")
        lines.append(f"{indent}subgraph {cid} {{")
        lines.append(f"{indent}  label={_quote(title)}; style=\"rounded,dashed\"; color=\"#555555\";")
        consts, carry, xs = split_inputs(node, list(zip(node.inputs, node.subgraph.input_values)))
        for kind, pairs in (("const", consts), ("carry", carry), ("x[t]", xs)):
            for outer, inner in pairs:
                nid = fresh("b")
                lines.append(f"{indent}  {nid} [shape=plaintext, label={_quote(kind + chr(10) + str(inner.type))}];")
                lines.append(f"{indent}  {ids[outer]} -> {nid};")
                ids[inner] = nid
        emit_nodes(node.subgraph, indent + "  ")
        result = fresh("n")
        label = "scan results\n" + ", ".join(str(v.type) for v in node.outputs)
        lines.append(f"{indent}  {result} [shape=box, style=filled, fillcolor="
                     f"{_quote(fill(node.outputs[0], '#eeeeee'))}, label={_quote(label)}];")
        for inner in node.subgraph.output_values:
            lines.append(f"{indent}  {ids[inner]} -> {result};")
        lines.append(f"{indent}}}")
        for outer in node.outputs:
            ids[outer] = result

    def emit_nodes(g: Graph, indent: str) -> None:
        for node in g.nodes:
            if node.op == SCAN_OP:
                emit_scan(node, indent)
                continue
            if node.subgraph is None:
                nid = fresh("n")
                tooltip = f", tooltip={_quote(format_origin(node))}" if node.loc or node.module else ""
                comm = node.op in COMM_OPS  # drawn as arrows: where messages enter and leave
                shape, label = ("cds", _comm_label(node)) if comm else ("box", _label(node))
                lines.append(f"{indent}{nid} [shape={shape}, style=\"rounded,filled\", "
                             f"fillcolor={_quote(fill(node.outputs[0], 'white'))}, label={_quote(label)}"
                             f"{tooltip}];")
                for v in node.inputs:
                    lines.append(f"{indent}{ids[v]} -> {nid};")
                ids[node.outputs[0]] = nid
                continue
            # A fused kernel: its subgraph in a cluster, wired to the outer values.
            cid = fresh("cluster_k")
            title = f"{node.attrs.get('name', 'kernel')} ({node.attrs.get('pattern', '')})"
            lines.append(f"{indent}subgraph {cid} {{")
            covered = ", ".join(node.module_paths())
            tooltip = f" tooltip={_quote(covered)};" if covered else ""
            lines.append(f"{indent}  label={_quote(title)}; style=\"rounded,filled\"; fillcolor=\"#f7f7f7\";"
                         f"{tooltip}")
            for outer, inner in zip(node.inputs, node.subgraph.input_values):
                ids[inner] = ids[outer]
            emit_nodes(node.subgraph, indent + "  ")
            lines.append(f"{indent}}}")
            for outer, inner in zip(node.outputs, node.subgraph.output_values):
                ids[outer] = ids[inner]

    emit_nodes(graph, "  ")
    for name, v in graph.outputs:
        nid = fresh("out")
        lines.append(f"  {nid} [shape=doubleoctagon, style=filled, fillcolor=\"#eeeeee\", "
                     f"label={_quote(name + chr(10) + str(v.type))}];")
        lines.append(f"  {ids[v]} -> {nid};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_to_networkx(graph: Graph):
    """A networkx.MultiDiGraph: nodes are graph inputs ('input', i) and node indices ('node', i)
    with their op and types; one edge per operand (key = operand position)."""
    import networkx as nx

    g = nx.MultiDiGraph(name=graph.name)
    where: dict[Value, tuple[str, int]] = {}
    for i, inp in enumerate(graph.inputs):
        g.add_node(("input", i), op="input", name=inp.name, role=inp.role, type=str(inp.value.type))
        where[inp.value] = ("input", i)
    for i, node in enumerate(graph.nodes):
        g.add_node(("node", i), op=node.op, type=[str(v.type) for v in node.outputs], loc=node.loc,
                   module=node.module)
        for pos, v in enumerate(node.inputs):
            g.add_edge(where[v], ("node", i), key=pos)
        for v in node.outputs:
            where[v] = ("node", i)
    for name, v in graph.outputs:
        g.add_node(("output", name), op="output", type=str(v.type))
        g.add_edge(where[v], ("output", name), key=0)
    return g
