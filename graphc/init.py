"""The host-side generator for parameter initialisation (seeded by gc.manual_seed)."""
from __future__ import annotations

import numpy as np

_generator = np.random.default_rng(0)


def reseed(seed: int) -> None:
    global _generator
    _generator = np.random.default_rng(seed)


def generator() -> np.random.Generator:
    return _generator
