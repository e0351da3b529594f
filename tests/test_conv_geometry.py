"""A convolution's window, row stride, padding and dilation are arguments of its numba-cpu
kernel, not constants in its source: layers that differ only in them share one compiled module."""
from collections import Counter

import numpy as np

from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.lowering import compile_graph


def _graph(arrays, outputs):
    b = Builder("geometries")
    inputs = [b.add_input(TensorType.of(a), f"x{i}") for i, a in enumerate(arrays)]
    for i, v in enumerate(outputs(b, *inputs)):
        b.add_output(f"y{i}", v)
    return b.graph.verify()


def _conv_calls(executable) -> dict[str, list]:
    """entry -> [(module source, compiled function)] of the executable's conv calls."""
    by_entry: dict[str, list] = {}
    for kernel in executable.kernels:
        for call, function in zip(kernel.generated.calls, kernel.functions):
            if call.entry.startswith("conv"):
                by_entry.setdefault(call.entry, []).append((call.source, function))
    return by_entry


def test_convolutions_differing_in_window_row_stride_padding_and_dilation_share_one_module():
    """A ResNet's strided 3x3 layer and 1x1 strided projection, a dilated layer and one striding
    rows only, with the input gradients of the first two: each conv entry compiles once (the
    geometry pasted as constants made one module per geometry: conv2d_im2col three times and
    conv2d_input_grad twice in resnet-m). A column stride of 1 gets a module of its own (the
    stride of the copies along a row stays a constant, for LLVM to vectorise them). Every layer
    still matches the reference."""
    rng = np.random.default_rng(0)
    shapes = [(2, 3, 9, 9), (4, 3, 3, 3), (4, 3, 1, 1), (2, 4, 5, 5), (2, 4, 5, 5)]
    arrays = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    graph = _graph(arrays, lambda b, x, w3, w1, g3, g1: [
        b.conv2d(x, w3, stride=2, padding=1),
        b.conv2d(x, w1, stride=2),
        b.conv2d(x, w3, stride=2, padding=2, dilation=2),
        b.conv2d(x, w3, stride=(1, 2), padding=(0, 1)),
        b.conv2d(x, w3, padding=1),  # column stride 1
        b.conv2d_input_grad(g3, w3, input_shape=shapes[0], stride=2, padding=1),
        b.conv2d_input_grad(g1, w1, input_shape=shapes[0], stride=2)])
    executable = compile_graph(graph, "numba-cpu")
    for name, got, want in zip(graph.output_names, executable(*arrays), evaluate(graph, arrays)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)

    calls = _conv_calls(executable)
    modules = {entry: Counter(source for source, _ in c) for entry, c in calls.items()}
    assert {entry: sorted(m.values()) for entry, m in modules.items()} == {
        "conv2d_im2col": [1, 4], "conv2d_input_grad": [2]}
    for entry, c in calls.items():  # one compiled function per module
        functions = {source: function for source, function in c}
        assert all(function is functions[source] for source, function in c), entry
