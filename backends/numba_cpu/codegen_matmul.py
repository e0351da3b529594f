"""Library kernels: matmul as a BLAS GEMM (gemm.py; single-threaded BLAS, see blas.py), split
into row blocks across threads when large, or one per batch element.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from graphc.ir import Node
from graphc.ir.lowering import lowering
from graphc.backends.kernels.arrays import KernelArray
from graphc.backends.kernels.library import Refs
from graphc.backends.kernels.source import Writer, size_of

from .codegen_common import TARGET, Call, kernel_threads, library_call


@lowering(TARGET, "matmul")
def _matmul(node: Node, refs: Refs) -> tuple[list[Call], int]:
    """A plain product is one (row-blocked) GEMM, and so is a stack of matrices times one
    matrix; otherwise a batched product loops over the (broadcast) batch index, one GEMM per
    batch element, the outer batch axis in parallel when large. Operands
    transposed by the prologue are read as they are stored: BLAS takes a transpose flag."""
    x, y = node.inputs
    (a, a_t), (b, b_t) = refs.operand(x), refs.operand(y)
    out = node.output.shape
    flops = 2 * size_of(out) * x.shape[-1]
    if len(out) == 2:
        return [_gemm("matmul", [a, b, refs[node.output]], flops, a_t, b_t)], flops
    batch = out[:-2]
    if len(y.shape) == 2 and not a_t and x.shape[:-2] == batch:
        return [_stacked_gemm(node, a, b, b_t, refs[node.output], flops)], flops
    from .codegen_batched_matmul import batched_matmul  # here: it takes gemm_call from this module
    return [batched_matmul(node, refs, GEMM_PARALLEL_MIN_FLOPS, gemm_call)], flops


def _stacked_gemm(node: Node, a: KernelArray, b: KernelArray, b_t: bool, out: KernelArray,
                  flops: int) -> Call:
    """A stack of matrices times one matrix (a linear layer over (batch, sequence, features),
    its input gradient) as one GEMM over the stack's rows: the rows of x and of out lie one after
    another, so the batch folds into M. One GEMM per batch element packs the shared operand again
    for every element; in a transformer's MLP (16 x 64 x 128 by 128 x 512, one thread) that took
    2.97 ms against 2.48 ms for the one GEMM."""
    x, y = node.inputs
    rows = size_of(x.shape[:-1])
    call = _gemm("matmul", [a, b, out], flops, False, b_t)
    views = [None] * len(call.args)
    views[0], views[2] = (rows, x.shape[-1]), (rows, y.shape[-1])
    return replace(call, views=tuple(views))


def gemm_call(transpose_a: bool | str, transpose_b: bool | str, m: str, n: str, k: str, a: str, a_at: str,
              b: str, b_at: str, beta: str, c: str, c_at: str, lda: str | None = None,
              ldb: str | None = None, ldc: str | None = None) -> str:
    """Source of a gemm.gemm call; leading dimensions default to the stored rows' lengths (the
    matrix's own columns: `a.shape[-1]` for a 2-D view)."""
    lda = lda or f"{a}.shape[-1]"
    ldb = ldb or f"{b}.shape[-1]"
    ldc = ldc or f"{c}.shape[-1]"
    return (f"gemm({transpose_a}, {transpose_b}, {m}, {n}, {k}, {a}, {a_at}, {lda}, "
            f"{b}, {b_at}, {ldb}, {beta}, {c}, {c_at}, {ldc})")


def _gemm_body(parallel: bool) -> Callable[[Writer], None]:
    """out = op(a) @ op(b), the transposes `ta`, `tb` being arguments: one compiled function
    serves the forward product and both gradient products (a parallel one took ~1 s to compile,
    each). The parallel variant splits out into T blocks of rows, or of columns when it has more
    columns than rows, one BLAS call each (BLAS itself runs single-threaded: see blas.py). Each
    call then packs only its own part of the larger operand: the MNIST CNN's 64 x 9216 by
    9216 x 128 product took 2.0 ms in row blocks, 1.6 ms in column blocks (2 threads). A block of
    a transposed operand's rows (columns) is a block of its stored columns (rows), at offset lo."""
    def body(w: Writer) -> None:
        w.line("M, N, K = out.shape[0], out.shape[1], a.shape[0] if ta else a.shape[1]")
        if not parallel:
            w.line(gemm_call("ta", "tb", "M", "N", "K", "a", "0", "b", "0", "0.0", "out", "0"))
            return
        w.line("by_columns = N > M")
        w.line("size = N if by_columns else M")
        w.line("blocks = max(1, min(T, size))")
        w.line("step = -(-size // blocks)")
        with w.block("for task in prange(blocks):"):
            w.line("lo = task * step")
            w.line("hi = min(size, lo + step)")
            with w.block("if lo < hi:"):
                with w.block("if by_columns:"):
                    w.line("m, n, a_at, b_at, c_at = M, hi - lo, 0, lo * b.shape[1] if tb else lo, lo")
                with w.block("else:"):
                    w.line("m, n, a_at, b_at, c_at = hi - lo, N, lo if ta else lo * a.shape[1], 0, lo * N")
                w.line(gemm_call("ta", "tb", "m", "n", "K", "a", "a_at", "b", "b_at", "0.0", "out", "c_at",
                                 ldc="N"))
    return body


# Below this many flops a GEMM is one BLAS call; above, row blocks run on Numba's threads.
GEMM_PARALLEL_MIN_FLOPS = 1 << 22


def _gemm(entry: str, operands: list[KernelArray], flops: int, transpose_a: bool = False,
          transpose_b: bool = False) -> Call:
    """out = a @ b for the matrices named by operands [a, b, out], read transposed as flagged."""
    threads = kernel_threads()
    parallel = flops >= GEMM_PARALLEL_MIN_FLOPS and threads > 1
    params, args = ["a", "b", "out", "ta", "tb"], list(operands) + [int(transpose_a), int(transpose_b)]
    if parallel:
        params.append("T")
        args.append(threads)
    return library_call(entry, params, args, parallel, _gemm_body(parallel), fastmath=False, gemm=True)
