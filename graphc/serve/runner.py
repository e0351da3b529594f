"""What the server runs: a model behind a small interface, so any engine can serve behind the
same HTTP stack (graphc's compiled functions here; see the package docstring)."""
from __future__ import annotations

import bisect
import os
import time
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from graphc.ir.errors import GraphcError, LoadError


@dataclass(frozen=True)
class TensorSpec:
    """One sample's tensor: its shape without the batch axis, and its dtype."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype.name}


@runtime_checkable
class Runner(Protocol):
    """A model the server batches requests for. `run` takes (n, *input.shape) of input.dtype,
    C-contiguous, 1 <= n <= max_batch, and returns (n, *output.shape); the server calls it from
    one worker thread per model, never concurrently with itself. A runner may set
    `batches_requests = False` (as GraphcRunner does for a model whose rows read the rows
    before them): each request then runs in a call of its own."""

    name: str
    version: int
    input: TensorSpec
    output: TensorSpec
    max_batch: int

    def run(self, batch: np.ndarray) -> np.ndarray: ...


# What one compiled call costs beyond its samples, in samples: the MNIST CNN takes ~1.0 ms per
# call plus ~0.25 ms per sample on 2 cores (batch 32: 10.3 ms; 33, padded to 64: 15.4 ms).
_CALL_COST_IN_SAMPLES = 4


def bucket_chunks(n: int, buckets: list[int]) -> list[int]:
    """The cheapest way to run n samples on the batch buckets: a list of chunk sizes, each run
    on its smallest bucket. A batch just over a bucket splits (33 on buckets 1, 2, ..., 64 runs
    as 32 and 1, not padded to 64); one just under stays whole (63 runs padded to 64)."""
    costs, plans = [0], [[]]  # for 0..n samples: the cheapest cost and its chunks
    for m in range(1, n + 1):
        padded = buckets[bisect.bisect_left(buckets, m)]
        best_cost, best_plan = padded + _CALL_COST_IN_SAMPLES, [m]
        fits = bisect.bisect_right(buckets, m) - 1  # the largest bucket <= m
        if fits >= 0 and buckets[fits] < m:
            first = buckets[fits]
            split = first + _CALL_COST_IN_SAMPLES + costs[m - first]
            if split < best_cost:
                best_cost, best_plan = split, [first, *plans[m - first]]
        costs.append(best_cost)
        plans.append(best_plan)
    return plans[n]


class GraphcRunner:
    """A graphc inference export (graphc.export.load) as a runner. A batch-polymorphic export
    (exported with max_batch) runs each batch on its batch buckets, compiled here up to the
    runner's max_batch ahead of the first request (see bucket_chunks); a fixed-batch export pads
    every batch to its one size."""

    def __init__(self, function: Any, name: str, max_batch: int | None = None) -> None:
        from graphc.export import LoadedFunction

        if not isinstance(function, LoadedFunction):
            raise LoadError(function.path, "is a training step; serve an inference export "
                            "(gc.compile(model, example_inputs=x).export(path, max_batch=N))")
        data = [i for i in function.graph.inputs if i.role == "data"]
        outputs = function.graph.outputs
        if len(data) != 1 or len(outputs) != 1:
            raise LoadError(function.path, f"has {len(data)} inputs and {len(outputs)} outputs; "
                            "the server runs functions of one input and one output")
        in_type, out_type = data[0].value.type, outputs[0][1].type
        if in_type.ndim == 0 or out_type.ndim == 0:
            raise LoadError(function.path, f"maps {in_type} to {out_type}; the server needs the "
                            "batch as the first axis of both")
        if not function.max_batch and function.metadata.get("rows_apart") is False:
            raise LoadError(function.path, f"serves batches of exactly {in_type.shape[0]}: its "
                            "samples depend on each other along axis 0, or a row of zeros is no "
                            "valid input (the export found it), so a smaller batch cannot be "
                            "padded to that size")
        self._function = function
        self._fixed_batch = None if function.max_batch else in_type.shape[0]
        # whether two requests may share a call: not where a sample reads the rows before it
        # (a time-major RNN), though padding after a request's rows keeps them
        self.batches_requests = function.metadata.get("rows_apart") is not False
        largest = function.max_batch or in_type.shape[0]
        if max_batch is not None and max_batch < 1:
            raise GraphcError(f"max_batch must be at least 1, not {max_batch}")
        self.name = name
        self.version = 1
        self.max_batch = min(largest, max_batch) if max_batch is not None else largest
        self.input = TensorSpec(tuple(in_type.shape[1:]), in_type.np_dtype)
        self.output = TensorSpec(tuple(out_type.shape[1:]), out_type.np_dtype)
        self.path = function.path
        self.load_seconds = 0.0  # from_file measures reading, verifying and compiling the file
        function.warm_up(self.max_batch)

    @classmethod
    def from_file(cls, path: str, name: str | None = None, max_batch: int | None = None,
                  backend: str | None = None) -> GraphcRunner:
        """Load, verify and compile `path` (a LoadError says what is wrong with the file)."""
        from graphc.export import load

        started = time.perf_counter()
        runner = cls(load(path, backend=backend), name or _default_name(path), max_batch)
        runner.load_seconds = time.perf_counter() - started
        return runner

    def run(self, batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if self._fixed_batch is None:
            # rows that read the rows before them run as one call, padded to the bucket
            chunks = bucket_chunks(n, self._function.buckets) if self.batches_requests else [n]
            if len(chunks) == 1:
                return self._output(batch)
            outputs = np.empty((n, *self.output.shape), self.output.dtype)
            start = 0
            for size in chunks:  # each call's outputs copied out before the next call
                outputs[start:start + size] = self._output(batch[start:start + size])
                start += size
            return outputs
        padded = np.zeros((self._fixed_batch, *batch.shape[1:]), batch.dtype)
        padded[:n] = batch
        return np.array(self._output(padded)[:n])

    def _output(self, batch: np.ndarray) -> np.ndarray:
        """The function's one output (however the model nested it: `(y,)` or {"logits": y})."""
        return self._function.flat_outputs(batch)[0]


def _default_name(path: str) -> str:
    """The file's name without directory and extension: `models/mnist.gcx` serves as `mnist`."""
    return os.path.splitext(os.path.basename(path))[0]
