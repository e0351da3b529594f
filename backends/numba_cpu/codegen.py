"""Kernel node -> generated source, by fusion pattern; and the check that every op lowers."""
from __future__ import annotations

from typing import Mapping

from graphc.ir import Node
from graphc.ir import lowering as lowering_registry
from graphc.ir.kernels import op_class
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.source import origin_comment

from .codegen_common import TARGET, KernelSource
from .codegen_elementwise import generate_elementwise
from .codegen_library import generate_library
from .codegen_reduction import generate_reduction

# The generators whose pointwise loops (elementwise kernels, library epilogues) can write an
# output through the parameter of the input whose buffer it shares (see elementwise_call).
POINTWISE_GENERATORS = {
    "elementwise": generate_elementwise,
    "shape": generate_elementwise,
    "library": generate_library,
}


def generate(kernel: Node, in_place: Mapping[KernelArray, KernelArray] | None = None) -> KernelSource:
    """The source of one fused kernel (not for 'view' and 'constant' kernels: no code runs).
    `in_place` maps the kernel's outputs that the memory plan writes into an input's buffer to
    that input; reductions keep one parameter per array (their loops were never measured to
    lose vectorisation to the overlap check)."""
    pattern = kernel.attrs["pattern"]
    if pattern == "reduction":
        generated = generate_reduction(kernel)
    else:
        generated = POINTWISE_GENERATORS[pattern](kernel, in_place)
    generated.origin = origin_comment(kernel)
    return generated


def unlowered_primitives() -> list[str]:
    """Registered primitives this backend has no lowering for (empty when complete). Constants
    and views need none: the executor materialises constants and aliases views, no code runs."""
    return [op for op in lowering_registry.unlowered_primitives(TARGET) if op_class(op) not in ("constant", "view")]
