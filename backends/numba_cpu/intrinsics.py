"""LLVM intrinsics that Numba does not expose, for generated kernels to import."""
from __future__ import annotations

from llvmlite import binding, ir
from numba.extending import intrinsic

# From LLVM 18 on, x86 selects LLVM's NaN-propagating `llvm.maximum` (LLVM 14, llvmlite 0.43,
# cannot: it aborts the process), and only then does a loop folding it vectorise.
MAXIMUM_INTRINSIC = binding.llvm_version_info >= (18,)


@intrinsic
def nan_maximum(typingctx, a, b):
    """The larger of two floats of a's type, NaN when either is NaN (as NumPy's max), without a
    branch, so a loop folding it into an accumulator vectorises. LLVM's `maximum` where x86 can
    select it; before LLVM 18 its `maxnum` (which returns the number when one side is NaN),
    replaced by a + b (NaN) where the two are unordered, which LLVM 14 vectorised and LLVM 22 no
    longer does: a (1024, 512) row max took 711 us there, 27 us through `maximum`."""
    def codegen(context, builder, signature, args):
        x, y = args
        t = x.type
        if MAXIMUM_INTRINSIC:
            maximum = builder.module.declare_intrinsic("llvm.maximum", [t], ir.FunctionType(t, [t, t]))
            return builder.call(maximum, [x, y])
        maxnum = builder.module.declare_intrinsic("llvm.maxnum", [t], ir.FunctionType(t, [t, t]))
        either_nan = builder.fcmp_unordered("uno", x, y)
        return builder.select(either_nan, builder.fadd(x, y), builder.call(maxnum, [x, y]))
    return a(a, a), codegen


@intrinsic
def reassociable_add(typingctx, acc, value):
    """acc + value (value converted to acc's type) as an addition LLVM may reassociate, so a
    loop summing into `acc` vectorises. The flags sit on this one instruction: the rest of the
    kernel (the elementwise body a reduction fuses) keeps IEEE order, where function-wide
    'reassoc' rewrote (x / s) * y as x * (y / s), inf at 1e20, and cancelled the split mean of
    var's centring."""
    def codegen(context, builder, signature, args):
        total, addend = args
        addend = context.cast(builder, addend, signature.args[1], signature.args[0])
        return builder.fadd(total, addend, flags=("reassoc", "nsz"))
    return acc(acc, value), codegen
