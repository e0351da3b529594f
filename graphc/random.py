"""Global seeding for traced randomness (dropout, random ops).

Random ops are counter-based: each compiled call that draws random numbers (a gc.jit function,
a compiled model or training step) receives a key (seed, counter) from this one generator, and
the counter advances once per call, as PyTorch's global generator advances: no two calls draw
the same bits (two models' dropout masks differ), a run is reproducible from `manual_seed`
alone, and every backend draws the same bits.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import numpy as np

_state = {"seed": 0, "counter": 0}
_LOCK = threading.Lock()  # calls from several threads draw keys one at a time: each its own


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation and traced randomness; resets the call counter. Takes
    PyTorch's range, [-2**63, 2**64): a negative seed counts from 2**64, as there."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, (bool, np.bool_)):
        raise TypeError(f"manual_seed: seed must be an integer, got {seed!r}")
    if not -2**63 <= int(seed) < 2**64:
        raise ValueError(f"manual_seed: seed must be in [-2**63, 2**64), got {seed}")
    unsigned = int(seed) % 2**64
    from . import init
    init.reseed(unsigned)
    # the key's int64 holds the seed's 64 bits (seeds below 2**63 as they are)
    _state["seed"], _state["counter"] = int(np.uint64(unsigned).astype(np.int64)), 0


def next_key() -> np.ndarray:
    """The key of the next call, (seed, counter); the counter advances."""
    with _LOCK:
        key = get_state()
        _state["counter"] += 1
    return key


def get_state() -> np.ndarray:
    """The key the next call will draw with (a checkpoint keeps it), without advancing."""
    return np.array([_state["seed"], _state["counter"]], dtype=np.int64)


def set_state(key: np.ndarray) -> None:
    """Continue from `key`, as `get_state` gave it (a checkpoint being restored)."""
    seed, counter = (int(v) for v in np.asarray(key, np.int64).reshape(2))
    _state["seed"], _state["counter"] = seed, counter


@contextmanager
def state_kept() -> Iterator[None]:
    """Within the block, calls may draw keys; afterwards the generator is where it was (a
    profile or a numerics check of a training step must not change later training)."""
    key = get_state()
    try:
        yield
    finally:
        set_state(key)
