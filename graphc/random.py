"""Global seeding for traced randomness (dropout, random ops).

Random ops are counter-based: each compiled call receives a key (seed, counter) and the
counter advances once per call, so a run is reproducible from `manual_seed` alone and every
backend draws the same bits.
"""
from __future__ import annotations

import numpy as np

_state = {"seed": 0, "counter": 0}


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
    key = np.array([_state["seed"], _state["counter"]], dtype=np.int64)
    _state["counter"] += 1
    return key
