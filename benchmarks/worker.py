"""One benchmark measurement in its own process: prints a JSON line with the results.

    python benchmarks/worker.py --system graphc|torch|torch-compile|jax|pytensor
                                --workload NAME [--steps N] [--min-seconds S] [--tiny]
                                [--init STATE.npz]
    python benchmarks/worker.py --export-init STATE.npz --workload NAME [--tiny]

Workloads and their models are in models.py. `--export-init` writes PyTorch's seeded initial
state dict as NumPy arrays; graphc given it with `--init` starts from the same weights, so the
first losses of the two agree (reported as `first_loss`).

Measures: time to the end of the first training step (compilation included; for graphc also
`final_kernels_s`, until the kernels compiling in the background were ready), steady-state
per-step times (median reported as samples/s; a sample is an image or a sequence), the peak
resident memory that the training steps themselves add (Linux's VmHWM, reset after warm-up
through /proc/self/clear_refs), and the peak growth from before the model was built
(parameters, optimizer state, gradients and activations together: what graphc's arena plus its
state holds; measured the same way for graphc, it also counts Numba's and LLVM's memory),
and for graphc the first call at another batch size (half the batch plus one, as a ragged last
batch would be), which reuses the compiled kernels with a new memory plan.
A system that fails to build or run the step prints {"error": ...} and exits with status 1.
With GRAPHC_PROFILE=1, graphc's per-kernel profile of the timed steps goes to stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from typing import Any, Callable

import numpy as np

import models

# (one training step returning its loss, extra fields for the result)
Step = tuple[Callable[[], float], dict[str, Any]]


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


def planned_memory(executable: Any) -> dict[str, int] | None:
    """arena_bytes, naive_bytes and kernels of a compiled step: its memory plan's; for a program
    with scans, its parts' and loop bodies' (a body once per row block) plus the loops' stacked
    outputs, which live outside the arenas."""
    if getattr(executable, "plan", None) is not None:
        return {"arena_bytes": int(executable.plan.peak_bytes), "naive_bytes": int(executable.plan.naive_bytes),
                "kernels": len(executable.kernels)}
    if getattr(executable, "pieces", None) is None:
        return None
    plan = executable.memory_plan
    return {"arena_bytes": plan.peak_bytes, "naive_bytes": plan.naive_bytes,
            "kernels": sum(len(e.kernels) for _, e, _ in executable.pieces
                           if getattr(e, "plan", None) is not None)}


def graphc_step(workload: str, x: np.ndarray, y: np.ndarray, tiny: bool, init: str | None) -> Step:
    import graphc as gc
    import graphc.nn.functional as F
    from graphc import optim

    gc.manual_seed(0)
    before_model = rss_kib("VmRSS")
    model = models.build_model(workload, models.graphc_framework(), tiny)
    if init:
        with np.load(init) as state:
            model.load_state_dict(dict(state))
    optimizer = models.optimizer_for(workload, optim, model.parameters())
    step = gc.compile_train_step(model, F.cross_entropy, optimizer, (x, y))
    extra = {"rss_before_model_kib": before_model, "init": "pytorch" if init else "graphc"}
    planned = planned_memory(step.executable)
    if planned is not None:
        state_bytes = sum(a.nbytes for a in step.model.state_dict().values()) + sum(
            a.nbytes for s in step.opt_state.values() for a in s.values())
        extra.update(planned, state_bytes=int(state_bytes))
        stats = getattr(step.executable, "cache_stats", None)
        if stats is not None:
            extra["cache"] = stats if isinstance(stats, dict) else getattr(stats, "__dict__", str(stats))
    # read after the timed steps (None unless GRAPHC_PROFILE=1); not part of the JSON
    extra["profile"] = lambda: getattr(step.executable, "profile_report", None)
    # a ragged last batch: the step is called with a size it was not compiled for (a language
    # model's targets are flattened: len(y) // len(x) of them per sample)
    other = len(x) // 2 + 1
    targets = other * (len(y) // len(x))
    extra["other_batch"] = (other, lambda: float(step(x[:other], y[:targets])))
    extra["finish_compiling"] = gc.finish_compiling
    return (lambda: float(step(x, y))), extra


def torch_model(workload: str, tiny: bool):
    import torch

    torch.manual_seed(0)
    return models.build_model(workload, models.torch_framework(), tiny)


def torch_step(workload: str, x: np.ndarray, y: np.ndarray, tiny: bool, compiled: bool) -> Step:
    """PyTorch eager, or with `compiled` the loss (forward, and backward through AOTAutograd)
    and the optimizer step each through torch.compile, as PyTorch's tutorials do."""
    import torch
    import torch.nn.functional as F

    before_model = rss_kib("VmRSS")
    model = torch_model(workload, tiny)
    opt = models.optimizer_for(workload, torch.optim, model.parameters())
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def loss_of(x, y):
        return F.cross_entropy(model(x), y)
    update = opt.step
    if compiled:
        loss_of, update = torch.compile(loss_of), torch.compile(opt.step)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_of(tx, ty)
        loss.backward()
        update()
        return loss.item()
    return step, {"threads": torch.get_num_threads(), "rss_before_model_kib": before_model}


def export_init(workload: str, tiny: bool, path: str) -> None:
    """PyTorch's initial state dict as NumPy arrays (the file graphc loads with --init)."""
    state = {k: v.detach().numpy() for k, v in torch_model(workload, tiny).state_dict().items()}
    np.savez(path, **state)


def jax_step(workload: str, x: np.ndarray, y: np.ndarray, tiny: bool) -> Step:
    import jax
    import jax.numpy as jnp

    if workload != "mlp":
        raise SystemExit("jax: only the MLP workload is implemented")
    key = jax.random.PRNGKey(0)
    sizes = models.WORKLOADS[workload].sized(tiny)[0]["sizes"]
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


def pytensor_step(workload: str, x: np.ndarray, y: np.ndarray, tiny: bool) -> Step:
    """PyTensor with its Numba backend: the MLP step as one compiled function with the Adam
    updates on shared variables (its CNN falls back to object mode, far too slow to time)."""
    import pytensor
    import pytensor.tensor as pt

    if workload != "mlp":
        raise SystemExit("pytensor: only the MLP workload is implemented")
    pytensor.config.floatX = "float32"  # else Python constants promote the updates to float64
    rng = np.random.default_rng(0)
    sizes = models.WORKLOADS[workload].sized(tiny)[0]["sizes"]
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


SYSTEMS = {
    "graphc": lambda w, x, y, args: graphc_step(w, x, y, args.tiny, args.init),
    "torch": lambda w, x, y, args: torch_step(w, x, y, args.tiny, compiled=False),
    "torch-compile": lambda w, x, y, args: torch_step(w, x, y, args.tiny, compiled=True),
    "jax": lambda w, x, y, args: jax_step(w, x, y, args.tiny),
    "pytensor": lambda w, x, y, args: pytensor_step(w, x, y, args.tiny),
}


def measure(args: argparse.Namespace) -> dict:
    x, y = models.batch_data(args.workload, args.tiny)
    start = time.perf_counter()
    step, extra = SYSTEMS[args.system](args.workload, x, y, args)
    first_loss = step()
    first_call_s = time.perf_counter() - start
    finish_compiling = extra.pop("finish_compiling", None)
    if finish_compiling is not None:  # the steps are timed with the final kernels
        finish_compiling()
        extra["final_kernels_s"] = time.perf_counter() - start
    for _ in range(args.warmup):
        step()
    peak_reset = reset_peak()
    baseline = rss_kib("VmRSS")  # after the reset: the peak restarts from here, never below
    times, measured = [], 0.0
    while len(times) < args.steps or measured < args.min_seconds:
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        measured += times[-1]
    median = statistics.median(times)
    profile = extra.pop("profile", lambda: None)()
    if profile is not None:
        print(profile.table(), file=sys.stderr)
    peak = rss_kib("VmHWM")
    if "other_batch" in extra:  # after the peaks are read: another size plans its own memory
        size, other_step = extra.pop("other_batch")
        t0 = time.perf_counter()
        other_step()
        extra.update(other_batch=size, other_batch_first_call_s=time.perf_counter() - t0)
    return {
        "system": args.system, "workload": args.workload, "batch": len(x),
        "first_call_s": first_call_s, "median_step_s": median,
        "samples_per_s": len(x) / median, "first_loss": first_loss,
        "step_peak_extra_kib": (peak - baseline) if peak_reset else None,
        # model, optimizer state and the steps' peak together (for graphc this includes what
        # loading or compiling the kernels took: Numba and LLVM)
        "training_peak_kib": (peak - extra["rss_before_model_kib"])
        if peak_reset and "rss_before_model_kib" in extra else None,
        # the whole process during the steps: the framework's own import counted on every side
        # (the growth above counts Numba's import and setup for graphc, not torch's import)
        "process_peak_kib": peak if peak_reset else None,
        "rss_kib": rss_kib("VmRSS"), **extra,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--system", choices=sorted(SYSTEMS))
    parser.add_argument("--workload", choices=sorted(models.WORKLOADS), required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="keep timing steps until this much time is measured (short steps "
                             "would otherwise sample the noisy machine for a few milliseconds)")
    parser.add_argument("--tiny", action="store_true",
                        help="the workload's smoke-test sizes (tests: the benchmarks still run)")
    parser.add_argument("--init", metavar="STATE.npz",
                        help="graphc: start from these weights (written by --export-init)")
    parser.add_argument("--export-init", metavar="STATE.npz",
                        help="write PyTorch's initial state dict for the workload and exit")
    args = parser.parse_args()
    if args.export_init:
        export_init(args.workload, args.tiny, args.export_init)
        return
    if args.system is None:
        parser.error("--system is required unless --export-init is given")
    try:
        result = measure(args)
    except Exception as error:  # the caller reports it and goes on with the other systems
        traceback.print_exc()
        result, status = {"system": args.system, "workload": args.workload,
                          "error": f"{type(error).__name__}: {error}"}, 1
    else:
        status = 0
    print(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # skip interpreter teardown (numba/torch thread pools), it is not measured


if __name__ == "__main__":
    main()
