"""Building training-step graphs: one builder for every kind of step.

A training step is forward, loss, gradients and the optimizer update. The single-process step
(`compile_train_step`) builds all of it as one graph; the data-parallel step builds it as two
graphs split at the gradients (an allreduce runs between them). Both build through the pieces
here, so inputs, roles, donations and output names are the same wherever a step is split:

    gradients = trace_gradients(spec, batch, stages)    # forward traced once, differentiated
    with StepBuilder(spec, name) as b:
        data, params, buffers = b.batch(batch), b.params(), b.buffers()
        opt_state, step = b.optimizer_state(), b.step_count()
        loss, new_buffers, grads = b.splice(gradients, data, params, buffers)
        b.output("loss", loss)
        b.update(params, grads, opt_state, step, new_buffers)   # donated to their inputs
    graph, donate, reads = b.graph, b.donate, b.reads

The differentiated forward is spliced into the step's trace (its nodes copied, its implicit
module inputs and random streams remapped), never traced again. The order of the calls is
the order of the inputs: a step's callers pass the batch, then the step's own state, then
the implicit inputs the splice adds (other modules' arrays), the learning rates (`update`
adds them) and the RNG key, which stays last.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from graphc.ir import Graph, TensorType
from graphc.ir.errors import GraphcError, InputError
from graphc.passes import Stages, autodiff

from .api import inline_graph, to_array
from .nn.module import Module, bound, recording_buffer_updates
from .optim import Optimizer, clip_by_global_norm, l1_penalty
from .tensor import ModuleReads, Trace, Tensor, tracing


def rate_input_names(groups: int) -> list[str]:
    """The names of a step's learning-rate inputs, one per parameter group."""
    return ["lr"] if groups == 1 else [f"lr.{i}" for i in range(groups)]


def batch_arrays(batch: Sequence[Any]) -> list[np.ndarray]:
    """A step's batch (inputs..., targets...) as arrays, each named in errors by its position.
    A tuple or list of arrays is refused, not stacked into one: it is a structure, as an LSTM's
    state pair (h0, c0), which compiled models and steps do not take."""
    for i, x in enumerate(batch):
        if _holds_arrays(x):
            raise InputError(f"input {i} is a {type(x).__name__} holding arrays: a compiled model "
                             "or training step takes one array per argument; pass them as "
                             "separate arguments (a wrapper module's forward(x, h0, c0) can call "
                             "lstm(x, (h0, c0))), np.stack them into one, or use gc.jit, which "
                             "takes nested arguments")
    return [to_array(x, f"input {i}") for i, x in enumerate(batch)]


def _holds_arrays(value: Any) -> bool:
    """Whether `value` is a tuple or list holding arrays (NumPy's, torch tensors) at any depth."""
    return isinstance(value, (tuple, list)) and any(
        _holds_arrays(e) or (hasattr(e, "__array__") and not isinstance(e, np.generic)) for e in value)


@dataclass
class StepSpec:
    """What a training step trains and how: the model's parameters and buffers (state-dict
    names), the `trainable` ones the optimizer holds, and the loss, whose last `targets`
    arguments come from the batch. `opt_state` is the optimizer's state per trainable
    parameter (slot name -> array)."""

    name: str
    model: Module
    loss_fn: Callable[..., Tensor]
    optimizer: Optimizer
    params: dict[str, np.ndarray]
    buffers: dict[str, np.ndarray]
    trainable: list[str]
    opt_state: dict[str, dict[str, np.ndarray]]
    targets: int = 1
    clip_grad_norm: float | None = None
    l1: float = 0.0


@dataclass
class Gradients:
    """The differentiated forward of a step: inputs (batch..., params..., buffers...) and
    module-state `reads`; outputs loss, the new buffer values (`buffer_names`), then the
    gradient of each trainable parameter."""

    graph: Graph
    reads: ModuleReads
    buffer_names: list[str]


def trace_loss(spec: StepSpec, batch: Sequence[np.ndarray]) -> tuple[Graph, ModuleReads]:
    """The loss (and new buffer values) as a function of batch, parameters and buffers, in the
    modules' present modes; other modules the loss reaches become read-only implicit inputs."""
    with StepBuilder(spec, f"{spec.name}_forward") as b:
        data, params, buffers = b.batch(batch), b.params(), b.buffers()
        state = {**params, **buffers}
        # The loss reads the model as these inputs too: a penalty over its weights (through
        # attributes or model.parameters()) is differentiated like the forward. It may call the
        # model again (a consistency term): that call reads the running statistics the first
        # wrote and updates them again, as in PyTorch.
        with bound(spec.model, state), recording_buffer_updates(spec.model) as updates:
            out = spec.model(*data[:-spec.targets])
            loss = spec.loss_fn(out, *data[-spec.targets:])
        if not isinstance(loss, Tensor) or loss.shape != ():
            raise GraphcError(f"{spec.name}: loss_fn must return a scalar tensor, got {loss!r}")
        if spec.l1:
            loss = loss + l1_penalty([params[n] for n in spec.trainable], spec.l1)
        b.output("loss", loss)
        for name, value in updates.items():
            b.output(f"buffer:{name}", value)
    return b.graph, b.reads


def trace_gradients(spec: StepSpec, batch: Sequence[np.ndarray], stages: Stages) -> Gradients:
    """Trace the forward once and differentiate it for the trainable parameters; both graphs
    are recorded in `stages` ("trace", "autodiff")."""
    forward, reads = trace_loss(spec, batch)
    stages.record("trace", forward)
    first_param = len(batch)
    index = {n: first_param + i for i, n in enumerate(spec.params)}
    graph = autodiff(forward, wrt=[index[n] for n in spec.trainable], output="loss")
    stages.record("autodiff", graph)
    return Gradients(graph, reads, [name.split(":", 1)[1] for name, _ in forward.outputs[1:]])


def unread_gradient(grad: Tensor) -> bool:
    """Whether `grad` is the zeros autodiff gives a parameter the loss does not read (PyTorch
    leaves its .grad None, and its optimizers skip it)."""
    node = grad.value.producer
    if node is not None and node.op == "broadcast_to":
        node = node.inputs[0].producer
    return node is not None and node.op == "constant" and not np.any(node.attrs["value"])


class StepBuilder:
    """One graph of a training step under construction (a context manager: the trace lives
    inside the block). Inputs are added with their roles; `output(..., donor=)` records which
    input's buffer an output overwrites (`donate`, input index -> output index)."""

    def __init__(self, spec: StepSpec, name: str) -> None:
        self.spec, self.name = spec, name
        self.donate: dict[int, int] = {}
        self._trace: Trace | None = None
        self._tracing = tracing(name)

    def __enter__(self) -> StepBuilder:
        self._trace = self._tracing.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._tracing.__exit__(*exc)

    @property
    def graph(self) -> Graph:
        return self._trace.builder.graph

    @property
    def reads(self) -> ModuleReads:
        """The module state and modes the graph read besides the step's own inputs."""
        return self._trace.module_reads()

    # -- inputs ------------------------------------------------------------------------------
    def input(self, type: TensorType, name: str, role: str = "data") -> Tensor:
        """A new input, before the RNG key (which callers pass last) when there is one."""
        value = self._trace.builder.add_input(type, name, role)
        inputs = self.graph.inputs
        if self._trace.rng_key is not None and inputs[-2].value is self._trace.rng_key:
            inputs[-2], inputs[-1] = inputs[-1], inputs[-2]
        return Tensor(value)

    def arrays(self, arrays: dict[str, np.ndarray], role: str) -> dict[str, Tensor]:
        """One input per array, named by its key."""
        return {name: self.input(TensorType.of(a), name, role) for name, a in arrays.items()}

    def batch(self, batch: Sequence[np.ndarray]) -> list[Tensor]:
        return [self.input(TensorType.of(a), f"input{i}") for i, a in enumerate(batch)]

    def params(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        """The model's parameters (all, or those `names`), role "param"."""
        params = self.spec.params
        return self.arrays({n: params[n] for n in (params if names is None else names)}, "param")

    def buffers(self, names: Sequence[str] | None = None) -> dict[str, Tensor]:
        buffers = self.spec.buffers
        return self.arrays({n: buffers[n] for n in (buffers if names is None else names)}, "state")

    def optimizer_state(self) -> dict[str, dict[str, Tensor]]:
        """The optimizer's slots per trainable parameter, inputs named "<param>.<slot>"."""
        return {n: {slot: self.input(TensorType.of(a), f"{n}.{slot}", "state")
                    for slot, a in slots.items()}
                for n, slots in self.spec.opt_state.items()}

    def step_count(self) -> Tensor:
        return self.input(TensorType((), "float32"), "step", "state")

    def learning_rates(self) -> list[Tensor]:
        """One rate per parameter group, inputs (the last before the RNG key), so schedules
        never recompile: "lr" for a single group, "lr.0", "lr.1"... for several."""
        optimizer = self.spec.optimizer
        n = len(optimizer.param_groups)
        rate = TensorType((), optimizer.lr_dtype.name)
        return [self.input(rate, name) for name in rate_input_names(n)]

    # -- computation -------------------------------------------------------------------------
    def splice(self, gradients: Gradients, data: list[Tensor], params: dict[str, Tensor],
               buffers: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Copy the differentiated forward into this graph; returns the loss, the new buffer
        values and the trainable parameters' gradients."""
        outs = inline_graph(gradients.graph, [*data, *params.values(), *buffers.values()],
                            gradients.reads)
        n_buffers = len(gradients.buffer_names)
        new_buffers = dict(zip(gradients.buffer_names, outs[1:1 + n_buffers]))
        return outs[0], new_buffers, dict(zip(self.spec.trainable, outs[1 + n_buffers:]))

    def update(self, params: dict[str, Tensor], grads: dict[str, Tensor],
               opt_state: dict[str, dict[str, Tensor]], step: Tensor,
               new_buffers: dict[str, Tensor], unused: frozenset[str] | None = None) -> None:
        """Clip the gradients (when asked), apply the optimizer's rule with the learning rates
        (new inputs, one per parameter group) and output every updated state, each donated to
        its input: parameters with their optimizer slots, then `new_buffers`, the step count and
        the RNG key. `unused`: the parameters the loss does not read, which keep their values
        (by default those whose gradient is autodiff's zeros)."""
        spec = self.spec
        lrs = self.learning_rates()
        if unused is None:
            unused = frozenset(n for n in spec.trainable if unread_gradient(grads[n]))
        self.unused = unused
        if spec.clip_grad_norm is not None:
            grads = clip_by_global_norm(grads, spec.clip_grad_norm)
        new_step = step + 1
        new_params, new_state = spec.optimizer.update(
            {n: params[n] for n in spec.trainable}, grads, opt_state, lrs, new_step, unused)
        for n in spec.trainable:
            self.output(f"param:{n}", new_params[n], donor=n)
            for slot, value in new_state[n].items():
                self.output(f"state:{n}.{slot}", value, donor=f"{n}.{slot}")
        for name, value in new_buffers.items():
            self.output(f"buffer:{name}", value, donor=name)
        self.output("step", new_step, donor="step")
        if self._trace.rng_key is not None:  # random numbers drawn: the next step draws others
            self.output("rng", Tensor(self._trace.rng_key) + np.array([0, 1], np.int64), donor="rng")

    # -- outputs -----------------------------------------------------------------------------
    def output(self, name: str, value: Tensor, donor: str | None = None) -> None:
        """Add an output; with `donor`, it is written into that input's buffer (and has its
        dtype: a buffer's update may come out wider than the buffer)."""
        if donor is not None:
            index = [inp.name for inp in self.graph.inputs].index(donor)
            dtype = self.graph.inputs[index].value.type.dtype
            if value.dtype != dtype:
                value = value.astype(dtype)
            self.donate[index] = len(self.graph.outputs)
        self._trace.builder.add_output(name, value.value)
