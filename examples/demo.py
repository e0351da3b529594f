"""graphc demo (`make demo`): the compiler's stages on a small MLP, then the MNIST CNN trained
end to end with one compiled training step (forward, backward and Adam in one graph).

Output files go to ./demo_out/. Options are those of examples/mnist_cnn.py (--epochs, --data,
--seed, --backend, ...).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess

import numpy as np

import graphc as gc
import graphc.nn.functional as F

OUT = "demo_out"


def mlp_loss(params, x, y):
    h = F.relu(F.linear(x, params["w1"], params["b1"]))
    logits = F.linear(h, params["w2"], params["b2"])
    return F.cross_entropy(logits, y)


def render(path: str) -> None:
    """SVG next to a DOT file when Graphviz is installed."""
    if shutil.which("dot"):
        subprocess.run(["dot", "-Tsvg", path, "-o", path[:-4] + ".svg"], check=True)
        print(f"wrote {path[:-4]}.svg")


def show_stages() -> None:
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((16, 8)).astype(np.float32) * 0.3,
              "b1": np.zeros(16, np.float32),
              "w2": rng.standard_normal((4, 16)).astype(np.float32) * 0.3,
              "b2": np.zeros(4, np.float32)}
    x = rng.standard_normal((32, 8)).astype(np.float32)
    y = rng.integers(0, 4, 32)

    traced = gc.trace(mlp_loss, params, x, y)
    print("== traced forward graph ==")
    print(traced)

    step = gc.value_and_grad(mlp_loss)
    grad_graph = step.lower(params, x, y)
    print("\n== differentiated and simplified graph ==")
    print(grad_graph)

    loss, grads = step(params, x, y)
    print(f"\nloss = {float(loss):.6f}; gradient norms: "
          + ", ".join(f"{k}={np.linalg.norm(v):.4f}" for k, v in sorted(grads.items())))

    os.makedirs(OUT, exist_ok=True)
    for name, graph in (("mlp_forward", traced), ("mlp_value_and_grad", grad_graph)):
        path = os.path.join(OUT, f"{name}.dot")
        with open(path, "w") as f:
            f.write(graph.to_dot())
        print(f"wrote {path}")
        render(path)
    if not shutil.which("dot"):
        print("Graphviz's `dot` is not on PATH: install graphviz to render the .dot files as SVG")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default=None)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    print("== 1. The compiler's stages on a small MLP ==\n")
    show_stages()
    print("\n== 2. The MNIST CNN, trained with one compiled training step ==\n")
    from mnist_cnn import train  # examples/mnist_cnn.py, next to this file

    dot_path = os.path.join(OUT, "mnist_train_step.dot")
    train(args.data, args.epochs, args.seed, backend=args.backend, limit=args.limit,
          progress=not args.no_progress, dot_path=dot_path)
    render(dot_path)


if __name__ == "__main__":
    main()
