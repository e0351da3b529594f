"""Reductions over leading axes (column sums: a bias gradient sums a tall (rows, features) matrix
over its rows), serial and in parallel, against the reference; and the loop order that makes them
fast: rows outside, the contiguous kept axis innermost.

Tolerances as in test_numba_cpu.py: float32 rtol 1e-5 / atol 1e-6 (sums accumulate in float64,
fastmath contracts a*b+c), float64 rtol 1e-11.
"""
import numba
import numpy as np
import pytest

from graphc.backends.numba_cpu.codegen_reduction import ROW_BLOCK_ELEMENTS
from graphc.backends.reference import evaluate
from graphc.lowering import compile_graph
from opcheck import build_graph

TOLERANCE = {"float32": dict(rtol=1e-5, atol=1e-6), "float64": dict(rtol=1e-11, atol=1e-12)}


def check(graph, arrays):
    """Compile and run `graph`, compare every output with the reference; the executable and
    its outputs."""
    executable = compile_graph(graph, "numba-cpu")
    got = executable(*arrays)
    for name, g, w in zip(graph.output_names, got, evaluate(graph, arrays)):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), name
        np.testing.assert_allclose(g, w, equal_nan=True, err_msg=name, **TOLERANCE[w.dtype.name])
    return executable, got


def adam_like(b, x, m, v):
    """A bias gradient (x summed over its rows) fused with an Adam-like update of m and v, and
    x's exponential stored from the body."""
    dtype = x.dtype
    g = b.sum(x, axes=(0,))
    m2 = b.add(b.mul(m, b.const(0.9, dtype)), b.mul(g, b.const(0.1, dtype)))
    v2 = b.add(b.mul(v, b.const(0.999, dtype)), b.mul(b.square(g), b.const(0.001, dtype)))
    return [m2, b.div(m2, b.sqrt(v2)), b.exp(x)]


def reduction_sources(executable):
    return [k.source for k in executable.kernels if k.pattern == "reduction"]


# rows x columns: parallel ones span several row blocks, the last one partial
@pytest.mark.parametrize("rows, cols, parallel", [(37, 11, False), (700, 100, True), (1201, 64, True)])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_column_sum_of_a_tall_matrix_matches_the_reference(rows, cols, parallel, dtype):
    # positive values: no cancellation magnifies the reference's float32 rounding past rtol
    rng = np.random.default_rng(rows)
    arrays = [rng.random((rows, cols)).astype(dtype), rng.random(cols).astype(dtype),
              (rng.random(cols) + 0.5).astype(dtype)]
    executable, _ = check(build_graph(f"column_sum_{dtype}", arrays, adam_like), arrays)
    [source] = reduction_sources(executable)
    # a small case may run the parallel schedule too, when that source is already compiled
    # (executor.choose_variants reuses it rather than compile a serial one): only large cases
    # are asserted
    if parallel:
        assert "for block in prange(blocks):" in source
        block_rows = max(1, ROW_BLOCK_ELEMENTS // cols)
        assert rows % block_rows and rows // block_rows >= 1  # a partial last block is covered


def test_parallel_column_sum_reads_rows_with_the_kept_axis_innermost():
    """The accumulation loops over a row block's rows outside and the contiguous kept axis
    inside; reading down each column instead took 50x as long for 1792 x 512."""
    x = np.random.default_rng(1).random((1000, 100)).astype("float32")
    executable, _ = check(build_graph("column_order", [x], lambda b, v: [b.sum(v, axes=(0,))]), [x])
    [source] = reduction_sources(executable)
    lines = [line.strip() for line in source.splitlines()]
    rows = lines.index("for i0 in range(block * block_rows, min(n0, block * block_rows + block_rows)):")
    assert lines[rows + 1:rows + 3] == ["for i1 in range(n1):",
                                      "partial[block, i1] = reassociable_add(partial[block, i1], x0[i0, i1])"]


def test_parallel_column_reductions_over_several_axes_with_nans():
    """Two reduced axes kept apart (an operand broadcast over one of them) through the row
    blocks; two kept axes (max with a NaN, keepdims), parallel over the first kept axis with the
    rows inside it: against the reference."""
    rng = np.random.default_rng(2)
    x, row = rng.random((40, 30, 60)).astype("float32"), rng.random((40, 1, 60)).astype("float32")
    y = rng.random((300, 16, 20)).astype("float32")
    y[123, 4, 5] = np.nan
    arrays = [x, row, y]
    executable, _ = check(build_graph("column_axes", arrays, lambda b, v, r, w: [
        b.sum(b.mul(v, r), axes=(0, 1)), b.max(w, axes=(0,)), b.sum(w, axes=(0,), keepdims=True)]), arrays)
    blocks, by_kept_axis = [], []
    for source in reduction_sources(executable):
        (blocks if "for block in prange(blocks):" in source else by_kept_axis).append(source)
    assert len(blocks) == 1 and len(by_kept_axis) == 2
    for source in by_kept_axis:
        lines = [line.strip() for line in source.splitlines()]
        outer = lines.index("for i1 in prange(n1):")
        assert lines[outer + 1] == "for i2 in range(n2):" and lines[outer + 2].startswith("accs[i1, i2] = ")
        assert "for i0 in range(n0):" in lines[outer + 3:]


def test_parallel_column_sum_over_two_kept_axes_matches_the_reference():
    """A batched weight gradient: (batch, rows, cols) summed over the batch, with an epilogue."""
    for dtype in ("float32", "float64"):
        x = np.random.default_rng(4).random((9, 70, 110)).astype(dtype)
        executable, _ = check(build_graph(f"weight_grad_{dtype}", [x], lambda b, v: [
            b.mul(b.sum(v, axes=(0,)), b.const(0.5, dtype))]), [x])
        [source] = reduction_sources(executable)
        assert "for i1 in prange(n1):" in source and "partial" not in source


def test_parallel_column_sum_does_not_depend_on_the_thread_count():
    """The row blocks follow from the extents alone: one thread and all of them add in the same
    order, to the same bits."""
    x = np.random.default_rng(3).random((3000, 50)).astype("float32")
    executable = compile_graph(build_graph("column_threads", [x], lambda b, v: [b.sum(v, axes=(0,))]), "numba-cpu")
    threads = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = executable(x)[0].copy()
    finally:
        numba.set_num_threads(threads)
    np.testing.assert_array_equal(executable(x)[0], one)


def _scratch_sizes(executable, arrays):
    """The shapes every `np.empty` of the reduction kernels allocates, evaluated for `arrays`
    (the kernels' extents n0, n1, ... are the operand's)."""
    import re
    shapes = []
    for source in reduction_sources(executable):
        extents = {f"n{d}": n for d, n in enumerate(arrays[0].shape)}
        for line in source.splitlines():
            line = line.strip()
            for name in ("block_rows", "blocks"):
                if line.startswith(f"{name} = "):
                    extents[name] = eval(line.split(" = ", 1)[1], {"max": max}, extents)
            found = re.match(r"partial = np\.empty\((.*), np\.\w+\)", line)
            if found:
                shapes.append(eval(found.group(1), {}, extents))
    return shapes


def test_parallel_full_and_wide_column_sums_keep_their_scratch_small():
    """A full sum kept one float64 partial per element of its collapsed axis (8 bytes per
    element of a bool mask: 17 GiB to count a 2 GiB one), and a column sum of rows wider than
    a row block one partial row per row (785 MiB for a 2048 x 50257 logits' bias gradient)."""
    from graphc.backends.numba_cpu.codegen_common import always_parallel
    from graphc.backends.numba_cpu.codegen_reduction import MOST_ROW_BLOCKS
    mask = np.ones((1 << 20,), np.float32)
    wide = np.ones((512, 40000), np.float32)
    with always_parallel():
        full, _ = check(build_graph("full_sum", [mask], lambda b, v: [b.sum(v, axes=(0,))]), [mask])
        column, _ = check(build_graph("wide_column", [wide], lambda b, v: [b.sum(v, axes=(0,))]), [wide])
    [full_scratch] = _scratch_sizes(full, [mask])
    assert np.prod(full_scratch) <= mask.size // ROW_BLOCK_ELEMENTS
    [column_scratch] = _scratch_sizes(column, [wide])
    assert column_scratch == (MOST_ROW_BLOCKS, 40000)


def test_a_reduction_computes_its_fused_body_as_an_elementwise_kernel_does():
    """'contract' let LLVM fuse a * a - b * b into fma(a, a, -b * b) inside reductions only: at
    a = b the rounding residual of a * a, not 0, and sqrt of it NaN (elementwise kernels, built
    without it, gave 0)."""
    import graphc as gc
    a = np.random.default_rng(0).standard_normal((4, 300)).astype(np.float32)
    got = gc.jit(lambda x, y: ((x * x - y * y).sqrt().sum(1), (x * x - y * y).sqrt().amax(0)),
                 backend="numba-cpu")(a, a.copy())
    np.testing.assert_array_equal(got[0], np.zeros(4, np.float32))
    np.testing.assert_array_equal(got[1], np.zeros(300, np.float32))


def test_a_reduction_keeps_the_written_order_of_its_fused_body():
    """Function-wide 'reassoc' let LLVM rewrite (x / s) * y as x * (y / s) inside a reduction:
    inf at 1e20 where the written order (and an elementwise kernel) gives 1e20 per element. Only
    the sum's own addition may be reordered now, and the sum still vectorises."""
    import graphc as gc
    big = np.full((2, 64), 1e20, np.float32)
    got = gc.jit(lambda x, s, y: ((x / s * y).sum(1), (x / s * y).sum(0)), backend="numba-cpu")(big, big, big)
    np.testing.assert_allclose(got[0], np.full(2, 6.4e21, np.float32), rtol=1e-6)
    np.testing.assert_allclose(got[1], np.full(64, 2e20, np.float32), rtol=1e-6)
    executable, _ = check(build_graph("row_sum", [big], lambda b, x: b.sum(x, axes=(1,))), [big])
    [source] = reduction_sources(executable)
    assert "reassociable_add(acc" in source and "FASTMATH = False" in source
