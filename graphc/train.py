"""The fit loop: epochs over a DataLoader, validation metrics, early stopping with best-weights
restore, atomic checkpoints, a tqdm progress bar and optional TensorBoard scalars."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import re
import stat
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterator, Sized
from typing import Any, Callable, ContextManager, Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from graphc.ir.errors import GraphcError, LoadError

from . import metrics
from .api import staged
from .compile import CompiledModel, TrainStep, compile
from .data import DataLoader
from .export import LoadedTrainStep, is_step_count
from .optim.lr_scheduler import SCHEDULE_KEYS, LRScheduler, ReduceLROnPlateau


# -- checkpoints -----------------------------------------------------------------------------
CHECKPOINT_FORMAT = "graphc.checkpoint"
CHECKPOINT_VERSION = "2"  # 2: a SHA-256 of every tensor's bytes in the header's metadata
_HEADER_ALLOWANCE = 64 << 10  # a safetensors header: this plus _PER_TENSOR_HEADER per tensor
_PER_TENSOR_HEADER = 1 << 10


def atomic_write(path: str, write: Callable[[Any], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`: an
    interrupted write leaves the previous file untouched. A write killed outright (no chance to
    clean up) leaves its temporary file; the next write to `path` removes it. The file gets the
    mode of the one it replaces, or a new file's (0666 less the umask), as `open` would give it.
    A failure raises OSError naming `path`. A symbolic link is written through (its target
    replaced, the link kept), as `open` writes through one."""
    target = os.path.realpath(path)
    directory, name = os.path.dirname(target), os.path.basename(target)
    try:
        _remove_stale_temporaries(directory, name)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{os.getpid()}-{_temporary_tag(name)}.", dir=directory)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror}", path) from error
    try:
        os.fchmod(fd, _mode_for(path))
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as error:
        os.unlink(tmp)
        if isinstance(error, OSError):
            raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}", path) from error
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _mode_for(path: str) -> int:
    """The permission bits of the file at `path`, or those `open` gives a new file."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only set it, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# `.tmp-<pid>-<name>.<mkstemp's random part>`: the name after the pid, so that a file named like
# another's temporary ("ck.424242" beside "ck") cannot be taken for one
_TEMPORARY = re.compile(r"\.tmp-(\d+)-(.*)\.[a-z0-9_]+", re.DOTALL)  # a name may hold a line break


def _temporary_tag(name: str) -> str:
    """What a temporary file of `name` carries after the pid: the name itself, or a digest of a
    name too long to take the ~25 bytes more within NAME_MAX (255 bytes)."""
    encoded = os.fsencode(name)
    return name if len(encoded) <= 200 else f"~{hashlib.sha256(encoded).hexdigest()[:32]}"


def _remove_stale_temporaries(directory: str, name: str) -> None:
    """Delete the temporary files of earlier writes to `name` whose process is gone (a live
    process may be writing it now)."""
    for entry in os.listdir(directory):
        match = _TEMPORARY.fullmatch(entry)
        if match is None or match.group(2) != _temporary_tag(name):
            continue
        pid = int(match.group(1))
        if pid != os.getpid() and not _process_alive(pid):
            try:
                os.unlink(os.path.join(directory, entry))
            except FileNotFoundError:  # another writer removed it first
                pass


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def require_training_step(step: Any, who: str) -> None:
    """Refuse an inference function where a training step is needed, naming it (it has
    weights but no optimizer state to save or train with)."""
    from .export import LoadedFunction

    if isinstance(step, (CompiledModel, LoadedFunction)):
        raise GraphcError(f"{who}: expects a training step (gc.compile_train_step, or a training "
                          f"step exported and loaded with gc.load), got an inference function "
                          f"(gc.compile, or an inference export loaded with gc.load), which has "
                          f"no optimizer")


def taking_turns(step: TrainStep | LoadedTrainStep) -> ContextManager[Any]:
    """The lock a training step's calls take turns by: held, no call runs in another thread
    (none for a step of another kind, a pipeline's, whose calls run where they are made)."""
    return getattr(step, "_turn", None) or contextlib.nullcontext()


def _refuse_pipeline(step: Any, who: str) -> None:
    """A pipeline's step keeps one checkpoint per stage, through its own methods."""
    from .distributed.pipeline import PipelineParallelStep

    if isinstance(step, PipelineParallelStep):
        raise GraphcError(f"{who}: a PipelineParallelStep keeps one checkpoint per stage: call "
                          f"step.save_checkpoint(path) and step.load_checkpoint(path)")


def training_state(step: TrainStep | LoadedTrainStep) -> dict[str, np.ndarray]:
    """Everything needed to continue training exactly: weights, buffers, optimizer state,
    step count and RNG key. The arrays are the step's own, writing into them changes it, but
    for "rng", the generator's key: a copy, which `step.set_rng_state(key)` restores
    (load_checkpoint does)."""
    require_training_step(step, "training_state")
    _refuse_pipeline(step, "training_state")
    if isinstance(step, LoadedTrainStep):
        return step.training_state()
    state = {f"model/{k}": v for k, v in step.model.state_dict().items()}
    for name, slots in step.opt_state.items():
        state.update({f"optim/{name}/{k}": v for k, v in slots.items()})
    state["step"] = step.step_count
    state["rng"] = step.rng_state  # the key the next call draws with
    return state


def learning_rates(step: TrainStep | LoadedTrainStep) -> list[float]:
    """Each parameter group's learning rate now."""
    if isinstance(step, LoadedTrainStep):
        return [float(r) for r in step.lrs]
    return [float(group["lr"]) for group in step.optimizer.param_groups]


def set_learning_rates(step: TrainStep | LoadedTrainStep, rates: list[float]) -> None:
    if isinstance(step, LoadedTrainStep):
        step.lrs = list(rates)
    else:
        for group, rate in zip(step.optimizer.param_groups, rates):
            group["lr"] = rate


def save_checkpoint(path: str, step: TrainStep | LoadedTrainStep) -> None:
    """Atomically write the training state as safetensors (no pickle), with a SHA-256 of
    every tensor and each parameter group's learning rate in its metadata (a rate set by hand
    comes back, as PyTorch's optimizer state dict brings it back)."""
    from safetensors.numpy import save

    from .export import tensor_digest

    require_training_step(step, "save_checkpoint")
    _refuse_pipeline(step, "save_checkpoint")
    if isinstance(step, TrainStep) and (absent := step.optimizer.absent_parameters()):
        names = [name for name, p in step.params.items() if id(p) in absent]
        warnings.warn(f"save_checkpoint: the optimizer keeps state (moments, step counts) for "
                      f"{names}, which no parameter group holds now: the checkpoint does not hold "
                      f"it, and a run resumed from it starts their state afresh once a group "
                      f"takes them back; save with their group in place to keep it", stacklevel=2)
    with taking_turns(step):  # a step running in another thread finishes first: one snapshot
        state = {k: np.array(v, order="C") for k, v in training_state(step).items()}
        rates = json.dumps(learning_rates(step))
    metadata = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "learning_rates": rates,
                "sha256:learning_rates": hashlib.sha256(rates.encode()).hexdigest(),
                **{f"sha256/{k}": tensor_digest(v) for k, v in state.items()}}
    if isinstance(step, TrainStep):  # a schedule's rates (initial_lr...), for a scheduler resumed
        schedule = json.dumps([{k: float(g[k]) for k in SCHEDULE_KEYS if k in g}
                               for g in step.optimizer.param_groups])
        metadata.update({"schedule": schedule,
                         "sha256:schedule": hashlib.sha256(schedule.encode()).hexdigest()})
    if getattr(step, "optimizer", None) is not None:  # a step with its optimizer (a pipeline stage's too)
        groups = json.dumps(_group_members(step))
        metadata.update({"groups": groups, "sha256:groups": hashlib.sha256(groups.encode()).hexdigest()})
    payload = save(state, metadata=metadata)
    atomic_write(path, lambda f: f.write(payload))


def load_checkpoint(path: str, step: TrainStep | LoadedTrainStep) -> None:
    """Restore a checkpoint into `step` (in place). Refuses, with a LoadError naming the file
    and the tensor, files that do not match the step or fail a checksum; reads no more than a
    checkpoint of this step can hold."""
    require_training_step(step, "load_checkpoint")
    _refuse_pipeline(step, "load_checkpoint")
    with taking_turns(step):  # not into the arrays of a step running in another thread
        _load_checkpoint(path, step)


def _load_checkpoint(path: str, step: TrainStep | LoadedTrainStep) -> None:
    from .bounded_io import open_regular, read_at_most

    own = training_state(step)
    # safetensors stores 0-d arrays (the step count) with shape (1,)
    limit = 8 + _HEADER_ALLOWANCE + sum(_PER_TENSOR_HEADER + np.asarray(v).nbytes for v in own.values())
    with open_regular(path) as f:
        data = read_at_most(f, limit, path)
    metadata, arrays = _parse_checkpoint(path, data)
    # A parameter's own step count ("optim/<param>/step") is kept only where it differs from the
    # step's (graphc.optim): one the file lacks counted the step's; one this optimizer lacks
    # (its group added later in the run that wrote the file) is made once the file checks out,
    # and the step compiles again to read it.
    counted = _step_counts_to_make(step, [k for k in arrays if k not in own])
    own = {**own, **{k: np.zeros((), np.float32) for k in counted}}  # the shapes to check
    data = {k: v.reshape(()) if own.get(k) is not None and own[k].ndim == 0 and v.size == 1 else v
            for k, v in arrays.items()}
    if "step" in data:
        data.update({k: data["step"].astype(own[k].dtype) for k in own
                     if _own_step_count(k) and k not in data})
    if set(data) != set(own):
        raise LoadError(path, f"does not match this training step (missing "
                        f"{sorted(set(own) - set(data))[:5]}, unexpected {sorted(set(data) - set(own))[:5]})")
    for name, array in data.items():
        if array.shape != own[name].shape or array.dtype != own[name].dtype:
            raise LoadError(path, f"is {array.dtype}{list(array.shape)}, expected "
                            f"{own[name].dtype}{list(own[name].shape)}", name)
    if metadata.get("version") != "1":  # version 1 held no checksums
        from .export import tensor_digest

        for name, array in data.items():
            if name in arrays and metadata.get(f"sha256/{name}") != tensor_digest(array):
                raise LoadError(path, "fails its checksum: the checkpoint is corrupted", name)
    # (after the checksums: a corrupted file is named so)
    for name, array in data.items():
        if (name == "step" or _own_step_count(name)) and not is_step_count(array):
            raise LoadError(path, f"the step count must be a whole number >= 0, got "
                            f"{array.ravel()[:1].tolist()}", name)
    if getattr(step, "optimizer", None) is not None:
        _check_group_members(path, metadata, _group_members(step))
    rates = _checkpoint_rates(path, metadata, len(learning_rates(step)))
    schedule = _checkpoint_schedule(path, metadata, len(learning_rates(step)))
    if counted:
        step.count_own_steps([k.split("/")[1] for k in counted])
        own = training_state(step)
    for name, array in data.items():
        np.copyto(own[name], array)
    if not isinstance(step, LoadedTrainStep):  # its key is its own array, written above
        step.set_rng_state(data["rng"])
    if rates is not None:
        set_learning_rates(step, rates)
    if schedule is not None and isinstance(step, TrainStep):
        for group, keys in zip(step.optimizer.param_groups, schedule):
            group.update(keys)


def _metadata_json(path: str, metadata: dict[str, str], key: str) -> Any:
    """The JSON value a checkpoint's metadata holds under `key`, its checksum checked (None in
    a file written before checkpoints held it)."""
    from .bounded_io import parse_json

    if key not in metadata and f"sha256:{key}" not in metadata:
        return None
    text = metadata.get(key, "").encode()
    if metadata.get(f"sha256:{key}") != hashlib.sha256(text).hexdigest():
        raise LoadError(path, "fails its checksum: the checkpoint is corrupted", key)
    return parse_json(text, path, key)


def _is_rate(r: Any) -> bool:
    """Whether a JSON value is a finite non-negative number a float holds (an int of 400 digits
    is not: float() of it overflows; NaN compares False)."""
    return type(r) in (int, float) and 0 <= r <= sys.float_info.max


def _group_members(step: TrainStep) -> list[list[str]]:
    """The names of each parameter group's parameters the step trains (a pipeline stage: its
    own), in the optimizer's order."""
    name_of = {id(step.params[name]): name for name in step.trainable}
    return [[name_of[id(p)] for p in group["params"] if id(p) in name_of]
            for group in step.optimizer.param_groups]


def _check_group_members(path: str, metadata: dict[str, str], members: list[list[str]]) -> None:
    """Refuse a checkpoint whose parameter groups hold other parameters than the step's (its
    rates, kept per group, would go to the wrong parameters), as PyTorch's optimizer refuses
    a state dict of other groups. A file written before checkpoints held them passes."""
    saved = _metadata_json(path, metadata, "groups")
    if saved is not None and saved != members:
        raise LoadError(path, f"its parameter groups hold {str(saved):.200}, this step's optimizer "
                        f"{members}: build the optimizer with the groups of the run that wrote it")


def _checkpoint_rates(path: str, metadata: dict[str, str], groups: int) -> list[float] | None:
    """The learning rates a checkpoint holds, one per parameter group (None in a file written
    before checkpoints held them)."""
    rates = _metadata_json(path, metadata, "learning_rates")
    if rates is None:
        return None
    if (not isinstance(rates, list) or len(rates) != groups
            or not all(_is_rate(r) for r in rates)):
        raise LoadError(path, f"learning_rates: expected {groups} finite non-negative rates (one per "
                        f"parameter group), got {metadata['learning_rates']!r:.80}")
    return [float(r) for r in rates]


def _checkpoint_schedule(path: str, metadata: dict[str, str], groups: int
                         ) -> list[dict[str, float]] | None:
    """Each parameter group's schedule rates (SCHEDULE_KEYS) a checkpoint holds (None in a file
    written before checkpoints held them)."""
    schedule = _metadata_json(path, metadata, "schedule")
    if schedule is None:
        return None
    if (not isinstance(schedule, list) or len(schedule) != groups
            or not all(isinstance(g, dict) and set(g) <= set(SCHEDULE_KEYS)
                       and all(_is_rate(r) for r in g.values())
                       for g in schedule)):
        raise LoadError(path, f"schedule: expected {groups} groups of finite non-negative rates "
                        f"named among {list(SCHEDULE_KEYS)}, got {metadata['schedule']!r:.80}")
    return [{k: float(r) for k, r in g.items()} for g in schedule]


def _step_counts_to_make(step: TrainStep | LoadedTrainStep, names: list[str]) -> list[str]:
    """Of a checkpoint's tensors `names` that `step` lacks, the parameters' own step counts its
    optimizer can take up."""
    if not isinstance(step, TrainStep):
        return []
    return [k for k in names if _own_step_count(k) and k.split("/")[1] in step.opt_state
            and step.optimizer.keeps_own_steps(step.params[k.split("/")[1]])]


def _own_step_count(name: str) -> bool:
    """Whether `name`, in a training state, is a parameter's own step count."""
    return name.startswith("optim/") and name.endswith("/step") and name.count("/") == 2


def _parse_checkpoint(path: str, data: bytes) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The header metadata (format checked) and the tensors of a safetensors checkpoint."""
    from safetensors.numpy import load

    from .bounded_io import parse_json

    size = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    if not 0 < size <= len(data) - 8:
        raise LoadError(path, f"cannot read checkpoint: {len(data)} bytes hold no safetensors header")
    header = parse_json(data[8:8 + size], path, "header")
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or metadata.get("format") != CHECKPOINT_FORMAT:
        raise LoadError(path, "cannot read checkpoint: not a graphc checkpoint (no graphc metadata)")
    if metadata.get("version") not in ("1", CHECKPOINT_VERSION):
        raise LoadError(path, f"cannot read checkpoint version {metadata.get('version')!r:.20} "
                        f"(this graphc reads 1 and {CHECKPOINT_VERSION})")
    try:
        arrays = load(data)
    except Exception as exc:  # the safetensors parser's own errors, whatever their type
        raise LoadError(path, f"cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    return metadata, arrays


# -- early stopping ------------------------------------------------------------------------
@dataclass
class EarlyStopping:
    """Stop when `monitor` has not improved by `min_delta` for `patience` epochs; optionally
    restore the best weights seen: the model's parameters and buffers, as Keras restores a
    model's weights (the optimizer's moments, the step count and the random key go on, so the
    next steps draw fresh dropout masks)."""

    monitor: str = "val_loss"
    patience: int = 3
    mode: str = "auto"  # "min", "max", or by name: *loss -> min, else max
    min_delta: float = 0.0
    restore_best_weights: bool = True
    best: float = field(default=math.nan, init=False)
    best_epoch: int = field(default=-1, init=False)
    best_state: dict[str, np.ndarray] | None = field(default=None, init=False)
    wait: int = field(default=0, init=False)
    _step: Any = field(default=None, init=False, repr=False)  # the step best_state belongs to

    MODES = ("auto", "min", "max")

    def __post_init__(self) -> None:
        if self.mode not in self.MODES:
            raise ValueError(f"EarlyStopping: mode must be one of {self.MODES}, got {self.mode!r}")

    def _better(self, value: float) -> bool:
        if math.isnan(value):  # a NaN metric is no improvement: all-NaN epochs stop training too
            return False
        if self.best_epoch < 0:  # the first finite value
            return True
        minimize = self.mode == "min" or (self.mode == "auto" and self.monitor.endswith("loss"))
        return value < self.best - self.min_delta if minimize else value > self.best + self.min_delta

    def begin(self, step: TrainStep | LoadedTrainStep, initial_epoch: int) -> None:
        """Called by fit before its first epoch: a run from epoch 1, or of another step,
        starts afresh (as Keras's callback does); a run of the same step resumed at a later
        epoch keeps the best value and weights seen so far."""
        if initial_epoch <= 1 or self._step is not step:
            self.best, self.best_epoch, self.best_state, self.wait = math.nan, -1, None, 0
        self._step = step

    def update(self, epoch: int, logs: dict[str, float], step: TrainStep | LoadedTrainStep) -> bool:
        """Record this epoch; return True when training should stop."""
        if self.monitor not in logs:
            raise GraphcError(f"EarlyStopping: metric {self.monitor!r} is not logged "
                              f"(available: {sorted(logs)})")
        value = logs[self.monitor]
        if self._better(value):
            self.best, self.best_epoch, self.wait = value, epoch, 0
            if self.restore_best_weights:
                self.best_state = {name: np.array(array) for name, array in training_state(step).items()
                                   if name.startswith("model/")}
            return False
        self.wait += 1
        return self.wait >= self.patience

    def restore(self, step: TrainStep | LoadedTrainStep) -> None:
        if self.best_state is not None:
            own = training_state(step)
            for name, array in self.best_state.items():
                np.copyto(own[name], array)


# -- evaluation ------------------------------------------------------------------------------
def split_batch(batch: Sequence[Any], targets: int = 1) -> tuple[list[Any], list[Any]]:
    """A (inputs..., targets...) batch's model inputs and its `targets` last entries (the loss's
    targets, as compile_train_step's `targets` counts them)."""
    batch = list(batch)
    if len(batch) <= targets:
        raise GraphcError(f"a batch of {len(batch)} arrays holds no model input besides its "
                          f"{targets} target(s)")
    return batch[:-targets], batch[-targets:]


def evaluate(model_fn: CompiledModel, loss_fn: Callable | None, loader: Iterable,
             num_classes: int | None = None, targets: int = 1) -> dict[str, Any]:
    """Run inference over a loader of (inputs..., targets...) batches, the last `targets`
    arrays the loss's targets; returns loss (when loss_fn is given), predictions and
    classification metrics (against the first target) when the outputs are class scores: (N, K)
    with K >= 2 and integer targets (N,). One column is no class scores: a binary classifier's
    logit or probability (their thresholds differ: 0 or 0.5), so it gets the loss alone, as does
    a model with several outputs. Class targets outside [0, K) (a loss's ignore_index, -100 by
    default) count neither in the metrics nor in the loss's average over batches, which weighs
    each batch by the targets it counts."""
    outputs, labels, losses, counts = [], [], [], []
    loss_jit = staged(loss_fn)
    for batch in loader:
        inputs, target = split_batch(batch, targets)
        out = model_fn(*inputs)
        outputs.append(out)
        labels.append(target[0])
        if loss_jit is not None:
            losses.append(float(loss_jit(out, *target)))
            counts.append(int(counted_targets(out, np.asarray(target[0])).sum()))
    if not outputs:
        raise GraphcError(f"evaluate: the loader (a {type(loader).__name__}) gave no batch")
    result: dict[str, Any] = {}
    if losses:
        counted = [(loss, n) for loss, n in zip(losses, counts) if n > 0]  # a batch all ignored: NaN
        result["loss"] = (float(np.average([l for l, _ in counted], weights=[n for _, n in counted]))
                          if counted else float("nan"))
    if not isinstance(outputs[0], np.ndarray):  # several outputs (a tuple): the loss alone
        return result
    scores, y = np.concatenate(outputs), np.concatenate(labels)
    result.update(outputs=scores, targets=y)
    if scores.ndim == 2 and scores.shape[1] >= 2 and y.ndim == 1 and y.dtype.kind in "iu":
        predictions = scores.argmax(1)
        kept = counted_targets(scores, y)
        y, pred = y[kept], predictions[kept]
        n = num_classes or scores.shape[1]
        result.update(predictions=predictions, confusion=metrics.confusion_matrix(y, pred, num_classes=n))
        if not len(y):  # every target ignored: no metric is defined
            result.update(accuracy=math.nan, precision=math.nan, recall=math.nan, f1=math.nan)
            return result
        p, r, f1 = metrics.precision_recall_f1(y, pred, average="macro")
        result.update(accuracy=metrics.accuracy(y, pred), precision=p, recall=r, f1=f1)
    return result


def counted_targets(scores: Any, target: np.ndarray) -> np.ndarray:
    """Which of a batch's targets a classification loss counts: for class indices read against
    scores of K >= 2 classes (axis 1), those in [0, K) (the loss has refused any other but its
    ignore_index); every sample otherwise (one flag per sample)."""
    if (isinstance(scores, np.ndarray) and scores.ndim >= 2 and scores.shape[1] >= 2
            and target.dtype.kind in "iu" and target.shape == scores.shape[:1] + scores.shape[2:]):
        return (target >= 0) & (target < scores.shape[1])
    return np.ones(len(target), bool)


# -- the loop ----------------------------------------------------------------------------------
@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    stopped_early: bool = False
    best_epoch: int | None = None

    def __getitem__(self, key: str) -> list[float]:
        return [e[key] for e in self.epochs if key in e]


@runtime_checkable
class World(Protocol):
    """What the fit loop asks of the processes training together: how many there are
    (`size`), whether this one speaks for them all (`is_root`: progress, callbacks,
    checkpoints, TensorBoard) and how they evaluate a validation loader together.
    graphc.distributed.World is one; `SINGLE_PROCESS` is the world of one process."""

    size: int

    @property
    def is_root(self) -> bool: ...

    def evaluate(self, model_fn: Callable[..., Any], loss_fn: Callable | None, loader: Iterable,
                 targets: int = 1) -> dict[str, Any]: ...


class _SingleProcess:
    size = 1
    is_root = True

    def evaluate(self, model_fn: Callable[..., Any], loss_fn: Callable | None, loader: Iterable,
                 targets: int = 1) -> dict[str, Any]:
        return evaluate(model_fn, loss_fn, loader, targets=targets)


SINGLE_PROCESS: World = _SingleProcess()


class _Validation:
    """The validation logs of each epoch: the world's evaluation over `loader` with the model
    compiled for inference (on the first validation batch, once). A one-shot iterator (a
    generator) is read into a list up front, so that every epoch validates on all of it."""

    SCALARS = ("loss", "accuracy", "precision", "recall", "f1")

    def __init__(self, step: TrainStep | LoadedTrainStep, loader: Iterable | None, world: World) -> None:
        if loader is not None and isinstance(step, LoadedTrainStep):
            raise GraphcError("fit: val_loader needs the model's code and loss function, which a "
                              "training step loaded from a file does not hold; fit without it and "
                              "validate step.export_inference(path) loaded with gc.load(path)")
        kind = type(loader).__name__
        if isinstance(loader, Iterator):
            loader = list(loader)
        if isinstance(loader, Sized) and len(loader) == 0:
            raise GraphcError(f"fit: val_loader (a {kind}) is empty: it has no batch to validate on")
        self.step, self.loader, self.world = step, loader, world
        self.model: CompiledModel | None = None
        # traced once for all epochs (a new one each epoch traced the loss again every time)
        self.loss = staged(step.loss_fn) if loader is not None else None

    def logs(self) -> dict[str, float]:
        if self.loader is None:
            return {}
        result = self.world.evaluate(self._predict, self.loss, self.loader, self.step.targets)
        return {f"val_{k}": float(v) for k, v in result.items() if k in self.SCALARS}

    def _predict(self, *inputs: Any) -> Any:
        # compiled on the first batch the evaluation reads: no batch is drawn just to compile
        if self.model is None:
            self.model = compile(self.step.model, inputs, backend=self.step.backend)
        return self.model(*inputs)


def fit(step: TrainStep | LoadedTrainStep, train_loader: Iterable, epochs: int = 1,
        val_loader: Iterable | None = None, early_stopping: EarlyStopping | None = None,
        checkpoint_path: str | None = None, log_dir: str | None = None, progress: bool = True,
        scheduler: Any = None,
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
        check_numerics: bool | None = None, world: World = SINGLE_PROCESS,
        initial_epoch: int = 1, on_epoch_start: Callable[[int], None] | None = None) -> History:
    """Train `step` for `epochs` over `train_loader` ((inputs..., target) batches).

    `train_loader` is iterated once per epoch, so for several epochs it must be re-iterable (a
    DataLoader, a list), not a generator: an epoch without batches raises GraphcError.
    `val_loader` may be a generator or other one-shot iterator: it is read into a list before
    the first epoch and every epoch validates on all of it. A step loaded with gc.load trains,
    checkpoints and stops early (on the training loss) here, but has no model code to validate.

    With `check_numerics` (or GRAPHC_CHECK_NUMERICS=1) the state before each step is kept, so
    a non-finite loss, or a NaN or infinity a step with a finite loss leaves in the weights or
    the optimizer state (made by the backward pass), is traced back to the op and source line
    that produced it.

    Several processes training together (graphc.distributed.fit) pass their `world`: then only
    its root shows progress, logs to TensorBoard, calls `on_epoch_end` and writes the
    checkpoint, and validation is evaluated across the world. Epochs are numbered from 1;
    training resumed after epoch k starts at `initial_epoch` k + 1, and first steps `scheduler`
    (stepped once per epoch) to epoch k, and a DataLoader to its shuffle of epoch k + 1, where
    they are not there already. `on_epoch_start(epoch)`
    runs before each epoch's first batch (a sharded loader picks its epoch's shard there)."""
    from tqdm.auto import tqdm

    require_training_step(step, "fit")
    if isinstance(initial_epoch, bool) or not isinstance(initial_epoch, (int, np.integer)) or initial_epoch < 1:
        raise GraphcError(f"fit: initial_epoch is the number of the first epoch to train, from 1 "
                          f"(resuming after epoch k: k + 1), got {initial_epoch!r}")
    # (under GRAPHC_CHECK_NUMERICS a compiled step checks each of its calls itself; a loaded
    # step, with no model code to rerun a failing batch on, is put back as it was all the same)
    check_numerics = bool(check_numerics)
    if early_stopping is not None and early_stopping.monitor.startswith("val_") and val_loader is None:
        raise GraphcError(f"fit: EarlyStopping monitors {early_stopping.monitor!r}, a validation "
                          "metric, but there is no val_loader: pass one or monitor 'loss'")
    # a name no epoch logs (a typo) is refused before the first epoch trains, not after it (an
    # on_epoch_end callback may add to the logs EarlyStopping reads, not to the scheduler's)
    loggable = {"loss", "samples_per_s"} | ({f"val_{k}" for k in _Validation.SCALARS}
                                           if val_loader is not None else set())
    monitors = [("ReduceLROnPlateau", getattr(scheduler, "monitor", None))]
    if on_epoch_end is None:
        monitors.append(("EarlyStopping", getattr(early_stopping, "monitor", None)))
    for user, monitor in monitors:
        if isinstance(monitor, str) and monitor not in loggable:
            raise GraphcError(f"fit: {user} monitors {monitor!r}, which no epoch logs; the logs "
                              f"are {', '.join(sorted(loggable))}")
    if early_stopping is not None:
        early_stopping.begin(step, initial_epoch)
    validation = _Validation(step, val_loader, world)
    # resumed at initial_epoch: the epochs before it stepped the schedule (a scheduler of
    # graphc's or PyTorch's protocol counts them in last_epoch)
    # (not ReduceLROnPlateau, which needs their metrics: its state is the caller's to restore)
    plateau = isinstance(scheduler, ReduceLROnPlateau)
    if (scheduler is not None and not plateau
            and getattr(scheduler, "last_epoch", initial_epoch) < initial_epoch - 1):
        _catch_up(scheduler, initial_epoch - 1)
    # and drew their shuffles: a loader counting its epochs (DataLoader) draws epoch k + 1's
    # next, also where a failed run of it had started drawing epoch k + 1 already
    if isinstance(getattr(train_loader, "epoch", None), int) and hasattr(train_loader, "set_epoch") \
            and initial_epoch > 1:
        train_loader.set_epoch(initial_epoch - 1)
    writer = tensorboard_writer(log_dir) if world.is_root else None
    try:
        history = History()
        # a resumed run's batches go on from the epochs before it in TensorBoard's step axis
        global_step = (initial_epoch - 1) * len(train_loader) if isinstance(train_loader, Sized) else 0
        for epoch in range(initial_epoch, epochs + 1):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            # One iter() per epoch: a DataLoader draws its next shuffle on each call.
            total_batches = len(train_loader) if isinstance(train_loader, Sized) else None
            bar = tqdm(iter(train_loader), total=total_batches, desc=f"epoch {epoch}/{epochs}",
                       disable=not (progress and world.is_root), leave=True)
            total, seen, start = 0.0, 0, time.perf_counter()
            for batch in bar:
                _require_batch(batch)
                loss = checked_step(step, batch, check_numerics, f"at epoch {epoch}, step {global_step}")
                n = len(batch[-1]) if np.ndim(batch[-1]) else 1  # a 0-d target: one sample
                total, seen, global_step = total + loss * n, seen + n, global_step + 1
                if writer is not None:
                    writer.add_scalar("train/loss", loss, global_step)
                rate = seen * world.size / (time.perf_counter() - start)
                bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{rate:.0f}")
            if seen == 0:
                bar.close()
                raise GraphcError(_empty_epoch_message(train_loader, epoch))
            logs = {"epoch": epoch, "loss": total / seen,
                    "samples_per_s": seen * world.size / (time.perf_counter() - start),
                    **validation.logs()}
            if plateau:
                monitor = scheduler.monitor or ("val_loss" if "val_loss" in logs else "loss")
                if monitor not in logs:
                    raise GraphcError(f"fit: ReduceLROnPlateau monitors {monitor!r}, which the epoch "
                                      f"does not log (it logs {', '.join(sorted(logs))})")
                scheduler.step(logs[monitor])
            elif scheduler is not None:
                scheduler.step()
            history.epochs.append(logs)
            if world.is_root:
                _announce(epoch, logs, writer, on_epoch_end, checkpoint_path, step)
            if early_stopping is not None and early_stopping.update(epoch, logs, step):
                history.stopped_early = True
                break
        if early_stopping is not None:
            history.best_epoch = early_stopping.best_epoch
            if early_stopping.restore_best_weights:
                early_stopping.restore(step)
        return history
    finally:  # what was logged reaches the file, also when training fails
        if writer is not None:
            writer.close()


def _catch_up(scheduler: Any, epoch: int) -> None:
    """Step `scheduler`, behind a run resumed after `epoch`, to that epoch. A schedule of
    graphc's is replayed from its start: the rates a checkpoint restored are that epoch's
    already, and a chainable schedule stepping from them would apply its factors twice. Rates
    other than those the scheduler set last (a checkpoint's, or set by hand) are kept over the
    replayed ones, so that a change made to the schedule before the checkpoint carries on."""
    if not isinstance(scheduler, LRScheduler):
        while scheduler.last_epoch < epoch:
            scheduler.step()
        return
    groups = scheduler.optimizer.param_groups
    held = [group["lr"] for group in groups]
    changed = held != scheduler.get_last_lr()
    scheduler.replay_to(epoch)
    if changed:
        for group, rate in zip(groups, held):
            group["lr"] = rate


def _empty_epoch_message(train_loader: Iterable, epoch: int) -> str:
    message = f"fit: train_loader (a {type(train_loader).__name__}) gave no batch in epoch {epoch}"
    if isinstance(train_loader, Iterator):
        return (f"{message}: an iterator is used up after one pass; pass a DataLoader or a list to "
                "train for several epochs")
    if isinstance(train_loader, DataLoader) and train_loader.drop_last:
        return (f"{message}: with drop_last=True, its {len(train_loader.dataset)} samples make no "
                f"full batch of {train_loader.batch_size}")
    return f"{message}: it is empty"


def _announce(epoch: int, logs: dict[str, float], writer: Any,
              on_epoch_end: Callable[[int, dict[str, float]], None] | None,
              checkpoint_path: str | None, step: TrainStep | LoadedTrainStep) -> None:
    """The end of an epoch, told once: TensorBoard, the user's callback, the checkpoint."""
    if writer is not None:
        for key, value in logs.items():
            if key != "epoch":
                writer.add_scalar(f"epoch/{key}", value, epoch)
    if on_epoch_end is not None:
        on_epoch_end(epoch, logs)
    if checkpoint_path is not None:
        save_checkpoint(checkpoint_path, step)


def _require_batch(batch: Any) -> None:
    """A training batch is (inputs..., target), as a DataLoader yields it."""
    if not isinstance(batch, (tuple, list)) or not batch:
        keys = f" with keys {list(batch)[:5]}" if isinstance(batch, dict) else ""
        raise GraphcError(f"fit: each batch must be a tuple (inputs..., target), as a DataLoader "
                          f"yields; got a {type(batch).__name__}{keys}: yield the arrays in the "
                          f"order the step takes them")


def checked_step(step: TrainStep | LoadedTrainStep, batch: Sequence[Any], check_numerics: bool,
                 when: str, call: Callable[[], float] | None = None) -> float:
    """`step` on `batch` (through `call` where given), raising a GraphcError where its loss is not
    finite; with `check_numerics`, also where the state it leaves is not (a NaN the backward
    pass or the update made alone), then with the op and line that made it, the state put back
    as it was before the call. `when` says where in training it happened."""
    before = copy.deepcopy(training_state(step)) if check_numerics else None
    loss = call() if call is not None else step(*batch)
    if not math.isfinite(loss):
        raise GraphcError(f"training loss became {loss} {when}" + _numerics_report(step, batch, before))
    broken = _nonfinite_state(step) if before is not None else None
    if broken is not None:
        raise GraphcError(f"training state {broken!r} became non-finite {when} (the loss, {loss}, "
                          "was finite)" + _numerics_report(step, batch, before))
    return loss


def _nonfinite_state(step: TrainStep) -> str | None:
    """The name of the first float array of `step`'s training state holding a NaN or an
    infinity, or None."""
    for name, array in training_state(step).items():
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            return name
    return None


def _numerics_report(step: TrainStep | LoadedTrainStep, batch: Any,
                     before: dict[str, np.ndarray] | None) -> str:
    cannot_rerun = "a step loaded from a file cannot rerun the batch to find the op that produced it"
    if before is None:
        return (f"; {cannot_rerun}" if isinstance(step, LoadedTrainStep) else
                "; rerun with fit(..., check_numerics=True) or GRAPHC_CHECK_NUMERICS=1 to find the "
                "op that produced it")
    own = training_state(step)
    for name, array in before.items():  # back to the state the failing step started from
        np.copyto(own[name], array)  # (a loaded step's generator key among them)
    if isinstance(step, LoadedTrainStep):
        return f"; its state was put back as it was before the call; {cannot_rerun}"
    step.set_rng_state(before["rng"])  # and the generator: the rerun draws the step's masks
    report = step.check_numerics(*batch)
    return f": {report or 'the rerun on the reference backend stayed finite'}"


def tensorboard_writer(log_dir: str | None) -> Any:
    """A tensorboardX SummaryWriter logging to `log_dir`; None when `log_dir` is None."""
    if log_dir is None:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise GraphcError("log_dir needs tensorboardX: pip install 'graphc[monitor]'") from None
    # tensorboardX names its file by the second and the host: a second run starting within the
    # same second in the same folder would write over the first's
    return SummaryWriter(log_dir, filename_suffix=f".{os.getpid()}.{time.time_ns()}")
