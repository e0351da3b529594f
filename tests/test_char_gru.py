"""examples/char_gru.py trains: at a small size its loss falls within a few dozen steps, its
training step runs the 64-character recurrence as scans (one per layer, forward and backward)
rather than 64 cells, and it samples text from the README's characters."""
import importlib.util
import math
import os
import sys

import pytest

from graphc.ir.ops.control import SCAN_OP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def char_gru():
    spec = importlib.util.spec_from_file_location("char_gru", os.path.join(ROOT, "examples", "char_gru.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_loss_falls_over_scanned_steps_and_it_samples_text(char_gru):
    result = char_gru.train(steps=30, backend="reference", batch_size=4, seq_len=64, d_embed=16,
                            hidden=32, sample_chars=20, log_every=10)
    losses = result["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        vocabulary = set(f.read())
    # starts near uniform guessing (the first step's loss: the mean of five had already fallen
    # below 0.95 log V once the README grew to 89 characters)
    assert abs(losses[0] - math.log(len(vocabulary))) < 0.1 * math.log(len(vocabulary)), losses[0]
    assert last < first - 0.5, losses

    graph = result["step"].graph
    loops = [n for n in graph.nodes if n.op == SCAN_OP]
    assert len(loops) == 2 * 2  # 2 layers, each a forward scan and its gradient's
    assert all(n.attrs["length"] == 64 for n in loops)
    assert len(graph.nodes) < 500, len(graph.nodes)  # 245 measured; unrolled, 16 steps make 1769

    assert len(result["sample"]) == 8 + 20 and set(result["sample"]) <= vocabulary
