"""Random programs over the public API (tests/random_programs.py), run as users run them.

Budget per CI run (over 2,000 programs): every program gets the float64 reference checks (transform composition,
simplify, fusion and memory planning, finite differences), which cost milliseconds; a bounded
subset compiles for numba-cpu (each new kernel costs 0.1-1 s of Numba compile), a few with an
axis over the CPU backend's parallel threshold; a handful of tiny ones run on the numba-cuda
simulator, in one child process (the simulator must be switched on before numba is imported,
and runs ~120 us per thread). Counts are printed at the end of the session (conftest.py).
Failures found this way are kept, minimised, in test_random_program_regressions.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

if __name__ == "__main__":  # the simulator child: before anything imports numba
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import pytest
from hypothesis import HealthCheck, given, note, settings

import random_programs as rp

CI = settings(derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                     HealthCheck.filter_too_much])
QUICK_REFERENCE_PROGRAMS = 200  # in the default suite (~60 ms each)
REFERENCE_PROGRAMS_PER_DTYPE = 900  # marked slow; with the rest, over 2,000 programs per CI run
CPU_PROGRAMS = 120
CPU_LARGE_PROGRAMS = 6
CUDA_PROGRAMS = 60


@settings(CI, max_examples=QUICK_REFERENCE_PROGRAMS)
@given(rp.programs())
def test_programs_on_the_reference_backend(program):
    note(str(program))
    rp.check_reference(program)


@pytest.mark.slow
@settings(CI, max_examples=REFERENCE_PROGRAMS_PER_DTYPE)
@given(rp.programs(dtypes=("float32",)))
def test_float32_programs_on_the_reference_backend(program):
    note(str(program))
    rp.check_reference(program)


@pytest.mark.slow
@settings(CI, max_examples=REFERENCE_PROGRAMS_PER_DTYPE)
@given(rp.programs(dtypes=("float64",)))
def test_float64_programs_on_the_reference_backend(program):
    note(str(program))
    rp.check_reference(program)


@settings(CI, max_examples=20)
@given(rp.programs(max_steps=4, large=True))
def test_large_programs_on_the_reference_backend(program):
    note(str(program))
    rp.check_reference(program, directions=1)


@pytest.mark.slow
@settings(CI, max_examples=CPU_PROGRAMS)
@given(rp.programs(max_steps=5))
def test_programs_on_numba_cpu(program):
    note(str(program))
    rp.check_backend(program, "numba-cpu")


@pytest.mark.slow
@settings(CI, max_examples=CPU_LARGE_PROGRAMS)
@given(rp.programs(max_steps=3, large=True))
def test_large_programs_on_numba_cpu(program):
    """One axis over the parallel threshold: the kernels' prange loops run."""
    note(str(program))
    rp.check_backend(program, "numba-cpu")


def _tiny_programs(count: int) -> list[rp.Program]:
    drawn: list[rp.Program] = []

    @settings(CI, max_examples=count)
    @given(rp.programs(max_steps=4))
    def collect(program):
        if program.size <= 64:
            drawn.append(program)

    collect()
    return drawn


@pytest.mark.slow
def test_programs_on_the_numba_cuda_simulator():
    programs = _tiny_programs(CUDA_PROGRAMS)
    child = subprocess.run([sys.executable, __file__], input=json.dumps([asdict(p) for p in programs]),
                           capture_output=True, text=True, timeout=900,
                           cwd=Path(__file__).resolve().parent)
    assert child.returncode == 0, child.stderr[-4000:]
    report = json.loads(child.stdout.splitlines()[-1])
    rp.COUNTS.update({f"simulated {name}": n for name, n in report["counts"].items()})
    failures = [(p, v) for p, v in zip(programs, report["verdicts"]) if v]
    assert not failures, "\n\n".join(f"{v}\n{p}" for p, v in failures)


def _simulate(programs: list[dict]) -> dict:
    """The child: each program on the simulated numba-cuda backend; verdicts ('' or the
    failure, one per program) and the counts."""
    verdicts = []
    for fields in programs:
        program = rp.Program(**{**fields, "arg_shapes": [tuple(s) for s in fields["arg_shapes"]]})
        try:
            rp.check_backend(program, "numba-cuda")
            verdicts.append("")
        except Exception as exc:  # every failure is reported with its program by the parent
            verdicts.append(f"{type(exc).__name__}: {exc}")
    return {"verdicts": verdicts, "counts": dict(rp.COUNTS)}


if __name__ == "__main__":
    print(json.dumps(_simulate(json.loads(sys.stdin.read()))))
