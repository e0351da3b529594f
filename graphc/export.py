"""Export compiled training steps and inference functions to one file, and load them back
without the model's code.

The file is a zip holding: `format.json` (format, version, kind), `graph.json` (the optimized
IR) and `graph.traced.json` (the IR as traced, for inspection), `plan.json` (signature,
donation map, fused kernels and memory plan), `state.safetensors` (parameters, buffers,
optimizer state, step count, RNG key; stored uncompressed), `metadata.json` (versions, backend,
creation time, learning rate), the generated kernel sources for reading under `kernels/`, and
`checksums.json` (SHA-256 of every other member, and of every tensor's bytes with its dtype
and shape). Writes are atomic.

An inference export made with `max_batch` is batch-polymorphic: graph.json is the graph at
`max_batch` samples and `buckets/<n>.json` the same function traced at each smaller power of two
(metadata.json lists them). Kernels take extents as arguments, so the buckets share compiled
kernels and only their memory plans differ; the loaded function runs a batch of n samples on the
smallest bucket holding n, padding it with zeros and slicing the outputs (samples must not
interact, as in any eval-mode model; export checks that a sample's outputs at batch 2 are those
it has alone, which a time-major model, whose first axis is time, may fail).

A training step's file also holds its model's eval-mode forward, as gc.compile traces it:
`forward/<n>.json` at the step's batch and at powers of two (plan.json's "forward" entry lists
them and binds their weights to the step's state), so that `LoadedTrainStep.export_inference`
writes the inference export of the model trained so far without the model's code.

Loading treats the file as hostile (see docs/security.md): only a regular file is read; every
member is read within a byte budget (JSON members have fixed caps, the state exactly the bytes
its tensors declare, and it is stored, so a small file cannot inflate into a large one); every
checksum is verified; the graph is rebuilt from the op registry, primitive ops only, and fused
and compiled here: nothing in the file is executed, unpickled or pasted into generated source.
Whatever is wrong raises a LoadError naming the file and the member.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import threading
import time
import warnings
import zipfile
from typing import Any, Sequence

import numpy as np

from graphc.backends import DeviceResident, Executable, PlannedExecutable, default_backend
from graphc.backends.signature import as_input
from graphc.ir import Graph, SerializationError, TensorType
from graphc.ir.errors import GraphcError, IndexOutOfRangeError, InputError, LoadError
from graphc.ir.serialize import checked_text, written_name
from graphc.ir.types import DTYPES
from graphc.passes import SIMPLIFY, Stages

from .bounded_io import ZipMembers, parse_json
from .lowering import compile_graph
from .optim import checked_rates
from .scan_lowering import SegmentedExecutable
from .step_builder import rate_input_names
from .tree import TreeDef, treedef_from_json, treedef_to_json, unflatten

log = logging.getLogger("graphc")

FORMAT = "graphc.export"
VERSION = 2  # 2: state stored uncompressed, per-tensor checksums in checksums.json
_REQUIRED = ("format.json", "graph.json", "plan.json", "state.safetensors", "metadata.json")
_KERNEL_MEMBER = re.compile(r"kernels/[A-Za-z0-9_]{1,200}\.py\Z")
_BUCKET_MEMBER = re.compile(r"buckets/([1-9][0-9]{0,6})\.json\Z")
_FORWARD_MEMBER = re.compile(r"forward/([1-9][0-9]{0,6})\.json\Z")  # a training step's eval forward
_FORWARD_BATCHES_UP_TO = 256  # a step file's forward: each power of two up to this (or its batch)
_MAX_BUCKETS = 24  # powers of two: up to 2^23 samples per batch
_BUCKET_GRAPHS_LIMIT = 64 << 20  # all buckets/*.json together
# Byte caps of the members that are not tensors: generous for any graph a tracer makes (the
# MNIST CNN's graph.json is 26 kB), small beside what a bomb would need; the parsed size is
# bounded by the element count (ir.serialize.MAX_JSON_ITEMS).
_JSON_LIMITS = {"format.json": 4 << 10, "checksums.json": 4 << 20, "metadata.json": 1 << 20,
                "plan.json": 16 << 20, "graph.json": 32 << 20, "graph.traced.json": 32 << 20}
_KERNEL_SOURCE_LIMIT = 4 << 20  # each; all of them together: _KERNEL_SOURCES_LIMIT
_KERNEL_SOURCES_LIMIT = 32 << 20
_SAFETENSORS_HEADER_ALLOWANCE = 64 << 10  # plus _PER_TENSOR_ALLOWANCE per tensor
_PER_TENSOR_ALLOWANCE = 1 << 10
_MAX_TENSOR_BYTES = 1 << 34  # no single tensor of a graph may declare more (16 GiB)
_NP_DTYPES = {name: np.dtype(name) for name in DTYPES}
_HEX_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_digest(array: np.ndarray) -> str:
    """SHA-256 of a tensor's bytes in C order (as safetensors stores them)."""
    return _sha256(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()


def _versions() -> dict[str, str]:
    import llvmlite
    import numba

    import graphc
    return {"graphc": graphc.__version__, "numba": numba.__version__,
            "llvmlite": llvmlite.__version__, "numpy": np.__version__}


def _signature(graph: Graph) -> dict[str, Any]:
    return {"inputs": [{"name": i.name, "role": i.role, "type": str(i.value.type)} for i in graph.inputs],
            "outputs": [{"name": n, "type": str(v.type)} for n, v in graph.outputs]}


def _plan_summary(executable: Executable, fused: Graph) -> dict[str, Any]:
    kernels = [{"name": n.attrs.get("name", n.op), "pattern": n.attrs.get("pattern", ""),
                "ops": [m.op for m in n.subgraph.nodes] if n.subgraph is not None else [n.op]}
               for n in fused.nodes]
    plan = (executable.memory_plan if isinstance(executable, SegmentedExecutable)
            else executable.plan if isinstance(executable, PlannedExecutable) else None)
    memory = plan.to_dict() if plan is not None else None
    return {"kernels": kernels, "memory": memory}


def batch_buckets(max_batch: int) -> list[int]:
    """The batch sizes a batch-polymorphic export holds: powers of two below `max_batch`, and it."""
    return [1 << k for k in range(max_batch.bit_length()) if 1 << k < max_batch] + [max_batch]


def _checked_max_batch(max_batch: Any) -> list[int]:
    """The batch buckets of an export with `max_batch`, which must be a supported int."""
    if type(max_batch) is not int or not 1 <= max_batch <= 1 << (_MAX_BUCKETS - 1):
        raise GraphcError(f"export: max_batch must be an int in [1, {1 << (_MAX_BUCKETS - 1)}], "
                          f"not {max_batch!r}")
    return batch_buckets(max_batch)


def _forward_graphs(forward: Any, data: list[TensorType], sizes: list[int]
                    ) -> tuple[dict[int, Graph], bool]:
    """The eval-mode forward of `forward` (a CompiledModel) traced and simplified at each batch
    size, but not compiled, and whether its samples are computed apart. Every data input and
    output must be batch-major, and, checked at batches 1 and 2, padding a batch must leave
    its first rows as they were (a time-major unidirectional RNN's rows read the earlier rows
    only: it pads, but the rows of two requests batched together would mix)."""
    graphs, state = _traced_forwards(forward, data, sizes)
    try:
        first, second = _mixed_outputs(graphs, state)
    except IndexOutOfRangeError as error:
        raise GraphcError(f"export(max_batch=...): a smaller batch is padded with zeros, and an "
                          f"integer input of 0 indexes nothing in this model ({error}); export "
                          f"without max_batch (the file then serves its own batch size only), or "
                          f"take ids from 0") from None
    if first is not None:
        raise GraphcError(f"export(max_batch=...): the output {first} of a sample depends on "
                          "the other samples of its batch (axis 0): is the first axis time or "
                          "a sequence (a time-major RNN: use batch_first=True)? Padding a "
                          "batch would change the results; export without max_batch (the "
                          "file then serves its own batch size only)")
    return graphs, second is None


def _traced_forwards(forward: Any, data: list[TensorType], sizes: list[int]
                     ) -> tuple[dict[int, Graph], dict[str, np.ndarray]]:
    """`_forward_graphs` unchecked, and the arrays their non-batch inputs read."""
    if any(t.ndim == 0 for t in data) or len({t.shape[0] for t in data}) != 1:
        raise GraphcError(f"export(max_batch=...): every input needs the batch as its first axis; "
                          f"the inputs are {', '.join(map(str, data))}")
    graphs, implicit = {}, {}
    for size in sizes:
        types = [TensorType((size, *t.shape[1:]), t.dtype) for t in data]
        stages = Stages(forward.name)
        traced, _, reads = forward._trace(types, stages)
        graphs[size] = stages.run(traced, [SIMPLIFY])
        implicit.update(zip(reads.names, reads.arrays()))
        unbatched = [f"{n}: {v.type}" for n, v in graphs[size].outputs
                     if v.type.ndim == 0 or v.type.shape[0] != size]
        if unbatched:
            raise GraphcError(f"export(max_batch=...): at batch {size} the output {unbatched[0]} "
                              "does not have the batch as its first axis, so batches cannot be "
                              "padded and split")
    return graphs, {**dict(zip(forward._names(), forward._arrays())), **implicit}


def _rows_apart(compiled: Any) -> bool | None:
    """Whether a fixed-batch inference function computes its samples apart, so that a server
    may pad a smaller batch to its size with zeros (False too where a row of zeros is no valid
    input: ids from 1); None where that cannot be told (no batch axis, random draws, a forward
    that traces at its own batch only)."""
    data = [inp.value.type for inp in compiled.graph.inputs if inp.role == "data"]
    try:
        graphs, state = _traced_forwards(compiled, data, [1, 2])
        if any(inp.role == "rng" for inp in graphs[2].inputs):
            return None
        return _mixed_outputs(graphs, state) == (None, None)
    except IndexOutOfRangeError:  # integer inputs of 0 index nothing: no padding row is valid
        return False
    except GraphcError:
        return None


def _mixed_outputs(graphs: dict[int, Graph], state: dict[str, np.ndarray]
                   ) -> tuple[str | None, str | None]:
    """For the first and the second row of a batch, the first output of that sample that
    depends on the other sample of its batch, checked where `graphs` hold batches 1 and 2
    (None and None otherwise, and for each row computed alone).

    Run on the reference interpreter, each row of a batch of two is compared with that row
    alone. The first row decides whether a batch may be padded (padding after it keeps it);
    both decide whether two requests may be batched together (not so where the first axis is
    time, as for a time-major RNN: padding a bidirectional one in time changed every output,
    and a unidirectional one's second row reads the first). Integer and bool inputs (ids,
    masks) are 0 in the first row and 1 in the second, or 0 in both where 1 is out of range for
    what they index; a forward drawing random numbers is not checked (its draws depend on the
    batch's shape)."""
    from graphc.ir.interpret import evaluate

    one, two = graphs.get(1), graphs.get(2)
    if one is None or two is None or any(inp.role == "rng" for inp in two.inputs):
        return None, None
    rng = np.random.default_rng(0)
    data = [inp.value.type for inp in two.inputs if inp.role == "data"]
    mixed = [rng.standard_normal((2, *t.shape[1:])).astype(t.np_dtype) if t.dtype.startswith("float")
             else np.stack([np.zeros(t.shape[1:], t.np_dtype), np.ones(t.shape[1:], t.np_dtype)])
             for t in data]

    def run(graph: Graph, rows: list[np.ndarray], picked: slice) -> list[np.ndarray]:
        arrays = iter(rows)
        return evaluate(graph, [next(arrays)[picked] if inp.role == "data" else state[inp.name]
                                for inp in graph.inputs])
    try:
        paired = run(two, mixed, slice(0, 2))
    except IndexOutOfRangeError:  # an id of 1 indexes nothing: ids equal in both rows
        mixed = [rows if t.dtype.startswith("float") else np.zeros_like(rows) for t, rows in zip(data, mixed)]
        paired = run(two, mixed, slice(0, 2))  # an id of 0 indexing nothing (ids from 1) raises: the callers say

    def first_mixed(row: int) -> str | None:
        alone = run(one, mixed, slice(row, row + 1))
        return next((name for (name, _), single, both in zip(one.outputs, alone, paired)
                     if not np.allclose(single, both[row:row + 1], rtol=1e-4, atol=1e-5,
                                        equal_nan=True)), None)
    return first_mixed(0), first_mixed(1)


def _bucket_graphs(compiled: Any, max_batch: int) -> tuple[dict[int, Graph], bool]:
    """The inference function at each batch bucket (the caller compiles the largest, whose
    kernels serve them all), and whether its rows are computed apart."""
    from .compile import CompiledModel

    if not isinstance(compiled, CompiledModel):
        raise GraphcError("export(max_batch=...) is for inference functions (gc.compile); a "
                          "training step's batch is fixed by its optimizer update")
    sizes = _checked_max_batch(max_batch)
    data = [inp.value.type for inp in compiled.graph.inputs if inp.role == "data"]
    return _forward_graphs(compiled, data, sizes)


def _step_forward(step: Any) -> tuple[dict[str, Any], dict[int, Graph], dict[str, np.ndarray]]:
    """A training step's model in eval mode, as `gc.compile(step.model, x)` traces it, for
    `export_inference`: plan.json's "forward" entry (the step's batch, the batches stored, the
    state each non-batch input reads), the graph at each of those batches, and the arrays of
    other modules it reads. Stored at the step's batch and, where the model is batch-major, at
    each power of two up to the larger of it and _FORWARD_BATCHES_UP_TO: a file cannot be
    traced again without the model's code."""
    from .compile import CompiledModel

    data = [inp.value.type for inp in step.graph.inputs
            if inp.role == "data" and not _is_rate(inp.name)]
    model_inputs = data[:len(data) - step.targets]
    tracer = CompiledModel.tracer(step.model)
    stages = Stages(tracer.name)
    # The step's own file comes first: a model whose eval forward cannot be stored still
    # exports its training step, and export_inference says to export it again.
    why = None
    if not model_inputs or model_inputs[0].ndim == 0:
        why = "its first input has no batch axis"
    else:
        try:
            traced, _, reads = tracer._trace(model_inputs, stages)
        except GraphcError as exc:
            why = f"it does not trace ({exc})"
    if why is None and any(inp.role == "rng" for inp in traced.inputs):
        why = "it draws random numbers in eval mode"
    if why is not None:
        log.warning("graphc: %s: the model's eval-mode forward is not stored, so the file "
                    "cannot export_inference: %s", step.name, why)
        return {}, {}, {}
    batch = model_inputs[0].shape[0]
    graphs = {batch: stages.run(traced, [SIMPLIFY])}
    largest = max(batch, _FORWARD_BATCHES_UP_TO)
    powers = [1 << k for k in range(largest.bit_length()) if 1 << k <= largest and 1 << k != batch]
    apart = False
    try:
        padded, apart = _forward_graphs(tracer, model_inputs, powers)
        graphs.update(padded)
    except GraphcError as exc:  # the forward serves the step's batch alone
        log.warning("graphc: %s: the model's eval-mode forward is stored at the step's batch %d "
                    "only, so export_inference takes no other max_batch: %s", step.name, batch, exc)
    bindings = {**{name: f"model/{name}" for name in tracer._names()},
                **{name: f"implicit/{name}" for name in reads.names}}
    bindings = {inp.name: bindings[inp.name] for inp in graphs[batch].inputs if inp.role != "data"}
    implicit = {f"implicit/{name}": array for name, array in zip(reads.names, reads.arrays())}
    entry = {"batch": batch, "batches": sorted(graphs), "bindings": bindings,
             "rows_apart": apart, **_outputs_entry(tracer._output_tree)}
    return entry, graphs, implicit


def _outputs_entry(tree: TreeDef) -> dict[str, Any]:
    """{"outputs": the nesting of a model's outputs} for a file, where JSON can hold it; a
    loaded function returns its outputs nested so ((output, (h_n, c_n)) of an LSTM)."""
    stored = treedef_to_json(tree)
    if stored is None and tree.kind != "none":
        warnings.warn("export: the outputs' nesting holds a dict key that is not a string, which "
                      "the file's JSON cannot keep: the loaded function returns the outputs as a "
                      "flat tuple (in the order of the sorted keys); use string keys to keep "
                      "the nesting", stacklevel=3)
    return {} if stored is None else {"outputs": stored}


def export(compiled: Any, path: str, max_batch: int | None = None) -> None:
    """Write a TrainStep or CompiledModel to `path`, at the batch signature it ran most often
    (a step trained by `fit` on a dataset of 100 in batches of 32 is written for 32, not for the
    last 4); with `max_batch`, an inference function for any batch of 1 to max_batch samples
    (the module docstring says how). A training step's file also holds its model's eval-mode
    forward, for `LoadedTrainStep.export_inference`. The object goes on with the signature it
    ran last."""
    with compiled.main_signature():
        _export(compiled, path, max_batch)


def _export(compiled: Any, path: str, max_batch: int | None) -> None:
    from .compile import TrainStep
    from .nn.module import named_state_refs
    from .train import atomic_write, training_state

    if not isinstance(compiled, TrainStep) and any(inp.role == "rng" for inp in compiled.graph.inputs):
        raise GraphcError(f"{compiled.name}: the model draws random numbers in eval mode (such as "
                          "F.dropout(x, training=True)); an exported inference function keeps no "
                          "random generator, so it cannot be exported: draw them only in training")
    buckets: dict[int, Graph] = {}
    if max_batch is not None:
        buckets, apart = _bucket_graphs(compiled, max_batch)
        data = [inp.value.type for inp in compiled.graph.inputs if inp.role == "data"]
        compiled._last = None  # compiled for the file: no "recompiling" warning for the user
        compiled._get([np.zeros((max_batch, *t.shape[1:]), t.np_dtype) for t in data])
    graph = compiled.graph
    forward: dict[str, Any] = {}
    forward_graphs: dict[int, Graph] = {}
    outputs: dict[str, Any] = {}  # an inference file's metadata: its outputs' nesting and rows
    if isinstance(compiled, TrainStep):
        kind = "train_step"
        forward, forward_graphs, forward_reads = _step_forward(compiled)
        state = training_state(compiled)
        rates = _exportable_rates(compiled.name, [group["lr"] for group in compiled.optimizer.param_groups])
        lr = rates[0] if len(rates) == 1 else rates  # one number per parameter group
    else:
        kind = "inference"
        state = {f"model/{k}": v for k, v in compiled.model.state_dict().items()}
        forward_reads, lr = {}, None
        outputs = _outputs_entry(compiled._output_tree)
        if max_batch is None:
            apart = _rows_apart(compiled)
        if apart is not None:  # whether a server may pad a batch, or batch two requests
            outputs["rows_apart"] = apart
    state.update(compiled.implicit_state())  # other modules' arrays the graph reads, read-only
    # buffers registered with persistent=False, which state_dict leaves out and the graph reads
    for name, ref in named_state_refs(compiled.model, ("_buffers",)):
        state.setdefault(f"model/{name}", ref.read())
    for key, array in forward_reads.items():
        state.setdefault(key, array)
    bindings = {inp.name: compiled.state_bindings()[inp.name] for inp in graph.inputs
                if inp.role != "data"}
    members = _function_members(
        kind, graph, compiled.executable, compiled.stage_graph("fused"), bindings, compiled.donate,
        state, {"backend": compiled.backend, "lr": lr, "name": compiled.name,
                **({"buckets": sorted(buckets)} if buckets else {}), **outputs},
        {"forward": forward} if forward else {})
    members["graph.traced.json"] = compiled.stage_graph("traced").to_json().encode()
    for size, bucket in buckets.items():
        if size != max_batch:
            members[f"buckets/{size}.json"] = bucket.to_json().encode()
    for size, forward_graph in forward_graphs.items():
        members[f"forward/{size}.json"] = forward_graph.to_json().encode()
    atomic_write(path, lambda f: f.write(_archive(members, state)))


def _function_members(kind: str, graph: Graph, executable: Executable, fused: Graph,
                      bindings: dict[str, str], donate: dict[int, int],
                      state: dict[str, np.ndarray], metadata: dict[str, Any],
                      plan: dict[str, Any]) -> dict[str, bytes]:
    """format.json, graph.json, plan.json, metadata.json and the kernel sources of a compiled
    graph whose non-batch inputs read `state` through `bindings`."""
    # A tied parameter is saved under each of its state-dict names; the plan names the ones
    # that are one array, so the loaded file keeps them one as it trains.
    if isinstance(metadata.get("name"), str):  # the loader refuses a name it could not print
        written_name(metadata["name"], "the exported function's name")
    first: dict[int, str] = {}
    tied = {key: first.setdefault(id(array), key) for key, array in state.items()}
    tied = {key: target for key, target in tied.items() if key != target}
    members = {
        "format.json": _json({"format": FORMAT, "version": VERSION, "kind": kind}),
        "graph.json": graph.to_json().encode(),
        "plan.json": _json({"signature": _signature(graph), "bindings": bindings,
                            **({"tied": tied} if tied else {}), "state_order": list(state),
                            "donate": {str(k): v for k, v in donate.items()},
                            **_plan_summary(executable, fused), **plan}),
        "metadata.json": _json({"versions": _versions(),
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                **metadata}),
    }
    for kernel in executable.kernels if isinstance(executable, PlannedExecutable) else []:
        source = getattr(kernel, "source", None)
        if source:
            members[f"kernels/{kernel.name}.py"] = source.encode()
    return members


def _archive(members: dict[str, bytes], state: dict[str, np.ndarray]) -> bytes:
    """The zip of `members` with the state and the checksums added: deterministic (fixed
    timestamps), the state stored (its size on disk is its size in memory)."""
    from safetensors.numpy import save

    # safetensors has no 0-d tensors: the step count travels as shape (1,)
    stored = {k: np.ascontiguousarray(v).reshape(np.shape(v) or (1,)) for k, v in state.items()}
    members = {**members, "state.safetensors": save(stored)}
    members.pop("checksums.json", None)
    tensors = {k: {"dtype": v.dtype.name, "shape": list(v.shape), "sha256": tensor_digest(v)}
               for k, v in stored.items()}
    members["checksums.json"] = _json({"members": {n: _sha256(d) for n, d in members.items()},
                                       "tensors": tensors})
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED if name == "state.safetensors" else zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buffer.getvalue()


# -- loading ----------------------------------------------------------------------------------
def _checked_format(path: str, archive: ZipMembers) -> tuple[dict[str, Any], bytes]:
    """format.json, parsed and checked, and its bytes."""
    if "format.json" not in archive.infos:
        raise LoadError(path, "not a graphc export (no format.json)")
    data = archive.read("format.json", _JSON_LIMITS["format.json"])
    fmt = parse_json(data, path, "format.json")
    if not isinstance(fmt, dict) or fmt.get("format") != FORMAT:
        raise LoadError(path, f"not a graphc export (format is {fmt!r:.80})", "format.json")
    version = fmt.get("version")
    if type(version) is not int or version > VERSION:
        raise LoadError(path, f"export format version {version!r:.20} is newer than this graphc "
                        f"reads ({VERSION}); upgrade graphc", "format.json")
    if version < VERSION:
        raise LoadError(path, f"export format version {version} predates per-tensor checksums "
                        f"and is no longer read; export the step again with this graphc", "format.json")
    if fmt.get("kind") not in ("train_step", "inference"):
        raise LoadError(path, f"unknown export kind {fmt.get('kind')!r:.40}", "format.json")
    return fmt, data


def _checked_manifest(path: str, archive: ZipMembers) -> tuple[dict[str, str], dict[str, dict]]:
    """checksums.json: the members' digests, and each tensor's dtype, shape and digest."""
    names = set(archive.infos)
    missing = [m for m in (*_REQUIRED, "checksums.json") if m not in names]
    if missing:
        raise LoadError(path, f"not a complete graphc export: missing members {missing}")
    unknown = sorted(n for n in names if n not in _JSON_LIMITS and n not in _REQUIRED
                     and not _KERNEL_MEMBER.match(n) and not _BUCKET_MEMBER.match(n)
                     and not _FORWARD_MEMBER.match(n))
    if unknown:
        raise LoadError(path, f"unexpected members {[u[:80] for u in unknown[:5]]}")
    sources = sum(archive.declared_size(n) for n in names if _KERNEL_MEMBER.match(n))
    if sources > _KERNEL_SOURCES_LIMIT:
        raise LoadError(path, f"the kernel sources declare {sources:,} bytes in all (at most "
                        f"{_KERNEL_SOURCES_LIMIT:,})")
    for pattern, what in ((_BUCKET_MEMBER, "batch buckets'"), (_FORWARD_MEMBER, "forward's")):
        graphs = [n for n in names if pattern.match(n)]
        declared = sum(archive.declared_size(n) for n in graphs)
        if declared > _BUCKET_GRAPHS_LIMIT or len(graphs) > _MAX_BUCKETS + 1:
            raise LoadError(path, f"the {what} graphs are {len(graphs)} members declaring "
                            f"{declared:,} bytes in all (at most {_MAX_BUCKETS + 1} and "
                            f"{_BUCKET_GRAPHS_LIMIT:,})")
    doc = parse_json(archive.read("checksums.json", _JSON_LIMITS["checksums.json"]), path,
                     "checksums.json")
    members = doc.get("members") if isinstance(doc, dict) else None
    tensors = doc.get("tensors") if isinstance(doc, dict) else None
    if (not isinstance(members, dict) or not isinstance(tensors, dict)
            or not all(isinstance(d, str) and _HEX_DIGEST.match(d) for d in members.values())):
        raise LoadError(path, "malformed: expected {members: {name: sha256}, tensors: {...}}",
                        "checksums.json")
    if set(members) != names - {"checksums.json"}:
        raise LoadError(path, "does not list exactly the archive's members", "checksums.json")
    for name, spec in tensors.items():
        if (not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str)
                or spec["dtype"] not in _NP_DTYPES
                or not isinstance(spec.get("shape"), list)
                or not all(type(d) is int and d >= 0 for d in spec["shape"])
                or not isinstance(spec.get("sha256"), str) or not _HEX_DIGEST.match(spec["sha256"])):
            raise LoadError(path, f"malformed entry for tensor {name!r:.80}", "checksums.json")
    return members, tensors


def _read_verified(path: str, archive: ZipMembers, digests: dict[str, str], name: str,
                   limit: int) -> bytes:
    data = archive.read(name, limit)
    if _sha256(data) != digests[name]:
        raise LoadError(path, "checksum mismatch: the file is corrupted", name)
    return data


def _state_limit(path: str, tensors: dict[str, dict]) -> int:
    """The bytes state.safetensors may hold: its tensors' declared bytes and a header."""
    total = _SAFETENSORS_HEADER_ALLOWANCE + _PER_TENSOR_ALLOWANCE * len(tensors)
    for name, spec in tensors.items():
        nbytes = math.prod(spec["shape"]) * _NP_DTYPES[spec["dtype"]].itemsize
        if nbytes > _MAX_TENSOR_BYTES:
            raise LoadError(path, f"tensor {name!r:.80} declares {nbytes:,} bytes", "checksums.json")
        total += nbytes
    return total


def _load_state(path: str, archive: ZipMembers, digests: dict[str, str],
                tensors: dict[str, dict]) -> dict[str, np.ndarray]:
    from safetensors.numpy import load

    name = "state.safetensors"
    if archive.infos[name].compress_type != zipfile.ZIP_STORED:
        raise LoadError(path, "is compressed; graphc stores the state uncompressed", name)
    data = archive.read(name, _state_limit(path, tensors))
    try:
        state = load(data)
    except Exception as exc:  # the safetensors parser's own errors, whatever their type
        intact = _sha256(data) == digests[name]
        raise LoadError(path, f"unreadable ({type(exc).__name__}: {exc})" if intact else
                        "checksum mismatch: the file is corrupted", name) from None
    if set(state) != set(tensors):
        raise LoadError(path, "holds other tensors than checksums.json lists", name)
    for key, array in state.items():
        spec = tensors[key]
        if array.dtype != _NP_DTYPES[spec["dtype"]] or list(array.shape) != spec["shape"]:
            raise LoadError(path, f"tensor {key!r} is {array.dtype}{list(array.shape)}, "
                            f"checksums.json records {spec['dtype']}{spec['shape']}", name)
        if tensor_digest(array) != spec["sha256"]:
            raise LoadError(path, f"tensor {key!r} fails its checksum: the file is corrupted", name)
    if _sha256(data) != digests[name]:
        raise LoadError(path, "checksum mismatch: the file is corrupted", name)
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def _in_saved_order(path: str, state: dict[str, np.ndarray], plan: dict[str, Any]
                    ) -> dict[str, np.ndarray]:
    """`state` in the order the export wrote it (plan.json's "state_order": the model's
    state-dict order, as PyTorch's), or by name in a file without one (safetensors' parser
    returns its own hash order, another at every run)."""
    order = plan.get("state_order", sorted(state))
    if (not isinstance(order, list) or not all(isinstance(k, str) for k in order)
            or sorted(order) != sorted(state)):
        raise LoadError(path, "malformed state order", "plan.json")
    return {k: state[k] for k in order}


def _graph(path: str, text: bytes, member: str) -> Graph:
    try:
        graph = Graph.from_json(text)
    except SerializationError as exc:
        raise LoadError(path, str(exc), member) from None
    for v in graph.values():
        nbytes = math.prod(v.type.shape) * v.type.np_dtype.itemsize
        if nbytes > _MAX_TENSOR_BYTES:
            raise LoadError(path, f"the graph declares a {v.type} tensor ({nbytes:,} bytes)", member)
    return graph


def _checked_plan(path: str, plan: Any, graph: Graph) -> tuple[dict[int, int], dict[str, str]]:
    """The donation map and state bindings of plan.json, checked against the graph."""
    if not isinstance(plan, dict):
        raise LoadError(path, "malformed: not an object", "plan.json")
    donate_doc = plan.get("donate", {})
    if not isinstance(donate_doc, dict) or not all(
            isinstance(k, str) and k.isdigit() and type(v) is int for k, v in donate_doc.items()):
        raise LoadError(path, "malformed donation map", "plan.json")
    donate = {int(k): v for k, v in donate_doc.items()}
    if any(not 0 <= i < len(graph.inputs) or not 0 <= o < len(graph.outputs) for i, o in donate.items()):
        raise LoadError(path, "the donation map refers to missing inputs or outputs", "plan.json")
    # a donated input's buffer receives its output: same type, one output each, never the
    # caller's data (it would be overwritten)
    for i, o in donate.items():
        inp, (name, out) = graph.inputs[i], graph.outputs[o]
        if inp.role == "data" or inp.value.type != out.type:
            raise LoadError(path, f"the donation map gives {inp.role} input {inp.name!r:.60} "
                            f"({inp.value.type}) the buffer of output {name!r:.60} ({out.type})", "plan.json")
    if len(set(donate.values())) != len(donate):
        raise LoadError(path, "the donation map gives one output to two inputs", "plan.json")
    if plan.get("signature") != _signature(graph):
        raise LoadError(path, "the recorded signature does not match the graph", "plan.json")
    bindings = plan.get("bindings")
    if not isinstance(bindings, dict) or not all(isinstance(v, str) for v in bindings.values()):
        raise LoadError(path, "malformed state bindings", "plan.json")
    kernels = plan.get("kernels", [])
    memory = plan.get("memory")
    if not isinstance(kernels, list) or not (memory is None or isinstance(memory, dict) and all(
            type(memory.get(k)) is int for k in ("peak_bytes", "naive_bytes"))):
        raise LoadError(path, "malformed kernel list or memory plan", "plan.json")
    return donate, bindings


def _checked_metadata(path: str, metadata: Any, kind: str) -> dict[str, Any]:
    expected = {"versions": dict, "backend": (str, type(None)), "created": str, "name": str,
                "lr": (int, float, list, type(None))}
    if not isinstance(metadata, dict) or any(
            k in metadata and (not isinstance(metadata[k], t) or isinstance(metadata[k], bool))
            for k, t in expected.items()):
        raise LoadError(path, "malformed: expected versions, backend, created, name and lr "
                        "of their types", "metadata.json")
    if not all(isinstance(v, str) for v in metadata.get("versions", {}).values()):
        raise LoadError(path, "malformed versions", "metadata.json")
    # `graphc info` prints them: one line each
    texts = [metadata[k] for k in ("backend", "created", "name") if isinstance(metadata.get(k), str)]
    for text in texts + list(metadata.get("versions", {})) + list(metadata.get("versions", {}).values()):
        try:
            checked_text(text, "a metadata entry")
        except SerializationError as exc:
            raise LoadError(path, str(exc), "metadata.json") from None
    if "buckets" in metadata:
        buckets = metadata["buckets"]
        if (kind != "inference" or not isinstance(buckets, list) or not buckets
                or not all(type(b) is int for b in buckets)
                or not 1 <= buckets[-1] < 1 << _MAX_BUCKETS or buckets != batch_buckets(buckets[-1])):
            raise LoadError(path, f"malformed batch buckets {buckets!r:.80} (expected the powers "
                            "of two below max_batch, then max_batch, in an inference export)",
                            "metadata.json")
    lr = metadata.get("lr")
    rates = lr if isinstance(lr, list) else [lr]
    if kind == "train_step" and not (rates and all(
            isinstance(r, (int, float)) and not isinstance(r, bool)
            and 0 <= r <= float(np.finfo(np.float32).max) for r in rates)):
        raise LoadError(path, f"needs learning rates that are finite float32s >= 0, not "
                        f"{lr!r:.80}", "metadata.json")
    return metadata


def _exportable_rates(name: str, rates: list[Any]) -> list[float]:
    """The learning rates as a file stores them, refusing those a load would refuse."""
    limit = float(np.finfo(np.float32).max)

    def storable(rate: Any) -> bool:
        try:
            return abs(float(rate)) <= limit  # False for nan
        except (TypeError, ValueError):
            return False
    bad = [r for r in rates if not storable(r)]
    if bad:
        raise GraphcError(f"{name}: cannot export learning rate {bad[0]!r}: a file's rates must be "
                          "finite float32s (set the rate to a number first)")
    return [float(r) for r in rates]


class _Loaded:
    """Common to loaded steps and functions: the graph, its executable and its arrays."""

    def __init__(self, path: str, graph: Graph, state: dict[str, np.ndarray], metadata: dict,
                 plan: dict[str, Any], bindings: dict[str, str], donate: dict[int, int],
                 backend: str | None, members: dict[str, bytes]) -> None:
        self.path, self.graph, self.metadata, self.members = path, graph, metadata, members
        self.plan = plan
        self.backend = backend or default_backend()
        self.name = metadata.get("name", graph.name)
        self._state = state
        self._turn = threading.RLock()  # calls from several threads take turns, as a TrainStep's
        self.persistent: list[np.ndarray] = []
        self._data_inputs = []
        for inp in graph.inputs:
            if inp.role == "data":
                if not _is_rate(inp.name):
                    self._data_inputs.append(inp)
                continue
            key = bindings.get(inp.name)
            if key not in state:
                raise LoadError(path, f"no saved value for input {inp.name!r:.80}", "state.safetensors")
            array = state[key]
            expected = inp.value.type
            if array.size != expected.size or array.dtype != expected.np_dtype:
                raise LoadError(path, f"saved {key} is {array.dtype}{list(array.shape)}, the graph "
                                f"needs {expected}", "state.safetensors")
            state[key] = array = array.reshape(expected.shape).copy()
            self.persistent.append(array)
        tied = plan.get("tied", {})
        if not isinstance(tied, dict) or not all(
                isinstance(v, str) and k in state and v in state and v not in tied
                for k, v in tied.items()):
            raise LoadError(path, "malformed tied state names", "plan.json")
        for alias, key in tied.items():  # one array under both names, as in the saved model
            state[alias] = state[key]
        try:
            self.executable = compile_graph(graph, self.backend, donate)
        except GraphcError:
            raise
        except Exception as exc:  # a verified graph no tracer would make; the cause is chained
            raise LoadError(path, f"its graph does not compile ({type(exc).__name__}: {exc})",
                            "graph.json") from exc

    def traced_graph(self) -> Graph | None:
        data = self.members.get("graph.traced.json")
        return _graph(self.path, data, "graph.traced.json") if data is not None else None

    def export(self, path: str) -> None:
        """Write the file back with the current state (e.g. after more training)."""
        with self._turn:  # a call in another thread finishes first: one consistent state
            self._export(path)

    def _export(self, path: str) -> None:
        from .train import atomic_write

        self._state_to_host()
        members = dict(self.members)
        metadata = {**self.metadata, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if "lr" in metadata and hasattr(self, "lrs"):
            rates = _exportable_rates(self.name, self.lrs)
            metadata["lr"] = rates[0] if len(rates) == 1 else rates
        members["metadata.json"] = _json(metadata)
        atomic_write(path, lambda f: f.write(_archive(members, self._state)))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights and buffers, by the model's state-dict names."""
        self._state_to_host()
        return {k[len("model/"):]: v for k, v in self._state.items() if k.startswith("model/")}

    def _state_to_host(self) -> None:
        """Before the state arrays are read or handed out: an executable keeping them on its
        device (numba-cuda) copies them back, and uploads them again before its next call."""
        if isinstance(self.executable, DeviceResident):
            self.executable.sync_to_host()
            self.executable.invalidate()

    def _args(self, batch: tuple[Any, ...]) -> list[Any]:
        if len(batch) != len(self._data_inputs):
            raise GraphcError(f"{self.name}: expected {len(self._data_inputs)} inputs "
                              f"({', '.join(i.name for i in self._data_inputs)}), got {len(batch)}")
        return list(batch)


def is_step_count(array: np.ndarray) -> bool:
    """Whether a loaded array holds one step count: a whole number >= 0 (a crafted NaN or
    negative count would turn Adam's bias correction, or a resumed shuffle's seed, bad)."""
    return (array.size == 1 and array.dtype.kind in "iuf" and bool(np.isfinite(array).all())
            and array.min() >= 0 and bool(np.all(array == np.floor(array))))


class LoadedTrainStep(_Loaded):
    """A training step loaded from a file: `step(x, y) -> loss` continues training exactly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        saved = self.metadata["lr"]
        # The learning rate of each parameter group, read at every call.
        self.lrs = [float(r) for r in (saved if isinstance(saved, list) else [saved])]
        # The step's own dtype for them: a float64 model's rate is not rounded to float32.
        rates = [inp.value.type for inp in self.graph.inputs
                 if _is_rate(inp.name) and inp.role == "data"]
        names = [inp.name for inp in self.graph.inputs if _is_rate(inp.name)]
        if (names != rate_input_names(len(self.lrs)) or len({r.dtype for r in rates}) != 1
                or any(r.shape != () or r.dtype not in ("float32", "float64") for r in rates)):
            raise LoadError(self.path, f"a training step with {len(self.lrs)} learning rate(s) "
                            f"needs scalar float inputs {', '.join(rate_input_names(len(self.lrs)))}",
                            "graph.json")
        self._lr_dtype = rates[0].np_dtype
        self._groups = len(rates)
        counts = {k: v for k, v in self._state.items()
                  if k == "step" or k.startswith("optim/") and k.endswith("/step")}
        for name, count in ({"step": None} | counts).items():
            if count is None or not is_step_count(count):
                raise LoadError(self.path, f"the step count {name!r} must be one whole number >= 0, "
                                f"got {None if count is None else count.ravel()[:2].tolist()}",
                                "state.safetensors")
        if isinstance(self.executable, DeviceResident):  # the state stays on the GPU between steps
            self.executable.keep_on_device(i for i, inp in enumerate(self.graph.inputs)
                                           if inp.role != "data")
        self._forward_batch, self._forward, self._forward_bindings = self._checked_forward()

    def _checked_forward(self) -> tuple[int | None, dict[int, Graph], dict[str, str]]:
        """The step's batch, the model's eval-mode forward by batch size and the state its
        non-batch inputs read (plan.json's "forward" and the forward/ members), checked against
        the step's inputs and state; None and empty for a file exported before steps stored it."""
        path, entry = self.path, self.plan.get("forward")
        stored = sorted(int(m.group(1)) for m in map(_FORWARD_MEMBER.match, self.members) if m)
        if entry is None:
            if stored:
                raise LoadError(path, f"holds forward/{stored[0]}.json but lists no forward",
                                "plan.json")
            return None, {}, {}
        batches = entry.get("batches") if isinstance(entry, dict) else None
        bindings = entry.get("bindings") if isinstance(entry, dict) else None
        if (not isinstance(entry, dict)
                or set(entry) - {"outputs", "rows_apart"} != {"batch", "batches", "bindings"}
                or type(entry.get("rows_apart", False)) is not bool
                or not isinstance(batches, list) or not all(type(b) is int for b in batches)
                or batches != stored or type(entry["batch"]) is not int
                or entry["batch"] not in batches
                or not isinstance(bindings, dict)
                or not all(isinstance(v, str) for v in bindings.values())):
            raise LoadError(path, f"malformed forward entry {entry!r:.120} (expected its batch, "
                            f"the batches of the forward/ members, {stored}, and state bindings)",
                            "plan.json")
        batch = entry["batch"]
        member = f"forward/{batch}.json"
        forward = _graph(path, self.members[member], member)
        if "outputs" in entry:
            try:
                nesting = treedef_from_json(entry["outputs"])
            except ValueError as exc:
                raise LoadError(path, f"malformed nesting of the forward's outputs: {exc}",
                                "plan.json") from None
            if nesting.num_leaves != len(forward.outputs):
                raise LoadError(path, f"nests {nesting.num_leaves} forward outputs, but {member} "
                                f"has {len(forward.outputs)}", "plan.json")
        inputs = [i.value.type for i in forward.inputs if i.role == "data"]
        step_inputs = [i.value.type for i in self._data_inputs]
        if (not 0 < len(inputs) < len(step_inputs) or inputs != step_inputs[:len(inputs)]
                or any(t.ndim == 0 or t.shape[0] != batch for t in inputs)):
            raise LoadError(path, f"takes {', '.join(map(str, inputs)) or 'no inputs'}, not the "
                            f"step's model inputs at batch {batch} (the step takes "
                            f"{', '.join(map(str, step_inputs))})", member)
        for inp in forward.inputs:
            if inp.role == "data":
                continue
            key = bindings.get(inp.name)
            array = self._state.get(key) if isinstance(key, str) else None
            expected = inp.value.type
            if array is None or array.size != expected.size or array.dtype != expected.np_dtype:
                found = "nothing" if array is None else f"{array.dtype}{list(array.shape)}"
                raise LoadError(path, f"its input {inp.name!r:.80} ({expected}) is bound to "
                                f"{key!r:.80}, which holds {found}", member)
        graphs = {batch: forward}
        for size in batches:
            if size != batch:
                graphs[size] = _rebatched_graph(path, self.members, f"forward/{size}.json", forward,
                                                member, size)
        return batch, graphs, bindings

    def export_inference(self, path: str, max_batch: int | None = None) -> None:
        """Write the model's eval-mode forward with the step's current weights as an inference
        export: what `gc.compile(model, x).export(path, max_batch)` writes for the model
        trained so far, x a batch of the step's model inputs. With `max_batch` it takes any
        batch of 1 to max_batch samples; the step file holds the forward at its own batch and
        at powers of two, so max_batch is one of those."""
        from .train import atomic_write

        if not self._forward:
            raise LoadError(self.path, "holds no eval-mode forward graph to export (it was written "
                            "by an older graphc, or the model's forward did not trace then: the "
                            "export logged why); export the training step again with this "
                            "graphc (step.export(path))")
        sizes = [self._forward_batch] if max_batch is None else _checked_max_batch(max_batch)
        missing = [n for n in sizes if n not in self._forward]
        if missing and len(self._forward) == 1:
            raise GraphcError(f"export_inference: {self.path} holds the forward at the step's batch "
                              f"{self._forward_batch} only: when the step was exported, the model's "
                              "inputs or outputs did not have the batch first, or its samples "
                              "depended on each other along axis 0 (a time-major model's first "
                              "axis is time), so batches cannot be padded; export_inference(path) "
                              "without max_batch serves that batch")
        if missing:
            raise GraphcError(f"export_inference: max_batch={max_batch} needs the forward at "
                              f"batch {missing[0]}, which {self.path} does not hold (it holds "
                              f"batches {', '.join(map(str, sorted(self._forward)))}); choose "
                              "one of them")
        graph = self._forward[sizes[-1]]
        try:
            executable = compile_graph(graph, self.backend, {})
        except GraphcError:
            raise
        except Exception as exc:  # a verified graph no tracer would make; the cause is chained
            raise LoadError(self.path, f"its forward does not compile ({type(exc).__name__}: "
                            f"{exc})", f"forward/{sizes[-1]}.json") from exc
        if isinstance(executable, PlannedExecutable):
            fused = executable.graph
        else:
            from graphc.passes.fusion import fuse
            fused = fuse(graph)
        with self._turn:  # a call in another thread finishes first: one consistent state
            self._state_to_host()
            bound = set(self._forward_bindings.values())
            copies: dict[int, np.ndarray] = {}  # a tied array's names share one copy
            for v in self._state.values():
                copies.setdefault(id(v), v)
            copies = {key: v.copy() for key, v in copies.items()}
            state = {k: copies[id(v)] for k, v in self._state.items()
                     if k.startswith("model/") or k in bound}
        members = _function_members(
            "inference", graph, executable, fused, self._forward_bindings, {}, state,
            {"backend": self.backend, "lr": None, "name": graph.name,
             # other batches are stored where padding a batch keeps its rows; whether rows are
             # computed apart (a server may batch two requests) is the step file's (older files:
             # where other batches are stored)
             **({"buckets": sizes} if max_batch is not None else {}),
             "rows_apart": self.plan["forward"].get("rows_apart", len(self._forward) > 1),
             **({"outputs": self.plan["forward"]["outputs"]} if "outputs" in self.plan["forward"] else {})},
            {})
        for size in sizes[:-1]:
            members[f"buckets/{size}.json"] = self._forward[size].to_json().encode()
        atomic_write(path, lambda f: f.write(_archive(members, state)))

    @property
    def lr(self) -> float:
        """The learning rate when every parameter group has the same one; setting it sets all."""
        if len(set(self.lrs)) > 1:
            raise GraphcError(f"{self.name}: its {len(self.lrs)} parameter groups have different "
                              "learning rates; read or set step.lrs[i]")
        return self.lrs[0]

    @lr.setter
    def lr(self, value: float) -> None:
        self.lrs = [float(value)] * len(self.lrs)

    @property
    def step_count(self) -> int:
        self._state_to_host()
        return int(self._state["step"].reshape(()))

    def training_state(self) -> dict[str, np.ndarray]:
        """Weights, buffers, optimizer state, step count and RNG key, named as
        graphc.train.training_state names those of the step exported (so checkpoints move both
        ways); the step's own arrays: writing into them changes it. Not the read-only arrays of
        other modules ("implicit/")."""
        self._state_to_host()
        return {k: v for k, v in self._state.items() if not k.startswith("implicit/")}

    def __call__(self, *batch: Any) -> float:
        from .compile import numerics_checked
        with self._turn:
            return numerics_checked(self, batch, self._step)

    def _step(self, batch: Sequence[Any]) -> float:
        if not isinstance(self.lrs, (list, tuple)) or len(self.lrs) != self._groups:
            held = f"{len(self.lrs)} learning rate(s)" if isinstance(self.lrs, (list, tuple)) else repr(self.lrs)
            raise GraphcError(f"{self.name}: step.lrs holds {held}; the step has {self._groups} "
                              f"parameter group(s): give a list of one rate each")
        checked_rates(self.lrs, self.name, "step.lrs[{}]")
        args = self._args(batch)
        persistent = self.persistent
        rng = self.graph.inputs[-1].role == "rng"
        if rng:
            persistent = persistent[:-1]
        args += [*persistent, *(self._lr_dtype.type(r) for r in self.lrs)]
        if rng:
            args.append(self.persistent[-1])
        from .compile import interrupts_deferred
        with interrupts_deferred():  # a Ctrl-C lands after the step's whole update
            return float(self.executable(*args)[0])


class LoadedFunction(_Loaded):
    """An inference function loaded from a file. A batch-polymorphic one (exported with
    `max_batch`) takes any batch of 1 to `max_batch` samples, running it on the smallest bucket
    that holds it; each bucket compiles on first use, or all of them at once in `warm_up()`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.buckets: list[int] = self.metadata.get("buckets", [])
        self.max_batch: int | None = self.buckets[-1] if self.buckets else None
        self._bucket_graphs = {size: self._checked_bucket(size) for size in self.buckets[:-1]}
        self._executables = {self.max_batch: self.executable} if self.buckets else {}
        self._output_tree = self._checked_outputs()
        listed = {f"buckets/{size}.json" for size in self._bucket_graphs}
        stray = sorted(n for n in self.members if _FORWARD_MEMBER.match(n)
                       or _BUCKET_MEMBER.match(n) and n not in listed)
        if stray:
            raise LoadError(self.path, f"holds {stray[0]}, which an inference export has no use "
                            "for (a batch size metadata.json does not list, or a training step's "
                            "forward)", stray[0])

    def _checked_outputs(self) -> TreeDef | None:
        """How the outputs nest (metadata's "outputs"); None in a file written before exports
        stored it (its outputs come back as a flat tuple)."""
        if "outputs" not in self.metadata:
            return None
        try:
            tree = treedef_from_json(self.metadata["outputs"])
        except ValueError as exc:
            raise LoadError(self.path, f"malformed nesting of outputs: {exc}", "metadata.json") from None
        if tree.num_leaves != len(self.graph.outputs):
            raise LoadError(self.path, f"nests {tree.num_leaves} outputs, but graph.json has "
                            f"{len(self.graph.outputs)}", "metadata.json")
        return tree

    def _checked_bucket(self, size: int) -> Graph:
        """The graph of bucket `size`: the function of graph.json at another batch size."""
        member = f"buckets/{size}.json"
        if member not in self.members:
            raise LoadError(self.path, f"metadata.json lists batch {size} but {member} is missing")
        return _rebatched_graph(self.path, self.members, member, self.graph, "graph.json", size)

    def warm_up(self, up_to: int | None = None) -> None:
        """Compile now, rather than on first use, every batch bucket that batches of up to
        `up_to` samples (of any size when None) run on."""
        if not self.buckets:
            return
        limit = self.max_batch if up_to is None else max(1, min(up_to, self.max_batch))
        for size in self.buckets[:self.buckets.index(next(b for b in self.buckets if b >= limit)) + 1]:
            self._executable_for(size)

    def _executable_for(self, size: int) -> Executable:
        if size not in self._executables:
            self._executables[size] = compile_graph(self._bucket_graphs[size], self.backend, {})
        return self._executables[size]

    def __call__(self, *inputs: Any) -> Any:
        outs = self.flat_outputs(*inputs)
        if self._output_tree is not None:
            return unflatten(self._output_tree, outs)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def flat_outputs(self, *inputs: Any) -> list[np.ndarray]:
        """The outputs of a call as one list, in graph.json's order (a server's view)."""
        args = self._args(inputs)
        if not self.buckets:
            return list(self.executable(*args, *self.persistent))
        return self._bucketed(args)

    def _bucketed(self, args: list[Any]) -> list[np.ndarray]:
        shapes = [np.shape(a) for a in args]
        sizes = {shape[0] if shape else None for shape in shapes}
        if len(sizes) != 1 or None in sizes or not 1 <= min(sizes) <= self.max_batch:
            raise InputError(f"{self.name}: expects batches of 1 to {self.max_batch} samples as "
                             f"the first axis of every input, got shapes "
                             f"{', '.join(str(shape) for shape in shapes)}")
        n = sizes.pop()
        # checked (and converted where lossless) at the caller's batch, before any padding
        arrays = [as_input(f"{self.name}: input {inp.name!r}",
                           TensorType((n, *inp.value.type.shape[1:]), inp.value.type.dtype), a)
                  for inp, a in zip(self._data_inputs, args)]
        bucket = next(b for b in self.buckets if b >= n)
        if bucket != n:
            padded = []
            for a in arrays:
                full = np.zeros((bucket, *a.shape[1:]), a.dtype)
                full[:n] = a
                padded.append(full)
            arrays = padded
        outs = self._executable_for(bucket)(*arrays, *self.persistent)
        # the executable reuses its output buffers on the next call: hand out copies
        return [np.array(o[:n]) for o in outs] if bucket != n else list(outs)


def _rebatched_graph(path: str, members: dict[str, bytes], member: str, reference: Graph,
                     reference_member: str, size: int) -> Graph:
    """The graph of `member`, checked to be the function of `reference` at batch `size`: the
    same inputs and outputs, data inputs and outputs with `size` as their first axis."""
    graph = _graph(path, members[member], member)

    def rebatched(t: TensorType, batched: bool) -> TensorType:
        return TensorType((size, *t.shape[1:]), t.dtype) if batched else t

    expected_inputs = [(i.name, i.role, rebatched(i.value.type, i.role == "data"))
                       for i in reference.inputs]
    expected_outputs = [(n, rebatched(v.type, True)) for n, v in reference.outputs]
    if ([(i.name, i.role, i.value.type) for i in graph.inputs] != expected_inputs
            or [(n, v.type) for n, v in graph.outputs] != expected_outputs):
        raise LoadError(path, f"its signature is not {reference_member}'s at batch {size}", member)
    return graph


def _is_rate(name: str) -> bool:
    """Whether a step's input is a learning rate ("lr", or "lr.<group>" with several groups)."""
    return name == "lr" or name.startswith("lr.") and name[3:].isdigit()


def load(path: str, backend: str | None = None) -> LoadedTrainStep | LoadedFunction:
    """Load an exported step or function; it runs without tracing or the model's code.
    Anything wrong with the file raises LoadError (a SerializationError)."""
    members: dict[str, bytes] = {}
    with ZipMembers(path, "graphc export") as archive:
        fmt, members["format.json"] = _checked_format(path, archive)
        digests, tensors = _checked_manifest(path, archive)
        for name in sorted(archive.infos):
            if name in ("format.json", "checksums.json", "state.safetensors"):
                continue
            graph_member = _BUCKET_MEMBER.match(name) or _FORWARD_MEMBER.match(name)
            limit = _JSON_LIMITS.get("graph.json" if graph_member else name, _KERNEL_SOURCE_LIMIT)
            members[name] = _read_verified(path, archive, digests, name, limit)
        if _sha256(members["format.json"]) != digests["format.json"]:
            raise LoadError(path, "checksum mismatch: the file is corrupted", "format.json")
        graph = _graph(path, members["graph.json"], "graph.json")
        plan = parse_json(members["plan.json"], path, "plan.json")
        donate, bindings = _checked_plan(path, plan, graph)
        metadata = _checked_metadata(path, parse_json(members["metadata.json"], path, "metadata.json"),
                                     fmt["kind"])
        state = _in_saved_order(path, _load_state(path, archive, digests, tensors), plan)
    cls = LoadedTrainStep if fmt["kind"] == "train_step" else LoadedFunction
    return cls(path, graph, state, metadata, plan, bindings, donate, backend, members)
