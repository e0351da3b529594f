"""Fuzz the loaders: mutated export files and checkpoints must be refused with a GraphcError
(or load and run), never raise anything else, crash, hang or take unbounded memory.

    python benchmarks/fuzz_loaders.py [--exports 1000] [--checkpoints 300] [--seed 0] [--workers 2]

Starts from a small exported training step (Adam, so the state has optimizer slots) and a
checkpoint of it, and writes mutants of both: bit flips, truncations, byte insertions and
deletions, zip edits (members dropped, duplicated, renamed, recompressed, swapped), JSON type
and size lies in every JSON member with the checksums recomputed, safetensors header lies
(dtypes, shapes, offsets, header length) and manifest lies. Each mutant is loaded (an export
also runs one step) in a pool of worker processes, under a per-file alarm. Prints the files
tried, the GraphcError count, other exceptions (must be 0, listed), crashes (a worker dying),
hangs (past the alarm) and the workers' peak resident memory. Exits 1 unless other exceptions,
crashes and hangs are all 0.

tests/test_load_fuzz.py drives the same mutators from Hypothesis, in process, on fewer files.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import io
import json
import multiprocessing
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

TIMEOUT_S = 20
JSON_MEMBERS = ("format.json", "graph.json", "graph.traced.json", "plan.json", "metadata.json",
                "checksums.json")


# -- the seeds ------------------------------------------------------------------------------------
def seed_files(directory: str) -> tuple[str, str]:
    """A small exported training step and a checkpoint of it, in `directory`."""
    import graphc as gc
    import graphc.nn as nn
    import graphc.nn.functional as F
    from graphc import optim
    from graphc.train import save_checkpoint

    x, y = seed_batch()
    gc.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()), (x, y),
                                 backend="reference")
    step(x, y)
    export, checkpoint = os.path.join(directory, "seed.gcx"), os.path.join(directory, "seed.safetensors")
    step.export(export)
    save_checkpoint(checkpoint, step)
    return export, checkpoint


def seed_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((4, 3)).astype(np.float32), rng.integers(0, 2, 4)


# -- mutators -------------------------------------------------------------------------------------
def flip_bits(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.randint(1, 8)):
        bit = rng.randrange(len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    return bytes(data)


def truncate(blob: bytes, rng: random.Random) -> bytes:
    return blob[:rng.randrange(len(blob))]


def splice(blob: bytes, rng: random.Random) -> bytes:
    data = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(data) + 1)
        if rng.random() < 0.5:
            del data[at:at + rng.randint(1, 64)]
        else:
            data[at:at] = rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def lie(value: object, rng: random.Random) -> object:
    """A value of another type or an absurd size in place of `value`."""
    choices = [None, True, -1, 0, 2 ** 63, 10 ** 30, -2 ** 31, 1e308, float("nan"), float("inf"),
               "", "x" * rng.choice([1, 100, 100_000]), "f32[1000000000,1000000000]", "kernel",
               "float32); import os #", [], {}, [value], {"tuple": value}, {"float": "nan"},
               {"ndarray": {"dtype": "<f4", "shape": [2 ** 40], "data": ""}}]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        choices += [value + 1, value - 1, -value, value * 1000]
    if isinstance(value, str):
        choices += [value[:-1], value + "0", value.upper(), value[::-1]]
    if isinstance(value, list) and value:
        choices += [value[:-1], value + value[-1:], value[::-1]]
    return rng.choice(choices)


def json_sites(doc: object, path: tuple = ()) -> list[tuple]:
    sites = [path]
    if isinstance(doc, dict):
        for key, value in doc.items():
            sites += json_sites(value, path + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            sites += json_sites(value, path + (i,))
    return sites


def lie_in_json(text: bytes, rng: random.Random) -> bytes:
    doc = json.loads(text)
    for _ in range(rng.randint(1, 3)):
        site = rng.choice(json_sites(doc))
        if not site:
            doc = lie(doc, rng)
            continue
        parent = doc
        for step in site[:-1]:
            parent = parent[step]
        if isinstance(parent, dict) and rng.random() < 0.2:
            del parent[site[-1]]
        else:
            parent[site[-1]] = lie(parent[site[-1]], rng)
    return json.dumps(doc).encode()


def safetensors_lie(blob: bytes, rng: random.Random) -> bytes:
    """A safetensors file whose header lies (dtype, shape, offsets, metadata or its length)."""
    size = int.from_bytes(blob[:8], "little")
    header, data = json.loads(blob[8:8 + size]), blob[8 + size:]
    kind = rng.choice(["entry", "entry", "metadata", "length", "padding"])
    if kind == "length":
        return struct.pack("<Q", (size + rng.choice([-9, -1, 1, 8, 2 ** 40])) % 2 ** 64) + blob[8:]
    if kind == "padding":
        text = json.dumps(header).encode() + b" " * rng.choice([1, 7, 1 << 20])
        return struct.pack("<Q", len(text)) + text + data
    names = [n for n in header if n != "__metadata__"]
    if kind == "metadata" or not names:
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(sorted(meta) or ["version"])
        meta[key] = rng.choice(["1", "2", "3", "", "graphc.other", "0" * 64, 7])
    else:
        entry = header[rng.choice(names)]
        field = rng.choice(["dtype", "shape", "data_offsets"])
        entry[field] = {"dtype": lambda: rng.choice(["F64", "I64", "BOOL", "F16", "U8", "XX", 3]),
                        "shape": lambda: rng.choice([[], [0], [2 ** 40], [-1], [1] * 64, "4"]),
                        "data_offsets": lambda: rng.choice([[0, 0], [0, 2 ** 62], [8, 4], [-4, 4],
                                                           [0], "0"])}[field]()
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def read_zip(blob: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return {n: z.read(n) for n in z.namelist()}


def write_zip(members: list[tuple[str, bytes]], stored: set[str] = frozenset({"state.safetensors"})) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buffer, "w") as z:
        warnings.simplefilter("ignore")  # duplicate names are one of the mutations
        for name, data in members:
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return buffer.getvalue()


def with_checksums(members: dict[str, bytes]) -> dict[str, bytes]:
    """The member digests recomputed (as an attacker can: they are plain SHA-256)."""
    try:
        manifest = json.loads(members["checksums.json"])
        manifest["members"] = {n: hashlib.sha256(d).hexdigest() for n, d in members.items()
                               if n != "checksums.json"}
        return {**members, "checksums.json": json.dumps(manifest).encode()}
    except (KeyError, ValueError, TypeError):
        return members


def zip_edit(members: dict[str, bytes], rng: random.Random) -> bytes:
    items = list(members.items())
    kind = rng.choice(["drop", "duplicate", "rename", "deflate state", "swap", "add"])
    if kind == "drop":
        items.pop(rng.randrange(len(items)))
    elif kind == "duplicate":
        items.append(rng.choice(items))
    elif kind == "rename":
        i = rng.randrange(len(items))
        items[i] = (rng.choice(["kernels/x.py", "../escape", "state.safetensors", "GRAPH.JSON", "a" * 300,
                                items[i][0] + "/"]), items[i][1])
    elif kind == "deflate state":
        return write_zip(items, stored=set())
    elif kind == "swap":
        i, j = rng.randrange(len(items)), rng.randrange(len(items))
        items[i], items[j] = (items[i][0], items[j][1]), (items[j][0], items[i][1])
    else:
        items.append((rng.choice(["kernels/k0.py", "extra.json", "state.safetensors.bak"]), rng.randbytes(64)))
    return write_zip(items)


def mutate_export(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One mutant of an export file: (the kind of mutation, the file's bytes)."""
    kind = rng.choice(["flip", "truncate", "splice", "zip", "json", "json", "json", "state", "manifest"])
    if kind == "flip":
        return kind, flip_bits(blob, rng)
    if kind == "truncate":
        return kind, truncate(blob, rng)
    if kind == "splice":
        return kind, splice(blob, rng)
    members = read_zip(blob)
    if kind == "zip":
        return kind, zip_edit(members, rng)
    if kind == "json":
        member = rng.choice(JSON_MEMBERS)
        members[member] = lie_in_json(members[member], rng)
        kind = f"json:{member}"
    elif kind == "state":
        members["state.safetensors"] = safetensors_lie(members["state.safetensors"], rng)
    else:  # the tensors' records lie, the member digests recomputed
        manifest = json.loads(members["checksums.json"])
        name = rng.choice(sorted(manifest["tensors"]))
        manifest["tensors"][name] = json.loads(lie_in_json(json.dumps(manifest["tensors"][name]).encode(), rng))
        members["checksums.json"] = json.dumps(manifest).encode()
    return kind, write_zip(list(with_checksums(members).items()))


def mutate_checkpoint(blob: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "flip", "truncate", "splice", "header", "header"])
    mutate = {"flip": flip_bits, "truncate": truncate, "splice": splice, "header": safetensors_lie}[kind]
    return kind, mutate(blob, rng)


# -- running --------------------------------------------------------------------------------------
_STEP = None


class _Hang(BaseException):
    """Raised by the alarm in a load that ran past TIMEOUT_S."""


def _on_alarm(signum, frame):
    raise _Hang()


def _init_worker() -> None:
    signal.signal(signal.SIGALRM, _on_alarm)


def _checkpoint_target():
    """A training step of the seed's architecture, built once per worker."""
    global _STEP
    if _STEP is None:
        import graphc as gc
        import graphc.nn as nn
        import graphc.nn.functional as F
        from graphc import optim

        x, y = seed_batch()
        model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        _STEP = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters()), (x, y),
                                      backend="reference")
    return _STEP


def load_one(kind: str, path: str) -> tuple[str, str, int]:
    """("ok" | "graphc" | "other" | "hang", detail, this worker's peak RSS) for loading the
    file at `path`."""
    from graphc.ir.errors import GraphcError

    signal.alarm(TIMEOUT_S)
    try:
        if kind == "export":
            import graphc as gc
            loaded = gc.load(path, backend="reference")
            loaded.traced_graph()
            if hasattr(loaded, "step_count"):
                loaded(*seed_batch())
        else:
            from graphc.train import load_checkpoint
            load_checkpoint(path, _checkpoint_target())
        outcome = ("ok", "")
    except GraphcError as exc:
        outcome = ("graphc", type(exc).__name__)
    except _Hang:
        outcome = ("hang", "")
    except Exception as exc:
        outcome = ("other", f"{type(exc).__name__}: {str(exc)[:200]}")
    finally:
        signal.alarm(0)
    return (*outcome, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def run(files: list[tuple[str, str, str]], workers: int) -> dict:
    """Load every (loader, mutation, path) in worker processes; tallies and examples. A worker
    that dies takes the file it held with it (a crash); the rest go to a fresh pool."""
    counts = collections.Counter()
    notes: list[str] = []
    peak = 0
    pending = list(files)
    context = multiprocessing.get_context("spawn")  # no fork of a process that ran OpenMP
    while pending:
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures = [pool.submit(load_one, loader, path) for loader, _, path in pending]
            batch, pending = pending, []
            for index, future in enumerate(futures):
                loader, mutation, path = batch[index]
                try:
                    outcome, detail, rss = future.result()
                except BrokenProcessPool:
                    counts["crash"] += 1
                    notes.append(f"CRASH {loader} {mutation} {path}")
                    pending = batch[index + 1:]
                    break
                counts[outcome] += 1
                peak = max(peak, rss)
                if outcome in ("other", "hang"):
                    notes.append(f"{outcome.upper()} {loader} {mutation} {path}: {detail}")
    return {"counts": counts, "notes": notes, "peak_rss": peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exports", type=int, default=1000)
    parser.add_argument("--checkpoints", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    start = time.perf_counter()
    directory = tempfile.mkdtemp(prefix="graphc-fuzz-")
    export, checkpoint = seed_files(directory)
    rng = random.Random(args.seed)
    files, kinds = [], collections.Counter()
    for loader, seed, count, mutate in (("export", export, args.exports, mutate_export),
                                        ("checkpoint", checkpoint, args.checkpoints, mutate_checkpoint)):
        blob = open(seed, "rb").read()
        for i in range(count):
            mutation, data = mutate(blob, rng)
            path = os.path.join(directory, f"{loader}-{i}")
            with open(path, "wb") as f:
                f.write(data)
            files.append((loader, mutation, path))
            kinds[f"{loader} {mutation.split(':')[0]}"] += 1
    result = run(files, args.workers)
    counts = result["counts"]
    print(f"files tried:       {len(files)} ({args.exports} exports, {args.checkpoints} checkpoints)")
    print(f"  mutations:       {dict(sorted(kinds.items()))}")
    print(f"loaded (and ran):  {counts['ok']}")
    print(f"GraphcError:       {counts['graphc']}")
    print(f"other exceptions:  {counts['other']}")
    print(f"crashes:           {counts['crash']}")
    print(f"hangs (>{TIMEOUT_S} s):     {counts['hang']}")
    print(f"peak RSS (worker): {result['peak_rss'] / 2 ** 20:.0f} MiB")
    print(f"time:              {time.perf_counter() - start:.0f} s")
    for line in result["notes"][:20]:
        print("  ", line)
    return 0 if counts["other"] == counts["crash"] == counts["hang"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
