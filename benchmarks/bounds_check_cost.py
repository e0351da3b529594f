"""What checking index arrays costs a training step (backends/bounds.py).

    python benchmarks/bounds_check_cost.py [--rounds 30] [--steps 5] [--backend numba-cpu]

Two workloads, each compiled four times in this process, in the order with, without, without,
with the checks (without: GRAPHC_BOUNDS_CHECK=0 at compile time, an internal switch for this
measurement only). The variants share every kernel; only the checks differ. Compiling in
this ABBA order matters: of two identical executables of the LM step, the first compiled ran
2-4% slower than the second (where their arenas landed, presumably), more than the checks
cost. Rounds alternate the order of the four, so drifts of the machine hit all alike; each
round times `steps` steps of each. Prints per-step medians of each variant (its two
executables pooled) and their ratio, the ratio of the two executables *with* checks (the
noise floor: they are identical), and the checks' own time measured alone (the same checks
on the same arrays, many times), which a ratio of noisy medians cannot resolve below a
percent. On a busy 2-core machine, GRAPHC_NUM_THREADS=1 keeps parallel kernels from waiting
on preempted threads.

- cnn: the MNIST CNN training step (graphc.models.mnist_cnn, batch 64, Adam), one check of
  the labels (the loss's take_along_axis and its gradient's scatter share it).
- lm: a small transformer language model built from graphc ops (token embedding, causal
  self-attention with batched matmuls and softmax, layer norm written from mean and variance,
  an MLP, cross-entropy over every token), batch 16 x 32 tokens, Adam: one check of the token
  ids (embedding and its gradient's scatter-add) and one of the next-token targets.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.backends.bounds import IndexCheck
from graphc.models import mnist_cnn


def layer_norm(x: gc.Tensor, weight: gc.Tensor, bias: gc.Tensor, eps: float = 1e-5) -> gc.Tensor:
    mean = x.mean(-1, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(-1, keepdims=True)
    return centred / (var + eps).sqrt() * weight + bias


class Block(nn.Module):
    """Pre-norm transformer block: causal multi-head attention, then a ReLU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.norm1_w, self.norm1_b = nn.Parameter(np.ones(dim, np.float32)), nn.Parameter(np.zeros(dim, np.float32))
        self.norm2_w, self.norm2_b = nn.Parameter(np.ones(dim, np.float32)), nn.Parameter(np.zeros(dim, np.float32))

    def split(self, x: gc.Tensor) -> gc.Tensor:
        n, t, d = x.shape
        return x.reshape(n, t, self.heads, d // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: gc.Tensor) -> gc.Tensor:
        n, t, d = x.shape
        a = layer_norm(x, self.norm1_w, self.norm1_b)
        q, k, v = self.split(self.query(a)), self.split(self.key(a)), self.split(self.value(a))
        causal = np.triu(np.full((t, t), -1e9, np.float32), 1)
        scores = q @ k.transpose(-1, -2) * (1.0 / np.sqrt(d // self.heads)) + causal
        attended = (F.softmax(scores, -1) @ v).permute(0, 2, 1, 3).reshape(n, t, d)
        x = x + self.out(attended)
        return x + self.down(F.relu(self.up(layer_norm(x, self.norm2_w, self.norm2_b))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 256, dim: int = 64, heads: int = 4, layers: int = 2,
                 length: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(np.random.default_rng(0).standard_normal((length, dim)).astype(np.float32) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(layers)])
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: gc.Tensor) -> gc.Tensor:
        return self.head(self.blocks(self.embed(ids) + self.position))


def token_loss(logits: gc.Tensor, targets: gc.Tensor) -> gc.Tensor:
    n, t, vocab = logits.shape
    return F.cross_entropy(logits.reshape(n * t, vocab), targets.reshape(n * t))


def workload(name: str, backend: str | None, checked: bool):
    """A compiled step (its own model, same seed for both variants) and its batch."""
    os.environ["GRAPHC_BOUNDS_CHECK"] = "1" if checked else "0"
    try:
        gc.manual_seed(0)
        rng = np.random.default_rng(0)
        if name == "cnn":
            model, loss = mnist_cnn(), F.cross_entropy
            batch = (rng.standard_normal((64, 1, 28, 28)).astype(np.float32), rng.integers(0, 10, 64))
        else:
            model, loss = TinyLM(), token_loss
            tokens = rng.integers(0, 256, (16, 33))
            batch = (tokens[:, :-1].copy(), tokens[:, 1:].copy())
        step = gc.compile_train_step(model, loss, optim.Adam(model.parameters(), lr=1e-3), batch,
                                     backend=backend)
    finally:
        del os.environ["GRAPHC_BOUNDS_CHECK"]
    return step, batch


def time_steps(step, batch, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step(*batch)
    return (time.perf_counter() - start) / steps


def checks_alone(name: str, batch, repeat: int = 20000) -> float:
    """Seconds per step of the checks that step runs, timed alone on the same arrays."""
    if name == "cnn":
        arrays = [(batch[1].reshape(-1, 1), 10)]
    else:
        arrays = [(batch[0], 256), (batch[1].reshape(-1, 1), 256)]
    checks = [(IndexCheck(None, "op", size, False, None), a) for a, size in arrays]
    start = time.perf_counter()
    for _ in range(repeat):
        for check, array in checks:
            check(array)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    for name in ("cnn", "lm"):
        checked = (True, False, False, True)
        built = [workload(name, args.backend, c) for c in checked]
        steps, batch = [step for step, _ in built], built[0][1]
        for step in steps:  # warm up
            time_steps(step, batch, 3)
        times: list[list[float]] = [[] for _ in steps]
        for r in range(args.rounds):
            for k in (range(4) if r % 2 == 0 else reversed(range(4))):
                times[k].append(time_steps(steps[k], batch, args.steps))
        with_checks = statistics.median(times[0] + times[3])
        without = statistics.median(times[1] + times[2])
        floor = statistics.median(times[0]) / statistics.median(times[3])
        alone = checks_alone(name, batch)
        print(f"{name}: step {with_checks * 1e3:.3f} ms with checks, {without * 1e3:.3f} ms without "
              f"(medians of {args.rounds} rounds x {args.steps} steps x 2 executables): ratio "
              f"{with_checks / without:.4f} (two identical executables: {floor:.4f}); the checks "
              f"alone {alone * 1e6:.2f} us = {alone / without:.3%} of the step")


if __name__ == "__main__":
    main()
