"""Asynchronous parameter-server training, run by tests/test_async_ps.py under mpiexec.

    python async_train.py MODE OUT_DIR [--staleness S] [--epochs E] [--slow-rank R]
                          [--fail exit|kill --fail-rank R --fail-at K] [--perturb-at K]
                          [--check-every N] [--resume]

Rank 0 writes OUT_DIR/final.npz (training state, epoch losses) and OUT_DIR/stats.json.
Data: the rows of ddp_steps.batches(), in order (no shuffle), BATCH rows per push, so with W
workers and max_staleness 0 each update is the single-process step on W*BATCH rows.
  --slow-rank R   rank R sleeps SLOW_S before each gradient (a straggler)
  --fail exit     rank R leaves quietly before its K-th gradient (0: never), or the server
                  before its K-th update; kill: SIGKILL instead
  --perturb-at K  worker 1 adds 1e-3 to its first weight before its K-th gradient
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ddp_steps import BATCH, batches, optimizer, plain_model  # noqa: E402

SLOW_S = 0.3


def main() -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import data
    from graphc.train import training_state

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--staleness", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="updates of W*BATCH rows per epoch")
    parser.add_argument("--slow-rank", type=int)
    parser.add_argument("--fail", choices=["exit", "kill"])
    parser.add_argument("--fail-rank", type=int, default=2)
    parser.add_argument("--fail-at", type=int, default=0)
    parser.add_argument("--perturb-at", type=int, default=0)
    parser.add_argument("--check-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()

    workers = world.size - 1
    x, y = (np.concatenate(parts) for parts in zip(*batches(args.steps, workers * BATCH)))

    def fail(what: str) -> None:
        print(f"injecting '{args.fail}' on rank {world.rank} at {what} {args.fail_at}", flush=True)
        if args.fail == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        sys.exit(0)

    class InjectingStep(distributed.AsyncStep):
        calls = 0

        def compute_gradients(self, *batch):
            self.calls += 1
            if world.rank == args.fail_rank and self.calls == args.fail_at:
                fail("gradient")
            if world.rank == 1 and self.calls == args.perturb_at:
                self.params[self.trainable[0]].flat[0] += 1e-3
            if world.rank == args.slow_rank:
                time.sleep(SLOW_S)
            return super().compute_gradients(*batch)

        def _apply(self, pushes, base, batch_size):
            if args.fail_rank == 0 and self.stats.updates + 1 == args.fail_at:
                fail("update")
            return super()._apply(pushes, base, batch_size)

    gc.manual_seed(0)
    model = plain_model()
    step = InjectingStep(model, F.cross_entropy, optimizer(model), (x[:BATCH], y[:BATCH]),
                         max_staleness=args.staleness, backend="reference", clip_grad_norm=1.0,
                         world=world, check_every=args.check_every)
    loader = distributed.DistributedLoader(data.TensorDataset(x, y), BATCH, world, shuffle=False)
    val = distributed.DistributedLoader(data.TensorDataset(x, y), 16, world, shuffle=False,
                                        even=False, drop_last=False)
    history = distributed.fit(step, loader, args.epochs, val_loader=val,
                              checkpoint_path=os.path.join(args.out_dir, "checkpoint.safetensors"),
                              resume_from_checkpoint=args.resume,
                              on_epoch_end=lambda e, logs: print(json.dumps(logs), flush=True))
    state = training_state(step)
    if world.is_root:
        np.savez(os.path.join(args.out_dir, "final.npz"), losses=np.array(history["loss"]),
                 val_accuracy=np.array(history["val_accuracy"]), **state)
        with open(os.path.join(args.out_dir, "stats.json"), "w") as f:
            json.dump(step.stats.summary(), f)
    else:  # fit leaves every rank with the server's state
        np.savez(os.path.join(args.out_dir, f"worker{world.rank}.npz"), **state)


if __name__ == "__main__":
    main()
