"""graphc demo: trace a small MLP and its gradient, print the IR, write DOT (and SVG).

Run with `make demo`. Output files go to ./demo_out/.
"""
from __future__ import annotations

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


def main() -> None:
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
        if shutil.which("dot"):
            subprocess.run(["dot", "-Tsvg", path, "-o", path[:-4] + ".svg"], check=True)
            print(f"wrote {path[:-4]}.svg")
    if not shutil.which("dot"):
        print("Graphviz's `dot` is not on PATH: install graphviz to render the .dot files as SVG")


if __name__ == "__main__":
    main()
