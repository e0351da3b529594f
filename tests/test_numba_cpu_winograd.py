"""The numba-cpu Winograd convolutions against the reference: output planes of at least
MIN_SIDE_4X4 take F(4x4, 3x3) (6x6 tiles, 36 GEMMs), smaller ones F(2x2, 3x3); planes whose
sides are no multiple of the tile (the last tiles half outside), paddings 0 to 2 (the input
gradient pads by 2 - padding), float64; the weight gradient's groups of images, one product
summing over all their tiles, where they do not divide the batch or a thread's images."""
from __future__ import annotations

import numpy as np
import pytest

from graphc.backends.numba_cpu.codegen_common import always_parallel
from graphc.backends.numba_cpu.codegen_winograd import (MIN_SIDE_4X4, WEIGHT_GRAD, winograd_scratch,
                                                        winograd_tile)
from graphc.backends.reference import evaluate
from graphc.lowering import compile_graph
from opcheck import build_graph

TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-4), "float64": dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.slow  # ~20 s: the F(4x4) module compiles for each dtype
@pytest.mark.parametrize("height, width, padding, dtype", [
    (18, 19, (1, 1), "float32"),  # 18 x 19 outputs: 5 x 5 tiles of 4, the last ones partly outside
    (18, 18, (0, 2), "float32"),  # 16 x 20 outputs; the input gradient pads by 2 and 0
    (17, 20, (2, 1), "float64"),
])
def test_4x4_tiles_match_the_reference(height, width, padding, dtype):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 16, height, width)).astype(dtype)
    w = (rng.standard_normal((17, 16, 3, 3)) / 4).astype(dtype)
    out_shape = (2, 17, height + 2 * padding[0] - 2, width + 2 * padding[1] - 2)
    g = rng.standard_normal(out_shape).astype(dtype)
    arrays = [x, w, g]
    graph = build_graph("winograd4", arrays, lambda b, v, f, d: [
        b.conv2d(v, f, padding=padding), b.conv2d_input_grad(d, f, input_shape=x.shape, padding=padding),
        b.conv2d_weight_grad(v, d, weight_shape=w.shape, padding=padding)])
    executable = compile_graph(graph, "numba-cpu")
    for got, want in zip(executable(*arrays), evaluate(graph, arrays)):
        np.testing.assert_allclose(got, want, **TOLERANCE[dtype])
    assert all("(Winograd F(4x4, 3x3))" in k.source for k in executable.kernels)


def test_the_tile_follows_the_plane_size():
    assert winograd_tile((MIN_SIDE_4X4, 40)) == 4
    assert winograd_tile((MIN_SIDE_4X4 - 1, 40)) == 2


def weight_gradient_graph(images: int, height: int, width: int, padding: tuple[int, int],
                          dtype: str = "float32", channels_in: int = 16):
    """conv2d_weight_grad of `channels_in` -> 17 channels: its graph and inputs (scaled for sums
    of order 1, which the absolute tolerance assumes)."""
    rng = np.random.default_rng(images)
    x = (rng.standard_normal((images, channels_in, height, width)) / 4).astype(dtype)
    plane = (height + 2 * padding[0] - 2, width + 2 * padding[1] - 2)
    g = (rng.standard_normal((images, 17, *plane)) / 4).astype(dtype)
    graph = build_graph("winograd_groups", [x, g], lambda b, v, d: [
        b.conv2d_weight_grad(v, d, weight_shape=(17, channels_in, 3, 3), padding=padding)])
    return graph, [x, g]


def assert_matches_the_reference(graph, arrays, dtype: str = "float32"):
    executable = compile_graph(graph, "numba-cpu")
    assert ["Winograd" in k.source for k in executable.kernels] == [True]
    for got, want in zip(executable(*arrays), evaluate(graph, arrays)):
        np.testing.assert_allclose(got, want, **TOLERANCE[dtype])


@pytest.mark.parametrize("images, height, width, padding, group", [
    (5, 9, 7, (1, 0), 4),  # 9 x 5 outputs, 5 x 3 tiles: groups of 4 images, 4 + 1
    (1, 9, 7, (1, 0), 1),  # one image: a group of one
    (7, 8, 8, (1, 1), 3),  # 4 x 4 tiles: groups of 3, 3 + 3 + 1
    # F(4x4), 4 x 4 tiles of 4: groups of 3, 3 + 2 (~7 s: the module's compile)
    pytest.param(5, 16, 16, (1, 1), 3, marks=pytest.mark.slow),
])
def test_weight_gradient_image_groups_match_the_reference(images, height, width, padding, group):
    graph, arrays = weight_gradient_graph(images, height, width, padding)
    plane = (height + 2 * padding[0] - 2, width + 2 * padding[1] - 2)
    threads, chosen, _ = winograd_scratch(images, 16, 17, plane, WEIGHT_GRAD, winograd_tile(plane))
    assert threads > 1 or chosen == group
    assert_matches_the_reference(graph, arrays)


@pytest.mark.slow  # ~10 s: the parallel F(2x2) module
def test_weight_gradient_image_groups_over_threads_match_the_reference():
    """7 images over 2 threads, 4 and 3, in groups of 3: each thread's last group is partial; 17
    input channels, whose filters the threads untransform 8 and 9."""
    graph, arrays = weight_gradient_graph(7, 8, 8, (1, 1), "float64", channels_in=17)
    with always_parallel():
        assert_matches_the_reference(graph, arrays, "float64")
