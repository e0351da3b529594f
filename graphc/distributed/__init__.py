"""Distributed training over MPI.

- `data_parallel`: every rank runs the whole step on its shard; one allreduce per step.
- `async_ps`: a parameter server (rank 0) applies the gradients workers push, with bounded
  staleness.
- `pipeline`: the step cut into stages, one per rank, over micro-batches (1F1B or GPipe);
  stages x replicas combines it with data parallelism.
"""
from .async_ps import AsyncStats, AsyncStep, WorkerTimes
from .data_parallel import (DEFAULT_TIMEOUT, DataParallelStep, DistributedError, DistributedLoader,
                            DistributedSampler, FlatLayout, StepTimes, TIMEOUT_ENV, World, evaluate, fit,
                            init, resume, tensor_digest)

__all__ = ["AsyncStats", "AsyncStep", "DEFAULT_TIMEOUT", "DataParallelStep", "DistributedError",
           "DistributedLoader", "DistributedSampler", "FlatLayout", "StepTimes", "TIMEOUT_ENV",
           "World", "WorkerTimes", "evaluate", "fit", "init", "resume", "tensor_digest"]
from .pipeline import PipelineParallelStep, StageTimes, stage_boundary  # noqa: E402
__all__ += ["PipelineParallelStep", "StageTimes", "stage_boundary"]
