"""The numba-cpu im2col convolutions with a column stride over 1 (one strided 2-D copy per kernel
cell, _im2col_strided / _col2im_strided) against the reference: rows and columns that read
only padding, dilation, unequal strides, groups, planes whose last rows no window reaches."""
from __future__ import annotations

import numpy as np
import pytest

from graphc.backends.reference import evaluate
from graphc.lowering import compile_graph
from opcheck import build_graph

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    ((2, 2), (1, 1), (1, 1), 1),
    ((1, 3), (3, 2), (2, 1), 2),  # padding wider than a dilated cell's reach: whole rows of zeros
    ((3, 2), (0, 0), (1, 2), 1),  # the last input rows and columns feed no window
])
def test_strided_convolution_and_its_gradients_match_the_reference(stride, padding, dilation, groups):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 4, 11, 9)).astype(np.float32)
    w = rng.standard_normal((6, 4 // groups, 3, 3)).astype(np.float32)
    attrs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    y = evaluate(build_graph("y", [x, w], lambda b, v, f: [b.conv2d(v, f, **attrs)]), [x, w])[0]
    g = rng.standard_normal(y.shape).astype(np.float32)
    arrays = [x, w, g]
    graph = build_graph("strided", arrays, lambda b, v, f, d: [
        b.conv2d(v, f, **attrs), b.conv2d_input_grad(d, f, input_shape=x.shape, **attrs),
        b.conv2d_weight_grad(v, d, weight_shape=w.shape, **attrs)])
    executable = compile_graph(graph, "numba-cpu")
    for got, want in zip(executable(*arrays), evaluate(graph, arrays)):
        np.testing.assert_allclose(got, want, **TOLERANCE)
    assert all("::SW]" in k.source for k in executable.kernels)
