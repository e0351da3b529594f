"""Memory planning: liveness, arena placement, in-place reuse and donation.

`run_plan` executes a plan with NumPy (each kernel through the reference interpreter, every
value read from and written to the buffer the plan gives it), so a plan that lets a buffer be
overwritten while still needed computes wrong numbers here, independently of any backend.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphc.backends.numba_cpu.codegen import generate
from graphc.backends.reference import evaluate
from graphc.ir import Builder, Node, TensorType
from graphc.ir.kernels import KERNEL_OP
from graphc.passes.fusion import fuse
from graphc.passes.memplan import PlanValidationError, anchor_handovers, plan_memory, validate
from random_graphs import random_arguments, random_graphs

F32 = "float32"


def scratch_of(node):
    return list(generate(node).scratch) if node.attrs["pattern"] not in ("view", "constant") else []


def plan_for(graph, donate=None):
    plan = plan_memory(fuse(graph), donate, scratch=scratch_of)
    validate(plan)
    assert plan.peak_bytes <= plan.naive_bytes
    return plan


def run_plan(plan, args):
    """Execute `plan` with NumPy, honouring every buffer placement it makes."""
    arena = np.full(plan.peak_bytes, 0xFF, np.uint8)  # NaN-filled: stale reads show up
    args = [a.copy() for a in args]
    buffers = dict(zip(plan.graph.input_values, args))

    def buffer(v):
        loc = plan.locations[v]
        if loc.kind == "arena":
            offset = plan.storages[loc.index].offset
            return arena[offset:offset + v.type.nbytes].view(v.type.np_dtype).reshape(v.shape)
        if loc.kind == "donated":
            return args[loc.index]
        return np.empty(v.shape, v.type.np_dtype)

    for node in plan.schedule:
        if node.attrs["pattern"] == "view":
            buffers[node.output] = buffers[node.inputs[0]].reshape(node.output.shape)
            continue
        results = evaluate(node.subgraph, [buffers[v] for v in node.inputs])
        for v, result in zip(node.outputs, results):
            buffers[v] = buffer(v)
            buffers[v][...] = result
    outputs = [buffers[v] for v in plan.graph.output_values]
    for j in plan.output_copies:
        outputs[j] = outputs[j].copy()
    for k, j in plan.donated_by_copy.items():
        args[k][...] = outputs[j]
        outputs[j] = args[k]
    return outputs, args


def check_plan(graph, args, donate=None):
    plan = plan_for(graph, donate)
    expected = evaluate(graph, args)
    outputs, updated = run_plan(plan, args)
    for got, want in zip(outputs, expected):
        np.testing.assert_array_equal(got, want)
    for k, j in (donate or {}).items():
        np.testing.assert_array_equal(updated[k], expected[j])
    return plan


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_graphs(), st.data())
def test_random_graph_plans_are_valid_and_compute_correctly(graph, data):
    candidates = [(k, j) for k, inp in enumerate(graph.inputs) for j, out in enumerate(graph.output_values)
                  if inp.value.type == out.type]
    donate = dict([data.draw(st.sampled_from(candidates))]) if candidates and data.draw(st.booleans()) else None
    check_plan(graph, random_arguments(graph), donate)


def chain_with_breaks():
    """Elementwise kernels separated by transposes: each intermediate dies at the next kernel."""
    b = Builder("chain")
    x = b.add_input(TensorType((64, 64), F32), "x")
    v = x
    for _ in range(4):
        v = b.transpose(b.tanh(b.mul(v, v)), perm=(1, 0))
    b.add_output("y", b.neg(v))
    return b.graph


def test_arena_reuses_dead_buffers_and_updates_in_place():
    graph = chain_with_breaks()
    plan = check_plan(graph, random_arguments(graph))
    assert plan.inplace == []  # transposes read off-index: never in place
    assert plan.peak_bytes <= 2 * 64 * 64 * 4 < plan.naive_bytes

    b = Builder("inplace")
    x = b.add_input(TensorType((8, 8), F32), "x")
    t = b.tanh(x)
    flat = b.reshape(t, shape=(64,))  # a view: the next kernel cannot fuse with tanh's
    c = b.mul(flat, flat)             # t dies here, read at identity: c takes its buffer
    b.add_output("z", b.transpose(b.reshape(c, shape=(8, 8)), perm=(1, 0)))
    plan = check_plan(b.graph, random_arguments(b.graph))
    ((kernel, dying, reused),) = plan.inplace
    assert dying is plan.schedule[0].output and reused is kernel.output
    assert plan.slot_of(dying) == plan.slot_of(reused)
    # the view's kernel input is the dying buffer: input 0 and output 0 are one array
    assert plan.written_in_place(kernel) == {(0, 0)}
    assert plan.written_in_place(plan.schedule[0]) == set()


def product_with_epilogue(product_read_elsewhere=False, cast=None):
    """relu(x @ w + bias) read by a transpose (another kernel), so the library kernel's product
    and its epilogue's result both live in the arena."""
    b = Builder("epilogue")
    x = b.add_input(TensorType((6, 5), F32), "x")
    w = b.add_input(TensorType((5, 8), F32), "w")
    bias = b.add_input(TensorType((8,), F32), "bias")
    product = b.matmul(x, w)
    activated = b.relu(b.add(product, bias))
    if cast is not None:
        activated = b.cast(activated, dtype=cast)
    b.add_output("t", b.transpose(activated, perm=(1, 0)))
    if product_read_elsewhere:
        b.add_output("p", b.transpose(product, perm=(1, 0)))
    return b.graph


def library_kernel(plan):
    (kernel,) = [n for n in plan.schedule if n.attrs["pattern"] == "library"]
    return kernel


def test_library_epilogue_writes_over_the_product_nothing_else_reads():
    graph = product_with_epilogue()
    plan = check_plan(graph, random_arguments(graph))
    kernel = library_kernel(plan)
    product, activated = kernel.outputs
    assert plan.slot_of(product) == plan.slot_of(activated)
    assert (kernel, product, activated) in plan.inplace
    assert len([s for s in plan.storages if s.scratch_of is None]) == 1
    assert plan.peak_bytes == 6 * 8 * 4 < plan.naive_bytes  # one (6, 8) buffer, 64-byte aligned


@pytest.mark.parametrize("product_read_elsewhere, cast", [(True, None), (False, "int32")])
def test_library_product_keeps_its_buffer_when_read_elsewhere_or_retyped(product_read_elsewhere, cast):
    """A product another kernel reads must outlive the epilogue; an epilogue result of another
    dtype (int32, as many bytes as float32) cannot be stored through the product's array."""
    graph = product_with_epilogue(product_read_elsewhere, cast)
    plan = check_plan(graph, random_arguments(graph))
    product, activated = library_kernel(plan).outputs
    assert plan.slot_of(product) != plan.slot_of(activated)


def hand_built_library_kernel(epilogue):
    """A library kernel (x @ w, then `epilogue` of the product) storing the product and the
    epilogue's result; fusion never builds one whose epilogue reads off-index."""
    b = Builder("k")
    x, w = (b.add_input(TensorType((4, 4), F32), name) for name in ("x0", "x1"))
    product = b.matmul(x, w)
    b.add_output("y0", product)
    b.add_output("y1", epilogue(b, product))
    outer = Builder("outer")
    inputs = tuple(outer.add_input(TensorType((4, 4), F32), name) for name in ("x", "w"))
    return Node(KERNEL_OP, inputs, {"name": "k", "pattern": "library"},
                tuple(v.type for v in b.graph.output_values), None, b.graph)


def test_epilogue_reading_the_product_off_index_keeps_its_buffer():
    assert anchor_handovers(hand_built_library_kernel(lambda b, p: b.tanh(p))) == {1: 0}
    transposed = hand_built_library_kernel(lambda b, p: b.add(p, b.transpose(p, perm=(1, 0))))
    assert anchor_handovers(transposed) == {}  # element (i, j) reads (j, i), maybe overwritten


def sgd_step():
    b = Builder("sgd")
    w = b.add_input(TensorType((4, 4), F32), "w", role="param")
    x = b.add_input(TensorType((4, 4), F32), "x")
    y = b.matmul(x, w)
    update = b.sub(w, b.mul(b.tanh(y), b.scalar_like(0.1, w)))
    b.add_output("y", y)
    b.add_output("w", update)
    return b.graph


def test_donated_parameter_is_updated_in_place_after_its_readers():
    graph = sgd_step()
    plan = check_plan(graph, random_arguments(graph), donate={0: 1})
    assert plan.donated_in_place == {0: 1} and plan.donated_by_copy == {}
    # the update is the matmul's epilogue: the matmul reads w whole, then the loop updates it
    assert [n.attrs["pattern"] for n in plan.schedule] == ["library"]
    assert plan.locations[plan.graph.output_values[1]].kind == "donated"
    (kernel,) = plan.schedule
    w_at = kernel.inputs.index(plan.graph.input_values[0])
    assert plan.written_in_place(kernel) == {(w_at, kernel.outputs.index(plan.graph.output_values[1]))}


def graph_writer(plan, output_index):
    return plan.graph.output_values[output_index].producer


def test_readers_are_scheduled_before_the_donated_buffer_is_overwritten():
    b = Builder("reorder")
    w = b.add_input(TensorType((4, 4), F32), "w")
    x = b.add_input(TensorType((4, 4), F32), "x")
    new_w = b.mul(w, b.scalar_like(0.9, w))  # traced first ...
    y = b.matmul(x, w)                       # ... but this still needs the old w
    b.add_output("w", new_w)
    b.add_output("y", y)
    plan = check_plan(b.graph, random_arguments(b.graph), donate={0: 0})
    assert plan.donated_in_place == {0: 0}
    assert plan.schedule[-1] is graph_writer(plan, 0)


def test_donation_falls_back_to_a_copy_when_in_place_is_unsafe():
    b = Builder("transposed")
    w = b.add_input(TensorType((4, 4), F32), "w")
    b.add_output("w", b.transpose(w, perm=(1, 0)))  # reads w off-index while writing it
    plan = check_plan(b.graph, random_arguments(b.graph), donate={0: 0})
    assert plan.donated_in_place == {} and plan.donated_by_copy == {0: 0}

    b = Builder("cyclic")
    w = b.add_input(TensorType((4, 4), F32), "w")
    new_w = b.add(w, b.scalar_like(1.0, w))
    b.add_output("w", new_w)
    b.add_output("y", b.matmul(new_w, w))  # reads old and new w: no order works
    plan = check_plan(b.graph, random_arguments(b.graph), donate={0: 0})
    assert plan.donated_by_copy == {0: 0}


def test_donation_must_match_types_and_indices():
    b = Builder("mismatch")
    x = b.add_input(TensorType((4, 4), F32), "x")
    b.add_output("s", b.sum(x, axes=(0,)))
    graph = fuse(b.graph)
    with pytest.raises(ValueError, match=r"input 'x' is f32\[4,4\] but output 's' is f32\[4\]"):
        plan_memory(graph, {0: 0})
    with pytest.raises(ValueError, match="has 1 inputs"):
        plan_memory(graph, {5: 0})


def test_validate_rejects_overlapping_live_buffers():
    graph = chain_with_breaks()
    plan = plan_for(graph)
    live_together = [(a, b) for i, a in enumerate(plan.storages) for b in plan.storages[i + 1:]
                     if a.overlaps_in_time(b)]
    a, b = live_together[0]
    b.offset = a.offset
    with pytest.raises(PlanValidationError, match="live together"):
        validate(plan)


def test_slots_cover_arena_values_only():
    graph = chain_with_breaks()
    plan = plan_for(graph)
    assert plan.slot_of(plan.graph.input_values[0]) is None
    assert plan.slot_of(plan.graph.output_values[0]) is None
    first = plan.schedule[0].output
    assert plan.slot_of(first) == plan.locations[first].index
    assert "arena" in plan.summary()
    # inside a kernel, its output value has the kernel output's slot; temporaries have none
    kernel = plan.schedule[0]
    assert plan.slot_of(kernel.subgraph.output_values[0]) == plan.slot_of(first)
    assert all(plan.slot_of(v) is None for v in kernel.subgraph.input_values)
