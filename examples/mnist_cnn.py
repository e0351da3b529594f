"""Train the MNIST CNN with one compiled training step (forward + backward + Adam).

    python examples/mnist_cnn.py [--data DIR] [--epochs 5] [--seed 0] [--backend numba-cpu]

Uses the MNIST files when found (--data, $GRAPHC_MNIST_DIR or ../shared/data/mnist: images
0-7999 train, 8000-9999 evaluate) and otherwise scikit-learn's bundled 8x8 digits.
"""
from __future__ import annotations

import argparse
import os
import time


import graphc as gc
import graphc.nn.functional as F
from graphc import data, metrics, optim
from graphc.models import mnist_cnn
from graphc.train import evaluate, fit


def train(data_dir: str | None = None, epochs: int = 5, seed: int = 0, batch_size: int = 64,
          backend: str | None = None, limit: int | None = None, progress: bool = True,
          dot_path: str | None = None) -> dict:
    """Train and evaluate; returns the history, final metrics and timings."""
    name, (x_train, y_train), (x_eval, y_eval) = data.mnist_or_digits(data_dir)
    if limit:
        x_train, y_train = x_train[:limit], y_train[:limit]
    print(f"data: {name}: {len(x_train)} training and {len(x_eval)} evaluation images")
    gc.manual_seed(seed)
    model = mnist_cnn(image_size=x_train.shape[-1])
    optimizer = optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    step = gc.compile_train_step(model, F.cross_entropy, optimizer,
                                 (x_train[:batch_size], y_train[:batch_size]), backend=backend)
    compile_s = time.perf_counter() - start
    traced, optimized = step.stage_graph("traced"), step.stage_graph("optimized")
    fused = step.stage_graph("fused")
    print(f"backend {step.backend}: training step compiled in {compile_s:.1f} s; graph: "
          f"{len(traced.nodes)} traced nodes -> {len(optimized.nodes)} after simplification -> "
          f"{len(fused.nodes)} fused kernels")
    plan = getattr(step.executable, "plan", None)
    if plan is not None:
        print(f"memory plan: arena peak {plan.peak_bytes / 2**20:.1f} MiB vs "
              f"{plan.naive_bytes / 2**20:.1f} MiB without reuse")
    if dot_path:
        step.to_dot(dot_path, stage="fused")
        print(f"wrote {dot_path}")

    loader = data.DataLoader(data.TensorDataset(x_train, y_train), batch_size=batch_size,
                             shuffle=True, seed=seed, drop_last=True)
    evaluation = data.DataLoader(data.TensorDataset(x_eval, y_eval), batch_size=500)
    history = fit(step, loader, epochs=epochs, val_loader=evaluation, progress=progress,
                  on_epoch_end=lambda e, logs: print(
                      f"epoch {e}: loss {logs['loss']:.4f}, eval accuracy {logs['val_accuracy']:.4f}, "
                      f"{logs['samples_per_s']:.0f} samples/s"))
    total_s = time.perf_counter() - start
    result = evaluate(gc.compile(model, x_eval[:500], backend=backend), None, evaluation)
    print(f"final evaluation: accuracy {result['accuracy']:.4f}, macro precision "
          f"{result['precision']:.4f}, macro recall {result['recall']:.4f}")
    print("confusion matrix (rows: true digit, columns: predicted):")
    print(result["confusion"])
    print(f"total time, compilation included: {total_s:.1f} s")
    return {"history": history, "result": result, "compile_s": compile_s, "total_s": total_s,
            "step": step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None, help="directory with the MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--backend", default=None, help="numba-cpu (default) or reference")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    parser.add_argument("--dot", default=os.path.join("demo_out", "mnist_train_step.dot"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.dot) or ".", exist_ok=True)
    train(args.data, args.epochs, args.seed, args.batch_size, args.backend, args.limit, dot_path=args.dot)


if __name__ == "__main__":
    main()
