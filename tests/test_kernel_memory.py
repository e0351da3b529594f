"""What a compilation leaves in memory: kernels keep their machine code, not the LLVM modules
Numba keeps for linking them into other jitted functions (backends/numba_cpu/loaded_code.py); and
the garbage a compilation makes is collected while it runs (graphc/lowering.py)."""
import gc
import weakref

import llvmlite.binding as llvm
import numpy as np
import pytest

import graphc

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


class Cycle:
    def __init__(self):
        self.itself = self


def test_cyclic_garbage_made_while_compiling_is_collected_before_the_compilation_ends():
    """The passes discard graphs whose nodes and values refer to each other: only the cyclic
    collector frees them, and it runs during a compilation, over the objects made since it began."""
    seen = {}

    def f(x):
        seen["frozen"] = gc.get_freeze_count()
        garbage = weakref.ref(Cycle())
        kept = [[i] for i in range(5000)]  # allocations enough for the collector to run
        seen["collected"] = garbage() is None
        del kept
        return x * 2.0

    x = np.arange(3, dtype=np.float32)
    np.testing.assert_array_equal(graphc.jit(f)(x), x * 2.0)
    assert seen == {"frozen": seen["frozen"], "collected": True} and seen["frozen"] > 0
    assert gc.get_freeze_count() == 0 and gc.isenabled()


def test_objects_the_program_froze_stay_frozen_after_a_compilation():
    marker = Cycle()
    gc.freeze()
    try:
        x = np.arange(4, dtype=np.float32)
        np.testing.assert_array_equal(graphc.jit(lambda x: x + 1.0)(x), x + 1.0)
        # frozen objects are in no generation the collector walks
        assert not any(o is marker for generation in range(3) for o in gc.get_objects(generation))
    finally:
        gc.unfreeze()
    assert any(o is marker for o in gc.get_objects(2))
