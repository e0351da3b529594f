"""Data-parallel training over MPI: every rank runs the same compiled step on its own shard of
each batch, and one allreduce of one flat buffer keeps them in step.

    mpiexec -n 4 python train.py        # or plain `python train.py`: a world of one

A `DataParallelStep` splits the training step at the gradients into two compiled graphs:

    gradients graph   batch, params, buffers -> ONE flat buffer [grads..., averaged buffers..., loss]
    MPI Allreduce     sum of that buffer over the ranks, in place
    update graph      flat buffer / world size -> clip, optimizer update (params, state donated)

Packing the loss and the float buffers (batch-norm running statistics) into the same buffer
makes one collective per step do all the communication. Every rank starts from rank 0's
parameters, buffers, optimizer state, step count and RNG key (broadcast when the step is built),
so identical updates keep the ranks identical. Dropout draws a different mask on each rank.

Failures never hang the job: `init()` installs an exception hook that names the failing rank and
exits non-zero, which makes mpiexec end every rank; a killed rank brings down the job the same
way; and every collective waits with a deadline (`GRAPHC_DDP_TIMEOUT` seconds, default 300),
so a rank that exits early or is stuck makes the others abort instead of waiting forever.

Replicas that drift apart (a bug, a rank's memory corrupted, a user writing to one rank's
weights) are caught: every `check_every` steps (default 100) the ranks allgather a digest of each
tensor of their training state and a mismatch raises DistributedError naming the tensor and
the ranks, instead of training on with different models.

Without mpi4py, or with a single process, the world has size 1 and every collective is a no-op.
"""
from __future__ import annotations

import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np

from graphc.ir import Graph, TensorType
from graphc.ir.errors import GraphcError
from graphc.passes import SIMPLIFY, Stages

from ..api import staged, user_facing
from ..compile import CompiledGraph, TrainStep, numerics_checked
from ..data import Batch, DataLoader, Dataset, Subset, Transform
from ..functions import concatenate
from ..lowering import compile_graph
from ..nn.module import Module
from ..optim import Optimizer
from ..step_builder import StepBuilder, batch_arrays, trace_gradients, unread_gradient
from ..tensor import ModuleReads, Tensor
from .. import random as gc_random
from .. import train
from ..train import (EarlyStopping, History, counted_targets, learning_rates, load_checkpoint,
                     set_learning_rates, split_batch, training_state)

TIMEOUT_ENV = "GRAPHC_DDP_TIMEOUT"
DEFAULT_TIMEOUT = 300.0
ABORT_DRAIN_S = 0.5  # seconds the launcher gets to forward an aborting rank's last words


class DistributedError(GraphcError):
    """Ranks that disagree (on the model, the data) or cannot work together."""


# -- the world: rank, size and the collectives the training step needs ------------------------
@dataclass
class World:
    """This process's place among the ranks. `comm` is an mpi4py communicator, or None for a
    single process (then every collective is a no-op). `timeout` bounds every collective, in
    seconds: set it here or through $GRAPHC_DDP_TIMEOUT."""

    rank: int = 0
    size: int = 1
    comm: Any = None
    timeout: float = DEFAULT_TIMEOUT

    def __post_init__(self) -> None:
        if self.comm is None and self.size != 1:
            raise ValueError(f"World: {self.size} ranks need a communicator (comm); "
                             "use distributed.init()")

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def allreduce_(self, buffer: np.ndarray) -> np.ndarray:
        """Sum `buffer` over all ranks, in place; returns it."""
        if self.comm is not None:
            from mpi4py import MPI
            self._wait([self.comm.Iallreduce(MPI.IN_PLACE, buffer, op=MPI.SUM)], "allreduce")
        return buffer

    def broadcast_(self, arrays: dict[str, np.ndarray]) -> None:
        """Overwrite every rank's arrays, in place, with rank 0's. All ranks must hold the same
        names, shapes and dtypes: a mismatch raises DistributedError on every rank."""
        if self.comm is None:
            return
        names = sorted(arrays)
        self._check_agreement("the arrays to broadcast (names, shapes, dtypes)",
                              [(n, arrays[n].shape, arrays[n].dtype.str) for n in names])
        self._wait([self.comm.Ibcast(arrays[n], root=0) for n in names], "broadcast")

    def evaluate(self, model_fn: Callable[..., np.ndarray], loss_fn: Callable | None,
                 loader: DistributedLoader, targets: int = 1) -> dict[str, float]:
        """Validation for the fit loop: `evaluate` over every rank's shard."""
        return evaluate(model_fn, loss_fn, loader, targets)

    def shared_seed(self, seed: int | None) -> int:
        """`seed`, or when None one drawn by rank 0 and sent to all, so permutations agree."""
        if seed is not None:
            return int(seed)
        value = np.array([np.random.SeedSequence().entropy % 2**63], dtype=np.int64)
        self.broadcast_({"seed": value})
        return int(value[0])

    def abort(self, message: str) -> NoReturn:
        """Print which rank failed and why, then end every rank of the job (exit status 1); a
        world of one raises DistributedError instead."""
        print(f"graphc.distributed: rank {self.rank} of {self.size}: {message}; aborting all ranks",
              file=sys.stderr, flush=True)
        if self.comm is None:
            raise DistributedError(message)
        # MPI_Abort is the one request every launcher honours: merely exiting non-zero left a
        # peer blocked in MPI_Finalize alive about one time in eight (MPICH's hydra). The pause
        # first lets the launcher forward the message above, which Abort alone sometimes lost.
        sys.stdout.flush()
        time.sleep(ABORT_DRAIN_S)
        self.comm.Abort(1)
        os._exit(1)  # should this MPI's Abort return after all, this rank still ends

    def check_replicas(self, state: dict[str, np.ndarray], when: str) -> None:
        """Raise DistributedError unless every rank holds the same bytes in `state` (same names
        on every rank); `when` says where in training, for the message. One allgather of a
        16-byte digest per tensor: cheap against a step."""
        if self.comm is None:
            return
        names = sorted(state)
        digests = np.stack([tensor_digest(state[name]) for name in names])
        gathered = np.empty((self.size, *digests.shape), np.uint8)
        self._wait([self.comm.Iallgather(digests, gathered)], "allgather of the replica digests")
        for index, name in enumerate(names):
            differing = [r for r in range(1, self.size)
                         if not np.array_equal(gathered[r, index], gathered[0, index])]
            if differing:
                raise DistributedError(
                    f"replicas diverged {when}: '{name}' differs on ranks {differing} from rank 0 "
                    f"(first differing tensor in name order); every rank must apply the same "
                    "updates: something changed one rank's copy outside the training step")

    def _check_agreement(self, what: str, description: Any,
                         advice: str = "every rank must build the same model and optimizer") -> None:
        self.agreement(description)(what, advice)

    def agreement(self, description: Any) -> Callable[[str, str], None]:
        """Start checking that every rank holds the same `description` (an allgather of its
        digest, running beside what this rank does next); the function returned finishes the
        check, raising DistributedError on every rank, naming `what` and `advice`, where any
        rank's differs."""
        if self.comm is None:
            return lambda what, advice: None
        digest = np.frombuffer(hashlib.sha256(repr(description).encode()).digest(), np.uint8)
        digests = np.empty((self.size, digest.size), np.uint8)
        request = self.comm.Iallgather(digest, digests)

        def finish(what: str, advice: str) -> None:
            self._wait([request], f"the allgather checking {what}")
            differing = [r for r in range(self.size) if not np.array_equal(digests[r], digests[0])]
            if differing:
                raise DistributedError(f"ranks {differing} disagree with rank 0 on {what}; {advice}")
        return finish

    def _wait(self, requests: list, what: str, peer: int | None = None, pause: float = 0.0) -> None:
        """Complete nonblocking `requests` within the deadline: a peer that exited cleanly or is
        stuck would otherwise leave this rank blocked in the collective forever. Polling spins,
        as MPICH's blocking collectives do, so it costs no latency; a wait expected to be long
        sleeps `pause` seconds between polls instead, leaving the core to ranks that compute.
        `peer` names the one rank a point-to-point transfer waits for."""
        from mpi4py import MPI
        deadline = time.monotonic() + self.timeout
        while not MPI.Request.Testall(requests):
            if pause:
                time.sleep(pause)
            if time.monotonic() > deadline:
                culprit = "another rank" if peer is None else f"rank {peer}"
                self.abort(f"{what} did not complete within {self.timeout:g} s "
                           f"({TIMEOUT_ENV}); {culprit} has exited or is stuck")


def tensor_digest(array: np.ndarray) -> np.ndarray:
    """A 16-byte BLAKE2b digest of the array's bytes (dtype and shape included)."""
    array = np.ascontiguousarray(array)
    digest = hashlib.blake2b(f"{array.dtype.str}{array.shape}".encode(), digest_size=16)
    digest.update(array.tobytes())
    return np.frombuffer(digest.digest(), np.uint8)


_world: World | None = None


def init() -> World:
    """The world of this process, created on the first call: MPI's COMM_WORLD when launched by
    mpiexec with several ranks, else a single process. Call it first thing in a script: from
    then on an uncaught exception on any rank aborts the whole job instead of hanging it."""
    global _world
    if _world is None:
        _world = _connect()
        if _world.size > 1:
            _install_abort_hook(_world)
    return _world


def _timeout() -> float:
    """GRAPHC_DDP_TIMEOUT in seconds: a finite number > 0 (NaN would never expire, and 0 would
    abort the first collective, blaming another rank)."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT
    try:
        timeout = float(text)
    except ValueError:
        timeout = math.nan
    if not 0 < timeout < math.inf:
        raise DistributedError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds > 0 (the "
                               f"longest a rank waits for the others), e.g. {DEFAULT_TIMEOUT:g}")
    return timeout


def _connect() -> World:
    timeout = _timeout()
    try:
        from mpi4py import MPI
    except ImportError:
        return World(timeout=timeout)
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return World(timeout=timeout)
    return World(comm.Get_rank(), comm.Get_size(), comm, timeout)


def _install_abort_hook(world: World) -> None:
    previous = sys.excepthook

    def abort_on_uncaught(exc_type, exc, tb) -> None:
        previous(exc_type, exc, tb)  # the usual traceback first
        world.abort(f"failed with {exc_type.__name__}: {exc}")

    sys.excepthook = abort_on_uncaught


# -- data: one disjoint shard per rank -------------------------------------------------------
class DistributedSampler:
    """Rank `rank`'s indices of range(n) for an epoch.

    All ranks draw the same permutation from (seed, epoch) — DataLoader's formula — and rank r
    takes every `size`-th index starting at r. So the k-th batches of all ranks together are
    exactly the k-th batch a single process with `size` times the batch size would take.
    With `even`, the tail is dropped so that every rank gets the same count (training steps must
    stay in lockstep); without it every index is used once (evaluation).
    """

    def __init__(self, n: int, rank: int, size: int, shuffle: bool = True, seed: int = 0,
                 even: bool = True) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"DistributedSampler: rank {rank} is not in [0, {size})")
        if n < size:
            raise ValueError(f"DistributedSampler: {n} items cannot give each of {size} ranks one")
        self.n, self.rank, self.size = n, rank, size
        self.shuffle, self.seed, self.even = shuffle, int(seed), even

    def __len__(self) -> int:
        if self.even:
            return self.n // self.size
        return len(range(self.rank, self.n, self.size))

    def indices(self, epoch: int) -> np.ndarray:
        order = (np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        if self.even:
            order = order[:self.n - self.n % self.size]
        return order[self.rank::self.size]


class DistributedLoader:
    """A DataLoader over this rank's shard of the epoch chosen with `set_epoch`.

    Iterating has no side effect (tqdm.auto, for one, calls iter() twice), so, as with PyTorch's
    DistributedSampler, call `set_epoch` before each epoch for a fresh shuffle (`fit` does).

    `batch_size` is per rank. Training loaders keep `even=True` (same number of equal batches on
    every rank); evaluation loaders use `shuffle=False, even=False, drop_last=False`.
    """

    def __init__(self, dataset: Dataset, batch_size: int, world: World | None = None,
                 shuffle: bool = True, seed: int | None = None, drop_last: bool = True,
                 even: bool = True, transform: Transform | None = None,
                 target_transform: Transform | None = None) -> None:
        self.world = world or init()
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.transform, self.target_transform = transform, target_transform
        self.world._check_agreement("the dataset's length", len(dataset),
                                    "every rank must shard the same dataset")
        seed = self.world.shared_seed(seed) if shuffle else 0
        self.sampler = DistributedSampler(len(dataset), self.world.rank, self.world.size, shuffle,
                                          seed, even)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _loader(self, epoch: int) -> DataLoader:
        shard = Subset(self.dataset, self.sampler.indices(epoch))
        return DataLoader(shard, self.batch_size, shuffle=False, drop_last=self.drop_last, seed=0,
                          transform=self.transform, target_transform=self.target_transform)

    def __len__(self) -> int:
        count = len(self.sampler)
        return count // self.batch_size if self.drop_last else math.ceil(count / self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._loader(self.epoch))


# -- the data-parallel training step ---------------------------------------------------------
@dataclass(frozen=True)
class FlatLayout:
    """Where each reduced value sits in the one flat buffer, in order: gradients ("grad:<param>"),
    buffers averaged across ranks ("buffer:<name>"), then the loss ("loss")."""

    dtype: str
    slots: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def size(self) -> int:
        return sum(math.prod(shape) for _, shape in self.slots)

    def keys(self, prefix: str) -> list[str]:
        return [key.split(":", 1)[1] for key, _ in self.slots if key.startswith(prefix + ":")]

    def pack(self, values: dict[str, Tensor]) -> Tensor:
        return concatenate([values[key].astype(self.dtype).reshape(-1) for key, _ in self.slots])

    def unpack(self, flat: Tensor) -> dict[str, Tensor]:
        values, offset = {}, 0
        for key, shape in self.slots:
            count = math.prod(shape)
            values[key] = flat[offset:offset + count].reshape(shape)
            offset += count
        return values


@dataclass
class StepTimes:
    """Wall-clock seconds spent in each phase of the data-parallel steps run so far."""

    gradients: float = 0.0
    allreduce: float = 0.0
    update: float = 0.0
    steps: int = 0

    @property
    def total(self) -> float:
        return self.gradients + self.allreduce + self.update


class DataParallelStep(TrainStep):
    """`step(*inputs, target) -> loss`: one data-parallel training step on this rank's batch.

    The returned loss is the mean over all ranks. Everything else is TrainStep's: donated
    parameters and optimizer state updated in place, checkpoints through graphc.train.
    `graph`, `to_dot` and `memory_plan` describe the forward+backward graph; `update_graph`
    the optimizer's. Batch norm normalises with each rank's own batch statistics (as PyTorch's
    DistributedDataParallel without SyncBatchNorm); its running statistics are averaged. As
    there, the mean gradient is the mean of the ranks' mean gradients: ranks stepping batches
    of different sizes weigh alike (DistributedLoader gives every rank equal batches).
    `check_numerics` reruns the gradients graph of this rank's batch. Every `check_every` steps
    (0: never) the ranks compare digests of their training state (`check_replicas`).
    """

    step_name = "data_parallel_step"

    def __init__(self, model: Module, loss_fn: Callable[..., Tensor], optimizer: Optimizer,
                 example_inputs: Sequence[Any], backend: str | None = None,
                 clip_grad_norm: float | None = None, l1: float = 0.0, targets: int = 1,
                 world: World | None = None, check_every: int = 100) -> None:
        if check_every < 0:
            raise ValueError(f"check_every={check_every}: give a number of steps, or 0 for never")
        self.world = world or init()
        self.check_every = check_every
        self.layout: FlatLayout | None = None  # the last gradients graph's
        self._layouts: dict[int, FlatLayout] = {}  # by id of a traced gradients graph
        self._updates: dict[FlatLayout, CompiledGraph] = {}
        self.times = StepTimes()
        super().__init__(model, loss_fn, optimizer, example_inputs, backend, clip_grad_norm, l1,
                         targets, name=self.step_name)
        self._update = self._update_for(self.layout)
        self.broadcast_state()

    def broadcast_state(self) -> None:
        """Give every rank rank 0's weights, buffers, optimizer state, step count and random
        generator state (graphc.random), so that the ranks draw their keys in step."""
        state = training_state(self)
        self.world.broadcast_(state)
        self.set_rng_state(state["rng"])

    def check_replicas(self) -> None:
        """Raise DistributedError naming the first tensor of the training state (parameters,
        buffers, optimizer state, step count) that differs between ranks. Not the random
        generator's state: a rank drawing more (a gc.jit function with dropout on one rank)
        changes no replica."""
        state = {k: v for k, v in training_state(self).items() if k != "rng"}
        self.world.check_replicas(state, f"after step {self.times.steps}")

    def _gradient_divisor(self) -> int:
        """What the update graph divides the reduced buffer by to get the mean gradient."""
        return self.world.size

    # -- graph construction ----------------------------------------------------------------
    def _trace(self, batch: list[np.ndarray], stages: Stages) -> tuple[Graph, dict[int, int], ModuleReads]:
        """The gradients graph: forward and backward, every value to reduce packed into one
        flat output; buffers that are not averaged (integer counters) are updated in place."""
        spec = self.spec
        gradients = trace_gradients(spec, batch, stages)
        with StepBuilder(spec, f"{self.name}_gradients") as b:
            data, params, buffers = b.batch(batch), b.params(), b.buffers()
            loss, new_buffers, grads = b.splice(gradients, data, params, buffers)
            # parameters the loss does not read (the same on every rank): the update keeps them
            self._unused = frozenset(n for n, g in grads.items() if unread_gradient(g))
            if self._count_steps_apart(self._unused):
                return self._trace(batch, stages)  # reading their own step counts
            layout = self._set_layout(grads, new_buffers)
            averaged = set(layout.keys("buffer"))
            b.output("reduced", layout.pack({**{f"grad:{n}": g for n, g in grads.items()},
                                             **{f"buffer:{n}": v for n, v in new_buffers.items()},
                                             "loss": loss}))
            for name, value in new_buffers.items():
                if name not in averaged:
                    b.output(f"buffer:{name}", value, donor=name)
        traced = stages.record("gradients", b.graph)
        self._layouts[id(traced)] = layout
        return traced, b.donate, b.reads

    def _rebind(self) -> None:
        super()._rebind()
        self._updates = {}  # they read the optimizer's state too

    def _set_layout(self, grads: dict[str, Tensor], new_buffers: dict[str, Tensor]) -> FlatLayout:
        dtypes = {self.params[n].dtype.name for n in self.trainable}
        if len(dtypes) != 1:
            raise DistributedError(f"{self.name}: trainable parameters of several dtypes "
                                   f"({', '.join(sorted(dtypes))}) cannot share one gradient "
                                   "buffer; cast the model to one dtype")
        dtype = dtypes.pop()
        slots = [(f"grad:{n}", g.shape) for n, g in grads.items()]
        slots += [(f"buffer:{n}", v.shape) for n, v in new_buffers.items()
                  if self.buffers[n].dtype.name == dtype]
        self.layout = FlatLayout(dtype, (*slots, ("loss", ())))
        return self.layout

    def _update_for(self, layout: FlatLayout) -> CompiledGraph:
        """The update graph of gradients packed as `layout` (train and eval mode average other
        buffers: each has its own), compiled on first use."""
        if layout not in self._updates:
            self._updates[layout] = self._compile_update(layout)
        return self._updates[layout]

    def _update_graph(self, layout: FlatLayout) -> tuple[Graph, dict[int, int]]:
        """The update graph: the summed flat buffer over the world size is the mean gradient
        (and the mean of averaged buffers); then clipping and the optimizer's rule."""
        averaged = layout.keys("buffer")
        with StepBuilder(self.spec, f"{self.name}_update") as b:
            reduced = b.input(TensorType((layout.size,), layout.dtype), "reduced")
            params = b.params(self.trainable)
            b.buffers(averaged)  # read by no node: inputs only for their means to overwrite
            opt_state, step = b.optimizer_state(), b.step_count()
            mean = layout.unpack(reduced * (1.0 / self._gradient_divisor()))
            b.update(params, {n: mean[f"grad:{n}"] for n in self.trainable}, opt_state, step,
                     {n: mean[f"buffer:{n}"] for n in averaged}, self._unused)
        return b.graph, b.donate

    def _compile_update(self, layout: FlatLayout) -> CompiledGraph:
        traced, donate = self._update_graph(layout)
        stages = Stages(traced.name)
        optimized = stages.run(stages.record("update", traced), [SIMPLIFY])
        executable = compile_graph(optimized, self.backend, donate, stages)
        compiled = CompiledGraph(traced, optimized, executable, donate)
        compiled.persistent = self._persistent(optimized)
        return compiled

    @property
    def update_graph(self) -> Graph:
        """The optimized update graph (reduced buffer -> parameters and optimizer state)."""
        return self._update.optimized

    def export(self, path: str) -> None:
        raise GraphcError(f"{self.name}: a data-parallel step is two graphs around an allreduce; "
                          "export a single-process step (compile_train_step) instead")

    # -- running ---------------------------------------------------------------------------
    def _arguments(self, batch: Sequence[Any]) -> tuple[CompiledGraph, list[Any]]:
        """The gradients graph for `batch` and its arguments (check_numerics reruns it)."""
        arrays = batch_arrays(batch)
        self.check_arity(batch)
        self.optimizer.check_settings(self._optimizer_settings, self.name)
        gradients, implicit = self._select(arrays)
        if not gradients.persistent:
            gradients.persistent = self._persistent(gradients.optimized)
        args = [*arrays, *gradients.persistent, *implicit]
        if gradients.optimized.inputs[-1].role == "rng":
            self._rng_key[...] = gc_random.next_key()  # as a TrainStep draws, in step on every rank
            args.append(self._rank_key())
        return gradients, args

    @user_facing
    def __call__(self, *batch: Any) -> float:
        with self._turn:  # calls from several threads take turns, as a single-process step's
            return numerics_checked(self, batch, self._step)

    def _step(self, batch: Sequence[Any]) -> float:
        if self._follow_module_tree():  # the model's buffers, averaged in the update graph, may be others now
            self._updates = {}
        self._follow_own_counts()
        gradients, args = self._arguments(batch)
        layout = self._layouts[id(gradients.traced)]
        self._update = self._update_for(layout)
        # The buffers summed must be laid out alike on every rank (a rank in eval mode averages
        # other buffers): checked at every step, while the gradients compute
        agreed = self.world.agreement(layout)
        start = time.perf_counter()
        reduced = np.require(gradients.executable(*args)[0], requirements=["C", "W"])
        agreed("the gradients' layout (the parameters and averaged buffers summed)",
               "every rank must train the same model in the same mode (train() or eval())")
        reduced_at = time.perf_counter()
        self.world.allreduce_(reduced)
        updated_at = time.perf_counter()
        self._update.executable(reduced, *self._update.persistent, *self.optimizer.learning_rates())
        self._record_times(start, reduced_at, updated_at, time.perf_counter())
        if self.check_every and self.times.steps % self.check_every == 0:
            self.check_replicas()
        return float(reduced[-1]) / self.world.size

    def _rank_key(self) -> np.ndarray:
        """This rank's RNG key: the call's key (seed, counter) with the seed moved along by the
        rank, a stream of its own; rank 0's (and a world of one's) is the key itself, so a world
        of one reproduces the single-graph step bit for bit."""
        seed, counter = (int(v) for v in self._rng_key)
        moved = (seed + self.world.rank * 0x9E3779B97F4A7C15 + 2**63) % 2**64 - 2**63
        return np.array([moved, counter], np.int64)

    def _record_times(self, start: float, reduced_at: float, updated_at: float, end: float) -> None:
        self.times.gradients += reduced_at - start
        self.times.allreduce += updated_at - reduced_at
        self.times.update += end - updated_at
        self.times.steps += 1


# -- checkpoints, evaluation and the fit loop ------------------------------------------------
def resume(step: DataParallelStep, path: str) -> bool:
    """Continue from the checkpoint at `path` when rank 0 finds one; returns whether it did.
    Rank 0 reads the file (other machines need not see it) and broadcasts the state."""
    world = step.world
    found = np.array([world.is_root and os.path.exists(path)], np.bool_)
    if found[0]:
        load_checkpoint(path, step)
    rates = np.array(learning_rates(step), np.float64)  # the root's: the file's where it read one
    world.broadcast_({"found": found, "rates": rates})
    set_learning_rates(step, rates.tolist())
    step.broadcast_state()
    return bool(found[0])


def evaluate(model_fn: Callable[..., np.ndarray], loss_fn: Callable | None,
             loader: DistributedLoader, targets: int = 1) -> dict[str, float]:
    """Loss (when `loss_fn` is given) and, for class scores, accuracy over the whole dataset:
    each rank evaluates its shard, then the sums are reduced. The last `targets` arrays of a
    batch are the loss's targets; the accuracy is against the first of them."""
    loss_jit = staged(loss_fn)
    totals = np.zeros(3)  # loss * count, correct predictions, count (of the targets counted)
    classes = True
    for batch in loader:
        inputs, (target, *more) = split_batch(batch, targets)
        scores = model_fn(*inputs)
        counted = counted_targets(scores, np.asarray(target))  # not a loss's ignore_index
        count = np.count_nonzero(counted)
        if loss_jit is not None and count:
            totals[0] += float(loss_jit(scores, target, *more)) * count
        # one column is a binary logit or probability, not class scores (as train.evaluate)
        classes = (isinstance(scores, np.ndarray) and scores.ndim == 2 and scores.shape[1] >= 2
                   and target.ndim == 1 and target.dtype.kind in "iu")
        if classes:
            totals[1] += np.count_nonzero((scores.argmax(1) == target)[counted])
        totals[2] += count
    loader.world.allreduce_(totals)
    result = {}
    average = (lambda total: total / totals[2]) if totals[2] else (lambda total: float("nan"))
    if loss_jit is not None:
        result["loss"] = average(totals[0])
    if classes:
        result["accuracy"] = average(totals[1])
    return result


def fit(step: DataParallelStep, train_loader: DistributedLoader, epochs: int = 1,
        val_loader: DistributedLoader | None = None, checkpoint_path: str | None = None,
        resume_from_checkpoint: bool = False, early_stopping: EarlyStopping | None = None,
        scheduler: Any = None, progress: bool = True,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        check_numerics: bool | None = None) -> History:
    """Train for `epochs` on every rank in lockstep; returns the same History on every rank.

    This is graphc.train.fit in the step's world: logged metrics are global (reduced over
    ranks); only rank 0 shows progress, calls `on_epoch_end` and writes the checkpoint
    (atomically, after every epoch). With `resume_from_checkpoint`, training continues after
    the last completed epoch of the checkpoint at `checkpoint_path` (when it exists).
    An AsyncStep trains asynchronously instead (AsyncStep.fit; early stopping, schedulers and
    check_numerics are not supported there).
    """
    from .async_ps import AsyncStep  # imported here: async_ps builds on this module
    if isinstance(step, AsyncStep):
        unsupported = [name for name, value in (("early_stopping", early_stopping),
                                                ("scheduler", scheduler),
                                                ("check_numerics", check_numerics)) if value]
        if unsupported:
            raise DistributedError(f"fit: an AsyncStep does not support {', '.join(unsupported)}")
        return step.fit(train_loader, epochs, val_loader, checkpoint_path, resume_from_checkpoint,
                        on_epoch_end)
    first_epoch = 1
    if resume_from_checkpoint and checkpoint_path is not None and resume(step, checkpoint_path):
        first_epoch = int(step.step_count) // max(len(train_loader), 1) + 1
    return train.fit(step, train_loader, epochs, val_loader, early_stopping, checkpoint_path,
                     progress=progress, scheduler=scheduler, on_epoch_end=on_epoch_end,
                     check_numerics=check_numerics, world=step.world, initial_epoch=first_epoch,
                     on_epoch_start=train_loader.set_epoch)


__all__ = ["DEFAULT_TIMEOUT", "DataParallelStep", "DistributedError", "DistributedLoader",
           "DistributedSampler", "FlatLayout", "StepTimes", "TIMEOUT_ENV", "World", "evaluate",
           "fit", "init", "resume", "tensor_digest"]
