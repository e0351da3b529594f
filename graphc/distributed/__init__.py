"""Distributed training over MPI.

- `data_parallel`: every rank runs the whole step on its shard; one allreduce per step.
"""
from .data_parallel import (DEFAULT_TIMEOUT, DataParallelStep, DistributedError, DistributedLoader,
                            DistributedSampler, FlatLayout, StepTimes, TIMEOUT_ENV, World, evaluate, fit,
                            init, resume)

__all__ = ["DEFAULT_TIMEOUT", "DataParallelStep", "DistributedError", "DistributedLoader",
           "DistributedSampler", "FlatLayout", "StepTimes", "TIMEOUT_ENV", "World", "evaluate", "fit", "init",
           "resume"]
