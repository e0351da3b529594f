"""Export compiled training steps and inference functions to one file, and load them back
without the model's code.

The file is a zip holding: `format.json` (format, version, kind), `graph.json` (the optimized
IR) and `graph.traced.json` (the IR as traced, for inspection), `plan.json` (signature, donation map, fused kernels and memory plan), `state.safetensors`
(parameters, buffers, optimizer state, step count, RNG key), `metadata.json` (versions,
backend, creation time, learning rate), the generated kernel sources for reading under
`kernels/`, and `checksums.json` (SHA-256 of every other member). Loading verifies all of it
and regenerates the kernels from the IR: nothing in the file is executed and nothing is
unpickled. Writes are atomic.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from typing import Any

import numpy as np

from graphc.backends import compile_graph, default_backend
from graphc.ir import Graph, SerializationError
from graphc.ir.errors import GraphcError

FORMAT = "graphc.export"
VERSION = 1
_REQUIRED = ("format.json", "graph.json", "plan.json", "state.safetensors", "metadata.json")
_MAX_MEMBER_BYTES = 1 << 34  # refuse absurd sizes before reading (zip bombs)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def _plan_summary(executable: Any, fused: Graph) -> dict[str, Any]:
    kernels = [{"name": n.attrs.get("name", n.op), "pattern": n.attrs.get("pattern", ""),
                "ops": [m.op for m in n.subgraph.nodes] if n.subgraph is not None else [n.op]}
               for n in fused.nodes]
    plan = getattr(executable, "plan", None)
    memory = plan.to_dict() if plan is not None and hasattr(plan, "to_dict") else None
    return {"kernels": kernels, "memory": memory}


def export(compiled: Any, path: str) -> None:
    """Write a TrainStep or CompiledModel (its most recent input signature) to `path`."""
    from safetensors.numpy import save

    from .compile import TrainStep
    from .train import atomic_write, training_state

    graph = compiled.graph
    executable = compiled.executable
    if isinstance(compiled, TrainStep):
        kind = "train_step"
        state = training_state(compiled)
        lr = compiled.optimizer.lr
    else:
        kind = "inference"
        state = {f"model/{k}": v for k, v in compiled.model.state_dict().items()}
        lr = None
    bindings = {inp.name: compiled.state_bindings()[inp.name] for inp in graph.inputs
                if inp.role != "data"}
    fused = compiled.stage_graph("fused")
    members = {
        "format.json": _json({"format": FORMAT, "version": VERSION, "kind": kind}),
        "graph.json": graph.to_json().encode(),
        "graph.traced.json": compiled.stage_graph("traced").to_json().encode(),
        "plan.json": _json({"signature": _signature(graph), "bindings": bindings,
                            "donate": {str(k): v for k, v in compiled.donate.items()},
                            **_plan_summary(executable, fused)}),
        "state.safetensors": save({k: np.ascontiguousarray(v).reshape(v.shape or (1,))
                                   for k, v in state.items()}),
        "metadata.json": _json({"versions": _versions(), "backend": compiled.backend,
                                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                "lr": lr, "name": compiled.name}),
    }
    for kernel in getattr(executable, "kernels", []) or []:
        source = getattr(kernel, "source", None)
        if source:
            members[f"kernels/{kernel.name}.py"] = source.encode()
    members["checksums.json"] = _json({name: _sha256(data) for name, data in members.items()})

    atomic_write(path, lambda f: f.write(_zip(members)))


def _zip(members: dict[str, bytes]) -> bytes:
    """A deterministic zip (fixed timestamps) of the members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buffer.getvalue()


# -- loading ----------------------------------------------------------------------------------
def _read_members(path: str) -> dict[str, bytes]:
    try:
        with zipfile.ZipFile(path) as z:
            infos = z.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise SerializationError(f"{path}: duplicate members in the archive")
            if any(i.file_size > _MAX_MEMBER_BYTES for i in infos):
                raise SerializationError(f"{path}: a member is implausibly large")
            return {i.filename: z.read(i) for i in infos}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError,
            OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise SerializationError(f"{path}: no such file") from None
        raise SerializationError(f"{path}: not a readable graphc export ({exc})") from None
    except Exception as exc:  # zlib.error and other decompression failures
        raise SerializationError(f"{path}: corrupt archive ({type(exc).__name__}: {exc})") from None


def _parse_json(path: str, members: dict[str, bytes], name: str) -> Any:
    try:
        return json.loads(members[name])
    except (ValueError, UnicodeDecodeError) as exc:
        raise SerializationError(f"{path}: {name} is not valid JSON ({exc})") from None


def _check(path: str, members: dict[str, bytes]) -> dict[str, Any]:
    if "format.json" not in members:
        raise SerializationError(f"{path}: not a graphc export (no format.json)")
    fmt = _parse_json(path, members, "format.json")
    if not isinstance(fmt, dict) or fmt.get("format") != FORMAT:
        raise SerializationError(f"{path}: not a graphc export (format is {fmt!r:.80})")
    version = fmt.get("version")
    if not isinstance(version, int) or version > VERSION:
        raise SerializationError(f"{path}: export format version {version!r} is newer than this "
                                 f"graphc reads ({VERSION}); upgrade graphc")
    missing = [m for m in (*_REQUIRED, "checksums.json") if m not in members]
    if missing:
        raise SerializationError(f"{path}: missing members {missing}")
    checksums = _parse_json(path, members, "checksums.json")
    if not isinstance(checksums, dict):
        raise SerializationError(f"{path}: checksums.json is malformed")
    for name, data in members.items():
        if name == "checksums.json":
            continue
        if checksums.get(name) != _sha256(data):
            raise SerializationError(f"{path}: checksum mismatch for {name}: the file is corrupted")
    if set(checksums) != set(members) - {"checksums.json"}:
        raise SerializationError(f"{path}: checksums.json does not list exactly the archive's members")
    if fmt.get("kind") not in ("train_step", "inference"):
        raise SerializationError(f"{path}: unknown export kind {fmt.get('kind')!r}")
    return fmt


def _load_state(path: str, data: bytes) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load

    try:
        state = load(data)
    except (SafetensorError, ValueError) as exc:
        raise SerializationError(f"{path}: state.safetensors is unreadable ({exc})") from None
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


class _Loaded:
    """Common to loaded steps and functions: the graph, its executable and its arrays."""

    def __init__(self, path: str, graph: Graph, state: dict[str, np.ndarray], metadata: dict,
                 bindings: dict[str, str], donate: dict[int, int], backend: str | None,
                 members: dict[str, bytes]) -> None:
        self.path, self.graph, self.metadata, self.members = path, graph, metadata, members
        self.plan = json.loads(members["plan.json"])
        self.backend = backend or default_backend()
        self.name = metadata.get("name", graph.name)
        self._state = state
        self.persistent: list[np.ndarray] = []
        self._data_inputs = []
        for inp in graph.inputs:
            if inp.role == "data":
                if inp.name != "lr":
                    self._data_inputs.append(inp)
                continue
            key = bindings.get(inp.name)
            if key not in state:
                raise SerializationError(f"{path}: no saved value for input {inp.name!r}")
            array = state[key]
            expected = inp.value.type
            if array.size != expected.size or array.dtype != expected.np_dtype:
                raise SerializationError(f"{path}: saved {key} is {array.dtype}{list(array.shape)}, "
                                         f"the graph needs {expected}")
            state[key] = array = array.reshape(expected.shape).copy()
            self.persistent.append(array)
        self.executable = compile_graph(graph, self.backend, donate)

    def traced_graph(self) -> Graph | None:
        data = self.members.get("graph.traced.json")
        return Graph.from_json(data.decode()) if data is not None else None

    def export(self, path: str) -> None:
        """Write the file back with the current state (e.g. after more training)."""
        from safetensors.numpy import save

        from .train import atomic_write

        self._state_to_host()
        members = dict(self.members)
        members["state.safetensors"] = save({k: v.reshape(v.shape or (1,)) for k, v in self._state.items()})
        metadata = {**self.metadata, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        if "lr" in metadata and hasattr(self, "lr"):
            metadata["lr"] = self.lr
        members["metadata.json"] = _json(metadata)
        members.pop("checksums.json", None)
        members["checksums.json"] = _json({name: _sha256(data) for name, data in members.items()})
        atomic_write(path, lambda f: f.write(_zip(members)))

    def state_dict(self) -> dict[str, np.ndarray]:
        """The weights and buffers, by the model's state-dict names."""
        self._state_to_host()
        return {k[len("model/"):]: v for k, v in self._state.items() if k.startswith("model/")}

    def _state_to_host(self) -> None:
        """Before the state arrays are read or handed out: an executable keeping them on its
        device (numba-cuda) copies them back, and uploads them again before its next call."""
        if hasattr(self.executable, "sync_to_host"):
            self.executable.sync_to_host()
            self.executable.invalidate()

    def _args(self, batch: tuple[Any, ...]) -> list[Any]:
        if len(batch) != len(self._data_inputs):
            raise GraphcError(f"{self.name}: expected {len(self._data_inputs)} inputs "
                              f"({', '.join(i.name for i in self._data_inputs)}), got {len(batch)}")
        return list(batch)


class LoadedTrainStep(_Loaded):
    """A training step loaded from a file: `step(x, y) -> loss` continues training exactly."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lr = float(self.metadata["lr"])
        if hasattr(self.executable, "keep_on_device"):  # the state stays on the GPU between steps
            self.executable.keep_on_device(i for i, inp in enumerate(self.graph.inputs)
                                           if inp.role != "data")

    @property
    def step_count(self) -> int:
        self._state_to_host()
        return int(self._state["step"].reshape(()))

    def __call__(self, *batch: Any) -> float:
        args = self._args(batch)
        persistent = self.persistent
        rng = self.graph.inputs[-1].role == "rng"
        if rng:
            persistent = persistent[:-1]
        args += [*persistent, np.float32(self.lr)]
        if rng:
            args.append(self.persistent[-1])
        return float(self.executable(*args)[0])


class LoadedFunction(_Loaded):
    """An inference function loaded from a file."""

    def __call__(self, *inputs: Any) -> Any:
        outs = self.executable(*self._args(inputs), *self.persistent)
        return outs[0] if len(outs) == 1 else tuple(outs)


def load(path: str, backend: str | None = None) -> LoadedTrainStep | LoadedFunction:
    """Load an exported step or function; it runs without tracing or the model's code."""
    members = _read_members(path)
    fmt = _check(path, members)
    try:
        graph = Graph.from_json(members["graph.json"].decode())
    except UnicodeDecodeError:
        raise SerializationError(f"{path}: graph.json is not text") from None
    if any(v.type.nbytes > _MAX_MEMBER_BYTES for v in graph.values()):
        raise SerializationError(f"{path}: the graph declares implausibly large tensors")
    plan = _parse_json(path, members, "plan.json")
    metadata = _parse_json(path, members, "metadata.json")
    if not isinstance(plan, dict) or not isinstance(metadata, dict):
        raise SerializationError(f"{path}: plan.json or metadata.json is malformed")
    try:
        donate = {int(k): int(v) for k, v in plan.get("donate", {}).items()}
    except (TypeError, ValueError, AttributeError):
        raise SerializationError(f"{path}: plan.json has a malformed donation map") from None
    if any(not 0 <= i < len(graph.inputs) or not 0 <= o < len(graph.outputs) for i, o in donate.items()):
        raise SerializationError(f"{path}: donation map refers to missing inputs or outputs")
    if plan.get("signature") != _signature(graph):
        raise SerializationError(f"{path}: the recorded signature does not match the graph")
    bindings = plan.get("bindings")
    if not isinstance(bindings, dict) or not all(isinstance(v, str) for v in bindings.values()):
        raise SerializationError(f"{path}: plan.json has malformed state bindings")
    state = _load_state(path, members["state.safetensors"])
    cls = LoadedTrainStep if fmt["kind"] == "train_step" else LoadedFunction
    if cls is LoadedTrainStep and not isinstance(metadata.get("lr"), (int, float)):
        raise SerializationError(f"{path}: metadata.json lacks the learning rate")
    return cls(path, graph, state, metadata, bindings, donate, backend, members)
