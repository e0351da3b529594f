"""benchmarks/torch_surface_probe.py runs: a few real entries trace and match PyTorch (values
and gradients), a wrong result or gradient is reported as a mismatch and a missing call as a
refusal with its text (so the table cannot say more than it checked)."""
import importlib.util
import io
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def probe():
    spec = importlib.util.spec_from_file_location(
        "torch_surface_probe", os.path.join(ROOT, "benchmarks", "torch_surface_probe.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def entries(probe, *names):
    by_name = {p.name: p for p in probe.PROBES}
    return [by_name[n] for n in names]


def test_entries_are_unique_and_cover_every_area_of_the_issue(probe):
    names = [p.name for p in probe.PROBES]
    assert len(names) == len(set(names))
    assert {p.category for p in probe.PROBES} == {probe.MATH, probe.SHAPE, probe.LAYERS,
                                                  probe.LOSSES, probe.OPTIM}


def test_a_few_entries_trace_and_match_pytorch(probe, torch):
    chosen = entries(probe, "torch.cat", "values, indices = x.max(dim)", "F.cross_entropy(weight)",
                     "AdamW parameter groups", "SequentialLR (warm-up, cosine)")
    results = [probe.run_probe(p, ("reference",), torch) for p in chosen]
    for r in results:
        assert (r.traces, r.matches, r.refusal) == (True, True, ""), (r.probe.name, r.notes)
    out = io.StringIO()
    probe.report(results, out)
    assert "5 entries: 5 trace, 0 compile on numba-cpu, 5 match PyTorch, 0 refused" in out.getvalue()


def test_a_different_result_is_a_mismatch_and_a_missing_call_a_refusal(probe, torch):
    wrong = probe.Probe("wrong", probe.MATH, lambda T, F, x: x * (2 if T.__name__ == "graphc" else 1))
    missing = probe.Probe("missing", probe.MATH, lambda T, F, x: T.no_such_function(x))
    short = probe.Probe("fewer results", probe.SHAPE,
                        lambda T, F, x: x.chunk(2, 1)[0] if T.__name__ == "graphc" else x.chunk(2, 1))
    r_wrong, r_missing, r_short = (probe.run_probe(p, ("reference",), torch)
                                   for p in (wrong, missing, short))
    assert r_wrong.traces and r_wrong.matches is False and "max |difference|" in r_wrong.notes[0]
    assert not r_missing.traces and r_missing.matches is None
    assert "AttributeError: module 'graphc' has no attribute 'no_such_function'" in r_missing.refusal
    assert r_short.matches is False and "1 results, torch has 2" in r_short.notes[0]
    out = io.StringIO()
    probe.report([r_wrong, r_missing], out)
    assert "2 entries: 1 trace, 0 compile on numba-cpu, 0 match PyTorch, 1 refused" in out.getvalue()


def test_gradients_are_compared_with_autograds(probe, torch):
    chosen = entries(probe, "F.gelu", "torch.split", "F.cross_entropy(weight)", "x.argmin")
    results = [probe.run_probe(p, ("reference",), torch) for p in chosen]
    assert [r.gradients for r in results] == [True, True, True, None]  # argmin: integer result
    # equal values, different gradients (PyTorch's result is cut from the graph)
    detached = probe.Probe("detached", probe.MATH,
                           lambda T, F, x: x * 1 if T.__name__ == "graphc" else x.detach() * 1)
    result = probe.run_probe(detached, ("reference",), torch)
    assert result.matches and result.gradients is False
    assert "[gradients] result 0: max |difference|" in result.notes[0]


def test_numba_cpu_is_compared_too(probe, torch):
    result = probe.run_probe(entries(probe, "torch.stack")[0], ("reference", "numba-cpu"), torch)
    assert (result.traces, result.compiles, result.matches) == (True, True, True), result.refusal


def test_integer_results_must_equal_exactly(probe):
    a = np.array([1, 2], np.int64)
    assert probe._close([a], [a.copy()]) == ""
    assert "values differ" in probe._close([a], [a + 1])
    assert "dtype int32, torch int64" in probe._close([a.astype(np.int32)], [a])
