"""The numba-cuda backend, run on Numba's CUDA simulator against the reference backend.

The simulator must be switched on (NUMBA_ENABLE_CUDASIM=1) before numba is first imported,
and other test modules import numba first: so the checks that run kernels execute in one
child process (this file run as a script), and each test asserts on that child's verdict for
one check. Code generation needs no CUDA and is tested in process; the kernel cache's tests
start one simulated process per compile, as a second run of a program would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

if __name__ == "__main__":  # the child: before anything imports numba
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
# The CPU backend's differential cases (tiny shapes); the large 'reductions_parallel' is left
# out because the simulator runs every thread as a Python thread.
CPU_CASES = ["binary_broadcast", "binary_same", "binary_scalar", "cast", "constants", "indexing",
             "integer_arithmetic", "logical", "nan_and_inf", "random", "reductions",
             "reductions_float64", "shape_ops", "unary_f32", "unary_f64", "views"]
CPU_LIBRARY_CASES = ["matmul", "conv2d", "conv2d_grads", "conv2d_grads_grouped", "pooling", "cumulative",
                     "argsort", "softmax", "moments", "normalize"]
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


# -- the child ------------------------------------------------------------------------------------
def compare(graph, arrays, donate=None) -> None:
    from graphc.lowering import compile_graph
    from graphc.backends.reference import evaluate

    got = compile_graph(graph, "numba-cuda", donate)(*arrays)
    want = evaluate(graph, [np.asarray(a) for a in arrays])
    assert len(got) == len(want)
    for name, g, w in zip(graph.output_names, got, want):
        assert (g.shape, g.dtype) == (w.shape, w.dtype), (name, g.shape, g.dtype, w.shape, w.dtype)
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, equal_nan=True, err_msg=name, **TOLERANCE[w.dtype.name])
        else:
            np.testing.assert_array_equal(g, w, err_msg=name)


def cpu_case(name: str) -> None:
    import test_numba_cpu as cpu

    graph, arrays = (cpu.CASES.get(name) or cpu.BLAS_CASES[name])()
    compare(graph, arrays)


def check_random_bits_equal_the_cpu_backend() -> None:
    import test_numba_cpu as cpu
    from graphc.lowering import compile_graph

    graph, arrays = cpu.CASES["random"]()
    for g, c in zip(compile_graph(graph, "numba-cuda")(*arrays), compile_graph(graph, "numba-cpu")(*arrays)):
        np.testing.assert_array_equal(g, c)


def check_block_reductions() -> None:
    """Reductions long enough to share each output element among a block's threads."""
    import test_numba_cpu as cpu

    x, v = cpu.normal(3, 300), cpu.normal(300, 2)
    v[7, 1] = np.nan
    graph = cpu.build_graph("long_reductions", [x, v], lambda b, x, v: [
        b.exp(x), b.log(b.sum(b.exp(x), axes=(1,))), b.max(v, axes=(0,)),
        b.sum(b.mul(x, x), axes=(0, 1), keepdims=True)])
    compare(graph, [x, v])


def check_max_pool_ties_and_nans() -> None:
    import test_numba_cpu as cpu

    v = np.array([[[[1, 1, 0, 2], [1, 0, 2, 2], [np.nan, 3, 3, 3], [1, np.nan, 3, 1]]]], np.float32)
    f = np.full((1, 1, 3, 3), -np.inf, np.float32)
    g, h = cpu.normal(1, 1, 2, 2), cpu.normal(1, 1, 2, 2)
    graph = cpu.build_graph("pool_ties", [v, g, f, h], lambda b, v, g, f, h: [
        b.max_pool2d(v, kernel=2, stride=2), b.max_pool2d_grad(v, g, kernel=2, stride=2),
        b.max_pool2d(f, kernel=2, stride=2, padding=1),
        b.max_pool2d_grad(f, h, kernel=2, stride=2, padding=1)])
    compare(graph, [v, g, f, h])


def check_small_cnn_gradient() -> None:
    import test_numba_cpu as cpu
    from graphc.passes.autodiff import autodiff

    graph = cpu.small_cnn()
    arrays = [cpu.normal(*v.shape) for v in graph.input_values]
    compare(autodiff(graph, wrt=["w1", "b1", "w2", "b2"], output="loss").verify(), arrays)


def check_donated_inputs_are_updated_in_place() -> None:
    import test_numba_cpu as cpu
    from graphc.lowering import compile_graph

    x, y = cpu.normal(3, 4), cpu.normal(3, 4)
    graph = cpu.build_graph("update", [x, y], lambda b, x, y: [b.sub(x, b.mul(y, b.scalar_like(0.5, y))),
                                                         b.sum(y, axes=(0, 1))])
    want = x - y * np.float32(0.5)
    out = compile_graph(graph, "numba-cuda", donate={0: 0})(x, y)
    assert out[0] is x
    np.testing.assert_allclose(x, want, **TOLERANCE["float32"])


def train_losses(backend: str, steps: int = 3) -> list[float]:
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import nn, optim

    gc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Dropout(0.25), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int64)
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.01),
                                 (x, y), backend=backend)
    return [step(x, y) for _ in range(steps)]


def check_cnn_training_losses_match_the_reference() -> None:
    cuda, reference = train_losses("numba-cuda"), train_losses("reference")
    np.testing.assert_allclose(cuda, reference, rtol=1e-4)
    assert cuda[-1] < cuda[0]


# -- state resident on the device -----------------------------------------------------------------
def update_graph():
    """w <- w - 0.5 g (w donated), and sum(g)."""
    import test_numba_cpu as cpu

    w, g = cpu.normal(3, 4), cpu.normal(3, 4)
    return cpu.build_graph("update", [w, g], lambda b, w, g: [b.sub(w, b.mul(g, b.scalar_like(0.5, g))),
                                                        b.sum(g, axes=(0, 1))]), w, g


def check_resident_inputs_are_uploaded_once_and_synced_on_request() -> None:
    from graphc.lowering import compile_graph

    graph, w, g = update_graph()
    start = w.copy()
    executable = compile_graph(graph, "numba-cuda", donate={0: 0})
    executable.keep_on_device({0})
    executable(w, g)
    before = dict(executable.transfers)
    out = executable(w, g)
    assert out[0] is w and np.array_equal(w, start)  # stale until synced
    assert executable.transfers == {"to_device": before["to_device"] + g.nbytes,
                                    "to_host": before["to_host"] + 4}
    executable.sync_to_host()
    np.testing.assert_allclose(w, start - g, **TOLERANCE["float32"])
    w[...] = 1.0  # written on the host: the next call must upload it
    executable.invalidate(w)
    executable(w, g)
    executable.sync_to_host()
    np.testing.assert_allclose(w, 1.0 - 0.5 * g, **TOLERANCE["float32"])


def check_another_array_for_a_resident_input_is_uploaded() -> None:
    from graphc.lowering import compile_graph

    graph, w, g = update_graph()
    other, w_start, other_start = w + 10, w.copy(), w + 10
    executable = compile_graph(graph, "numba-cuda", donate={0: 0})
    executable.keep_on_device({0})
    executable(w, g)
    executable(other, g)  # w gets its pending update back before `other` takes the buffer
    np.testing.assert_allclose(w, w_start - 0.5 * g, **TOLERANCE["float32"])
    executable.sync_to_host()
    np.testing.assert_allclose(other, other_start - 0.5 * g, **TOLERANCE["float32"])


def check_a_donation_by_copy_is_copied_on_the_device() -> None:
    """w <- w.T reads w off-index while writing it: the plan copies the new value at the end."""
    import test_numba_cpu as cpu
    from graphc.lowering import compile_graph

    w = cpu.normal(4, 4)
    graph = cpu.build_graph("transposed", [w], lambda b, w: [b.transpose(w, perm=(1, 0))])
    for resident in (set(), {0}):
        array = w.copy()
        executable = compile_graph(graph, "numba-cuda", donate={0: 0})
        assert executable.plan.donated_by_copy == {0: 0}
        executable.keep_on_device(resident)
        for want in (w.T, w):
            before = executable.transfers["to_host"]
            executable(array)
            assert executable.transfers["to_host"] - before == (0 if resident else w.nbytes)
            executable.sync_to_host()
            np.testing.assert_array_equal(array, want)


def mlp_step(backend: str):
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import nn, optim

    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.25), nn.Linear(8, 3))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((4, 4)).astype(np.float32)
    y = rng.integers(0, 3, 4).astype(np.int64)
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.05),
                                 (x, y), backend=backend)
    return step, model, x, y


def assert_states_close(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


def flat_opt_state(step) -> dict:
    return {f"{n}.{k}": v for n, slots in step.opt_state.items() for k, v in slots.items()}


def check_train_step_keeps_state_on_the_device() -> None:
    step, model, x, y = mlp_step("numba-cuda")
    live = model.state_dict()  # the model's own arrays, before any step
    start = {k: v.copy() for k, v in live.items()}
    steps = 4
    step(x, y)
    before = dict(step.executable.transfers)
    for _ in range(steps - 1):
        step(x, y)
    per_step = {k: (step.executable.transfers[k] - before[k]) / (steps - 1) for k in before}
    # batch + lr + the call's RNG key (the global generator's, not kept on the device); the loss
    # and the key the graph counts on
    assert per_step == {"to_device": x.nbytes + y.nbytes + 4 + 16, "to_host": 4 + 16}
    for name, array in live.items():
        assert np.array_equal(array, start[name]), f"{name} was copied back without a request"

    reference, ref_model, _, _ = mlp_step("reference")  # seeded as the first: the same masks
    for _ in range(steps):
        reference(x, y)
    state = model.state_dict()
    assert all(state[k] is live[k] for k in live)  # the same arrays, now current
    assert_states_close(state, ref_model.state_dict())
    assert_states_close(flat_opt_state(step), flat_opt_state(reference))
    assert int(step.step_count) == steps and np.array_equal(step.rng_key, reference.rng_key)
    assert_states_close(dict(model.named_parameters()), dict(ref_model.named_parameters()))


def check_load_state_dict_between_steps_is_honoured() -> None:
    results = {}
    for backend in ("numba-cuda", "reference"):
        step, model, x, y = mlp_step(backend)
        initial = {k: v.copy() for k, v in model.state_dict().items()}
        losses = [step(x, y) for _ in range(2)]
        model.load_state_dict(initial)
        losses += [step(x, y) for _ in range(2)]
        results[backend] = losses, {k: v.copy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(results["numba-cuda"][0], results["reference"][0], rtol=1e-4)
    assert_states_close(results["numba-cuda"][1], results["reference"][1])


def check_a_new_batch_shape_takes_the_state_over() -> None:
    """Each batch signature has its own executable: the state moves to whichever runs."""
    results = {}
    for backend in ("numba-cuda", "reference"):
        step, model, x, y = mlp_step(backend)
        losses = [step(x, y), step(x[:2], y[:2]), step(x[:2], y[:2]), step(x, y)]
        results[backend] = losses, {k: v.copy() for k, v in model.state_dict().items()}
    np.testing.assert_allclose(results["numba-cuda"][0], results["reference"][0], rtol=1e-4)
    assert_states_close(results["numba-cuda"][1], results["reference"][1])


def check_inference_and_export_see_the_device_state() -> None:
    import tempfile

    import graphc as gc

    step, model, x, y = mlp_step("numba-cuda")
    reference, ref_model, _, _ = mlp_step("reference")
    infer = gc.compile(model, x, backend="reference")  # reads the model's arrays at each call

    def both(calls: int) -> None:  # each from the same key: the same dropout masks
        for one in (step, reference):
            gc.manual_seed(calls)
            for _ in range(calls):
                one(x, y)
    both(3)
    np.testing.assert_allclose(infer(x), gc.compile(ref_model, x, backend="reference")(x), rtol=1e-4)
    before = dict(step.executable.transfers)
    both(1)  # inference read the weights without making the step upload them again
    assert step.executable.transfers["to_device"] - before["to_device"] == x.nbytes + y.nbytes + 4 + 16
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "step.gcx")
        step.export(path)
        loaded = gc.load(path, backend="numba-cuda")
        ref_loaded = gc.load(path, backend="reference")
    assert_states_close(ref_loaded.state_dict(), ref_model.state_dict())
    assert loaded.step_count == 4
    loaded(x, y)
    ref_loaded(x, y)
    before = dict(loaded.executable.transfers)
    np.testing.assert_allclose(loaded(x, y), ref_loaded(x, y), rtol=1e-4)
    assert loaded.executable.transfers["to_device"] - before["to_device"] == x.nbytes + y.nbytes + 4
    assert loaded.step_count == ref_loaded.step_count == 6
    assert_states_close(loaded.state_dict(), ref_loaded.state_dict())


def _steps_on_each_backend(make_model, batches, backends=("numba-cuda", "reference")):
    """Per backend: the model after its compiled SGD step ran on each (x, ..., y) of `batches`
    (a batch whose step raises counts as refused: the error's type is recorded)."""
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import optim

    results = {}
    for backend in backends:
        gc.manual_seed(0)
        model = make_model()
        step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                     example_inputs=batches[0], backend=backend)
        outcomes = []
        for batch in batches:
            try:
                step(*batch)
                outcomes.append("ok")
            except gc.GraphcError as error:
                outcomes.append(type(error).__name__)
        results[backend] = outcomes, {k: v.copy() for k, v in model.state_dict().items()}
    return results


def check_an_index_the_step_updates_on_the_device_is_checked_as_it_is_now() -> None:
    """The check of an input index read its host array, stale while the device held the newer
    value: a pointer buffer the step advances passed the check at 0 and the kernel read
    table[3], past the end."""
    from graphc import nn

    class Ring(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("ptr", np.array(0, np.int64))
            self.register_buffer("table", np.array([1.0, 2.0, 3.0], np.float32))

        def forward(self, x):
            scale = self.table[self.ptr]
            if self.training:
                self.update_buffer("ptr", self.ptr + 1)
            return self.lin(x) * scale

    batch = (np.ones((2, 3), np.float32), np.array([0, 1]))
    results = _steps_on_each_backend(Ring, [batch] * 4)
    assert results["numba-cuda"][0] == ["ok"] * 3 + ["IndexOutOfRangeError"], results
    assert_states_close(results["numba-cuda"][1], results["reference"][1])


def check_a_step_refused_by_a_device_index_check_changes_nothing() -> None:
    """The CUDA executor kept what kernels before a failing device-side index check wrote in
    place (batch-norm running statistics) where the CPU's puts it back."""
    import graphc as gc
    from graphc import nn

    class Picks(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn, self.lin = nn.BatchNorm1d(3), nn.Linear(3, 3)

        def forward(self, x, k):
            h = self.bn(x)
            idx = gc.minimum(gc.argsort(h, dim=1)[:, 0], 0) + k  # an index computed on the device
            return self.lin(h) + h[np.arange(4), idx][:, None]

    x = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    k, y = np.zeros(4, np.int64), np.array([0, 1, 2, 0])
    bad = k.copy()
    bad[3] = 7
    results = _steps_on_each_backend(Picks, [(x, k, y), (x * 3 + 1, bad, y), (x, k, y)])
    assert results["numba-cuda"][0] == ["ok", "IndexOutOfRangeError", "ok"], results
    assert_states_close(results["numba-cuda"][1], results["reference"][1])


def check_own_step_counts_start_from_the_device_count() -> None:
    """A parameter a step found unused took its own Adam count from the host's stale count (0,
    where the device's was 3): its bias correction was wrong from then on."""
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import nn, optim

    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.aux = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            return self.a(x) + self.aux(x) if x.shape[0] == 8 else self.a(x)

    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((8, 3)).astype(np.float32), rng.integers(0, 2, 8)
    states = {}
    for backend in ("numba-cuda", "reference"):
        gc.manual_seed(0)
        model = Branch()
        step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.1),
                                     example_inputs=(x, y), backend=backend)
        for batch in [(x, y)] * 3 + [(x[:4], y[:4])] + [(x, y)] * 2:
            step(*batch)
        assert float(step.opt_state["aux.bias"]["step"]) == 5.0
        states[backend] = {k: v.copy() for k, v in model.state_dict().items()}
    assert_states_close(states["numba-cuda"], states["reference"])


def check_a_convolution_of_an_empty_batch() -> None:
    """Its im2col view divided by the column count, 0 for an empty batch."""
    import graphc as gc
    import graphc.nn.functional as F

    x, w = np.zeros((0, 3, 4, 4), np.float32), np.ones((2, 3, 3, 3), np.float32)
    assert gc.jit(lambda a, b: F.conv2d(a, b), backend="numba-cuda")(x, w).shape == (0, 2, 2, 2)
    assert gc.grad(lambda b: F.conv2d(x, b).sum(), backend="numba-cuda")(w).shape == w.shape


CHECKS = {**{f"case_{name}": (lambda name=name: cpu_case(name)) for name in CPU_CASES + CPU_LIBRARY_CASES},
          "an_index_the_step_updates_on_the_device_is_checked_as_it_is_now":
              check_an_index_the_step_updates_on_the_device_is_checked_as_it_is_now,
          "a_step_refused_by_a_device_index_check_changes_nothing":
              check_a_step_refused_by_a_device_index_check_changes_nothing,
          "own_step_counts_start_from_the_device_count": check_own_step_counts_start_from_the_device_count,
          "a_convolution_of_an_empty_batch": check_a_convolution_of_an_empty_batch,
          "random_bits_equal_the_cpu_backend": check_random_bits_equal_the_cpu_backend,
          "block_reductions": check_block_reductions,
          "max_pool_ties_and_nans": check_max_pool_ties_and_nans,
          "small_cnn_gradient": check_small_cnn_gradient,
          "donated_inputs_are_updated_in_place": check_donated_inputs_are_updated_in_place,
          "cnn_training_losses_match_the_reference": check_cnn_training_losses_match_the_reference,
          "resident_inputs_are_uploaded_once_and_synced_on_request":
              check_resident_inputs_are_uploaded_once_and_synced_on_request,
          "another_array_for_a_resident_input_is_uploaded": check_another_array_for_a_resident_input_is_uploaded,
          "a_donation_by_copy_is_copied_on_the_device": check_a_donation_by_copy_is_copied_on_the_device,
          "train_step_keeps_state_on_the_device": check_train_step_keeps_state_on_the_device,
          "load_state_dict_between_steps_is_honoured": check_load_state_dict_between_steps_is_honoured,
          "a_new_batch_shape_takes_the_state_over": check_a_new_batch_shape_takes_the_state_over,
          "inference_and_export_see_the_device_state": check_inference_and_export_see_the_device_state}


def run_checks() -> dict[str, str]:
    """Every check's verdict: 'ok' or its traceback."""
    sys.path.insert(0, str(TESTS))
    import test_numba_cpu as cpu
    verdicts = {}
    for name, check in CHECKS.items():
        cpu.rng = np.random.default_rng(0)  # as each CPU test draws: values never depend on order
        try:
            with np.errstate(all="ignore"):  # the simulator runs the RNG's wrapping uint64 math in NumPy
                check()
            verdicts[name] = "ok"
        except Exception:
            verdicts[name] = traceback.format_exc()
    return verdicts


# -- the tests ------------------------------------------------------------------------------------
def _child(env_update: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_update}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=TESTS.parent)


@pytest.fixture(scope="module")
def verdicts() -> dict[str, str]:
    pytest.importorskip("numba.cuda")
    done = _child({"NUMBA_ENABLE_CUDASIM": "1"}, str(Path(__file__).resolve()))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("check", sorted(CHECKS))
def test_simulated_kernels_match_the_reference(verdicts, check):
    assert verdicts[check] == "ok", verdicts[check]


def test_without_a_gpu_the_backend_is_unavailable_and_the_registry_says_why():
    pytest.importorskip("numba.cuda")
    script = ("import numpy as np\n"
              "from graphc.backends import available_backends, get_backend\n"
              "from graphc.backends.numba_cuda import is_available, unavailable_reason\n"
              "from graphc.ir.errors import GraphcError\n"
              "assert not is_available() and 'NUMBA_ENABLE_CUDASIM' in unavailable_reason()\n"
              "assert 'numba-cuda' not in available_backends()\n"
              "try:\n    get_backend('numba-cuda')\nexcept GraphcError as e:\n    print(e)\n")
    done = _child({"NUMBA_ENABLE_CUDASIM": "0"}, "-c", script, timeout=120)
    if "cuda.is_available" in done.stderr or (done.returncode == 0 and "usable" not in done.stdout):
        pytest.skip("a CUDA GPU is present")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not usable on this machine" in done.stdout and "reference" in done.stdout


def test_generated_sources_are_cuda_kernels():
    sys.path.insert(0, str(TESTS))
    import test_numba_cpu as cpu
    from graphc.backends.numba_cuda.codegen import generate
    from graphc.passes.fusion import fuse

    graph, _ = cpu.BLAS_CASES["matmul"]()
    sources = [generate(k) for k in fuse(graph).nodes if k.attrs["pattern"] not in ("view", "constant")]
    text = "\n".join(s.source for s in sources)
    assert "@cuda.jit" in text and "cuda.shared.array" in text and "cuda.syncthreads()" in text
    epilogue = [c for s in sources for c in s.calls if c.entry.endswith("_epilogue")]
    assert epilogue and "cuda.gridsize(1)" in epilogue[0].source and "prange" not in text
    assert [c.gemm for s in sources for c in s.calls if c.entry == "matmul"] == [(False, False)] * 3


def test_long_reductions_share_each_output_among_a_block():
    sys.path.insert(0, str(TESTS))
    import test_numba_cpu as cpu
    from graphc.backends.numba_cuda.codegen import MAX_BLOCKS, REDUCTION_THREADS, generate
    from graphc.passes.fusion import fuse

    graph = cpu.build_graph("reductions", [cpu.normal(3, 300), cpu.normal(3, 4)], lambda b, x, y: [
        b.sum(b.exp(x), axes=(1,)), b.sum(y, axes=(1,))])
    calls = {c.entry: c for k in fuse(graph).nodes for c in generate(k).calls}
    long, short = sorted(calls.values(), key=lambda c: -c.args[-1])
    # One block per output, up to MAX_BLOCKS (2 when the codegen was imported under the simulator).
    assert long.block == (REDUCTION_THREADS,) and long.grid == (min(3, MAX_BLOCKS),)
    assert "cuda.syncthreads()" in long.source
    assert "cuda.shared" not in short.source and "cuda.gridsize(1)" in short.source


# -- the kernel cache, one simulated process per compile ------------------------------------------
CACHE_SCRIPT = r'''
import json
import numpy as np
from graphc.lowering import compile_graph
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType

b = Builder("mlp")
x = b.add_input(TensorType((4, 6), "float32"), "x")
w = b.add_input(TensorType((6, 3), "float32"), "w")
key = b.add_input(TensorType((2,), "int64"), "key")
h = b.relu(b.matmul(x, w))
keep = b.cast(b.random_bernoulli(key, p=0.8, shape=(4, 3)), dtype="float32")
e = b.exp(b.sub(h, b.max(h, axes=(1,), keepdims=True)))
b.add_output("p", b.mul(b.div(e, b.sum(e, axes=(1,), keepdims=True)), keep))
rng = np.random.default_rng(0)
args = [rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32),
        np.array([1, 2], np.int64)]
with np.errstate(all="ignore"):  # the simulator runs the RNG's wrapping uint64 math in NumPy
    executable = compile_graph(b.graph, "numba-cuda")
    (got,) = executable(*args)
(want,) = evaluate(b.graph, args)
stats = executable.cache_stats
print(json.dumps({"hits": stats.hits, "misses": stats.misses, "compiled": stats.compiled,
                  "rebuilt": stats.rebuilt, "reused": stats.reused,
                  "calls": sum(len(k.calls) for k in executable.kernels),
                  "error": float(np.max(np.abs(got - want)))}))
'''


def compile_in_new_process(cache_dir: Path) -> dict:
    done = _child({"NUMBA_ENABLE_CUDASIM": "1", "GRAPHC_CACHE_DIR": str(cache_dir)}, "-c", CACHE_SCRIPT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory) -> Path:
    """A cache directory filled by one simulated process compiling the network."""
    pytest.importorskip("numba.cuda")
    cache_dir = tmp_path_factory.mktemp("cuda_kernel_cache")
    first = compile_in_new_process(cache_dir)
    assert first["misses"] == first["compiled"] > 0 and first["hits"] == 0 and first["error"] < 1e-5
    assert first["misses"] + first["reused"] == first["calls"]
    return cache_dir


def test_second_process_finds_every_kernel_in_the_cache(warm_cache):
    second = compile_in_new_process(warm_cache)
    assert second["misses"] == second["compiled"] == 0
    assert second["hits"] + second["reused"] == second["calls"] and second["error"] < 1e-5


def test_corrupt_cached_kernel_is_detected_and_rebuilt(warm_cache, tmp_path):
    subprocess.run(["cp", "-r", f"{warm_cache}/.", str(tmp_path)], check=True)
    victim = sorted(tmp_path.glob("k_*.py"))[0]
    with open(victim, "a") as f:
        f.write("\nthis is not the kernel any more\n")
    result = compile_in_new_process(tmp_path)
    assert result["rebuilt"] == 1 and result["misses"] == result["compiled"] == 1
    assert result["hits"] + result["reused"] == result["calls"] - 1 and result["error"] < 1e-5
    assert "this is not the kernel" not in victim.read_text()


class FakeGpuKernel:
    """numba-cuda's dispatcher as the GPU cache path uses it, its disk cache one index file:
    `compile` loads a signature listed there (a cache hit) and compiles and lists others; an
    index it cannot read raises, as unpickling a damaged one does."""

    def __init__(self, index: Path) -> None:
        from collections import Counter
        from types import SimpleNamespace

        self.index, self.overloads = index, {}
        self.stats = SimpleNamespace(cache_path=str(index.parent), cache_hits=Counter())

    def compile(self, signature: tuple) -> None:
        listed = self.index.read_text().splitlines() if self.index.exists() else []
        if "garbage" in listed:
            raise EOFError("truncated cache file")
        if str(signature) in listed:
            self.stats.cache_hits[signature] += 1
        else:
            self.index.write_text("\n".join(listed + [str(signature)]))
        self.overloads[signature] = "code"


def test_gpu_cache_counts_numba_cuda_hits_and_rebuilds_damaged_code(monkeypatch, tmp_path):
    """The GPU branch of the kernel cache, which the simulator never takes, on fake kernels: a
    compiled file that is not the one the kernel's manifest records is purged before
    numba-cuda would load it."""
    pytest.importorskip("numba.cuda")
    from numba import types

    from graphc.backends.kernel_files import KernelCacheWarning
    from graphc.backends.numba_cpu import CacheStats
    from graphc.backends.numba_cuda import cache
    from graphc.backends.numba_cuda.codegen import CudaCall

    call = CudaCall("from numba import cuda\n\n\n@cuda.jit(cache=True)\ndef k(x):\n    pass\n", "k",
                    ("x0",), (1,), (1,))
    key = cache.cache_key(call.source)
    index = tmp_path / "__pycache__" / f"k_{key}.k-1.py311.nbi"  # beside the module's bytecode
    monkeypatch.setattr(cache, "SIMULATED", False)
    monkeypatch.setattr(cache.CudaKernelCache, "_import", lambda self, key, entry: FakeGpuKernel(index))
    signature = (types.Array(types.float32, 1, "C"),)

    def load_in_a_new_process() -> CacheStats:
        stats = CacheStats()
        cache.CudaKernelCache(str(tmp_path)).load(call, signature, stats)
        return stats

    assert (load_in_a_new_process().misses, load_in_a_new_process().hits) == (1, 1)
    index.write_text("garbage")
    with pytest.warns(KernelCacheWarning, match="damaged"):
        rebuilt = load_in_a_new_process()
    assert (rebuilt.rebuilt, rebuilt.misses, rebuilt.hits) == (1, 1, 0)
    assert "garbage" not in index.read_text() and (tmp_path / f"k_{key}.py").exists()
    assert load_in_a_new_process().hits == 1


def test_kernel_cache_key_covers_the_numba_cuda_version():
    pytest.importorskip("numba.cuda")
    from importlib.metadata import version

    from graphc.backends.numba_cuda.cache import VERSION_TAG
    assert f"numba-cuda {version('numba-cuda')}" in VERSION_TAG


def test_cublas_matmul_reads_transposed_operands_as_views():
    """The cuBLAS path, with NumPy standing in for CuPy (same asarray/matmul/swapaxes API)."""
    from graphc.backends.numba_cuda.executor import _cublas_matmul

    rng = np.random.default_rng(0)
    a_stored, b = rng.standard_normal((4, 3)), rng.standard_normal((2, 5, 4))
    out = np.empty((2, 3, 5))
    _cublas_matmul(np, (True, True))(a_stored, b, out)
    np.testing.assert_allclose(out, a_stored.T @ b.swapaxes(-1, -2))


if __name__ == "__main__":
    print(json.dumps(run_checks()))
