"""The NaN locator names the op and the user's line."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.debug import find_nonfinite
from graphc.train import fit


def test_locates_the_first_nonfinite_op_and_its_line():
    def f(x):
        y = gc.exp(x)
        return gc.log(y - 1.0)  # log of a negative number: NaN here

    line = f.__code__.co_firstlineno + 2
    graph = gc.trace(f, np.zeros(3, np.float32))
    report = find_nonfinite(graph, [np.array([-1.0, 0.5, 2.0], np.float32)])
    assert report.op == "log" and report.kind == "NaN"
    assert report.loc.endswith(f"test_debug.py:{line}")
    assert "float32[3]" in str(report) and "test_debug.py" in str(report)
    assert find_nonfinite(graph, [np.array([1.0], np.float32).repeat(3)]) is None


def test_fit_reports_the_op_when_the_loss_becomes_nonfinite():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            return gc.sqrt(self.lin(x) - 1e6)  # sqrt of negatives

    x, y = np.ones((4, 2), np.float32), np.zeros(4, np.int64)

    def make_step():
        model = Bad()
        return gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                     (x, y), backend="reference")

    with pytest.raises(gc.GraphcError, match="check_numerics=True"):
        fit(make_step(), [(x, y)], epochs=1, progress=False)
    step = make_step()
    with pytest.raises(gc.GraphcError, match=r"sqrt at .*test_debug.py:\d+ .*produced NaN"):
        fit(step, [(x, y)], epochs=1, progress=False, check_numerics=True)


def test_corrupted_inputs_are_named():
    graph = gc.trace(lambda x, w: x @ w, np.zeros((2, 2), np.float32), np.zeros((2, 2), np.float32))
    report = find_nonfinite(graph, [np.ones((2, 2), np.float32), np.full((2, 2), np.inf, np.float32)])
    assert str(report).startswith("input 'w' already holds Inf")
