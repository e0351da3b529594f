"""Training-step benchmark: graphc against PyTorch eager and torch.compile (and, on the MLP, JAX
and PyTensor's Numba backend when installed: `pip install -e '.[peers]'`), side by side.

    python benchmarks/run.py [--rounds 5] [--steps 30] [--workloads mlp transformer-s ...]
                             [--threads N] [--json FILE]

Workloads (models.py): mlp, cnn (MNIST), transformer-s/-m (causal language models),
resnet-s/-m (CIFAR-style ResNets with batch norm), lstm-28/-64 (sequence classifiers). graphc
and PyTorch train the same model from the same initial weights (PyTorch's, loaded into graphc)
on the same seeded batch with the same optimizer, and their first losses are compared.

Each measurement runs in its own process; systems are interleaved round by round so machine
noise hits all of them alike. Reported: median samples/s over rounds, the ratio to PyTorch
eager, graphc's round-by-round ratios to each peer (median and range), the first call of graphc
and torch.compile with a cold and with a warm compilation cache, graphc's first call at another
batch size (kernels reused, a new memory plan), and peak memory: what the model, its compilation
and its steps add from before the model was built (graphc's includes importing and setting up
Numba and LLVM; PyTorch's import comes before that point), and the whole process's peak during
the steps (plus graphc's planned arena against the naive sum). A system that fails on a workload (for
example torch.compile without a C compiler) is reported once and skipped there; the run exits
with status 1 if graphc or PyTorch eager failed.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import WORKLOADS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = {"torch": "PyTorch eager", "torch-compile": "torch.compile", "jax": "JAX jit",
         "pytensor": "PyTensor (Numba)"}
MLP_ONLY = {"jax", "pytensor"}
COMPILERS = ("graphc", "torch-compile")  # systems whose first call has a cold and a warm cache
LOSS_TOLERANCE = 1e-4  # relative: float32 forward passes of the same model in different orders


def measure(system: str, workload: str, steps: int, env: dict[str, str],
            init: str | None = None, tiny: bool = False) -> dict:
    """One worker process's result, or {"error": text} when it failed."""
    cmd = [sys.executable, os.path.join(HERE, "worker.py"), "--system", system,
           "--workload", workload, "--steps", str(steps)] + (["--tiny"] if tiny else [])
    if init and system == "graphc":
        cmd += ["--init", init]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    except subprocess.TimeoutExpired:
        return {"error": "no result within 900 s"}
    lines = [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode == 0 and lines:
        return lines[-1]
    if lines and "error" in lines[-1]:
        return lines[-1]
    return {"error": f"exit status {proc.returncode}: {proc.stderr[-2000:]}"}


def export_inits(workloads: list[str], directory: str, env: dict[str, str],
                 tiny: bool) -> dict[str, str]:
    """PyTorch's initial weights of every workload, as .npz files graphc loads."""
    paths = {}
    for workload in workloads:
        paths[workload] = os.path.join(directory, f"{workload}-init.npz")
        subprocess.run([sys.executable, os.path.join(HERE, "worker.py"), "--workload", workload,
                        "--export-init", paths[workload]] + (["--tiny"] if tiny else []),
                       env=env, check=True)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of every system in turn; ratios on a noisy machine need several")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--json", default=None, help="also write all raw results to this file")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every system (GRAPHC_NUM_THREADS, OMP_NUM_THREADS); "
                             "default: each system's own default (all cores)")
    parser.add_argument("--systems", nargs="+", choices=["graphc", *PEERS],
                        help="default: graphc and every installed peer")
    parser.add_argument("--tiny", action="store_true",
                        help="the workloads' smoke-test sizes (checks that everything runs)")
    args = parser.parse_args()

    has_torch = importlib.util.find_spec("torch") is not None
    systems = ["graphc"] + (["torch", "torch-compile"] if has_torch else []) + [
        s for s in ("jax", "pytensor") if importlib.util.find_spec(s)]
    if args.systems:
        systems = [s for s in systems if s in args.systems]
    if not has_torch:
        print("PyTorch is not installed (pip install -e '.[compare]'): ratios are to the other "
              "peers, and graphc starts from its own initial weights")
    scratch = tempfile.mkdtemp(prefix="graphc-bench-")
    base_env = dict(os.environ)
    if args.threads:
        base_env.update(GRAPHC_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads))
    # Fresh caches per workload: the first run of each compiler on a workload is its cold start
    # (with a shared cache, a workload would find the kernels an earlier one compiled).
    envs = {w: {**base_env, "GRAPHC_CACHE_DIR": os.path.join(scratch, w, "graphc"),
                "TORCHINDUCTOR_CACHE_DIR": os.path.join(scratch, w, "inductor")}
            for w in args.workloads}
    runs = [(s, w) for w in args.workloads for s in systems if not (s in MLP_ONLY and w != "mlp")]
    results: dict[tuple[str, str], list[dict]] = {}
    cold: dict[tuple[str, str], dict] = {}
    errors: dict[tuple[str, str], str] = {}
    try:
        inits = export_inits(args.workloads, scratch, base_env, args.tiny) if has_torch else {}
        for system, workload in runs:
            if system in COMPILERS:
                res = measure(system, workload, 3, envs[workload], inits.get(workload), args.tiny)
                if "error" in res:
                    errors[(system, workload)] = res["error"]
                else:
                    cold[(system, workload)] = res
        for r in range(args.rounds):
            for workload in args.workloads:
                order = systems if r % 2 == 0 else systems[::-1]
                for system in order:
                    if (system, workload) not in runs or (system, workload) in errors:
                        continue
                    res = measure(system, workload, args.steps, envs[workload], inits.get(workload),
                                  args.tiny)
                    if "error" in res:
                        errors[(system, workload)] = res["error"]
                        continue
                    results.setdefault((system, workload), []).append(res)
                    print(f"round {r + 1}: {system:13s} {workload:13s}: "
                          f"{res['samples_per_s']:9.0f} samples/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    report_table(args.workloads, systems, results, cold)
    report_ratios(args.workloads, results)
    report_first_losses(args.workloads, systems, results)
    report_memory(args.workloads, systems, results)
    report_errors(errors)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cold": {f"{s}/{w}": v for (s, w), v in cold.items()},
                       "runs": {f"{s}/{w}": v for (s, w), v in results.items()},
                       "errors": {f"{s}/{w}": v for (s, w), v in errors.items()}}, f, indent=1)
    if any(system in ("graphc", "torch") for system, _ in errors):
        sys.exit(1)


def median_of(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def report_table(workloads: list[str], systems: list[str], results: dict, cold: dict) -> None:
    print("\n| workload | system | samples/s (median) | vs PyTorch eager | first call "
          "(cold / warm cache) | another batch size: first call | step peak RSS | training peak RSS "
          "| process peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|")
    for workload in workloads:
        torch_rate = median_of(results.get(("torch", workload), []), "samples_per_s")
        for system in systems:
            runs = results.get((system, workload))
            if not runs:
                continue
            rate = median_of(runs, "samples_per_s")
            ratio = f"{rate / torch_rate:.2f}x" if torch_rate else "-"
            first = f"{median_of(runs, 'first_call_s'):.2f} s"
            if (system, workload) in cold:
                res = cold[(system, workload)]
                final = res.get("final_kernels_s", 0.0)
                # serial stand-ins ran the first call while the parallel kernels compiled
                background = f" (final kernels {final:.1f} s)" if final > res["first_call_s"] + 0.1 else ""
                first = f"{res['first_call_s']:.2f} s{background} / {first}"
            other = median_of(runs, "other_batch_first_call_s")
            other = f"{other:.2f} s (batch {runs[0]['other_batch']})" if other is not None else "-"
            peaks = [mib(median_of(runs, key))
                     for key in ("step_peak_extra_kib", "training_peak_kib", "process_peak_kib")]
            print(f"| {workload} | {system} | {rate:,.0f} | {ratio} | {first} | {other} | {peaks[0]} "
                  f"| {peaks[1]} | {peaks[2]} |")


def mib(kib: float | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


def report_ratios(workloads: list[str], results: dict) -> None:
    print()
    for workload in workloads:
        for peer, name in PEERS.items():
            # each round's pair ran back to back: their ratio cancels slow phases of the machine
            pairs = list(zip(results.get(("graphc", workload), []), results.get((peer, workload), [])))
            if pairs:
                ratios = sorted(g["samples_per_s"] / p["samples_per_s"] for g, p in pairs)
                print(f"{workload}: graphc / {name} round by round: median "
                      f"{statistics.median(ratios):.2f}x (from {ratios[0]:.2f}x to {ratios[-1]:.2f}x "
                      f"over {len(ratios)} rounds)")


def report_first_losses(workloads: list[str], systems: list[str], results: dict) -> None:
    """Same weights, data and model: the first losses must agree (the benchmark measures the
    same computation on every side)."""
    print()
    for workload in workloads:
        losses = {s: results[(s, workload)][0]["first_loss"] for s in systems
                  if (s, workload) in results and s not in MLP_ONLY}
        if "torch" not in losses or len(losses) < 2:
            continue
        if not WORKLOADS[workload].deterministic:
            print(f"{workload}: first losses not compared (dropout draws different masks)")
            continue
        reference = losses["torch"]
        worst = max(abs(v - reference) for v in losses.values())
        verdict = ("agree" if worst <= LOSS_TOLERANCE * max(1.0, abs(reference))
                   else f"DIFFER by more than {LOSS_TOLERANCE:g} (relative)")
        print(f"{workload}: first losses {verdict}: "
              + ", ".join(f"{s} {v:.6f}" for s, v in losses.items())
              + f" (largest difference {worst:.1e})")


def report_memory(workloads: list[str], systems: list[str], results: dict) -> None:
    for workload in workloads:
        g = results.get(("graphc", workload), [{}])[-1]
        if "arena_bytes" in g:
            total = (g["arena_bytes"] + g["state_bytes"]) / 2**20
            print(f"\ngraphc {workload}: {g.get('kernels', '?')} kernels, arena "
                  f"{g['arena_bytes'] / 2**20:.1f} MiB (naive sum of intermediates "
                  f"{g['naive_bytes'] / 2**20:.1f} MiB) + parameters and optimizer state "
                  f"{g['state_bytes'] / 2**20:.1f} MiB = {total:.1f} MiB")
        for system in systems:
            peak = median_of(results.get((system, workload), []), "training_peak_kib")
            if peak is not None:
                print(f"{system} {workload}: RSS growth from before the model was built to the step "
                      f"peak {peak / 1024:.1f} MiB"
                      + (" (with Numba/LLVM loading the cached kernels)" if system == "graphc" else ""))


def report_errors(errors: dict[tuple[str, str], str]) -> None:
    """Each distinct failure once, with the workloads it stopped."""
    by_text: dict[tuple[str, str], list[str]] = {}
    for (system, workload), text in errors.items():
        by_text.setdefault((system, text), []).append(workload)
    for (system, text), workloads in by_text.items():
        lines = text.strip().splitlines()
        shown = "\n    ".join(lines[:8]) + ("\n    ..." if len(lines) > 8 else "")
        print(f"\n{system} failed on {', '.join(workloads)} (skipped there):\n    {shown}")


if __name__ == "__main__":
    main()
