"""The server over a runner that is not graphc's (as an onnxruntime-backed peer plugs in): the
runner interface is all the HTTP stack, batcher and /load need. In-process on a free loopback
port, with aiohttp's client."""
from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from graphc.ir.errors import LoadError
from graphc.serve import TensorSpec, make_app


class Affine:
    """y = x @ weight + shift, in NumPy; records the batch sizes it ran."""

    def __init__(self, name: str, shift: float, max_batch: int = 16, broken: bool = False) -> None:
        self.name, self.version, self.max_batch = name, 1, max_batch
        self.input = TensorSpec((3,), np.dtype(np.float32))
        self.output = TensorSpec((2,), np.dtype(np.float32))
        self.weight = np.arange(6, dtype=np.float32).reshape(3, 2)
        self.shift, self.broken, self.batches = shift, broken, []

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        if self.broken:
            return np.zeros((len(batch) + 1, 2), np.float32)
        return batch @ self.weight + np.float32(self.shift)


def loader(path: str, name: str, max_batch: int) -> Affine:
    if path == "missing.bin":
        raise LoadError(path, "no such file")
    return Affine(name, shift=float(path), max_batch=max_batch)


def run_with_server(runners, check, loader=loader, **options) -> None:
    async def main() -> None:
        server = TestServer(make_app(runners, loader=loader, **options), host="127.0.0.1")
        await server.start_server()
        try:
            async with ClientSession(str(server.make_url(""))) as session:
                await check(session)
        finally:
            await server.close()
    asyncio.run(main())


async def predict(session, name: str, x: np.ndarray) -> tuple[int, dict]:
    async with session.post(f"/v1/models/{name}/predict", json={"inputs": x.tolist()}) as r:
        return r.status, await r.json()


def test_a_numpy_runner_is_batched_updated_and_listed():
    runner = Affine("affine", shift=0.0)
    x = np.random.default_rng(0).standard_normal((24, 3)).astype(np.float32)

    async def check(session) -> None:
        answers = await asyncio.gather(*(predict(session, "affine", x[i:i + 1]) for i in range(24)))
        for i, (status, answer) in enumerate(answers):
            assert status == 200, answer
            np.testing.assert_allclose(answer["outputs"], x[i:i + 1] @ runner.weight, rtol=1e-6)
        assert max(runner.batches) > 1 and max(runner.batches) <= 16 and sum(runner.batches) == 24
        async with session.post("/v1/models/affine/load", json={"path": "missing.bin"}) as r:
            assert r.status == 400 and "keeps version 1" in (await r.json())["error"]
        async with session.post("/v1/models/affine/load", json={"path": "10"}) as r:
            assert (await r.json()) == {"model": "affine", "version": 2, "previous_version": 1}
        status, answer = await predict(session, "affine", x[:2])
        assert answer["version"] == 2
        np.testing.assert_allclose(answer["outputs"], x[:2] @ runner.weight + 10, rtol=1e-6)
        async with session.get("/v1/models") as r:
            assert (await r.json())["models"] == [{
                "name": "affine", "version": 2, "max_batch": 16,
                "input": {"shape": [3], "dtype": "float32"}, "output": {"shape": [2], "dtype": "float32"}}]

    run_with_server([runner], check, max_batch=16, max_delay_ms=20)


def test_a_runner_returning_the_wrong_shape_is_a_500_and_the_server_goes_on():
    broken, good = Affine("broken", 0.0, broken=True), Affine("good", 0.0)

    async def check(session) -> None:
        status, answer = await predict(session, "broken", np.zeros((2, 3), np.float32))
        assert status == 500 and "returned (3, 2) for 2 samples" in answer["error"]
        status, answer = await predict(session, "good", np.ones((1, 3), np.float32))
        assert status == 200 and answer["outputs"] == [[6.0, 9.0]]
        async with session.get("/no/such/route") as r:
            assert r.status == 404 and "error" in json.loads(await r.text())

    run_with_server([broken, good], check)


def test_requests_rarer_than_the_delay_run_at_once_and_a_burst_still_batches():
    runner = Affine("affine", shift=0.0)
    x = np.ones((1, 3), np.float32)

    async def check(session) -> None:
        for _ in range(3):  # one request every 0.6 s: waiting 0.3 s for a second gains nothing
            started = time.perf_counter()
            status, answer = await predict(session, "affine", x)
            assert status == 200 and time.perf_counter() - started < 0.15, answer
            await asyncio.sleep(0.6)
        assert runner.batches == [1, 1, 1]
        answers = await asyncio.gather(*(predict(session, "affine", x) for _ in range(40)))
        assert all(status == 200 for status, _ in answers)
        assert max(runner.batches) > 1 and sum(runner.batches) == 43

    run_with_server([runner], check, max_batch=16, max_delay_ms=300)


class Slow(Affine):
    """An Affine runner taking 0.3 s a call, which refuses batches over its max_batch (as a
    bucketed export does) and rows whose first feature is 99 (as an id out of range is)."""

    def run(self, batch: np.ndarray) -> np.ndarray:
        from graphc.ir.errors import IndexOutOfRangeError
        self.batches.append(len(batch))
        if len(batch) > self.max_batch:
            raise IndexError(f"{len(batch)} samples over max_batch {self.max_batch}")
        time.sleep(0.3)
        if (batch[:, 0] == 99).any():
            raise IndexOutOfRangeError("gather", 99, (int(np.argmax(batch[:, 0] == 99)), 0), 0, 10)
        return batch @ self.weight + np.float32(self.shift)


def test_requests_queued_before_an_update_are_batched_for_the_version_they_run_on():
    """Requests validated for version 1 (4 samples a call) were gathered up to version 2's
    limit (64) and run on version 1, which failed every one of them with a 500."""
    first = Slow("slow", 0.0, max_batch=4)

    async def check(session) -> None:
        x = np.ones((3, 3), np.float32)
        busy = asyncio.ensure_future(predict(session, "slow", x))
        await asyncio.sleep(0.05)  # the worker runs `busy`: the next requests queue
        queued = [asyncio.ensure_future(predict(session, "slow", x)) for _ in range(4)]
        await asyncio.sleep(0.05)
        async with session.post("/v1/models/slow/load", json={"path": "64"}) as r:
            assert (await r.json())["version"] == 2
        for status, answer in [await busy, *[await q for q in queued]]:
            assert status == 200 and answer["version"] == 1, answer
        assert max(first.batches) <= 4

    run_with_server([first], check, max_batch=64, max_delay_ms=50,
                    loader=lambda path, name, max_batch: Slow(name, float(path), max_batch=64))


def test_one_requests_bad_input_fails_only_that_request():
    """An id out of range in one request failed every request batched with it (500s naming
    another client's input); now the batch runs again request by request, and only the one at
    fault is answered, with a 400."""
    runner = Slow("slow", 0.0, max_batch=16)

    async def check(session) -> None:
        good, bad = np.ones((1, 3), np.float32), np.full((1, 3), 99, np.float32)
        await asyncio.sleep(0)
        answers = await asyncio.gather(*(predict(session, "slow", bad if i == 3 else good)
                                         for i in range(8)))
        statuses = [status for status, _ in answers]
        assert statuses == [200] * 3 + [400] + [200] * 4, answers
        assert "refused the inputs" in answers[3][1]["error"]
        assert max(runner.batches) > 1  # they were batched, then run apart

    run_with_server([runner], check, max_batch=16, max_delay_ms=100)


def test_answers_are_strict_json_and_softmax_takes_infinite_logits():
    """An infinite output was written as bare Infinity (strict JSON parsers refuse it), and
    softmax of a row holding +inf was NaN with top_k index 0."""
    class Infinite(Affine):
        def run(self, batch: np.ndarray) -> np.ndarray:
            return np.tile(np.array([[-np.inf, np.inf]], np.float32), (len(batch), 1))

    async def check(session) -> None:
        body = {"inputs": [[1, 2, 3]], "softmax": True, "top_k": 1}
        async with session.post("/v1/models/inf/predict", json=body) as r:
            text = await r.text()
        answer = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in {text}"))
        assert answer["outputs"] == [[0.0, 1.0]] and answer["top_k"]["indices"] == [[1]]
        async with session.post("/v1/models/inf/predict", json={"inputs": [[1, 2, 3]]}) as r:
            assert (await r.json())["outputs"] == [["-Infinity", "Infinity"]]

    run_with_server([Infinite("inf", 0.0)], check)


def test_compressed_bodies_and_unopenable_paths_are_refused_with_a_4xx():
    """A gzip body was inflated on the event loop however large it grew (a 2 MB bomb stalled
    the server for seconds); a NUL in a /load path was a 500 with a traceback."""
    import gzip

    async def check(session) -> None:
        body = gzip.compress(json.dumps({"inputs": [[1, 2, 3]]}).encode())
        async with session.post("/v1/models/affine/predict", data=body, headers={
                "Content-Type": "application/json", "Content-Encoding": "gzip"}) as r:
            assert r.status == 415 and "send the body uncompressed" in (await r.json())["error"]
        async with session.post("/v1/models/affine/load", json={"path": "m\u0000.gcx"}) as r:
            assert r.status == 400 and "keeps version 1" in (await r.json())["error"]

    def opening(path: str, name: str, max_batch: int) -> Affine:
        open(path).close()
        return Affine(name, 0.0)

    run_with_server([Affine("affine", 0.0)], check, loader=opening)


def test_a_runner_whose_rows_read_the_rows_before_them_runs_each_request_alone():
    """Two requests in one call of a model whose later rows read earlier ones (a time-major
    RNN, a running sum over the batch) would mix one client's data into the other's answer."""
    runner = Slow("causal", 0.0, max_batch=16)
    runner.batches_requests = False

    async def check(session) -> None:
        answers = await asyncio.gather(*(predict(session, "causal", np.ones((2, 3), np.float32))
                                         for _ in range(5)))
        assert all(status == 200 for status, _ in answers)
        assert runner.batches == [2] * 5

    run_with_server([runner], check, max_batch=16, max_delay_ms=100)
