"""The numba-cuda backend on a real GPU: differential tests, MNIST CNN training, throughput.

    python benchmarks/gpu_check.py [--steps 300] [--mnist DIR] [--quick]

1. Differential tests at real sizes: every kernel kind (elementwise chain with broadcasting,
   reductions, matmul, conv2d and its gradients, pooling and gradients, gather/scatter,
   random bits) against the numba-cpu backend.
2. The MNIST CNN (graphc.models.mnist_cnn) trained with Adam for --steps steps on numba-cuda
   and on numba-cpu from the same initial weights and batches: the loss trajectories compared.
   MNIST comes from --mnist / graphc.data.find_mnist(); without it, a synthetic MNIST-shaped
   set (class-dependent blobs) stands in, and the summary says so. The host<->device bytes
   of each step after the first are checked too: parameters and optimizer state stay on the
   GPU, so only the batch and the learning rate go in and only the loss comes back.
3. Training throughput (samples/s) at batch 64 and 512 against PyTorch eager on the same GPU,
   with the per-step transfers.

Exit status: 0 when every check passed, 1 when one failed, 2 when there is no usable GPU here
(the reason is printed; nothing else runs).
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

TOLERANCE = dict(rtol=2e-3, atol=2e-4)   # float32 GEMMs summed in different orders


def gpu_problem() -> str | None:
    """Why this script cannot run here, or None."""
    try:
        from graphc.backends import numba_cuda
    except ImportError as exc:
        return f"graphc's numba-cuda backend cannot be imported ({exc})"
    import os
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "NUMBA_ENABLE_CUDASIM is set: this script measures a real GPU"
    return None if numba_cuda.is_available() else numba_cuda.unavailable_reason()


# -- 1. differential tests ------------------------------------------------------------------------
def _graph(name: str, arrays: list[np.ndarray], fn: Callable):
    from graphc.ir import Builder, TensorType
    b = Builder(name)
    inputs = [b.add_input(TensorType.of(a), f"x{i}") for i, a in enumerate(arrays)]
    outputs = fn(b, *inputs)
    for i, v in enumerate(outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        b.add_output(f"y{i}", v)
    return b.graph.verify()


def _cases(rng: np.random.Generator) -> dict[str, tuple]:
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    ints = lambda hi, *s: rng.integers(0, hi, s).astype(np.int64)  # noqa: E731
    return {
        "elementwise_broadcast": ([f32(256, 1024), f32(1024), f32(256, 1)], lambda b, x, y, z: [
            b.tanh(b.add(b.mul(x, y), z)), b.maximum(b.exp(b.neg(b.abs(x))), z)]),
        "reductions": ([f32(512, 2048)], lambda b, x: [
            b.sum(x, axes=(1,)), b.max(x, axes=(0,)), b.argmax(x, axis=1),
            b.sum(b.square(x), axes=(0, 1))]),
        "matmul": ([f32(1024, 768), f32(768, 512), f32(16, 128, 64), f32(16, 64, 96)],
                   lambda b, x, y, p, q: [b.matmul(x, y), b.matmul(p, q),
                                          b.relu(b.matmul(b.transpose(y, perm=(1, 0)), b.transpose(x, perm=(1, 0))))]),
        "conv2d_and_grads": ([f32(64, 32, 28, 28), f32(64, 32, 3, 3), f32(64, 64, 28, 28)],
                             lambda b, x, w, g: [
            b.conv2d(x, w, padding=1), b.conv2d_input_grad(g, w, input_shape=(64, 32, 28, 28), padding=1),
            b.conv2d_weight_grad(x, g, weight_shape=(64, 32, 3, 3), padding=1)]),
        "pooling_and_grads": ([f32(64, 32, 28, 28), f32(64, 32, 14, 14)], lambda b, x, g: [
            b.max_pool2d(x, kernel=2, stride=2), b.max_pool2d_grad(x, g, kernel=2, stride=2),
            b.avg_pool2d(x, kernel=2, stride=2),
            b.avg_pool2d_grad(g, input_shape=(64, 32, 28, 28), kernel=2, stride=2)]),
        "gather_scatter": ([f32(10000, 64), ints(10000, 4096), f32(4096, 64), ints(64, 4096, 1)],
                           lambda b, t, i, g, j: [
            b.gather(t, i, axis=0), b.scatter_add(g, i, axis=0, size=10000),
            b.take_along_axis(g, j, axis=1)]),
        "random_bits": ([np.array([7, 123], np.int64)], lambda b, k: [
            b.random_uniform(k, shape=(1024, 1024)), b.random_bernoulli(k, p=0.25, shape=(4096,), stream=3)]),
    }


def differential_tests() -> dict[str, str]:
    from graphc.lowering import compile_graph
    results = {}
    for name, (arrays, fn) in _cases(np.random.default_rng(0)).items():
        try:
            graph = _graph(name, arrays, fn)
            got = compile_graph(graph, "numba-cuda")(*arrays)
            want = compile_graph(graph, "numba-cpu")(*arrays)
            for g, w, out in zip(got, want, graph.output_names):
                if name == "random_bits" or w.dtype.kind != "f":
                    np.testing.assert_array_equal(g, w, err_msg=out)
                else:
                    np.testing.assert_allclose(g, w, err_msg=out, **TOLERANCE)
            results[name] = "ok"
        except Exception:
            results[name] = "FAILED\n" + traceback.format_exc(limit=3)
    return results


# -- 2. MNIST training ----------------------------------------------------------------------------
def mnist(directory: str | None, count: int) -> tuple[np.ndarray, np.ndarray, str]:
    from graphc.data import find_mnist, mnist_arrays
    found = find_mnist(directory)
    if found:
        x, y = mnist_arrays(found)
        return x[:count].reshape(-1, 1, 28, 28).astype(np.float32), y[:count].astype(np.int64), found
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, count).astype(np.int64)
    centers = rng.standard_normal((10, 1, 28, 28)).astype(np.float32)
    x = centers[y] + 0.5 * rng.standard_normal((count, 1, 28, 28)).astype(np.float32)
    return x, y, "synthetic (no MNIST found)"


@dataclass
class Run:
    losses: list[float]
    seconds: float  # the steps after the first
    transfers: dict[str, float] | None  # mean bytes per step after the first, each way (numba-cuda)


def train(backend: str, x: np.ndarray, y: np.ndarray, batch: int, steps: int) -> Run:
    """`steps` Adam steps (dropout on): losses, time and transfers of the steps after the first."""
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import optim
    from graphc.models import mnist_cnn
    gc.manual_seed(0)
    model = mnist_cnn()
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-3),
                                 (x[:batch], y[:batch]), backend=backend)
    counters = getattr(step.executable, "transfers", None)
    losses, start, after_first = [], 0.0, {}
    for s in range(steps):
        if s == 1:
            start, after_first = time.perf_counter(), dict(counters or {})
        at = (s * batch) % (len(x) - batch + 1)
        losses.append(step(x[at:at + batch], y[at:at + batch]))
    seconds = time.perf_counter() - start
    transfers = None
    if counters is not None and steps > 1:
        transfers = {k: (counters[k] - after_first[k]) / (steps - 1) for k in counters}
    return Run(losses, seconds, transfers)


def transfers_text(transfers: dict[str, float] | None) -> str:
    if transfers is None:
        return "transfers not counted by this backend"
    return f"{transfers['to_device']:,.0f} B to the device, {transfers['to_host']:,.0f} B to the host per step"


def transfers_verdict(transfers: dict[str, float] | None, x: np.ndarray, y: np.ndarray, batch: int) -> str:
    """ok when a step after the first moved only the batch and lr in, the loss out."""
    expected = {"to_device": batch * (x[0].nbytes + y[0].nbytes) + 4, "to_host": 4}
    if transfers == expected:
        return "ok"
    return f"FAILED: {transfers_text(transfers)}; expected {transfers_text(expected)} (batch + lr, loss)"


def compare_training(x: np.ndarray, y: np.ndarray, steps: int) -> tuple[str, list[float], list[float], Run]:
    run = train("numba-cuda", x, y, 64, steps)
    cuda, cpu = run.losses, train("numba-cpu", x, y, 64, steps).losses
    early = min(20, steps)
    close = np.allclose(cuda[:early], cpu[:early], rtol=1e-2)
    tail = lambda losses: float(np.mean(losses[-10:]))  # noqa: E731
    learned = tail(cuda) < 0.8 * cuda[0] and abs(tail(cuda) - tail(cpu)) < 0.1 * max(tail(cpu), 0.05)
    verdict = "ok" if close and learned else (
        f"FAILED: first {early} losses close: {close}; final mean loss cuda {tail(cuda):.4f}, "
        f"cpu {tail(cpu):.4f}, first {cuda[0]:.4f}")
    return verdict, cuda, cpu, run


# -- 3. throughput --------------------------------------------------------------------------------
def torch_samples_per_second(x: np.ndarray, y: np.ndarray, batch: int, steps: int) -> float | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    nn = torch.nn
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                          nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128),
                          nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10)).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()

    def step(s: int) -> None:
        at = (s * batch) % (len(x) - batch + 1)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(xs[at:at + batch]), ys[at:at + batch])
        loss.backward()
        optimizer.step()
        loss.item()  # graphc returns the loss to the host every step too

    step(0)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for s in range(1, steps):
        step(s)
    torch.cuda.synchronize()
    return batch * (steps - 1) / (time.perf_counter() - start)


def throughput(x: np.ndarray, y: np.ndarray, steps: int) -> list[str]:
    rows = []
    for batch in (64, 512):
        run = train("numba-cuda", x, y, batch, steps)
        ours = batch * (steps - 1) / run.seconds
        theirs = torch_samples_per_second(x, y, batch, steps)
        peer = f"{theirs:,.0f} samples/s, ratio {ours / theirs:.3f}" if theirs else "PyTorch CUDA unavailable"
        rows.append(f"batch {batch:>3}: graphc numba-cuda {ours:,.0f} samples/s "
                    f"({transfers_text(run.transfers)}); PyTorch eager {peer}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps compared with numba-cpu")
    parser.add_argument("--throughput-steps", type=int, default=30)
    parser.add_argument("--mnist", default=None, help="directory holding the MNIST idx files")
    parser.add_argument("--quick", action="store_true", help="differential tests only")
    args = parser.parse_args()

    problem = gpu_problem()
    if problem:
        print(f"gpu_check: skipped, no usable GPU: {problem}")
        return 2
    failed = False
    print("== differential tests (numba-cuda vs numba-cpu)")
    for name, verdict in differential_tests().items():
        print(f"  {name:<24} {verdict}")
        failed |= verdict != "ok"
    if not args.quick:
        x, y, source = mnist(args.mnist, 512 * 20)
        print(f"== MNIST CNN training, {args.steps} steps at batch 64, data: {source}")
        verdict, cuda, cpu, run = compare_training(x, y, args.steps)
        for s in sorted({0, 1, 9, args.steps // 2, args.steps - 1} & set(range(args.steps))):
            print(f"  step {s:>4}: cuda {cuda[s]:.5f}  cpu {cpu[s]:.5f}")
        print(f"  {verdict}")
        resident = transfers_verdict(run.transfers, x, y, 64)
        print(f"  state resident on the GPU ({transfers_text(run.transfers)}): {resident}")
        failed |= verdict != "ok" or resident != "ok"
        print(f"== throughput ({args.throughput_steps} steps)")
        for row in throughput(x, y, args.throughput_steps):
            print(f"  {row}")
    print("gpu_check:", "FAILED" if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
