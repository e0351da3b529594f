"""Every registered primitive lowers on numba-cpu, numba-cuda and ONNX, or is excluded below
with the reason.

"Lowers" means the target registered a lowering for the primitive in ir/lowering.py: its own
(a library call, a pointwise rule, a reduction accumulator, an ONNX converter) or its kind's
default. The code generators' elementwise default composes the registry's `scalar` expression,
so every elementwise op lowers there once its registry entry is complete; ONNX has no default
and converts each op explicitly.
"""
from __future__ import annotations

import numpy as np
import pytest

import graphc.backends.numba_cpu  # noqa: F401  (each import registers the target's lowerings)
import graphc.backends.numba_cuda.codegen  # noqa: F401
import graphc.onnx_export  # noqa: F401
from graphc.ir.errors import GraphcError
from graphc.ir.lowering import (STRUCTURED_OPS, LoweringMissing, find_lowering, lowering, lowering_for,
                                register_lowering, unlowered_primitives)
from graphc.ir.ops.comm import COMM_OPS
from graphc.ir.registry import ELEMENTWISE, OPAQUE, PRIMITIVES, Primitive
from graphc.ir.types import TensorType

TARGETS = ("numba-cpu", "numba-cuda", "onnx")

_CONSTANT = "no code runs: the executor writes a constant kernel's value into its buffer once"
_VIEW = "no code runs: a view aliases its operand's buffer (the plan gives both one slot)"
_COMM = ("a communication op: it sits only at a pipeline stage graph's boundary, where "
         "graphc.distributed.pipeline.StageExecutable cuts it off and carries the message; "
         "backends compile the rest (ir/ops/comm.py)")
_COMM_EXCLUSIONS = {op: _COMM for op in COMM_OPS}
_CODEGEN_EXCLUSIONS = {"constant": _CONSTANT, **_COMM_EXCLUSIONS,
                       **{op: _VIEW for op, prim in PRIMITIVES.items() if prim.view}}

_GRADIENT = ("a gradient op: ONNX export is of inference graphs, which never contain it "
             "(graphc.export covers compiled training steps)")
_RANDOM = ("ONNX export is of inference graphs, where dropout is the identity; graphc's counter-based "
           "generator has no ONNX operator drawing the same bits")
EXCLUSIONS: dict[str, dict[str, str]] = {
    "numba-cpu": _CODEGEN_EXCLUSIONS,
    "numba-cuda": _CODEGEN_EXCLUSIONS,
    "onnx": {
        **_COMM_EXCLUSIONS,
        "conv2d_weight_grad": _GRADIENT,
        "max_pool2d_grad": _GRADIENT,
        "avg_pool2d_grad": _GRADIENT,
        "slice_grad": _GRADIENT,
        "normalize_grad": _GRADIENT,
        "softmax_grad": _GRADIENT,
        "scatter_add": _GRADIENT + " (of gather)",
        "scatter_add_along_axis": _GRADIENT + " (of take_along_axis)",
        "random_uniform": _RANDOM,
        "random_bernoulli": _RANDOM,
        "floor_divide": ("not converted: ONNX's Div truncates integers toward zero, and floor division "
                         "of floats needs Python's correction steps; export refuses it by name"),
        "remainder": ("not converted: ONNX's Mod takes the divisor's sign for integers only (floats "
                      "need fmod=1, the dividend's sign); export refuses it by name"),
    },
}


# Structured ops (a body graph, several outputs) are not registry primitives; the same rule holds.
_SCAN_PENDING = "scan lowering on {target}: issue 20 item 4, not yet built"
STRUCTURED_EXCLUSIONS: dict[str, dict[str, str]] = {
    target: {"scan": _SCAN_PENDING.format(target=target)} for target in TARGETS}
STRUCTURED_EXCLUSIONS["numba-cpu"]["scan"] = (
    "scan is no registry lowering on numba-cpu: graphc/scan_lowering.py compiles the body alone "
    "and runs its steps in one compiled driver (backends/numba_cpu/driver.py)")
STRUCTURED_EXCLUSIONS["numba-cuda"]["scan"] = (
    "scan lowering on numba-cuda: issue 20 item 4, device-side stepping is not yet built; "
    "graphc/scan_lowering.py compiles the body alone and steps it from Python meanwhile")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", STRUCTURED_OPS)
def test_structured_op_lowers_or_is_excluded_with_a_reason(target, op):
    reason = STRUCTURED_EXCLUSIONS[target].get(op)
    lowers = find_lowering(target, op) is not None
    if reason is None:
        assert lowers, f"{target} cannot lower {op!r}: register a lowering or exclude it"
    else:
        assert not lowers, f"{target} lowers {op!r}: its exclusion is stale"
        with pytest.raises(LoweringMissing, match=f"{target} has no lowering for {op!r}"):
            lowering_for(target, op)


def completeness_failures(target: str, exclusions: dict[str, str]) -> list[str]:
    """What keeps `target` from being complete: primitives without a lowering that are not
    excluded, and exclusions that are stale (the op lowers after all, or no longer exists)."""
    failures = [f"{op}: no {target} lowering and no exclusion" for op in unlowered_primitives(target)
                if op not in exclusions]
    for op in sorted(exclusions):
        if op not in PRIMITIVES:
            failures.append(f"{op}: excluded but not a registered primitive")
        elif find_lowering(target, op) is not None:
            failures.append(f"{op}: excluded but {target} lowers it; drop the exclusion")
    return failures


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("op", sorted(PRIMITIVES))
def test_primitive_lowers_or_is_excluded_with_a_reason(target, op):
    reason = EXCLUSIONS[target].get(op)
    lowers = find_lowering(target, op) is not None
    if reason is None:
        assert lowers, f"{target} cannot lower {op!r}: register a lowering or exclude it"
    else:
        assert reason.strip(), f"{target} excludes {op!r} without saying why"
        assert not lowers, f"{target} lowers {op!r}: its exclusion is stale"


@pytest.mark.parametrize("target", TARGETS)
def test_exclusions_name_registered_primitives(target):
    assert completeness_failures(target, EXCLUSIONS[target]) == []


def _unlowered_primitive(name: str, kind: str) -> Primitive:
    def infer(x: TensorType) -> TensorType:
        return x
    return Primitive(name, kind, infer, lambda x: np.array(x), None, num_inputs=1,
                     scalar=(lambda x: x) if kind == ELEMENTWISE else None)


def test_a_new_primitive_without_lowerings_fails_the_check(monkeypatch):
    monkeypatch.setitem(PRIMITIVES, "fancy_conv", _unlowered_primitive("fancy_conv", OPAQUE))
    for target in TARGETS:
        assert completeness_failures(target, EXCLUSIONS[target]) == [
            f"fancy_conv: no {target} lowering and no exclusion"]


def test_a_new_elementwise_primitive_lowers_through_its_scalar_expression_but_needs_an_onnx_converter(
        monkeypatch):
    monkeypatch.setitem(PRIMITIVES, "fancy_exp", _unlowered_primitive("fancy_exp", ELEMENTWISE))
    assert completeness_failures("numba-cpu", EXCLUSIONS["numba-cpu"]) == []
    assert completeness_failures("numba-cuda", EXCLUSIONS["numba-cuda"]) == []
    assert completeness_failures("onnx", EXCLUSIONS["onnx"]) == ["fancy_exp: no onnx lowering and no exclusion"]


def test_lowering_registry_refuses_typos_and_second_lowerings():
    with pytest.raises(KeyError, match="no_such_op"):
        lowering("numba-cpu", "no_such_op")(lambda node: None)
    with pytest.raises(ValueError, match="numba-cpu: primitive 'matmul' has two lowerings"):
        register_lowering("numba-cpu", "matmul", lambda node, refs: None)


def test_missing_lowering_names_the_target_and_the_op():
    with pytest.raises(LoweringMissing, match="onnx has no lowering for 'slice_grad'; it lowers abs, add, ") as info:
        lowering_for("onnx", "slice_grad")
    assert isinstance(info.value, GraphcError)
