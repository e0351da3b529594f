"""The compiled scan driver on numba-cpu (backends/numba_cpu/driver.py): values and gradients as
the reference backend's, with no Python per step, compiled once whatever the trip count."""
import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
from graphc.backends.numba_cpu.driver import ScanDriver
from graphc.backends.numba_cpu.executor import Executable
from graphc.ir import IndexOutOfRangeError
from graphc.lowering import compile_graph
from graphc.scan_lowering import ScanLoop

CPU, REF = "numba-cpu", "reference"
rng = np.random.default_rng(7)


def f32(*shape):
    return rng.normal(size=shape).astype(np.float32)


@pytest.fixture
def body_calls(monkeypatch):
    """How often a scan body's executable and the Python loop were called, by kind."""
    calls = {"body executable": 0, "python loop": 0}
    executable_call, loop_call = Executable.__call__, ScanLoop.__call__

    def counted_executable(self, *args):
        calls["body executable"] += self.graph.name.endswith("_body")
        return executable_call(self, *args)

    def counted_loop(self, args):
        calls["python loop"] += 1
        return loop_call(self, args)
    monkeypatch.setattr(Executable, "__call__", counted_executable)
    monkeypatch.setattr(ScanLoop, "__call__", counted_loop)
    return calls


def close(got, want):
    for g, w in zip(gc.tree.flatten(got)[0], gc.tree.flatten(want)[0]):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


def drivers(executable):
    return [run for run, _, _ in executable.parts if isinstance(run, ScanDriver)]


def pytree_scan(state, xs, w, reverse=False):
    """Carries and per-step inputs and outputs as pytrees; a carry returned unchanged, one value
    returned twice, an input returned as an output, a per-step output of shape ()."""
    def step(carry, x):
        h, (count, fixed) = carry["h"], carry["rest"]
        h = (h @ w + x["a"] * x["b"]).tanh()
        return {"h": h, "rest": (count + 1.0, fixed)}, (h, h.sum(), x["a"], h)
    return gc.scan(step, state, xs, reverse=reverse)


def pytree_loss(h, count, fixed, a, b, w, reverse=False):
    last, (hs, sums, a_again, hs_again) = pytree_scan({"h": h, "rest": (count, fixed)},
                                                      {"a": a, "b": b}, w, reverse)
    return ((last["h"] ** 2).sum() + last["rest"][0] * last["rest"][1].sum() + (hs * hs_again).sum()
            + (sums * np.arange(1.0, 6.0, dtype=np.float32)).sum() + (a_again * a_again).sum())


@pytest.mark.slow  # 15-30 s on the busy 2-core machine (gradient kernels of a pytree body)
@pytest.mark.parametrize("reverse", [False, True])
def test_values_and_gradients_of_a_pytree_scan_match_the_reference(reverse, body_calls):
    args = (f32(2, 3), np.float32(0.5), f32(3), f32(5, 2, 3), f32(5, 2, 3), f32(3, 3))
    loss = lambda *a: pytree_loss(*a, reverse=reverse)  # noqa: E731
    want = gc.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), backend=REF)(*args)
    got = gc.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5), backend=CPU)(*args)
    close(got, want)
    close(gc.jit(lambda *a: pytree_scan({"h": a[0], "rest": (a[1], a[2])}, {"a": a[3], "b": a[4]}, a[5],
                                        reverse), backend=CPU)(*args),
          gc.jit(lambda *a: pytree_scan({"h": a[0], "rest": (a[1], a[2])}, {"a": a[3], "b": a[4]}, a[5],
                                        reverse), backend=REF)(*args))
    assert body_calls == {"body executable": 0, "python loop": 0}


def test_a_one_step_scan_and_its_gradient(body_calls):
    def loss(h, xs, w):
        last, ys = gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)
        return (last * ys[0]).sum()
    args = (f32(2, 3), f32(1, 2, 3), f32(3, 3))
    close(gc.value_and_grad(loss, argnums=(0, 1, 2), backend=CPU)(*args),
          gc.value_and_grad(loss, argnums=(0, 1, 2), backend=REF)(*args))
    assert body_calls == {"body executable": 0, "python loop": 0}


def test_a_scan_in_a_scan_runs_its_inner_loops_compiled(body_calls):
    """The outer body holds a scan, so it is no single executable: the outer loop steps from
    Python, each step running the inner scan's driver."""
    def f(h, xss, w):
        def outer(carry, xs):
            inner_last, inner_ys = gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, carry, xs)
            return inner_last, inner_ys.sum(0)
        return gc.scan(outer, h, xss)
    args = (f32(2, 3), f32(3, 4, 2, 3), f32(3, 3))
    close(gc.jit(f, backend=CPU)(*args), gc.jit(f, backend=REF)(*args))
    assert body_calls == {"body executable": 0, "python loop": 1}


@pytest.mark.slow  # ~15 s each on the busy 2-core machine
@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
def test_recurrent_layers_on_scan_train_as_on_the_reference(cell, body_calls):
    """One SGD step: the updated parameters are the gradients', so they match only if the
    forward and backward scans do."""
    x, target = f32(6, 2, 3), f32(2, 4)
    states = []
    for backend in (REF, CPU):
        gc.manual_seed(1)
        layer = getattr(nn, cell)(3, 4, unroll=False)
        step = gc.compile_train_step(layer, lambda out, t: ((out[0][-1] - t) ** 2).mean(),
                                     gc.optim.SGD(layer.parameters(), lr=0.5), [x, target], backend=backend)
        loss = step(x, target)
        states.append((loss, {k: np.array(v) for k, v in layer.state_dict().items()}))
    (want_loss, want), (got_loss, got) = states
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert body_calls["python loop"] == 0


def test_the_driver_compiles_once_whatever_the_trip_count():
    """Lengths 4 and 64 compile the same body kernels and the same driver source, once each;
    the driver's calls reuse the kernels' compiled code (no new overload)."""
    w = f32(3, 3)

    def f(h, xs):
        return gc.scan(lambda c, x: ((c @ w + x).tanh(), c.sum()), h, xs)
    compiled = []
    for length in (4, 64):
        h, xs = f32(2, 3), f32(length, 2, 3)
        executable = compile_graph(gc.trace(f, h, xs), CPU)
        (driver,) = drivers(executable)
        kernels = [fn for k in driver.body.kernels for fn in k.functions]
        overloads = [len(fn.overloads) for fn in kernels]
        got = executable(h, xs)
        close(got, gc.jit(f, backend=REF)(h, xs))
        assert [len(fn.overloads) for fn in kernels] == overloads
        assert len(driver._driver.overloads) == 1
        compiled.append((driver.source, len(driver.body.kernels)))
    assert compiled[0] == compiled[1]


def test_a_body_with_index_checks_steps_from_python_and_still_checks(body_calls):
    """Index checks are Python, run before the kernels that read the indices: such a body keeps
    the Python loop, and a bad id still stops the step naming the op."""
    table = f32(5, 3)

    def f(h, ids):
        return gc.scan(lambda c, i: ((c + gc.gather(table, i)).tanh(),) * 2, h, ids)
    h, ids = f32(2, 3), np.array([[0, 4], [3, 1], [2, 2]], np.int64)
    run = gc.jit(f, backend=CPU)
    close(run(h, ids), gc.jit(f, backend=REF)(h, ids))
    assert body_calls["python loop"] == 1
    with pytest.raises(IndexOutOfRangeError, match="gather"):
        run(h, np.array([[0, 4], [3, 5], [2, 2]], np.int64))


def test_profiling_times_the_body_kernels_step_by_step(monkeypatch, body_calls):
    """GRAPHC_PROFILE times each kernel call from Python, so the body keeps the Python loop and
    its profile counts every step (of every row block, where the rows run in blocks: 2 of 1 row
    with 2 threads). The program's report counts one call."""
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    w = f32(3, 3)

    def f(h, xs):
        return gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)
    h, xs = f32(2, 3), f32(4, 2, 3)
    executable = compile_graph(gc.trace(f, h, xs), CPU)
    close(executable(h, xs), gc.jit(f, backend=REF)(h, xs))
    (loop,) = [run for run, _, _ in executable.parts if isinstance(run, ScanLoop)]
    steps = 4 * len(loop.blocks)
    assert not drivers(executable) and loop.body.profile_report.calls == steps
    assert body_calls == {"body executable": steps, "python loop": 1}
    assert executable.profile_report.calls == 1


def _scanned_tanh_layer(steps):
    w = f32(3, 3)

    def f(h, xs):
        last, hs = gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)
        return last, (hs * 2.0).sum()
    return f, (f32(2, 3), f32(steps, 2, 3))


def _body_row(report):
    (row,) = [r for r in report.rows if r.name.startswith("scan") and r.pattern == "library"]
    return row


def test_the_profile_of_a_program_with_scans_counts_each_body_kernel_once_per_step(monkeypatch):
    """GRAPHC_PROFILE's report of a program cut at its scans holds the kernels of every part and
    body, named after them, per call of the program: a body kernel's time and FLOPs are those
    of all its steps. It is the only table printed at exit."""
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    f, args = _scanned_tanh_layer(steps=5)
    executable = compile_graph(gc.trace(f, *args), CPU)
    for _ in range(3):
        close(executable(*args), gc.jit(f, backend=REF)(*args))
    report = executable.profile_report
    row = _body_row(report)
    assert report.calls == 3 and row.flops == 5 * (2 * 2 * 3 * 3 + 2 * 6)  # product, add, tanh
    assert {r.name.split(".")[0] for r in report.rows} == {"scan1", "part2"}
    assert all(r.seconds > 0 for r in report.rows)
    assert not any(piece.profile_printed_at_exit for _, piece, _ in executable.pieces)
    assert executable.profile_printed_at_exit


def test_profiling_a_program_with_scans_on_demand_steps_its_scans_then_restores_the_drivers():
    """profile(*args) times the body kernels, which a compiled driver runs out of sight, by
    stepping the scans from Python meanwhile; afterwards the drivers run again, unprofiled."""
    f, args = _scanned_tanh_layer(steps=4)
    executable = compile_graph(gc.trace(f, *args), CPU)
    (driver,) = drivers(executable)
    assert executable.profile_report is None
    report = executable.profile(*args, repeat=2)
    assert report.calls == 2 and _body_row(report).seconds > 0
    assert drivers(executable) == [driver] and executable.profile_report is None
    close(executable(*args), gc.jit(f, backend=REF)(*args))


_CHILD = """
import numpy as np, graphc as gc
from graphc.lowering import compile_graph
from graphc.backends.numba_cpu.driver import ScanDriver
w = np.linspace(-1, 1, 9, dtype=np.float32).reshape(3, 3)
def f(h, xs):
    return gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)
h, xs = np.ones((2, 3), np.float32), np.linspace(0, 1, 30, dtype=np.float32).reshape(5, 2, 3)
executable = compile_graph(gc.trace(f, h, xs), "numba-cpu")
got = executable(h, xs)
want = gc.jit(f, backend="reference")(h, xs)
assert all(np.allclose(g, v, atol=1e-6) for g, v in zip(got, want))
(driver,) = [run for run, _, _ in executable.parts if isinstance(run, ScanDriver)]
print("driver", driver.cache_stats.hits, driver.cache_stats.misses)
"""


@pytest.mark.slow  # two processes, the first compiling every kernel: ~16 s on the busy machine
def test_a_later_process_loads_the_driver_from_the_disk_cache(tmp_path):
    """The cached driver calls the kernels by their symbols: a second process, which loads the
    kernels from the cache too, runs it without compiling it (with 2 threads, in two row blocks
    of one row: its launcher calls the block loop by its symbol too)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                           timeout=300) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr[-3000:]
    # (a row block driver loads two modules: the block loop and the launcher running blocks)
    (first_hits, compiled), (hits, misses) = [map(int, run.stdout.split()[-2:]) for run in runs]
    assert first_hits == 0 and compiled in (1, 2) and (hits, misses) == (compiled, 0)


def second_scan(h, ys, w, write_first):
    """A scan over the stack `ys` of another: its per-step output z_t (ys[t]'s type) is written
    after the last read of ys[t] (by a product of the new carry), or with `write_first` before
    it (the product of the old carry, then read with ys[t])."""
    def step(c, y):
        if write_first:
            z = c @ w
            return (z * y).tanh(), z
        c = (c * y).tanh()
        return c, c @ w
    return gc.scan(step, h, ys)


@pytest.mark.parametrize("write_first", [False, True])
@pytest.mark.parametrize("read_after", [False, True])
def test_a_stacked_output_is_written_over_a_dying_stacked_input(write_first, read_after, body_calls):
    """The second scan may write zs into the first's ys only where ys is read by nothing after
    it and every step reads ys[t] before it writes zs[t]; the values are the reference's either
    way."""
    def f(h, xs, w):
        _, ys = gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)
        last, zs = second_scan(h, ys, w, write_first)
        return (last, zs, ys * 2.0) if read_after else (last, zs)
    args = (f32(2, 3), f32(6, 2, 3), f32(3, 3))
    executable = compile_graph(gc.trace(f, *args), CPU)
    first, second = drivers(executable)
    assert first.overwritable == frozenset()  # xs is the caller's
    ys_position = 2  # (w, the carry, ys)
    assert second.overwritable == (frozenset() if read_after else {ys_position})
    assert second._shareable == ([] if write_first else [(0, 0)])
    for _ in range(2):  # the second call gets fresh stacks again
        close(executable(*args), gc.jit(f, backend=REF)(*args))
    assert body_calls["python loop"] == 0


def test_stacks_not_returned_are_used_again_and_returned_ones_are_not(body_calls):
    """The scans' stacked outputs the caller does not get (here ys, read by the loss and the
    second scan) are kept for the next call; a returned stack (zs, and a view of ys) never is:
    the first call's results stay as they were after the second call."""
    def f(h, xs, w):
        _, ys = gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, xs)
        last, zs = second_scan(h, ys, w, write_first=True)
        return last, zs, ys.sum(), ys[1:3].reshape(4, 3)
    executable = compile_graph(gc.trace(f, f32(2, 3), f32(6, 2, 3), f32(3, 3)), CPU)
    calls = [(f32(2, 3), f32(6, 2, 3), f32(3, 3)) for _ in range(3)]
    results = [executable(*args) for args in calls]
    kept = [a for spare in executable._spare.values() for a in spare]
    assert kept and not any(np.may_share_memory(a, r) for a in kept for out in results for r in out)
    for args, got in zip(calls, results):
        close(got, gc.jit(f, backend=REF)(*args))
    assert body_calls["python loop"] == 0


def _scalar_carry_scan():
    w = np.eye(3, dtype=np.float32)

    def f(h, n, xs, ks):
        def step(c, x):
            h, n = c
            return ((h @ w + x[0]).tanh(), n + x[1]), n * 2.0
        return gc.scan(step, (h, n), (xs, ks))
    return f, (f32(2, 3), np.float32(0.5), f32(4, 2, 3), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("how", ["profile()", "GRAPHC_PROFILE"])
def test_a_scan_with_a_carry_and_steps_of_shape_nothing_steps_from_python_as_the_reference(how, monkeypatch):
    """Stepped from Python (a profile), a 0-d carry and per-step input and output are passed and
    stored whole (the stepped loop once sliced every array by its rows, which a 0-d one lacks)."""
    if how == "GRAPHC_PROFILE":
        monkeypatch.setenv("GRAPHC_PROFILE", "1")
    f, args = _scalar_carry_scan()
    executable = compile_graph(gc.trace(f, *args), CPU)
    want = gc.jit(f, backend=REF)(*args)
    if how == "profile()":
        assert executable.profile(*args, repeat=1).calls == 1
    close(executable(*args), want)


def test_values_only_later_parts_read_stay_in_the_part_memory_and_the_callers_are_copied():
    """A part runs once a call, so what only later parts of the same call read may stay in its
    arena (an LSTM's input projection, 3.7 MiB a step on lstm-28, was copied out every call);
    what the caller gets is still copied, so the first call's results outlive the second."""
    def f(h, xs, w):
        # part 0: a product over every step, viewed as steps (in the part's arena), read by the
        # scan and the last part; and a view of another returned and read by the last part
        projected = (xs.reshape(10, 3) @ w).reshape(5, 2, 3)
        scaled = (xs.reshape(10, 3) @ w.T).reshape(5, 2, 3)
        last, ys = gc.scan(lambda c, x: ((c @ w + x).tanh(),) * 2, h, projected)
        return last, ys * projected, scaled, scaled.sum() + projected.sum()
    calls = [(f32(2, 3), f32(5, 2, 3), f32(3, 3)) for _ in range(2)]
    executable = compile_graph(gc.trace(f, *calls[0]), CPU)
    _, inputs, outputs = executable.parts[0]
    part = executable.pieces[0][1]
    returned = set(executable.graph.output_values)
    assert part.uncopied_outputs and part.uncopied_outputs <= {i for i, v in enumerate(outputs) if v not in returned}
    values = part(*[dict(zip(executable.graph.input_values, calls[0]))[v] for v in inputs])
    in_memory = {i for i, value in enumerate(values) if np.may_share_memory(value, part._memory)}
    assert in_memory and in_memory <= part.uncopied_outputs
    assert any(v in returned for v in outputs)
    results = [executable(*args) for args in calls]
    for args, got in zip(calls, results):
        close(got, gc.jit(f, backend=REF)(*args))


def _updates_after_the_scan(u, h, xs):
    last, ys = gc.scan(lambda c, x: ((c @ u + x).tanh(),) * 2, h, xs)
    return u - 0.1 * ys.sum(axis=(0, 1)) * last.sum(), last


def _updates_before_the_scan(u, h, xs):
    new_u = u * 0.5 + 1.0  # the first part's, while the scan reads the old u after it
    last, _ = gc.scan(lambda c, x: ((c @ u + x).tanh(),) * 2, h, xs)
    return new_u, last + new_u.sum()


def _updates_after_reading_a_view(u, h, xs):
    flat = u.reshape(9)  # the first part's: a view of u, which the last part reads
    last, _ = gc.scan(lambda c, x: ((c * 0.5 + x).tanh(),) * 2, h, xs)
    return u * 0.5 + 1.0, last + flat.sum()


@pytest.mark.parametrize("f, in_place", [(_updates_after_the_scan, True), (_updates_before_the_scan, False),
                                         (_updates_after_reading_a_view, True)])
def test_a_donated_input_is_written_by_the_part_computing_its_new_value_unless_read_later(f, in_place):
    """A donated input (a parameter a training step updates) is written in place by the part
    that computes its new value, when nothing after that part reads it; else it is copied in
    at the end of the call, after every reader. Either way the caller's array holds the new
    value and the results are the reference's. (A view of it an earlier part hands on is a
    copy: the view once read the new value.)"""
    args = (f32(3, 3), f32(2, 3), f32(4, 2, 3))
    executable = compile_graph(gc.trace(f, *args), CPU, donate={0: 0})
    (last_part,) = [e for label, e, _ in executable.pieces if label == f"part{len(executable.parts) - 1}"]
    first_part = executable.pieces[0][1]
    writer = last_part if in_place else first_part
    assert bool(writer.plan.donated_in_place or writer.plan.donated_by_copy) == in_place
    want = gc.jit(f, backend=REF)(*[a.copy() for a in args])
    u = args[0]
    got = executable(*args)
    assert got[0] is u
    close(got, want)


def _updates_before_a_checked_gather(u, h, xs, ids, table):
    new_u = u * 0.5 + 1.0  # the first part's; nothing after it reads u
    last, _ = gc.scan(lambda c, x: ((c * 0.5 + x).tanh(),) * 2, h, xs)
    return new_u, last + gc.gather(table, ids, axis=0)


@pytest.mark.parametrize("backend", [CPU, REF])
def test_a_call_failing_on_an_index_after_a_part_leaves_its_donated_inputs_unchanged(backend):
    """An index checked after the part computing a donated input's new value (a bad id read
    after a scan) fails the call: the part must not have written the input in place."""
    args = [f32(3, 3), f32(2, 3), f32(4, 2, 3), np.array([0, 4]), f32(5, 3)]
    executable = compile_graph(gc.trace(_updates_before_a_checked_gather, *args), backend, donate={0: 0})
    u = args[0]
    before = u.copy()
    with pytest.raises(IndexOutOfRangeError, match="gather: index 9"):
        executable(*args[:3], np.array([0, 9]), args[4])
    np.testing.assert_array_equal(u, before)
    want = gc.jit(_updates_before_a_checked_gather, backend=REF)(*[a.copy() for a in args])
    close(executable(*args), want)
    np.testing.assert_array_equal(u, before * 0.5 + 1.0)


def _swaps(u, v, h, xs):
    last, _ = gc.scan(lambda c, x: ((c * 0.5 + x).tanh(),) * 2, h, xs)
    return v, u, last


@pytest.mark.parametrize("backend", [CPU, REF])
def test_donated_inputs_whose_new_values_swap_them_are_swapped(backend):
    """u' = v and v' = u, both donated: each result is read before the other's buffer is
    written (one at a time, v' read u's buffer after u' overwrote it)."""
    u, v = f32(3, 3), f32(3, 3)
    old_u, old_v = u.copy(), v.copy()
    executable = compile_graph(gc.trace(_swaps, u, v, f32(3, 3), f32(4, 3, 3)), backend, donate={0: 0, 1: 1})
    executable(u, v, f32(3, 3), f32(4, 3, 3))
    np.testing.assert_array_equal(u, old_v)
    np.testing.assert_array_equal(v, old_u)


def test_a_training_step_with_scans_shows_the_memory_of_each_part_and_loop(tmp_path, capsys):
    """step.memory_plan of a program with scans: each compiled part's and loop body's arena
    (a body run in row blocks once per block) and the loops' stacks, summed; `graphc info`
    shows it for the export."""
    from graphc import optim
    from graphc.cli import main
    from graphc.scan_lowering import SegmentedExecutable, SegmentedMemoryPlan
    gc.manual_seed(0)
    model = nn.LSTM(3, 8, unroll=False)
    x, target = f32(5, 4, 3), f32(4, 8)
    step = gc.compile_train_step(model, lambda out, t: ((out[0][-1] - t) ** 2).mean(),
                                 optim.SGD(model.parameters(), lr=0.1), (x, target), backend=CPU)
    step(x, target)
    assert isinstance(step.executable, SegmentedExecutable)
    plan = step.memory_plan
    assert isinstance(plan, SegmentedMemoryPlan)
    labels = [label for label, _, _ in plan.plans]
    assert [label for label in labels if label.startswith("scan")] == ["scan1", "scan3"]
    assert plan.stack_bytes > 0 and plan.peak_bytes == plan.stack_bytes + sum(
        p.peak_bytes * copies for _, p, copies in plan.plans)
    summary = plan.summary()
    assert all(f"  {label}: arena" in summary for label in labels)
    path = str(tmp_path / "lstm.gcx")
    step.export(path)
    assert main(["info", path]) == 0
    assert f"arena: peak {plan.peak_bytes:,} bytes" in capsys.readouterr().out
