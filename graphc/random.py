"""Global seeding for traced randomness (dropout, random ops).

Random ops are counter-based: each compiled call receives a key (seed, counter) and the
counter advances once per call, so a run is reproducible from `manual_seed` alone and every
backend draws the same bits.
"""
from __future__ import annotations

import numpy as np

_state = {"seed": 0, "counter": 0}


def manual_seed(seed: int) -> None:
    """Seed parameter initialisation and traced randomness; resets the call counter."""
    _state["seed"], _state["counter"] = int(seed), 0
    from . import init
    init.reseed(int(seed))


def next_key() -> np.ndarray:
    key = np.array([_state["seed"], _state["counter"]], dtype=np.int64)
    _state["counter"] += 1
    return key
