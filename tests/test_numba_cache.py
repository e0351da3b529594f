"""The on-disk kernel cache: another process compiles nothing, identical kernels compile once,
kernels are reused across batch sizes, corrupt entries are detected and rebuilt.

Assertions read the cache counters (CacheStats), never timings.
"""
import glob
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from graphc.backends.numba_cpu import default_cache_dir
from graphc.lowering import compile_graph
from graphc.ir import Builder, TensorType

# A small network built and run by a separate Python process; prints its cache counters.
SCRIPT = r'''
import json, sys
import numpy as np
from graphc.lowering import compile_graph
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType

b = Builder("mlp")
x = b.add_input(TensorType((8, 12), "float32"), "x")
w = b.add_input(TensorType((12, 5), "float32"), "w")
c = b.add_input(TensorType((5,), "float32"), "c")
key = b.add_input(TensorType((2,), "int64"), "key")
h = b.relu(b.add(b.matmul(x, w), c))
keep = b.cast(b.random_bernoulli(key, p=0.8, shape=(8, 5)), dtype="float32")
e = b.exp(b.sub(h, b.max(h, axes=(1,), keepdims=True)))
b.add_output("p", b.mul(b.div(e, b.sum(e, axes=(1,), keepdims=True)), keep))
graph = b.graph
rng = np.random.default_rng(0)
args = [rng.standard_normal(v.shape).astype(v.dtype) for v in graph.input_values[:3]]
args.append(np.array([1, 2], np.int64))
executable = compile_graph(graph, "numba-cpu")
(got,) = executable(*args)
(want,) = evaluate(graph, args)
stats = executable.cache_stats
print(json.dumps({"hits": stats.hits, "misses": stats.misses, "compiled": stats.compiled,
                  "rebuilt": stats.rebuilt, "calls": sum(len(k.generated.calls) for k in executable.kernels),
                  "error": float(np.max(np.abs(got - want)))}))
'''


def run_in_new_process(cache_dir, tmp_path):
    script = tmp_path / "compile_mlp.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    """A cache directory filled by one process compiling the network."""
    cache_dir = tmp_path_factory.mktemp("kernel_cache")
    first = run_in_new_process(cache_dir, tmp_path_factory.mktemp("script"))
    assert first["misses"] == first["compiled"] > 0 and first["error"] < 1e-5
    return cache_dir


def test_second_process_finds_every_kernel_on_disk(warm_cache, tmp_path):
    second = run_in_new_process(warm_cache, tmp_path)
    assert second["compiled"] == second["misses"] == 0
    assert second["hits"] == second["calls"]
    assert second["error"] < 1e-5
    # each module's bytecode is written with it (imports need not compile it again)
    modules = {os.path.basename(p)[:-3] for p in glob.glob(str(warm_cache / "k_*.py"))}
    compiled = {os.path.basename(p).split(".")[0] for p in glob.glob(str(warm_cache / "__pycache__" / "k_*.pyc"))}
    assert modules and modules == compiled
    # and its manifest, which every load checked (a mismatch would have been rebuilt)
    manifests = {os.path.basename(p).split(".")[0] for p in glob.glob(str(warm_cache / "k_*.manifest.json"))}
    assert manifests == modules


def copy_cache(source, destination):
    """A copy keeping modification times: Numba before 0.68 stamps its index with the module
    file's mtime and size (0.68 with a hash of its text), so a plain copy is a stale cache."""
    subprocess.run(["cp", "-a", f"{source}/.", str(destination)], check=True)
    return destination


def test_corrupt_kernel_source_is_detected_and_rebuilt(warm_cache, tmp_path):
    cache_dir = copy_cache(warm_cache, tmp_path / "cache")
    victim = sorted(glob.glob(str(cache_dir / "k_*.py")))[0]
    with open(victim, "a") as f:
        f.write("\nthis is not the kernel any more\n")
    result = run_in_new_process(cache_dir, tmp_path)
    assert result["rebuilt"] == 1 and result["compiled"] == 1
    assert result["hits"] == result["calls"] - 1 and result["error"] < 1e-5


def test_corrupt_compiled_code_is_detected_and_rebuilt(warm_cache, tmp_path):
    """Detected by the kernel's manifest before Numba unpickles the file."""
    cache_dir = copy_cache(warm_cache, tmp_path / "cache")
    victim = sorted(glob.glob(str(cache_dir / "__pycache__" / "*.nbc")))[0]
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    result = run_in_new_process(cache_dir, tmp_path)
    assert result["rebuilt"] == 1 and result["compiled"] == 1
    assert result["error"] < 1e-5


def layer(batch):
    b = Builder("layer")
    x = b.add_input(TensorType((batch, 6), "float32"), "x")
    w = b.add_input(TensorType((6, 3), "float32"), "w")
    c = b.add_input(TensorType((3,), "float32"), "c")
    y = b.tanh(b.add(b.matmul(x, w), c))
    b.add_output("y", y)
    b.add_output("s", b.sum(b.square(y), axes=(0,)))
    return b.graph


def test_identical_kernels_compile_once_per_process():
    first = compile_graph(layer(4), "numba-cpu")
    second = compile_graph(layer(4), "numba-cpu")
    calls = sum(len(k.generated.calls) for k in second.kernels)
    assert second.cache_stats.reused == calls
    assert second.cache_stats.misses == second.cache_stats.hits == 0
    assert first.kernels[0].functions[0] is second.kernels[0].functions[0]


def test_kernels_are_reused_across_batch_sizes():
    compile_graph(layer(5), "numba-cpu")
    other = compile_graph(layer(9), "numba-cpu")
    assert other.cache_stats.compiled == 0 and other.cache_stats.reused > 0
    x = np.ones((9, 6), np.float32)
    y, s = other(x, np.ones((6, 3), np.float32), np.zeros(3, np.float32))
    np.testing.assert_allclose(y, np.tanh(6.0), rtol=1e-6)
    np.testing.assert_allclose(s, 9 * np.tanh(6.0) ** 2, rtol=1e-5)


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "here"))
    assert default_cache_dir() == str(tmp_path / "here")
    monkeypatch.delenv("GRAPHC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == str(tmp_path / "xdg" / "graphc")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "graphc")


def compile_tanh_chain(depths):
    """Compile x -> tanh(...tanh(x * 1.5)...).T, tanh applied `depth` times, for each depth in
    turn (one kernel each), check it against NumPy, and return the executable. Float constants
    are arguments of kernels, not part of their source: kernels differ by their depth, and
    depths no other test uses give kernels to compile."""
    b = Builder("chain")
    x = b.add_input(TensorType((3, 4), "float32"), "x")
    v = x
    for depth in depths:
        v = b.mul(v, b.scalar_like(1.5, v))
        for _ in range(depth):
            v = b.tanh(v)
        v = b.transpose(v, perm=(1, 0))
    b.add_output("y", v)
    executable = compile_graph(b.graph, "numba-cpu")
    arg = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    want = arg
    for depth in depths:
        want = want * np.float32(1.5)
        for _ in range(depth):
            want = np.tanh(want)
        want = want.T
    np.testing.assert_allclose(executable(arg)[0], want, rtol=1e-6)
    return executable


def test_worker_processes_compile_part_of_a_large_graph(monkeypatch):
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "1")
    # enough kernels that a worker pays for its start
    executable = compile_tanh_chain(range(1, 13))
    stats = executable.cache_stats
    assert stats.in_workers > 0 and stats.misses == stats.compiled
    # a kernel another test compiled (in this process or on disk) is not compiled again
    assert stats.hits + stats.misses + stats.reused == len(executable.kernels)


def test_kernels_a_dead_worker_claimed_are_compiled_by_the_parent(monkeypatch, tmp_path):
    """A worker that claims kernels and dies before compiling them loses nothing: the parent
    compiles what the worker did not report as done, and the graph runs. (A fresh-interpreter
    worker here; the forked one: test_forked_worker_*.)"""
    from graphc.backends.numba_cpu import compile_pool

    monkeypatch.setattr(compile_pool, "_can_fork", lambda: False)
    dying, claimed = tmp_path / "dying_worker.py", tmp_path / "claimed"
    dying.write_text("import os, pickle, sys\n"
                     "claims, tasks, _ = pickle.load(sys.stdin.buffer)\n"
                     "mine = 0\n"
                     "for key, *_ in tasks:\n"
                     "    try:\n"
                     "        os.close(os.open(os.path.join(claims, key), os.O_CREAT | os.O_EXCL))\n"
                     "        mine += 1\n"
                     "    except FileExistsError:\n"
                     "        pass\n"
                     f"open({str(claimed)!r}, 'w').write(str(mine))\n"
                     "os._exit(1)\n")
    monkeypatch.setattr(compile_pool, "WORKER_SCRIPT", str(dying))
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "1")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "cache"))
    executable = compile_tanh_chain(range(13, 19))
    stats = executable.cache_stats
    assert int(claimed.read_text()) > 0  # the worker took kernels from the parent
    assert stats.in_workers == 0 and stats.compiled == stats.misses == len(executable.kernels)


# Compiles a chain of a dozen small kernels with one worker in a fresh process (no thread but its
# own: the worker is a fork), where a fresh-interpreter worker could not start. argv[1] "dies":
# the forked worker claims every kernel it can, then dies without compiling any.
FORK_SCRIPT = r'''
import json, os, sys
import numpy as np
from numba import njit, prange
from graphc.backends.numba_cpu import compile_pool
from graphc.lowering import compile_graph
from graphc.ir import Builder, TensorType

compile_pool.WORKER_SCRIPT = os.devnull
forks = []
fork = os.fork
os.fork = lambda: forks.append(1) or fork()
if sys.argv[1] == "dies":
    def claim_and_die(claims, tasks):
        claimed = sum(compile_pool.claim(claims, key) for key, *_ in tasks)
        open(sys.argv[2], "w").write(str(claimed))
        os._exit(1)
    compile_pool.compile_claimed = claim_and_die
could_fork = compile_pool._can_fork()
b = Builder("chain")
x = b.add_input(TensorType((3, 4), "float32"), "x")
v = x
depths = range(int(sys.argv[3]), int(sys.argv[3]) + 12)  # kernels no other compile made
for depth in depths:
    v = b.mul(v, b.scalar_like(1.5, v))
    for _ in range(depth):
        v = b.tanh(v)
    v = b.transpose(v, perm=(1, 0))
b.add_output("y", v)
executable = compile_graph(b.graph, "numba-cpu")
arg = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
want = arg
for depth in depths:
    want = want * np.float32(1.5)
    for _ in range(depth):
        want = np.tanh(want)
    want = want.T

@njit(parallel=True)
def start_threads(a):
    for i in prange(a.shape[0]):
        a[i] += 1
start_threads(np.zeros(4))
stats = executable.cache_stats
print(json.dumps({"forks": len(forks), "could_fork": could_fork, "can_fork_after_threads": compile_pool._can_fork(),
                  "in_workers": stats.in_workers, "compiled": stats.compiled, "misses": stats.misses,
                  "kernels": len(executable.kernels),
                  "error": float(np.max(np.abs(executable(arg)[0] - want)))}))
'''


def run_fork_script(tmp_path, mode, first_depth):
    script = tmp_path / "fork_worker.py"
    script.write_text(FORK_SCRIPT)
    env = {**os.environ, "GRAPHC_CACHE_DIR": str(tmp_path / "cache"), "GRAPHC_COMPILE_WORKERS": "1"}
    done = subprocess.run([sys.executable, str(script), mode, str(tmp_path / "claimed"), str(first_depth)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_forked_worker_compiles_part_of_a_graph_until_a_thread_pool_runs(tmp_path):
    """A process running no thread of its own forks its worker (a fresh interpreter could not
    start here); once Numba's thread pool runs, it no longer forks."""
    result = run_fork_script(tmp_path, "compiles", 1)
    assert result["could_fork"] and result["forks"] == 1
    assert 0 < result["in_workers"] < result["compiled"] == result["misses"] == result["kernels"]
    assert result["error"] < 1e-6
    assert not result["can_fork_after_threads"]


def test_kernels_a_dead_forked_worker_claimed_are_compiled_by_the_parent(tmp_path):
    result = run_fork_script(tmp_path, "dies", 1)
    assert result["forks"] == 1 and int((tmp_path / "claimed").read_text()) > 0
    assert result["in_workers"] == 0 and result["compiled"] == result["misses"] == result["kernels"]
    assert result["error"] < 1e-6


def test_a_refused_fork_falls_back_to_a_fresh_interpreter(monkeypatch):
    from graphc.backends.numba_cpu import compile_pool

    def refuse():
        raise OSError(12, "Cannot allocate memory")

    monkeypatch.setattr(compile_pool, "_can_fork", lambda: True)
    monkeypatch.setattr(compile_pool.os, "fork", refuse)
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "1")
    executable = compile_tanh_chain(range(19, 27))
    assert executable.cache_stats.in_workers > 0


def test_no_fork_in_an_mpi_rank(monkeypatch):
    import types

    from graphc.backends.numba_cpu import compile_pool

    def no_thread_pool_yet():
        raise ValueError("Threading layer is not initialized.")

    monkeypatch.setattr(compile_pool, "threading", types.SimpleNamespace(active_count=lambda: 1))
    monkeypatch.setattr(compile_pool.numba, "threading_layer", no_thread_pool_yet)
    assert compile_pool._can_fork()  # as in a fresh process
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", types.SimpleNamespace(Is_initialized=lambda: True))
    assert not compile_pool._can_fork()


def test_no_fork_while_another_python_thread_runs():
    import threading

    from graphc.backends.numba_cpu.compile_pool import _can_fork

    release = threading.Event()
    thread = threading.Thread(target=release.wait)
    thread.start()
    try:
        assert not _can_fork()
    finally:
        release.set()
        thread.join()


def test_worker_compiles_a_gemm_kernel_without_importing_all_of_graphc(tmp_path):
    """The worker registers graphc's packages unexecuted (their __init__ files import the whole
    library): a kernel importing the GEMM helper still compiles into the disk cache, and the
    next load is a hit."""
    from numba import types

    from graphc.backends.numba_cpu.cache import CacheStats, KernelCache, cache_key
    from graphc.backends.numba_cpu.compile_pool import WORKER_SCRIPT
    from graphc.backends.numba_cpu.codegen_matmul import _gemm

    kernel = _gemm("graphc_test_worker_gemm", ["x0", "x1", "y0"], flops=10)
    signature = (types.Array(types.float32, 2, "C"),) * 3 + (types.int64,) * 2
    cache = KernelCache(str(tmp_path))
    key = cache_key(kernel.source)
    cache._write_source(key, kernel.source)
    probe = "print(sorted(m for m in ('networkx', 'graphc.ir') if m in sys.modules), file=sys.stderr)"
    claims = tmp_path / "claims"
    claims.mkdir()
    task = pickle.dumps((str(claims), [(key, cache.path(key), cache.module_name(key), kernel.entry,
                                        signature)], 0))
    done = subprocess.run([sys.executable, "-c", f"import runpy, sys; sys.argv = [{WORKER_SCRIPT!r}]; "
                           f"runpy.run_path({WORKER_SCRIPT!r}, run_name='__main__'); {probe}"],
                          input=task, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()
    assert pickle.loads(done.stdout) == {key: None}
    assert done.stderr.decode().strip().endswith("[]")  # neither networkx nor the IR was imported
    stats = CacheStats()
    cache.load(kernel, signature, stats)
    assert stats.hits == 1 and stats.compiled == 0


def test_workers_compile_only_the_kernels_they_claim_first(tmp_path):
    """Compiling together, every process takes the longest kernel nobody has claimed: a worker
    skips the claimed ones, compiles the rest, reports each of its claims (an error too), and
    stops when the parent has removed the claims folder."""
    from numba import types

    from graphc.backends.numba_cpu.cache import KernelCache, cache_key
    from graphc.backends.numba_cpu.compile_pool import WORKER_SCRIPT
    from graphc.backends.numba_cpu.compile_worker import claim

    claims = tmp_path / "claims"
    claims.mkdir()
    assert claim(str(claims), "k") and not claim(str(claims), "k")
    cache = KernelCache(str(tmp_path / "cache"))
    sources = {name: f"from numba import njit\n\n\n@njit(cache=True)\ndef {name}(x):\n    return x + 1\n"
               for name in ("taken", "free")}
    # a source the guard lets through (names are bound) that Numba cannot type
    sources["broken"] = "from numba import njit\n\n\n@njit(cache=True)\ndef broken(x):\n    return x + None\n"
    tasks = []
    for name, source in sources.items():
        key = cache_key(source)
        cache._write_source(key, source)
        tasks.append((key, cache.path(key), cache.module_name(key), name, (types.int64,)))
    claim(str(claims), tasks[0][0])  # "taken": claimed by another process
    run = lambda folder: pickle.loads(subprocess.run(
        [sys.executable, WORKER_SCRIPT], input=pickle.dumps((folder, tasks, 0)), capture_output=True,
        timeout=300).stdout)
    results = run(str(claims))
    assert set(results) == {tasks[1][0], tasks[2][0]} and results[tasks[1][0]] is None
    assert results[tasks[2][0]].startswith("TypingError")  # for the parent to raise when it compiles it
    assert run(str(tmp_path / "gone")) == {}




def test_kernels_compile_at_the_kernel_optimization_level_unless_numba_opt_is_set(monkeypatch):
    """Generated kernels compile at LLVM -O2 (as fast as -O3, measured; quicker to compile), in
    this process for the duration of the compile only, in workers for the whole process; a
    NUMBA_OPT the user set is kept."""
    import numba

    from graphc.backends.numba_cpu.opt_level import (KERNEL_OPT_LEVEL, kernel_optimization_level,
                                                     worker_environment)

    monkeypatch.delenv("NUMBA_OPT", raising=False)
    before = numba.config.OPT
    with kernel_optimization_level():
        assert numba.config.OPT == KERNEL_OPT_LEVEL == 2 and type(numba.config.OPT) is type(before)
    assert numba.config.OPT is before
    assert worker_environment()["NUMBA_OPT"] == "2"
    monkeypatch.setenv("NUMBA_OPT", "3")
    with kernel_optimization_level():
        assert numba.config.OPT is before
    assert worker_environment()["NUMBA_OPT"] == "3"


def test_worker_count_takes_the_idle_cores_of_the_most_idle_short_window(monkeypatch):
    """One worker per idle core besides this process's; a window with every other core idle
    ends the sampling at once, a busy one is sampled again (up to three windows)."""
    import graphc.backends.numba_cpu.compile_pool as compile_pool

    def sampled(values):
        calls = []

        def idle_cores(cores, interval=0.05):
            calls.append(cores)
            return values[len(calls) - 1]
        monkeypatch.setattr(compile_pool, "_idle_cores", idle_cores)
        return calls

    monkeypatch.delenv("GRAPHC_COMPILE_WORKERS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    calls = sampled([3.9])
    assert compile_pool._worker_count() == 3 and len(calls) == 1
    calls = sampled([1.2, 3.1, 2.0])
    assert compile_pool._worker_count() == 2 and len(calls) == 3
    calls = sampled([0.4, 4.0])
    assert compile_pool._worker_count() == 3 and len(calls) == 2
    calls = sampled([0.3, 0.9, 0.2])
    assert compile_pool._worker_count() == 0 and len(calls) == 3
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "5")
    assert compile_pool._worker_count() == 5


def test_a_forked_worker_draws_function_ids_apart_from_its_parent():
    """Numba names a parallel loop's compiled body after a Python object's id() and its count of
    compiled functions; a fork inherits both, so a worker's kernel could call a body this process
    compiled under the same name (two transposes of a test graph swapped results, under nice).
    Each process, a fork included, draws its own start of the count (compile_worker)."""
    from numba.core.bytecode import FunctionIdentity

    from graphc.backends.numba_cpu.compile_worker import draw_function_ids

    draw_function_ids()
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        try:
            draw_function_ids()
            os.write(write_end, str(next(FunctionIdentity._unique_ids)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        child_next = int(pipe.read())
    draw_function_ids()  # a no-op in the process that drew already
    here_next = next(FunctionIdentity._unique_ids)
    assert abs(child_next - here_next) > 1_000_000
