"""Export a CNN training step after N steps, load it in a fresh process, continue N steps, and
compare with an uninterrupted 2N-step run: the losses must be identical, bit for bit.

    python examples/export_continue.py [--steps 100] [--backend numba-cpu]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

import graphc as gc
import graphc.nn.functional as F
from graphc import data, optim
from graphc.models import mnist_cnn


def batches(count: int, batch: int = 64):
    directory = data.find_mnist()
    if directory:
        x, y = data.mnist_arrays(directory)
        x, y = x[data.MNIST_TRAIN], y[data.MNIST_TRAIN]
    else:
        images, y = data.load_digits()
        x = images[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    for i in range(count):
        idx = order[(i * batch) % (len(x) - batch):][:batch]
        yield x[idx], y[idx]


def continue_from(path: str, start: int, steps: int, backend: str) -> list[float]:
    step = gc.load(path, backend=backend)
    all_batches = list(batches(start + steps))
    return [step(x, y) for x, y in all_batches[start:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--continue-from", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    backend = args.backend or gc.backends.default_backend()
    if args.continue_from:  # the fresh process
        print(json.dumps(continue_from(args.continue_from, args.steps, args.steps, backend)))
        return

    all_batches = list(batches(2 * args.steps))
    gc.manual_seed(0)
    x0, y0 = all_batches[0]
    model = mnist_cnn(image_size=x0.shape[-1])
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()), (x0, y0),
                                 backend=backend)
    losses = [step(x, y) for x, y in all_batches[:args.steps]]
    path = os.path.join(tempfile.mkdtemp(), "cnn_step.gcx")
    step.export(path)
    uninterrupted = losses + [step(x, y) for x, y in all_batches[args.steps:]]
    out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--backend", backend,
                          "--continue-from", path], capture_output=True, text=True, check=True)
    resumed = json.loads(out.stdout.strip().splitlines()[-1])
    same = resumed == uninterrupted[args.steps:]
    print(f"backend {backend}: {args.steps} steps, export ({os.path.getsize(path):,} bytes), "
          f"load in a fresh process, {args.steps} more steps")
    print(f"losses after reload identical to the uninterrupted run: {same} "
          f"(step {args.steps + 1}: {resumed[0]:.6f}, step {2 * args.steps}: {resumed[-1]:.6f})")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
