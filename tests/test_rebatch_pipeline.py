"""What a compilation at another batch size costs besides its own step: the kernel cache is not
listed on disk for kernels this process has loaded (the listing covers every kernel ever cached:
~5-15 ms, and a graph with scans asked for it 25 times per compilation)."""
from __future__ import annotations

import numpy as np
import pytest

import graphc as gc
from graphc import nn
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
