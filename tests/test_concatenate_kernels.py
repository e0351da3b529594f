"""A kernel that only concatenates its inputs copies rows (numba-cpu's `_concatenation_call`):
each array viewed as (the output's extent before the axis, the rest). Checked against the
reference on every axis, ranks 1 to 4, uneven and empty parts, an input given twice, three
dtypes, serial and parallel; a concatenation fused with arithmetic keeps the pointwise form."""
import numpy as np
import pytest

from opcheck import build_graph, numba_cpu_matches_reference as run_and_compare

ROW_COPY = "dst[j] = src[j]"

# (the parts' shapes, axis)
CASES = [([(4, 3), (4, 3), (4, 3), (4, 3)], 1),      # a gate gradient's four blocks
         ([(2, 5), (3, 5), (1, 5)], 0),
         ([(2, 3, 4), (2, 1, 4), (2, 0, 4), (2, 2, 4)], 1),
         ([(3, 2, 2, 5), (3, 2, 2, 1)], 3),
         ([(7,), (2,)], 0),
         ([(2, 2, 3), (2, 2, 3)], 2)]


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32"])
@pytest.mark.parametrize("shapes, axis", CASES, ids=[f"{len(s)}-parts-axis{a}-rank{len(s[0])}" for s, a in CASES])
def test_a_concatenation_alone_copies_rows(shapes, axis, dtype, parallel):
    rng = np.random.default_rng(len(shapes) + axis)
    arrays = [(rng.standard_normal(shape) * 100).astype(dtype) for shape in shapes]
    graph = build_graph("concatenation", arrays, lambda b, *xs: b.concatenate(*xs, axis=axis))
    executable = run_and_compare(graph, arrays, parallel)
    (kernel,) = executable.kernels
    assert ROW_COPY in kernel.source
    assert ("in prange(" in kernel.source) == parallel


def test_an_input_given_twice_fills_both_places():
    x = np.arange(6, dtype="float32").reshape(2, 3)
    y = -np.arange(4, dtype="float32").reshape(2, 2)
    graph = build_graph("twice", [x, y], lambda b, x, y: b.concatenate(x, y, x, axis=1))
    executable = run_and_compare(graph, [x, y], parallel=False)
    assert ROW_COPY in executable.kernels[0].source


def test_the_same_kernel_serves_another_rank_and_axis():
    """Viewed as 2-D, two concatenations of two parts share one compiled module (its source is
    the cache key), whatever their ranks and axes."""
    a = [np.ones((3, 4), "float32"), np.zeros((3, 2), "float32")]
    b = [np.ones((2, 5, 3), "float32"), np.zeros((2, 1, 3), "float32")]
    first = run_and_compare(build_graph("c2", a, lambda g, *xs: g.concatenate(*xs, axis=1)), a, False)
    second = run_and_compare(build_graph("c3", b, lambda g, *xs: g.concatenate(*xs, axis=1)), b, False)
    modules = [[call.source for call in e.kernels[0].generated.calls] for e in (first, second)]
    assert modules[0] == modules[1]


def test_a_concatenation_fused_with_arithmetic_keeps_the_pointwise_form():
    x, y = np.ones((2, 3), "float32"), np.full((2, 2), 2, "float32")
    graph = build_graph("scaled", [x, y], lambda b, x, y: b.mul(b.concatenate(x, y, axis=1),
                                                                 b.concatenate(y, x, axis=1)))
    executable = run_and_compare(graph, [x, y], parallel=False)
    assert all(ROW_COPY not in k.source for k in executable.kernels)
