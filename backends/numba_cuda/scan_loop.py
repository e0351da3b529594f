"""A scan's steps on the device: the body's kernels launched once per step over device buffers,
with no host round trip between steps.

The stacked inputs are uploaded once and the stacked outputs downloaded once; the loop-invariant
inputs and the initial carry are uploaded once. Each step copies its slice of every stacked
input into the body's input buffer, launches the body's kernels, then copies (device to device)
the step's outputs into row t of the stacked results and the new carry into the carry inputs.
The host only counts the steps and enqueues work: the bytes copied each way do not depend on
the trip count (the executable's `transfers` show it).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from graphc.ir import Node
from graphc.ir.ops.control import split_inputs


class DeviceScanLoop:
    """`node` run over its compiled numba-cuda `body` (an Executable of this backend)."""

    def __init__(self, node: Node, body: Any) -> None:
        self.node = node
        self.body = body
        length, reverse = node.attrs["length"], node.attrs["reverse"]
        self.steps = range(length)[::-1] if reverse else range(length)
        self.num_carry = node.attrs["num_carry"]
        graph, plan = body.graph, body.plan
        outputs = graph.output_values
        self._outputs = [body._env[v] for v in outputs]
        # A new carry that is one of the body's inputs (the carry passed on, or another carry:
        # a swap) would be overwritten by the copies into the carry buffers before being read:
        # those go through a buffer of their own first.
        inputs = set(graph.input_values)
        self._staged = [plan.root(v) in inputs for v in outputs[:self.num_carry]]

    def __call__(self, args: list[np.ndarray]) -> list[np.ndarray]:
        body, k = self.body, self.num_carry
        cuda = body._cuda
        consts, carry, xs = split_inputs(self.node, [np.ascontiguousarray(a) for a in args])
        with body._lock:
            buffers = body._inputs
            carry_buffers = buffers[len(consts):len(consts) + k]
            x_buffers = buffers[len(consts) + k:]
            for array, buffer in zip(consts + carry, buffers):
                body._to_device(array, buffer)
            stacked_xs = [self._upload(x) for x in xs]
            stacked_ys = [cuda.device_array(v.type.shape, v.type.np_dtype) for v in self.node.outputs[k:]]
            staging = [cuda.device_array_like(b) if staged else None
                       for b, staged in zip(carry_buffers, self._staged)]
            for t in self.steps:
                for buffer, x in zip(x_buffers, stacked_xs):
                    _row(buffer).copy_to_device(x[t:t + 1])
                for function, grid, block, arguments in body._launches:
                    function[grid, block](*arguments)
                for y, out in zip(stacked_ys, self._outputs[k:]):
                    y[t:t + 1].copy_to_device(_row(out))
                for buffer, out, stage in zip(carry_buffers, self._outputs[:k], staging):
                    if stage is not None:
                        stage.copy_to_device(out)
                for buffer, out, stage in zip(carry_buffers, self._outputs[:k], staging):
                    buffer.copy_to_device(out if stage is None else stage)
            return ([body._download(b) for b in carry_buffers]
                    + [body._download(y) for y in stacked_ys])

    def _upload(self, array: np.ndarray) -> Any:
        self.body.transfers["to_device"] += array.nbytes
        return self.body._cuda.to_device(array)


def _row(array: Any) -> Any:
    """`array` as one row of a stack: shape (1, *shape), the same memory."""
    return array.reshape((1,) + tuple(array.shape))


def device_scan_loop(node: Node, body: Any) -> DeviceScanLoop | None:
    """The device loop for `node`, or None where the body's steps need the host: index arrays
    checked before kernels read them, or donated inputs."""
    if body._input_checks or body._device_checks or body._donated:
        return None
    return DeviceScanLoop(node, body)


__all__ = ["DeviceScanLoop", "device_scan_loop"]
