"""A character-level GPT trained on graphc's own README, written as one writes it in PyTorch.

    python examples/char_gpt.py [--steps 1000] [--backend numba-cpu] [--sample 300]

Token and position embeddings, pre-norm blocks of causal self-attention
(F.scaled_dot_product_attention with is_causal=True) and a GELU MLP, a final LayerNorm and an
output layer tied to the token embedding. AdamW with two parameter groups (weight decay on
the matrices only) and a linear warm-up into a cosine decay, one compiled training step whose
learning rates are inputs (the schedule never recompiles it). Then it samples text.
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


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        batch, time_steps, channels = x.shape
        q, k, v = self.qkv(x).split(channels, dim=2)
        # (B, T, C) -> (B, heads, T, C / heads)
        q, k, v = (t.view(batch, time_steps, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, time_steps, channels))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharGPT(nn.Module):
    def __init__(self, vocab_size: int, context: int = 32, d_model: int = 64, n_heads: int = 4,
                 n_layers: int = 2) -> None:
        super().__init__()
        self.context = context
        self.token_embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = nn.Embedding(context, d_model)
        for table in (self.token_embedding.weight, self.position_embedding.weight):
            table *= 0.02  # GPT-2's N(0, 0.02) rather than Embedding's N(0, 1)
        self.blocks = nn.Sequential(*(Block(d_model, n_heads) for _ in range(n_layers)))
        self.ln_f = nn.LayerNorm(d_model)
        # Weight tying: the output layer's weight is the token embedding (logits = x @ E^T),
        # one parameter reached from both modules, its gradient the sum of both uses.
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        self.lm_head.weight = self.token_embedding.weight

    def forward(self, idx):
        positions = gc.arange(idx.shape[1])
        x = self.token_embedding(idx) + self.position_embedding(positions)
        return self.lm_head(self.ln_f(self.blocks(x)))


def next_char_loss(logits, targets):
    """Cross-entropy of every position's prediction of the next character."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices (embeddings and linear weights), not the biases and norm scales."""
    params = [p for _, p in model.named_parameters()]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def read_text(path: str | None) -> str:
    with open(path or os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def batches(data: np.ndarray, context: int, batch_size: int, rng: np.random.Generator):
    """Endless random windows: inputs and the same windows shifted by one character."""
    while True:
        starts = rng.integers(0, len(data) - context - 1, batch_size)
        windows = np.stack([data[s:s + context + 1] for s in starts])
        yield windows[:, :-1], windows[:, 1:]


def sample(model: CharGPT, prompt: np.ndarray, length: int, backend: str | None,
           rng: np.random.Generator, temperature: float = 0.8) -> np.ndarray:
    """Extend `prompt` by `length` characters drawn from the model's predictions. One compiled
    forward of a full window serves every step: a short text is padded on the right, which
    causal attention never lets the positions before it see."""
    window = np.zeros((1, model.context), np.int64)
    forward = gc.compile(model, window, backend=backend)
    text = list(prompt)
    for _ in range(length):
        recent = text[-model.context:]
        window[0, :len(recent)] = recent
        logits = forward(window)[0, len(recent) - 1] / temperature
        probs = np.exp(logits - logits.max())
        text.append(int(rng.choice(len(probs), p=probs / probs.sum())))
    return np.array(text)


def train(steps: int = 1000, backend: str | None = None, batch_size: int = 16, context: int = 32,
          lr: float = 3e-3, warmup: int | None = None, sample_chars: int = 200, seed: int = 0,
          text_path: str | None = None, log_every: int = 50) -> dict:
    """Train for `steps` steps; returns the per-step losses and the sampled text."""
    text = read_text(text_path)
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    data = np.array([lookup[c] for c in text], np.int64)
    print(f"text: {len(text)} characters, {len(chars)} distinct")

    gc.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CharGPT(len(chars), context)
    optimizer = optim.AdamW(parameter_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    warmup = max(1, steps // 10) if warmup is None else warmup
    schedule = optim.SequentialLR(optimizer, [
        optim.LinearLR(optimizer, start_factor=0.1, total_iters=warmup),
        optim.CosineAnnealingLR(optimizer, T_max=max(1, steps - warmup), eta_min=lr / 10)],
        milestones=[warmup])

    stream = batches(data, context, batch_size, rng)
    x, y = next(stream)
    start = time.perf_counter()
    step = gc.compile_train_step(model, next_char_loss, optimizer, (x, y), backend=backend)
    print(f"backend {step.backend}: training step compiled in {time.perf_counter() - start:.1f} s")
    losses = []
    start = time.perf_counter()
    for i in range(1, steps + 1):
        losses.append(step(x, y))
        schedule.step()
        x, y = next(stream)
        if i % log_every == 0 or i == steps:
            recent = losses[-log_every:]
            print(f"step {i}: loss {sum(recent) / len(recent):.3f}, lr "
                  f"{optimizer.param_groups[0]['lr']:.2e}, {i / (time.perf_counter() - start):.0f} steps/s")
    assert len(step._compiled) == 1, "the schedule recompiled the step"

    prompt = data[:8]
    drawn = sample(model, prompt, sample_chars, backend, rng)
    sampled = "".join(chars[i] for i in drawn)
    print(f"uniform guessing: loss {math.log(len(chars)):.3f}\n--- sample ---\n{sampled}")
    return {"losses": losses, "sample": sampled}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--backend", default=None, help="default: numba-cpu when it loads")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--sample", type=int, default=200, help="characters to sample")
    parser.add_argument("--text", default=None, help="a text file (default: the README)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return train(args.steps, args.backend, args.batch_size, lr=args.lr, sample_chars=args.sample,
                 seed=args.seed, text_path=args.text)


if __name__ == "__main__":
    main()
