"""Library kernels (matmul, conv2d and its gradients, pooling, scatters), each with an epilogue.

A library kernel is a short sequence of calls. The library op writes its whole result into its
own output array (fusion always gives it one); then, if the kernel has an epilogue (bias add,
ReLU, an optimizer update), an ordinary generated elementwise loop reads that result and
writes the kernel's other outputs. Where nothing outside the kernel reads the result, the
memory plan puts such an output in the result's buffer (passes/memplan.py, anchor_handovers)
and the loop stores it through the result's array, over the element it has just read.

The library functions depend only on what shapes their loops (window geometry, which operands
are transposed, the dtype); sizes come from the arrays. Every layer with the same geometry, in
every graph, shares one compiled function, which then comes from the disk cache.

Each op's lowering is in its topic's module: codegen_matmul.py, codegen_conv.py (with
codegen_winograd.py), codegen_pool.py, codegen_scatter.py.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Mapping

from graphc.ir import Node, Value
from graphc.ir.kernels import bounded_label, op_class
from graphc.ir.lowering import lowering_for
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.library import Refs, epilogue_graph
from graphc.backends.kernels.pointwise import kernel_arrays, members_of

# Each topic's module registers its lowerings, which generate_library looks up.
from . import (codegen_conv, codegen_cumulative, codegen_matmul, codegen_norm, codegen_pool,  # noqa: F401
               codegen_scatter, codegen_softmax)
from .codegen_common import TARGET, Call, KernelSource
from .codegen_elementwise import elementwise_call, elementwise_flops


def generate_library(kernel: Node, in_place: Mapping[KernelArray, KernelArray] | None = None) -> KernelSource:
    """The library op's calls, then the epilogue's; `in_place` maps outputs of the kernel to
    the inputs, or the library result, whose buffers they are written into (the epilogue
    writes them through those)."""
    sub = kernel.subgraph
    members = members_of(sub)
    at = next(i for i, m in enumerate(members) if op_class(m.op) == "library")
    prologue, anchor, epilogue = members[:at], members[at], members[at + 1:]
    refs = Refs(kernel_arrays(sub), prologue)
    calls, flops = lowering_for(TARGET, anchor.op)(anchor, refs)
    if epilogue:
        calls.append(_epilogue_call(kernel, anchor, epilogue, refs.arrays, in_place or {}))
    return KernelSource(kernel.attrs["name"], kernel.attrs["pattern"], calls, tuple(refs.scratch),
                        flops + elementwise_flops(epilogue))


def _epilogue_call(kernel: Node, anchor: Node, epilogue: list[Node], arrays: dict[Value, KernelArray],
                   in_place: Mapping[KernelArray, KernelArray]) -> Call:
    """The epilogue as an elementwise kernel of its own: it reads the library result (an
    output of this kernel) and the kernel inputs it needs, and writes the other outputs. It is
    named after its own ops, so that the same epilogue after different library ops (a ReLU
    mask after a pooling or a convolution gradient) is one compiled function."""
    part, refs = epilogue_graph(kernel, anchor, epilogue, arrays)
    kernel_array = dict(zip(kernel_arrays(part).values(), refs))  # the part's array -> the kernel's
    part_array = {kernel: own for own, kernel in kernel_array.items()}
    aliases = {part_array[out]: part_array[into] for out, into in in_place.items()
               if out in part_array and into in part_array}
    call = elementwise_call("epilogue_" + bounded_label([m.op for m in epilogue]), part, aliases)
    return replace(call, args=tuple(kernel_array.get(a, a) for a in call.args))
