"""Hypothesis drives the loader fuzzer's mutators (benchmarks/fuzz_loaders.py) in process: a
mutated export or checkpoint is refused with a GraphcError, or loads and runs; nothing else."""
import importlib.util
import os
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphc as gc
from graphc.ir.errors import GraphcError

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                     "fuzz_loaders.py")
_spec = importlib.util.spec_from_file_location("fuzz_loaders", _PATH)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

FIXTURE_OK = [HealthCheck.function_scoped_fixture]


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    export, checkpoint = fuzz.seed_files(str(tmp_path_factory.mktemp("seeds")))
    return open(export, "rb").read(), open(checkpoint, "rb").read()


def load_export(path):
    loaded = gc.load(path, backend="reference")
    loaded.traced_graph()
    loaded(*fuzz.seed_batch())


@settings(max_examples=120, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_mutated_exports_raise_only_graphc_errors(seeds, tmp_path, seed):
    _, blob = fuzz.mutate_export(seeds[0], random.Random(seed))
    path = tmp_path / "mutant.gcx"
    path.write_bytes(blob)
    try:
        load_export(str(path))
    except GraphcError:
        pass


@settings(max_examples=60, deadline=None, suppress_health_check=FIXTURE_OK)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_mutated_checkpoints_raise_only_graphc_errors(seeds, tmp_path, seed):
    from graphc.train import load_checkpoint

    _, blob = fuzz.mutate_checkpoint(seeds[1], random.Random(seed))
    path = tmp_path / "mutant.safetensors"
    path.write_bytes(blob)
    try:
        load_checkpoint(str(path), fuzz._checkpoint_target())
    except GraphcError:
        pass


def test_manifest_entries_of_any_type_are_refused_cleanly(seeds, tmp_path):
    """Found by the fuzzer: a tensor record whose dtype was a JSON object raised TypeError."""
    import json

    members = fuzz.read_zip(seeds[0])
    manifest = json.loads(members["checksums.json"])
    for bad in ({}, [], None, 3, "f4"):
        record = next(iter(manifest["tensors"].values()))
        record["dtype"] = bad
        members["checksums.json"] = json.dumps(manifest).encode()
        path = tmp_path / "manifest.gcx"
        path.write_bytes(fuzz.write_zip(list(fuzz.with_checksums(members).items())))
        with pytest.raises(GraphcError, match="checksums.json: malformed entry for tensor"):
            load_export(str(path))


def true_shape(doc, depth=0):
    """(nesting depth, element count) of a parsed JSON value."""
    if isinstance(doc, dict):
        inner = [true_shape(v, depth + 1) for v in doc.values()]
        return max([depth + 1] + [d for d, _ in inner]), 1 + 2 * len(doc) + sum(n - 1 for _, n in inner)
    if isinstance(doc, list):
        inner = [true_shape(v, depth + 1) for v in doc]
        return max([depth + 1] + [d for d, _ in inner]), 1 + sum(n for _, n in inner)
    return depth, 1


JSON_TEXT = st.text(alphabet=st.sampled_from('ab"\\[]{},:\n é'), max_size=8)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | JSON_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(JSON_TEXT, children, max_size=4),
    max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURE_OK)
@given(doc=JSON_VALUES, chunk=st.sampled_from([1, 2, 3, 7, 1 << 20]), indent=st.sampled_from([None, 1]))
def test_json_shape_counts_nesting_without_parsing(monkeypatch, doc, chunk, indent):
    """Strings holding brackets, quotes and backslashes are skipped, across chunk boundaries."""
    import json

    from graphc.ir import serialize

    monkeypatch.setattr(serialize, "_SCAN_CHUNK", chunk)
    depth, items = serialize.json_shape(json.dumps(doc, indent=indent, ensure_ascii=False))
    expected_depth, expected_items = true_shape(doc)
    assert depth == expected_depth and items >= expected_items
