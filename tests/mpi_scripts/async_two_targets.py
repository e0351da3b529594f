"""An AsyncStep whose loss takes two targets (targets=2), validated each epoch, run by
tests/test_async_ps.py under mpiexec -n 2. Rank 0 prints the epoch logs as JSON.

    python async_two_targets.py
"""
from __future__ import annotations

import json

import numpy as np


def loss(out, labels, values):
    import graphc.nn.functional as F
    return F.cross_entropy(out[:, :3], labels) + F.mse_loss(out[:, 3], values)


def model():
    import graphc as gc
    from graphc import nn
    gc.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4))


def arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 6)).astype(np.float32)
    return x, rng.integers(0, 3, 64), rng.standard_normal(64).astype(np.float32)


def main() -> None:
    from graphc import distributed
    world = distributed.init()
    from graphc import data, optim
    x, labels, values = arrays()
    net = model()
    step = distributed.AsyncStep(net, loss, optim.SGD(net.parameters(), lr=0.1),
                                 (x[:16], labels[:16], values[:16]), max_staleness=0,
                                 backend="reference", targets=2, world=world)
    train = distributed.DistributedLoader(data.TensorDataset(x, labels, values), 16, world, shuffle=False)
    val = distributed.DistributedLoader(data.TensorDataset(x[:20], labels[:20], values[:20]), 8, world,
                                        shuffle=False, even=False, drop_last=False)
    history = distributed.fit(step, train, 1, val_loader=val, progress=False)
    if world.is_root:
        print(json.dumps(history.epochs[0]))


if __name__ == "__main__":
    main()
