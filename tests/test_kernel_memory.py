"""What a compiled executable keeps alive: kernels keep their machine code, not the LLVM modules
Numba keeps for linking them into other jitted functions (backends/numba_cpu/loaded_code.py)."""
import gc
import weakref

import llvmlite.binding as llvm
import numpy as np
import pytest

from graphc.backends.numba_cpu import cache as kernel_cache
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph


def softmax_graph():
    b = Builder("softmax_rows")
    x = b.add_input(TensorType((5, 7), "float32"), "x")
    e = b.exp(b.sub(x, b.max(x, axes=(1,), keepdims=True)))
    b.add_output("p", b.div(e, b.sum(e, axes=(1,), keepdims=True)))
    return b.graph


def compile_and_check(graph):
    x = np.random.default_rng(0).standard_normal((5, 7)).astype(np.float32)
    executable = compile_graph(graph, "numba-cpu")
    np.testing.assert_allclose(executable(x)[0], evaluate(graph, [x])[0], rtol=1e-5, atol=1e-6)
    return executable


def overloads(executable):
    return [compiled for kernel in executable.kernels for function in kernel.functions
            for compiled in function.overloads.values()]


@pytest.fixture
def private_cache(monkeypatch, tmp_path):
    """A kernel cache of this test's own: its kernels compile here, in this process."""
    monkeypatch.setenv("GRAPHC_CACHE_DIR", str(tmp_path / "kernels"))
    monkeypatch.setenv("GRAPHC_COMPILE_WORKERS", "0")
    return tmp_path / "kernels"


def test_kernels_compiled_here_drop_the_module_numba_keeps_for_linking(private_cache):
    executable = compile_and_check(softmax_graph())
    assert executable.cache_stats.compiled > 0
    assert overloads(executable)
    assert all(compiled.library._shared_module is None for compiled in overloads(executable))


def test_kernels_loaded_from_disk_free_the_module_parsed_from_the_cache(private_cache, monkeypatch):
    compile_and_check(softmax_graph())
    monkeypatch.setattr(kernel_cache, "_CACHES", {})  # a new process's cache: loads from disk
    parsed = []
    parse_bitcode = llvm.parse_bitcode

    def recording_parse(data, *args, **kwargs):
        module = parse_bitcode(data, *args, **kwargs)
        parsed.append(weakref.ref(module))
        return module
    monkeypatch.setattr(llvm, "parse_bitcode", recording_parse)
    executable = compile_and_check(softmax_graph())
    assert executable.cache_stats.hits > 0 and executable.cache_stats.compiled == 0
    gc.collect()
    assert parsed
    assert [ref for ref in parsed if ref() is not None] == []
