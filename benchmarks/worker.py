"""One benchmark measurement in its own process: prints a JSON line with the results.

    python benchmarks/worker.py --system graphc|torch|jax|pytensor --workload mlp|cnn [--steps N]
                                [--min-seconds S]

Measures: time to the end of the first training step (compilation included), steady-state
per-step times (median reported as samples/s), the peak resident memory that the training
steps themselves add (Linux's VmHWM, reset after warm-up through /proc/self/clear_refs), and
the peak growth from before the model was built (parameters, optimizer state, gradients
and activations together: what graphc's arena plus its state holds; measured the same way
for graphc, it also counts Numba's and LLVM's memory).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

WORKLOADS = {"mlp": {"batch": 128, "shape": (784,)}, "cnn": {"batch": 64, "shape": (1, 28, 28)}}


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def batch_data(workload: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    spec = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((spec["batch"], *spec["shape"])).astype(np.float32)
    y = rng.integers(0, 10, spec["batch"]).astype(np.int64)
    return x, y


def graphc_step(workload: str, x: np.ndarray, y: np.ndarray):
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import optim
    from graphc.models import mlp, mnist_cnn

    gc.manual_seed(0)
    before_model = rss_kib("VmRSS")
    model = mlp() if workload == "mlp" else mnist_cnn()
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=1e-3), (x, y))
    extra = {"rss_before_model_kib": before_model}
    plan = getattr(step.executable, "plan", None)
    if plan is not None:
        state_bytes = sum(a.nbytes for a in step.model.state_dict().values()) + sum(
            a.nbytes for s in step.opt_state.values() for a in s.values())
        extra.update(arena_bytes=int(plan.peak_bytes), naive_bytes=int(plan.naive_bytes),
                     state_bytes=int(state_bytes))
        stats = getattr(step.executable, "cache_stats", None)
        if stats is not None:
            extra["cache"] = stats if isinstance(stats, dict) else getattr(stats, "__dict__", str(stats))
    return (lambda: step(x, y)), extra


def torch_step(workload: str, x: np.ndarray, y: np.ndarray):
    import torch
    from torch import nn

    torch.manual_seed(0)
    before_model = rss_kib("VmRSS")
    if workload == "mlp":
        model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    else:
        model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                              nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(), nn.Linear(9216, 128),
                              nn.ReLU(), nn.Dropout(0.5), nn.Linear(128, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(tx), ty)
        loss.backward()
        opt.step()
        return loss.item()
    return step, {"threads": torch.get_num_threads(), "rss_before_model_kib": before_model}


def jax_step(workload: str, x: np.ndarray, y: np.ndarray):
    import jax
    import jax.numpy as jnp

    key = jax.random.PRNGKey(0)
    sizes = (784, 256, 256, 10)
    if workload != "mlp":
        raise SystemExit("jax: only the MLP workload is implemented")
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        key, k = jax.random.split(key)
        params.append((jax.random.uniform(k, (a, b), minval=-a ** -0.5, maxval=a ** -0.5), jnp.zeros(b)))

    def loss(params, x, y):
        h = x
        for i, (w, b) in enumerate(params):
            h = h @ w + b
            if i < len(params) - 1:
                h = jax.nn.relu(h)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(h), y[:, None], 1))

    @jax.jit
    def update(params, m, v, t, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: 0.999 * v + 0.001 * g * g, v, grads)
        params = jax.tree_util.tree_map(
            lambda p, m, v: p - 1e-3 * (m / (1 - 0.9 ** t)) / (jnp.sqrt(v / (1 - 0.999 ** t)) + 1e-8),
            params, m, v)
        return value, params, m, v

    state = {"p": params, "m": jax.tree_util.tree_map(jnp.zeros_like, params),
             "v": jax.tree_util.tree_map(jnp.zeros_like, params), "t": 0}
    jx, jy = jnp.asarray(x), jnp.asarray(y)

    def step():
        state["t"] += 1
        value, state["p"], state["m"], state["v"] = update(state["p"], state["m"], state["v"],
                                                          state["t"], jx, jy)
        return float(value)
    return step, {}


def pytensor_step(workload: str, x: np.ndarray, y: np.ndarray):
    """PyTensor with its Numba backend: the MLP step as one compiled function with the Adam
    updates on shared variables (its CNN falls back to object mode, far too slow to time)."""
    import pytensor
    import pytensor.tensor as pt

    if workload != "mlp":
        raise SystemExit("pytensor: only the MLP workload is implemented")
    pytensor.config.floatX = "float32"  # else Python constants promote the updates to float64
    rng = np.random.default_rng(0)
    sizes = (784, 256, 256, 10)
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params.append(pytensor.shared(rng.uniform(-a ** -0.5, a ** -0.5, (a, b)).astype(np.float32)))
        params.append(pytensor.shared(np.zeros(b, np.float32)))
    tx, ty = pt.matrix("x", dtype="float32"), pt.vector("y", dtype="int64")
    h = tx
    for i in range(0, len(params), 2):
        h = h @ params[i] + params[i + 1]
        if i < len(params) - 2:
            h = pt.maximum(h, 0)
    loss = -pt.mean(pt.special.log_softmax(h, axis=1)[pt.arange(ty.shape[0]), ty])
    grads = pytensor.grad(loss, params)
    t = pytensor.shared(np.float32(0))
    t1 = t + 1
    updates = [(t, t1)]
    for p, g in zip(params, grads):
        m = pytensor.shared(np.zeros_like(p.get_value()))
        v = pytensor.shared(np.zeros_like(p.get_value()))
        m1, v1 = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        step_size = 1e-3 * pt.sqrt(1 - 0.999 ** t1) / (1 - 0.9 ** t1)
        updates += [(m, m1), (v, v1), (p, p - step_size * m1 / (pt.sqrt(v1) + 1e-8))]
    update = pytensor.function([tx, ty], loss, updates=updates, mode="NUMBA")
    return (lambda: float(update(x, y))), {}


SYSTEMS = {"graphc": graphc_step, "torch": torch_step, "jax": jax_step, "pytensor": pytensor_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=sorted(SYSTEMS), required=True)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="keep timing steps until this much time is measured (short steps "
                             "would otherwise sample the noisy machine for a few milliseconds)")
    args = parser.parse_args()

    x, y = batch_data(args.workload)
    start = time.perf_counter()
    step, extra = SYSTEMS[args.system](args.workload, x, y)
    first_loss = step()
    first_call_s = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    baseline = rss_kib("VmRSS")
    peak_reset = reset_peak()
    times, measured = [], 0.0
    while len(times) < args.steps or measured < args.min_seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        measured += times[-1]
    median = statistics.median(times)
    result = {
        "system": args.system, "workload": args.workload, "batch": len(y),
        "first_call_s": first_call_s, "median_step_s": median,
        "samples_per_s": len(y) / median, "first_loss": first_loss,
        "step_peak_extra_kib": (rss_kib("VmHWM") - baseline) if peak_reset else None,
        # model, optimizer state and the steps' peak together (for graphc this includes what
        # loading or compiling the kernels took: Numba and LLVM)
        "training_peak_kib": (rss_kib("VmHWM") - extra["rss_before_model_kib"])
        if peak_reset and "rss_before_model_kib" in extra else None,
        "rss_kib": rss_kib("VmRSS"), **extra,
    }
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown (numba/torch thread pools), it is not measured


if __name__ == "__main__":
    main()
