"""What a compilation at another batch size costs besides its own step: the kernel cache is not
listed on disk for kernels this process has loaded (the listing covers every kernel ever cached:
~5-15 ms, and a graph with scans asked for it 25 times per compilation), and a train step's
executables share their memory (a fresh arena or scan stack is paged in by its first call)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.backends.numba_cpu.cache import KernelCache, get_cache


def unlisted(self) -> set[str]:
    raise AssertionError("the kernel cache was listed on disk")


def test_loaded_kernels_are_not_looked_up_on_disk(monkeypatch):
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    compiled = gc.compile(model, x, backend="numba-cpu")
    compiled(x)
    requests = [(call, next(iter(function.overloads)))
                for kernel in compiled.executable.kernels
                for call, function in zip(kernel.generated.calls, kernel.functions)]
    functions = [function for kernel in compiled.executable.kernels for function in kernel.functions]
    monkeypatch.setattr(KernelCache, "_compiled_on_disk", unlisted)
    cache = get_cache()
    assert cache.compiled([call.source for call, _ in requests]) == [True] * len(requests)
    assert cache.load_all(requests) == functions
    with pytest.raises(AssertionError, match="listed on disk"):  # what is not loaded still is
        cache.compiled(["# a kernel no process compiled\n"])


# -- memory shared between the batch sizes of one train step ----------------------------------
def sequence_model(unroll: bool) -> nn.Module:
    class LastStep(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 4, batch_first=True, unroll=unroll)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])
    return LastStep()


def sequences(size: int, seed: int):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((size, 5, 3)).astype(np.float32), rng.integers(0, 3, size)


def steps_on_both_backends(unroll: bool, first_size: int):
    gc.manual_seed(5)
    model, twin = sequence_model(unroll), sequence_model(unroll)
    twin.load_state_dict(model.state_dict())
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=0.01),
                                 sequences(first_size, 0), backend="numba-cpu")
    oracle = gc.compile_train_step(twin, F.cross_entropy, optim.Adam(twin.parameters(), lr=0.01),
                                   sequences(first_size, 0), backend="reference")
    return model, twin, step, oracle


def run_alike(model, twin, step, oracle, sizes) -> dict[int, object]:
    """Each size's executable, after steps at `sizes` in turn gave the oracle's losses and weights."""
    executables = {}
    for seed, size in enumerate(sizes):
        batch = sequences(size, seed)
        np.testing.assert_allclose(step(*batch), oracle(*batch), rtol=1e-5, atol=1e-6)
        executables[size] = step.executable
    for key, value in model.state_dict().items():
        np.testing.assert_allclose(value, twin.state_dict()[key], rtol=1e-4, atol=1e-6, err_msg=key)
    return executables


@pytest.mark.parametrize("unroll", [True, False])
def test_train_step_sizes_share_memory_and_compute_alike(unroll):
    """Unrolled (one arena) and scanned (the scans' stacks): a smaller batch uses the memory of
    the larger one, a larger one gets its own, and steps alternating between them are the
    reference's."""
    model, twin, step, oracle = steps_on_both_backends(unroll, 6)
    executables = run_alike(model, twin, step, oracle, [6, 4, 9, 4, 6, 9, 4])
    six, four, nine = executables[6], executables[4], executables[9]
    if unroll:
        assert np.shares_memory(four._arena, six._arena) and four._lock is six._lock
        assert not np.shares_memory(nine._arena, six._arena)
    else:
        assert four._spare is six._spare is nine._spare and four._lock is six._lock is nine._lock


def test_compiled_model_sizes_keep_their_own_memory():
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    rng = np.random.default_rng(1)
    compiled = gc.compile(model, rng.standard_normal((8, 6)).astype(np.float32), backend="numba-cpu")
    first = compiled.executable
    x = rng.standard_normal((5, 6)).astype(np.float32)
    expected = gc.compile(model, x, backend="reference")(x)
    np.testing.assert_allclose(compiled(x), expected, rtol=1e-5, atol=1e-6)
    assert compiled.executable is not first and compiled.executable._lock is not first._lock


def test_the_disk_listing_is_made_again_only_when_the_folder_changed(tmp_path, monkeypatch):
    cache = KernelCache(str(tmp_path))
    index = tmp_path / "__pycache__"
    index.mkdir(exist_ok=True)
    (index / "k_one.k_one-1.py311.nbi").write_bytes(b"")
    long_ago = 1_000_000_000_000_000_000  # ns: 2001
    os.utime(index, ns=(long_ago, long_ago))
    listings = []
    listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda folder: listings.append(folder) or listdir(folder))
    assert cache._compiled_on_disk() == {"k_one"}
    assert cache._compiled_on_disk() == {"k_one"} and len(listings) == 1
    (index / "k_two.k_two-1.py311.nbi").write_bytes(b"")  # the folder's mtime is now
    assert cache._compiled_on_disk() == {"k_one", "k_two"} and len(listings) == 2
    # changed within the last second: a later change might not move the mtime, so no memo
    assert cache._compiled_on_disk() == {"k_one", "k_two"} and len(listings) == 3
