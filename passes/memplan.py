"""Memory planning for a fused graph: schedule, liveness, one arena, in-place reuse, donation.

Every value of the fused graph gets a `Location` (ir/memory.py, which the backends read).
Arena storages are placed greedily, largest first, at the lowest aligned offset that does not
overlap a storage whose lifetime intersects theirs (TVM's and tinygrad's planners do the same).
An elementwise kernel writes an output into the storage of an input that dies at that kernel
when both have the same size: element i of the input is read before element i is written.
A library kernel's epilogue likewise writes over the library call's result when nothing outside
the kernel reads that result (see `anchor_handovers`): one buffer fewer per GEMM or convolution
with a bias or activation after it.
"""
from __future__ import annotations

from typing import Callable

from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.memory import ALIGNMENT, Location, MemoryPlan, Storage

from .dag import DiGraph
from .fusion import anchor_index, inplace_pairs, reads_at_identity

ScratchFn = Callable[[Node], list[TensorType]]


class PlanValidationError(ValueError):
    """A memory plan that would let two live buffers overlap, or break a donation."""


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _is_view(node: Node) -> bool:
    return node.attrs.get("pattern") == "view"


def _is_constant(node: Node) -> bool:
    return node.attrs.get("pattern") == "constant"


class _Planner:
    def __init__(self, graph: Graph, donate: dict[int, int], scratch: ScratchFn | None) -> None:
        self.graph = graph
        self.donate = donate
        self.scratch_fn = scratch
        self.locations: dict[Value, Location] = {}
        self.readers: dict[Value, list[Node]] = {}
        for node in graph.nodes:
            for v in node.inputs:
                self.readers.setdefault(v, []).append(node)

    def plan(self) -> MemoryPlan:
        self._place_inputs_and_views()
        in_place = self._choose_in_place_donations()
        schedule = self._schedule(in_place)
        self._place_outputs(in_place)
        position = {node: t for t, node in enumerate(schedule)}
        lifetimes = self._lifetimes(schedule, position)
        storages, inplace = self._assign_storages(schedule, position, lifetimes)
        scratch = self._scratch(schedule, storages)
        peak = _place(storages)
        naive = sum(_align(v.type.nbytes) for v in lifetimes) + sum(
            _align(s.nbytes) for s in storages if s.scratch_of is not None)
        output_copies = [j for j, v in enumerate(self.graph.output_values)
                         if self.locations[v] != Location("output", j)
                         and not (self.locations[v].kind == "donated"
                                  and in_place.get(self.locations[v].index) == j)]
        return MemoryPlan(self.graph, schedule, self.locations, storages, scratch, lifetimes,
                          inplace, in_place, {k: j for k, j in self.donate.items() if k not in in_place},
                          output_copies, peak, naive)

    # -- locations outside the arena -----------------------------------------------------------
    def _place_inputs_and_views(self) -> None:
        for k, v in enumerate(self.graph.input_values):
            self.locations[v] = Location("input", k)
        for node in self.graph.nodes:
            if _is_view(node):
                self.locations[node.output] = Location("view", base=node.inputs[0])
            elif _is_constant(node):
                self.locations[node.output] = Location("constant")

    def _root(self, v: Value) -> Value:
        while v in self.locations and self.locations[v].kind == "view":
            v = self.locations[v].base
        return v

    def _aliases(self, root: Value) -> list[Value]:
        """`root` and every view of it."""
        result = [root]
        for v in result:
            result.extend(n.output for n in self.readers.get(v, ()) if _is_view(n))
        return result

    def _place_outputs(self, in_place: dict[int, int]) -> None:
        for k, j in in_place.items():
            self.locations[self.graph.output_values[j]] = Location("donated", k)
        for j, v in enumerate(self.graph.output_values):
            if v not in self.locations:
                self.locations[v] = Location("output", j)

    # -- donation ---------------------------------------------------------------------------------
    def _choose_in_place_donations(self) -> dict[int, int]:
        """Donations whose producing kernel can write straight into the donated buffer."""
        outputs = self.graph.output_values
        result = {}
        for k, j in sorted(self.donate.items()):
            value = outputs[j]
            writer = value.producer
            donated = self.graph.input_values[k]
            aliases = self._aliases(donated)
            if (writer is None or _is_view(writer) or _is_constant(writer)
                    or any(a in outputs for a in aliases)
                    or value in self.locations or outputs.index(value) != j):
                continue
            q = writer.outputs.index(value)
            pairs = inplace_pairs(writer)
            if any(a is v and (pos, q) not in pairs for a in aliases
                   for pos, v in enumerate(writer.inputs)):
                continue
            result[k] = j
        return result

    def _schedule(self, in_place: dict[int, int]) -> list[Node]:
        """A topological order in which every other reader of a donated buffer runs before the
        kernel overwriting it; donations that cannot be ordered so fall back to a copy."""
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        dag: DiGraph[Node] = DiGraph(self.graph.nodes)
        for node in self.graph.nodes:
            for v in node.inputs:
                if v.producer is not None:
                    dag.add_edge(v.producer, node)
        for k in sorted(in_place):
            writer = self.graph.output_values[in_place[k]].producer
            readers = dict.fromkeys(r for a in self._aliases(self.graph.input_values[k])
                                    for r in self.readers.get(a, ()) if r is not writer and not _is_view(r))
            # The edges reader -> writer close a cycle exactly when the writer already reaches
            # a reader (the graph is acyclic before): one search instead of a sort per donation.
            if dag.reaches_any(writer, readers):
                del in_place[k]
            else:
                dag.add_edges_from((r, writer) for r in readers)
        return dag.topological_order(key=order.__getitem__)

    # -- liveness and storages --------------------------------------------------------------------
    def _lifetimes(self, schedule: list[Node], position: dict[Node, int]) -> dict[Value, tuple[int, int]]:
        """(first writer, last reader) of every arena value, reads through views included."""
        end_of_call = len(schedule)
        copied_at_end = {self._root(v) for v in self.graph.output_values}
        result = {}
        for node in schedule:
            if _is_view(node) or _is_constant(node):
                continue
            for v in node.outputs:
                if v in self.locations:
                    continue
                self.locations[v] = Location("arena")
                readers = [position[r] for a in self._aliases(v) for r in self.readers.get(a, ())
                           if not _is_view(r)]
                last = max(readers, default=position[node])
                if v in copied_at_end:
                    last = end_of_call
                result[v] = (position[node], max(last, position[node]))
        return result

    def _assign_storages(self, schedule: list[Node], position: dict[Node, int],
                         lifetimes: dict[Value, tuple[int, int]]
                         ) -> tuple[list[Storage], list[tuple[Node, Value, Value]]]:
        storages: list[Storage] = []
        storage_of: dict[Value, Storage] = {}
        inplace = []
        for node in schedule:
            taken: set[Value] = set()
            for q, v in enumerate(node.outputs):
                if v not in lifetimes:
                    continue
                start, end = lifetimes[v]
                reusable = self._reusable_inputs(node, q, position[node], storage_of)
                reusable += self._reusable_anchor_result(node, q, position[node], storage_of)
                match = next((x for x in reusable
                              if x not in taken and x.type.nbytes == v.type.nbytes
                              and x.type.np_dtype.itemsize == v.type.np_dtype.itemsize), None)
                if match is not None:
                    taken.add(match)
                    storage = storage_of[match]
                    storage.end = max(storage.end, end)
                    inplace.append((node, match, v))
                else:
                    storage = Storage(len(storages), v.type.nbytes, start, end)
                    storages.append(storage)
                storage.values.append(v)
                storage_of[v] = storage
                self.locations[v] = Location("arena", storage.slot)
        return storages, inplace

    def _reusable_inputs(self, node: Node, q: int, t: int,
                         storage_of: dict[Value, Storage]) -> list[Value]:
        """Arena values whose storage output `q` of `node` may take over: `node` is their last
        reader and reads them (through every alias) only as `inplace_pairs` allows."""
        pairs = inplace_pairs(node)
        roots = [self._root(v) for v in node.inputs]
        result = []
        for p, root in enumerate(roots):
            storage = storage_of.get(root)
            if (p, q) not in pairs or storage is None or root in result:
                continue
            every_read_safe = all((k, q) in pairs for k, r in enumerate(roots) if r is root)
            if every_read_safe and storage.end == t and storage.values[-1] is root:
                result.append(root)
        return result

    def _reusable_anchor_result(self, node: Node, q: int, t: int,
                                storage_of: dict[Value, Storage]) -> list[Value]:
        """The library result of `node`, if output `q` may take over its storage: the epilogue
        writing `q` may overwrite it (`anchor_handovers`) and no other kernel reads it."""
        handovers = anchor_handovers(node)
        if q not in handovers:
            return []
        result = node.outputs[handovers[q]]
        storage = storage_of.get(result)
        if storage is None or storage.end != t or storage.values[-1] is not result:
            return []
        return [result]

    def _scratch(self, schedule: list[Node], storages: list[Storage]
                 ) -> dict[Node, list[tuple[Storage, TensorType]]]:
        result: dict[Node, list[tuple[Storage, TensorType]]] = {}
        if self.scratch_fn is None:
            return result
        for t, node in enumerate(schedule):
            if _is_view(node) or _is_constant(node):
                continue
            for type in self.scratch_fn(node):
                storage = Storage(len(storages), type.nbytes, t, t, scratch_of=node)
                storages.append(storage)
                result.setdefault(node, []).append((storage, type))
        return result


def anchor_handovers(kernel: Node) -> dict[int, int]:
    """Outputs of a library `kernel` its epilogue may write over the library call's result,
    each mapped to the output position of that result. The call writes its result whole before
    the epilogue runs; the epilogue then reads element i of it only in the iteration storing
    element i of its outputs, before the stores, when every epilogue read of the result is at
    identity. An output of the result's type then needs no buffer of its own: the backend
    stores it through the result's array. A result read at other positions (broadcast,
    transposed) keeps its own buffer."""
    if kernel.attrs.get("pattern") != "library":
        return {}
    sub = kernel.subgraph
    at = anchor_index(kernel)
    anchor = sub.nodes[at]
    if len(anchor.outputs) != 1 or anchor.output not in sub.output_values:
        return {}
    epilogue = sub.nodes[at + 1:]
    if not all(reads_at_identity(n, k) for n in epilogue for k, v in enumerate(n.inputs)
               if v is anchor.output):
        return {}
    written = set(epilogue)
    source = sub.output_values.index(anchor.output)
    return {q: source for q, out in enumerate(sub.output_values)
            if out.producer in written and out.type == anchor.output.type}


def _place(storages: list[Storage]) -> int:
    """Greedy by size: each storage goes to the lowest aligned offset free during its lifetime."""
    placed: list[Storage] = []
    for s in sorted(storages, key=lambda s: (-s.nbytes, s.start, s.slot)):
        offset = 0
        for other in sorted((o for o in placed if o.overlaps_in_time(s)), key=lambda o: o.offset):
            if offset + s.nbytes <= other.offset:
                break
            offset = max(offset, _align(other.offset + other.nbytes))
        s.offset = offset
        placed.append(s)
    return _align(max((s.offset + s.nbytes for s in storages), default=0))


def plan_memory(graph: Graph, donate: dict[int, int] | None = None,
                scratch: ScratchFn | None = None) -> MemoryPlan:
    """Schedule the kernels of a fused `graph` and place every intermediate in one arena.

    `donate` maps a graph input index to the output index written into its buffer; `scratch`
    gives the workspace tensors a kernel needs while it runs (they live in the arena too).
    """
    donate = dict(donate or {})
    _check_donations(graph, donate)
    return _Planner(graph, donate, scratch).plan()


def _check_donations(graph: Graph, donate: dict[int, int]) -> None:
    if len(set(donate.values())) != len(donate):
        raise ValueError(f"donate {donate}: an output can be written into one input only")
    for k, j in donate.items():
        if not 0 <= k < len(graph.inputs) or not 0 <= j < len(graph.outputs):
            raise ValueError(f"donate {{{k}: {j}}}: graph {graph.name!r} has {len(graph.inputs)} "
                             f"inputs and {len(graph.outputs)} outputs")
        inp, (name, out) = graph.inputs[k], graph.outputs[j]
        if inp.value.type != out.type:
            raise ValueError(f"donate {{{k}: {j}}}: input {inp.name!r} is {inp.value.type} but "
                             f"output {name!r} is {out.type}")


def validate(plan: MemoryPlan) -> None:
    """Prove the plan safe: no two storages live at once overlap in the arena, values sharing a
    storage hand it over only in place, and donated buffers are overwritten after their reads."""
    storages = plan.storages
    for s in storages:
        if s.offset % ALIGNMENT or s.offset + s.nbytes > plan.peak_bytes:
            raise PlanValidationError(f"storage {s.slot} at offset {s.offset} ({s.nbytes} bytes) "
                                      f"is misaligned or outside the {plan.peak_bytes}-byte arena")
    for i, a in enumerate(storages):
        for b in storages[i + 1:]:
            if a.overlaps_in_time(b) and a.overlaps_in_space(b) and a.nbytes and b.nbytes:
                raise PlanValidationError(
                    f"storages {a.slot} [{a.start},{a.end}] and {b.slot} [{b.start},{b.end}] are live "
                    f"together but overlap at offsets {a.offset}+{a.nbytes} and {b.offset}+{b.nbytes}")
    handovers = {(x, y) for _, x, y in plan.inplace}
    for s in storages:
        for x, y in zip(s.values, s.values[1:]):
            (_, x_end), (y_start, _) = plan.lifetimes[x], plan.lifetimes[y]
            if x_end > y_start or (x_end == y_start and (x, y) not in handovers):
                raise PlanValidationError(f"storage {s.slot}: {y} is written before {x} is dead")
    position = {node: t for t, node in enumerate(plan.schedule)}
    for k, j in plan.donated_in_place.items():
        writer = plan.graph.output_values[j].producer
        donated = plan.graph.input_values[k]
        for node in plan.schedule:
            reads = any(plan.root(v) is donated for v in node.inputs)
            if reads and node is not writer and node.attrs.get("pattern") != "view" \
                    and position[node] > position[writer]:
                raise PlanValidationError(f"input {k} is read by {node.attrs['name']} after "
                                          f"{writer.attrs['name']} overwrote it")
