"""examples/char_gpt.py trains: its loss falls within a few dozen steps and it samples text
from the README's characters, with one compiled training step throughout the schedule."""
import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def char_gpt():
    spec = importlib.util.spec_from_file_location("char_gpt", os.path.join(ROOT, "examples", "char_gpt.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_loss_falls_and_it_samples_text(char_gpt):
    result = char_gpt.main(["--steps", "40", "--backend", "reference", "--sample", "30"])
    losses = result["losses"]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        vocabulary = set(f.read())
    assert first > 0.95 * math.log(len(vocabulary))  # starts near uniform guessing
    assert last < first - 0.5, losses
    assert len(result["sample"]) == 8 + 30 and set(result["sample"]) <= vocabulary


def test_parameter_groups_decay_the_matrices_only(char_gpt):
    model = char_gpt.CharGPT(vocab_size=10, context=8, d_model=16, n_heads=2, n_layers=1)
    decay, no_decay = char_gpt.parameter_groups(model, 0.1)
    assert all(p.ndim == 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.token_embedding.weight for p in decay["params"])
