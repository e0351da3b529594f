"""numba-cuda runs a scan's steps on the device (backends/numba_cuda/scan_loop.py): values match
the reference, and the bytes copied between host and device do not grow with the trip count.
On Numba's CUDA simulator, in a child process (the simulator must be on before numba loads)."""
import os
import subprocess
import sys

import pytest

_CHILD = """
import numpy as np, graphc as gc
from graphc.backends.numba_cuda import scan_loop

loops = []
original_init = scan_loop.DeviceScanLoop.__init__
def recording_init(self, node, body):
    original_init(self, node, body)
    loops.append(self)
scan_loop.DeviceScanLoop.__init__ = recording_init

rng = np.random.default_rng(0)
w = (rng.normal(size=(3, 3)) * 0.5).astype(np.float32)

def swapping(c, xs, w):
    # the new carries are (the other carry, h): a swap, and a carry that is a body input
    def body(carry, x):
        h, g = carry
        h2 = (h @ w + x).tanh()
        return (g, h2), (h2, (x * 2).sum())
    return gc.scan(body, (c, c * 0.5), xs)

def passing_on(c, xs, w):
    # the new carry is the step's input itself; the per-step output is a scalar
    return gc.scan(lambda h, x: (x, (h * h).sum()), c, xs, reverse=True)

bytes_by_length = {}
for f in (swapping, passing_on):
    for T in (1, 3, 8):
        c = rng.normal(size=(2, 3)).astype(np.float32)
        xs = rng.normal(size=(T, 2, 3)).astype(np.float32)
        loops.clear()
        got = gc.tree.flatten(gc.jit(f, backend="numba-cuda")(c, xs, w))[0]
        want = gc.tree.flatten(gc.jit(f, backend="reference")(c, xs, w))[0]
        for g, r in zip(got, want):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
        assert len(loops) == 1, loops
        moved = dict(loops[0].body.transfers)
        stacked_out = sum(g.nbytes for g in got if g.shape[:1] == (T,) and g.ndim != c.ndim)
        bytes_by_length.setdefault(f.__name__, []).append((T, moved, xs.nbytes, stacked_out))

for name, runs in bytes_by_length.items():
    # what each call moves, less its stacked inputs and outputs, is the same at every length
    fixed = {(m["to_device"] - xs_bytes, m["to_host"] - ys_bytes) for T, m, xs_bytes, ys_bytes in runs}
    assert len(fixed) == 1 and min(min(f) for f in fixed) > 0, (name, runs)
print("matches")
"""


def test_scan_steps_run_on_the_device_and_match_the_reference():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True,
                          timeout=300)
    if "is not usable" in done.stderr:
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0 and "matches" in done.stdout, done.stderr[-3000:]
