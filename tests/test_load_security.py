"""Files graphc did not make, read as an attacker would write them: code injection through
export files, bombs, special files, corruption of exports and checkpoints, and the source
guard that stands between code generation and the interpreter."""
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import sys
import threading
import zipfile
import zlib

import numpy as np
import pytest

import graphc as gc
import graphc.nn as nn
import graphc.nn.functional as F
from graphc import optim
from graphc.backends.kernel_files import KernelFiles
from graphc.backends.source_guard import UnsafeSourceError, check_source, identifier
from graphc.ir import Builder, TensorType
from graphc.ir.errors import GraphcError, LoadError
from graphc.passes.fusion import fuse

REF = "reference"
rng = np.random.default_rng(0)
X = rng.standard_normal((4, 3)).astype(np.float32)
Y = rng.integers(0, 2, 4)


def payload(marker) -> str:
    """Python that creates `marker` if it is ever pasted into source and run."""
    return f"x():\n    import os; open({str(marker)!r}, 'w').write('pwned')\ndef y"


def small_fused_graph():
    b = Builder("g")
    x = b.add_input(TensorType((4,), "float32"), "x", "data")
    b.add_output("y", b.bind("exp", b.bind("neg", x)))
    return fuse(b.graph)


# -- the source guard ---------------------------------------------------------------------------
def test_source_guard_passes_what_graphc_generates():
    from graphc.backends.numba_cpu.codegen import generate

    kernel = small_fused_graph().nodes[0]
    for call in generate(kernel).calls:
        check_source(call.source)


def test_hostile_kernel_name_never_reaches_disk_or_interpreter(tmp_path):
    from graphc.backends.numba_cpu.codegen import generate

    marker = tmp_path / "pwned"
    fused = small_fused_graph()
    fused.nodes[0].attrs["name"] = payload(marker)
    (call,) = generate(fused.nodes[0]).calls
    compile(call.source, "<generated>", "exec")  # the pasted name made valid, hostile Python
    files = KernelFiles(str(tmp_path / "cache"))
    with pytest.raises(UnsafeSourceError, match="imports 'os'"):
        files._write_source("k", call.source)
    assert not os.path.exists(files.path("k"))
    with pytest.raises(UnsafeSourceError):
        gc.lowering.compile_graph(fused, "numba-cpu")
    assert not marker.exists()


@pytest.mark.parametrize("source, fragment", [
    ("import os\n", "imports 'os'"),
    ("from . import x\n", "relative imports"),
    ("def f(a):\n    return __import__('os')\n", "identifier '__import__'"),
    ("def f(a):\n    return a.__class__\n", "identifier '__class__'"),
    ("def f(a):\n    return open(a)\n", "the name 'open'"),
    ("def f(a):\n    return eval(a)\n", "the name 'eval'"),
    ("import numpy as np\nnp.save('x', 1)\n", "module-level Expr"),
    ("import numpy as np\nX = np.load\n", "module-level Assign"),
    ("def g(f):\n    return f\n@g\ndef f(a):\n    return a\n", "not Numba's jit"),
    ("from numba import njit\ndef f(a=print('x')):\n    return a\n", "default values"),
    ("f = lambda a: a\n", "Lambda"),
    ("def f(a):\n    return f'{a}'\n", "JoinedStr"),
    ("class C:\n    pass\n", "ClassDef"),
    ("def f(a):\n    return 'rm -rf /'\n", "literal 'rm -rf /'"),
    ("def f(a):\n    return a(**a)\n", "identifier None"),
    ("def f(\n", "does not parse"),
])
def test_source_guard_refuses_what_graphc_does_not_generate(source, fragment):
    with pytest.raises(UnsafeSourceError, match=fragment.replace("(", r"\(")):
        check_source(source)


@pytest.mark.parametrize("name", ["", "1x", "x y", "x\n", "_private", "__import__", "é", "a" * 200,
                                  "x():\n import os"])
def test_identifier_refuses_what_graphc_does_not_make(name):
    with pytest.raises(UnsafeSourceError):
        identifier(name)
    assert identifier("kernel_add_relu_3") == "kernel_add_relu_3"


# -- exports crafted by an attacker ---------------------------------------------------------------
def make_step():
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    return gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (X, Y), backend=REF)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("export") / "step.gcx")
    step = make_step()
    step(X, Y)
    step.export(path)
    return path, gc.load(path, backend=REF)(X, Y)


def members_of(path):
    with zipfile.ZipFile(path) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_export(members, out, recompute=True):
    """An export with the given members, its member checksums recomputed (they are plain
    SHA-256: anyone can) unless `recompute` is False."""
    members = dict(members)
    if recompute:
        manifest = json.loads(members["checksums.json"])
        manifest["members"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()
                               if n != "checksums.json"}
        members["checksums.json"] = json.dumps(manifest).encode()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data, zipfile.ZIP_STORED if name == "state.safetensors" else zipfile.ZIP_DEFLATED)
    return str(out)


def test_export_with_a_hostile_fused_graph_is_refused(exported, tmp_path):
    """The attack as reported: graph.json replaced by a fused graph whose kernel name is Python
    that the kernel generator would paste into `def kernel_<name>(`."""
    from graphc.ir.serialize import graph_to_json

    path, _ = exported
    marker = tmp_path / "pwned"
    fused = fuse(gc.load(path, backend=REF).graph)
    for kernel in fused.nodes:
        kernel.attrs["name"] = payload(marker)
    members = members_of(path)
    members["graph.json"] = graph_to_json(fused).encode()
    hostile = write_export(members, tmp_path / "hostile.gcx")
    for backend in (REF, "numba-cpu"):
        with pytest.raises(LoadError, match="graph.json: .*fused kernel nodes"):
            gc.load(hostile, backend=backend)
    assert not marker.exists()


def string_sites(doc, path=()):
    """Every place in a JSON document holding a string: (path, is_key)."""
    if isinstance(doc, str):
        yield path, False
    elif isinstance(doc, dict):
        for key, value in doc.items():
            yield path + (key,), True
            yield from string_sites(value, path + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from string_sites(value, path + (i,))


def replaced(doc, path, is_key, text):
    """A copy of `doc` with the string at `path` (or the key naming it) replaced by `text`."""
    if not path:
        return text
    doc = json.loads(json.dumps(doc))
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if is_key:
        parent[text] = parent.pop(path[-1])
    else:
        parent[path[-1]] = text
    return doc


def hostile_strings(marker):
    """Python creating `marker`, shaped to break out of an identifier, a call, a dtype name."""
    return [payload(marker), f"1); open({str(marker)!r}, 'w')#",
            f"float32; __import__('os').system('touch {marker}')"]


def check_every_string_of_every_json_member(path, expected, tmp_path, stride):
    """Every `stride`-th string (or key) of the JSON members, in turn, replaced by Python that
    creates a marker file if it is ever run; the checksums recomputed. Each file either loads
    and computes what the original does, or is refused with a GraphcError; the marker never
    appears."""
    marker = tmp_path / "pwned"
    original = members_of(path)
    texts = hostile_strings(marker)
    outcomes = {"loaded": 0, "refused": 0}
    sites = [(member, site, is_key) for member in sorted(n for n in original if n.endswith(".json"))
             for site, is_key in string_sites(json.loads(original[member]))]
    for index, (member, site, is_key) in enumerate(sites[::stride]):
        members = dict(original)
        doc = replaced(json.loads(original[member]), site, is_key, texts[index % len(texts)])
        members[member] = json.dumps(doc).encode()
        variant = write_export(members, tmp_path / "variant.gcx", recompute=member != "checksums.json")
        try:
            loaded = gc.load(variant, backend=REF)
            loaded.traced_graph()  # parsed when asked for (graphc inspect)
            loss = loaded(X, Y)
        except GraphcError:
            outcomes["refused"] += 1
        else:
            assert loss == expected, (member, site)
            outcomes["loaded"] += 1
        assert not marker.exists(), (member, site)
    return outcomes


def test_no_sampled_string_of_a_json_member_reaches_code(exported, tmp_path):
    outcomes = check_every_string_of_every_json_member(*exported, tmp_path, stride=11)
    assert outcomes["refused"] > 20 and outcomes["loaded"] > 20, outcomes


@pytest.mark.slow
def test_no_string_of_any_json_member_reaches_code(exported, tmp_path):
    outcomes = check_every_string_of_every_json_member(*exported, tmp_path, stride=1)
    assert outcomes["refused"] > 200 and outcomes["loaded"] > 200, outcomes


def test_dtype_strings_map_through_a_fixed_table():
    from graphc.ir.serialize import graph_from_json, graph_to_json

    b = Builder("c")
    x = b.add_input(TensorType((2,), "float32"), "x", "data")
    b.add_output("y", b.bind("add", x, b.bind("constant", value=np.ones(2, np.float32))))
    doc = json.loads(graph_to_json(b.graph))
    attrs = doc["graph"]["nodes"][0]["attrs"]
    for dtype in ("<f4", "f4", "float32); __import__('os')#", "object"):
        attrs["value"]["ndarray"]["dtype"] = dtype
        with pytest.raises(gc.SerializationError, match="unsupported dtype"):
            graph_from_json(json.dumps(doc))


def test_deep_json_is_refused_before_it_is_parsed(exported, tmp_path):
    path, _ = exported
    members = members_of(path)
    members["graph.json"] = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(LoadError, match="graph.json: JSON nested 200000 levels deep"):
        gc.load(write_export(members, tmp_path / "deep.gcx"), backend=REF)
    members = members_of(path)
    members["checksums.json"] = b'{"members": ' * 100_000 + b"}" * 100_000
    with pytest.raises(LoadError, match="checksums.json: JSON nested"):
        gc.load(write_export(members, tmp_path / "deep2.gcx", recompute=False), backend=REF)


def test_a_member_inflating_past_its_declared_size_is_refused(exported, tmp_path):
    path, _ = exported
    out = write_export(members_of(path), tmp_path / "lie.gcx")
    blob = bytearray(open(out, "rb").read())
    with zipfile.ZipFile(out) as z:
        info = z.getinfo("graph.json")
    # the central directory's entry for graph.json: its uncompressed size (offset 24) says 100
    entry = blob.index(b"PK\x01\x02")
    while blob[entry + 46:entry + 46 + len(b"graph.json")] != b"graph.json":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", blob, entry + 28)
        entry += 46 + name_len + extra_len + comment_len
    assert struct.unpack_from("<I", blob, entry + 24)[0] == info.file_size
    struct.pack_into("<I", blob, entry + 24, 100)
    open(out, "wb").write(bytes(blob))
    with pytest.raises(LoadError, match="graph.json"):
        gc.load(out, backend=REF)


def test_unknown_members_and_old_versions_are_refused(exported, tmp_path):
    path, _ = exported
    members = members_of(path)
    members.update({f"kernels/k{i}.py": bytes(4 * MiB) for i in range(9)})
    with pytest.raises(LoadError, match="kernel sources declare 37,748,736 bytes in all"):
        gc.load(write_export(members, tmp_path / "sources.gcx"), backend=REF)
    members = members_of(path)
    members["payload.py"] = b"import os"
    with pytest.raises(LoadError, match=r"unexpected members \['payload.py'\]"):
        gc.load(write_export(members, tmp_path / "extra.gcx"), backend=REF)
    members = members_of(path)
    members["format.json"] = json.dumps({"format": "graphc.export", "version": 1,
                                         "kind": "train_step"}).encode()
    with pytest.raises(LoadError, match="version 1 predates per-tensor checksums"):
        gc.load(write_export(members, tmp_path / "v1.gcx"), backend=REF)


def test_every_flipped_bit_of_the_state_is_detected_naming_the_tensor(exported, tmp_path):
    path, _ = exported
    members = members_of(path)
    state = members["state.safetensors"]
    header = 8 + int.from_bytes(state[:8], "little")
    picks = np.random.default_rng(1).integers(header * 8, len(state) * 8, 20)
    for bit in picks:
        flipped = bytearray(state)
        flipped[bit // 8] ^= 1 << (bit % 8)
        members["state.safetensors"] = bytes(flipped)
        out = write_export(members, tmp_path / "flip.gcx", recompute=False)
        with pytest.raises(LoadError, match=r"state.safetensors: tensor '[^']+' fails its checksum"):
            gc.load(out, backend=REF)


# -- bombs and special files --------------------------------------------------------------------
MiB = 1 << 20


def deflate_pieces(prefix: bytes, fill: bytes, count: int) -> list[tuple[bytes, int]]:
    """Raw deflate of prefix + fill * count as (bytes, repeat) pieces, without compressing
    `count` copies: each fully flushed block of `fill` is self-contained, so one compressed copy
    repeated is a valid stream (how a bomb is built in milliseconds)."""
    def flushed(data):
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        return c.compress(data) + c.flush(zlib.Z_FULL_FLUSH)
    return [(flushed(prefix), 1), (flushed(fill), count), (zlib.compressobj(9, zlib.DEFLATED, -15).flush(), 1)]


def write_zip(path, entries):
    """A zip written by hand: entries are (name, method, crc, declared size, pieces). The
    bombs' CRCs are not computed (a loader must refuse them long before it could check one)."""
    with open(path, "wb") as f:
        central = []
        for name, method, crc, size, pieces in entries:
            offset = f.tell()
            csize = sum(len(b) * n for b, n in pieces)
            f.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, csize, size,
                                len(name), 0) + name.encode())
            for data, repeat in pieces:
                for _ in range(repeat):
                    f.write(data)
            central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc,
                                       csize, size, len(name), 0, 0, 0, 0, 0, offset) + name.encode())
        start = f.tell()
        f.write(b"".join(central))
        f.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(central), len(central),
                            f.tell() - start, start, 0))
    return str(path)


def export_with(path, out, name, pieces, size, content=None):
    """The export at `path` with member `name` replaced by the deflate `pieces` of `size` bytes.
    Given the member's `content` as (bytes, repeat) pieces, its CRC and checksum are right too."""
    members = members_of(path)
    crc = 0
    if content is not None:
        digest = hashlib.sha256()
        for data, repeat in content:
            for _ in range(repeat):
                crc = zlib.crc32(data, crc)
                digest.update(data)
        manifest = json.loads(members["checksums.json"])
        manifest["members"][name] = digest.hexdigest()
        members["checksums.json"] = json.dumps(manifest).encode()
    entries = []
    for member, data in members.items():
        if member == name:
            entries.append((name, 8, crc, size, pieces))
        else:
            c = zlib.compressobj(9, zlib.DEFLATED, -15)
            entries.append((member, 8, zlib.crc32(data), len(data), [(c.compress(data) + c.flush(), 1)]))
    return write_zip(out, entries)


def peak_rss_of(code: str, *args: str) -> tuple[int, str]:
    """Peak resident memory (bytes) of a fresh interpreter running `code`, and its output.

    Read from the child's own VmHWM: wait4's ru_maxrss also counts the parent's resident size at
    the fork (Linux carries it over exec), so under a large pytest process it said 1.1 GB."""
    probe = "\nprint('PEAK', open('/proc/self/status').read().split('VmHWM:')[1].split()[0])\n"
    done = subprocess.run([sys.executable, "-c", code + probe, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    output, _, peak = done.stdout.rpartition("PEAK ")
    return int(peak) * 1024, output


LOAD_EXPORT = """
import sys, graphc as gc
from graphc.ir.errors import LoadError
try:
    gc.load(sys.argv[1], backend="reference")
    print("LOADED")
except LoadError as exc:
    print("REFUSED", exc)
"""
READ_IDX = """
import sys
from graphc.data import DatasetError, read_idx
try:
    read_idx(sys.argv[1])
    print("LOADED")
except DatasetError as exc:
    print("REFUSED", exc)
"""


def test_bombs_are_refused_in_bounded_memory(exported, tmp_path):
    path, _ = exported
    graph_json = members_of(path)["graph.json"]
    zeros = deflate_pieces(b"", bytes(MiB), 2048)  # 2 GiB of zeros in ~2 MB
    spaces = deflate_pieces(graph_json, b" " * MiB, 1024)  # valid JSON, padded by 1 GiB
    short_strings = b'"ab",' * (MiB // 5)
    idx_header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (10, 28, 28))
    huge_idx_header = bytes([0, 0, 0x08, 1]) + (1 << 31).to_bytes(4, "big")

    def gzip_file(out, pieces):
        with open(out, "wb") as f:
            f.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff")
            for data, repeat in pieces:
                for _ in range(repeat):
                    f.write(data)
            f.write(struct.pack("<II", 0, 0))  # CRC and size never reached
        return str(out)

    cases = {
        "2 GiB zero member": (LOAD_EXPORT, export_with(path, tmp_path / "zeros.gcx", "graph.json",
                                                       zeros, 2048 * MiB), "declares 2,147,483,648 bytes"),
        "2 GiB zero member declared 100 bytes": (
            LOAD_EXPORT, export_with(path, tmp_path / "lie.gcx", "graph.json", zeros, 100), "graph.json"),
        "2 GiB unknown member": (LOAD_EXPORT, export_with(path, tmp_path / "extra.gcx", "metadata.json",
                                                          zeros, 2048 * MiB), "metadata.json: declares"),
        "1 GiB whitespace padding": (LOAD_EXPORT, export_with(path, tmp_path / "pad.gcx", "graph.json",
                                                              spaces, len(graph_json) + 1024 * MiB,
                                                              content=[(graph_json, 1), (b" " * MiB, 1024)]),
                                     "graph.json: declares"),
        "graph.json of 6 million short strings": (
            LOAD_EXPORT, export_with(path, tmp_path / "many.gcx", "graph.json",
                                     deflate_pieces(b"[", short_strings, 31), 1 + 31 * len(short_strings),
                                     content=[(b"[", 1), (short_strings, 31)]),
            "graph.json: JSON of up to 6,501,"),
        "IDX .gz bomb": (READ_IDX, gzip_file(tmp_path / "bomb.gz", deflate_pieces(idx_header, bytes(MiB), 2048)),
                         "trailing bytes"),
        "IDX .gz declaring 2 GiB": (READ_IDX, gzip_file(tmp_path / "huge.gz",
                                                        deflate_pieces(huge_idx_header, bytes(MiB), 2048)),
                                    "more than the 1,073,741,824 a compressed file may hold"),
    }
    for name, (code, file, fragment) in cases.items():
        assert os.path.getsize(file) < 4 * MiB, name
        peak, output = peak_rss_of(code, file)
        assert output.startswith("REFUSED") and fragment in output, (name, output)
        assert peak < 600 * MiB, (name, peak // MiB)


def run_with_deadline(fn, seconds=5.0):
    """`fn()`'s exception (or None) if it returns within `seconds`; fails the test otherwise."""
    outcome = []

    def target():
        try:
            fn()
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still reading after {seconds} s"
    return outcome[0]


def test_special_files_are_refused_promptly(tmp_path):
    from graphc.data import DatasetError, read_idx
    from graphc.train import load_checkpoint

    step = make_step()
    fifo = str(tmp_path / "fifo")
    os.mkfifo(fifo)
    for path, kind in (("/dev/zero", "character device"), (fifo, "FIFO"), (str(tmp_path), "directory")):
        for load, error in ((lambda: gc.load(path, backend=REF), LoadError),
                            (lambda: load_checkpoint(path, step), LoadError),
                            (lambda: read_idx(path), DatasetError)):
            exc = run_with_deadline(load)
            assert isinstance(exc, error) and kind in str(exc) and path in str(exc), exc


# -- checkpoints ------------------------------------------------------------------------------
def test_every_flipped_bit_of_a_checkpoint_is_refused(tmp_path):
    from graphc.train import load_checkpoint, save_checkpoint

    step = make_step()
    step(X, Y)
    path = tmp_path / "ck.safetensors"
    save_checkpoint(str(path), step)
    good = path.read_bytes()
    target = make_step()
    before = {k: v.copy() for k, v in target.state_dict().items()}
    for bit in np.random.default_rng(2).choice(len(good) * 8, 60, replace=False):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(LoadError):
            load_checkpoint(str(path), target)
    assert all(np.array_equal(v, before[k]) for k, v in target.state_dict().items())


def test_a_corrupted_checkpoint_tensor_is_named(tmp_path):
    from graphc.train import load_checkpoint, save_checkpoint

    step = make_step()
    path = tmp_path / "ck.safetensors"
    save_checkpoint(str(path), step)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40  # the last tensor's last byte
    path.write_bytes(bytes(data))
    with pytest.raises(LoadError, match=r"ck.safetensors: [^:]+: fails its checksum"):
        load_checkpoint(str(path), step)


def test_a_killed_write_leaves_a_temporary_file_the_next_write_removes(tmp_path):
    from graphc.train import save_checkpoint

    path = str(tmp_path / "ck.safetensors")
    killed = subprocess.run([sys.executable, "-c",
                             "import os, sys\nfrom graphc.train import atomic_write\n"
                             "atomic_write(sys.argv[1], lambda f: (f.write(b'half'), f.flush(), "
                             "os.kill(os.getpid(), 9)))", path])
    assert killed.returncode == -9
    assert [n for n in os.listdir(tmp_path) if n.startswith(".tmp-") and "-ck.safetensors." in n]
    # other files' temporaries are not ours, even of a dead process and named like ours
    others = [tmp_path / ".tmp-999999999-other.safetensors.abcd1234",
              tmp_path / ".tmp-999999999-ck.safetensors.424242.abcd1234"]
    for other in others:
        other.write_bytes(b"")
    save_checkpoint(path, make_step())
    assert sorted(os.listdir(tmp_path)) == sorted([o.name for o in others] + ["ck.safetensors"])


def test_a_write_gives_the_mode_open_would_and_names_the_path_it_fails_on(tmp_path):
    """A new file's mode is 0666 less the umask (mkstemp's own 0600 made exports unreadable to
    a server running as another user); a file written over keeps its mode."""
    from graphc.train import atomic_write

    mask = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "new"), lambda f: f.write(b"x"))
        kept = tmp_path / "kept"
        kept.write_bytes(b"")
        os.chmod(kept, 0o640)
        atomic_write(str(kept), lambda f: f.write(b"y"))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(tmp_path / "new").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o640 and kept.read_bytes() == b"y"
    missing = str(tmp_path / "absent" / "ck.safetensors")
    with pytest.raises(FileNotFoundError, match=f"cannot write {re.escape(missing)}"):
        atomic_write(missing, lambda f: f.write(b"x"))


def test_a_write_to_a_symbolic_link_goes_to_its_target_and_keeps_the_link(tmp_path):
    """The link was replaced by a plain file and its target kept the old checkpoint."""
    from graphc.train import atomic_write

    (tmp_path / "run3").mkdir()
    target = tmp_path / "run3" / "ck.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "latest.ckpt"
    link.symlink_to(os.path.join("run3", "ck.safetensors"))
    atomic_write(str(link), lambda f: f.write(b"new"))
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path / "run3")) == ["ck.safetensors"]


def test_plan_and_metadata_lies_are_refused(tmp_path):
    """Found by the fuzzer: a donation map pairing an input with an output of another type
    raised ValueError in the first step; one naming a data input would overwrite the batch."""
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()), (X, Y), backend=REF)
    path = str(tmp_path / "adam.gcx")
    step.export(path)
    original = members_of(path)
    plan = json.loads(original["plan.json"])
    donate = {int(k): v for k, v in plan["donate"].items()}
    types = {i: entry["type"] for i, entry in enumerate(plan["signature"]["inputs"])}
    i, j = next((i, j) for i in donate for j in donate if i < j and types[i] == types[j])
    other = next(o for k, o in donate.items() if types[k] != types[i])
    lies = {"the buffer of output": {**donate, i: other}, "data input": {0: donate[i]},
            "one output to two inputs": {**donate, j: donate[i]}}
    for fragment, lie in lies.items():
        members = dict(original)
        members["plan.json"] = json.dumps({**plan, "donate": {str(k): v for k, v in lie.items()}}).encode()
        with pytest.raises(LoadError, match=f"plan.json: .*{fragment}"):
            gc.load(write_export(members, tmp_path / "donate.gcx"), backend=REF)
    members = dict(original)
    metadata = json.loads(original["metadata.json"])
    for lie in (1e300, [1e-3, float("nan")], [], "0.1"):
        members["metadata.json"] = json.dumps({**metadata, "lr": lie}).encode()
        with pytest.raises(LoadError, match="metadata.json: .*(learning rates that are finite float32s|malformed)"):
            gc.load(write_export(members, tmp_path / "lr.gcx"), backend=REF)


def test_command_line_refuses_a_hostile_file_in_one_line(exported, tmp_path, capsys):
    from graphc.cli import main
    from graphc.ir.serialize import graph_to_json

    path, _ = exported
    marker = tmp_path / "pwned"
    fused = fuse(gc.load(path, backend=REF).graph)
    fused.nodes[0].attrs["name"] = payload(marker)
    members = members_of(path)
    members["graph.json"] = graph_to_json(fused).encode()
    hostile = write_export(members, tmp_path / "hostile.gcx")
    for argv in (["info", hostile], ["inspect", hostile], ["train", hostile, "--data", str(tmp_path),
                                                           "--steps", "1", "--save", hostile]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "fused kernel nodes" in err, err
    assert not marker.exists()


def test_command_line_prints_names_from_a_file_without_terminal_escapes(exported, tmp_path, capsys):
    """A name holding a terminal escape is refused on load; the one-line error shows it escaped."""
    from graphc.cli import main

    path, _ = exported
    members = members_of(path)
    metadata = json.loads(members["metadata.json"])
    members["metadata.json"] = json.dumps({**metadata, "name": "step\x1b]0;owned\x07"}).encode()
    assert main(["info", write_export(members, tmp_path / "escape.gcx")]) == 1
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "\x1b" not in text and "\x07" not in text and "control characters" in text


def _edit_graph(members, change):
    doc = json.loads(members["graph.json"])
    change(doc["graph"])
    members["graph.json"] = json.dumps(doc).encode()


@pytest.mark.parametrize("where", ["loc", "input", "output", "graph name", "created", "version"])
@pytest.mark.parametrize("text", ["x\n  %9: f32[2,3] = evil_op(%0)", "x\tthen", "x\x00y", "bug\udc80.py:22"])
def test_strings_that_could_forge_printed_lines_are_refused(exported, tmp_path, where, text):
    """`graphc inspect` and `graphc info` print a file's names and locations one per line: a
    line break in one forged ops and inputs the file does not hold, and an unpaired surrogate
    crashed the printing. Every such string is refused on load, naming the member."""
    path, _ = exported
    members = members_of(path)
    metadata = json.loads(members["metadata.json"])
    if where == "loc":
        _edit_graph(members, lambda g: g["nodes"][0].update(loc=text))
    elif where == "input":
        def rename(g):
            g["inputs"][0]["name"] = text
        _edit_graph(members, rename)
    elif where == "output":
        _edit_graph(members, lambda g: g["outputs"][0].update(name=text))
    elif where == "graph name":
        _edit_graph(members, lambda g: g.update(name=text))
    elif where == "created":
        members["metadata.json"] = json.dumps({**metadata, "created": text}).encode()
    else:
        members["metadata.json"] = json.dumps({**metadata, "versions": {"graphc": text}}).encode()
    member = "metadata.json" if where in ("created", "version") else "graph.json"
    with pytest.raises(LoadError, match=f"{member}: .*(control characters|unpaired surrogate)"):
        gc.load(write_export(members, tmp_path / "forged.gcx"), backend=REF)


def test_dot_of_names_with_control_characters_and_surrogates_is_valid():
    """A NUL reached the DOT text raw (Graphviz: syntax error) and a surrogate could not be
    written: both are shown escaped."""
    from graphc.ir.dot import _quote
    quoted = _quote('nul\x00byte "q" \udc80 a\nb\\')
    assert "\x00" not in quoted and quoted.encode("utf-8")
    assert quoted == '"nul\\\\x00byte \\"q\\" \\\\udc80 a\\nb\\\\"'


def test_an_export_holds_what_its_loader_takes(tmp_path):
    """A model defined in a file whose path holds a tab exported fine and never loaded (its
    location is escaped now); a module name holding one is refused when exporting, naming it."""
    folder = tmp_path / "with\ttab"
    folder.mkdir()
    (folder / "model.py").write_text(
        "import graphc.nn as nn\n"
        "class Model(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(3, 2)\n"
        "    def forward(self, x):\n"
        "        return self.fc(x).relu()\n")
    import importlib.util
    spec = importlib.util.spec_from_file_location("tabbed_model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    step = gc.compile_train_step(model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.1),
                                 (X, Y), backend=REF)
    step(X, Y)
    step.export(str(tmp_path / "tab.gcx"))
    loaded = gc.load(str(tmp_path / "tab.gcx"), backend=REF)
    assert any("\\x09" in (n.loc or "") for n in loaded.graph.nodes)
    named = nn.Sequential()
    named.add_module("enc\tA", nn.Linear(3, 2))
    step = gc.compile_train_step(named, F.cross_entropy, optim.SGD(named.parameters(), lr=0.1),
                                 (X, Y), backend=REF)
    with pytest.raises(gc.SerializationError, match=r"'enc\\tA.weight' holds control characters, "
                                                    "which an exported file cannot hold"):
        step.export(str(tmp_path / "named.gcx"))
