"""Divergence detection: replicas that drift apart end the job with a message naming the tensor
and the ranks, within `check_every` steps (tests/mpi_scripts/divergence.py under mpiexec -n 2).
The asynchronous server's check is in test_async_ps.py."""
from __future__ import annotations

import os

import numpy as np
import pytest

import graphc.nn.functional as F
from graphc import optim
from graphc.distributed import DataParallelStep, World, tensor_digest
from test_distributed import SCRIPTS, launch, load_script, needs_mpi

SCRIPT = os.path.join(SCRIPTS, "divergence.py")


def test_the_digest_tells_bytes_shapes_and_dtypes_apart():
    a = np.arange(6, dtype=np.float32)
    assert np.array_equal(tensor_digest(a), tensor_digest(a.copy()))
    assert not np.array_equal(tensor_digest(a), tensor_digest(a.reshape(2, 3)))
    assert not np.array_equal(tensor_digest(a), tensor_digest(a.view(np.int32)))
    b = a.copy()
    b[5] = np.nextafter(b[5], np.float32(10))
    assert not np.array_equal(tensor_digest(a), tensor_digest(b))
    assert tensor_digest(np.float32(1.0)).shape == (16,)


def test_check_every_must_be_a_count():
    model = load_script("ddp_steps").plain_model()
    x, y = np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="check_every=-1"):
        DataParallelStep(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1), (x, y),
                         backend="reference", world=World(), check_every=-1)


@needs_mpi
def test_a_perturbed_replica_fails_the_job_within_check_every_steps():
    """Rank 1's copy changes after step 5; the check after step 8 catches it."""
    status, output = launch([SCRIPT, "10", "4", "5"], timeout=60)
    assert status != 0
    assert ("replicas diverged after step 8: 'model/3.bias' differs on ranks [1] from rank 0"
            in output)
    assert "step 7 done" in output and "step 8 done" not in output
    assert "aborting all ranks" in output


@needs_mpi
def test_identical_replicas_pass_every_check():
    status, output = launch([SCRIPT, "4", "1"], timeout=60)
    assert status == 0, output
    assert "trained" in output
