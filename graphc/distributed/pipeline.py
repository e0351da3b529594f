"""Pipeline parallelism over MPI: the training step cut into stages, one stage per rank.

    step = distributed.PipelineParallelStep(model, loss_fn, optimizer, (x, y), stages=2,
                                            microbatches=4)
    loss = step(x, y)               # on every rank, with the same global batch

The forward and loss are traced once, on one micro-batch, into one graph (the step builder's
`trace_loss`). The partitioner cuts that graph's nodes, in their forward order, into `stages`
contiguous pieces: after the values the user marks with `stage_boundary(x)` inside forward,
after the modules named in `boundaries`, or where the estimated cost (FLOPs) balances, at
module boundaries. Every value computed in one stage and read in a later one *crosses*: it
leaves its stage's forward graph through a send node per reading stage and enters each of
theirs through a recv node (its cotangent goes back the same way in the backward graphs).

Each rank compiles only its own stage, as three graphs:

    forward    received activations, the batch inputs it reads, its parameters -> sent values
               (the last stage: the loss), and the intermediate values backward reads
    backward   the VJP of forward (autodiff's vjp_graph, split where it stops recomputing the
               forward; with `recompute=True` it recomputes it instead, keeping only the
               stage's inputs between the passes): the cotangents of the sent values ->
               cotangents of the received ones, gradients of its parameters
    update     the mean gradient over the micro-batches -> the optimizer's rule for its own
               parameters and their state (donated: updated in place)

Activations travel forward and cotangents backward as messages the graphs spell out: a `recv`
node (ir/ops/comm.py: peer stage, tag, bytes) where a value enters a stage graph, a `send`
node where one leaves, one per reader. They sit at the graph's boundary only, so a stage runs
as scans do between compiled segments (`StageExecutable`): `split_comm` cuts them off, the
backend compiles the rest, and each call receives, runs the compiled part, then sends. Under
MPI a message is a nonblocking Isend/Irecv on a contiguous buffer, tagged with the node's tag
and the micro-batch, each completed within the deadline of $GRAPHC_DDP_TIMEOUT, so a dead rank
ends the job with a message naming it. `step.stage_graphs()` returns the stage graphs to print
or draw. The last stage seeds the backward pass with 1/M, so the accumulated gradients are
those of the mean loss over the global batch: losses and updates equal the single-process
step's up to rounding.

Micro-batches run in a 1F1B schedule (PipeDream-flush: a stage runs at most stages - s
forwards ahead of its backwards) or GPipe's (all forwards, then all backwards). With a single
process (no mpiexec) one step runs every stage in turn, following the same schedules with
messages kept in memory: the partition can be checked without MPI.

With a world of stages x replicas ranks, each replica runs its own pipeline on its shard of
the batch and each stage's replicas average their gradients with one allreduce before the
update (data parallelism across pipelines).

Not yet supported: buffers updated in training (batch norm's running statistics), parameters
read by two stages (tied weights), gradient clipping, batch signatures other than the example's,
and losses other than an unweighted mean over the batch's rows: the step averages its
micro-batches' losses, so `reduction="sum"` updates M times too little, and a loss weighing its
rows unequally (`ignore_index`, class weights) weighs the micro-batches equally instead (one
whose targets are all ignored makes the loss NaN).
"""
from __future__ import annotations

import bisect
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from graphc.ir import Builder, Graph, Node, TensorType, Value
from graphc.ir.errors import LoadError
from graphc.ir.ops.comm import COMM_OPS, RECV, SEND, message_bytes
from graphc.ir.registry import ELEMENTWISE, SHAPE, get as get_primitive
from graphc.ir.types import is_float
from graphc.passes import SIMPLIFY, Stages
from graphc.passes.autodiff import vjp_graph

from .. import random as gc_random
from ..api import user_facing
from ..compile import CompiledGraph
from ..lowering import compile_graph
from ..nn.module import Module, named_arrays
from ..optim import Optimizer
from ..step_builder import StepBuilder, StepSpec, batch_arrays, trace_loss
from ..tensor import Tensor, is_tracing
from ..train import learning_rates, load_checkpoint, save_checkpoint, set_learning_rates, training_state
from .data_parallel import DistributedError, World, init

SCHEDULES = ("1f1b", "gpipe")
FORWARD, BACKWARD = 0, 1

# -- marking stage boundaries --------------------------------------------------------------
_marked: list[Value] | None = None  # set while a pipeline traces its forward


def stage_boundary(x: Tensor) -> Tensor:
    """`x` itself; while a PipelineParallelStep traces the model, the stage in progress ends
    with the node computing `x` and the next stage starts after it. Anywhere else a no-op."""
    if _marked is not None and isinstance(x, Tensor):
        _marked.append(x.value)
    return x


@contextmanager
def _collecting_boundaries() -> Iterator[list[Value]]:
    global _marked
    outer, _marked = _marked, []
    try:
        yield _marked
    finally:
        _marked = outer


# -- the partition -------------------------------------------------------------------------
@dataclass(frozen=True)
class Crossing:
    """A value computed by stage `source` and read by the later `readers`: its forward
    sends it to each of them, and each sends its cotangent back."""

    index: int
    name: str
    type: TensorType
    source: int
    readers: tuple[int, ...]
    value: Value = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return message_bytes(self.type)

    @property
    def differentiable(self) -> bool:
        """Whether a cotangent comes back for it (integer values have none)."""
        return is_float(self.type.dtype)


@dataclass
class StagePlan:
    """One stage's share of the traced forward: its nodes, the batch inputs, parameters and
    buffers it reads, and the crossings it receives and sends (in message order)."""

    index: int
    nodes: list[Node]
    data: list[int]
    params: list[str]
    buffers: list[str]
    receives: list[Crossing] = field(default_factory=list)
    sends: list[Crossing] = field(default_factory=list)
    cost: float = 0.0
    uses_rng: bool = False

    @property
    def modules(self) -> list[str]:
        """The top-level modules (the first part of their paths) the stage's nodes come from."""
        return list(dict.fromkeys(n.module.split(".")[0] for n in self.nodes if n.module))


@dataclass
class Partition:
    """The traced micro-batch forward (`graph`: batch, params, buffers[, rng] -> loss) cut
    after the nodes at `cuts` into stages."""

    graph: Graph
    cuts: list[int]
    stages: list[StagePlan]
    crossings: list[Crossing]

    def bytes_between(self, source: int, reader: int) -> int:
        """Bytes one micro-batch's forward sends from stage `source` to stage `reader` (its
        backward sends as many back)."""
        return sum(c.nbytes for c in self.crossings if c.source == source and reader in c.readers)

    def describe(self) -> str:
        lines = []
        for s in self.stages:
            lines.append(f"stage {s.index}: {len(s.nodes)} nodes, modules {s.modules}, "
                         f"{len(s.params)} parameters, ~{s.cost:.3g} FLOPs")
            for c in s.sends:
                lines.append(f"  sends {c.name} {c.type} ({c.nbytes} bytes) to stages {list(c.readers)}")
        return "\n".join(lines)

    def to_dot(self) -> str:
        """Graphviz source: each stage a cluster of its nodes (op, type, module), the graph's
        inputs outside, and every edge that crosses a cut in red, labelled with its bytes per
        micro-batch."""
        from graphc.ir.dot import _label, _quote

        lines = [f"digraph {_quote(self.graph.name + ' pipeline')} {{",
                 '  node [fontname="Helvetica", fontsize=10, shape=box]; edge [fontsize=9];']
        ids = {inp.value: f"in{i}" for i, inp in enumerate(self.graph.inputs)}
        for i, inp in enumerate(self.graph.inputs):
            label = _quote(f"{inp.name} [{inp.role}]")
            lines.append(f"  in{i} [shape=ellipse, label={label}];")
        edges = []
        for plan in self.stages:
            lines.append(f"  subgraph cluster_stage{plan.index} {{")
            lines.append(f"    label={_quote(f'stage {plan.index} (~{plan.cost:.3g} FLOPs)')};")
            for node in plan.nodes:
                if node.outputs[0] in ids:  # a constant every reading stage copies: drawn once
                    continue
                nid = f"n{len(ids)}"
                ids.update((v, nid) for v in node.outputs)
                lines.append(f"    {nid} [label={_quote(_label(node))}];")
                edges += [(v, nid) for v in node.inputs]
            lines.append("  }")
        crossing = {c.value: c for c in self.crossings}
        for value, target in edges:
            c = crossing.get(value)
            style = f' [color=red, label="{c.nbytes} B"]' if c is not None else ""
            lines.append(f"  {ids[value]} -> {target}{style};")
        return "\n".join(lines + ["}"])


def node_cost(node: Node) -> float:
    """Estimated FLOPs of one node: multiply-adds for matmul and convolutions, else one per
    output element (a scan: its body's cost per step)."""
    out = node.outputs[0].type
    if node.op == "matmul":
        return 2.0 * math.prod(out.shape) * node.inputs[0].shape[-1]
    if node.op == "conv2d":
        weight = node.inputs[1].shape
        return 2.0 * math.prod(out.shape) * math.prod(weight[1:])
    if node.subgraph is not None:
        return sum(node_cost(n) for n in node.subgraph.nodes) * max(node.attrs.get("length", 1), 1)
    return float(sum(math.prod(v.shape) for v in node.outputs))


def _sourceless(node: Node) -> bool:
    """A node without inputs (a constant): every stage reading it computes its own copy."""
    return not node.inputs and node.subgraph is None


def _cheap(node: Node) -> bool:
    """Moves or converts elements without arithmetic worth saving (shape ops, casts)."""
    if node.subgraph is not None:
        return False
    kind = get_primitive(node.op).kind
    return kind == SHAPE or (kind == ELEMENTWISE and len(node.inputs) == 1 and node.op == "cast")


def _last_node(graph: Graph, module_path: str) -> int:
    members = [i for i, n in enumerate(graph.nodes)
               if n.module and (n.module == module_path or n.module.startswith(module_path + "."))]
    if not members:
        paths = sorted({n.module.split(".")[0] for n in graph.nodes if n.module})
        raise DistributedError(f"PipelineParallelStep: boundary {module_path!r} names no module the "
                               f"forward calls (top-level modules: {paths})")
    return members[-1]


def _crossing_bytes(graph: Graph) -> list[int]:
    """Bytes of the values computed at or before node i and read after it, for each i."""
    position = {}
    for i, node in enumerate(graph.nodes):
        for v in node.outputs:
            position[v] = i
    last_use: dict[Value, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in node.inputs:
            last_use[v] = i
    for _, v in graph.outputs:
        last_use[v] = len(graph.nodes)
    delta = [0] * (len(graph.nodes) + 1)
    for v, end in last_use.items():
        start = position.get(v)
        if start is None or _sourceless(v.producer):
            continue
        nbytes = math.prod(v.shape) * np.dtype(v.type.np_dtype).itemsize
        delta[start] += nbytes
        delta[end] -= nbytes
    return list(np.cumsum(delta[:-1]))


def balanced_cuts(graph: Graph, stages: int) -> list[int]:
    """Cut positions (a stage's last node) at module boundaries, each where the cumulative
    estimated cost is closest to its share k/stages of the total; ties go to the cut sending
    fewer bytes."""
    nodes = graph.nodes
    costs = np.cumsum([node_cost(n) for n in nodes])
    sizes = _crossing_bytes(graph)
    candidates = [i for i in range(len(nodes) - 1)
                  if nodes[i].module and nodes[i].module != nodes[i + 1].module]
    cuts: list[int] = []
    for k in range(1, stages):
        target = costs[-1] * k / stages
        open_ = [i for i in candidates if not cuts or i > cuts[-1]]
        open_ = open_[:len(open_) - (stages - 1 - k)]  # leave one candidate per later cut
        if not open_:
            raise DistributedError(f"PipelineParallelStep: the forward has too few module "
                                   f"boundaries for {stages} stages; use fewer stages or mark "
                                   "boundaries with stage_boundary()")
        cuts.append(min(open_, key=lambda i: (abs(costs[i] - target), sizes[i])))
    return cuts


def partition(graph: Graph, cuts: Sequence[int]) -> Partition:
    """Cut the traced forward after the nodes at `cuts` (strictly increasing) into stages."""
    nodes = graph.nodes
    if list(cuts) != sorted(set(cuts)) or (cuts and (cuts[0] < 0 or cuts[-1] >= len(nodes) - 1)):
        raise DistributedError(f"PipelineParallelStep: stage boundaries must follow one another "
                               f"in the forward order; they end at nodes {list(cuts)}")
    stage_of_node = [bisect.bisect_left(cuts, i) for i in range(len(nodes))]
    count = len(cuts) + 1
    stage_of: dict[Value, int] = {}
    for node, s in zip(nodes, stage_of_node):
        for v in node.outputs:
            stage_of[v] = s
    inputs = {inp.value: (i, inp) for i, inp in enumerate(graph.inputs)}
    readers: dict[Value, set[int]] = {}
    input_readers: dict[Value, set[int]] = {}
    plans = [StagePlan(s, [], [], [], []) for s in range(count)]
    copied: list[set[Node]] = [set() for _ in range(count)]
    for node, s in zip(nodes, stage_of_node):
        plans[s].cost += node_cost(node)
        for v in node.inputs:
            if v in inputs:
                input_readers.setdefault(v, set()).add(s)
            elif _sourceless(v.producer):
                if stage_of[v] != s and v.producer not in copied[s]:
                    copied[s].add(v.producer)  # recomputed here rather than sent
            elif stage_of[v] != s:
                readers.setdefault(v, set()).add(s)
    updated = [name.split(":", 1)[1] for name, _ in graph.outputs if name != "loss"]
    if updated:
        raise DistributedError(f"PipelineParallelStep: the forward updates the buffers "
                               f"{', '.join(sorted(updated))} in training (batch norm's running "
                               "statistics?); pipelines do not support buffer updates yet: put "
                               "such modules in eval mode")
    loss = graph.output("loss")
    if loss in inputs or stage_of[loss] != count - 1:
        raise DistributedError("PipelineParallelStep: the loss must be computed in the last "
                               "stage; move the last boundary before the loss")
    for node, s in zip(nodes, stage_of_node):
        plans[s].nodes.append(node)
    for s in range(count):  # constants a stage reads from another go first, in their order
        plans[s].nodes = [n for n in nodes if n in copied[s]] + plans[s].nodes
    for value, stages_reading in input_readers.items():
        index, inp = inputs[value]
        if inp.role == "param" and len(stages_reading) > 1:
            raise DistributedError(f"PipelineParallelStep: parameter {inp.name!r} is read by "
                                   f"stages {sorted(stages_reading)}; tied weights must stay in one "
                                   "stage: move the boundaries")
        for s in stages_reading:
            plan = plans[s]
            if inp.role == "data":
                plan.data.append(index)
            elif inp.role == "param":
                plan.params.append(inp.name)
            elif inp.role == "state":
                plan.buffers.append(inp.name)
            else:
                plan.uses_rng = True
    order = {inp.name: i for i, inp in enumerate(graph.inputs)}
    for plan in plans:  # in the graph's input order, whatever order the nodes read them in
        plan.data.sort()
        plan.params.sort(key=order.__getitem__)
        plan.buffers.sort(key=order.__getitem__)
    crossings = []
    value_order = {v: i for i, v in enumerate(graph.values())}
    for value in sorted(readers, key=value_order.__getitem__):
        producer = value.producer
        where = f"{producer.op} in {producer.module}" if producer.module else producer.op
        crossing = Crossing(len(crossings), f"v{value_order[value]} ({where})", value.type,
                            stage_of[value], tuple(sorted(readers[value])), value)
        crossings.append(crossing)
        plans[crossing.source].sends.append(crossing)
        for s in crossing.readers:
            plans[s].receives.append(crossing)
    return Partition(graph, list(cuts), plans, crossings)


def forward_tag(c: Crossing) -> int:
    """The tag of crossing `c`'s activation messages (its index)."""
    return c.index


def backward_tag(partition: Partition, c: Crossing) -> int:
    """The tag of crossing `c`'s cotangent messages: after every forward tag."""
    return len(partition.crossings) + c.index


# A stage graph's messages, by the name of the input they fill or the output they carry: (peer
# stage, tag).
MessageMap = dict[str, tuple[int, int]]


def received_name(peer: int, tag: int) -> str:
    """The name a stage's compiled part gives the value a recv node delivers."""
    return f"recv:{peer}:{tag}"


def sent_name(c: Crossing, reader: int) -> str:
    return f"send:{c.index}:{reader}"


def cotangent_name(c: Crossing) -> str:
    return f"ct_send:{c.index}"


def stage_forward_body(partition: Partition, stage: int) -> Graph:
    """Stage `stage`'s forward without its messages: inputs batch data, received crossings
    (`received_name`), parameters, buffers[, rng]; outputs each sent crossing once per reader
    (`sent_name`), and in the last stage the loss."""
    graph, plan = partition.graph, partition.stages[stage]
    new = Graph(f"{graph.name}_stage{stage}")
    mapping: dict[Value, Value] = {}
    for i in plan.data:
        inp = graph.inputs[i]
        mapping[inp.value] = new.add_input(inp.value.type, inp.name, "data")
    for c in plan.receives:
        mapping[c.value] = new.add_input(c.type, received_name(c.source, forward_tag(c)), "data")
    for role, names in (("param", plan.params), ("state", plan.buffers)):
        for name in names:
            inp = graph.input(name)
            mapping[inp.value] = new.add_input(inp.value.type, name, role)
    if plan.uses_rng:
        rng = graph.inputs[-1]
        mapping[rng.value] = new.add_input(rng.value.type, rng.name, "rng")
    for node in plan.nodes:
        clone = node.clone(mapping[v] for v in node.inputs)
        mapping.update(zip(node.outputs, clone.outputs))
        new.nodes.append(clone)
    for c in plan.sends:
        for reader in c.readers:
            new.add_output(sent_name(c, reader), mapping[c.value])
    if stage == len(partition.stages) - 1:
        new.add_output("loss", mapping[graph.output("loss")])
    return new.verify()


def forward_messages(partition: Partition, stage: int) -> tuple[MessageMap, MessageMap]:
    """Which of a stage forward's inputs arrive and which outputs leave, as attach_comm reads
    them: {input name: (peer, tag)}, {output name: (peer, tag)}."""
    plan = partition.stages[stage]
    receives = {received_name(c.source, forward_tag(c)): (c.source, forward_tag(c))
                for c in plan.receives}
    sends = {sent_name(c, reader): (reader, forward_tag(c)) for c in plan.sends for reader in c.readers}
    return receives, sends


def backward_messages(partition: Partition, stage: int) -> tuple[MessageMap, MessageMap]:
    """The backward's: the cotangent of each differentiable sent crossing from each reader;
    that of each differentiable received one, back to its source."""
    plan = partition.stages[stage]
    receives = {received_name(reader, backward_tag(partition, c)): (reader, backward_tag(partition, c))
                for c in plan.sends if c.differentiable for reader in c.readers}
    sends = {cotangent_name(c): (c.source, backward_tag(partition, c))
             for c in plan.receives if c.differentiable}
    return receives, sends


def stage_forward_graph(partition: Partition, stage: int) -> Graph:
    """Stage `stage`'s forward as it communicates: a recv node per received crossing, a send
    node per sent crossing and reader (see stage_forward_body for the rest)."""
    return attach_comm(stage_forward_body(partition, stage), *forward_messages(partition, stage))


def stage_backward_body(forward: Graph, partition: Partition, stage: int,
                        trainable: Sequence[str]) -> Graph:
    """The VJP of a stage's forward body: its inputs, then one cotangent per (differentiable
    sent crossing, reader), named as its message arrives (and the loss's, "ct:loss", in the
    last stage); outputs the cotangents of the differentiable received crossings
    (`cotangent_name`), then the gradients of the stage's trainable parameters."""
    plan = partition.stages[stage]
    names = [inp.name for inp in forward.inputs]
    received = [c for c in plan.receives if c.differentiable]
    wrt = [names.index(received_name(c.source, forward_tag(c))) for c in received]
    wrt += [names.index(n) for n in plan.params if n in trainable]
    outputs = forward.output_names
    seeds = [(outputs.index(sent_name(c, reader)), received_name(reader, backward_tag(partition, c)))
             for c in plan.sends if c.differentiable for reader in c.readers]
    if outputs[-1] == "loss":
        seeds.append((len(outputs) - 1, "ct:loss"))
    backward = vjp_graph(forward, wrt, [i for i, _ in seeds])
    # vjp_graph names its cotangents after output and input indices; here, after the messages
    for inp, (_, name) in zip(backward.inputs[len(forward.inputs):], seeds):
        inp.name = name
    cotangents = [(cotangent_name(c), v) for c, (_, v) in zip(received, backward.outputs)]
    backward.outputs = cotangents + backward.outputs[len(received):]
    return backward.verify()


def accumulating(backward: Graph, trainable: Sequence[str]) -> tuple[Graph, dict[int, int]]:
    """`backward` adding each parameter's gradient to an accumulator input ("acc:<name>",
    last) donated to it, so micro-batches sum their gradients in place (in a GEMM's epilogue
    when fused) instead of writing a fresh gradient each to add afterwards."""
    new = backward.copy()
    b = Builder(new)
    first_grad = len(new.outputs) - len(trainable)
    donate = {}
    for i, name in enumerate(trainable):
        out_name, grad = new.outputs[first_grad + i]
        acc = b.add_input(grad.type, f"acc:{name}")
        new.outputs[first_grad + i] = (out_name, b.add(acc, grad))
        donate[len(new.inputs) - 1] = first_grad + i
    return new.verify(), donate


def save_residuals(forward: Graph, backward: Graph) -> tuple[Graph, Graph]:
    """Split `backward` (forward's inputs, then cotangents) where it stops recomputing forward:
    returns forward with the intermediate values the rest needs as extra outputs ("saved:<i>"),
    and that rest, whose inputs are forward's, the saved values, then the cotangents. The
    recomputed nodes are copies of forward's, which CSE (in SIMPLIFY) merges back."""
    primal_inputs = len(forward.inputs)
    tangent: set[Value] = {inp.value for inp in backward.inputs[primal_inputs:]}
    on_adjoint_side: set[Node] = set()
    for node in backward.nodes:
        if any(v in tangent for v in node.inputs) or _sourceless(node):
            on_adjoint_side.add(node)  # constants: computed where they are read
            tangent.update(node.outputs)
    primal_nodes = [n for n in backward.nodes if n not in on_adjoint_side]
    # Cheap primal nodes the rest reads (a weight's or an activation's transpose, a mask's
    # cast) are computed again there: the value they read is saved instead, or is an input
    # already, and the rest's simplifier cancels transposes of transposes.
    users = backward.users()
    for node in reversed(primal_nodes):
        if _cheap(node) and any(u in on_adjoint_side for v in node.outputs for u in users.get(v, ())):
            on_adjoint_side.add(node)
    adjoint_nodes = [n for n in backward.nodes if n in on_adjoint_side]
    computed = {v for node in primal_nodes if node not in on_adjoint_side for v in node.outputs}
    needed = [v for node in adjoint_nodes for v in node.inputs] + backward.output_values
    saved = list(dict.fromkeys(v for v in needed if v in computed))

    primal = forward.copy()
    mapping = dict(zip(backward.input_values[:primal_inputs], primal.input_values))
    for node in primal_nodes:
        clone = node.clone(mapping[v] for v in node.inputs)
        mapping.update(zip(node.outputs, clone.outputs))
        primal.nodes.append(clone)
    for i, v in enumerate(saved):
        primal.add_output(f"saved:{i}", mapping[v])

    rest = Graph(backward.name)
    mapping = {}
    for inp in backward.inputs[:primal_inputs]:
        mapping[inp.value] = rest.add_input(inp.value.type, inp.name, inp.role)
    for i, v in enumerate(saved):
        mapping[v] = rest.add_input(v.type, f"saved:{i}", "data")
    for inp in backward.inputs[primal_inputs:]:
        mapping[inp.value] = rest.add_input(inp.value.type, inp.name, inp.role)
    for node in adjoint_nodes:
        clone = node.clone(mapping[v] for v in node.inputs)
        mapping.update(zip(node.outputs, clone.outputs))
        rest.nodes.append(clone)
    rest.outputs = [(name, mapping[v]) for name, v in backward.outputs]
    return primal.verify(), rest.verify()


# -- messages in the IR ----------------------------------------------------------------------
def _message_attrs(type: TensorType, peer: int, tag: int) -> dict[str, Any]:
    return {"peer": peer, "tag": tag, "bytes": message_bytes(type)}


def attach_comm(body: Graph, receives: MessageMap, sends: MessageMap) -> Graph:
    """`body` as a stage graph that communicates: each input named in `receives` ({name:
    (peer, tag)}) becomes a recv node (first, in input order) and each output named in `sends`
    leaves through a send node."""
    new = Graph(body.name)
    mapping: dict[Value, Value] = {}
    for inp in body.inputs:
        if inp.name in receives:
            t = inp.value.type
            recv = Node(RECV, (), {"shape": t.shape, "dtype": t.dtype,
                                   **_message_attrs(t, *receives[inp.name])}, (t,))
            new.nodes.append(recv)
            mapping[inp.value] = recv.output
        else:
            mapping[inp.value] = new.add_input(inp.value.type, inp.name, inp.role)
    for node in body.nodes:
        clone = node.clone(mapping[v] for v in node.inputs)
        mapping.update(zip(node.outputs, clone.outputs))
        new.nodes.append(clone)
    for name, value in body.outputs:
        value = mapping[value]
        if name in sends:
            send = Node(SEND, (value,), _message_attrs(value.type, *sends[name]), (value.type,))
            new.nodes.append(send)
            value = send.output
        new.add_output(name, value)
    return new.verify()


@dataclass
class CommSplit:
    """A stage graph cut at its comm nodes: `body`, what a backend compiles (the graph's
    inputs, then one per recv node, named `received_name(peer, tag)`; one output per graph
    output, a sent one's being the value its send node reads), the recv nodes in body input
    order and the send nodes with the output each sends."""

    body: Graph
    receives: list[Node]
    sends: list[tuple[int, Node]]


def split_comm(graph: Graph) -> CommSplit:
    """Cut `graph`'s send and recv nodes off (scan_lowering's segments, with communication at
    the boundary only: nothing may read a send node's result but the graph's outputs)."""
    body = Graph(graph.name)
    mapping = {inp.value: body.add_input(inp.value.type, inp.name, inp.role) for inp in graph.inputs}
    receives = [n for n in graph.nodes if n.op == RECV]
    for node in receives:
        mapping[node.output] = body.add_input(node.output.type,
                                              received_name(node.attrs["peer"], node.attrs["tag"]))
    for node in graph.nodes:
        if node.op in COMM_OPS:
            continue
        if any(v.producer is not None and v.producer.op == SEND for v in node.inputs):
            raise DistributedError(f"{graph.name}: {node.op} reads the result of a send node; "
                                   "sends end a stage graph: only its outputs may read them")
        clone = node.clone(mapping[v] for v in node.inputs)
        mapping.update(zip(node.outputs, clone.outputs))
        body.nodes.append(clone)
    sends = []
    for i, (name, value) in enumerate(graph.outputs):
        if value.producer is not None and value.producer.op == SEND:
            sends.append((i, value.producer))
            value = value.producer.inputs[0]
        body.add_output(name, mapping[value])
    return CommSplit(body.verify(), receives, sends)


class StageExecutable:
    """Runs a stage graph whose comm nodes sit at its boundary: its recv nodes (each message
    received into a fresh contiguous buffer, within the deadline), the compiled rest (any
    backend, the reference interpreter too), then its send nodes. Returns the graph's outputs
    and the arrays received (the backward reads the activations again).

    `compile(body, donate)` compiles the rest; `donate` maps an input's name to the name of
    the output written into its buffer."""

    def __init__(self, graph: Graph, compile: Callable[[Graph, dict[int, int]], CompiledGraph],
                 donate: dict[str, str] | None = None) -> None:
        self.graph = graph
        split = split_comm(graph)
        inputs = {inp.name: i for i, inp in enumerate(split.body.inputs)}
        self.receives, self.sends = split.receives, split.sends
        self.compiled = compile(split.body, {inputs[a]: split.body.output_names.index(b)
                                             for a, b in (donate or {}).items()})

    def __call__(self, args: Sequence[np.ndarray], link: _Link, microbatch: int
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        received = [link.receive(node, microbatch) for node in self.receives]
        outputs = self.compiled.executable(*args, *received)
        for i, node in self.sends:
            link.send(outputs[i], node, microbatch)
        return list(outputs), received


# -- schedules -----------------------------------------------------------------------------
def schedule(kind: str, stage: int, stages: int, microbatches: int) -> list[tuple[int, int]]:
    """Stage `stage`'s actions in order: (FORWARD or BACKWARD, micro-batch)."""
    if kind == "gpipe":
        return ([(FORWARD, m) for m in range(microbatches)]
                + [(BACKWARD, m) for m in range(microbatches)])
    warmup = min(stages - 1 - stage, microbatches)
    actions = [(FORWARD, m) for m in range(warmup)]
    for m in range(microbatches - warmup):
        actions += [(FORWARD, warmup + m), (BACKWARD, m)]
    return actions + [(BACKWARD, m) for m in range(microbatches - warmup, microbatches)]


# -- message transport ---------------------------------------------------------------------
class _Messages:
    """Point-to-point messages between stages: in memory when one process runs them all,
    else MPI over `comm`, the communicator of this replica's pipeline, whose rank r runs
    stage r. A message is identified by its source and destination stages, its tag (the comm
    node's) and micro-batch. `world_rank(stage)` names the peer in errors."""

    def __init__(self, world: World, comm: Any, world_rank: Callable[[int], int],
                 partition: Partition) -> None:
        self.world, self.comm, self.world_rank = world, comm, world_rank
        self.crossings = partition.crossings
        self.tags = 2 * max(len(self.crossings), 1)  # forward and backward tags per micro-batch
        self.local: dict[tuple[int, ...], np.ndarray] = {}
        self.pending: list[Any] = []  # MPI sends in flight, their buffers kept alive
        self.wait_s = 0.0

    def _describe(self, tag: int, microbatch: int, at: int) -> str:
        c = self.crossings[tag % len(self.crossings)]
        what = c.name if tag < len(self.crossings) else f"the cotangent of {c.name}"
        return f"{what}, micro-batch {microbatch}, for stage {at}"

    def send(self, array: np.ndarray, source: int, node: Node, microbatch: int) -> None:
        # a copy: the executable reuses its output buffers
        buffer = np.array(array, copy=True, order="C")
        to, tag = node.attrs["peer"], node.attrs["tag"]
        if self.comm is None:
            self.local[to, source, tag, microbatch] = buffer
            return
        request = self.comm.Isend(buffer, dest=to, tag=microbatch * self.tags + tag)
        self.pending.append((request, buffer))

    def ready(self, at: int, node: Node, microbatch: int) -> bool:
        """Whether receiving would not block (under MPI: receive, which waits with a deadline)."""
        return self.comm is not None or (at, node.attrs["peer"], node.attrs["tag"], microbatch) in self.local

    def receive(self, at: int, node: Node, microbatch: int) -> np.ndarray:
        source, tag = node.attrs["peer"], node.attrs["tag"]
        if self.comm is None:
            return self.local.pop((at, source, tag, microbatch))
        buffer = np.empty(node.attrs["shape"], np.dtype(node.output.type.np_dtype))
        start = time.perf_counter()
        request = self.comm.Irecv(buffer, source=source, tag=microbatch * self.tags + tag)
        self.world._wait([request], f"receiving {self._describe(tag, microbatch, at)} from rank "
                                    f"{self.world_rank(source)}")
        self.wait_s += time.perf_counter() - start
        return buffer

    def flush(self) -> None:
        """Complete this step's sends (their peers have received them by the step's end)."""
        if self.pending:
            start = time.perf_counter()
            self.world._wait([r for r, _ in self.pending], "sending to the next stages")
            self.wait_s += time.perf_counter() - start
            self.pending.clear()


@dataclass
class _Link:
    """One stage's end of the messages: what its StageExecutables receive and send through."""

    messages: _Messages
    stage: int

    def ready(self, node: Node, microbatch: int) -> bool:
        return self.messages.ready(self.stage, node, microbatch)

    def receive(self, node: Node, microbatch: int) -> np.ndarray:
        return self.messages.receive(self.stage, node, microbatch)

    def send(self, array: np.ndarray, node: Node, microbatch: int) -> None:
        self.messages.send(array, self.stage, node, microbatch)


# -- timing --------------------------------------------------------------------------------
@dataclass
class StageTimes:
    """Wall-clock seconds one stage spent over the steps run so far: in its compiled graphs
    (`forward`, `backward`, `update`), blocked on the other stages' messages and the loss
    (`wait`), averaging gradients over replicas (`allreduce`), and in all (`total`).
    `bubble` is the time the stage had no work: the total less compute and allreduce (mostly
    `wait`: the schedule's idle slots and transfers on the critical path)."""

    stage: int
    forward: float = 0.0
    backward: float = 0.0
    update: float = 0.0
    wait: float = 0.0
    allreduce: float = 0.0
    total: float = 0.0
    steps: int = 0

    @property
    def compute(self) -> float:
        return self.forward + self.backward + self.update

    @property
    def bubble(self) -> float:
        return max(self.total - self.compute - self.allreduce, 0.0)

    @property
    def bubble_fraction(self) -> float:
        return self.bubble / self.total if self.total else 0.0


# -- the step ------------------------------------------------------------------------------
@dataclass
class _StageRuntime:
    plan: StagePlan
    forward: StageExecutable
    backward: StageExecutable
    update: CompiledGraph
    trainable: list[str]
    times: StageTimes
    link: _Link
    step_count: np.ndarray = field(default_factory=lambda: np.zeros((), np.float32))
    # per micro-batch, what the backward reads of its forward: inputs, received and saved values
    saved: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    grads: dict[str, np.ndarray] = field(default_factory=dict)  # summed over micro-batches


class PipelineParallelStep:
    """`step(*inputs, target) -> loss`: one pipeline-parallel training step on the global batch
    (every rank passes the same batch; each stage reads the inputs it needs). Returns the mean
    loss over the batch on every rank.

    `boundaries`: module paths whose last node ends a stage (else the values marked with
    `stage_boundary`, else balanced estimated FLOPs); `schedule`: "1f1b" or "gpipe";
    `recompute`: the backward recomputes each micro-batch's forward instead of keeping its
    intermediate values (less memory, about a third more compute).

    Run under `mpiexec -n stages` (rank r runs stage r), under `mpiexec -n stages*replicas`
    (rank r runs stage r // replicas of replica r % replicas: pass each replica its own shard
    of the batch, as to a DataParallelStep; a stage's replicas average their gradients with
    one allreduce), or as a single process running every stage in turn. Each rank updates its
    own stage's parameters and optimizer state in place (`stage_state()`); the other stages'
    parameters in its copy of the model are left as they were. `partition` describes the cut
    (`partition.to_dot()` draws it), `times` holds one StageTimes per stage this process runs.
    """

    def __init__(self, model: Module, loss_fn: Callable[..., Tensor], optimizer: Optimizer,
                 example_inputs: Sequence[Any], stages: int = 2, microbatches: int = 4,
                 boundaries: Sequence[str] | None = None, schedule: str = "1f1b",
                 recompute: bool = False, backend: str | None = None, targets: int = 1,
                 world: World | None = None) -> None:
        from graphc.backends import default_backend

        self.world = world or init()
        if stages < 1 or microbatches < 1:
            raise DistributedError(f"PipelineParallelStep: stages={stages} and "
                                   f"microbatches={microbatches} must be at least 1")
        if self.world.size > 1 and self.world.size % stages:
            raise DistributedError(f"PipelineParallelStep: {self.world.size} ranks cannot run "
                                   f"{stages} stages: the world size must be a multiple of the "
                                   "stages (stages x replicas), or one process")
        if schedule not in SCHEDULES:
            raise DistributedError(f"PipelineParallelStep: schedule {schedule!r} is not one of {SCHEDULES}")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.num_stages, self.microbatches, self.schedule = stages, microbatches, schedule
        self.recompute = recompute
        self.backend, self.targets, self.name = backend or default_backend(), targets, "pipeline_step"
        owned = {id(p): n for n, p in named_arrays(model, "_parameters")}
        if any(id(p) not in owned for p in optimizer.params):
            raise DistributedError(f"{self.name}: the optimizer's parameters must be the model's")
        self.trainable = [owned[id(p)] for p in optimizer.params]
        self.params = dict(named_arrays(model, "_parameters"))
        self.buffers = dict(named_arrays(model, "_buffers"))
        optimizer.note_absent_parameters()
        self.opt_state = {n: optimizer.state_of(self.params[n]) for n in self.trainable}
        self._optimizer_settings = optimizer.compiled_settings()
        self.rng_key = gc_random.get_state()  # each step's own: the global generator's next
        batch = self._microbatch(batch_arrays(example_inputs), 0)
        self.signature = tuple((a.shape, a.dtype) for a in batch)
        self.partition = self._partition(batch, boundaries)
        # Rank r runs stage r // replicas of replica r % replicas; a replica's stages talk over
        # its pipeline communicator, a stage's replicas average gradients over theirs.
        self.replicas = max(self.world.size // stages, 1)
        stage, replica = divmod(self.world.rank, self.replicas)
        self.replica = replica
        pipeline_comm = stage_comm = None
        if self.world.comm is not None:
            pipeline_comm = self.world.comm.Split(color=replica, key=stage)
            stage_comm = self.world.comm.Split(color=stage, key=replica)
        self._stage_comm = stage_comm if self.replicas > 1 else None
        self._messages = _Messages(self.world, pipeline_comm, lambda s: s * self.replicas + replica,
                                   self.partition)
        mine = range(stages) if self.world.comm is None else [stage]
        self._stages = [self._compile_stage(s) for s in mine]
        self.times = [rt.times for rt in self._stages]
        self._broadcast_replica_state()

    # -- construction ----------------------------------------------------------------------
    def _microbatch(self, arrays: list[np.ndarray], m: int) -> list[np.ndarray]:
        rows = arrays[0].shape[0] if arrays and arrays[0].ndim else 0
        if any(a.ndim == 0 or a.shape[0] != rows for a in arrays) or rows % self.microbatches:
            raise DistributedError(f"{self.name}: every input's first axis is the batch, the same "
                                   f"for all and divisible by microbatches={self.microbatches}; got "
                                   f"shapes {[a.shape for a in arrays]}")
        size = rows // self.microbatches
        return [np.ascontiguousarray(a[m * size:(m + 1) * size]) for a in arrays]

    def _spec(self, trainable: list[str]) -> StepSpec:
        return StepSpec(self.name, self.model, self.loss_fn, self.optimizer, self.params,
                        self.buffers, trainable, {n: self.opt_state[n] for n in trainable},
                        self.targets)

    def _partition(self, batch: list[np.ndarray], boundaries: Sequence[str] | None) -> Partition:
        with _collecting_boundaries() as marked:
            graph, reads = trace_loss(self._spec(self.trainable), batch)
        if reads.names:
            raise DistributedError(f"{self.name}: the loss reads modules besides the model "
                                   f"({', '.join(reads.names)}); pipelines train one model")
        if boundaries is not None and marked:
            raise DistributedError(f"{self.name}: boundaries are given twice, as module paths and "
                                   "with stage_boundary(); keep one")
        position = {v: i for i, n in enumerate(graph.nodes) for v in n.outputs}
        if boundaries is not None:
            cuts = [_last_node(graph, path) for path in boundaries]
        elif marked:
            if any(v not in position for v in marked):
                raise DistributedError(f"{self.name}: stage_boundary() marks an input of the "
                                       "model; mark a value computed in forward")
            cuts = list(dict.fromkeys(position[v] for v in marked))
        else:
            cuts = balanced_cuts(graph, self.num_stages)
        if len(cuts) != self.num_stages - 1:
            raise DistributedError(f"{self.name}: {len(cuts)} boundaries make {len(cuts) + 1} stages, "
                                   f"not stages={self.num_stages}")
        result = partition(graph, cuts)
        if self.world.comm is not None:
            self.world._check_agreement("the pipeline's partition", (result.cuts, [
                (c.type, c.source, c.readers) for c in result.crossings]))
        return result

    def _compile(self, graph: Graph, donate: dict[int, int] | None = None) -> CompiledGraph:
        stages = Stages(graph.name)
        optimized = stages.run(stages.record("traced", graph), [SIMPLIFY])
        executable = compile_graph(optimized, self.backend, donate or {}, stages)
        return CompiledGraph(graph, optimized, executable, donate or {})

    def _compile_stage(self, s: int) -> _StageRuntime:
        plan = self.partition.stages[s]
        trainable = [n for n in plan.params if n in self.trainable]
        forward = stage_forward_body(self.partition, s)
        backward = stage_backward_body(forward, self.partition, s, trainable)
        if not self.recompute:
            forward, backward = save_residuals(forward, backward)
        backward, accumulate = accumulating(backward, trainable)
        accumulators = {backward.inputs[i].name: backward.outputs[o][0] for i, o in accumulate.items()}
        update, donate = self._update_graph(s, trainable)
        runtime = _StageRuntime(
            plan, StageExecutable(attach_comm(forward, *forward_messages(self.partition, s)), self._compile),
            StageExecutable(attach_comm(backward, *backward_messages(self.partition, s)), self._compile,
                            accumulators),
            self._compile(update, donate), trainable, StageTimes(s), _Link(self._messages, s),
            # the optimizer's count: a pipeline built again on it goes on from there
            np.array(self.optimizer.step_count, np.float32))
        runtime.grads = {n: np.zeros_like(self.params[n]) for n in trainable}
        return runtime

    def _update_graph(self, s: int, trainable: list[str]) -> tuple[Graph, dict[int, int]]:
        """Mean gradients -> the optimizer's rule for this stage's parameters, each parameter
        and slot donated to its input; the step count too."""
        spec = self._spec(trainable)
        with StepBuilder(spec, f"{self.name}_stage{s}_update") as b:
            grads = {n: b.input(TensorType.of(self.params[n]), f"grad:{n}") for n in trainable}
            params, opt_state, step = b.params(trainable), b.optimizer_state(), b.step_count()
            lrs = b.learning_rates()
            new_step = step + 1
            groups = self.optimizer.param_groups
            group_of = {id(p): i for i, group in enumerate(groups) for p in group["params"]}
            for n in trainable:  # Optimizer.update's loop, over this stage's parameters only
                i = group_of[id(self.params[n])]
                new_p, new_state = self.optimizer.update_parameter(params[n], grads[n], opt_state[n],
                                                                   lrs[i], new_step, groups[i])
                b.output(f"param:{n}", new_p, donor=n)
                for slot, value in new_state.items():
                    b.output(f"state:{n}.{slot}", value, donor=f"{n}.{slot}")
            b.output("step", new_step, donor="step")
        return b.graph, b.donate

    # -- running ---------------------------------------------------------------------------
    @user_facing
    def __call__(self, *batch: Any) -> float:
        if is_tracing():
            raise DistributedError(f"{self.name}: a pipeline step cannot run inside a trace")
        arrays = batch_arrays(batch)
        micro = [self._microbatch(arrays, m) for m in range(self.microbatches)]
        if tuple((a.shape, a.dtype) for a in micro[0]) != self.signature:
            raise DistributedError(f"{self.name}: the batch's micro-batches are "
                                   f"{[(a.shape, str(a.dtype)) for a in micro[0]]}, compiled for "
                                   f"{[(s, str(d)) for s, d in self.signature]}; build a new step")
        self.optimizer.check_settings(self._optimizer_settings, self.name)
        if any(plan.uses_rng for plan in self.partition.stages):  # as a TrainStep draws its key
            self.rng_key[...] = gc_random.next_key()
        losses: list[float] = []
        plans = {rt.plan.index: (rt, schedule(self.schedule, rt.plan.index, self.num_stages,
                                              self.microbatches)) for rt in self._stages}
        started = {s: time.perf_counter() for s in plans}
        done = {s: 0 for s in plans}
        while any(done[s] < len(actions) for s, (_, actions) in plans.items()):
            progressed = False
            for s, (rt, actions) in plans.items():
                while done[s] < len(actions) and self._ready(rt, *actions[done[s]]):
                    direction, m = actions[done[s]]
                    if direction == FORWARD:
                        self._forward(rt, m, micro[m], losses)
                    else:
                        self._backward(rt, m)
                    done[s] += 1
                    progressed = True
            if not progressed:  # one process: a schedule waiting on itself is a bug here
                raise DistributedError(f"{self.name}: the {self.schedule} schedule deadlocked "
                                       f"after {done} actions")
        self._messages.flush()
        for rt in self._stages:
            self._average_over_replicas(rt)
            self._update(rt)
        loss = self._mean_loss(losses)
        for rt in self._stages:
            rt.times.total += time.perf_counter() - started[rt.plan.index]
            rt.times.wait = self._messages.wait_s  # one stage per rank: the rank's waits
            rt.times.steps += 1
        return loss

    def _ready(self, rt: _StageRuntime, direction: int, m: int) -> bool:
        graph = rt.forward if direction == FORWARD else rt.backward
        return all(rt.link.ready(node, m) for node in graph.receives)

    def _key(self, m: int) -> np.ndarray:
        """Micro-batch m's RNG key, this replica's own: the forward and the backward recomputing
        it draw alike."""
        seed, counter = self.rng_key
        return np.array([seed, (counter * self.replicas + self.replica) * self.microbatches + m],
                        np.int64)

    def _forward(self, rt: _StageRuntime, m: int, batch: list[np.ndarray], losses: list[float]) -> None:
        plan, graph = rt.plan, rt.forward.graph
        args = [*(batch[i] for i in plan.data), *(self.params[n] for n in plan.params),
                *(self.buffers[n] for n in plan.buffers)]
        if plan.uses_rng:
            args.append(self._key(m))
        (outputs, received), seconds = self._run(rt.forward, args, rt.link, m)
        rt.times.forward += seconds
        if plan.index == self.num_stages - 1:
            losses.append(float(outputs[graph.output_names.index("loss")]))
        # the backward reads the forward's inputs, what it received, then what it saved (nothing
        # when recomputing): copies, as the executable reuses its output buffers
        saved = dict(zip((inp.name for inp in graph.inputs), args))
        saved.update((received_name(n.attrs["peer"], n.attrs["tag"]), value)
                     for n, value in zip(rt.forward.receives, received))
        saved.update((name, np.array(value, copy=True, order="C"))
                     for name, value in zip(graph.output_names, outputs) if name.startswith("saved:"))
        rt.saved[m] = saved

    def _backward(self, rt: _StageRuntime, m: int) -> None:
        values = rt.saved.pop(m)
        if rt.plan.index == self.num_stages - 1:
            loss_type = rt.forward.graph.output("loss").type
            values["ct:loss"] = np.array(1.0 / self.microbatches, loss_type.np_dtype)
        values.update((f"acc:{n}", rt.grads[n]) for n in rt.trainable)
        # the gradients accumulate in rt.grads, donated to the outputs
        _, seconds = self._run(rt.backward, [values[inp.name] for inp in rt.backward.graph.inputs],
                               rt.link, m)
        rt.times.backward += seconds

    def _run(self, executable: StageExecutable, args: list[np.ndarray], link: _Link, m: int
             ) -> tuple[tuple[list[np.ndarray], list[np.ndarray]], float]:
        """What `executable` returns and the seconds it computed: its time waiting for messages
        counts as the stage's `wait`."""
        start, waited = time.perf_counter(), self._messages.wait_s
        result = executable(args, link, m)
        return result, time.perf_counter() - start - (self._messages.wait_s - waited)

    def _update(self, rt: _StageRuntime) -> None:
        start = time.perf_counter()
        state = [self.opt_state[n][slot] for n in rt.trainable for slot in self.opt_state[n]]
        rt.update.executable(*(rt.grads[n] for n in rt.trainable),
                             *(self.params[n] for n in rt.trainable), *state, rt.step_count,
                             *self.optimizer.learning_rates())
        for grad in rt.grads.values():
            grad.fill(0)
        np.copyto(self.optimizer.step_count, rt.step_count)  # every stage counts alike
        rt.times.update += time.perf_counter() - start

    def _mean_loss(self, losses: list[float]) -> float:
        """The mean loss over the micro-batches (computed by the last stage) and the replicas,
        on every rank."""
        last = self.num_stages - 1
        value = np.array([sum(losses) / self.microbatches if losses else 0.0])
        messages = self._messages
        if messages.comm is not None:
            start = time.perf_counter()
            self.world._wait([messages.comm.Ibcast(value, root=last)],
                             f"the loss broadcast from rank {messages.world_rank(last)}")
            messages.wait_s += time.perf_counter() - start
        if self._stage_comm is not None:
            self._allreduce(self._stages[0], value, "the loss")
            value /= self.replicas
        return float(value[0])

    def _allreduce(self, rt: _StageRuntime, buffer: np.ndarray, what: str) -> None:
        from mpi4py import MPI
        start = time.perf_counter()
        self.world._wait([self._stage_comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)],
                         f"the allreduce of {what} over stage {rt.plan.index}'s replicas")
        rt.times.allreduce += time.perf_counter() - start

    def _average_over_replicas(self, rt: _StageRuntime) -> None:
        """Each replica's gradients are the mean over its own batch: their mean over the
        replicas is the global batch's (one allreduce of one flat buffer per stage)."""
        if self._stage_comm is None or not rt.trainable:
            return
        flat = np.concatenate([rt.grads[n].reshape(-1) for n in rt.trainable])
        self._allreduce(rt, flat, "gradients")
        flat /= self.replicas
        offset = 0
        for n in rt.trainable:
            grad = rt.grads[n]
            grad[...] = flat[offset:offset + grad.size].reshape(grad.shape)
            offset += grad.size

    def _broadcast_replica_state(self) -> None:
        """Every replica of a stage starts from replica 0's parameters and optimizer state."""
        if self._stage_comm is None:
            return
        state = self.stage_state()
        self.world._wait([self._stage_comm.Ibcast(state[name], root=0) for name in sorted(state)],
                         "the broadcast of the stage's state from its first replica")

    @property
    def step_count(self) -> np.ndarray:
        """Steps taken (a float32 scalar array; every stage counts its own)."""
        return self._stages[0].step_count

    def stage_graphs(self) -> dict[int, tuple[Graph, Graph]]:
        """The forward and backward graph, with their send and recv nodes, of each stage this
        process runs (the graphs before optimization: print them, or draw them with to_dot())."""
        return {rt.plan.index: (rt.forward.graph, rt.backward.graph) for rt in self._stages}

    def stage_state(self) -> dict[str, np.ndarray]:
        """The state this process updates: its stages' parameters ("<name>"), optimizer slots
        ("optim/<name>/<slot>") and the step count ("step")."""
        state: dict[str, np.ndarray] = {"step": self.step_count}
        for rt in self._stages:
            for n in rt.plan.params:
                state[n] = self.params[n]
            for n in rt.trainable:
                state.update({f"optim/{n}/{k}": v for k, v in self.opt_state[n].items()})
        return state

    # -- checkpoints -----------------------------------------------------------------------
    @staticmethod
    def checkpoint_path(path: str, stage: int) -> str:
        """Where stage `stage`'s part of the checkpoint `path` lives."""
        return f"{path}.stage{stage}"

    def _stage_training_state(self, rt: _StageRuntime) -> SimpleNamespace:
        """One stage's state as graphc.train's checkpoint functions read a step's: the model's
        arrays (this stage's parameters), optimizer slots and learning rates, step count and
        the global generator's key (which each step draws from)."""
        params = {n: self.params[n] for n in rt.plan.params}
        return SimpleNamespace(model=SimpleNamespace(state_dict=lambda: params), optimizer=self.optimizer,
                               params=self.params, trainable=rt.trainable,
                               opt_state={n: self.opt_state[n] for n in rt.trainable},
                               step_count=rt.step_count, rng_state=gc_random.get_state(),
                               set_rng_state=gc_random.set_state)

    def save_checkpoint(self, path: str) -> None:
        """Each stage's first replica writes its stage's state to `checkpoint_path(path, s)`,
        atomically and with checksums (graphc.train.save_checkpoint's format)."""
        if self.world.rank % self.replicas == 0:
            for rt in self._stages:
                save_checkpoint(self.checkpoint_path(path, rt.plan.index),
                                self._stage_training_state(rt))

    def load_checkpoint(self, path: str) -> bool:
        """Continue from the checkpoint `path` when every stage's file exists (on a filesystem
        all ranks share): each rank loads its stage's; returns whether they did. A file that
        does not match its stage raises graphc's LoadError naming it."""
        import os
        found = np.array([all(os.path.exists(self.checkpoint_path(path, rt.plan.index))
                              for rt in self._stages)], np.float64)
        self.world.allreduce_(found)
        if found[0] != self.world.size:
            return False
        # a rank running several stages loads them all or none: a file refused after another
        # was loaded puts back what that one changed
        stages = [self._stage_training_state(rt) for rt in self._stages]
        kept = [{k: v.copy() for k, v in training_state(s).items()} for s in stages]
        rates, key = learning_rates(stages[0]), gc_random.get_state()
        try:
            for rt, state in zip(self._stages, stages):
                load_checkpoint(self.checkpoint_path(path, rt.plan.index), state)
        except LoadError:
            for state, copies in zip(stages, kept):
                own = training_state(state)
                for name, array in copies.items():
                    np.copyto(own[name], array)
            set_learning_rates(stages[0], rates)
            gc_random.set_state(key)
            raise
        np.copyto(self.optimizer.step_count, self._stages[0].step_count)
        return True


__all__ = ["CommSplit", "Crossing", "Partition", "PipelineParallelStep", "StageExecutable",
           "StagePlan", "StageTimes", "attach_comm", "balanced_cuts", "node_cost", "partition",
           "schedule", "split_comm", "stage_boundary", "stage_forward_graph"]
