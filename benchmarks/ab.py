"""A/B comparison of graphc at two git revisions on the training-step workloads.

    python benchmarks/ab.py BASE [HEAD] [--rounds 7] [--workloads mlp cnn] [--threads 2]

Each revision is checked out into a temporary worktree and installed (not editable) into its
own folder; both then run benchmarks/worker.py of the current tree, alternating A, B, B, A
round by round so the machine's drift falls on both alike. Each run uses its own warm kernel
cache (filled by one unmeasured run first), so first-call times compare loading, not LLVM.
Reported per workload: the median of the round-by-round step-time ratios B/A (below 1: B is
faster) with their range, and the same for the warm first call. HEAD defaults to the working
tree's HEAD commit.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def install(revision: str, into: str) -> str:
    """Install graphc at `revision` into `into`/site; returns that folder."""
    tree, site = os.path.join(into, "tree"), os.path.join(into, "site")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "-f", "--detach", tree, revision],
                   check=True, capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-build-isolation", "--target", site, tree], check=True)
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], capture_output=True)
    return site


def measure(site: str, cache: str, workload: str, steps: int, threads: int | None) -> dict:
    env = {**os.environ, "PYTHONPATH": site, "GRAPHC_CACHE_DIR": cache}
    if threads:
        env.update(GRAPHC_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    # run from a neutral folder: the repository's own graphc/ must not shadow the installed one
    proc = subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), "--system", "graphc",
                           "--workload", workload, "--steps", str(steps)],
                          capture_output=True, text=True, env=env, cwd=cache, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{site} / {workload} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def summary(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("head", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="graphc-ab-")
    try:
        sides = {}
        for label, revision in (("A", args.base), ("B", args.head)):
            folder = os.path.join(work, label)
            sides[label] = (install(revision, folder), os.path.join(folder, "cache"))
            os.makedirs(sides[label][1])
        print(f"A = {args.base}, B = {args.head}; ratios are B/A (below 1: B faster)")
        for workload in args.workloads:
            for site, cache in sides.values():  # fills each cache, unmeasured
                measure(site, cache, workload, 3, args.threads)
            step_ratios, first_ratios = [], []
            for round_ in range(args.rounds):
                order = "AB" if round_ % 2 == 0 else "BA"
                result = {label: measure(*sides[label], workload, args.steps, args.threads)
                          for label in order}
                step_ratios.append(result["B"]["median_step_s"] / result["A"]["median_step_s"])
                first_ratios.append(result["B"]["first_call_s"] / result["A"]["first_call_s"])
            print(f"{workload}: step time B/A {summary(step_ratios)}; "
                  f"warm first call B/A {summary(first_ratios)}; {args.rounds} rounds")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
