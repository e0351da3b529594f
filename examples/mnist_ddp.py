"""Train the MNIST CNN data-parallel over MPI ranks (the same script runs as one process).

    mpiexec -n 2 python examples/mnist_ddp.py [--epochs 3] [--batch-size 32] [--backend numba-cpu]
    python examples/mnist_ddp.py              # a world of one: no mpiexec, or no mpi4py

Each rank trains on its own shard of every epoch; `--batch-size` is per rank, so the global
batch is batch size x ranks. Uses MNIST when found (--data, $GRAPHC_MNIST_DIR or
../shared/data/mnist: images 0-7999 train, 8000-9999 evaluate), else scikit-learn's 8x8 digits
(--digits forces them). With --checkpoint, rank 0 saves after every epoch and --resume continues
from there after a failure. With 2 ranks on 2 cores, run one thread per rank:
GRAPHC_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 mpiexec -n 2 ...
"""
from __future__ import annotations

import argparse

from graphc import distributed
from graphc.train import History


def train(args: argparse.Namespace, world: distributed.World) -> History:
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import data, optim
    from graphc.models import mnist_cnn

    name, (x_train, y_train), (x_eval, y_eval) = data.mnist_or_digits(args.data, args.digits)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    gc.manual_seed(args.seed)
    model = mnist_cnn(image_size=x_train.shape[-1])
    optimizer = optim.Adam(model.parameters(), lr=args.lr)
    loader = distributed.DistributedLoader(data.TensorDataset(x_train, y_train), args.batch_size,
                                           world, seed=args.seed)
    evaluation = distributed.DistributedLoader(data.TensorDataset(x_eval, y_eval), 500, world,
                                               shuffle=False, even=False, drop_last=False)
    step = distributed.DataParallelStep(model, F.cross_entropy, optimizer,
                                        (x_train[:args.batch_size], y_train[:args.batch_size]),
                                        backend=args.backend, world=world)
    if world.is_root:
        print(f"data: {name}: {len(x_train)} training and {len(x_eval)} evaluation images")
        print(f"{world.size} rank(s), backend {step.backend}: {len(loader)} steps per epoch of "
              f"{args.batch_size} x {world.size} = {args.batch_size * world.size} images; "
              f"{step.layout.size} values reduced per step")
    history = distributed.fit(
        step, loader, args.epochs, val_loader=evaluation, checkpoint_path=args.checkpoint,
        resume_from_checkpoint=args.resume, progress=not args.no_progress,
        on_epoch_end=lambda epoch, logs: print(
            f"epoch {epoch}: loss {logs['loss']:.4f}, eval loss {logs['val_loss']:.4f}, "
            f"eval accuracy {logs['val_accuracy']:.4f}, {logs['samples_per_s']:.0f} samples/s",
            flush=True))
    times = step.times
    if world.is_root and times.steps:
        print(f"per step on rank 0: gradients {1e3 * times.gradients / times.steps:.1f} ms, "
              f"allreduce {1e3 * times.allreduce / times.steps:.1f} ms, "
              f"update {1e3 * times.update / times.steps:.1f} ms")
    return history


def main() -> None:
    world = distributed.init()  # first: from here on a failing rank stops the whole job
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="directory with the MNIST IDX files")
    parser.add_argument("--digits", action="store_true", help="use the 8x8 digits, not MNIST")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None, help="numba-cpu (default) or reference")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--checkpoint", default=None, help="checkpoint file (rank 0 writes it)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    train(parser.parse_args(), world)


if __name__ == "__main__":
    main()
