"""gemm.gemm, the BLAS call every numba-cpu GEMM goes through, against NumPy: products large
enough to be computed in tiles for BLAS's small-matrix kernel (partial tiles at both edges, row
tiles, deep products summed over slices of K), every transpose, beta 0 and 1, and sub-matrices
at an offset inside larger arrays, as the generated kernels pass them."""
import numpy as np
import pytest

from graphc.backends.numba_cpu import gemm as gemm_module
from graphc.backends.numba_cpu.gemm import gemm

# (m, n, k): one tile row, 64-column tiles and a partial one; row tiles and slices of K too
# (k = 300: 48 rows, 256 deep); a deep product (five slices of K, the last partial), both
# computed a slice of K at a time over all of C; a deep one whose C is too large for that (tile
# by tile); one that fits a single call anyway
SHAPES = [(64, 520, 128), (100, 130, 300), (17, 70, 1100), (300, 260, 600), (9, 30, 40)]


def reference(a, b, c, transpose_a, transpose_b, beta):
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    return (a64.T if transpose_a else a64) @ (b64.T if transpose_b else b64) + beta * c


@pytest.mark.parametrize("m, n, k", SHAPES)
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gemm_matches_numpy(m, n, k, transpose_a, transpose_b, dtype):
    rng = np.random.default_rng(m + n + k)
    a = rng.standard_normal((k, m) if transpose_a else (m, k)).astype(dtype)
    b = rng.standard_normal((n, k) if transpose_b else (k, n)).astype(dtype)
    for beta in (0.0, 1.0):
        c = rng.standard_normal((m, n)).astype(dtype)
        want = reference(a, b, c, transpose_a, transpose_b, beta)
        gemm(transpose_a, transpose_b, m, n, k, a.ravel(), 0, a.shape[1], b.ravel(), 0, b.shape[1],
             beta, c.ravel(), 0, n)
        tolerance = 1e-4 if dtype == np.float32 else 1e-10
        np.testing.assert_allclose(c, want, rtol=tolerance, atol=tolerance * np.sqrt(k))


@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("m, n, k", [(70, 200, 150), (70, 200, 700), (300, 230, 520)])
def test_tiled_gemm_of_sub_matrices(transpose_a, m, n, k):
    """A block of a larger product (offsets and leading dimensions wider than the block, as
    codegen_matmul's per-thread blocks): the tiles stay inside it, in one slice of K or several,
    a slice at a time over all of C or tile by tile."""
    rng = np.random.default_rng(7)
    a_full = rng.standard_normal((k + 3, m + 5) if transpose_a else (m + 5, k + 3)).astype(np.float32)
    b_full = rng.standard_normal((k + 2, n + 9)).astype(np.float32)
    c_full = rng.standard_normal((m + 4, n + 11)).astype(np.float32)
    a = a_full[2:2 + k, 3:3 + m] if transpose_a else a_full[3:3 + m, 2:2 + k]
    b, before = b_full[1:1 + k, 4:4 + n], c_full.copy()
    want = c_full.copy()
    want[1:1 + m, 6:6 + n] = reference(a, b, 0, transpose_a, False, 0.0)
    a_at = 2 * a_full.shape[1] + 3 if transpose_a else 3 * a_full.shape[1] + 2
    gemm(transpose_a, False, m, n, k, a_full.ravel(), a_at, a_full.shape[1], b_full.ravel(),
         b_full.shape[1] + 4, b_full.shape[1], 0.0, c_full.ravel(), c_full.shape[1] + 6, c_full.shape[1])
    np.testing.assert_allclose(c_full, want, rtol=1e-4, atol=1e-4)
    assert np.array_equal(c_full[0], before[0]) and np.array_equal(c_full[:, :6], before[:, :6])


def test_tiles_fit_the_small_kernel():
    limit = gemm_module._SMALL_MNK
    if not limit:
        pytest.skip("scipy's BLAS has no small-matrix sgemm kernel here: products are not tiled")
    for m, n, k in [(64, 520, 128), (100, 130, 300), (17, 70, 1100), (1792, 512, 28), (4000, 64, 16),
                    (28, 512, 1792), (512, 512, 512)]:
        rows, depth = gemm_module._tiles(m, n, k, False, 4)
        assert 0 < rows <= m and 0 < depth <= k
        assert rows * min(n, gemm_module._TILE_COLUMNS) * depth <= limit
    assert gemm_module._tiles(9, 30, 40, False, 4)[0] == 0     # small: one call already
    assert gemm_module._tiles(64, 520, 128, True, 4)[0] == 0   # B transposed
    assert gemm_module._tiles(64, 520, 128, False, 8)[0] == 0  # float64


def test_depth_outer_and_tile_by_tile_orders_sum_alike():
    """Either loop order adds a tile's slices of K in the same order: the results are bitwise
    equal whatever size decides the order."""
    if not gemm_module._SMALL_MNK:
        pytest.skip("scipy's BLAS has no small-matrix sgemm kernel here: products are not tiled")
    rng = np.random.default_rng(3)
    m, n, k = 150, 600, 900  # C: 360 KB, tile by tile; its 150 x 64 blocks: slice by slice
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    whole, blocks = np.zeros((m, n), np.float32), np.zeros((m, n), np.float32)
    gemm(False, False, m, n, k, a.ravel(), 0, k, b.ravel(), 0, n, 0.0, whole.ravel(), 0, n)
    assert m * n * 4 > gemm_module._DEPTH_OUTER_BYTES >= m * 64 * 4
    for j in range(0, n, 64):
        gemm(False, False, m, min(64, n - j), k, a.ravel(), 0, k, b.ravel(), j, n, 0.0, blocks.ravel(), j, n)
    assert np.array_equal(whole, blocks)
