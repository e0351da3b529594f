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


def test_fit_traces_a_nan_that_only_the_backward_pass_makes():
    """sqrt(|h| - |h|) is 0, its gradient inf * 0 = NaN: the weights turned NaN under a finite
    loss, and the next step blamed the weights, not the op."""
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            h = self.lin(x)
            return gc.sqrt(h.abs() - h.abs())  # the line the report names

    line = Root.forward.__code__.co_firstlineno + 2
    gc.manual_seed(0)
    model = Root()
    x, y = np.array([[1, 2, 3], [-1, -2, -3]], np.float32), np.zeros((2, 2), np.float32)
    step = gc.compile_train_step(model, F.mse_loss, optim.SGD(model.parameters(), lr=0.1), (x, y),
                                 backend="reference")
    with pytest.raises(gc.GraphcError, match=rf"training state 'model/lin.weight' became non-finite "
                       rf"at epoch 1, step 0 \(the loss, [0-9.]+, was finite\): first non-finite value: "
                       rf"\w+ at .*test_debug.py:{line} .*produced NaN"):
        fit(step, [(x, y)] * 3, epochs=1, progress=False, check_numerics=True)


def test_infinities_written_on_purpose_are_not_reported():
    """A causal mask's -inf (and the ops it flows through) is no error; the NaN a fully masked
    row's softmax makes of it is, as is an infinity made from finite operands."""
    def attend(q, k):
        return F.scaled_dot_product_attention(q, k, k, is_causal=True).sum()

    q = np.random.default_rng(0).standard_normal((2, 5, 4)).astype(np.float32)
    graph = gc.trace(gc.grad(attend), q, q)
    assert find_nonfinite(graph, [q, q]) is None

    def masked(scores, keep):
        return F.softmax(gc.where(keep, scores, -np.inf), -1)
    graph = gc.trace(masked, q[0], np.ones((5, 4), bool))
    keep = np.ones((5, 4), bool)
    assert find_nonfinite(graph, [q[0], keep]) is None
    keep[2] = False
    report = find_nonfinite(graph, [q[0], keep])
    assert report.kind == "NaN" and report.op == "softmax"
    graph = gc.trace(lambda x: gc.exp(x) * 2.0, q[0])
    report = find_nonfinite(graph, [np.full((5, 4), 100.0, np.float32)])
    assert report.kind == "Inf" and report.op == "exp"
    x = np.random.default_rng(1).random((1, 1, 5, 5), np.float32)  # ceil_mode pads with -inf
    graph = gc.trace(gc.grad(lambda t: F.max_pool2d(t, 2, ceil_mode=True).sum()), x)
    assert find_nonfinite(graph, [x]) is None


def test_a_nan_made_inside_a_scan_is_located_in_its_body():
    """The locator blamed the whole scan; it names the body's op, its line and the step now."""
    def f(x):
        def body(c, xt):
            c = c + xt
            return c, gc.sqrt(c - 2.5)  # negative until the running sum passes 2.5

        return gc.scan(body, x[0] * 0, x)[1].sum()

    line = f.__code__.co_firstlineno + 3
    graph = gc.trace(f, np.zeros((4, 3), np.float32))
    report = find_nonfinite(graph, [np.ones((4, 3), np.float32)])
    assert report.op.startswith("sqrt (in the body of scan at ") and ", step 0)" in report.op
    assert report.loc.endswith(f"test_debug.py:{line}")


def test_the_nan_reported_is_the_one_the_result_holds():
    """A guarded log (its NaN discarded by where) was blamed for a later 0 / 0; and an infinity
    in an input (an additive mask) stopped the search before the real NaN."""
    def f(x, mask):
        safe = gc.where(x > 0, gc.log(x), 0.0)
        z = (x * 0.0).sum()
        return safe.mean() + F.softmax(x + mask, -1).sum() + z / z

    line = f.__code__.co_firstlineno + 3
    graph = gc.trace(f, np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    x = np.array([[1.0, -1.0, 2.0], [0.5, 3.0, -2.0]], np.float32)
    mask = np.array([[0, -np.inf, 0], [0, 0, -np.inf]], np.float32)
    report = find_nonfinite(graph, [x, mask])
    assert report.op == "div" and report.loc.endswith(f"test_debug.py:{line}")


def test_the_walk_follows_the_values_the_result_took():
    """A NaN in a carry the result never reads, the discarded side of a where, and an op with
    an infinite attribute over an operand's own +inf were each blamed."""
    def carries(xs):
        def body(c, x):
            a, b = c
            a = a + x
            b = gc.log(b - 1.0)  # NaN from step 0, in a carry the result never reads
            return (a, b), gc.sqrt(5.0 - a)  # the result's NaN, from step 3 on
        return gc.scan(body, (xs[0] * 0, xs[0] * 0 + 0.5), xs)[1].sum()

    xs = np.arange(8, dtype=np.float32)
    report = find_nonfinite(gc.trace(carries, xs), [xs])
    assert report.op.startswith("sqrt (in the body of scan") and ", step 3)" in report.op
    v, w = np.array([-1.0, 1.0], np.float32), np.array([1.0, -1.0], np.float32)
    graph = gc.trace(lambda a, b: gc.where(a > 5, gc.log(a), gc.sqrt(b)).sum(), v, w)
    assert find_nonfinite(graph, [v, w]).op == "sqrt"
    x = np.array([1.0, 0.0], np.float32)
    graph = gc.trace(lambda a: F.pad(gc.exp(a * 100.0), (1, 1), value=float("-inf")).max(), x)
    assert find_nonfinite(graph, [x]).op == "exp"
