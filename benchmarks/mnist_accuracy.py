"""The MNIST CNN recipe (5 epochs on images 0-7999, batch 64, Adam 1e-3, normalised inputs),
graphc's compiled training step against PyTorch eager, seed by seed, each run in its own
process: evaluation accuracy on images 8000-9999 and wall time with compilation included.

    python benchmarks/mnist_accuracy.py [--seeds 0 1 2] [--epochs 5]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def run_graphc(seed: int, epochs: int) -> dict:
    sys.path.insert(0, os.path.join(HERE, "..", "examples"))
    from mnist_cnn import train

    result = train(seed=seed, epochs=epochs, progress=False)
    return {"accuracy": result["result"]["accuracy"], "seconds": result["total_s"],
            "compile_s": result["compile_s"]}


def run_torch(seed: int, epochs: int) -> dict:
    import numpy as np
    import torch
    from torch import nn

    from graphc import data

    start = time.perf_counter()
    x, y = data.mnist_arrays(data.find_mnist())
    xt, yt = torch.from_numpy(x[data.MNIST_TRAIN]), torch.from_numpy(y[data.MNIST_TRAIN])
    xe, ye = torch.from_numpy(x[data.MNIST_EVAL]), y[data.MNIST_EVAL]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128),
                          nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        order = torch.from_numpy(rng.permutation(len(xt)))
        for i in range(0, len(order) - 63, 64):
            idx = order[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(xe[i:i + 500]) for i in range(0, len(xe), 500)]).argmax(1).numpy()
    return {"accuracy": float((pred == ye).mean()), "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--worker", choices=["graphc", "torch"])
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    if args.worker:
        fn = run_graphc if args.worker == "graphc" else run_torch
        print("RESULT " + json.dumps(fn(args.seed, args.epochs)), flush=True)
        return
    rows = []
    for seed in args.seeds:
        row = {"seed": seed}
        for system in ("graphc", "torch"):
            proc = subprocess.run([sys.executable, __file__, "--worker", system, "--seed", str(seed),
                                   "--epochs", str(args.epochs)], capture_output=True, text=True)
            lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            row[system] = json.loads(lines[-1][7:]) if lines else {"error": proc.stderr[-500:]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| seed | graphc accuracy | graphc time (compile) | PyTorch accuracy | PyTorch time |")
    print("|---|---|---|---|---|")
    for r in rows:
        g, t = r["graphc"], r["torch"]
        print(f"| {r['seed']} | {g.get('accuracy', float('nan')):.4f} | {g.get('seconds', 0):.1f} s "
              f"({g.get('compile_s', 0):.1f} s) | {t.get('accuracy', float('nan')):.4f} | "
              f"{t.get('seconds', 0):.1f} s |")


if __name__ == "__main__":
    main()
