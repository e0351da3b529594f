"""The numba-cuda backend, run on Numba's CUDA simulator against the reference backend.

The simulator must be switched on (NUMBA_ENABLE_CUDASIM=1) before numba is first imported,
and other test modules import numba first: so the checks that run kernels execute in one
child process (this file run as a script), and each test asserts on that child's verdict for
one check. Code generation needs no CUDA and is tested in process.
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
CPU_LIBRARY_CASES = ["matmul", "conv2d", "conv2d_grads", "conv2d_grads_grouped", "pooling"]
TOLERANCE = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-10, atol=1e-12)}


# -- the child ------------------------------------------------------------------------------------
def compare(graph, arrays, donate=None) -> None:
    from graphc.backends.numba_cuda import compile_graph
    from graphc.backends.reference import evaluate

    got = compile_graph(graph, donate)(*arrays)
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
    from graphc.backends.numba_cpu import compile_graph as compile_cpu
    from graphc.backends.numba_cuda import compile_graph as compile_cuda

    graph, arrays = cpu.CASES["random"]()
    for g, c in zip(compile_cuda(graph)(*arrays), compile_cpu(graph)(*arrays)):
        np.testing.assert_array_equal(g, c)


def check_block_reductions() -> None:
    """Reductions long enough to share each output element among a block's threads."""
    import test_numba_cpu as cpu

    x, v = cpu.normal(3, 300), cpu.normal(300, 2)
    v[7, 1] = np.nan
    graph = cpu.build("long_reductions", [x, v], lambda b, x, v: [
        b.exp(x), b.log(b.sum(b.exp(x), axes=(1,))), b.max(v, axes=(0,)),
        b.sum(b.mul(x, x), axes=(0, 1), keepdims=True)])
    compare(graph, [x, v])


def check_max_pool_ties_and_nans() -> None:
    import test_numba_cpu as cpu

    v = np.array([[[[1, 1, 0, 2], [1, 0, 2, 2], [np.nan, 3, 3, 3], [1, np.nan, 3, 1]]]], np.float32)
    f = np.full((1, 1, 3, 3), -np.inf, np.float32)
    g, h = cpu.normal(1, 1, 2, 2), cpu.normal(1, 1, 2, 2)
    graph = cpu.build("pool_ties", [v, g, f, h], lambda b, v, g, f, h: [
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
    from graphc.backends.numba_cuda import compile_graph

    x, y = cpu.normal(3, 4), cpu.normal(3, 4)
    graph = cpu.build("update", [x, y], lambda b, x, y: [b.sub(x, b.mul(y, b.scalar_like(0.5, y))),
                                                         b.sum(y, axes=(0, 1))])
    want = x - y * np.float32(0.5)
    out = compile_graph(graph, donate={0: 0})(x, y)
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


CHECKS = {**{f"case_{name}": (lambda name=name: cpu_case(name)) for name in CPU_CASES + CPU_LIBRARY_CASES},
          "random_bits_equal_the_cpu_backend": check_random_bits_equal_the_cpu_backend,
          "block_reductions": check_block_reductions,
          "max_pool_ties_and_nans": check_max_pool_ties_and_nans,
          "small_cnn_gradient": check_small_cnn_gradient,
          "donated_inputs_are_updated_in_place": check_donated_inputs_are_updated_in_place,
          "cnn_training_losses_match_the_reference": check_cnn_training_losses_match_the_reference}


def run_checks() -> dict[str, str]:
    """Every check's verdict: 'ok' or its traceback."""
    sys.path.insert(0, str(TESTS))
    verdicts = {}
    for name, check in CHECKS.items():
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
    from graphc.backends.numba_cuda.codegen import REDUCTION_THREADS, generate
    from graphc.passes.fusion import fuse

    graph = cpu.build("reductions", [cpu.normal(3, 300), cpu.normal(3, 4)], lambda b, x, y: [
        b.sum(b.exp(x), axes=(1,)), b.sum(y, axes=(1,))])
    calls = {c.entry: c for k in fuse(graph).nodes for c in generate(k).calls}
    long, short = sorted(calls.values(), key=lambda c: -c.args[-1])
    assert long.block == (REDUCTION_THREADS,) and long.grid == (3,) and "cuda.syncthreads()" in long.source
    assert "cuda.shared" not in short.source and "cuda.gridsize(1)" in short.source


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
