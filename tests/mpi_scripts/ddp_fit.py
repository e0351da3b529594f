"""Data-parallel fit with checkpoints and injected failures, run by tests/test_distributed.py.

    python ddp_fit.py OUT_DIR [--epochs 2] [--resume] [--fail kill|raise|exit --fail-rank R --fail-at K]

Trains a small CNN on synthetic data, checkpointing to OUT_DIR/checkpoint.safetensors after each
epoch, and rank 0 writes OUT_DIR/final.npz (training state and history). A failure is injected
when rank R is about to run its K-th batch (counted from 0 over the whole run):
  kill   SIGKILL (no exception, no cleanup)
  raise  an uncaught RuntimeError
  exit   sys.exit(0): the rank leaves quietly while the others wait in the allreduce
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import numpy as np

SAMPLES, BATCH = 96, 8  # 6 steps per epoch and rank with 2 ranks


class FailingLoader:
    """Forwards a DistributedLoader, failing as asked before the `at`-th batch on `rank`."""

    def __init__(self, loader, mode: str, rank: int, at: int) -> None:
        self.loader, self.mode, self.rank, self.at = loader, mode, rank, at
        self.count = 0

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.loader.world.rank == self.rank and self.count == self.at:
                self.fail()
            self.count += 1
            yield batch

    def fail(self) -> None:
        print(f"injecting '{self.mode}' on rank {self.rank} at batch {self.at}", flush=True)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "raise":
            raise RuntimeError("injected failure")
        sys.exit(0)


def main() -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import data, nn, optim
    from graphc.train import training_state

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--fail", choices=["kill", "raise", "exit"])
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--fail-at", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(7)
    x = rng.standard_normal((SAMPLES, 1, 8, 8)).astype(np.float32)
    y = (x.mean(axis=(1, 2, 3)) > 0).astype(np.int64)  # learnable: the sign of the mean pixel
    gc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Dropout(0.25),
                          nn.Linear(4 * 6 * 6, 2))
    loader = distributed.DistributedLoader(data.TensorDataset(x, y), BATCH, world, seed=3)
    val = distributed.DistributedLoader(data.TensorDataset(x[:30], y[:30]), 16, world,
                                        shuffle=False, even=False, drop_last=False)
    step = distributed.DataParallelStep(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-2),
                                        (x[:BATCH], y[:BATCH]), backend="reference", world=world)
    train = FailingLoader(loader, args.fail, args.fail_rank, args.fail_at) if args.fail else loader
    history = distributed.fit(step, train, args.epochs, val_loader=val, progress=False,
                              checkpoint_path=os.path.join(args.out_dir, "checkpoint.safetensors"),
                              resume_from_checkpoint=args.resume,
                              on_epoch_end=lambda e, logs: print(json.dumps(logs), flush=True))
    if world.is_root:
        np.savez(os.path.join(args.out_dir, "final.npz"), **training_state(step))


if __name__ == "__main__":
    main()
