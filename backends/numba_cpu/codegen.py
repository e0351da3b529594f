"""Kernel node -> generated source, by fusion pattern; and the check that every op lowers."""
from __future__ import annotations

from graphc.ir import Node
from graphc.ir import lowering as lowering_registry
from graphc.ir.kernels import op_class
from graphc.backends.kernels.source import origin_comment

from .codegen_common import TARGET, KernelSource
from .codegen_elementwise import generate_elementwise
from .codegen_library import generate_library
from .codegen_reduction import generate_reduction

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
    """Registered primitives this backend has no lowering for (empty when complete). Constants
    and views need none: the executor materialises constants and aliases views, no code runs."""
    return [op for op in lowering_registry.unlowered_primitives(TARGET) if op_class(op) not in ("constant", "view")]
