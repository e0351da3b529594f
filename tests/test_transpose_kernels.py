"""Standalone transposes. Fusion gives each matrix product reading a shared transpose its own
copy to absorb; numba-cpu copies a transpose that moves its input's last axis in square tiles
(codegen_elementwise.TRANSPOSE_TILE), checked against the reference on shapes that are not
multiples of the tile (full tiles, ragged edges, arrays smaller than one tile), 2-D to 4-D,
serial and parallel."""
import numpy as np
import pytest

from graphc.backends.numba_cpu.codegen_elementwise import TRANSPOSE_TILE
from graphc.ir import Builder, TensorType
from graphc.passes import fusion
from graphc.passes.fusion import fuse
from opcheck import build_graph, numba_cpu_matches_reference as run_and_compare

# (input shape, perm): each moves the last axis, so each is copied in tiles
TRANSPOSES = [((5, 13), (1, 0)), ((19, 11), (1, 0)), ((3, 10, 9), (0, 2, 1)), ((9, 3, 11), (2, 0, 1)),
              ((2, 9, 3, 10), (0, 2, 3, 1)), ((10, 2, 3, 9), (3, 1, 2, 0))]




@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_transposes_moving_the_last_axis_match_the_reference(dtype, parallel):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(shape).astype(dtype) for shape, _ in TRANSPOSES]
    graph = build_graph("tiled_transposes", arrays, lambda b, *xs: [
        b.transpose(x, perm=perm) for x, (_, perm) in zip(xs, TRANSPOSES)])
    executable = run_and_compare(graph, arrays, parallel)
    kernels = [k for k in executable.kernels if k.pattern == "shape"]
    assert len(kernels) == len(TRANSPOSES)
    assert all(f"for u0 in range({TRANSPOSE_TILE}):" in k.source for k in kernels)
    assert all(("in prange(" in k.source) == parallel for k in kernels)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
def test_a_tiled_transpose_computes_its_fused_consumers_at_every_index(parallel):
    """The loop body is written twice (full tiles, ragged edges): an elementwise op fused after
    the transpose, reading another input at the output's index, runs in both."""
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((3, 20, 13)).astype("float32"),
              rng.standard_normal((3, 13, 20)).astype("float32")]
    graph = build_graph("tiled_transpose_add", arrays, lambda b, x, y: b.mul(
        b.add(b.transpose(x, perm=(0, 2, 1)), y), y))
    executable = run_and_compare(graph, arrays, parallel)
    assert len(executable.kernels) == 1
    assert f"for u1 in range({TRANSPOSE_TILE}):" in executable.kernels[0].source


def test_a_transpose_keeping_the_last_axis_loops_over_it_innermost():
    """(0, 2, 1, 3), attention's head split: each output row is a contiguous input row
    already, tiles would only add overhead."""
    x = np.arange(2 * 5 * 3 * 4, dtype="float32").reshape(2, 5, 3, 4)
    graph = build_graph("heads", [x], lambda b, x: b.transpose(x, perm=(0, 2, 1, 3)))
    executable = run_and_compare(graph, [x], parallel=False)
    assert "u0" not in executable.kernels[0].source


def fused_kernels(graph):
    fused = fuse(graph)
    fused.verify()
    return [(k.attrs["pattern"], [m.op for m in k.subgraph.nodes]) for k in fused.nodes]


def test_a_transpose_only_matrix_products_read_is_absorbed_by_each():
    """y = x.T read by y @ a, y @ y and a @ y: no kernel stores y, each product reads x
    through a transpose of its own (BLAS's transpose flag)."""
    b = Builder("shared_transpose")
    x, a = (b.add_input(TensorType((6, 6), "float32"), name) for name in ("x", "a"))
    y = b.transpose(x, perm=(1, 0))
    for name, product in [("ya", b.matmul(y, a)), ("yy", b.matmul(y, y)), ("ay", b.matmul(a, y))]:
        b.add_output(name, product)
    graph = b.graph.verify()
    assert fused_kernels(graph) == [("library", ["transpose", "matmul"])] * 3
    assert [n.op for n in graph.nodes].count("transpose") == 1  # the caller's graph is unchanged
    rng = np.random.default_rng(2)
    run_and_compare(graph, [rng.standard_normal((6, 6)).astype("float32") for _ in range(2)], parallel=False)


def test_a_transpose_another_op_reads_is_stored_once():
    """Where one reader cannot absorb the transpose (an add reads it), copies for the products
    would only add work: it stays one kernel that every reader reads."""
    b = Builder("stored_transpose")
    x, a = (b.add_input(TensorType((4, 4), "float32"), name) for name in ("x", "a"))
    y = b.transpose(x, perm=(1, 0))
    b.add_output("ya", b.matmul(y, a))
    b.add_output("ay", b.matmul(a, y))
    b.add_output("sum", b.add(y, a))
    kernels = fused_kernels(b.graph.verify())
    assert sum(ops.count("transpose") for _, ops in kernels) == 1
    assert ("library", ["matmul"]) in kernels


def products_of_one_transpose(steps: int, right: bool):
    """`steps` products reading one weight's transpose, as their right operand (h_t @ W.T) or
    their left (W.T @ h_t)."""
    b = Builder("shared_weight")
    w = b.add_input(TensorType((5, 3) if right else (3, 5), "float32"), "w")
    hs = [b.add_input(TensorType((2, 3) if right else (3, 2), "float32"), f"h{t}") for t in range(steps)]
    wt = b.transpose(w, perm=(1, 0))
    for t, h in enumerate(hs):
        b.add_output(f"y{t}", b.matmul(h, wt) if right else b.matmul(wt, h))
    return b.graph.verify()


def test_a_transpose_several_products_read_as_their_right_operand_is_stored_once():
    """An unrolled recurrence reads its weight's transpose at every step (h_t @ W.T): stored once,
    every product reads it untransposed (BLAS's small-matrix kernel takes B untransposed only).
    Read as the left operand by as many, it is still copied for each to absorb."""
    steps = fusion.SHARED_RIGHT_OPERAND_READERS
    graph = products_of_one_transpose(steps, right=True)
    kernels = fused_kernels(graph)
    assert kernels.count(("shape", ["transpose"])) == 1
    assert kernels.count(("library", ["matmul"])) == steps
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(v.shape).astype("float32") for v in graph.input_values]
    run_and_compare(graph, arrays, parallel=False)
    left = fused_kernels(products_of_one_transpose(steps, right=False))
    assert left == [("library", ["transpose", "matmul"])] * steps


def test_a_large_float32_product_reads_its_right_operand_stored():
    """x @ W.T of a Linear: above fusion.STORE_RIGHT_FROM_MACS, and with STORE_RIGHT_FROM_ROWS
    rows of x or more, the transpose is a kernel of its own and the product reads W.T
    untransposed; a smaller product, one of fewer rows, or float64, absorbs it."""
    def linear(rows, dtype):
        b = Builder("linear")
        x = b.add_input(TensorType((rows, 64), dtype), "x")
        w = b.add_input(TensorType((128, 64), dtype), "w")
        b.add_output("y", b.matmul(x, b.transpose(w, perm=(1, 0))))
        return b.graph.verify()
    large_rows = -(-fusion.STORE_RIGHT_FROM_MACS // (64 * 128))
    assert fused_kernels(linear(large_rows, "float32")) == [("shape", ["transpose"]), ("library", ["matmul"])]
    assert fused_kernels(linear(large_rows - 1, "float32")) == [("library", ["transpose", "matmul"])]
    assert fused_kernels(linear(large_rows, "float64")) == [("library", ["transpose", "matmul"])]
    # few rows: the copy of W would cost more than reading it transposed saves (the CNN's fc)
    b = Builder("wide_linear")
    x = b.add_input(TensorType((fusion.STORE_RIGHT_FROM_ROWS - 1, 4096), "float32"), "x")
    w = b.add_input(TensorType((128, 4096), "float32"), "w")
    b.add_output("y", b.matmul(x, b.transpose(w, perm=(1, 0))))
    assert fused_kernels(b.graph.verify()) == [("library", ["transpose", "matmul"])]
    # a batch of sequences: every row of every matrix is a row of the one product by W
    b = Builder("sequence_linear")
    x = b.add_input(TensorType((8, 16, 64), "float32"), "x")
    w = b.add_input(TensorType((128, 64), "float32"), "w")
    b.add_output("y", b.matmul(x, b.transpose(w, perm=(1, 0))))
    assert fused_kernels(b.graph.verify()) == [("shape", ["transpose"]), ("library", ["matmul"])]
    graph = linear(large_rows, "float32")
    rng = np.random.default_rng(4)
    run_and_compare(graph, [rng.standard_normal(v.shape).astype("float32") for v in graph.input_values],
                    parallel=False)


def test_a_transpose_two_large_products_read_as_b_is_stored_once_not_twice():
    """Each large product would store its own copy of the transpose (it does not absorb B):
    the two share one stored transpose instead."""
    rows = -(-fusion.STORE_RIGHT_FROM_MACS // (64 * 128))
    b = Builder("two_linears")
    w = b.add_input(TensorType((128, 64), "float32"), "w")
    wt = b.transpose(w, perm=(1, 0))
    for name in ("x", "z"):
        b.add_output(f"{name}_out", b.matmul(b.add_input(TensorType((rows, 64), "float32"), name), wt))
    assert fused_kernels(b.graph.verify()) == [("shape", ["transpose"])] + [("library", ["matmul"])] * 2


def test_a_transpose_two_scans_read_as_their_last_sequence_fuses_and_exports(tmp_path):
    """The per-product check read each reader's single output before asking whether it was a
    product: a scan (several outputs) reading the transpose last raised 'too many values to
    unpack' from deep inside fusion, in export and to_dot(stage="fused")."""
    import graphc as gc
    import graphc.nn as nn

    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, mask):
            e, m = self.lin(x).transpose(0, 1), mask.transpose(0, 1)
            s, history = gc.scan(lambda s, xs: (gc.where(xs[1].unsqueeze(1), s + xs[0], s), s), e[0], (e, m))
            c, _ = gc.scan(lambda c, xs: (gc.where(xs[1].unsqueeze(1), c + xs[0], c), c), s, (history, m),
                           reverse=True)
            return c

    x = np.random.default_rng(0).standard_normal((2, 4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    compiled = gc.compile(Decoder(), example_inputs=(x, mask))
    assert "digraph" in compiled.to_dot(stage="fused")
    compiled.export(str(tmp_path / "decoder.gcx"), max_batch=4)
    np.testing.assert_array_equal(gc.load(str(tmp_path / "decoder.gcx"))(x, mask), compiled(x, mask))
