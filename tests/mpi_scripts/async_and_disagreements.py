"""Ranks that disagree without knowing it, and asynchronous training's edges, run by
tests/test_distributed.py under `mpiexec -n 2`.

    python async_and_disagreements.py eval_on_one_rank   # rank 1's batch-norm model in eval mode
    python async_and_disagreements.py dataset_length     # rank 1 reads a longer copy of the data
    python async_and_disagreements.py async_short_batch  # 30 rows in batches of 8, drop_last=False
    python async_and_disagreements.py async_batch_norm   # two fits of BatchNorm(momentum=None)

The first two must end the job naming the disagreement; the third prints the updates and the
samples the server applied; the fourth compares the server's batch-norm statistics and count
with a single-process step's on the same batches.
"""
from __future__ import annotations

import sys

import numpy as np


def main(mode: str) -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import data, nn, optim

    gc.manual_seed(0)
    rng = np.random.default_rng(0)
    if mode == "eval_on_one_rank":
        model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
        x, y = rng.standard_normal((4, 5)).astype(np.float32), np.array([0, 1, 2, 0])
        step = distributed.DataParallelStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                            (x, y), backend="reference", world=world)
        if world.rank == 1:
            model.eval()
        step(x, y)
        print("stepped with mismatched layouts", flush=True)
    elif mode == "dataset_length":
        n = 20 + world.rank
        dataset = data.TensorDataset(np.ones((n, 5), np.float32), np.arange(n) % 3)
        distributed.DistributedLoader(dataset, 5, world, seed=1)
        print("sharded datasets of different lengths", flush=True)
    elif mode == "async_batch_norm":
        def build():
            gc.manual_seed(0)
            return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, momentum=None), nn.ReLU(), nn.Linear(6, 3))
        x, y = rng.standard_normal((32, 5)).astype(np.float32), rng.integers(0, 3, 32)
        model = build()
        step = distributed.AsyncStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                     (x[:8], y[:8]), max_staleness=0, backend="reference", world=world)
        loader = distributed.DistributedLoader(data.TensorDataset(x, y), 8, world, shuffle=False)
        for _ in range(2):
            distributed.fit(step, loader, epochs=1)
        if world.is_root:
            single = build()
            alone = gc.compile_train_step(single, F.cross_entropy, optim.SGD(single.parameters(), lr=0.1),
                                          (x[:8], y[:8]), backend="reference")
            for _ in range(2):
                for k in range(0, 32, 8):
                    alone(x[k:k + 8], y[k:k + 8])
            ours, theirs = model.state_dict(), single.state_dict()
            print(f"count {int(ours['1.num_batches_tracked'])} of {int(theirs['1.num_batches_tracked'])}, "
                  f"running mean off by {np.abs(ours['1.running_mean'] - theirs['1.running_mean']).max():g}",
                  flush=True)
    else:
        model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
        x, y = rng.standard_normal((30, 5)).astype(np.float32), rng.integers(0, 3, 30)
        step = distributed.AsyncStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                     (x[:8], y[:8]), max_staleness=0, backend="reference", world=world)
        loader = distributed.DistributedLoader(data.TensorDataset(x, y), 8, world, shuffle=False,
                                               drop_last=False)
        history = distributed.fit(step, loader, epochs=1)
        if world.is_root:
            print(f"updates {history.epochs[0]['updates']:g}, samples {dict(step.stats.samples)}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
