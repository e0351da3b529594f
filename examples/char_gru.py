"""A character-level GRU language model trained on graphc's own README, over 256-character windows.

    python examples/char_gru.py [--steps 150] [--backend numba-cpu] [--sample 200]

An embedding of the characters, a 2-layer nn.GRU, a linear head and the cross-entropy of every
position's prediction of the next character; Adam, one compiled training step. Then it samples
text one character at a time, carrying the GRU's hidden state from step to step.

What it demonstrates: a recurrence of 256 steps traced once as a `gc.scan` (recurrent layers
scan beyond 32 steps, graphc/nn/recurrent.py), so the training step's graph holds one scan per
layer and direction in the forward pass and one in the backward, never 256 cells, and its
compile time does not grow with the length. Measured on numba-cpu, 2 cores, defaults (batch 16,
embedding 32, hidden 128, 150 steps): tracing, compiling and the first step took 6.3 s on the
first run of this model; training runs at 3.4 steps/s, and the loss, 3.62 over the first 10
steps (uniform guessing over 88 characters: 4.48), is 0.29 over the last 10 (it memorises the
README); the whole run takes 52 s. With the kernel cache warm, tracing, compiling and the first
step take 1.2 s over 64 characters and 2.1 s over 1024, the difference being that step's own
run: the graph is the same size whatever the length.
"""
from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CharGRU(nn.Module):
    def __init__(self, vocab_size: int, d_embed: int = 32, hidden: int = 128,
                 num_layers: int = 2) -> None:
        super().__init__()
        self.hidden, self.num_layers = hidden, num_layers
        self.embedding = nn.Embedding(vocab_size, d_embed)
        self.gru = nn.GRU(d_embed, hidden, num_layers=num_layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, idx, h=None):
        """(logits (N, T, vocab), h_n (num_layers, N, hidden)) for characters idx (N, T),
        starting from the hidden state h (zeros if None)."""
        output, h_n = self.gru(self.embedding(idx), h)
        return self.head(output), h_n


def next_char_loss(output, targets):
    """Cross-entropy of every position's prediction of the next character."""
    logits, _ = output
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def read_text(path: str | None) -> str:
    with open(path or os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def batches(data: np.ndarray, seq_len: int, batch_size: int, rng: np.random.Generator):
    """Endless random windows: inputs and the same windows shifted by one character."""
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, batch_size)
        windows = np.stack([data[s:s + seq_len + 1] for s in starts])
        yield windows[:, :-1], windows[:, 1:]


def sample(model: CharGRU, prompt: np.ndarray, length: int, backend: str | None,
           rng: np.random.Generator, temperature: float = 0.8) -> np.ndarray:
    """Extend `prompt` by `length` characters drawn from the model's predictions. The model is
    compiled for one character and the hidden state it returns, which carries everything
    before: the prompt is read one character at a time, then each drawn one is fed back."""
    char = np.zeros((1, 1), np.int64)
    h = np.zeros((model.num_layers, 1, model.hidden), np.float32)
    forward = gc.compile(model, (char, h), backend=backend)
    text = list(prompt)
    for i in range(len(prompt) - 1 + length):
        char[0, 0] = text[i]
        logits, h = forward(char, h)
        if i + 1 < len(text):
            continue  # still reading the prompt
        logits = logits[0, 0] / temperature
        probs = np.exp(logits - logits.max())
        text.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return np.array(text)


def train(steps: int = 150, backend: str | None = None, batch_size: int = 16, seq_len: int = 256,
          d_embed: int = 32, hidden: int = 128, lr: float = 1e-2, sample_chars: int = 200,
          seed: int = 0, text_path: str | None = None, log_every: int = 10) -> dict:
    """Train for `steps` steps; returns the per-step losses, the sampled text and the compiled
    training step (whose graph shows the scans)."""
    text = read_text(text_path)
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text], np.int64)
    print(f"text: {len(text)} characters, {len(chars)} distinct; "
          f"uniform guessing: loss {math.log(len(chars)):.3f}")

    gc.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CharGRU(len(chars), d_embed, hidden)
    optimizer = optim.Adam(model.parameters(), lr=lr)

    stream = batches(data, seq_len, batch_size, rng)
    x, y = next(stream)
    start = time.perf_counter()
    step = gc.compile_train_step(model, next_char_loss, optimizer, (x, y), backend=backend)
    losses = [step(x, y)]  # the first call compiles the kernels
    print(f"backend {step.backend}: training step over {seq_len} characters traced and "
          f"compiled in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    for i in range(2, steps + 1):
        x, y = next(stream)
        losses.append(step(x, y))
        if i % log_every == 0 or i == steps:
            recent = losses[-log_every:]
            print(f"step {i}: loss {sum(recent) / len(recent):.3f}, "
                  f"{(i - 1) / (time.perf_counter() - start):.1f} steps/s")

    prompt = data[:8]
    drawn = sample(model, prompt, sample_chars, backend, rng)
    sampled = "".join(chars[i] for i in drawn)
    print(f"--- sample ---\n{sampled}")
    return {"losses": losses, "sample": sampled, "step": step}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--backend", default=None, help="default: numba-cpu when it loads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--sample", type=int, default=200, help="characters to sample")
    parser.add_argument("--text", default=None, help="a text file (default: the README)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return train(args.steps, args.backend, args.batch_size, args.seq_len, hidden=args.hidden,
                 lr=args.lr, sample_chars=args.sample, seed=args.seed, text_path=args.text)


if __name__ == "__main__":
    main()
