"""A large model's first call runs serial stand-ins while its parallel kernels compile in a
background worker (executor.serial_stand_ins): the values are the final kernels' (up to the
rounding of another summation order), the switch happens between calls, a failed background
compile leaves the stand-ins running, and the worker goes with its executable. The models are
test_batch_polymorphic's, with their parallel threshold lowered and the stand-ins' estimate
threshold at zero, each in a kernel cache of its own."""
from __future__ import annotations

import gc as garbage_collector
import multiprocessing
import os
import sys
import time
from types import SimpleNamespace

import numba
import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.ir import Builder, TensorType
from graphc.ir.memory import Storage
from graphc.passes import FUSION
from graphc.backends.numba_cpu import executor, get_cache, lower
from graphc.backends.numba_cpu.codegen_common import always_parallel
from graphc.backends.numba_cpu.codegen_winograd import ENTRY as WINOGRAD
from graphc.backends.numba_cpu.compile_pool import BACKGROUND_NICENESS
from test_batch_polymorphic import MODELS, batch, isolated_with_low_threshold

pytestmark = pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="no parallel kernels on one thread")


@pytest.fixture
def background(monkeypatch, tmp_path):
    isolated_with_low_threshold(monkeypatch, tmp_path, "cnn")
    monkeypatch.setenv("GRAPHC_BACKGROUND_COMPILE", "1")
    monkeypatch.delenv("GRAPHC_COMPILE_WORKERS", raising=False)
    monkeypatch.delenv("GRAPHC_NUM_THREADS", raising=False)
    monkeypatch.setattr(executor, "STAND_IN_MIN_SECONDS", 0.0)


def steps(backend: str):
    build, features, _ = MODELS["cnn"]
    gc.manual_seed(3)
    model = build()
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-2),
                                 batch(features, 8, 0), backend=backend)
    return model, step


def parallel_calls(executable) -> int:
    return sum(call.parallel for kernel in executable.kernels for call in kernel.generated.calls)


def worker_pid(executable) -> int:
    [job] = executable._upgrade.background
    worker = job._worker
    return worker.forked_pid or worker.script.pid


def test_stand_ins_then_the_parallel_kernels_train_as_the_reference(background):
    model, step = steps("numba-cpu")
    oracle, reference = steps("reference")
    features = MODELS["cnn"][1]
    data = batch(features, 8, 1)
    np.testing.assert_allclose(step(*data), reference(*data), rtol=1e-5, atol=1e-6)
    first = step.executable
    assert first.compiling and parallel_calls(first) == 0  # serial stand-ins ran the first call
    gc.finish_compiling()
    assert not first.compiling and parallel_calls(first) > 0
    for seed in (2, 3):
        data = batch(features, 8, seed)
        np.testing.assert_allclose(step(*data), reference(*data), rtol=1e-5, atol=1e-6)
    assert step.executable is first  # the same executable switched its kernels
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, oracle.state_dict()[key], rtol=1e-4, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("room", ["packed", "own memory"])
def test_a_winograd_convolution_stands_in_as_im2col(background, monkeypatch, room):
    """The stand-in of a Winograd convolution is the quicker-compiling im2col one, its scratch
    packed into the storage planned for Winograd's or, where that has too little room (made so
    here), in memory of its own; the step trains as the reference's before and after the switch
    to the parallel Winograd kernel."""
    own_memory = []
    if room == "own memory":
        def no_room_when_the_layout_differs(scratch, planned):
            if len(scratch) == len(planned) and all(t == p for t, (_, p) in zip(scratch, planned)):
                return [storage.offset for storage, _ in planned]
            own_memory.append(scratch)
            return None
        monkeypatch.setattr(executor, "scratch_offsets", no_room_when_the_layout_differs)
    def build():
        gc.manual_seed(5)
        return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(16 * 6 * 6, 5))
    steps = {}
    for backend in ("numba-cpu", "reference"):
        model = build()
        steps[backend] = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.05),
                                               batch((1, 8, 8), 8, 0), backend=backend)
    step = steps["numba-cpu"]

    def winograd_calls():
        return sum(call.entry == WINOGRAD for k in step.executable.kernels for call in k.generated.calls)
    data = batch((1, 8, 8), 8, 1)
    np.testing.assert_allclose(step(*data), steps["reference"](*data), rtol=1e-5, atol=1e-6)
    assert step.executable.compiling and winograd_calls() == 0
    assert bool(own_memory) == (room == "own memory")
    gc.finish_compiling()
    assert winograd_calls() > 0
    for seed in (2, 3):
        data = batch((1, 8, 8), 8, seed)
        np.testing.assert_allclose(step(*data), steps["reference"](*data), rtol=1e-5, atol=1e-6)


def test_scratch_of_another_layout_is_packed_into_the_planned_storage():
    f32 = lambda *shape: TensorType(shape, "float32")
    planned = [(Storage(0, nbytes, 0, 0, offset=offset), t)
               for offset, nbytes, t in [(0, 4096, f32(1024)), (4096, 1024, f32(256))]]
    assert executor.scratch_offsets([f32(1000), f32(10)], planned) == [0, 4096]  # in order
    # largest first, each into the first storage with room, starting aligned
    assert executor.scratch_offsets([f32(100), f32(600), f32(250)], planned) == [3456, 0, 2432]
    assert executor.scratch_offsets([f32(900), f32(300)], planned) is None
    assert executor.scratch_offsets([], planned) == []


def test_another_batch_size_waits_for_the_same_worker(background):
    model, step = steps("numba-cpu")
    oracle, reference = steps("reference")
    features = MODELS["cnn"][1]
    step(*batch(features, 8, 1)), reference(*batch(features, 8, 1))
    first = step.executable
    data = batch(features, 16, 2)
    np.testing.assert_allclose(step(*data), reference(*data), rtol=1e-5, atol=1e-6)
    second = step.executable
    assert second is not first and second.compiling  # its parallel kernels are the first size's
    jobs = list({id(job): job for e in (first, second) for job in e._upgrade.background}.values())
    assert sum(len(job.keys) for job in jobs) == len(frozenset().union(*(job.keys for job in jobs)))
    gc.finish_compiling()
    assert parallel_calls(first) > 0 and parallel_calls(second) > 0
    for size in (8, 16):
        data = batch(features, size, size)
        np.testing.assert_allclose(step(*data), reference(*data), rtol=1e-5, atol=1e-6)
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, oracle.state_dict()[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_a_kernel_compiling_in_the_background_is_not_compiled_twice(background):
    b = Builder("exp_of_square")
    x = b.add_input(TensorType((64, 64), "float32"), "x")
    b.add_output("y", b.exp(b.mul(x, x)))
    with always_parallel():
        lowered = lower(FUSION(b.graph.verify()))
    requests = executor._requests(lowered.sources)
    cache = get_cache()
    [first] = cache.compile_in_background(requests)
    assert cache.compile_in_background(requests) == [first]  # still compiling: the same worker
    first.finish()
    assert cache.compile_in_background(requests) == []  # in the disk cache now
    assert all(cache.compiled([call.source for call, _ in requests]))


def test_the_next_process_finds_the_parallel_kernels_cached(background):
    _, step = steps("numba-cpu")
    step(*batch(MODELS["cnn"][1], 8, 1))
    gc.finish_compiling()
    _, again = steps("numba-cpu")  # compiled again, as a new process would: from the disk cache
    assert not again.executable.compiling and parallel_calls(again.executable) > 0
    assert again.executable.cache_stats.compiled == 0


def test_a_forked_child_keeps_the_stand_ins_and_leaves_the_worker_to_its_parent(background):
    """A data-loading pool forked while the parallel kernels compile: the child's calls run the
    stand-ins and its finish_compiling is a no-op (the worker and its output are the parent's);
    the parent then switches as usual."""
    _, step = steps("numba-cpu")
    _, reference = steps("reference")
    features = MODELS["cnn"][1]
    step(*batch(features, 8, 1)), reference(*batch(features, 8, 1))
    data = batch(features, 8, 2)
    want = reference(*data)
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child():
        got = step(*data)
        gc.finish_compiling()
        results.put((got, step.executable.compiling, parallel_calls(step.executable)))
    process = context.Process(target=child)
    process.start()
    got, compiling, calls = results.get(timeout=120)
    process.join(timeout=120)
    assert process.exitcode == 0 and compiling and calls == 0
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert step.executable.compiling  # the child left the worker alone
    gc.finish_compiling()
    assert not step.executable.compiling and parallel_calls(step.executable) > 0


def test_a_failed_background_compile_leaves_the_stand_ins_running(background, monkeypatch):
    _, step = steps("numba-cpu")
    _, reference = steps("reference")

    def fail(self, stats):
        raise RuntimeError("LLVM ran out of memory")
    monkeypatch.setattr(executor._Upgrade, "load", fail)
    with pytest.warns(UserWarning, match="failed to compile; their serial forms keep running.*LLVM ran out"):
        gc.finish_compiling()
    assert not step.executable.compiling and parallel_calls(step.executable) == 0
    data = batch(MODELS["cnn"][1], 8, 4)
    np.testing.assert_allclose(step(*data), reference(*data), rtol=1e-5, atol=1e-6)


def test_the_worker_yields_and_goes_with_its_executable(background):
    _, step = steps("numba-cpu")
    pid = worker_pid(step.executable)
    lowest = min(19, os.getpriority(os.PRIO_PROCESS, 0) + BACKGROUND_NICENESS)  # 19: the kernel's floor
    deadline = time.monotonic() + 10
    while os.getpriority(os.PRIO_PROCESS, pid) < lowest and time.monotonic() < deadline:
        time.sleep(0.01)  # it lowers its own priority as it starts
    assert os.getpriority(os.PRIO_PROCESS, pid) == lowest
    del step
    garbage_collector.collect()
    with pytest.raises((ProcessLookupError, ChildProcessError)):  # killed and reaped
        os.kill(pid, 0)


def test_no_stand_ins_in_an_mpi_job(background, monkeypatch):
    """Ranks that switched kernels at different steps could update their weight replicas with
    differently compiled code."""
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", SimpleNamespace(Is_initialized=lambda: True))
    _, step = steps("numba-cpu")
    assert not step.executable.compiling and parallel_calls(step.executable) > 0


def test_no_stand_ins_below_the_threshold_or_when_turned_off(background, monkeypatch):
    monkeypatch.setattr(executor, "STAND_IN_MIN_SECONDS", 1e9)
    _, step = steps("numba-cpu")
    assert not step.executable.compiling and parallel_calls(step.executable) > 0
    monkeypatch.setattr(executor, "STAND_IN_MIN_SECONDS", 0.0)
    monkeypatch.setenv("GRAPHC_BACKGROUND_COMPILE", "0")
    monkeypatch.setenv("GRAPHC_CACHE_DIR", os.environ["GRAPHC_CACHE_DIR"] + "-off")
    _, step = steps("numba-cpu")
    assert not step.executable.compiling and parallel_calls(step.executable) > 0
