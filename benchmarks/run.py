"""Training-step benchmark: graphc against PyTorch eager (and JAX and PyTensor's Numba backend
when installed: `pip install -e '.[peers]'`), side by side.

    python benchmarks/run.py [--rounds 5] [--steps 30] [--workloads mlp cnn]

Each measurement runs in its own process; systems are interleaved round by round so machine
noise hits all of them alike. Reported: median samples/s over rounds, the ratio to PyTorch
eager, graphc's round-by-round ratios to each peer (median and range), graphc's first call with a
cold and with a warm kernel cache, and the peak memory the steps add (plus graphc's planned arena
against the naive sum). JAX and PyTensor run the MLP only.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = {"torch": "PyTorch eager", "jax": "JAX jit", "pytensor": "PyTensor (Numba)"}
MLP_ONLY = {"jax", "pytensor"}


def measure(system: str, workload: str, steps: int, env: dict[str, str]) -> dict:
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--system", system,
           "--workload", workload, "--steps", str(steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{system}/{workload} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of every system in turn; ratios on a noisy machine need several")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workloads", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--json", default=None, help="also write all raw results to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every system (GRAPHC_NUM_THREADS, OMP_NUM_THREADS); "
                             "default: each system's own default (all cores)")
    args = parser.parse_args()

    systems = ["graphc"] + [s for s in PEERS if importlib.util.find_spec(s)]
    if "torch" not in systems:
        print("PyTorch is not installed (pip install -e '.[compare]'): ratios are to the other peers")
    cache = tempfile.mkdtemp(prefix="graphc-bench-cache-")
    base_env = {**os.environ, "GRAPHC_CACHE_DIR": cache}
    if args.threads:
        base_env.update(GRAPHC_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    results: dict[tuple[str, str], list[dict]] = {}
    cold: dict[str, dict] = {}
    try:
        for workload in args.workloads:
            # The first graphc run of a workload compiles into an empty cache: the cold start.
            cold[workload] = measure("graphc", workload, 3, base_env)
        for r in range(args.rounds):
            for workload in args.workloads:
                order = systems if r % 2 == 0 else systems[::-1]
                for system in order:
                    if system in MLP_ONLY and workload != "mlp":
                        continue
                    res = measure(system, workload, args.steps, base_env)
                    results.setdefault((system, workload), []).append(res)
                    print(f"round {r + 1}: {system:6s} {workload}: {res['samples_per_s']:9.0f} samples/s",
                          flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)

    print("\n| workload | system | samples/s (median) | vs PyTorch eager | first call | step peak RSS |")
    print("|---|---|---|---|---|---|")
    for workload in args.workloads:
        torch_rate = None
        if ("torch", workload) in results:
            torch_rate = statistics.median(r["samples_per_s"] for r in results[("torch", workload)])
        for system in systems:
            runs = results.get((system, workload))
            if not runs:
                continue
            rate = statistics.median(r["samples_per_s"] for r in runs)
            ratio = f"{rate / torch_rate:.2f}x" if torch_rate else "-"
            first = statistics.median(r["first_call_s"] for r in runs)
            first_text = f"{first:.2f} s" + (" (warm cache)" if system == "graphc" else "")
            if system == "graphc":
                first_text = f"{cold[workload]['first_call_s']:.2f} s cold / " + first_text
            peaks = [r["step_peak_extra_kib"] for r in runs if r.get("step_peak_extra_kib") is not None]
            peak = f"{statistics.median(peaks) / 1024:.1f} MiB" if peaks else "n/a"
            print(f"| {workload} | {system} | {rate:,.0f} | {ratio} | {first_text} | {peak} |")
    print()
    for workload in args.workloads:
        for peer, name in PEERS.items():
            # each round's pair ran back to back: their ratio cancels slow phases of the machine
            pairs = list(zip(results.get(("graphc", workload), []), results.get((peer, workload), [])))
            if pairs:
                ratios = sorted(g["samples_per_s"] / p["samples_per_s"] for g, p in pairs)
                print(f"{workload}: graphc / {name} round by round: median "
                      f"{statistics.median(ratios):.2f}x (from {ratios[0]:.2f}x to {ratios[-1]:.2f}x "
                      f"over {len(ratios)} rounds)")
    for workload in args.workloads:
        g = results.get(("graphc", workload), [{}])[-1]
        if "arena_bytes" in g:
            total = (g["arena_bytes"] + g["state_bytes"]) / 2**20
            print(f"\ngraphc {workload}: arena {g['arena_bytes'] / 2**20:.1f} MiB (naive sum of "
                  f"intermediates {g['naive_bytes'] / 2**20:.1f} MiB) + parameters and optimizer state "
                  f"{g['state_bytes'] / 2**20:.1f} MiB = {total:.1f} MiB")
        for system in systems:
            peaks = [r["training_peak_kib"] for r in results.get((system, workload), [])
                     if r.get("training_peak_kib") is not None]
            if peaks:
                print(f"{system} {workload}: RSS growth from before the model was built to the step "
                      f"peak {statistics.median(peaks) / 1024:.1f} MiB"
                      + (" (with Numba/LLVM loading the cached kernels)" if system == "graphc" else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cold": cold, "runs": {f"{s}/{w}": v for (s, w), v in results.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
