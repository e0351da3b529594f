"""Kernel node -> generated source, by fusion pattern; and the check that every op lowers."""
from __future__ import annotations

from graphc.ir import Node
from graphc.ir.kernels import op_class
from graphc.ir.registry import PRIMITIVES

from .codegen_common import KernelSource, origin_comment
from .codegen_elementwise import generate_elementwise, lowerable_pointwise
from .codegen_library import LIBRARY_LOWERINGS, generate_library
from .codegen_reduction import REDUCTION_OPS, generate_reduction

GENERATORS = {
    "elementwise": generate_elementwise,
    "shape": generate_elementwise,
    "reduction": generate_reduction,
    "library": generate_library,
}


def generate(kernel: Node) -> KernelSource:
    """The source of one fused kernel (not for 'view' and 'constant' kernels: no code runs)."""
    generated = GENERATORS[kernel.attrs["pattern"]](kernel)
    generated.origin = origin_comment(kernel)
    return generated


def unlowered_primitives() -> list[str]:
    """Registered primitives this backend has no lowering for (empty when complete)."""
    lowered = {"constant": lambda op: True, "view": lambda op: True,
               "pointwise": lowerable_pointwise, "reduction": REDUCTION_OPS.__contains__,
               "library": LIBRARY_LOWERINGS.__contains__}
    return [op for op in sorted(PRIMITIVES) if not lowered[op_class(op)](op)]
