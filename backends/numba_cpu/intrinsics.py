"""LLVM intrinsics that Numba does not expose, for generated kernels to import."""
from __future__ import annotations

from llvmlite import ir
from numba.extending import intrinsic


@intrinsic
def nan_maximum(typingctx, a, b):
    """LLVM's `maximum` of two floats of a's type: NaN when either is NaN, as NumPy's max.
    It has no branch, so a loop folding it into an accumulator vectorises."""
    def codegen(context, builder, signature, args):
        t = args[0].type
        maximum = builder.module.declare_intrinsic("llvm.maximum", [t], ir.FunctionType(t, [t, t]))
        return builder.call(maximum, args)
    return a(a, a), codegen
