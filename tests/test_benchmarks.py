"""The training-step benchmarks still run: every model family of benchmarks/models.py trains
one step at its tiny size in graphc and (when installed) PyTorch, from the same weights, with
first losses that agree; run.py puts the results together."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is the benchmarks' peer")
# One workload per family: the sizes of a family's variants differ only at full size.
FAMILIES = ["transformer-s", "resnet-s", "lstm-28"]


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args],
                          capture_output=True, text=True, timeout=600)


def worker(*args: str) -> dict:
    proc = run_script("worker.py", "--tiny", "--steps", "1", "--warmup", "0",
                      "--min-seconds", "0", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.slow  # 10-40 s each: graphc compiles the step cold, PyTorch imports
@pytest.mark.parametrize("workload", FAMILIES)
def test_graphc_and_pytorch_train_the_same_model(workload, tmp_path):
    init = []
    if HAS_TORCH:
        init = ["--init", str(tmp_path / "init.npz")]
        proc = run_script("worker.py", "--tiny", "--workload", workload, "--export-init", init[1])
        assert proc.returncode == 0, proc.stderr[-3000:]
    graphc = worker("--system", "graphc", "--workload", workload, *init)
    assert graphc["samples_per_s"] > 0 and graphc["arena_bytes"] > 0
    # a ragged batch ran after the timed steps (a size the step was not compiled for)
    assert graphc["other_batch"] == graphc["batch"] // 2 + 1 and graphc["other_batch_first_call_s"] > 0
    if HAS_TORCH:
        assert graphc["init"] == "pytorch"
        torch = worker("--system", "torch", "--workload", workload)
        assert graphc["first_loss"] == pytest.approx(torch["first_loss"], rel=1e-4)


def test_worker_reports_a_failure_as_json(tmp_path):
    """A system that cannot build its step is reported (run.py skips it) rather than crashing
    the run: here graphc given weights of another model."""
    bad = tmp_path / "bad.npz"
    np.savez(bad, weight=np.zeros(3, np.float32))
    proc = run_script("worker.py", "--tiny", "--steps", "1", "--system", "graphc",
                      "--workload", "lstm-28", "--init", str(bad))
    assert proc.returncode == 1
    result = json.loads(proc.stdout.splitlines()[-1])
    assert "load_state_dict" in result["error"] and "weight" in result["error"]


@needs_torch
@pytest.mark.slow
def test_torch_compile_runs_a_step():
    result = worker("--system", "torch-compile", "--workload", "lstm-28")
    assert result["samples_per_s"] > 0


@needs_torch
@pytest.mark.slow
def test_run_compares_first_losses_and_reports_ratios():
    proc = run_script("run.py", "--tiny", "--rounds", "1", "--steps", "1", "--systems", "graphc",
                      "torch", "--workloads", "mlp", "lstm-28")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "| lstm-28 | graphc |" in out and "| lstm-28 | torch | " in out
    assert "lstm-28: first losses agree" in out and "mlp: first losses agree" in out
    assert "lstm-28: graphc / PyTorch eager round by round" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| lstm-28 |")]
    assert len(rows) == 2 and all(len(cells) == 9 for cells in rows)
    if sys.platform.startswith("linux"):  # /proc/self/clear_refs resets the peak there
        assert all(cells[-1].strip().endswith("MiB") for cells in rows)  # the process's peak
