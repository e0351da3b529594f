"""Library kernel: a batched matmul, (..., M, K) @ (..., K, N) with broadcast batch axes, one BLAS
GEMM per batch element (gemm.py), the outer batch axis in parallel when large.

Attention's products are many small matrices (transformer-m: 64 of 64 x 32 by 32 x 64). For
them BLAS is still the fastest way found: at one thread, 64 products of 64 x 32 by 32 x 64 took
158 us as BLAS calls against 620-1670 us as generated Numba loop nests (with or without
constant extents, row views, accumulators), and 167 us through NumPy's matmul; the calls'
own overhead is ~0.1 us each. What does cost is a right operand read transposed (q @ k^T, and
dO @ v^T in the gradient): OpenBLAS's small GEMMs run that case (sgemm 'T', 'N' in its
column-major terms) at ~60% of the speed of the plain one (248 us against 158 us above). Copying
each such small operand into a (K, N) scratch first and calling the plain GEMM took 192 us.
The copy only pays for small operands and enough rows to use each copied element often:
K, N <= 64 and M >= K (measured: 64x32x64 248 -> 192 us, 64x64x32 261 -> 195, 32x16x32 45 ->
35, 64x64x64 635 -> 508, 8x8x8 775 -> 484; and losses outside: 16x64x16 129 -> 179,
128x64x128 891 -> 1252, 128x128x128 869 -> 1273).
"""
from __future__ import annotations

from graphc.ir import Node
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.pointwise import broadcast_index
from graphc.backends.kernels.source import Writer, size_of

from .codegen_common import Call, kernel_threads, library_call, loop_header

# The largest K and N of a right operand read transposed that is copied before its GEMM.
COPIED_OPERAND_MAX_EXTENT = 64


def copies_transposed_operand(m: int, k: int, n: int) -> bool:
    """Whether a (M, K) @ (N, K)^T product copies its right operand to (K, N) first."""
    return k <= COPIED_OPERAND_MAX_EXTENT and n <= COPIED_OPERAND_MAX_EXTENT and m >= k


def batched_matmul(node: Node, refs: Refs, parallel_min_flops: int, gemm_call) -> Call:
    """The kernel computing `node` (a matmul with batch axes) batch element by batch element;
    `gemm_call` writes the source of a GEMM call (codegen_matmul.gemm_call)."""
    x, y = node.inputs
    (a, a_t), (b, b_t) = refs.operand(x), refs.operand(y)
    out = node.output.shape
    batch = out[:-2]
    m, n, k = out[-2], out[-1], x.shape[-1]
    index = tuple(f"b{d}" for d in range(len(batch)))
    parallel = 2 * size_of(out) * k >= parallel_min_flops and batch[0] > 1 and kernel_threads() > 1
    copy = b_t and copies_transposed_operand(m, k, n)

    def part(name: str, shape: tuple[int, ...]) -> str:
        sub = broadcast_index(index, shape[:-2], batch)
        return f"{name}[{', '.join(sub)}]" if sub else name

    def body(w: Writer) -> None:
        w.line(f"M, N, K = out.shape[-2], out.shape[-1], a.shape[{-2 if a_t else -1}]")
        for d, i in enumerate(index):
            w.line(loop_header(i, f"out.shape[{d}]", parallel and d == 0))
            w.depth += 1
            if copy and d == 0:  # one scratch per thread
                w.line("columns = np.empty((K, N), out.dtype)")
        w.line(f"av, bv, ov = {part('a', x.shape)}, {part('b', y.shape)}, {part('out', out)}")
        if not copy:
            w.line(gemm_call(a_t, b_t, "M", "N", "K", "av", "0", "bv", "0", "0.0", "ov", "0"))
            return
        with w.block("for j in range(N):"):
            with w.block("for k in range(K):"):
                w.line("columns[k, j] = bv[j, k]")
        w.line(gemm_call(a_t, False, "M", "N", "K", "av", "0", "columns", "0", "0.0", "ov", "0"))

    return library_call("batched_matmul", ["a", "b", "out"], [a, b, refs[node.output]], parallel, body,
                        fastmath=False, gemm=True)
