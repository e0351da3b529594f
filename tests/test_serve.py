"""`graphc serve` (issue 22): the real server in a subprocess on a free loopback port, called over
HTTP with urllib. A tiny CNN exported batch-polymorphic (max_batch 8) is the model; every answer
is checked against gc.load(path)(x) on the same file."""
from __future__ import annotations

import base64
import io
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

import graphc as gc
import graphc.nn.functional as F
from graphc import nn
from graphc.export import _archive
from graphc.ir.errors import GraphcError, LoadError
from graphc.serve import GraphcRunner

MAX_BATCH = 8
SAMPLE = (1, 8, 8)
# a sample's outputs may differ by an ulp between batch sizes (serial or parallel kernels)
ATOL = 1e-6


def tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(4 * 3 * 3, 5))


def samples(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *SAMPLE)).astype(np.float32)


def export_model(path, seed: int, max_batch: int | None = MAX_BATCH) -> str:
    gc.manual_seed(seed)
    compiled = gc.compile(tiny_cnn(), example_inputs=samples(2, 0), backend="numba-cpu")
    compiled.export(str(path), max_batch=max_batch)
    return str(path)


class Server:
    """`graphc serve` in a subprocess; the port it bound is read from its first line."""

    def __init__(self, *models: str, args: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "graphc.cli", "serve", *models, "--port", "0",
             "--backend", "numba-cpu", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.process.stdout.readline()
        if " on http://" not in line:
            self.process.kill()
            raise AssertionError(f"server did not start: {line}{self.process.stderr.read()}")
        self.url = line.rsplit(" on ", 1)[1].strip()

    def request(self, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> tuple[int, dict | str]:
        req = urllib.request.Request(self.url + path, data=body,
                                     headers={"Content-Type": content_type} if body is not None else {})
        try:
            with urllib.request.urlopen(req, timeout=30) as response:
                status, text = response.status, response.read().decode()
        except urllib.error.HTTPError as error:
            status, text = error.code, error.read().decode()
        return status, (json.loads(text) if text.startswith("{") else text)

    def predict(self, x: np.ndarray, model: str = "tiny", **options) -> tuple[int, dict]:
        return self.request(f"/v1/models/{model}/predict",
                            json.dumps({"inputs": x.tolist(), **options}).encode())

    def metrics(self) -> dict[str, dict[tuple, float]]:
        """sample name -> {sorted label items: value}"""
        status, text = self.request("/metrics")
        assert status == 200
        found: dict[str, dict[tuple, float]] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return found

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return export_model(tmp_path_factory.mktemp("serve") / "tiny.gcx", seed=1)


@pytest.fixture(scope="module")
def reference(model_path):
    return gc.load(model_path, backend="numba-cpu")


@pytest.fixture(scope="module")
def server(model_path):
    # a long delay makes concurrent requests meet in one batch however slow the machine
    server = Server(model_path, args=("--max-batch", str(MAX_BATCH), "--max-delay-ms", "50",
                                      "--max-body-bytes", "20000"))
    yield server
    assert server.stop() == 0


def npy_bytes(x: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, x)
    return buffer.getvalue()


# -- the artefact -----------------------------------------------------------------------------
def test_bucketed_export_runs_every_batch_size_as_the_model(model_path, reference):
    gc.manual_seed(1)
    model = tiny_cnn()
    assert reference.buckets == [1, 2, 4, 8]
    for n in (1, 3, 5, 8):
        x = samples(n, n)
        expected = gc.compile(model, example_inputs=x, backend="numba-cpu")(x)
        np.testing.assert_allclose(reference(x), expected, atol=1e-6)
    with pytest.raises(GraphcError, match="1 to 8 samples"):
        reference(samples(9, 0))
    interpreted = gc.load(model_path, backend="reference")
    np.testing.assert_allclose(interpreted(samples(3, 3)), reference(samples(3, 3)), atol=ATOL)


def test_info_shows_the_batch_buckets(model_path):
    result = subprocess.run([sys.executable, "-m", "graphc.cli", "info", model_path],
                            capture_output=True, text=True, check=True)
    assert "batch: 1 to 8 samples, compiled per bucket 1, 2, 4, 8" in result.stdout


def test_bucket_graph_of_another_function_is_refused(model_path, tmp_path):
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(4 * 3 * 3, 7))
    other_path = tmp_path / "other.gcx"
    gc.compile(other, example_inputs=samples(2, 0), backend="numba-cpu").export(str(other_path), max_batch=8)
    import zipfile
    from safetensors.numpy import load
    with zipfile.ZipFile(model_path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(other_path) as z:
        members["buckets/2.json"] = z.read("buckets/2.json")
    state = load(members.pop("state.safetensors"))
    tampered = tmp_path / "tampered.gcx"
    tampered.write_bytes(_archive(members, state))
    with pytest.raises(LoadError, match="batch 2"):
        gc.load(str(tampered), backend="numba-cpu")


class TimeMajor(nn.Module):
    """Its inputs are (time, batch, features): axis 0 is not the batch."""

    def __init__(self, bidirectional: bool) -> None:
        super().__init__()
        self.rnn = nn.GRU(3, 4, bidirectional=bidirectional)

    def forward(self, x):
        return self.rnn(x)[0]


def test_a_model_whose_first_axis_mixes_samples_is_not_exported_for_padded_batches(tmp_path):
    """Padding a time-major bidirectional RNN's first axis (time) changed every output (0.25
    off at 5 steps padded to 8): such an export is refused. A unidirectional one, whose outputs
    depend on earlier steps only, pads as a batch would, and exports."""
    x = np.random.default_rng(0).standard_normal((8, 2, 3)).astype(np.float32)
    gc.manual_seed(0)
    with pytest.raises(gc.GraphcError, match="depends on the other samples of its batch"):
        gc.compile(TimeMajor(True), x).export(str(tmp_path / "bi.gcx"), max_batch=8)
    model = TimeMajor(False)
    gc.compile(model, x).export(str(tmp_path / "uni.gcx"), max_batch=8)
    np.testing.assert_allclose(np.asarray(gc.load(str(tmp_path / "uni.gcx"))(x[:5])),
                               gc.compile(model, x[:5], backend="reference")(x[:5]), rtol=1e-5, atol=1e-6)


class TimeMajorAttention(nn.Module):
    """Token ids (time, batch) attended over time: the two rows of the check must hold different
    ids (identical ones mixed by attention read as samples apart)."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb, self.q = nn.Embedding(vocab, 4), nn.Linear(4, 4)

    def forward(self, ids):
        e = self.emb(ids).transpose(0, 1)  # (N, T, d)
        return (F.softmax(self.q(e) @ e.transpose(1, 2), -1) @ e).transpose(0, 1)


def test_integer_inputs_whose_rows_interact_are_refused_too(tmp_path):
    ids = np.random.default_rng(0).integers(0, 10, size=(8, 2))
    gc.manual_seed(0)
    with pytest.raises(gc.GraphcError, match="depends on the other samples of its batch"):
        gc.compile(TimeMajorAttention(10), ids).export(str(tmp_path / "tm.gcx"), max_batch=8)
    one_id = np.zeros((8, 2), np.int64)  # an id of 1 indexes nothing: the check reads 0 in both rows
    gc.compile(TimeMajorAttention(1), one_id).export(str(tmp_path / "one.gcx"), max_batch=8)


def test_a_runner_compiles_only_the_buckets_its_max_batch_reaches(model_path):
    runner = GraphcRunner.from_file(model_path, max_batch=3, backend="numba-cpu")
    # 8 is graph.json's own batch, compiled by gc.load; 1, 2 and 4 serve batches of 1 to 3
    assert runner.max_batch == 3 and sorted(runner._function._executables) == [1, 2, 4, 8]
    runner = GraphcRunner.from_file(model_path, max_batch=1, backend="numba-cpu")
    assert sorted(runner._function._executables) == [1, 8]


def test_a_batch_just_over_a_bucket_runs_as_bucket_sized_calls(model_path, reference, monkeypatch):
    from graphc.export import batch_buckets
    from graphc.serve import runner as runner_module

    buckets = batch_buckets(64)
    assert runner_module.bucket_chunks(33, buckets) == [32, 1]  # not padded to 64
    assert runner_module.bucket_chunks(40, buckets) == [32, 8]
    assert runner_module.bucket_chunks(63, buckets) == [63]  # one padded call is cheaper
    runner = GraphcRunner.from_file(model_path, backend="numba-cpu")
    monkeypatch.setattr(runner_module, "_CALL_COST_IN_SAMPLES", 0)  # calls free: 7 = 4 + 2 + 1
    assert runner_module.bucket_chunks(7, runner._function.buckets) == [4, 2, 1]
    x = samples(7, 11)
    np.testing.assert_allclose(runner.run(x), reference(x), atol=ATOL)


def test_fixed_batch_export_serves_smaller_batches_padded(tmp_path):
    path = export_model(tmp_path / "fixed.gcx", seed=1, max_batch=None)
    runner = GraphcRunner.from_file(path, backend="numba-cpu")
    assert runner.max_batch == 2 and runner.input.shape == SAMPLE
    x = samples(2, 3)
    np.testing.assert_array_equal(runner.run(x[:1]), gc.load(path, backend="numba-cpu")(x)[:1])


@pytest.mark.parametrize("array", [np.arange(24, dtype=np.float32).reshape(2, 3, 4),
                                   np.arange(10.0).reshape(2, 5).copy(order="F"),
                                   np.arange(3, dtype=">i4"), np.float32(2).reshape(()),
                                   np.zeros((0, 3), np.uint8)],
                         ids=["float32", "fortran", "big-endian", "scalar", "empty"])
def test_npy_bodies_read_as_np_load_reads_them(array):
    from graphc.serve.app import _parse_npy
    body = npy_bytes(array)
    header_end = body.index(b"\n") + 1
    # the same array under a header np.save would not write (keys reordered): np.load's path
    reordered = body[10:header_end].decode().replace("{'descr'", "{'shape': %r, 'descr'" % (array.shape,))
    reordered = reordered.replace(", 'shape': %r, }" % (array.shape,), ", }")
    other = b"\x93NUMPY\x01\x00" + len(reordered).to_bytes(2, "little") + reordered.encode() + body[header_end:]
    # base64 as `base64` and MIME write it: in lines of 76 characters
    for body in (body, other, base64.b64encode(body), base64.encodebytes(body)):
        parsed = _parse_npy(body)
        assert parsed.dtype == array.dtype and parsed.flags.writeable
        np.testing.assert_array_equal(parsed, array)
    if array.size:
        with pytest.raises(Exception, match="unreadable .npy body"):
            _parse_npy(npy_bytes(array)[:-1])


# -- predictions ------------------------------------------------------------------------------
def test_json_and_npy_predictions_equal_the_loaded_function(server, reference):
    x = samples(3, 7)
    expected = reference(x)
    status, answer = server.predict(x)
    assert status == 200, answer
    assert answer["model"] == "tiny" and answer["version"] == 1
    np.testing.assert_array_equal(np.asarray(answer["outputs"], np.float32), expected)
    for body in (npy_bytes(x), base64.b64encode(npy_bytes(x))):
        status, answer = server.request("/v1/models/tiny/predict", body, "application/x-npy")
        assert status == 200, answer
        np.testing.assert_array_equal(np.asarray(answer["outputs"], np.float32), expected)


def test_top_k_and_softmax(server, reference):
    x = samples(2, 8)
    logits = reference(x).astype(np.float64)
    status, answer = server.predict(x, top_k=2, softmax=True)
    assert status == 200, answer
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(answer["outputs"], probabilities, rtol=1e-5)
    np.testing.assert_array_equal(answer["top_k"]["indices"], np.argsort(-logits, axis=1)[:, :2])


def test_concurrent_requests_are_batched_and_answered_each_their_own(server, reference):
    before = server.metrics()["graphc_batch_size_count"].get((("model", "tiny"),), 0)
    inputs = [samples(1, 100 + i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(server.predict, inputs))
    for x, (status, answer) in zip(inputs, answers):
        assert status == 200, answer
        np.testing.assert_allclose(np.asarray(answer["outputs"], np.float32), reference(x), atol=ATOL)
    batches = server.metrics()["graphc_batch_size_count"][(("model", "tiny"),)] - before
    assert batches < 32  # some calls ran several requests


BAD_REQUESTS = [  # name, path, body, content type, status, words of the error
    ("wrong shape", "tiny", json.dumps({"inputs": np.zeros((2, 1, 8, 7)).tolist()}), None, 400,
     "shape [1, 8, 8]"),
    ("strings", "tiny", json.dumps({"inputs": [[["a"] * 8] * 8]}), None, 400, "numbers"),
    ("npy float64", "tiny", npy_bytes(np.zeros((1, *SAMPLE))), "application/x-npy", 400,
     "float64"),
    ("ragged", "tiny", json.dumps({"inputs": [[[0.0] * 8] * 8, [[0.0] * 7] * 8]}), None, 400,
     "ragged"),
    ("malformed JSON", "tiny", '{"inputs": [1, 2', None, 400, "malformed JSON"),
    ("deep JSON", "tiny", '{"inputs": ' + "[" * 5000 + "]" * 5000 + "}", None, 400, "nested too deeply"),
    ("deep inputs", "tiny", '{"inputs": ' + "[" * 100 + "1" + "]" * 100 + "}", None, 400,
     "nested too deeply"),
    ("nulls", "tiny", json.dumps({"inputs": [None]}), None, 400, "numbers"),
    ("not an object", "tiny", "[1, 2]", None, 400, "JSON object"),
    ("missing inputs", "tiny", json.dumps({"input": []}), None, 400, '"inputs"'),
    ("empty inputs", "tiny", json.dumps({"inputs": []}), None, 400, "non-empty"),
    ("too many samples", "tiny", npy_bytes(np.zeros((9, *SAMPLE), np.float32)), "application/x-npy",
     400, "9 samples"),
    ("body too large", "tiny", json.dumps({"inputs": np.zeros((8, *SAMPLE)).tolist(), "pad": "x" * 20000}),
     None, 413, "20000-byte limit"),
    ("not npy", "tiny", b"\x00\x01 not base64", "application/x-npy", 400, ".npy"),
    ("NaN", "tiny", npy_bytes(np.full((1, *SAMPLE), np.nan, np.float32)), "application/x-npy", 400,
     "NaN"),
    ("bad top_k", "tiny", json.dumps({"inputs": np.zeros((1, *SAMPLE)).tolist(), "top_k": 6}),
     None, 400, "top_k"),
    ("unknown model", "nope", json.dumps({"inputs": [1]}), None, 404, "no model named 'nope'"),
    ("integer of 4301 digits", "tiny", '{"inputs": [' + "1" * 4301 + "]}", None, 400, "unreadable JSON"),
    # beyond int64 (NumPy keeps them as Python ints) and beyond float32: not "strings or nulls"
    ("integer beyond float32", "tiny", json.dumps({"inputs": [[[[10**39] * 8] * 8]]}), None, 400,
     "too large for float32"),
    ("integer beyond float64", "tiny", json.dumps({"inputs": [[[[10**309] * 8] * 8]]}), None, 400,
     "too large for float32"),
]


def test_json_integers_beyond_int64_are_numbers_and_integer_models_refuse_what_would_wrap():
    from types import SimpleNamespace

    from graphc.serve.app import RequestError, _checked_samples, _samples_from_json

    def model_taking(dtype):
        return SimpleNamespace(name="m", input=SimpleNamespace(shape=(2,), dtype=np.dtype(dtype)))

    floats = model_taking("float32")
    array = _samples_from_json([[10**20, 1.5]], floats)
    np.testing.assert_array_equal(_checked_samples(array, floats, 8, False), np.float32([[1e20, 1.5]]))
    ids = model_taking("int32")
    np.testing.assert_array_equal(_checked_samples(_samples_from_json([[2**31 - 1, -2**31]], ids),
                                                   ids, 8, False), [[2**31 - 1, -2**31]])
    for too_large in ([[2**31, 0]], [[10**20, 0]]):  # an int32 cast would wrap 2**31 to -2**31
        with pytest.raises(RequestError, match="integers outside int32's range"):
            _checked_samples(_samples_from_json(too_large, ids), ids, 8, False)
    # 2**63 beside a float is a float64 equal to int64's maximum as a float: it was computed on
    # as -2**63
    longs = model_taking("int64")
    for too_large in ([[2**63, 1.0]], [[2**63 + 1000, 1.0]], [[2**63, 1]]):
        with pytest.raises(RequestError, match="outside int64's range"):
            _checked_samples(_samples_from_json(too_large, longs), longs, 8, False)
    # beside a float, integers past 2**53 were rounded (NumPy's float64), and int64's maximum
    # refused: each is taken as written
    for ids in ([[2**53 + 1, 1.0]], [[2**63 - 1, 1.0]], [[-2**63, 2.0]]):
        got = _checked_samples(_samples_from_json(ids, longs), longs, 8, False)
        assert got.tolist() == [[int(v) for v in ids[0]]]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_4xx_naming_the_mistake(server, case):
    _, model, body, content_type, status, words = case
    body = body.encode() if isinstance(body, str) else body
    got, answer = server.request(f"/v1/models/{model}/predict", body, content_type or "application/json")
    assert got == status, answer
    assert words in answer["error"]


def test_a_query_option_of_non_ascii_digits_is_a_400_not_a_500(server):
    got, answer = server.request("/v1/models/tiny/predict?top_k=%C2%B2",  # '²': a digit to isdigit
                                 npy_bytes(np.zeros((1, *SAMPLE), np.float32)), "application/x-npy")
    assert got == 400 and "top_k" in answer["error"]


def test_a_bad_request_never_fails_the_good_ones_in_its_batch(server, reference):
    good = [samples(1, 200 + i) for i in range(8)]
    bad = [np.zeros((1, 1, 8, 7), np.float32)] * 8
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(server.predict, [x for pair in zip(good, bad) for x in pair]))
    for x, (status, answer) in zip(good, answers[0::2]):
        assert status == 200, answer
        np.testing.assert_allclose(np.asarray(answer["outputs"], np.float32), reference(x), atol=ATOL)
    assert all(status == 400 for status, _ in answers[1::2])
    assert server.request("/healthz") == (200, {"status": "ok", "models": 1})


def test_models_and_metrics_endpoints(server):
    status, listing = server.request("/v1/models")
    assert status == 200
    assert listing["models"] == [{"name": "tiny", "version": 1, "max_batch": MAX_BATCH,
                                  "input": {"shape": list(SAMPLE), "dtype": "float32"},
                                  "output": {"shape": [5], "dtype": "float32"}}]
    server.predict(samples(1, 0))
    server.predict(np.zeros((1, 2), np.float32))
    metrics = server.metrics()
    requests = metrics["graphc_requests_total"]
    assert requests[(("model", "tiny"), ("status", "200"))] >= 1
    assert requests[(("model", "tiny"), ("status", "400"))] >= 1
    assert metrics["graphc_request_latency_seconds_count"][(("model", "tiny"),)] >= 1
    assert metrics["graphc_queue_depth"][(("model", "tiny"),)] == 0
    assert metrics["graphc_model_load_seconds"][(("model", "tiny"),)] > 0
    assert metrics["graphc_model_version"][(("model", "tiny"),)] == 1


# -- updates and shutdown ---------------------------------------------------------------------
def test_update_under_load_fails_no_request_and_a_bad_file_keeps_the_version(model_path, tmp_path):
    new_path = export_model(tmp_path / "tiny_v2.gcx", seed=2)
    expected = {1: gc.load(model_path, backend="numba-cpu"), 2: gc.load(new_path, backend="numba-cpu")}
    server = Server(model_path, args=("--max-batch", str(MAX_BATCH), "--max-delay-ms", "2"))
    try:
        failures, versions, stop = [], set(), threading.Event()

        def client(seed: int) -> None:
            while not stop.is_set():
                x = samples(1 + seed % 3, seed)
                status, answer = server.predict(x)
                if status != 200:
                    failures.append(answer)
                    continue
                versions.add(answer["version"])
                outputs = np.asarray(answer["outputs"], np.float32)
                if not np.allclose(outputs, expected[answer["version"]](x), rtol=0, atol=ATOL):
                    failures.append(f"version {answer['version']} answered other outputs")

        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        status, answer = server.request("/v1/models/tiny/load", json.dumps({"path": new_path}).encode())
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert status == 200 and answer == {"model": "tiny", "version": 2, "previous_version": 1}
        assert not failures, failures[:3]
        assert versions == {1, 2}

        broken = tmp_path / "broken.gcx"
        broken.write_bytes(open(new_path, "rb").read()[:-100])
        status, answer = server.request("/v1/models/tiny/load", json.dumps({"path": str(broken)}).encode())
        assert status == 400 and "keeps version 2" in answer["error"] and "broken.gcx" in answer["error"]
        status, answer = server.predict(samples(1, 5))
        assert status == 200 and answer["version"] == 2
    finally:
        assert server.stop() == 0


def test_sigterm_answers_the_request_in_flight_and_exits_0(model_path):
    # the batcher holds a lone request 1.5 s waiting for company: SIGTERM arrives meanwhile
    server = Server(model_path, args=("--max-delay-ms", "1500"))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(server.predict, samples(1, 9))
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        status, answer = pending.result(timeout=30)
    assert status == 200 and answer["version"] == 1
    assert server.process.wait(timeout=30) == 0


def test_sigterm_answers_a_request_whose_body_is_still_arriving(model_path):
    """Draining waits for the requests in flight before it closes connections: one whose upload
    SIGTERM cut in two is read to its end and answered."""
    import socket
    from urllib.parse import urlsplit

    server = Server(model_path)
    address = urlsplit(server.url)
    body = json.dumps({"inputs": samples(1, 9).tolist()}).encode()
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(f"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\nContent-Type: "
                           f"application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        connection.sendall(body[10:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["version"] == 1
    assert server.process.wait(timeout=30) == 0


def test_json_booleans_anywhere_are_refused_and_whole_floats_are_ids():
    from types import SimpleNamespace

    from graphc.serve.app import RequestError, _checked_samples, _samples_from_json

    def model_taking(dtype):
        return SimpleNamespace(name="m", input=SimpleNamespace(shape=(3,), dtype=np.dtype(dtype)))

    for dtype in ("float32", "int64"):
        with pytest.raises(RequestError, match="not booleans"):
            _samples_from_json([[1, 2, 3], [True, 2.5, 3.0]], model_taking(dtype))
    ids = model_taking("int64")
    np.testing.assert_array_equal(_samples_from_json([[0.0, 1.0, 4.0]], ids), [[0, 1, 4]])
    with pytest.raises(RequestError, match="numbers with fractions"):
        _samples_from_json([[0.0, 1.5, 4.0]], ids)
    floats = model_taking("float32")
    big_endian = np.array([[1.5, -2.0, 3.0]], ">f4")
    np.testing.assert_array_equal(_checked_samples(big_endian, floats, 8, True), [[1.5, -2.0, 3.0]])
    with pytest.raises(RequestError, match="takes float32 inputs; the .npy body holds float64"):
        _checked_samples(big_endian.astype(">f8"), floats, 8, True)


def test_a_body_too_slow_to_arrive_gets_408_and_its_connection_closed(model_path):
    import socket
    server = Server(model_path, args=("--body-timeout-s", "1"))
    try:
        host, port = server.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=20) as slow:
            slow.sendall(b"POST /v1/models/tiny/predict HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"in")
            reply = b""
            while chunk := slow.recv(4096):  # read until the server closes the connection
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in reply
        x = np.zeros((1, 1, 8, 8), np.float32)
        assert server.predict(x)[0] == 200  # the others are served
    finally:
        assert server.stop() == 0


def test_accept_errors_with_every_descriptor_taken_are_logged_once_in_a_while(caplog):
    from types import SimpleNamespace

    from graphc.serve.app import _AcceptErrorsOnceInAWhile
    passed = []
    loop = SimpleNamespace(default_exception_handler=passed.append)
    handler = _AcceptErrorsOnceInAWhile()
    with caplog.at_level("ERROR", logger="graphc.serve"):
        for _ in range(100):
            handler(loop, {"message": "socket.accept() out of system resource",
                           "exception": OSError(24, "Too many open files")})
    assert len(caplog.records) == 1 and "ulimit -n" in caplog.records[0].getMessage()
    handler(loop, {"message": "something else"})
    assert passed == [{"message": "something else"}]
