"""Whole-model compilation: `compile_train_step` (forward + backward + optimizer update as ONE
graph) and `compile` (inference).

Parameters, optimizer state, buffers, the step count and the RNG key are inputs *donated* to
their updated outputs, so the backend updates them in place: after `step(x, y)`,
`model.state_dict()` already holds the new weights. The learning rate is an input, so schedules
never recompile. A batch of a new shape compiles once more and says so.

The loss function runs with the model bound: its weights read there (a penalty over
`model.parameters()`) are the step's parameters, differentiated and trained. Modules the loss
reaches besides the model (a target network, a frozen teacher, a GAN's other half) are read-only
inputs, read from them at each step: never trained, donated or baked in.
Each graph runs the train/eval modes its modules had when it was compiled; a mode switched
since compiles once more (and says so), as does a new batch shape.

On numba-cuda that state stays on the GPU between steps (the executable keeps it resident):
the step claims the model (nn.module.claim_state), and whatever hands out the model's arrays
or the step's `opt_state` and `step_count` first copies the newest values back and
lets the next step upload what may since have been written.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from graphc.backends import DeviceResident, Executable, PlannedExecutable, default_backend
from graphc.ir import Graph, TensorType
from graphc.ir.memory import MemoryPlan
from graphc.ir.errors import GraphcError, user_location
from graphc.passes import SIMPLIFY, Stages
from graphc.passes.rebatch import match_extents, rebatch

from . import random as gc_random
from .api import inline_graph, user_facing
from .lowering import collecting_new_objects_only, compile_graph
from .nn.module import (Module, call_bound, claim_state, named_arrays, named_state_refs,
                        release_state_holders, state_arrays, sync_state_holders, traced_state,
                        unclaim_state)
from .optim import Optimizer
from .scan_lowering import SegmentedExecutable, SegmentedMemoryPlan
from .step_builder import StepBuilder, StepSpec, batch_arrays, trace_gradients
from .tensor import (ModuleReads, Tensor, as_tensor, current_trace, edited_in_place, is_tracing,
                     keep_recent_variants, matching_variant, module_structure, module_tree_edits,
                     tracing, variant_key)
from .tree import LEAF, flatten, unflatten

log = logging.getLogger("graphc")


class CompiledGraph:
    """What one input signature compiles to: graphs at each stage and the executable.

    `reads` are the parameters and buffers of modules outside the compiled model's own state
    that the graph reads (read-only implicit inputs, e.g. a target network in the loss) and
    the modes of the modules it called: the graph serves while they are as when traced.
    """

    def __init__(self, traced: Graph, optimized: Graph | None, executable: Executable,
                 donate: dict[int, int], signature: tuple = (), reads: ModuleReads = ModuleReads()) -> None:
        self.traced, self._optimized, self.executable = traced, optimized, executable
        # Asked once here (a protocol check costs tens of microseconds): the step asks often.
        self.device_resident = isinstance(executable, DeviceResident)
        self.donate = donate
        self.signature, self.reads = signature, reads
        self.persistent: list[np.ndarray] = []  # arrays the step reads after the batch
        self.calls = 0  # how often the user's calls ran it: an export takes the one run most
        implicit = set(reads.names)
        self.implicit_inputs = frozenset(i for i, inp in enumerate(traced.inputs)
                                         if inp.name in implicit)

    @property
    def optimized(self) -> Graph:
        """The traced graph simplified; its inputs are the traced graph's. A compilation that
        took its fused graph from another batch size's (passes/rebatch.py) simplifies only when
        asked (for a dump, an export, the reference interpreter)."""
        if self._optimized is None:
            self._optimized = SIMPLIFY(self.traced)
        return self._optimized


class _CompiledModelBase:
    backend: str
    # Whether calls at different batch sizes may take turns, their executables sharing memory:
    # a fresh arena or scan stack of tens of MiB is paged in by its first call. A compiled model
    # keeps memory of its own per size (a server may run several sizes at once).
    sizes_take_turns = False
    _compiled: dict[tuple, CompiledGraph]
    _last: CompiledGraph | None = None
    name: str

    def _signature(self, arrays: list[np.ndarray]) -> tuple:
        # in native byte order: a big-endian float32 batch is converted, not compiled for anew
        return tuple((a.shape, a.dtype.newbyteorder("=")) for a in arrays)

    def __reduce_ex__(self, protocol: Any) -> Any:  # copy, deepcopy and pickle
        raise GraphcError(f"{self.name}: a compiled model or training step cannot be copied or "
                          "pickled (it holds compiled code and memory): copy.deepcopy the model and "
                          "compile the copy; to keep it, export it (.export(path)) or save a checkpoint")

    # -- the model's module tree: a layer replaced since compiling runs other code -----------
    def _note_module_tree(self) -> None:
        self._tree = self._module_tree()
        self._tree_seen = module_tree_edits()
        # modules holding a list or dict setting, which changes without an assignment: their
        # structures are compared at every call
        self._volatile = [(m, module_structure(m)) for m in self.model.modules()
                          if any(edited_in_place(value) for _, value in module_structure(m)[1])]

    def _module_tree(self) -> tuple:
        return tuple((id(m), module_structure(m)) for m in self.model.modules())

    def _module_tree_changed(self) -> bool:
        """Whether a module of the model got other children or settings since
        `_note_module_tree`."""
        if any(module_structure(m) != structure for m, structure in self._volatile):
            return True
        if module_tree_edits() == self._tree_seen:
            return False
        if self._module_tree() != self._tree:
            return True
        self._tree_seen = module_tree_edits()
        return False

    def _get(self, arrays: list[np.ndarray]) -> CompiledGraph:
        return self._select(arrays)[0]

    def _select(self, arrays: list[np.ndarray]) -> tuple[CompiledGraph, list[np.ndarray]]:
        """The compiled graph for this batch and the modules' modes and arrays now (compiling
        it if there is none), with the arrays of its implicit inputs."""
        signature = self._signature(arrays)
        last = self._last
        found, implicit = matching_variant(last, self._compiled, signature)
        if found is not None:
            self._last = found
            return found, implicit
        if last is not None:
            self._log_recompile(last, signature)
        stages = Stages(self.name)
        with collecting_new_objects_only():
            traced, donate, reads = self._trace(arrays, stages)
            # what the trace wrote into the modules (a forward's own counter) is their state now
            self._note_module_tree()
            compiled = self._rebatched(traced, donate, signature, reads, stages)
            if compiled is None:
                optimized = stages.run(traced, [SIMPLIFY])
                executable = compile_graph(optimized, self.backend, donate, stages, self._memory_of(last))
                compiled = CompiledGraph(traced, optimized, executable, donate, signature, reads)
        self._compiled[variant_key(signature, reads)] = self._last = compiled
        busiest = max(self._compiled.values(), key=lambda c: c.calls)  # what an export writes
        keep_recent_variants(self._compiled, keep=(compiled, busiest))
        return compiled, reads.arrays()

    @contextmanager
    def main_signature(self) -> Iterator[None]:
        """Within it, the compiled graph of the batch signature that ran most often, for the
        modules as they are now (what an export writes: the batch a step trains at, not an
        epoch's short last batch); afterwards the most recent one again. Between signatures run
        as often (a dataset of one full and one short batch), the one with the most elements
        (the full batch), then the most recent."""
        last = self._last
        mode = next((key[1:] for key, compiled in self._compiled.items() if compiled is last), None)
        runs = [compiled for key, compiled in self._compiled.items() if key[1:] == mode]
        if runs:
            self._last = max(runs, key=lambda compiled: (
                compiled.calls, sum(math.prod(shape) for shape, _ in compiled.signature),
                compiled is last))
        try:
            yield
        finally:
            self._last = last

    def _rebatched(self, traced: Graph, donate: dict[int, int], signature: tuple,
                   reads: ModuleReads, stages: Stages) -> CompiledGraph | None:
        """`traced` compiled from an earlier compilation of the same program at another batch
        size (passes/rebatch.py proves it is one): that one's fused graph renamed, so simplify
        and fusion do not run again; the kernels' sources and the memory plan are made for the
        new sizes, and the kernels, which take extents as arguments, are the ones already
        compiled. None when no earlier compilation matches."""
        for earlier in dict.fromkeys([self._last, *self._compiled.values()]):  # the last first
            if earlier is None or earlier.donate != donate:
                continue
            match = match_extents(earlier.traced, traced)
            if match is None:
                continue
            executable = earlier.executable
            planned = isinstance(executable, PlannedExecutable)  # else it runs the optimized graph
            graph = rebatch(executable.graph if planned else earlier.optimized, match)
            if graph is None:
                continue
            log.info("graphc: %s reuses the graphs compiled for %s", self.name,
                     ", ".join(str(TensorType(*s)) for s in earlier.signature))
            stages.record("rebatched_fusion" if planned else "rebatched_optimized", graph)
            executable = compile_graph(graph, self.backend, donate, stages, self._memory_of(earlier))
            return CompiledGraph(traced, None if planned else graph, executable, donate, signature, reads)
        return None

    def _memory_of(self, earlier: CompiledGraph | None) -> Executable | None:
        """The executable whose memory a new compilation may share (compile_graph's memory_of),
        where the executables of all batch sizes may take turns."""
        return earlier.executable if earlier is not None and self.sizes_take_turns else None

    def _log_recompile(self, last: CompiledGraph, signature: tuple) -> None:
        if last.signature != signature:
            log.warning("graphc: recompiling %s for a new batch signature: %s -> %s", self.name,
                        ", ".join(str(TensorType(*s)) for s in last.signature),
                        ", ".join(str(TensorType(*s)) for s in signature))
        else:
            log.warning("graphc: recompiling %s: %s", self.name,
                        "; ".join(last.reads.changes(last.reads.arrays())))

    @property
    def _latest(self) -> CompiledGraph:
        """The most recently used compiled graph."""
        return self._last

    @property
    def graph(self) -> Graph:
        """The optimized graph (of the most recent batch signature)."""
        return self._latest.optimized

    @property
    def executable(self) -> Executable:
        return self._latest.executable

    @property
    def donate(self) -> dict[int, int]:
        """Input index -> output index updated in place (most recent signature)."""
        return self._latest.donate

    def state_bindings(self) -> dict[str, str]:
        """Graph input name -> key of the array it reads, for every non-batch input."""
        return {**{name: f"model/{name}" for name in (*self.params, *self.buffers)},
                **{name: f"implicit/{name}" for name in self._latest.reads.names}}

    def implicit_state(self) -> dict[str, np.ndarray]:
        """The arrays of other modules the graph reads (a target network in the loss), by
        state key: an export saves them, so the file runs without those modules."""
        reads = self._latest.reads
        return {f"implicit/{name}": array for name, array in zip(reads.names, reads.arrays())}

    def stage_graph(self, stage: str = "optimized") -> Graph:
        latest = self._latest
        if stage == "traced":
            return latest.traced
        if stage == "optimized":
            return latest.optimized
        if stage == "fused":
            if isinstance(latest.executable, PlannedExecutable):
                return latest.executable.graph
            from graphc.passes.fusion import fuse
            return fuse(latest.optimized)
        raise GraphcError(f"unknown stage {stage!r}; use 'traced', 'optimized' or 'fused'")

    def to_dot(self, path: str | None = None, stage: str = "optimized") -> str:
        """DOT of a stage's graph; written to `path` when given (fused kernels as clusters)."""
        dot = self.stage_graph(stage).to_dot()
        if path is not None:
            with open(path, "w") as f:
                f.write(dot)
        return dot

    def export(self, path: str, max_batch: int | None = None) -> None:
        """Write this compiled step/function to one file that `gc.load` runs without the model;
        an inference function exported with `max_batch` takes any batch of 1 to max_batch
        samples (graphc/export.py says how)."""
        from .export import export
        with getattr(self, "_turn", nullcontext()):  # a step: after a running call
            export(self, path, max_batch)

    @property
    def memory_plan(self) -> MemoryPlan | SegmentedMemoryPlan:
        """The compiled graph's memory plan; a program with scans has one per compiled part and
        loop body (SegmentedMemoryPlan)."""
        if isinstance(self.executable, SegmentedExecutable):
            return self.executable.memory_plan
        if not isinstance(self.executable, PlannedExecutable):
            raise GraphcError(f"backend {self.backend!r} has no memory plan")
        return self.executable.plan


def _is_number(value: Any, above: float | None = None, least: float | None = None) -> bool:
    """Whether `value` is a finite real number (not a bool) > above / >= least."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return False
    return (math.isfinite(value) and (above is None or value > above)
            and (least is None or value >= least))


class TrainStep(_CompiledModelBase):
    """`step(*inputs, target) -> loss`: one call runs one compiled graph that updates the model."""

    sizes_take_turns = True  # each step updates the weights the next one reads

    def __init__(self, model: Module, loss_fn: Callable[..., Tensor], optimizer: Optimizer,
                 example_inputs: Sequence[Any], backend: str | None = None,
                 clip_grad_norm: float | None = None, l1: float = 0.0, targets: int = 1,
                 name: str = "train_step") -> None:
        if targets < 1:
            raise GraphcError(f"{name}: targets={targets}: the loss takes at least one target, "
                              "the last example input")
        if targets >= len(example_inputs):
            raise GraphcError(f"{name}: targets={targets} must leave at least one model input "
                              f"among the {len(example_inputs)} example inputs")
        # A NaN bound made every weight NaN; a negative one, or a negative l1, climbed the loss
        if clip_grad_norm is not None and not (_is_number(clip_grad_norm, above=0.0) or clip_grad_norm == math.inf):
            raise GraphcError(f"{name}: clip_grad_norm must be a number > 0 (the largest "
                              f"gradient norm; inf: no clipping) or None, got {clip_grad_norm!r}")
        if not _is_number(l1, least=0.0):
            raise GraphcError(f"{name}: l1 must be a number >= 0 (the L1 penalty's weight), got {l1!r}")
        self.model, self.loss_fn, self.optimizer, self.targets = model, loss_fn, optimizer, targets
        self._arity = len(example_inputs)
        self.backend = backend or default_backend()
        self.clip_grad_norm, self.l1, self.name = clip_grad_norm, l1, name
        self._bind_model()
        # Hyperparameters but the rates are compiled in: fixed for the life of the step.
        self._optimizer_settings = optimizer.compiled_settings()
        self._step_count = optimizer.step_count
        self._own_counts_seen = optimizer.own_counts_version
        self._rng_key = gc_random.get_state()  # each call's own, from the global generator
        self._holding: DeviceResident | None = None  # the executable keeping the state on its device
        self._compiled: dict[tuple, CompiledGraph] = {}
        # calls from several threads take turns: each updates the weights the next one reads,
        # whatever executables (batch sizes) they run
        self._turn = threading.RLock()
        self._get(batch_arrays(example_inputs))
        self._built = True

    # what the step's graph was traced with: assigned afterwards, it would change nothing
    _COMPILED_IN = frozenset({"model", "loss_fn", "optimizer", "targets", "backend",
                              "clip_grad_norm", "l1", "name"})

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._COMPILED_IN and self.__dict__.get("_built"):
            raise GraphcError(f"{self.__dict__['name']}: {name} is compiled into the training step; "
                              f"assigning it afterwards would change nothing: compile a new step "
                              f"with the new {name} (at {user_location()})")
        object.__setattr__(self, name, value)

    def _module_tree(self) -> tuple:
        # and the arrays: the step holds the ones it trains (a parameter replaced by another
        # array is no longer the model's, nor the optimizer's)
        return tuple((id(m), module_structure(m), tuple(map(id, m._parameters.values())),
                      tuple(map(id, m._buffers.values()))) for m in self.model.modules())

    def _bind_model(self) -> None:
        """The model's parameters and buffers by name, the optimizer's among them (trained)."""
        owned = {id(p): n for n, p in named_arrays(self.model, "_parameters")}
        missing = [i for i, p in enumerate(self.optimizer.params) if id(p) not in owned]
        if missing:
            raise GraphcError(f"{self.name}: optimizer parameters {missing} do not belong to the "
                              "model (build the optimizer from model.parameters(); after "
                              "replacing a layer or a parameter, build a new optimizer and step)")
        self.trainable = [owned[id(p)] for p in self.optimizer.params]
        self.params = dict(named_arrays(self.model, "_parameters"))
        self.buffers = dict(named_arrays(self.model, "_buffers"))
        # the optimizer's own state: a step compiled again with it goes on from there
        self.optimizer.note_absent_parameters()
        self._opt_state = {n: self.optimizer.state_of(self.params[n]) for n in self.trainable}
        self._note_module_tree()

    # -- state (the host arrays; a device may hold newer values) ---------------------------
    @property
    def opt_state(self) -> dict[str, dict[str, np.ndarray]]:
        """Optimizer state arrays by parameter name."""
        self.release_state()
        return self._opt_state

    @property
    def step_count(self) -> np.ndarray:
        """Steps taken (a float32 scalar array)."""
        self.release_state()
        return self._step_count

    @property
    def rng_key(self) -> np.ndarray:
        """The (seed, counter) key the last call's dropout drew with (graphc.random: each call
        takes the global generator's next key)."""
        return self._rng_key

    @property
    def rng_state(self) -> np.ndarray:
        """The key the next call draws with, as a checkpoint keeps it: the global generator's."""
        return gc_random.get_state()

    def set_rng_state(self, key: np.ndarray) -> None:
        """Draw the next call's key from `key` on (a checkpoint being restored)."""
        gc_random.set_state(key)

    def sync_state(self) -> None:
        """Copy the state a device holds into the host arrays."""
        if self._holding is not None:
            self._holding.sync_to_host()

    def release_state(self) -> None:
        """sync_state, and the next step uploads the host arrays (they may have been written)."""
        if self._holding is not None:
            self.sync_state()
            self._holding.invalidate()
            self._holding = None
            unclaim_state(self.model, self)

    def _hold_state(self, compiled: CompiledGraph) -> None:
        """Before `compiled` runs while it does not hold the state: the state comes back from
        wherever it is (this step's executable for another batch signature, another step
        training the model); then `compiled` keeps it on its device, if its backend can."""
        self.release_state()
        if not compiled.device_resident:  # the CPU backends update the host arrays
            release_state_holders(self.model)
            return
        executable = compiled.executable
        # (not the RNG key: each call takes the global generator's next one)
        executable.keep_on_device(i for i, inp in enumerate(compiled.traced.inputs)
                                  if inp.role not in ("data", "rng") and i not in compiled.implicit_inputs)
        claim_state(self.model, self)
        self._holding = executable

    # -- graph construction ----------------------------------------------------------------
    @property
    def spec(self) -> StepSpec:
        """What this step trains and how, for the step builder."""
        return StepSpec(self.name, self.model, self.loss_fn, self.optimizer, self.params,
                        self.buffers, self.trainable, self._opt_state, self.targets,
                        self.clip_grad_norm, self.l1)

    def _trace(self, batch: list[np.ndarray], stages: Stages) -> tuple[Graph, dict[int, int], ModuleReads]:
        """The training step's graph, recorded in `stages` after the traced forward and its
        gradients (autodiff)."""
        spec = self.spec
        gradients = trace_gradients(spec, batch, stages)
        with StepBuilder(spec, self.name) as b:
            data, params, buffers = b.batch(batch), b.params(), b.buffers()
            opt_state, step = b.optimizer_state(), b.step_count()
            loss, new_buffers, grads = b.splice(gradients, data, params, buffers)
            b.output("loss", loss)
            b.update(params, grads, opt_state, step, new_buffers)
        if self._count_steps_apart(b.unused):
            return self._trace(batch, stages)  # reading their own counts
        return stages.record("train_step", b.graph), b.donate, b.reads

    # -- running ---------------------------------------------------------------------------
    def _persistent(self, graph: Graph) -> list[np.ndarray]:
        arrays = {**self.params, **self.buffers, "step": self._step_count,
                  **{f"{n}.{k}": v for n, s in self._opt_state.items() for k, v in s.items()}}
        return [arrays[inp.name] for inp in graph.inputs if inp.name in arrays]

    def check_arity(self, batch: Sequence[Any]) -> None:
        """A batch holds as many arrays as the example inputs did (a different count would trace
        the model with other arguments, failing inside its forward)."""
        if len(batch) != self._arity:
            raise GraphcError(f"{self.name}: takes {self._arity} arrays, the model's inputs then "
                              f"{self.targets} target(s), as its example inputs; got {len(batch)}")

    def _arguments(self, batch: Sequence[Any]) -> tuple[CompiledGraph, list[Any]]:
        arrays = batch_arrays(batch)
        self.check_arity(batch)
        compiled, implicit = self._select(arrays)
        compiled.calls += 1
        if not compiled.persistent:
            compiled.persistent = self._persistent(compiled.traced)
        self.optimizer.check_settings(self._optimizer_settings, self.name)
        args = [*arrays, *compiled.persistent, *implicit, *self.optimizer.learning_rates()]
        if compiled.traced.inputs[-1].role == "rng":
            self._rng_key[...] = gc_random.next_key()
            args.append(self._rng_key.copy())  # the graph counts on in its copy
        return compiled, args

    @user_facing
    def __call__(self, *batch: Any) -> float:
        if is_tracing():
            raise GraphcError(f"{self.name}: a compiled training step updates the model and "
                              "cannot run inside gc.jit, gc.grad or another trace; call it "
                              "outside, or use gc.value_and_grad on the loss")
        with self._turn:
            return numerics_checked(self, batch, self._step)

    def _step(self, batch: Sequence[Any]) -> float:
        self._follow_module_tree()
        self._follow_own_counts()
        compiled, args = self._arguments(batch)  # (a trace and compile Ctrl-C stops at once)
        if compiled.executable is not self._holding:
            self._hold_state(compiled)
        with interrupts_deferred():
            return float(compiled.executable(*args)[0])

    def count_own_steps(self, names: Sequence[str], start: Any = 0) -> None:
        """Give the trained parameters `names` step counts of their own, from `start` (a
        checkpoint holding them: graphc.optim); the step compiles again to read them."""
        self.release_state()
        for name in names:
            self.optimizer.count_own_steps(self.params[name], start)
        self._rebind()

    def _count_steps_apart(self, unused: Iterable[str]) -> bool:
        """Give the trained parameters `unused`, which the loss does not read, step counts of
        their own where their rule reads one and they count the optimizer's: as PyTorch's
        state["step"], a count that goes on only with the parameter's own updates, from the
        updates it had so far. Whether any was given (the step binds them again)."""
        names = [n for n in unused if "step" not in self._opt_state[n]
                 and self.optimizer.keeps_own_steps(self.params[n])]
        if names:
            self.release_state()  # the count a device holds, before it is read
            self.count_own_steps(names, start=self.optimizer.step_count.copy())
        return bool(names)

    def _rebind(self) -> None:
        """Bind the model and the optimizer's state again and forget the compiled graphs (a
        parameter's state gained a slot)."""
        self._bind_model()
        self._compiled, self._last = {}, None
        self._own_counts_seen = self.optimizer.own_counts_version

    def _follow_own_counts(self) -> None:
        """Where a parameter took a step count of its own since compiling (another step with
        this optimizer found it unused), compile again to read it."""
        if self._own_counts_seen != self.optimizer.own_counts_version:
            self.release_state()
            self._rebind()

    def _follow_module_tree(self) -> bool:
        """Where a layer was replaced or a setting changed since compiling, bind the model as it
        is now (refusing a replaced trained layer or parameter) and forget the compiled graphs;
        whether it did."""
        if not self._module_tree_changed():
            return False
        log.warning("graphc: %s: the model's modules or their settings changed since it was "
                    "compiled; compiling it again", self.name)
        self.release_state()
        self._bind_model()
        self._compiled, self._last = {}, None
        return True

    def profile(self, *batch: Any, repeat: int = 10, show: bool = False) -> Any:
        """The time of every kernel of this step on `batch` (a ProfileReport; None where the
        backend times no kernels), over `repeat` runs on copies of the weights and optimizer
        state: profiling does not train, nor draw from the random generator."""
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise GraphcError(f"{self.name}.profile: repeat={repeat!r}: give a number of runs >= 1")
        with self._turn, gc_random.state_kept():
            compiled, args = self._arguments(batch)
            profile = getattr(compiled.executable, "profile", None)
            if profile is None:
                return None
            self.release_state()
            return profile(*args, repeat=repeat, show=show)

    def check_numerics(self, *batch: Any) -> Any:
        """Rerun this step on `batch` through the reference interpreter, without updating
        anything (the random generator included), and report the first op that produces a NaN
        or Inf (None if all finite)."""
        from .debug import find_nonfinite

        release_state_holders(self.model)  # this step too, when it holds the state
        with gc_random.state_kept():
            compiled, args = self._arguments(batch)
        return find_nonfinite(compiled.optimized, args)

    def state_dict(self) -> dict[str, np.ndarray]:
        return state_arrays(self.model)

    def state_bindings(self) -> dict[str, str]:
        bindings = {**super().state_bindings(), "step": "step", "rng": "rng"}
        for name, slots in self._opt_state.items():
            bindings.update({f"{name}.{k}": f"optim/{name}/{k}" for k in slots})
        return bindings


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """A Ctrl-C (SIGINT) during the block raises KeyboardInterrupt as it ends. A training
    step's kernels update the weights and optimizer state one after another: interrupted
    between two of them, some would hold the step's update and others not. (In the main
    thread, where Python's own handler is installed; elsewhere the block runs as it is.)"""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def numerics_checked(step: Any, batch: Sequence[Any], call: Callable[[Sequence[Any]], float]) -> float:
    """`call(batch)`, a training step's call; under GRAPHC_CHECK_NUMERICS, checked as fit checks
    a step (graphc.train.checked_step): a non-finite loss or state raises, naming the op that
    made it, with the state put back as it was."""
    if os.environ.get("GRAPHC_CHECK_NUMERICS", "") in ("", "0"):
        return call(batch)
    from .train import checked_step
    when = f"in {step.name}'s step {int(step.step_count) + 1}"
    return checked_step(step, batch, True, when, lambda: call(batch))


class CompiledModel(_CompiledModelBase):
    """Inference: the model in eval mode (no dropout, running statistics). Its parameters and
    buffers are inputs read from the model at each call, so training, load_state_dict and
    reassigned parameters are seen without recompiling (a new shape or dtype compiles again).
    Called inside gc.jit or gc.grad, it is the model's eval-mode forward, inlined."""

    def __init__(self, model: Module, example_inputs: Sequence[Any], backend: str | None = None,
                 name: str = "inference") -> None:
        self._bind(model, backend, name)
        self._get(batch_arrays(example_inputs))

    def _bind(self, model: Module, backend: str | None, name: str) -> None:
        self.model, self.name = model, name
        self.backend = backend or default_backend()
        # (state-dict name, where it lives): every parameter, then every buffer (the graph's inputs)
        self._state = [ref for table in ("_parameters", "_buffers")
                       for ref in named_state_refs(model, (table,))]
        self._compiled: dict[tuple, CompiledGraph] = {}
        self._last = None
        self._note_module_tree()

    @classmethod
    def tracer(cls, model: Module, name: str = "inference") -> CompiledModel:
        """One that compiles nothing: its `_trace` gives the model's eval-mode forward at any
        input types (a training step's export stores it for `export_inference`)."""
        forward = cls.__new__(cls)
        forward._bind(model, None, name)
        return forward

    @property
    def params(self) -> dict[str, np.ndarray]:
        return dict(zip(self._names("_parameters"), self._arrays("_parameters")))

    @property
    def buffers(self) -> dict[str, np.ndarray]:
        return dict(zip(self._names("_buffers"), self._arrays("_buffers")))

    def _names(self, table: str | None = None) -> list[str]:
        return [name for name, ref in self._state if table in (None, ref.table)]

    def _arrays(self, table: str | None = None, sync: bool = True) -> list[np.ndarray]:
        """The model's arrays now; `sync`: with the newest values a training step on a GPU may
        hold (not needed for their types)."""
        if sync:
            sync_state_holders(self.model)
        arrays = []
        for name, ref in self._state:
            if table in (None, ref.table):
                array = ref.read()
                if array is None:
                    raise GraphcError(f"{self.name}: the model no longer has {name!r}; compile "
                                      "it again")
                arrays.append(array)
        return arrays

    def _signature(self, arrays: list[np.ndarray]) -> tuple:
        return super()._signature([*arrays, *self._arrays(sync=False)])

    def _trace(self, batch: Sequence[np.ndarray | TensorType], stages: Stages
               ) -> tuple[Graph, dict[int, int], ModuleReads]:
        state = dict(zip(self._names(), self._arrays()))
        with tracing(self.name) as t:
            b = t.builder
            data = [Tensor(b.add_input(a if isinstance(a, TensorType) else TensorType.of(a),
                                       _free_name(f"input{i}", state)))
                    for i, a in enumerate(batch)]
            params = {n: Tensor(b.add_input(TensorType.of(state[n]), n, "param"))
                      for n in self._names("_parameters")}
            buffers = {n: Tensor(b.add_input(TensorType.of(state[n]), n, "state"))
                       for n in self._names("_buffers")}
            with _modes_restored(self.model):
                self.model.eval()
                out = call_bound(self.model, {**params, **buffers}, *data)
            # nested outputs, as LSTM's (output, (h_n, c_n)), come back in the same structure
            outs, _, self._output_tree = flatten(out)
            for i, o in enumerate(outs):
                name = "out" if self._output_tree == LEAF else f"out{i}"
                b.add_output(_free_name(name, state), as_tensor(o).value)
        # The model's own modes are set here, not read: only other modules' modes matter.
        return stages.record("trace", t.builder.graph), {}, t.module_reads().excluding(self.model.modules())

    def _inlined(self, inputs: Sequence[Any]) -> Any:
        """The eval-mode forward in the trace in progress, reading the model's arrays there."""
        tensors = [as_tensor(x) for x in inputs]
        stages = Stages(self.name)
        graph, _, reads = self._trace([x.value.type for x in tensors], stages)
        root = current_trace().module_name(self.model)
        state = [traced_state(ref, f"{root}.{name}") for name, ref in self._state]
        outs = inline_graph(stages.run(graph, [SIMPLIFY]), [*tensors, *state], reads)
        return unflatten(self._output_tree, list(outs))

    def follow_module_tree(self) -> None:
        """Where a layer was replaced or a setting changed since compiling, read and trace the
        model as it is now (at the next call or export)."""
        if self._module_tree_changed():
            log.warning("graphc: %s: the model's modules or their settings changed since it was "
                        "compiled; compiling it again", self.name)
            self._bind(self.model, self.backend, self.name)

    @user_facing
    def __call__(self, *inputs: Any) -> Any:
        self.follow_module_tree()
        if is_tracing():
            return self._inlined(inputs)
        arrays = batch_arrays(inputs)
        compiled, implicit = self._select(arrays)
        compiled.calls += 1
        # a forward drawing random numbers in eval mode (F.dropout(training=True): Monte Carlo
        # dropout) draws fresh ones each call, from the global generator as gc.jit does
        key = [gc_random.next_key()] if compiled.traced.inputs[-1].role == "rng" else []
        outs = compiled.executable(*arrays, *self._arrays(), *implicit, *key)
        return unflatten(self._output_tree, list(outs))


def _free_name(name: str, taken: dict[str, Any]) -> str:
    """`name`, or with underscores in front, so that no parameter or buffer has it (a model's
    own parameter may be called `input0`)."""
    while name in taken:
        name = f"_{name}"
    return name


@contextmanager
def _modes_restored(model: Module) -> Iterator[None]:
    """Every module of the tree gets its own train/eval mode back after the block."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            object.__setattr__(m, "training", training)


@user_facing
def finish_compiling() -> None:
    """Wait for the kernels compiling in the background. A large model's first call on numba-cpu
    runs serial kernels while their parallel forms compile in a worker process (its cold start
    is then the serial compile's, a few seconds less); each compiled step and model runs the final
    kernels from the call after they are ready, or, after this, from its next call. Set
    GRAPHC_BACKGROUND_COMPILE=0 to compile every kernel before the first call instead."""
    executor = sys.modules.get("graphc.backends.numba_cpu.executor")
    if executor is not None:  # nothing compiles in the background where no such kernel was made
        executor.finish_compiling()


def compile_train_step(model: Module, loss_fn: Callable[..., Tensor], optimizer: Optimizer,
                       example_inputs: Sequence[Any], backend: str | None = None,
                       clip_grad_norm: float | None = None, l1: float = 0.0,
                       targets: int = 1) -> TrainStep:
    """Compile forward, loss, backward and the optimizer update into one graph.

    `example_inputs` is (model inputs..., targets...), the last `targets` of them being passed
    to `loss_fn(model_output, *targets)`; the others go to the model. Parameters the optimizer
    does not hold stay fixed (inputs, not updated).
    """
    return TrainStep(model, loss_fn, optimizer, example_inputs, backend, clip_grad_norm, l1, targets)


@user_facing
def compile(model: Module, example_inputs: Any, backend: str | None = None) -> CompiledModel:
    """Compile the model's inference (eval mode) for inputs shaped like `example_inputs`.
    Tracing it (here, and at a call with a new input signature) sets the modules to eval mode
    for the time of the trace: another thread calling the same modules meanwhile (a training
    step, gc.jit) would run, or compile, them in eval mode; compile before sharing them."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return CompiledModel(model, inputs, backend)
