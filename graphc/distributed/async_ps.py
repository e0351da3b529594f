"""Asynchronous training with a parameter server over MPI: workers never wait for the slowest.

    mpiexec -n 3 python train.py        # rank 0 serves, ranks 1 and 2 compute gradients

`AsyncStep` reuses the two compiled graphs of `DataParallelStep`:

    worker r   gradients graph   batch, params (version v_r) -> ONE flat buffer -> push to rank 0
    rank 0     update graph      mean of the pushes it applies together -> params, state (donated)
    rank 0 -> r                  the next batch to compute and the parameters, version v + 1

The server hands out the batches of each epoch's shuffle one at a time, so a fast worker takes
more of them than a slow one (static shards would leave the slow worker's share for last).

Staleness. A gradient computed on version b and applied when the server is at version v is
v - b versions stale. The server applies the pushes waiting with it as one update (their mean)
as soon as doing so leaves no worker still computing more than `max_staleness` versions
behind; otherwise they wait, and so do the workers that sent them. When every worker is
waiting, the update goes ahead (nobody falls behind by it). So with max_staleness = 0 every
round of pushes becomes one update with the mean gradient: synchronous data parallelism,
update for update; with max_staleness = s a fast worker runs up to s updates ahead of a slow
one.

Epochs end with every push applied: then all ranks hold the server's parameters, compare their
digests (divergence check), evaluate together, and rank 0 writes the checkpoint. Rank 0 also
checks, every `check_every` pushes of each worker, that the parameters the worker computed on
are the very bytes it was sent.

Failures: every transfer waits with the world's deadline ($GRAPHC_DDP_TIMEOUT): a worker that
sends nothing for that long, or a server that does not answer, ends the job with a message
naming the rank; a rank that raises or is killed ends it at once (see data_parallel).
"""
from __future__ import annotations

import json
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from graphc.ir.errors import LoadError

from ..bounded_io import open_regular, parse_json, read_at_most
from ..compile import compile as compile_model
from ..data import DataLoader, Subset
from ..nn.module import Module
from ..optim import Optimizer
from ..tensor import Tensor
from ..train import History, atomic_write, save_checkpoint, split_batch
from .data_parallel import (DataParallelStep, DistributedError, DistributedLoader, FlatLayout, World,
                            init, resume, tensor_digest)

# Message tags. A push is a small header followed by the flat buffer; a reply is a header
# followed (unless it says stop) by the flat parameters.
PUSH_HEADER, PUSH, DIGESTS, REPLY_HEADER, REPLY_PARAMS = 31, 32, 33, 34, 35
# Integer buffers (batch norm's count of batches) travel apart, as int64: a reply carries the
# server's, a push the change its step made to them.
PUSH_COUNTS, REPLY_COUNTS = 36, 37
# What a reply tells a worker to do next.
COMPUTE, EPOCH_END, STOP = 0, 1, 2
# Seconds between polls of a wait that may last (a worker held by the staleness bound, the
# server between pushes): spinning there would take the core a computing rank needs.
IDLE_POLL_S = 0.0005
EPOCH_LOG_KEYS = ("loss", "samples_per_s", "updates", "staleness_mean", "staleness_max")


@dataclass
class AsyncStats:
    """Rank 0's account of the training so far: per worker, the pushes it made, the samples
    they covered, how stale each was when applied (versions), and how long its pushes waited
    for the staleness bound."""

    updates: int = 0
    seconds: float = 0.0
    pushes: Counter = field(default_factory=Counter)
    samples: Counter = field(default_factory=Counter)
    staleness: dict[int, Counter] = field(default_factory=dict)
    held_s: Counter = field(default_factory=Counter)
    applied: list[int] = field(default_factory=list)  # staleness of each push, in order

    def record(self, worker: int, staleness: int, samples: int) -> None:
        self.applied.append(staleness)
        self.pushes[worker] += 1
        self.samples[worker] += samples
        self.staleness.setdefault(worker, Counter())[staleness] += 1

    def staleness_mean(self, worker: int | None = None) -> float:
        counts = self._histogram(worker)
        total = sum(counts.values())
        return sum(s * n for s, n in counts.items()) / total if total else 0.0

    def staleness_max(self, worker: int | None = None) -> int:
        return max(self._histogram(worker), default=0)

    def _histogram(self, worker: int | None) -> Counter:
        if worker is not None:
            return self.staleness.get(worker, Counter())
        return sum(self.staleness.values(), Counter())

    @property
    def samples_per_s(self) -> float:
        return sum(self.samples.values()) / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        """Per worker and overall figures, JSON-ready."""
        return {"updates": self.updates, "seconds": self.seconds,
                "samples_per_s": self.samples_per_s,
                "staleness_mean": self.staleness_mean(), "staleness_max": self.staleness_max(),
                "workers": {str(w): {"pushes": self.pushes[w], "samples": self.samples[w],
                                     "staleness_mean": self.staleness_mean(w),
                                     "staleness_max": self.staleness_max(w),
                                     "staleness_histogram": dict(sorted(self.staleness[w].items())),
                                     "held_s": self.held_s[w]}
                            for w in sorted(self.staleness)}}


@dataclass
class WorkerTimes:
    """Seconds a worker spent in its gradients graph and exchanging with the server (pushing,
    waiting for its push to be applied, receiving parameters)."""

    gradients: float = 0.0
    exchange: float = 0.0
    steps: int = 0


class AsyncStep(DataParallelStep):
    """An asynchronous parameter-server training step; train it with `fit` (this module's, or
    graphc.distributed.fit, which forwards here).

    Rank 0 holds the parameters and optimizer state and applies updates; ranks 1.. compute
    gradients. `max_staleness` bounds how many versions behind the server a gradient may be
    when applied (0: synchronous). After `fit`, every rank holds the server's final training
    state. `stats` (rank 0) reports staleness and throughput per worker; `worker_times`
    (workers) where a worker's time went.
    """

    step_name = "async_step"

    def __init__(self, model: Module, loss_fn: Callable[..., Tensor], optimizer: Optimizer,
                 example_inputs: Sequence[Any], max_staleness: int = 0, backend: str | None = None,
                 clip_grad_norm: float | None = None, l1: float = 0.0, targets: int = 1,
                 world: World | None = None, check_every: int = 100) -> None:
        world = world or init()
        if world.size < 2:
            raise DistributedError("AsyncStep needs a server and at least one worker: launch "
                                   "with `mpiexec -n 2` or more (rank 0 serves, the others "
                                   "compute), or use DataParallelStep in one process")
        if max_staleness < 0:
            raise ValueError(f"max_staleness={max_staleness}: give 0 (synchronous) or more")
        self.max_staleness = max_staleness
        self.stats = AsyncStats()
        self.version = 0
        super().__init__(model, loss_fn, optimizer, example_inputs, backend, clip_grad_norm, l1,
                         targets, world, check_every)
        self.worker_times = WorkerTimes()
        self._reply = np.zeros(4, np.int64)  # kind, epoch, batch index, version
        self._pushes = 0
        self._count_changes: dict[int, np.ndarray] = {}  # server: each worker's last push's

    @property
    def workers(self) -> range:
        return range(1, self.world.size)

    def _set_layout(self, grads: dict[str, Tensor], new_buffers: dict[str, Tensor]) -> FlatLayout:
        """The server and the workers exchange buffers of one layout for the life of the step."""
        first = self.layout
        layout = super()._set_layout(grads, new_buffers)
        if first is not None and layout != first:
            raise DistributedError(f"{self.name}: the gradients of this batch average other buffers "
                                   "than the first batch's (a module switched between train() and "
                                   "eval()): an AsyncStep keeps one layout; build a new step")
        return layout

    def _gradient_divisor(self) -> int:
        return 1  # the server averages the pushes it applies together before the update graph

    # -- the replicated tensors: what the server ships and a worker computes on -------------
    def _shipped(self) -> dict[str, np.ndarray]:
        shipped = {f"model/{n}": self.params[n] for n in self.trainable}
        shipped.update({f"model/{n}": self.buffers[n] for n in self.layout.keys("buffer")})
        return shipped

    def _pack(self) -> np.ndarray:
        return np.concatenate([a.reshape(-1) for a in self._shipped().values()]).astype(
            self.layout.dtype, copy=False)

    def _unpack(self, flat: np.ndarray) -> None:
        offset = 0
        for array in self._shipped().values():
            np.copyto(array, flat[offset:offset + array.size].reshape(array.shape))
            offset += array.size

    def _counts(self) -> dict[str, np.ndarray]:
        """The integer buffers (batch norm's num_batches_tracked): a worker's step advances its
        copy, the server adds the mean change of the pushes it applies (+1 an update for a
        count of batches, as one synchronous step), and ships them with the parameters."""
        return {n: b for n, b in self.buffers.items()
                if b is not None and b.dtype.kind in "iu" and n not in self.layout.keys("buffer")}

    def _packed_counts(self) -> np.ndarray:
        counts = list(self._counts().values())
        return (np.concatenate([a.reshape(-1) for a in counts]).astype(np.int64) if counts
                else np.zeros(0, np.int64))

    def _add_to_counts(self, change: np.ndarray) -> None:
        offset = 0
        for array in self._counts().values():
            array += change[offset:offset + array.size].reshape(array.shape).astype(array.dtype)
            offset += array.size

    def _shipped_size(self) -> int:
        return sum(a.size for a in self._shipped().values())

    def _digests(self) -> np.ndarray:
        return np.stack([tensor_digest(a) for a in self._shipped().values()])

    # -- a worker's step ---------------------------------------------------------------------
    def compute_gradients(self, *batch: Any) -> np.ndarray:
        """Run the gradients graph on this worker's batch: the flat buffer of gradients,
        averaged buffers and the loss (last)."""
        gradients, args = self._arguments(batch)
        return np.require(gradients.executable(*args)[0], requirements=["C", "W"])

    def __call__(self, *batch: Any) -> float:
        """On a worker: compute the gradients of `batch`, push them to the server and wait for
        fresh parameters and the next assignment. Returns this batch's loss."""
        if self.world.is_root:
            raise DistributedError(f"{self.name}: rank 0 is the parameter server and computes "
                                   "no gradients; train with distributed.fit, which serves there")
        start = time.perf_counter()
        counts = self._packed_counts()
        reduced = self.compute_gradients(*batch)
        computed = time.perf_counter()
        self._push(reduced, self._packed_counts() - counts)
        self._receive()
        self.worker_times.gradients += computed - start
        self.worker_times.exchange += time.perf_counter() - computed
        self.worker_times.steps += 1
        return float(reduced[-1])

    def _push(self, reduced: np.ndarray, count_change: np.ndarray) -> None:
        self._pushes += 1
        comm, requests = self.world.comm, []
        header = np.array([self._pushes], np.int64)
        requests.append(comm.Isend(header, dest=0, tag=PUSH_HEADER))
        if self.check_every and self._pushes % self.check_every == 0:
            digests = self._digests()  # of the parameters this gradient was computed on
            requests.append(comm.Isend(digests, dest=0, tag=DIGESTS))
        requests.append(comm.Isend(reduced, dest=0, tag=PUSH))
        if count_change.size:
            requests.append(comm.Isend(count_change, dest=0, tag=PUSH_COUNTS))
        self.world._wait(requests, "sending gradients to the server", peer=0)

    def _receive(self) -> None:
        """The server's next reply: what to do, and (unless stopping) the parameters. The
        reply may be held for the staleness bound, so this wait sleeps between polls."""
        comm = self.world.comm
        self.world._wait([comm.Irecv(self._reply, source=0, tag=REPLY_HEADER)],
                         "waiting for the server's reply", peer=0, pause=IDLE_POLL_S)
        if self._reply[0] != STOP:
            flat = np.empty(self._shipped_size(), self.layout.dtype)
            counts = self._packed_counts()
            requests = [comm.Irecv(flat, source=0, tag=REPLY_PARAMS)]
            if counts.size:
                requests.append(comm.Irecv(counts, source=0, tag=REPLY_COUNTS))
            self.world._wait(requests, "receiving parameters from the server", peer=0)
            self._unpack(flat)
            self._add_to_counts(counts - self._packed_counts())  # the server's counts
            self.version = int(self._reply[3])

    # -- the server --------------------------------------------------------------------------
    def _reply_to(self, worker: int, kind: int, epoch: int = 0, index: int = 0) -> None:
        comm = self.world.comm
        header = np.array([kind, epoch, index, self.version], np.int64)
        requests = [comm.Isend(header, dest=worker, tag=REPLY_HEADER)]
        if kind != STOP:
            params = self._pack()
            requests.append(comm.Isend(params, dest=worker, tag=REPLY_PARAMS))
            counts = self._packed_counts()
            if counts.size:
                requests.append(comm.Isend(counts, dest=worker, tag=REPLY_COUNTS))
        self.world._wait(requests, f"sending parameters to worker rank {worker}", peer=worker)

    def _serve_epoch(self, epoch: int, batches: int, batch_size: int, samples: int) -> list[float]:
        """Hand out the epoch's batches and apply the pushes until all are applied; returns
        the loss of every push."""
        comm = self.world.comm
        queue = deque(range(batches))
        base: dict[int, int] = {}          # the version each worker computes on
        rows: dict[int, int] = {}          # the rows of the batch each worker computes
        computing: dict[int, Any] = {}     # worker -> its pending push-header receive
        sent_at: dict[int, float] = {}
        expected_digests: dict[int, np.ndarray] = {}
        headers = {w: np.zeros(1, np.int64) for w in self.workers}
        inbox = {w: np.empty(self.layout.size, self.layout.dtype) for w in self.workers}
        pending: dict[int, float] = {}     # worker -> when its push arrived
        losses: list[float] = []

        def assign(worker: int) -> None:
            if not queue:
                return  # idle until the epoch's last update; EPOCH_END tells it then
            base[worker] = self.version
            rows[worker] = min(batch_size, samples - queue[0] * batch_size)  # the last may be short
            if self.check_every and (self.stats.pushes[worker] + 1) % self.check_every == 0:
                expected_digests[worker] = self._digests()
            self._reply_to(worker, COMPUTE, epoch, queue.popleft())
            computing[worker] = comm.Irecv(headers[worker], source=worker, tag=PUSH_HEADER)
            sent_at[worker] = time.monotonic()

        for worker in self.workers:
            assign(worker)
        while computing or pending:
            arrived = self._next_push(computing, sent_at)
            if arrived is not None:
                del computing[arrived]
                self._collect(arrived, inbox[arrived], expected_digests.pop(arrived, None))
                pending[arrived] = time.monotonic()
            if pending and (not computing or all(
                    self.version + 1 - base[w] <= self.max_staleness for w in computing)):
                losses += self._apply({w: inbox[w] for w in sorted(pending)}, base, rows)
                applied_at = time.monotonic()
                for worker in sorted(pending):
                    self.stats.held_s[worker] += applied_at - pending[worker]
                pending, waiting = {}, sorted(pending)
                for worker in waiting:
                    assign(worker)
        for worker in self.workers:
            self._reply_to(worker, EPOCH_END, epoch)
        return losses

    def _next_push(self, computing: dict[int, Any], sent_at: dict[int, float]) -> int | None:
        """The worker whose push header has arrived (None if none yet, after a short sleep);
        aborts naming a worker silent past the deadline."""
        for worker, request in computing.items():
            if request.Test():
                return worker
        now = time.monotonic()
        for worker in computing:
            if now - sent_at[worker] > self.world.timeout:
                self.world.abort(f"worker rank {worker} pushed no gradients within "
                                 f"{self.world.timeout:g} s of being sent its batch "
                                 "(GRAPHC_DDP_TIMEOUT); it has exited or is stuck")
        time.sleep(IDLE_POLL_S)
        return None

    def _collect(self, worker: int, buffer: np.ndarray, expected: np.ndarray | None) -> None:
        """Receive the flat buffer (and, on a check push, the digests) that follow a header."""
        comm, requests = self.world.comm, []
        digests = None
        if expected is not None:
            digests = np.empty_like(expected)
            requests.append(comm.Irecv(digests, source=worker, tag=DIGESTS))
        requests.append(comm.Irecv(buffer, source=worker, tag=PUSH))
        change = self._count_changes.setdefault(worker, np.zeros_like(self._packed_counts()))
        if change.size:
            requests.append(comm.Irecv(change, source=worker, tag=PUSH_COUNTS))
        self.world._wait(requests, f"receiving gradients from worker rank {worker}", peer=worker)
        if digests is None:
            return
        for name, ours, theirs in zip(self._shipped(), expected, digests):
            if not np.array_equal(ours, theirs):
                raise DistributedError(
                    f"replicas diverged: worker rank {worker} computed push "
                    f"{self.stats.pushes[worker] + 1} on a '{name}' that differs from the "
                    "server's (first differing tensor); something changed that worker's copy "
                    "outside the training step")

    def _apply(self, pushes: dict[int, np.ndarray], base: dict[int, int],
               rows: dict[int, int]) -> list[float]:
        """One update with the mean of `pushes` (summed in rank order: the order of an
        allreduce, so max_staleness=0 reproduces data parallelism)."""
        workers = list(pushes)
        mean = pushes[workers[0]].copy()
        for worker in workers[1:]:
            mean += pushes[worker]
        if len(workers) > 1:
            mean *= mean.dtype.type(1.0 / len(workers))
        self._update.executable(mean, *self._update.persistent, *self.optimizer.learning_rates())
        changes = [self._count_changes[w] for w in workers if w in self._count_changes]
        if changes and changes[0].size:
            self._add_to_counts(np.rint(np.mean(changes, axis=0)).astype(np.int64))
        for worker in workers:
            self.stats.record(worker, self.version - base[worker], rows[worker])
        self.version += 1
        self.stats.updates += 1
        return [float(pushes[w][-1]) for w in workers]

    # -- training ----------------------------------------------------------------------------
    def fit(self, train_loader: DistributedLoader, epochs: int = 1,
            val_loader: DistributedLoader | None = None, checkpoint_path: str | None = None,
            resume_from_checkpoint: bool = False,
            on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> History:
        """Train for `epochs` over `train_loader`'s dataset, batch size, drop_last, seed and
        transforms (its per-rank sharding is not used: the server deals batches out). After each epoch all
        ranks evaluate `val_loader` together, rank 0 calls `on_epoch_end` and writes the
        checkpoint; resuming continues after the checkpoint's last epoch. Returns the same
        History on every rank; afterwards every rank holds the server's training state."""
        batch_size, samples = train_loader.batch_size, len(train_loader.dataset)
        # a short last batch too unless the loader drops it, as DataParallelStep trains
        batches = samples // batch_size if train_loader.drop_last else -(-samples // batch_size)
        if batches == 0:
            raise DistributedError(f"{self.name}: {len(train_loader.dataset)} samples make no "
                                   f"batch of {batch_size}")
        first_epoch = 1
        if resume_from_checkpoint and checkpoint_path is not None and resume(self, checkpoint_path):
            first_epoch = self._resumed_epoch(checkpoint_path) + 1
        history, evaluator = History(), _Evaluator(self, val_loader)
        for epoch in range(first_epoch, epochs + 1):
            start = time.perf_counter()
            if self.world.is_root:
                updates, pushes = self.stats.updates, len(self.stats.applied)
                seen = sum(self.stats.samples.values())
                losses = self._serve_epoch(epoch, batches, batch_size, samples)
                seconds = time.perf_counter() - start
                self.stats.seconds += seconds
                staleness = self.stats.applied[pushes:]
                logs = {"loss": float(np.mean(losses)),
                        "samples_per_s": (sum(self.stats.samples.values()) - seen) / seconds,
                        "updates": float(self.stats.updates - updates),
                        "staleness_mean": float(np.mean(staleness)),
                        "staleness_max": float(max(staleness))}
            else:
                self._work_epoch(train_loader, epoch)
                logs = {}  # rank 0's come with _share
            # Every rank now holds the server's parameters: the replicas must agree.
            self.world.check_replicas(self._shipped(), f"at the end of epoch {epoch}")
            logs = {"epoch": epoch, **self._share(logs), **evaluator.logs()}
            history.epochs.append(logs)
            if self.world.is_root:
                if on_epoch_end is not None:
                    on_epoch_end(epoch, logs)
                if checkpoint_path is not None:
                    self._save(checkpoint_path, epoch)
        if self.world.is_root:
            for worker in self.workers:
                self._reply_to(worker, STOP)
        else:
            self._receive()
            if self._reply[0] != STOP:
                raise DistributedError(f"{self.name}: worker rank {self.world.rank} expected the "
                                       f"end of training, the server sent {self._reply.tolist()}")
        self.broadcast_state()
        return history

    def _work_epoch(self, loader: DistributedLoader, epoch: int) -> None:
        """Compute the batches the server assigns until it ends the epoch."""
        self._receive()
        order = _epoch_order(loader, epoch)
        while self._reply[0] == COMPUTE:
            index = int(self._reply[2])
            rows = order[index * loader.batch_size:(index + 1) * loader.batch_size]
            self(*_batch(loader, rows))
        if self._reply[0] != EPOCH_END:
            raise DistributedError(f"{self.name}: worker rank {self.world.rank} expected the end "
                                   f"of epoch {epoch}, the server sent {self._reply.tolist()}")

    def _share(self, logs: dict[str, float]) -> dict[str, float]:
        """Rank 0's epoch logs on every rank."""
        if self.world.is_root:
            values = np.array([logs[k] for k in EPOCH_LOG_KEYS], np.float64)
        else:
            values = np.empty(len(EPOCH_LOG_KEYS), np.float64)
        self.world._wait([self.world.comm.Ibcast(values, root=0)], "broadcast of the epoch logs")
        return dict(zip(EPOCH_LOG_KEYS, values.tolist()))

    def _save(self, path: str, epoch: int) -> None:
        save_checkpoint(path, self)
        atomic_write(_epoch_file(path), lambda f: f.write(
            json.dumps({"epoch": epoch, "version": self.version}).encode()))

    def _resumed_epoch(self, path: str) -> int:
        """The last completed epoch of the checkpoint rank 0 resumed from, on every rank. A
        missing or damaged epoch file is a LoadError on every rank (-1 tells the others)."""
        value = np.array([-1, 0], np.int64)
        failure: LoadError | None = None
        if self.world.is_root:
            try:
                value[:] = _read_epoch_file(_epoch_file(path))
            except LoadError as error:
                failure = error
        self.world._wait([self.world.comm.Ibcast(value, root=0)], "broadcast of the resumed epoch")
        if failure is not None:
            raise failure
        if value[0] < 0:
            raise LoadError(_epoch_file(path), "could not be read on rank 0 (its error names why)")
        self.version = int(value[1])
        return int(value[0])


def _read_epoch_file(path: str) -> tuple[int, int]:
    """(epoch, version) of an epoch file AsyncStep wrote, or a LoadError naming what is wrong."""
    with open_regular(path) as f:  # a missing or odd file: a LoadError naming it
        saved = parse_json(read_at_most(f, 4096, path), path, "epoch")
    if not isinstance(saved, dict) or not all(
            type(v) is int and 0 <= v < 2**62 for v in (saved.get("epoch"), saved.get("version"))):
        raise LoadError(path, f"must hold {{\"epoch\": n, \"version\": n}} with non-negative "
                        f"integers, got {str(saved)[:80]}")
    return saved["epoch"], saved["version"]


def fit(step: AsyncStep, train_loader: DistributedLoader, epochs: int = 1,
        val_loader: DistributedLoader | None = None, checkpoint_path: str | None = None,
        resume_from_checkpoint: bool = False,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None) -> History:
    """`step.fit(...)`: asynchronous training (see AsyncStep.fit)."""
    return step.fit(train_loader, epochs, val_loader, checkpoint_path, resume_from_checkpoint,
                    on_epoch_end)


class _Evaluator:
    """Validation of each epoch, all ranks together, with the model compiled once."""

    def __init__(self, step: AsyncStep, loader: DistributedLoader | None) -> None:
        self.step, self.loader, self.model = step, loader, None

    def logs(self) -> dict[str, float]:
        if self.loader is None:
            return {}
        if self.model is None:
            inputs, _ = split_batch(next(iter(self.loader)), self.step.targets)
            self.model = compile_model(self.step.model, tuple(inputs), backend=self.step.backend)
        result = self.step.world.evaluate(self.model, self.step.loss_fn, self.loader, self.step.targets)
        return {f"val_{k}": float(v) for k, v in result.items()}


def _epoch_order(loader: DistributedLoader, epoch: int) -> np.ndarray:
    """The epoch's sample order: DataLoader's formula, as every mode of graphc uses."""
    n = len(loader.dataset)
    if not loader.sampler.shuffle:
        return np.arange(n)
    return np.random.default_rng([loader.sampler.seed, epoch]).permutation(n)


def _batch(loader: DistributedLoader, rows: np.ndarray) -> Any:
    batch_loader = DataLoader(Subset(loader.dataset, rows), len(rows), shuffle=False,
                              transform=loader.transform, target_transform=loader.target_transform)
    return next(iter(batch_loader))


def _epoch_file(checkpoint_path: str) -> str:
    return f"{checkpoint_path}.epoch.json"


__all__ = ["AsyncStats", "AsyncStep", "WorkerTimes", "fit"]
