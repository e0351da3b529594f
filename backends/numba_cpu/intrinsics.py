"""LLVM intrinsics that Numba does not expose, for generated kernels to import."""
from __future__ import annotations

from llvmlite import ir
from numba.extending import intrinsic


@intrinsic
def nan_maximum(typingctx, a, b):
    """The larger of two floats of a's type, NaN when either is NaN (as NumPy's max), without a
    branch, so a loop folding it into an accumulator vectorises: LLVM's `maxnum` (which returns
    the number when one side is NaN), replaced by a + b (NaN) where the two are unordered.
    LLVM's own `maximum` does this in one intrinsic, but LLVM 14 (llvmlite 0.43) cannot select
    it on x86 and aborts the process."""
    def codegen(context, builder, signature, args):
        x, y = args
        t = x.type
        maxnum = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        either_nan = builder.fcmp_unordered("uno", x, y)
        return builder.select(either_nan, builder.fadd(x, y), builder.call(maxnum, [x, y]))
    return a(a, a), codegen
