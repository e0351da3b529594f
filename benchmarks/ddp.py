"""Distributed training of the MNIST CNN over MPI: data-parallel throughput, and a training race
between synchronous data parallelism and the asynchronous parameter server with a straggler.

    python benchmarks/ddp.py [--rounds 3] [--steps 10] [--batch 64] [--backend numba-cpu]
                             [--threads 1 2] [--blas-threads 1]
    python benchmarks/ddp.py --race [--epochs 3] [--staleness 0 2 8] [--slowdown 3] [--batch 64]

--race trains the MNIST CNN (Adam, lr 1e-3; MNIST images 0-7999, evaluated on 8000-9999, or
scikit-learn's digits where MNIST is missing) for --epochs with two workers of --batch images,
the last one slowed --slowdown times (it sleeps (slowdown - 1) x its gradient time after each
gradient): synchronous data parallelism on 2 ranks, then the asynchronous parameter server on 3
ranks (rank 0 serves) for each --staleness. It reports training samples/s (epochs after the
first, which holds the kernels' compilation; evaluation excluded) and the final evaluation
accuracy. Each job is one `mpiexec`, one thread per rank.

The default mode:

For every (ranks, threads per rank) pair and round, one `mpiexec -n ranks` job (a plain process
for one rank) trains on random 28x28 images with a per-rank batch of --batch (so 2 ranks process
twice the samples per step) and reports, from rank 0:
  - samples/s over all ranks (median step time after warm-up steps),
  - where a step's time goes: gradients graph, allreduce, update graph,
  - the bare allreduce of the same buffer with both ranks already waiting (the transfer alone):
    the step's allreduce time beyond it is waiting for the slower rank.
Rounds are interleaved and each figure is the median over rounds.
Threads per rank are set through GRAPHC_NUM_THREADS, OMP_NUM_THREADS and NUMBA_NUM_THREADS.
OpenBLAS's own thread pool is pinned separately by --blas-threads, default 1: letting it follow
the core count made a one-rank step about 4x slower here (measured; two thread pools competing
for the same cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

THREAD_VARIABLES = ("GRAPHC_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")


# -- one job (every rank runs this) ------------------------------------------------------------
def bare_allreduce_ms(world, size: int, repeats: int = 20) -> float:
    buffer = np.ones(size, np.float32)
    times = []
    for _ in range(repeats):
        world.comm.Barrier()
        start = time.perf_counter()
        world.allreduce_(buffer)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import optim
    from graphc.models import mnist_cnn

    rng = np.random.default_rng(world.rank)
    x = rng.standard_normal((args.batch, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, args.batch).astype(np.int64)
    gc.manual_seed(0)
    model = mnist_cnn()
    start = time.perf_counter()
    step = distributed.DataParallelStep(model, F.cross_entropy, optim.Adam(model.parameters()),
                                        (x, y), backend=args.backend, world=world)
    for _ in range(args.warmup):
        step(x, y)
    first_s = time.perf_counter() - start
    before = copy.copy(step.times)
    durations = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step(x, y)
        durations.append(time.perf_counter() - t0)
    phases = {name: 1e3 * (getattr(step.times, name) - getattr(before, name)) / args.steps
              for name in ("gradients", "allreduce", "update")}
    # A step ends for everyone at the slowest rank: take the largest median.
    median_s = statistics.median(durations)
    if world.comm is not None:
        from mpi4py import MPI
        median_s = world.comm.allreduce(median_s, op=MPI.MAX)
        phases["bare_allreduce"] = bare_allreduce_ms(world, step.layout.size)
    if world.is_root:
        print(json.dumps({"ranks": world.size, "backend": step.backend, "batch_per_rank": args.batch,
                          "samples_per_s": world.size * args.batch / median_s,
                          "step_ms": 1e3 * median_s, "first_steps_s": first_s,
                          "reduced_values": step.layout.size, **{f"{k}_ms": v for k, v in phases.items()}}),
              flush=True)


def race_worker(args: argparse.Namespace) -> None:
    """One job of the race (every rank runs this): train, then rank 0 prints a JSON line."""
    from graphc import distributed
    world = distributed.init()
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import data, optim
    from graphc.models import mnist_cnn

    name, (x_train, y_train), (x_eval, y_eval) = data.mnist_or_digits(digits=args.digits)
    if args.limit:
        x_train, y_train = x_train[:args.limit], y_train[:args.limit]
    slow_rank, extra = world.size - 1, args.slowdown - 1.0

    class SlowedDataParallel(distributed.DataParallelStep):
        def __call__(self, *batch):
            before = self.times.gradients
            loss = super().__call__(*batch)
            if world.rank == slow_rank:  # the others wait for it in the next allreduce
                time.sleep(extra * (self.times.gradients - before))
            return loss

    class SlowedAsync(distributed.AsyncStep):
        def compute_gradients(self, *batch):
            start = time.perf_counter()
            reduced = super().compute_gradients(*batch)
            if world.rank == slow_rank:
                time.sleep(extra * (time.perf_counter() - start))
            return reduced

    gc.manual_seed(0)
    model = mnist_cnn(image_size=x_train.shape[-1])
    if args.race_pipeline:
        pipeline_race(args, world, model, name, (x_train, y_train), (x_eval, y_eval))
        return
    example = (x_train[:args.batch], y_train[:args.batch])
    common = dict(backend=args.backend, world=world)
    if args.race_staleness is None:
        step = SlowedDataParallel(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-3),
                                  example, **common)
    else:
        step = SlowedAsync(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-3),
                           example, max_staleness=args.race_staleness, **common)
    loader = distributed.DistributedLoader(data.TensorDataset(x_train, y_train), args.batch, world,
                                           seed=0)
    evaluation = distributed.DistributedLoader(data.TensorDataset(x_eval, y_eval), 500, world,
                                               shuffle=False, even=False, drop_last=False)
    history = distributed.fit(step, loader, args.epochs, val_loader=evaluation, progress=False)
    if world.is_root:
        rates = history["samples_per_s"]
        mode = "sync DP" if args.race_staleness is None else f"async s={args.race_staleness}"
        result = {"mode": mode,
                  "ranks": world.size, "data": name, "backend": step.backend,
                  "samples_per_s": statistics.mean(rates[1:] or rates),
                  "accuracy": history["val_accuracy"][-1], "accuracies": history["val_accuracy"]}
        if args.race_staleness is not None:
            result.update(staleness_mean=step.stats.staleness_mean(),
                          staleness_max=step.stats.staleness_max(),
                          pushes={w: step.stats.pushes[w] for w in step.workers})
        print(json.dumps(result), flush=True)


def pipeline_race(args: argparse.Namespace, world: Any, model: Any, name: str,
                  train: tuple[np.ndarray, np.ndarray], evaluation: tuple[np.ndarray, np.ndarray]
                  ) -> None:
    """The race's pipeline entry: 2 stages, 4 micro-batches of the two workers' global batch,
    the last stage slowed like the last worker; rank 0 gathers the stages' parameters and
    evaluates."""
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import data, distributed, optim

    x_train, y_train = train
    global_batch = 2 * args.batch
    step = distributed.PipelineParallelStep(model, F.cross_entropy,
                                            optim.Adam(model.parameters(), lr=1e-3),
                                            (x_train[:global_batch], y_train[:global_batch]),
                                            stages=2, microbatches=4, backend=args.backend,
                                            world=world)
    loader = data.DataLoader(data.TensorDataset(x_train, y_train), global_batch, shuffle=True,
                             seed=0, drop_last=True)
    times = step.times[0]
    rates = []
    for epoch in range(args.epochs):
        loader.set_epoch(epoch)
        start = time.perf_counter()
        for batch in loader:
            before = times.compute
            step(*batch)
            if world.rank == world.size - 1:
                time.sleep((args.slowdown - 1.0) * (times.compute - before))
        rates.append(len(loader) * global_batch / (time.perf_counter() - start))
    own = {n: a for n, a in step.stage_state().items() if n in step.params}
    gathered = world.comm.gather(own, root=0)
    if world.is_root:
        for stage_params in gathered:
            for n, array in stage_params.items():
                np.copyto(step.params[n], array)
        x_eval, y_eval = evaluation
        model.eval()
        scores = gc.compile(model, (x_eval[:500],), backend=args.backend)  # re-traces the tail
        correct = sum(int(np.count_nonzero(scores(x_eval[i:i + 500]).argmax(1) == y_eval[i:i + 500]))
                      for i in range(0, len(x_eval), 500))
        stage = step.times[0]
        print(json.dumps({"mode": "pipeline 2x4", "ranks": world.size, "data": name,
                          "backend": step.backend,
                          "samples_per_s": statistics.mean(rates[1:] or rates),
                          "accuracy": correct / len(x_eval),
                          "bubble_fraction_stage0": stage.bubble_fraction}), flush=True)


def race(args: argparse.Namespace) -> None:
    configs = [None, "pipeline", *args.staleness] if args.pipeline else [None, *args.staleness]
    results = []
    for staleness in configs:
        command = [mpiexec(), "-n", "3" if isinstance(staleness, int) else "2", sys.executable,
                   os.path.abspath(__file__), "--race-worker", "--epochs", str(args.epochs),
                   "--batch", str(args.batch), "--slowdown", str(args.slowdown),
                   "--limit", str(args.limit)]
        if staleness == "pipeline":
            command.append("--race-pipeline")
        elif staleness is not None:
            command += ["--race-staleness", str(staleness)]
        if args.backend:
            command += ["--backend", args.backend]
        if args.digits:
            command.append("--digits")
        env = {**os.environ, **{name: "1" for name in THREAD_VARIABLES}, "OPENBLAS_NUM_THREADS": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"{' '.join(command)} failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
        results.append(json.loads(lines[-1]))
        print(lines[-1], flush=True)
    sync = results[0]["samples_per_s"]
    print(f"\n| mode | ranks | samples/s | vs sync DP | eval accuracy after {args.epochs} epoch(s) "
          "| staleness mean / max |")
    print("|---|---|---|---|---|---|")
    for r in results:
        staleness = (f"{r['staleness_mean']:.2f} / {r['staleness_max']}" if "staleness_max" in r
                     else "-")
        print(f"| {r['mode']} | {r['ranks']} | {r['samples_per_s']:.0f} | "
              f"{r['samples_per_s'] / sync:.2f}x | {r['accuracy']:.4f} | {staleness} |")
    print(f"\n{results[0]['data']}, backend {results[0]['backend']}, 2 workers of batch "
          f"{args.batch}, the last slowed {args.slowdown:g}x, one thread per rank, on "
          f"{os.cpu_count()} cores")


# -- the driver ----------------------------------------------------------------------------------
def mpiexec() -> str | None:
    return (shutil.which("mpiexec", path=os.path.dirname(sys.executable))
            or shutil.which("mpiexec"))


def run_job(ranks: int, threads: int, args: argparse.Namespace) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch", str(args.batch)]
    if args.backend:
        command += ["--backend", args.backend]
    if ranks > 1:
        command = [mpiexec(), "-n", str(ranks), *command]
    env = {**os.environ, **{name: str(threads) for name in THREAD_VARIABLES},
           "OPENBLAS_NUM_THREADS": str(args.blas_threads)}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{ranks} rank(s) x {threads} thread(s) failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-1500:]}\n{proc.stderr[-1500:]}")
    return {**json.loads(lines[-1]), "threads": threads, "blas_threads": args.blas_threads}


def report(results: list[dict]) -> None:
    best_single = max((r["samples_per_s"] for r in results if r["ranks"] == 1), default=None)
    print("\n| ranks x threads | samples/s | vs 1 rank (best) | step ms | gradients ms | "
          "allreduce ms (bare) | update ms | allreduce share |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        bare = f" ({r['bare_allreduce_ms']:.2f})" if "bare_allreduce_ms" in r else ""
        speedup = f"{r['samples_per_s'] / best_single:.2f}x" if best_single else "-"
        share = r["allreduce_ms"] / r["step_ms"]
        print(f"| {r['ranks']} x {r['threads']} | {r['samples_per_s']:.0f} | {speedup} | "
              f"{r['step_ms']:.1f} | {r['gradients_ms']:.1f} | {r['allreduce_ms']:.2f}{bare} | "
              f"{r['update_ms']:.1f} | {share:.1%} |")
    first = results[0]
    print(f"\nbackend {first['backend']}, per-rank batch {first['batch_per_rank']}, "
          f"{first['reduced_values']} float32 values ({4 * first['reduced_values'] / 2**20:.1f} MiB) "
          f"allreduced per step, {first['blas_threads']} OpenBLAS thread(s) per rank, "
          f"on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="per rank")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="per rank")
    parser.add_argument("--blas-threads", type=int, default=1, help="OpenBLAS threads per rank")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--race", action="store_true",
                        help="sync DP against the async parameter server, with a straggler")
    parser.add_argument("--epochs", type=int, default=3, help="--race: epochs")
    parser.add_argument("--staleness", type=int, nargs="*", default=[0, 2, 8],
                        help="--race: the async max_staleness values")
    parser.add_argument("--slowdown", type=float, default=3.0,
                        help="--race: how many times slower the last worker is")
    parser.add_argument("--limit", type=int, default=0, help="--race: training images (0: all)")
    parser.add_argument("--digits", action="store_true", help="--race: scikit-learn's digits")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--race-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--race-staleness", type=int, help=argparse.SUPPRESS)  # None: sync DP
    parser.add_argument("--race-pipeline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pipeline", action="store_true",
                        help="--race: add PipelineParallelStep (2 stages, 4 micro-batches)")
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.race_worker:
        race_worker(args)
        return
    if mpiexec() is None and (args.race or max(args.ranks) > 1):
        sys.exit("mpiexec not found: pip install mpi4py mpich")
    if args.race:
        race(args)
        return
    configs = [(ranks, threads) for ranks in args.ranks for threads in args.threads]
    runs: dict[tuple[int, int], list[dict]] = {config: [] for config in configs}
    for round_ in range(args.rounds):
        # Interleaved, alternating order: drifting load on a shared machine hits all configs alike.
        for ranks, threads in configs if round_ % 2 == 0 else configs[::-1]:
            result = run_job(ranks, threads, args)
            print(f"round {round_ + 1}: {ranks} rank(s) x {threads} thread(s): "
                  f"{result['samples_per_s']:.0f} samples/s", flush=True)
            runs[(ranks, threads)].append(result)
    report([median_result(runs[config]) for config in configs])


def median_result(runs: list[dict]) -> dict:
    """Field by field median of a configuration's runs (numbers only)."""
    return {key: statistics.median(r[key] for r in runs) if isinstance(value, float) else value
            for key, value in runs[0].items()}


if __name__ == "__main__":
    main()
