"""A few data-parallel steps, run by tests/test_distributed.py under `mpiexec -n 2`.

    python ddp_steps.py identical|equivalent|mismatch OUT_DIR [BACKEND (default: reference)]

Each rank writes OUT_DIR/rank<r>.npz: its training state after the steps and the losses.
  identical   ranks start from different seeds and see different data (dropout, batch norm)
  equivalent  rank r takes rows [r*B, (r+1)*B) of each 2B-row batch of `batches()`
  mismatch    rank 1 builds a wider model: the step must refuse to start
"""
from __future__ import annotations

import os
import sys

import numpy as np

BATCH = 8  # per rank
STEPS = 2


def batches(count: int = STEPS, rows: int = 2 * BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """Deterministic (x, y) batches of 8x8 single-channel images and 10-class labels."""
    rng = np.random.default_rng(1234)
    return [(rng.standard_normal((rows, 1, 8, 8)).astype(np.float32),
             rng.integers(0, 10, rows).astype(np.int64)) for _ in range(count)]


def plain_model(hidden: int = 16):
    """No dropout and no batch norm: a rank's gradient is an exact share of the big batch's."""
    from graphc import nn
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, hidden),
                         nn.ReLU(), nn.Linear(hidden, 10))


def noisy_model():
    from graphc import nn
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(4 * 6 * 6, 10))


def optimizer(model):
    from graphc import optim
    return optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)


def main(mode: str, out_dir: str, backend: str) -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F
    from graphc.train import training_state

    gc.manual_seed(100 + world.rank if mode == "identical" else 0)
    if mode == "identical":
        model = noisy_model()
        rng = np.random.default_rng(world.rank)  # each rank its own data
        data = [(rng.standard_normal((BATCH, 1, 8, 8)).astype(np.float32),
                 rng.integers(0, 10, BATCH).astype(np.int64)) for _ in range(3)]
    else:
        model = plain_model(hidden=24 if mode == "mismatch" and world.rank == 1 else 16)
        rows = slice(world.rank * BATCH, (world.rank + 1) * BATCH)
        data = [(x[rows], y[rows]) for x, y in batches()]
    step = distributed.DataParallelStep(model, F.cross_entropy, optimizer(model), data[0],
                                        backend=backend, clip_grad_norm=1.0, world=world)
    losses = [step(*batch) for batch in data]
    np.savez(os.path.join(out_dir, f"rank{world.rank}.npz"), losses=np.array(losses),
             **training_state(step))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "reference")
