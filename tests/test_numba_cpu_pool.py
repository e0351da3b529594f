"""The numba-cpu max-pool gradient's row-at-a-time path (windows that tile the plane) against
the reference: a window needing the general search redoes its whole row, and the other
windows of that row and of the rows around it keep their cotangents."""
from __future__ import annotations

import numpy as np

from graphc.backends.reference import evaluate
from graphc.lowering import compile_graph
from opcheck import build_graph


def _check(x: np.ndarray, g: np.ndarray, kernel: tuple[int, int]) -> str:
    graph = build_graph("pool_rows", [x, g], lambda b, v, d: [b.max_pool2d_grad(v, d, kernel=kernel, stride=kernel)])
    executable = compile_graph(graph, "numba-cpu")
    got, = executable(x, g)
    want, = evaluate(graph, [x, g])
    np.testing.assert_array_equal(got, want)
    return executable.kernels[0].source


def test_a_nan_window_redoes_only_its_row_and_the_rest_keep_their_cotangents():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 8, 10)).astype(np.float32)
    g = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    x[0, 1, 3, 7] = np.nan  # second row of windows, fourth window: its cotangent goes to the NaN
    x[1, 2, 4, 0] = x[1, 2, 5, 1] = np.nan  # two NaNs in one window: the first one takes it
    x[1, 0, 6:8, 2:4] = 1.5  # a tie: the first cell in row-major order
    g[0, 2, 0, 3] = np.inf  # inf * 0 would be NaN in the cells that are not the maximum
    source = _check(x, g, (2, 2))
    assert "def window_row(x0, x1, g, d0, d1):" in source


def test_windows_of_two_rows_by_three_columns_and_uncovered_cells():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 5, 7)).astype(np.float32)  # a last row and column no window covers
    g = rng.standard_normal((1, 2, 2, 2)).astype(np.float32)
    x[0, 1, 2, 4] = np.nan
    source = _check(x, g, (2, 3))
    assert "v5 = x1[iw0 + 2]" in source
