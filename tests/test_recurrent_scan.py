"""nn.RNN / nn.LSTM / nn.GRU with their time loop on gc.scan: against PyTorch (values and
gradients), against the unrolled loop, the length threshold that picks one or the other, the
graph's shape (one scan per layer and direction), compile, a training step over 100 steps, and
numba-cpu against the reference backend."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
from graphc.ir.ops.control import SCAN_OP
from graphc.nn.recurrent import FOLD_INPUT_RATIO, UNROLL_MAX_STEPS
from test_nn_recurrent import (  # noqa: F401 (torch is a fixture)
    check_against_torch, graphc_loss_and_grads, initial_states, random_state, torch)

REF = "reference"
NAMES = ["RNN", "LSTM", "GRU"]


def scans(graph):
    return [n for n in graph.nodes if n.op == SCAN_OP]


def trace_forward(model, steps, batch=2):
    return gc.trace(lambda p, x: nn.functional_call(model, p, x), model.state_dict(),
                    np.zeros((steps, batch, model.input_size), np.float32))


# -- against PyTorch, the scan forced ----------------------------------------------------------
CONFIGS = {
    "bidirectional_two_layers": (dict(num_layers=2, bidirectional=True), (6, 2, 3), True),
    "batch_first_zero_state": (dict(batch_first=True), (2, 6, 3), False),
    "unbatched_no_bias": (dict(bias=False), (6, 3), True),
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
@pytest.mark.parametrize("name", NAMES)
def test_scan_path_matches_pytorch(torch, name, config):
    extra, x_shape, with_state = CONFIGS[config]
    kwargs = dict(input_size=3, hidden_size=4, **extra)
    check_against_torch(torch, name, kwargs, x_shape, with_state, np.float64, seed=3,
                        unroll=False)


def test_scan_path_in_float32_matches_pytorch(torch):
    kwargs = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    check_against_torch(torch, "LSTM", kwargs, (5, 2, 3), True, np.float32, seed=4, unroll=False)


# -- a narrow input folded into the step's product ------------------------------------------------
FOLDED = {  # input_size * FOLD_INPUT_RATIO <= hidden_size: [x_t, h] @ [W_ih, W_hh]^T per step
    "two_layers_with_state": (dict(num_layers=2), (5, 2, 1), True),
    "bidirectional_batch_first": (dict(bidirectional=True, batch_first=True), (2, 5, 1), False),
    "no_bias": (dict(bias=False), (5, 2, 1), True),
}


@pytest.mark.parametrize("config", sorted(FOLDED))
@pytest.mark.parametrize("name", ["RNN", "LSTM"])
def test_a_narrow_input_folded_into_the_step_matches_pytorch(torch, name, config):
    extra, x_shape, with_state = FOLDED[config]
    kwargs = dict(input_size=1, hidden_size=FOLD_INPUT_RATIO, **extra)
    check_against_torch(torch, name, kwargs, x_shape, with_state, np.float64, seed=11,
                        unroll=False)


@pytest.mark.parametrize("name", NAMES)
def test_a_narrow_input_is_multiplied_with_the_state_inside_the_loop(name):
    """RNN and LSTM: no all-steps input projection, one product of [x_t, h, 1] per step (the
    column of ones adds the bias, nothing after the product does); GRU, whose bias_hh sits
    inside a gate, keeps the projection."""
    hidden = FOLD_INPUT_RATIO
    for features, folded in ((1, name != "GRU"), (2, False)):  # 2 features are too wide
        graph = trace_forward(getattr(nn, name)(features, hidden, unroll=False), 6)
        (loop,) = scans(graph)
        outside = [n for n in graph.nodes if n.op == "matmul"]
        (product,) = [n for n in loop.subgraph.nodes if n.op == "matmul"]
        assert len(outside) == (0 if folded else 1)
        operand = product.inputs[0].producer
        assert (operand is not None and operand.op == "concatenate") == folded
        assert product.inputs[0].shape == ((2, features + hidden + 1) if folded else (2, hidden))
        if folded:
            readers = {n.op for n in loop.subgraph.users()[product.output]}
            assert readers == ({"slice"} if name == "LSTM" else {"tanh"})  # the gates, or h


# -- scan against unrolled -----------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_scan_and_unrolled_paths_agree(name):
    rng = np.random.default_rng(5)
    model = getattr(nn, name)(3, 4, num_layers=2, bidirectional=True)
    state = random_state(model, np.float64, rng)
    x = rng.standard_normal((7, 2, 3))
    hx = initial_states(name, (4, 2, 4), np.float64, rng)
    results = {}
    for unroll in (True, False):
        model.unroll = unroll
        results[unroll] = graphc_loss_and_grads(model, state, x, hx)
    (values_u, grads_u), (values_s, grads_s) = results[True], results[False]
    np.testing.assert_allclose(values_s[0], values_u[0], rtol=1e-12)
    for got, want in zip(values_s[1:], values_u[1:]):
        for g, w in zip(got if isinstance(got, tuple) else [got],
                        want if isinstance(want, tuple) else [want]):
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-14)
    for k in state:
        np.testing.assert_allclose(grads_s[0][k], grads_u[0][k], rtol=1e-10, atol=1e-13, err_msg=k)
    np.testing.assert_allclose(grads_s[1], grads_u[1], rtol=1e-10, atol=1e-13)


@pytest.fixture
def splits_rows(monkeypatch):
    """Set whether the default backend (numba-cpu) may run loops in row blocks, as on several
    threads (True) or on one (False)."""
    from graphc.backends import numba_cpu

    def set_to(value):
        monkeypatch.setattr(numba_cpu, "splits_rows", lambda: value)
    return set_to


@pytest.mark.parametrize("name", NAMES)
def test_the_length_threshold_picks_unrolled_or_scan(name, splits_rows):
    """Up to UNROLL_MAX_STEPS steps: one cell per step, no scan; beyond: one scan per layer and
    direction, whose graph does not grow with the length; `unroll` overrides either way."""
    splits_rows(False)
    model = getattr(nn, name)(3, 4, num_layers=2, bidirectional=True)
    assert model.unroll is None
    short = trace_forward(model, UNROLL_MAX_STEPS)
    assert not scans(short)
    matmuls = [n for n in short.nodes if n.op == "matmul"]
    assert len(matmuls) == 4 * (UNROLL_MAX_STEPS + 1)  # per layer and direction: 1 + T
    longer, longest = trace_forward(model, UNROLL_MAX_STEPS + 1), trace_forward(model, 200)
    for graph in (longer, longest):
        assert len(scans(graph)) == 4
        assert len([n for n in graph.nodes if n.op == "matmul"]) == 4  # the input projections
        for node in scans(graph):
            assert len([n for n in node.subgraph.nodes if n.op == "matmul"]) == 1
    assert len(longer.nodes) == len(longest.nodes)
    assert [n.attrs["reverse"] for n in scans(longest)] == [False, True] * 2
    model.unroll = False
    assert len(scans(trace_forward(model, 2))) == 4


@pytest.mark.parametrize("name", NAMES)
def test_where_rows_split_short_sequences_scan_too_whatever_the_batch(name, splits_rows):
    """On several threads numba-cpu runs a batch's loop in row blocks side by side, faster than
    the unrolled steps' parallel kernels: a short batched sequence scans, whatever its batch size
    (a ragged last batch reuses the step's program); one row (an unbatched input) unrolls.
    `unroll` still overrides."""
    splits_rows(True)
    model = getattr(nn, name)(3, 4)
    for batch in (2, 3, 64):
        assert len(scans(trace_forward(model, 5, batch))) == 1
    assert not scans(trace_forward(model, 5, 1))
    model.unroll = True
    assert not scans(trace_forward(model, 5, 2))
    model.unroll = True
    assert not scans(trace_forward(model, UNROLL_MAX_STEPS + 1))
    assert getattr(nn, name)(3, 4, unroll=False).unroll is False


def test_compiled_lstm_returns_output_and_both_final_states():
    gc.manual_seed(6)
    model = nn.LSTM(3, 4, num_layers=2, unroll=False).to(dtype="float64")
    x = np.random.default_rng(6).standard_normal((9, 2, 3))
    out, (h, c) = gc.compile(model, [x], backend=REF)(x)
    model.unroll = True
    want_out, (want_h, want_c) = gc.compile(model, [x], backend=REF)(x)
    assert out.shape == (9, 2, 4) and h.shape == c.shape == (2, 2, 4)
    for got, want in ((out, want_out), (h, want_h), (c, want_c)):
        np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_array_equal(out[-1], h[-1])


def test_a_training_step_over_100_steps_compiles_to_one_scan_per_layer_and_direction():
    gc.manual_seed(7)
    model = nn.LSTM(2, 3, num_layers=2, bidirectional=True)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((100, 2, 2)).astype(np.float32)
    target = rng.standard_normal((100, 2, 6)).astype(np.float32)
    step = gc.compile_train_step(model, lambda out, t: ((out[0] - t) ** 2).mean(),
                                 gc.optim.Adam(model.parameters(), lr=0.02), [x, target],
                                 backend=REF)
    losses = [float(step(x, target)) for _ in range(2)]
    # forward and backward: one scan each per layer and direction, none with 100 cells
    loops = scans(step.graph)
    assert len(loops) == 2 * 4
    assert all(n.attrs["length"] == 100 for n in loops)
    assert len(step.graph.nodes) < 400
    assert np.all(np.isfinite(losses)) and losses[1] < losses[0]


def test_numba_cpu_matches_the_reference():
    rng = np.random.default_rng(8)
    model = nn.GRU(3, 4, num_layers=2, bidirectional=True, unroll=False)
    state = random_state(model, np.float64, rng)
    x = rng.standard_normal((6, 2, 3))

    def loss(p, x):
        out, h = nn.functional_call(model, p, x)
        return (out * out).sum() + h.sum()

    want = gc.value_and_grad(loss, argnums=(0, 1), backend=REF)(state, x)
    got = gc.value_and_grad(loss, argnums=(0, 1), backend="numba-cpu")(state, x)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    for k in state:
        np.testing.assert_allclose(got[1][0][k], want[1][0][k], rtol=1e-9, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(got[1][1], want[1][1], rtol=1e-9, atol=1e-12)


def test_inter_layer_dropout_stays_between_the_scans():
    """Dropout draws random numbers, which a scan body refuses: it must run between layers."""
    model = nn.LSTM(3, 4, num_layers=2, dropout=0.5, unroll=False)
    x = np.random.default_rng(9).standard_normal((6, 2, 3)).astype(np.float32)
    run = gc.jit(lambda x: model(x)[0], backend=REF)
    trained = run(x)
    model.eval()
    evaluated = run(x)
    model.unroll = True
    np.testing.assert_allclose(evaluated, run(x), rtol=1e-6)
    assert not np.allclose(trained, evaluated)
