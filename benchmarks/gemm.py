"""GEMM throughput: graphc's compiled matmul kernel against NumPy's own BLAS, on the MLP's shapes.

    python benchmarks/gemm.py [--rounds 7] [--calls 100]

The MLP training step spends most of its time in matrix products (see GRAPHC_PROFILE=1), so its
ceiling is the GEMM rate. graphc runs its BLAS (scipy's OpenBLAS) on one thread and splits a
large product across Numba's threads itself (backends/numba_cpu/blas.py says why); NumPy's
matmul lets its OpenBLAS thread the product. graphc's figure is the matmul kernel's own time
(`Executable.profile`), as inside a training step, where its output lives in the arena: a
one-product graph returns a freshly allocated array per call, a cost the step does not pay.
Both run alternately in one process. A measurement is the median of `--calls` products after
as many unmeasured ones: a thread pool that has just worked keeps its threads spinning for a
while (OpenMP's for Numba, OpenBLAS's own), and those slow the other pool's first products. The
table gives the median GFLOP/s over rounds and graphc's round-by-round ratio to NumPy with all
threads.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph

# (M, K, N) of the products in the MLP 784-256-256-10 step at batch 128: forward, then the
# weight gradients (K = batch) and an input gradient
SHAPES = [(128, 784, 256), (784, 128, 256), (128, 256, 256), (256, 128, 256), (128, 256, 784)]


def median_seconds(product, calls: int) -> float:
    """Median seconds of one call of `product` (which returns the seconds it measured)."""
    for _ in range(calls):
        product()
    return statistics.median(product() for _ in range(calls))


def timed(function):
    def run() -> float:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=100)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| M x K x N | graphc GFLOP/s | numpy GFLOP/s | numpy 1 thread | graphc / numpy (rounds) |")
    print("|---|---|---|---|---|")
    for m, k, n in SHAPES:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        builder = Builder("gemm")
        x = builder.add_input(TensorType((m, k), "float32"), "a")
        y = builder.add_input(TensorType((k, n), "float32"), "b")
        builder.add_output("c", builder.matmul(x, y))
        executable = compile_graph(builder.graph, "numba-cpu")
        out = np.empty((m, n), np.float32)
        np.testing.assert_allclose(executable(a, b)[0], np.matmul(a, b), rtol=1e-4, atol=1e-3)
        gflop = 2 * m * k * n / 1e9
        rates: dict[str, list[float]] = {"graphc": [], "numpy": [], "numpy1": []}
        for _ in range(args.rounds):
            graphc_kernel = lambda: executable.profile(a, b, repeat=1).rows[0].seconds
            rates["graphc"].append(gflop / median_seconds(graphc_kernel, args.calls))
            numpy_product = timed(lambda: np.matmul(a, b, out=out))
            rates["numpy"].append(gflop / median_seconds(numpy_product, args.calls))
            with threadpool_limits(1, user_api="blas"):
                rates["numpy1"].append(gflop / median_seconds(numpy_product, args.calls))
        ratios = [g / p for g, p in zip(rates["graphc"], rates["numpy"])]
        median = {name: statistics.median(values) for name, values in rates.items()}
        print(f"| {m} x {k} x {n} | {median['graphc']:.0f} | {median['numpy']:.0f} | {median['numpy1']:.0f} "
              f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |")


if __name__ == "__main__":
    main()
