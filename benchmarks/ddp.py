"""Data-parallel throughput of the MNIST CNN training step: 1 rank against 2 ranks (MPI).

    python benchmarks/ddp.py [--rounds 3] [--steps 10] [--batch 64] [--backend numba-cpu]
                             [--threads 1 2] [--blas-threads 1]

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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if max(args.ranks) > 1 and mpiexec() is None:
        sys.exit("mpiexec not found: pip install mpi4py mpich")
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
