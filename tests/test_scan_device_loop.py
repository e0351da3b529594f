"""numba-cuda runs a scan's steps on the device (backends/numba_cuda/scan_loop.py): values match
the reference, and the bytes copied between host and device do not grow with the trip count.
On Numba's CUDA simulator, in a child process (the simulator must be on before numba loads)."""
import numpy as np

import graphc as gc
from opcheck import on_cuda_simulator


def test_scan_steps_run_on_the_device_and_match_the_reference():
    on_cuda_simulator("test_scan_device_loop", "device_loop_matches_reference")


def swapping(c, xs, w):
    """The new carries are (the other carry, h): a swap, and a carry that is a body input."""
    def body(carry, x):
        h, g = carry
        h2 = (h @ w + x).tanh()
        return (g, h2), (h2, (x * 2).sum())
    return gc.scan(body, (c, c * 0.5), xs)


def passing_on(c, xs, w):
    """The new carry is the step's input itself; the per-step output is a scalar."""
    return gc.scan(lambda h, x: (x, (h * h).sum()), c, xs, reverse=True)


def device_loop_matches_reference():
    """(run by the test above, in a process with the simulator on)"""
    from graphc.backends.numba_cuda import scan_loop

    loops = []
    original_init = scan_loop.DeviceScanLoop.__init__

    def recording_init(self, node, body):
        original_init(self, node, body)
        loops.append(self)
    scan_loop.DeviceScanLoop.__init__ = recording_init

    rng = np.random.default_rng(0)
    w = (rng.normal(size=(3, 3)) * 0.5).astype(np.float32)
    for f in (swapping, passing_on):
        moved_besides_stacks = set()
        for steps in (1, 3, 8):
            c = rng.normal(size=(2, 3)).astype(np.float32)
            xs = rng.normal(size=(steps, 2, 3)).astype(np.float32)
            loops.clear()
            got = gc.tree.flatten(gc.jit(f, backend="numba-cuda")(c, xs, w))[0]
            want = gc.tree.flatten(gc.jit(f, backend="reference")(c, xs, w))[0]
            for g, r in zip(got, want):
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
            assert len(loops) == 1, loops  # the scan ran as a device loop
            moved = loops[0].body.transfers
            stacked_out = sum(g.nbytes for g in got if g.shape[:1] == (steps,) and g.ndim != c.ndim)
            moved_besides_stacks.add((moved["to_device"] - xs.nbytes, moved["to_host"] - stacked_out))
        # what each call moves, less its stacked inputs and outputs, is the same at every length
        assert len(moved_besides_stacks) == 1, (f.__name__, moved_besides_stacks)
        assert min(next(iter(moved_besides_stacks))) > 0
