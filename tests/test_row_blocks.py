"""Row blocks of a scan (passes/row_blocks.py, backends/numba_cpu/driver.py RowBlockDriver): a
body whose rows are independent runs as one loop per block of rows, in parallel; its values and
gradients are the reference backend's. Bodies that mix rows are never split."""
import numba
import numpy as np
import pytest

import graphc as gc
from graphc.backends.numba_cpu.driver import RowBlockDriver
from graphc.ir import Builder, TensorType
from graphc.ir.interpret import evaluate
from graphc.ir.ops.control import SCAN_OP
from graphc.lowering import compile_graph
from graphc.passes.row_blocks import row_block_body

CPU, REF = "numba-cpu", "reference"
rng = np.random.default_rng(11)
H = 4


def f32(*shape):
    return rng.normal(size=shape).astype(np.float32)


def lstm_step(w_hh, b, drift):
    def step(state, px):
        h, c = state
        gates = px + h @ w_hh + b
        i, f, o = (gc.sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        c = f * c + i * gc.tanh(gates[:, 2 * H:3 * H]) + drift
        h = o * gc.tanh(c)
        return (h, c), gc.concatenate([h, c.sum(axis=1, keepdims=True)], axis=1)
    return step


def lstm(xs, w_hh, b, h0, c0, drift):
    """An LSTM cell whose cell state drifts by a (batch, H) array each step: a const split into
    rows."""
    (h, c), ys = gc.scan(lstm_step(w_hh, b, drift), (h0, c0), xs)
    return h, c, ys


def lstm_args(batch, steps=7):
    return (f32(steps, batch, 4 * H), f32(H, 4 * H) * 0.5, f32(4 * H) * 0.5, f32(batch, H), f32(batch, H),
            f32(batch, H) * 0.1)


def scan_of(fn, *args):
    (node,) = [n for n in gc.trace(fn, *args).nodes if n.op == SCAN_OP]
    return node


def body_of(step, carry, xs, *shared):
    """The scan node of `step` over `carry` and `xs`, `shared` closed over."""
    return scan_of(lambda c, x, *s: gc.scan(lambda c_, x_: step(c_, x_, *s), c, x), carry, xs, *shared)


def test_an_lstm_body_in_blocks_of_rows_computes_the_rows_of_the_whole_body():
    args = lstm_args(batch=6)
    node = scan_of(lstm, *args)
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    block = row_block_body(node.subgraph, c, k, rows=2)
    assert block is not None
    assert [v.type.shape[0] for v in block.input_values[c:]] == [2] * (len(block.input_values) - c)
    # the weight and bias are read whole, the drift by rows
    assert sorted(v.type.shape for v in block.input_values[:c]) == [(2, H), (H, 4 * H), (4 * H,)]
    body_inputs = [rng.normal(size=v.type.shape).astype(np.float32) for v in node.subgraph.input_values]
    whole = evaluate(node.subgraph, body_inputs)
    for start in (0, 2, 4):
        rows = [a if v.type == w.type else a[start:start + 2]
                for a, v, w in zip(body_inputs, block.input_values, node.subgraph.input_values)]
        for got, want in zip(evaluate(block, rows), whole):
            np.testing.assert_allclose(got, want[start:start + 2], rtol=1e-6)


@pytest.mark.parametrize("step, why", [
    (lambda h, x: ((h - h.mean(axis=0)) * x,) * 2, "a mean over the batch"),
    (lambda h, x: ((h @ (h.T @ h)) + x,) * 2, "a product contracting the batch"),
    (lambda h, x: (h[::-1] + x,) * 2, "rows reversed"),
    (lambda h, x: (gc.concatenate([h[1:], h[:1]], axis=0) + x,) * 2, "rows rolled"),
    (lambda h, x: ((h + x).reshape(H, 6).reshape(6, H),) * 2, "rows reshaped into columns"),
])
def test_a_body_mixing_rows_is_not_split(step, why):
    node = body_of(lambda h, x: step(h, x), f32(6, H), f32(3, 6, H))
    assert row_block_body(node.subgraph, node.attrs["num_consts"], node.attrs["num_carry"], 3) is None, why


def test_a_const_as_tall_as_the_batch_is_rows_where_it_meets_rows_else_shared():
    """A (6, H) array closed over, added to the (6, H) rows: each block reads its rows of it. A
    (6, 6) matrix the rows multiply: each block reads it whole."""
    aligned = body_of(lambda h, x, a: ((h + x + a).tanh(),) * 2, f32(6, H), f32(3, 6, H), f32(6, H))
    block = row_block_body(aligned.subgraph, aligned.attrs["num_consts"], aligned.attrs["num_carry"], 3)
    assert block is not None and block.input_values[0].type.shape == (3, H)
    square = body_of(lambda h, x, w: ((h @ w + x).tanh(),) * 2, f32(6, 6), f32(3, 6, 6), f32(6, 6))
    block = row_block_body(square.subgraph, square.attrs["num_consts"], square.attrs["num_carry"], 3)
    assert block is not None and block.input_values[0].type.shape == (6, 6)
    both = body_of(lambda h, x, w: ((h @ w + x + w).tanh(),) * 2, f32(6, 6), f32(3, 6, 6), f32(6, 6))
    assert row_block_body(both.subgraph, both.attrs["num_consts"], both.attrs["num_carry"], 3) is None


def test_a_carry_without_the_batch_or_the_whole_batch_is_not_split_and_a_remainder_is():
    counting = body_of(lambda c, x: ((c[0] + 1.0, (c[1] + x).tanh()), c[1]), (np.float32(0), f32(6, H)), f32(3, 6, H))
    assert row_block_body(counting.subgraph, counting.attrs["num_consts"], counting.attrs["num_carry"], 3) is None
    node = scan_of(lstm, *lstm_args(batch=6))
    c, k = node.attrs["num_consts"], node.attrs["num_carry"]
    assert row_block_body(node.subgraph, c, k, rows=6) is None
    # 4 rows and the 2 left over: bodies of both sizes
    for rows in (4, 2):
        block = row_block_body(node.subgraph, c, k, rows=rows)
        assert [v.type.shape[0] for v in block.input_values[c:]] == [rows] * (len(block.input_values) - c)


def test_a_row_broadcast_to_the_batch_in_the_body_becomes_a_block_of_it():
    """broadcast_to(bias, (batch, H)), as a VJP may write it in a body: every row is the bias."""
    b = Builder("body")
    bias = b.add_input(TensorType((H,), "float32"), "const0")
    h = b.add_input(TensorType((6, H), "float32"), "carry0")
    x = b.add_input(TensorType((6, H), "float32"), "x0")
    new_h = b.tanh(b.add(b.add(h, b.broadcast_to(bias, shape=(6, H))), x))
    b.add_output("carry0", new_h)
    b.add_output("y0", new_h)
    block = row_block_body(b.graph, num_consts=1, num_carry=1, rows=2)
    assert block is not None
    assert [n.attrs["shape"] for n in block.nodes if n.op == "broadcast_to"] == [(2, H)]
    inputs = [f32(H), f32(6, H), f32(6, H)]
    whole = evaluate(b.graph, inputs)
    for start in (0, 2, 4):
        got = evaluate(block, [inputs[0], inputs[1][start:start + 2], inputs[2][start:start + 2]])
        np.testing.assert_allclose(got[0], whole[0][start:start + 2], rtol=1e-6)


needs_threads = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="row blocks need 2 threads")


def lstm_loss(*args):
    h, c, ys = lstm(*args)
    return (h * h).sum() + (c * ys[:, :, :H]).sum() + (ys * ys).sum()


def made_drivers(monkeypatch):
    """(blocks, the last block's rows or None) of every RowBlockDriver made from now on."""
    made = []
    init = RowBlockDriver.__init__

    def recording(self, node, body, blocks, last_body=None):
        init(self, node, body, blocks, last_body)
        made.append((blocks, None if last_body is None else self.batch - self.rows * (blocks - 1)))
    monkeypatch.setattr(RowBlockDriver, "__init__", recording)
    return made


@needs_threads
@pytest.mark.parametrize("batch", [6, 2, 5])
def test_values_and_gradients_in_row_blocks_match_the_reference(batch, monkeypatch):
    """Batches of 6 and 2 (one row a block) split evenly on 2 threads; 5 as 3 and 2 rows, the
    last block a body and loop of its own."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    made = made_drivers(monkeypatch)
    args = lstm_args(batch)
    close = dict(rtol=3e-5, atol=3e-6)
    for got, want in zip(gc.jit(lstm, backend=CPU)(*args), gc.jit(lstm, backend=REF)(*args)):
        np.testing.assert_allclose(got, want, **close)
    grad = lambda backend: gc.value_and_grad(lstm_loss, argnums=(0, 1, 2, 3, 4, 5), backend=backend)  # noqa: E731
    (got_loss, got_grads), (want_loss, want_grads) = grad(CPU)(*args), grad(REF)(*args)
    np.testing.assert_allclose(got_loss, want_loss, rtol=3e-5)
    for got, want in zip(got_grads, want_grads):
        np.testing.assert_allclose(got, want, **close)
    # the forward scan and the gradient's, in two blocks each
    assert made and set(made) == {(2, 2 if batch == 5 else None)}


@needs_threads
def test_blocks_run_one_after_another_where_that_was_faster(monkeypatch):
    """Unpinned, a row-block loop times its calls like an executable: once one thread has been
    faster (another process holding a core), the blocks run in turn on the caller's thread, no
    team, and compute bitwise what they computed side by side."""
    from graphc.backends.numba_cpu import driver as driver_module
    from graphc.backends.numba_cpu.thread_choice import TRIALS, ThreadChoice
    monkeypatch.delenv("GRAPHC_NUM_THREADS", raising=False)
    drivers = []
    init = RowBlockDriver.__init__

    def recording(self, *args, **kwargs):
        init(self, *args, **kwargs)
        drivers.append(self)
    monkeypatch.setattr(RowBlockDriver, "__init__", recording)
    args = lstm_args(batch=6)
    run = gc.jit(lstm, backend=CPU)
    side_by_side = [np.array(a) for a in run(*args)]
    assert drivers and all(d._choice is not None for d in drivers)
    for d in drivers:  # one thread was the faster
        d._choice = ThreadChoice(d.blocks)
        for _ in range(TRIALS):
            d._choice.record(d.blocks, 1.0)
            d._choice.record(1, 0.5)

    def no_team(jobs):
        raise AssertionError("the blocks ran side by side")
    monkeypatch.setattr(driver_module, "run_side_by_side", no_team)
    for got, want in zip(run(*args), side_by_side):
        assert np.array_equal(got, want)


@needs_threads
def test_one_row_or_one_thread_runs_the_whole_batch_in_one_loop(monkeypatch):
    made = made_drivers(monkeypatch)
    one = lstm_args(batch=1)
    for got, want in zip(gc.jit(lstm, backend=CPU)(*one), gc.jit(lstm, backend=REF)(*one)):
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-6)
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "1")
    even = lstm_args(batch=4, steps=5)
    for got, want in zip(gc.jit(lstm, backend=CPU)(*even), gc.jit(lstm, backend=REF)(*even)):
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-6)
    assert made == []


@pytest.mark.parametrize("threads", ["openmp", "python"])
def test_side_by_side_runs_every_job_at_once_and_raises_the_first_error(threads, monkeypatch):
    """Jobs run on OpenMP's team (or Python threads where Numba runs another layer): two jobs
    that wait for each other finish only if they run at the same time."""
    import threading
    from graphc.backends.numba_cpu import team
    if threads == "python":
        monkeypatch.setattr(team, "_openmp", lambda: None)
    elif team._openmp() is None:  # (found through Numba's pool also beside PyTorch's own libgomp)
        assert numba.threading_layer() != "omp", "Numba runs OpenMP, but its team was not found"
        pytest.skip("Numba's threading layer here is not OpenMP")
    meeting = threading.Barrier(2, timeout=30)
    ran = []

    def meet(i):
        meeting.wait()
        ran.append(i)

    def fails(i):
        raise ValueError(f"job {i} failed")
    team.run_side_by_side([(meet, (0,)), (meet, (1,))])
    assert sorted(ran) == [0, 1]
    with pytest.raises(ValueError, match="job 1 failed"):
        team.run_side_by_side([(ran.append, (2,)), (fails, (1,))])
    assert ran[2:] == [2]
    team.run_side_by_side([(ran.append, (i,)) for i in range(5)])  # more jobs than threads
    assert sorted(ran[3:]) == [0, 1, 2, 3, 4]


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_process_forked_after_the_team_ran_runs_the_row_blocks_too():
    """GNU OpenMP's team does not survive fork (GOMP_parallel never returned in the child): a
    forked child, a multiprocessing worker, runs the blocks on Python threads."""
    import multiprocessing
    from graphc.backends.numba_cpu import team
    ran = []
    team.run_side_by_side([(ran.append, (0,)), (ran.append, (1,))])  # the parent's team, if any
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        result = pool.apply_async(_side_by_side_in_a_child)
        assert sorted(result.get(timeout=60)) == [0, 1, 2]


def test_the_team_marks_its_process_so_a_forked_childs_parallel_kernels_are_refused():
    """A parent whose only OpenMP use was a scan's row blocks went unnoticed: its forked child's
    first parallel kernel was killed by GNU OpenMP, with no Python error."""
    import subprocess
    import sys
    script = ("import os\nfrom graphc.backends.numba_cpu import team\n"
              "if team._openmp() is None: print('no team')\nelse:\n"
              "    team.run_side_by_side([(print, ()), (print, ())])\n"
              "    print(team.OPENMP_PROCESS[0] == os.getpid())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if out.stdout.strip().endswith("no team"):
        pytest.skip("GNU OpenMP's team is not in use")
    assert out.stdout.strip().endswith("True"), out.stdout + out.stderr


def _side_by_side_in_a_child() -> list[int]:
    from graphc.backends.numba_cpu import team
    ran: list[int] = []
    team.run_side_by_side([(ran.append, (i,)) for i in range(3)])
    return ran


def test_a_batch_runs_in_as_many_blocks_as_threads_each_of_the_rows_they_share_out(monkeypatch):
    """ceil(batch / threads) rows a block, the last block the rest: 6 rows on 4 threads run as 3
    blocks of 2, 5 as 2, 2 and 1."""
    from graphc.backends.numba_cpu import driver
    monkeypatch.setattr(driver, "kernel_threads", lambda: 4)
    assert [driver.row_blocks(batch) for batch in (8, 6, 7, 5, 2, 1, 0)] == [4, 3, 4, 3, 2, 1, 1]
    monkeypatch.setattr(driver, "kernel_threads", lambda: 1)
    assert driver.row_blocks(8) == 1


def random_square_body(seed):
    """A random body over (6, 6) values, where batch and features have one extent: ops that keep
    rows apart and ops that mix them (a transpose, a sum or product over the batch, rolled rows)
    type-check alike, so only the analysis tells them apart."""
    r = np.random.default_rng(seed)
    b = Builder("body")
    w = b.add_input(TensorType((6, 6), "float32"), "const0")
    values = [w, b.add_input(TensorType((6, 6), "float32"), "carry0"), b.add_input(TensorType((6, 6), "float32"), "x0")]
    pick = lambda: values[r.integers(len(values))]  # noqa: E731
    ops = [lambda: b.add(pick(), pick()), lambda: b.mul(pick(), pick()), lambda: b.tanh(pick()),
           lambda: b.matmul(pick(), pick()), lambda: b.transpose(pick(), perm=(1, 0)),
           lambda: b.broadcast_to(b.sum(pick(), axes=(0,), keepdims=True), shape=(6, 6)),
           lambda: b.mul(b.sum(pick(), axes=(1,), keepdims=True), pick()),
           lambda: b.concatenate(b.slice(pick(), starts=(1, 0), stops=(6, 6), steps=(1, 1)),
                                 b.slice(pick(), starts=(0, 0), stops=(1, 6), steps=(1, 1)), axis=0),
           lambda: b.concatenate(b.slice(pick(), starts=(0, 0), stops=(6, 2), steps=(1, 1)),
                                 b.slice(pick(), starts=(0, 2), stops=(6, 6), steps=(1, 1)), axis=1)]
    for _ in range(r.integers(1, 6)):
        values.append(ops[r.integers(len(ops))]())
    b.add_output("carry0", values[-1])
    b.add_output("y0", pick())
    return b.graph


def test_whenever_a_random_body_is_split_its_blocks_compute_the_rows_of_the_whole_body():
    split = 0
    for seed in range(300):
        body = random_square_body(seed)
        inputs = [rng.normal(size=(6, 6)).astype(np.float32) for _ in body.input_values]
        whole = evaluate(body, inputs)
        for rows in (2, 3):
            block = row_block_body(body, num_consts=1, num_carry=1, rows=rows)
            if block is None:
                continue
            split += 1
            for start in range(0, 6, rows):
                part = [a if v.type == w.type else a[start:start + rows]
                        for a, v, w in zip(inputs, block.input_values, body.input_values)]
                for got, want in zip(evaluate(block, part), whole):
                    np.testing.assert_allclose(got, want[start:start + rows], rtol=1e-5, atol=1e-6,
                                               err_msg=f"seed {seed}\n{body}")
    assert 100 < split < 500  # both splits and refusals occur (of 600 tries)


@needs_threads
def test_under_graphc_profile_the_blocks_step_from_python_and_the_whole_body_is_never_compiled(monkeypatch):
    """The profile times the kernels that run: those of the block's body, per step and block."""
    from graphc.lowering import compile_graph
    from graphc.scan_lowering import ScanLoop
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    monkeypatch.delenv("GRAPHC_NUM_THREADS", raising=False)
    args = lstm_args(batch=6, steps=5)
    executable = compile_graph(gc.trace(lstm, *args), CPU)
    for got, want in zip(executable(*args), gc.jit(lstm, backend=REF)(*args)):
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-6)
    (loop,) = [run for run, _, _ in executable.parts if isinstance(run, ScanLoop)]
    (body,) = [piece for label, piece, _ in executable.pieces if label.startswith("scan")]
    assert body is loop.body and body.graph.input_values[-1].type.shape[0] == 3  # a block's rows
    assert body.profile_report.calls == 5 * 2 and executable.profile_report.calls == 1


@needs_threads
def test_profiled_uneven_blocks_step_through_both_bodies(monkeypatch):
    """Under GRAPHC_PROFILE the blocks step from Python: 5 rows as a body of 3 and one of 2,
    whose kernels the report lists apart (`scanN.last.`); the values are the reference's."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    args = lstm_args(batch=5)
    executable = compile_graph(gc.trace(lstm, *args), CPU)
    executable.profile_printed_at_exit = False
    for got, want in zip(executable(*args), gc.jit(lstm, backend=REF)(*args)):
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-6)
    names = [r.name for r in executable.profile_report.rows]
    last = [n for n in names if ".last." in n]
    assert last and len(last) == len([n for n in names if n.startswith(last[0].split(".")[0] + ".k")])


@needs_threads
def test_blocks_of_other_row_counts_run_the_loop_compiled_for_the_first(monkeypatch):
    """A row block loop takes its shapes as arguments: the last block's fewer rows (5 rows as 3
    and 2), and the blocks of another batch size (3 rows of 6), run the loop compiled once."""
    monkeypatch.setenv("GRAPHC_NUM_THREADS", "2")
    drivers = []
    for batch in (6, 5):
        args = lstm_args(batch)
        executable = compile_graph(gc.trace(lstm, *args), CPU)
        for got, want in zip(executable(*args), gc.jit(lstm, backend=REF)(*args)):
            np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-6)
        (driver,) = [run for run, _, _ in executable.parts if isinstance(run, RowBlockDriver)]
        drivers.append(driver)
    six, five = drivers
    assert (six.rows, five.rows, five._last.body.graph.input_values[-1].type.shape[0]) == (3, 3, 2)
    assert six.source == five.source == five._last.source
    assert (five.cache_stats.compiled, five.cache_stats.hits, five.cache_stats.reused) == (0, 0, 2)


def test_an_empty_batch_runs_as_the_reference():
    """Zero rows: nothing to split (counting blocks for it once divided by zero)."""
    w = np.eye(H, dtype=np.float32)
    f = lambda h, xs: gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)  # noqa: E731
    args = (np.zeros((0, H), np.float32), np.zeros((4, 0, H), np.float32))
    for got, want in zip(gc.jit(f, backend=CPU)(*args), gc.jit(f, backend=REF)(*args)):
        assert np.asarray(got).shape == np.asarray(want).shape
