"""`moments` (ir/ops/norm.py), the one-pass mean and variance behind LayerNorm and BatchNorm:
the op against NumPy, its VJP against finite differences (float64), numba-cpu and the numba-cuda
simulator against the reference, ONNX through onnxruntime, the layers against PyTorch, and the
graphs the layers now trace to."""
import os

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc.backends.reference import evaluate
from graphc.ir import Builder, TensorType
from graphc.ir.errors import GraphcError
from graphc.lowering import compile_graph
from graphc.passes.autodiff import autodiff
from graphc.passes.simplify import simplify
from opcheck import check_vjp, run_op


def moments_graph(shape, axes, dtype="float32"):
    b = Builder("moments")
    x = b.add_input(TensorType(shape, dtype), "x")
    b.add_output("stats", b.bind("moments", x, axes=axes))
    return b.graph.verify()


def naive(x, axes):
    mean = x.astype(np.float64).mean(axis=axes, keepdims=True)
    return np.stack([mean, ((x - mean) ** 2).mean(axis=axes, keepdims=True)])


CASES = [((4, 3, 5, 6), (0, 2, 3)),   # batch norm 2d: channels in the middle
         ((6, 3), (0,)),              # batch norm 1d: channels innermost
         ((2, 5, 8), (2,)),           # layer norm: rows
         ((2, 5, 8), (1, 2)),         # layer norm over two trailing axes
         ((3, 4), (0, 1))]            # everything: one line


@pytest.mark.parametrize("shape, axes", CASES)
def test_forward_matches_numpy(shape, axes):
    x = np.random.default_rng(0).standard_normal(shape)
    np.testing.assert_allclose(run_op("moments", [x], axes=axes), naive(x, axes), rtol=1e-12)


@pytest.mark.parametrize("shape, axes", CASES)
def test_vjp_matches_finite_differences(shape, axes):
    check_vjp("moments", [np.random.default_rng(1).standard_normal(shape)], rtol=1e-6, axes=axes)


def test_shape_errors_name_the_problem():
    with pytest.raises(GraphcError, match=r"the axes kept, \(0, 2\), must be consecutive"):
        run_op("moments", [np.zeros((2, 3, 4, 5))], axes=(1, 3))
    with pytest.raises(GraphcError, match="floating-point"):
        run_op("moments", [np.zeros((2, 3), np.int64)], axes=(0,))
    with pytest.raises(GraphcError, match="size 0"):
        run_op("moments", [np.zeros((0, 3))], axes=(0,))


@pytest.mark.parametrize("shape, axes", CASES)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_numba_cpu_matches_reference(shape, axes, dtype):
    x = np.random.default_rng(2).standard_normal(shape).astype(dtype)
    graph = moments_graph(shape, axes, dtype)
    (got,), (want,) = compile_graph(graph, "numba-cpu")(x), evaluate(graph, [x])
    tolerance = dict(rtol=1e-6, atol=1e-7) if dtype == "float32" else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got, want, **tolerance)


def test_large_channels_run_in_parallel_and_keep_the_variance_of_offset_data():
    """A mean 1000 times the spread: E[x^2] - E[x]^2 in float32 would lose every digit of the
    variance; the kernel's shifted float64 sums keep it."""
    rng = np.random.default_rng(3)
    x = (1000 + 0.5 * rng.standard_normal((16, 32, 24, 24))).astype(np.float32)
    graph = moments_graph(x.shape, (0, 2, 3))
    executable = compile_graph(graph, "numba-cpu")
    assert executable.kernels[0].generated.parallel
    (got,), (want,) = executable(x), evaluate(graph, [x])
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got[1].ravel(), 0.25, rtol=0.1)


def test_numba_cuda_simulator_matches_reference():
    if os.environ.get("NUMBA_ENABLE_CUDASIM") != "1":
        pytest.skip("runs under NUMBA_ENABLE_CUDASIM=1 (tests/test_numba_cuda.py sets it up)")
    x = np.random.default_rng(4).standard_normal((2, 3, 2, 2)).astype(np.float32)
    graph = moments_graph(x.shape, (0, 2, 3))
    (got,), (want,) = compile_graph(graph, "numba-cuda")(x), evaluate(graph, [x])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_onnx_export_of_layer_norm_matches_reference(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    gc.manual_seed(0)
    model = gc.nn.Sequential(gc.nn.Linear(6, 8), gc.nn.LayerNorm(8)).eval()
    x = np.random.default_rng(5).standard_normal((3, 6)).astype(np.float32)
    path = tmp_path / "ln.onnx"
    gc.export_onnx(model, path, x)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    np.testing.assert_allclose(got, gc.compile(model, x, backend="reference")(x), rtol=1e-5, atol=1e-5)


def test_layer_norm_and_its_gradient_take_one_normalize_op_each_and_only_the_affine_sums():
    """Forward: one `normalize` and no reduction. Backward: one `normalize_grad` and two sums,
    the weight's and the bias's gradients over the rows (ir/ops/norm.py; through `moments` the
    gradient took four sums and a dozen elementwise ops)."""
    rng = np.random.default_rng(6)
    x, w, bias = rng.standard_normal((4, 8)), rng.standard_normal(8), rng.standard_normal(8)
    forward = gc.trace(lambda x, w, b: F.layer_norm(x, 8, w, b).square().sum(), x, w, bias)
    ops = [n.op for n in forward.nodes]
    assert ops.count("normalize") == 1 and ops.count("sum") == 1  # the loss's own sum
    backward = autodiff(forward, wrt=[0, 1, 2], keep_outputs=False)
    ops = [n.op for n in backward.nodes]
    assert ops.count("normalize_grad") == 1 and "moments" not in ops
    sums = [n.output.shape for n in backward.nodes if n.op == "sum"]
    assert sorted(sums) == [(8,), (8,)], sums


@pytest.mark.parametrize("layer", ["layer_norm", "batch_norm"])
def test_training_step_matches_pytorch(layer):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    if layer == "layer_norm":
        x = rng.standard_normal((3, 5, 8)).astype(np.float32) * 3 + 2
        ours, theirs = gc.nn.LayerNorm(8), torch.nn.LayerNorm(8)
    else:
        x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32) * 3 + 2
        ours, theirs = gc.nn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    weight, bias = rng.standard_normal(ours.weight.shape).astype(np.float32), rng.standard_normal(
        ours.bias.shape).astype(np.float32)
    ours.load_state_dict({**ours.state_dict(), "weight": weight, "bias": bias})
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(weight))
        theirs.bias.copy_(torch.from_numpy(bias))
    target = rng.standard_normal(x.shape).astype(np.float32)
    optimizer = gc.optim.SGD(ours.parameters(), lr=0.1)
    step = gc.compile_train_step(ours, lambda y, t: ((y - t) ** 2).mean(), optimizer, (x, target),
                                 backend="numba-cpu")
    loss = float(step(x, target))
    torch_optimizer = torch.optim.SGD(theirs.parameters(), lr=0.1)
    torch_loss = ((theirs(torch.from_numpy(x)) - torch.from_numpy(target)) ** 2).mean()
    torch_loss.backward()
    torch_optimizer.step()
    assert abs(loss - torch_loss.item()) < 1e-5
    state = ours.state_dict()
    for name, value in theirs.state_dict().items():
        if name != "num_batches_tracked":
            np.testing.assert_allclose(state[name], value.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_simplified_gradient_slices_moments_once_and_reassembles_no_cotangent():
    """The mean's and the variance's cotangents meet in a concatenate (inside a slice_grad of
    the whole) that moments' VJP slices apart again: simplify's rules take both away, and CSE
    merges the VJP's slices of the statistics with the forward's."""
    rng = np.random.default_rng(8)
    x, w = rng.standard_normal((4, 3, 5, 5)), rng.standard_normal(3)

    def normalised(x, w):
        stats = gc.tensor.bind("moments", x, axes=(0, 2, 3))
        mean, var = (stats[k:k + 1].reshape(stats.shape[1:]) for k in (0, 1))
        return (((x - mean) * gc.rsqrt(var + 1e-5) * w.reshape(1, 3, 1, 1)) ** 2).sum()

    forward = gc.trace(normalised, x, w)
    ops = [n.op for n in simplify(autodiff(forward, wrt=[0, 1], keep_outputs=False)).nodes]
    assert ops.count("slice") == 2 and "concatenate" not in ops and "slice_grad" not in ops
