"""What both Numba backends share of a reduction kernel: each reduction op's accumulator
(`Reduction`, the lowering of sum, max and argmax) and the kernel taken apart into body, anchor
and epilogue (`ReductionKernel`). The loop nests around them are each backend's own.

float32 sums accumulate in float64: more accurate than the reference's pairwise float32 sum,
so the two agree to float32 rounding.
"""
from __future__ import annotations

from graphc.ir import Node
from graphc.ir.lowering import lowering_for, register_lowering
from graphc.ir.registry import REDUCTION, get

from .pointwise import Domain, KernelTarget, PointwiseEmitter, kernel_arrays, members_of, source_names
from .source import Writer, cast, index_text, literal, lowest

REDUCTION_OPS = ("sum", "max", "argmax")


def accumulator_dtype(op: str, dtype: str) -> str:
    if op == "sum":
        return "float64" if dtype in ("float32", "float64") else "int64"
    return dtype


class Reduction:
    """How one reduction op initialises, updates and finishes its accumulator: the lowering of
    each reduction primitive, which the reduction kernel's loop nest calls."""

    def __init__(self, node: Node) -> None:
        self.op = node.op
        self.dtype = node.inputs[0].dtype
        self.acc_dtype = accumulator_dtype(node.op, self.dtype)
        self.axes = (node.attrs["axis"],) if node.op == "argmax" else node.attrs["axes"]

    def init(self, w: Writer, acc: str = "acc") -> None:
        if self.op == "sum":
            w.line(f"{acc} = {literal(0, self.acc_dtype)}")
        else:
            w.line(f"{acc} = {lowest(self.dtype)}")
        if self.op == "argmax":
            w.line("arg = np.int64(0)")

    def update(self, w: Writer, value: str, position: str = "", acc: str = "acc") -> None:
        """Fold `value` (at reduced-axis `position`, for argmax) into the accumulator. max keeps a
        NaN once seen; argmax keeps the first maximum, a NaN counting as the maximum."""
        if self.op == "sum":
            w.line(f"{acc} += {value}")
        elif self.op == "max":
            with w.block(f"if {value} > {acc} or {value} != {value}:"):
                w.line(f"{acc} = {value}")
        else:
            with w.block(f"if {value} > {acc} or ({value} != {value} and {acc} == {acc}):"):
                w.line(f"{acc} = {value}")
                w.line(f"arg = {position}")

    @property
    def result(self) -> str:
        return "arg" if self.op == "argmax" else "acc"


class ReductionKernel:
    """A fused reduction kernel taken apart, for any backend's generator: the body (producers,
    evaluated at every element of the reduced operand), the anchor reduction, the epilogue
    (consumers, evaluated once per output element), the index names, and the statements that
    accumulate one element and finish one output element. The pointwise rules and the
    reduction's accumulator are `target`'s registered lowerings."""

    def __init__(self, kernel: Node, target: KernelTarget) -> None:
        self.sub = sub = kernel.subgraph
        members = members_of(sub)
        at = next(i for i, m in enumerate(members) if get(m.op).kind == REDUCTION)
        self.body, self.anchor, self.epilogue = members[:at], members[at], members[at + 1:]
        self.reduction = reduction = lowering_for(target.name, self.anchor.op)(self.anchor)
        self.shape = shape = self.anchor.inputs[0].shape
        rank = len(shape)
        self.kept = [d for d in range(rank) if d not in reduction.axes]
        self.arrays = kernel_arrays(sub)
        self.emitter = PointwiseEmitter(sub, source_names(self.arrays), target)
        self.index = index = tuple(f"i{d}" for d in range(rank))
        self.dims = dims = tuple(f"n{d}" for d in range(rank))
        self.full = Domain(index, dims)
        if self.anchor.attrs["keepdims"]:
            self.reduced = Domain(tuple("0" if d in reduction.axes else index[d] for d in range(rank)),
                                  tuple("1" if d in reduction.axes else dims[d] for d in range(rank)))
        else:
            self.reduced = Domain(tuple(index[d] for d in self.kept), tuple(dims[d] for d in self.kept))
        self.outputs = {v: self.arrays[v].name for v in sub.output_values}
        self.body_outputs = [v for v in self.outputs if v.producer in self.body]

    def accumulate(self, w: Writer, acc: str = "acc") -> None:
        """The body, its stores and the accumulator update, at the full index."""
        emitter, reduction = self.emitter, self.reduction
        for m in self.body:
            emitter.emit(w, m, self.full)
        for v in self.body_outputs:
            w.line(f"{self.outputs[v]}[{index_text(self.index)}] = {emitter.locals[v]}")
        operand = emitter.load(self.anchor.inputs[0], self.index)
        if reduction.op != "sum" and operand not in emitter.locals.values():
            w.line(f"v = {operand}")  # max and argmax read it more than once
            operand = "v"
        position = self.index[reduction.axes[0]] if reduction.op == "argmax" else ""
        reduction.update(w, operand, position, acc)

    def finish(self, w: Writer) -> None:
        """The reduced value, the epilogue, and the stores at the output index."""
        emitter = self.emitter
        emitter.locals[self.anchor.output] = name = emitter.fresh("t")
        w.line(f"{name} = {cast(self.reduction.result, self.anchor.output.dtype)}  # {self.anchor.op}")
        for m in self.epilogue:
            emitter.emit(w, m, self.reduced)
        for v, array in self.outputs.items():
            if v not in self.body_outputs:
                w.line(f"{array}[{index_text(self.reduced.index)}] = {emitter.locals[v]}")


def register_reduction_lowerings(target: str) -> None:
    """Register `Reduction` as `target`'s lowering of each reduction op."""
    for op in REDUCTION_OPS:
        register_lowering(target, op, Reduction)
