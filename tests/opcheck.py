"""Checks shared by the per-op tests: forward against NumPy, VJP against finite differences."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, Sequence
from unittest import mock

import numpy as np

from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.ir.registry import get
from graphc.ir.types import is_float


def build_graph(name: str, arrays: Sequence[Any], fn: Callable[..., Any]):
    """A verified graph with one input per array (its type) and the outputs `fn(builder,
    *inputs)` returns (a value or a sequence of them)."""
    b = Builder(name)
    inputs = [b.add_input(TensorType.of(np.asarray(a)), f"x{i}") for i, a in enumerate(arrays)]
    outputs = fn(b, *inputs)
    for i, v in enumerate(outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        b.add_output(f"y{i}", v)
    return b.graph.verify()


def on_cuda_simulator(module: str, function: str) -> None:
    """Run `function` of test module `module` in a child process with Numba's CUDA simulator on
    (it must be on before numba is first imported); skip where the simulator is not usable."""
    import os
    import subprocess
    import sys

    import pytest
    tests = os.path.dirname(os.path.abspath(__file__))
    script = f"import sys; sys.path.insert(0, {tests!r}); import {module}; {module}.{function}(); print('matches')"
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "NUMBA_ENABLE_CUDASIM": "1"},
                          capture_output=True, text=True, timeout=300, cwd=tests)
    if "is not usable" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0 and "matches" in done.stdout, done.stderr[-3000:]


def run_op(op: str, arrays: Sequence[np.ndarray], **attrs: Any) -> np.ndarray:
    """Trace one op into a graph, verify it, and run it on the reference backend."""
    b = Builder(op)
    ins = [b.add_input(TensorType.of(np.asarray(a)), f"x{i}") for i, a in enumerate(arrays)]
    b.add_output("out", b.bind(op, *ins, **attrs))
    b.graph.verify()
    (out,) = evaluate(b.graph, [np.asarray(a) for a in arrays])
    return out


def vjp_graph(op: str, types: Sequence[TensorType], **attrs: Any):
    """Graph (inputs..., cotangent) -> (cotangent of each float input), built from the op's VJP."""
    b = Builder(f"{op}_vjp")
    ins = [b.add_input(t, f"x{i}") for i, t in enumerate(types)]
    out = b.bind(op, *ins, **attrs)
    g = b.add_input(out.type, "g")
    prim = get(op)
    node_attrs = b.graph.nodes[-1].attrs
    cts = prim.vjp(b, g, *ins, out=out, **node_attrs)
    assert len(cts) == len(ins), f"{op}: VJP returned {len(cts)} cotangents for {len(ins)} inputs"
    for i, (x, ct) in enumerate(zip(ins, cts)):
        if ct is None:
            continue
        assert ct.type == x.type, f"{op}: cotangent {i} has type {ct.type}, input is {x.type}"
        b.add_output(f"d{i}", ct)
    b.graph.verify()
    return b.graph


def numeric_vjp(fn: Callable[[list[np.ndarray]], np.ndarray], arrays: list[np.ndarray],
                g: np.ndarray, index: int, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of <g, fn(arrays)> with respect to arrays[index]."""
    x = arrays[index]
    grad = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        saved = x[i]
        x[i] = saved + eps
        plus = np.sum(g * fn(arrays))
        x[i] = saved - eps
        minus = np.sum(g * fn(arrays))
        x[i] = saved
        grad[i] = (plus - minus) / (2 * eps)
    return grad


def check_vjp(op: str, arrays: Sequence[np.ndarray], rtol: float = 1e-5, atol: float = 1e-6,
              seed: int = 0, eps: float = 1e-6, **attrs: Any) -> None:
    """Assert that the op's VJP rule matches central differences (float64 operands)."""
    arrays = [np.array(a) for a in arrays]
    types = [TensorType.of(a) for a in arrays]
    graph = vjp_graph(op, types, **attrs)
    out_type = graph.input("g").value.type
    g = np.random.default_rng(seed).standard_normal(out_type.shape).astype(out_type.dtype)
    analytic = dict(zip(graph.output_names, evaluate(graph, [*arrays, g])))
    checked = 0
    for i, a in enumerate(arrays):
        if not is_float(a.dtype.name):
            continue
        assert f"d{i}" in analytic, f"{op}: no cotangent for float input {i}"
        expected = numeric_vjp(lambda xs: run_op(op, xs, **attrs), arrays, g, i, eps)
        np.testing.assert_allclose(analytic[f"d{i}"], expected, rtol=rtol, atol=atol,
                                   err_msg=f"{op}: VJP of input {i} differs from finite differences")
        checked += 1
    assert checked, f"{op}: no float input was checked"


def finite_differences(f: Callable[..., float], arrays: list[np.ndarray], index: int,
                       eps: float = 1e-6) -> np.ndarray:
    """d f(*arrays) / d arrays[index], central differences (float64)."""
    x = arrays[index]
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        plus, minus = [a.copy() for a in arrays], [a.copy() for a in arrays]
        plus[index][i] += eps
        minus[index][i] -= eps
        grad[i] = (f(*plus) - f(*minus)) / (2 * eps)
    return grad


def numba_cpu_matches_reference(graph, arrays: Sequence[Any], parallel: bool):
    """Compile `graph` for numba-cpu (every loop parallel with `parallel`), run it on `arrays`
    and require each output to equal the reference's exactly (dtype, shape, values); returns
    the executable. Without `parallel` it compiles into a kernel cache of its own: a cache that
    holds a kernel's always-parallel variant (an earlier test's larger shape) serves that
    instead (executor.choose_variants)."""
    from graphc.backends.numba_cpu.codegen_common import always_parallel
    from graphc.lowering import compile_graph
    if parallel:
        with always_parallel():
            executable = compile_graph(graph, "numba-cpu")
    else:
        with tempfile.TemporaryDirectory() as directory, mock.patch.dict(os.environ, GRAPHC_CACHE_DIR=directory):
            executable = compile_graph(graph, "numba-cpu")
    for got, want in zip(executable(*arrays), evaluate(graph, arrays)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    return executable
