"""What both Numba backends share of a library kernel (matmul, conv2d, pooling, scatters):
the kernel arrays its lowerings reference, and its epilogue as a graph of its own."""
from __future__ import annotations

from graphc.ir import Graph, Node, TensorType, Value
from graphc.ir.kernels import is_literal

from .arrays import SCRATCH, KernelArray


class Refs:
    """What a lowering may reference: the kernel array holding a value (an input or output of
    the kernel), the values a matmul prologue transposes, and scratch arrays it asks for."""

    def __init__(self, arrays: dict[Value, KernelArray], prologue: list[Node]) -> None:
        self.arrays = arrays
        self.transposed = {t.output: t.inputs[0] for t in prologue}
        self.scratch: list[TensorType] = []

    def __getitem__(self, value: Value) -> KernelArray:
        return self.arrays[value]

    def operand(self, value: Value) -> tuple[KernelArray, bool]:
        """The array to read for `value`, and whether to read it transposed."""
        if value in self.transposed:
            return self.arrays[self.transposed[value]], True
        return self.arrays[value], False

    def new_scratch(self, shape: tuple[int, ...], dtype: str) -> KernelArray:
        self.scratch.append(TensorType(shape, dtype))
        return KernelArray(SCRATCH, len(self.scratch) - 1)



def epilogue_graph(kernel: Node, anchor: Node, epilogue: list[Node], arrays: dict[Value, KernelArray]
                   ) -> tuple[Graph, list[KernelArray]]:
    """The epilogue as a graph of its own (the numba-cuda backend lowers it too), and the
    kernel array each of its inputs and outputs is, in order."""
    sub = kernel.subgraph
    part = Graph(f"{sub.name}_epilogue")
    local = {anchor.output: part.add_input(anchor.output.type, "anchor")}
    refs = [arrays[anchor.output]]
    produced = {v for m in epilogue for v in m.outputs}
    for m in epilogue:
        for v in m.inputs:
            if v in local or v in produced:
                continue
            if v.producer is not None and is_literal(v.producer):
                clone = Node("constant", (), v.producer.attrs, (v.type,))
                part.nodes.append(clone)
                local[v] = clone.output
            else:
                local[v] = part.add_input(v.type, f"in{len(refs)}")
                refs.append(arrays[v])
    for m in epilogue:
        clone = m.clone(local[v] for v in m.inputs)
        part.nodes.append(clone)
        local.update(zip(m.outputs, clone.outputs))
    for v in sub.output_values:
        if v in produced:
            part.add_output(f"out{len(part.outputs)}", local[v])
            refs.append(arrays[v])
    return part, refs
