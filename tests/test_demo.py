"""`make demo` runs: the demo script end to end on a small slice."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_runs(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "demo.py"), "--limit", "256",
                           "--epochs", "1", "--no-progress"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "graph mlp_loss(" in out and "grad_params['w1']" in out
    assert "epoch 1: loss" in out and "final evaluation: accuracy" in out and "confusion matrix" in out
    assert (tmp_path / "demo_out" / "mnist_train_step.dot").read_text().startswith("digraph")
