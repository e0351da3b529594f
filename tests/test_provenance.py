"""Provenance: every node records the module path it came from and the user's line; the printer,
DOT, `graphc inspect`/`info`, the NaN locator, the profile table and kernel comments show them."""
import hashlib
import json
import zipfile

import numpy as np
import pytest

import graphc as gc
import graphc.nn.functional as F
from graphc import nn, optim
from graphc.backends.numba_cpu.codegen import generate
from graphc.cli import main
from graphc.ir import Graph, SerializationError
from graphc.ir.errors import LoadError
from graphc.passes import autodiff
from graphc.passes.fusion import fuse

REF = "reference"


def train_step(model, x, y, backend=REF):
    return gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (x, y), backend=backend)


def modules_of(graph: Graph, op: str) -> list[str | None]:
    return [n.module for n in graph.nodes if n.op == op]


class Block(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return F.relu(self.fc(x))  # BLOCK_LINE


class Encoder(nn.Module):
    def __init__(self, width, depth):
        super().__init__()
        self.layers = nn.ModuleList([Block(width) for _ in range(depth)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = Encoder(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.encoder(x))


def line_of(marker: str) -> int:
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if marker in text and "line_of" not in text)


X, Y = np.ones((2, 4), np.float32), np.array([0, 2])


def test_sequential_layers_are_named_by_position():
    gc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3))
    x = np.ones((2, 1, 4, 4), np.float32)
    step = train_step(model, x, Y)
    graph = step.graph
    assert modules_of(graph, "conv2d")[0] == "0"
    assert "1" in modules_of(graph, "relu")
    assert modules_of(graph, "matmul")[0] == "3"
    # Nodes outside every layer (the loss, the optimizer update) carry no module path.
    assert None in modules_of(graph, "sub")
    # Library layers are not the user's code: their nodes point at the compile call's line.
    conv = next(n for n in graph.nodes if n.op == "conv2d")
    assert conv.loc.rsplit("/", 1)[-1].startswith("test_provenance.py:")


def test_nested_modules_carry_dotted_paths_and_the_users_line():
    gc.manual_seed(0)
    graph = train_step(Net(), X, Y).graph
    paths = {n.module for n in graph.nodes}
    assert {"encoder.layers.0.fc", "encoder.layers.1.fc", "encoder.layers.1", "head"} <= paths
    forward_relu = next(n for n in graph.nodes if n.op == "relu")
    assert forward_relu.module == "encoder.layers.0"
    # The innermost user frame of a library Linear called from Block.forward is that line.
    fc = next(n for n in graph.nodes if n.module == "encoder.layers.1.fc")
    assert fc.loc.endswith(f"test_provenance.py:{line_of('# BLOCK_LINE')}")


def test_a_module_called_twice_and_a_jitted_function_inside_a_module():
    @gc.jit
    def double(x):
        return x * 2.0

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return double(self.shared(self.shared(x)))

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Twice()

        def forward(self, x):
            return self.body(x)

    graph = gc.trace(Outer(), X)
    assert modules_of(graph, "matmul") == ["body.shared", "body.shared"]
    assert modules_of(graph, "mul") == ["body"]  # inlined under the caller's path


def test_gradient_nodes_carry_their_forward_nodes_module():
    gc.manual_seed(0)
    model = Net()
    forward = gc.trace(lambda x: model(x).sum(), X)
    wrt = [i.name for i in forward.inputs if i.role == "param"]
    grads = autodiff(forward, wrt=wrt)
    for inp in forward.inputs[1:]:
        owner = inp.name.split(".", 1)[1].rsplit(".", 1)[0]  # "Net.head.weight" -> "head"
        gradient = grads.output(f"grad_{inp.name}")
        assert gradient.producer.module == owner, inp.name
    # Backward matmuls outnumber forward ones in every Linear.
    assert modules_of(grads, "matmul").count("head") > modules_of(forward, "matmul").count("head")


def test_printer_dot_and_fused_kernels_show_module_paths():
    gc.manual_seed(0)
    graph = train_step(Net(), X, Y).graph
    text = str(graph)
    assert f"# encoder.layers.1.fc @ test_provenance.py:{line_of('# BLOCK_LINE')}" in text
    dot = graph.to_dot()
    assert "[encoder.layers.0.fc]" in dot and "tooltip=\"head @ test_provenance.py:" in dot
    fused = fuse(graph)
    covered = [k.module_paths() for k in fused.nodes]
    assert any("head" in paths for paths in covered)
    assert "tooltip=\"encoder.layers" in fused.to_dot()


def test_serialised_graphs_round_trip_module_paths():
    gc.manual_seed(0)
    graph = train_step(Net(), X, Y).graph
    loaded = Graph.from_json(graph.to_json())
    assert [n.module for n in loaded.nodes] == [n.module for n in graph.nodes]
    assert str(loaded) == str(graph)


@pytest.mark.parametrize("path", ["a\nimport os", "x" * 201, "", "a b", "ü", 7])
def test_a_hostile_module_path_in_a_document_is_refused(path):
    doc = json.loads(gc.trace(Net(), X).to_json())
    doc["graph"]["nodes"][0]["module"] = path
    with pytest.raises(SerializationError, match="module path"):
        Graph.from_json(json.dumps(doc))


def test_kernel_comments_name_modules_and_lines_in_a_safe_charset():
    gc.manual_seed(0)
    fused = fuse(train_step(Net(), X, Y).graph)
    kernel = next(k for k in fused.nodes if "head" in k.module_paths()
                  and k.attrs["pattern"] not in ("view", "constant"))
    generated = generate(kernel)
    first = generated.source.splitlines()[0]
    assert first.startswith("# ops from: ") and "head @ test_provenance.py:" in first
    # The comment stays out of the compiled modules (their text is the kernel cache key).
    assert all("ops from" not in call.source for call in generated.calls)
    # Set past the loader's check (a graph built in memory): still one comment line, no code.
    for node in kernel.subgraph.nodes:
        node.module, node.loc = "x\nimport os\n#", "/tmp/a\nimport sys\n.py:1"
    source = generate(kernel).source
    assert source.splitlines()[0].startswith("# ops from: x_import_os_") and "\nimport os" not in source
    assert "\nimport sys" not in source


def test_an_export_with_a_hostile_module_path_is_refused(tmp_path):
    gc.manual_seed(0)
    step = train_step(nn.Sequential(nn.Linear(4, 3)), X, Y)
    path = str(tmp_path / "step.gcx")
    step.export(path)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    doc = json.loads(members["graph.json"])
    node = next(n for n in doc["graph"]["nodes"] if n.get("module") == "0")
    node["module"] = "0\nimport os"
    members["graph.json"] = json.dumps(doc).encode()
    manifest = json.loads(members["checksums.json"])
    manifest["members"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()
                           if n != "checksums.json"}
    members["checksums.json"] = json.dumps(manifest).encode()
    hostile = str(tmp_path / "hostile.gcx")
    with zipfile.ZipFile(hostile, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(LoadError, match="module path"):
        gc.load(hostile, backend="numba-cpu")


def test_graphc_inspect_and_info_of_an_mnist_like_step_show_module_paths(tmp_path, capsys):
    gc.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 10))
    x = np.zeros((2, 1, 8, 8), np.float32)
    step = train_step(model, x, np.zeros(2, np.int64))
    path = str(tmp_path / "mnist.gcx")
    step.export(path)
    assert main(["inspect", path, "--stage", "fused"]) == 0
    out = capsys.readouterr().out
    assert "= conv2d(" in out and "# 0 @ test_provenance.py:" in out
    assert "= matmul(" in out and "# 4 @ test_provenance.py:" in out
    assert main(["info", path]) == 0
    info = capsys.readouterr().out
    assert "modules (nodes): 0 (" in info and ", 4 (" in info


def test_the_nan_locator_names_the_module():
    class Log(nn.Module):
        def forward(self, x):
            return gc.log(x)

    model = nn.Sequential(nn.Linear(4, 3), Log())
    model[0].weight[...] = -1.0
    model[0].bias[...] = 0.0
    report = train_step(model, X, Y).check_numerics(X, Y)
    assert report.op == "log" and report.module == "1"
    assert "log in module 1 at " in str(report)


def test_the_profile_table_has_one_row_per_kernel_with_its_module_paths(monkeypatch):
    monkeypatch.setenv("GRAPHC_PROFILE", "1")
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    step = train_step(model, X, Y, backend="numba-cpu")
    step(X, Y)
    report = step.executable.profile_report
    table = report.table()
    assert len(table.splitlines()) == 2 + len(step.executable.kernels)
    assert table.splitlines()[1].endswith("modules")
    covered = {m for row in report.rows for m in row.modules}
    assert {"0", "1", "2"} <= covered
    matmul_rows = [line for line in table.splitlines() if "matmul" in line.split()[0]]
    assert matmul_rows and all(line.rstrip()[-1].isdigit() for line in matmul_rows)
