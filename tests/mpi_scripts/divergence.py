"""Data-parallel steps where one replica is changed behind the step's back, run by
tests/test_divergence.py under `mpiexec -n 2`.

    python divergence.py STEPS CHECK_EVERY [PERTURB_AT]

Rank 1 adds 1e-3 to one weight of its copy after step PERTURB_AT (0: never). Prints
"step k done" after each step on rank 0 and "trained" at the end.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_steps import BATCH, batches, optimizer, plain_model  # noqa: E402


def main(steps: int, check_every: int, perturb_at: int) -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F

    gc.manual_seed(0)
    model = plain_model()
    rows = slice(world.rank * BATCH, (world.rank + 1) * BATCH)
    data = [(x[rows], y[rows]) for x, y in batches(steps)]
    step = distributed.DataParallelStep(model, F.cross_entropy, optimizer(model), data[0],
                                        backend="reference", world=world, check_every=check_every)
    for k, batch in enumerate(data, start=1):
        step(*batch)
        if world.rank == 1 and k == perturb_at:
            step.params["3.bias"][0] += 1e-3  # the hidden layer's bias
        if world.is_root:
            print(f"step {k} done", flush=True)
    if world.is_root:
        print("trained", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
