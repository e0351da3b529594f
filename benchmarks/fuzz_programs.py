"""Nightly fuzzing with random programs over the public API (tests/random_programs.py).

    python benchmarks/fuzz_programs.py [--programs 20000] [--seed N] [--cpu 500] [--large 20]
                                       [--max-steps 10] [--batch 500]

Runs `--programs` programs through the float64 reference checks (transform composition,
simplify, fused and memory-planned graph, finite differences), `--cpu` of them (smaller) on
numba-cpu against the reference, and `--large` with one axis over the CPU backend's parallel
threshold, drawn from `--seed`. A failure ends its batch once hypothesis has shrunk it; the
run goes on with the next batch (seeded from the same seed), so one bug does not hide others.
At the end: programs run per backend, failures, and each distinct failure's minimal program
as Python source that reruns on its own. The exit status is 1 when anything failed.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Callable

from hypothesis import HealthCheck, given, seed, settings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import random_programs as rp  # noqa: E402  (after the tests folder is on the path)


def fuzz(name: str, strategy, check: Callable[[rp.Program], None], count: int, batch: int,
         base_seed: int, failures: dict[str, tuple[str, rp.Program]]) -> None:
    """Run `count` programs in batches; record each batch's shrunk failure by its signature."""
    done = 0
    while done < count:
        size = min(batch, count - done)
        last: list[rp.Program] = []

        @seed(base_seed * 1_000_003 + done)
        @settings(max_examples=size, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck), print_blob=False)
        @given(strategy)
        def run(program: rp.Program) -> None:
            last[:] = [program]
            check(program)

        try:
            run()
        except Exception as exc:  # the last program run is the one hypothesis shrank to
            message = f"{type(exc).__name__}: {exc}"
            signature = f"{name}: " + re.sub(r"[-+]?\d[\d.e+-]*", "#", message.splitlines()[0])[:160]
            failures.setdefault(signature, (message, last[0]))
            print(f"[{name}] failure in batch at {done}: {message.splitlines()[0][:200]}", flush=True)
        done += size
        print(f"[{name}] {done}/{count} programs", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--programs", type=int, default=20000, help="programs on the reference backend")
    parser.add_argument("--cpu", type=int, default=500, help="programs also compiled for numba-cpu")
    parser.add_argument("--large", type=int, default=20, help="numba-cpu programs over the parallel threshold")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=500)
    options = parser.parse_args()

    failures: dict[str, tuple[str, rp.Program]] = {}
    start = time.perf_counter()
    fuzz("reference", rp.programs(max_steps=options.max_steps), rp.check_reference,
         options.programs, options.batch, options.seed, failures)
    cpu = lambda program: rp.check_backend(program, "numba-cpu")  # noqa: E731
    fuzz("numba-cpu", rp.programs(max_steps=max(3, options.max_steps // 2)), cpu,
         options.cpu, options.batch, options.seed + 1, failures)
    fuzz("numba-cpu large", rp.programs(max_steps=3, large=True), cpu,
         options.large, options.batch, options.seed + 2, failures)

    print(f"\n{time.perf_counter() - start:.0f} s; programs run (shrinking reruns included): "
          + ", ".join(f"{k}: {v}" for k, v in sorted(rp.COUNTS.items())))
    print(f"{len(failures)} distinct failure(s)")
    for signature, (message, program) in failures.items():
        print(f"\n==== {signature}\n{message}\n\n{program}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
