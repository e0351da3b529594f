"""benchmarks/serve.py still runs: at a tiny size (an 8x8 CNN, a few dozen requests) it serves
the model with both engines it compares (graphc, and onnxruntime behind graphc's HTTP stack),
produces its table with no failed request, and its malformed-request soak passes. The
batch-1 servers differ from these only by --max-batch 1; each server start costs seconds."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("prometheus_client")
pytest.importorskip("onnxruntime")

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", "serve.py")
TINY = ["--image-size", "8", "--max-batch", "8", "--pool", "16", "--seconds", "20",
        "--startup-seconds", "120"]


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *TINY, *args], capture_output=True,
                          text=True, timeout=300)


def test_load_generator_table(tmp_path):
    results = tmp_path / "results.json"
    proc = run_bench("--requests", "24", "--warmup", "4", "--concurrency", "1", "8",
                     "--servers", "graphc", "onnxruntime", "--json", str(results))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "| server | concurrency |" in proc.stdout
    rows = json.loads(results.read_text())["rows"]
    servers = ["graphc", "onnxruntime"]
    assert [(r["server"], r["concurrency"]) for r in rows] == [(s, c) for s in servers for c in (1, 8)]
    for r in rows:
        assert r["requests"] == 24 and r["failed"] == 0, r
        assert 0 < r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"], r
        assert r["server_cpu_ms"] >= 0 and r["client_cpu_ms"] > 0, r
    assert sum(r["server_cpu_ms"] for r in rows) > 0  # /proc counts in 10 ms ticks
    assert "throughput at concurrency 8, graphc / onnxruntime" in proc.stdout


def test_malformed_soak(tmp_path):
    results = tmp_path / "soak.json"
    proc = run_bench("--malformed", "--requests", "400", "--soak-concurrency", "8",
                     "--json", str(results))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    soak = json.loads(results.read_text())
    assert soak["passed"] and soak["requests"] == 400
    assert soak["malformed"] == 4 and soak["server_errors"] == 0
    assert sum(n for code, n in soak["statuses"].items() if code.startswith("4")) == 4
