"""The HTTP server: request parsing and validation, one dynamic batcher per model, metrics,
zero-downtime model updates and graceful shutdown (the package docstring lists the endpoints)."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import math
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from graphc.ir.errors import GraphcError, IndexOutOfRangeError, InputError

from .runner import GraphcRunner, Runner

log = logging.getLogger("graphc.serve")

NPY_CONTENT_TYPE = "application/x-npy"
_NPY_MAGIC = b"\x93NUMPY"
_LATENCY_BUCKETS = (.0005, .001, .002, .005, .01, .02, .03, .05, .075, .1, .25, .5, 1, 2.5, 5, 10)
_LONGEST_GAP = 1.0  # seconds: the arrival rate of an idle model (an idle hour is not a rate)
_UNKNOWN_MODEL = "(unknown)"  # the label of requests for names no model has: bounded cardinality

Loader = Callable[..., Runner]


class RequestError(Exception):
    """A client mistake: answered with `status` and {"error": message}, never a 5xx."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _ModelFailure(Exception):
    """A runner raised on a request run alone: a 500 for it."""


# What a runner raises for one request's own input (an id out of a table's range): a 400.
_INPUT_FAULTS = (IndexOutOfRangeError, InputError)


@dataclass
class _Pending:
    """One validated request waiting for its batch: its samples and the runner it was
    validated against (a request queued before an update runs on the version it was checked for)."""

    samples: np.ndarray
    runner: Runner
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class _Metrics:
    def __init__(self, max_batch: int) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("graphc_requests", "Prediction requests by model and HTTP status",
                                ["model", "status"], registry=r)
        self.latency = Histogram("graphc_request_latency_seconds", "Prediction latency, from "
                                 "the request read to the answer ready", ["model"],
                                 buckets=_LATENCY_BUCKETS, registry=r)
        sizes = sorted({1 << k for k in range(max_batch.bit_length())} | {max_batch})
        self.batch_size = Histogram("graphc_batch_size", "Samples per compiled call", ["model"],
                                    buckets=sizes, registry=r)
        self.queue_depth = Gauge("graphc_queue_depth", "Samples waiting for a batch", ["model"],
                                 registry=r)
        self.load_seconds = Gauge("graphc_model_load_seconds", "Seconds the serving version took "
                                  "to load, verify and compile", ["model"], registry=r)
        self.version = Gauge("graphc_model_version", "The version serving", ["model"], registry=r)


class _Model:
    """One name's serving state: the current runner, its request queue and batcher, and the
    worker thread every batch of this model runs on."""

    def __init__(self, runner: Runner, max_batch: int, max_delay: float, metrics: _Metrics) -> None:
        self.runner = runner
        self.name = runner.name
        self.server_max_batch = max_batch
        self.max_batch = min(max_batch, runner.max_batch)
        self.max_delay = max_delay
        self.metrics = metrics
        self.queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix=f"graphc-serve-{self.name}")
        self.load_lock = asyncio.Lock()
        self._held: _Pending | None = None  # took no place in the last batch: first of the next
        self._queued_samples = 0
        # when the last request joined the queue, and a moving average of the gaps between
        # arrivals: a batch waits for more only while the next is due before its deadline
        self._last_arrival = -math.inf
        self._arrival_gap = _LONGEST_GAP
        self.batcher: asyncio.Task | None = None
        metrics.version.labels(self.name).set(runner.version)
        metrics.load_seconds.labels(self.name).set(getattr(runner, "load_seconds", 0.0))

    def limit(self, runner: Runner) -> int:
        """The most samples one call of `runner` takes: a request is checked, and a batch
        gathered, against the version it runs on (an update may raise the limit meanwhile)."""
        return min(self.server_max_batch, runner.max_batch)

    def switch(self, runner: Runner) -> None:
        """Serve `runner` from the next request on; queued requests keep the version they were
        validated against."""
        self.runner = runner
        self.max_batch = self.limit(runner)
        self.metrics.version.labels(self.name).set(runner.version)
        self.metrics.load_seconds.labels(self.name).set(getattr(runner, "load_seconds", 0.0))

    async def predict(self, samples: np.ndarray, runner: Runner) -> np.ndarray:
        pending = _Pending(samples, runner)
        now = asyncio.get_running_loop().time()
        self._arrival_gap += 0.2 * (min(now - self._last_arrival, _LONGEST_GAP) - self._arrival_gap)
        self._last_arrival = now
        self._queued_samples += len(samples)
        self.metrics.queue_depth.labels(self.name).set(self._queued_samples)
        self.queue.put_nowait(pending)
        return await pending.done

    async def run_batches(self) -> None:
        """Forever: gather a batch (see _gather), run it as one call on the worker thread, hand
        each request its rows. Requests arriving while a batch runs queue up for the next."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather(loop)
            runner = batch[0].runner
            samples = batch[0].samples if len(batch) == 1 else np.concatenate([p.samples for p in batch])
            self._queued_samples -= len(samples)
            self.metrics.queue_depth.labels(self.name).set(self._queued_samples)
            self.metrics.batch_size.labels(self.name).observe(len(samples))
            try:
                outputs = await self._run(loop, runner, samples)
            except Exception as exc:
                if len(batch) == 1:
                    _settle(batch[0], exception=exc)
                    continue
                # one request's input may have failed them all (an id out of range): each runs
                # alone, so that only the requests that fail alone get an error
                for p in batch:
                    try:
                        _settle(p, await self._run(loop, runner, p.samples))
                    except Exception as alone:
                        _settle(p, exception=alone)
                continue
            start = 0
            for p in batch:
                _settle(p, outputs[start:start + len(p.samples)])
                start += len(p.samples)

    async def _run(self, loop: asyncio.AbstractEventLoop, runner: Runner, samples: np.ndarray
                   ) -> np.ndarray:
        """`runner.run(samples)` on the worker thread, its result checked against its signature."""
        outputs = await loop.run_in_executor(self.worker, runner.run, samples)
        expected = (len(samples), *runner.output.shape)
        if not isinstance(outputs, np.ndarray) or outputs.shape != expected:
            raise GraphcError(f"{type(runner).__name__}.run returned "
                              f"{getattr(outputs, 'shape', type(outputs).__name__)} for "
                              f"{len(samples)} samples; its output signature says {expected}")
        return outputs

    async def _gather(self, loop: asyncio.AbstractEventLoop) -> list[_Pending]:
        """The queued requests up to max_batch samples, once the worker is free (the previous
        batch has run). It waits for more, up to max_delay after the first, only while requests
        arrive more often than that: at a low rate a lone request runs at once, not max_delay
        later; under load, batches fill."""
        first = self._held or await self.queue.get()
        self._held = None
        batch, size = [first], len(first.samples)
        # a model whose rows read the rows before them runs each request alone
        limit = self.limit(first.runner) if getattr(first.runner, "batches_requests", True) else 0
        deadline = loop.time() + self.max_delay
        while size < limit:
            try:
                nxt = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - loop.time()
                if remaining <= 0 or self._last_arrival + self._arrival_gap > deadline:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if nxt.runner is not first.runner or size + len(nxt.samples) > limit:
                self._held = nxt
                break
            batch.append(nxt)
            size += len(nxt.samples)
        return batch


def _settle(pending: _Pending, result: np.ndarray | None = None,
            exception: BaseException | None = None) -> None:
    """Answer a queued request, unless its client went away (which cancelled its future)."""
    if pending.done.done():
        return
    if exception is not None:
        pending.done.set_exception(exception)
    else:
        pending.done.set_result(result)


def _json_error(message: str, status: int) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    if status == 408:  # the rest of a body too slow to wait for is not read: the connection goes
        response.force_close()
    return response


def _parse_npy(body: bytes) -> np.ndarray:
    if not body.startswith(_NPY_MAGIC):  # base64 text of an .npy file, perhaps in lines
        try:
            body = base64.b64decode(b"".join(body.split()), validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(f"an {NPY_CONTENT_TYPE} body must be an .npy file, raw or base64") from None
    fast = _npy_as_numpy_saves_it(body)
    if fast is not None:
        return fast
    try:
        return np.load(io.BytesIO(body), allow_pickle=False)
    except Exception as exc:  # numpy's parser raises several types for malformed headers
        raise RequestError(f"unreadable .npy body ({type(exc).__name__}: {exc})") from None


# The version 1.0 header exactly as np.save writes it. np.load parses any header with
# ast.literal_eval, which took 0.7 ms of the event loop's ~1.4 ms per request at concurrency 64;
# other headers still go through np.load.
_NPY_SAVE_HEADER = re.compile(rb"\x93NUMPY\x01\x00..\{'descr': '([<|>]?[a-z][0-9]{1,2})', "
                              rb"'fortran_order': (False|True), 'shape': \(([0-9, ]{0,200})\), \} *\n",
                              re.DOTALL)


def _npy_as_numpy_saves_it(body: bytes) -> np.ndarray | None:
    """The array of an .npy body whose header is np.save's own (None for any other header)."""
    match = _NPY_SAVE_HEADER.match(body)
    if match is None or match.end() != 10 + int.from_bytes(body[8:10], "little"):
        return None
    try:
        dtype = np.dtype(match.group(1).decode())
        shape = tuple(int(d) for d in match.group(3).split(b",") if d.strip())
    except (TypeError, ValueError):
        return None
    if dtype.kind not in "biuf" or len(body) - match.end() != math.prod(shape) * dtype.itemsize:
        return None  # np.load says what is wrong
    flat = np.frombuffer(body, dtype, offset=match.end())
    # a copy: the kernels are compiled for writable arrays (a read-only one compiles again)
    return flat.reshape(shape, order="F" if match.group(2) == b"True" else "C").copy()


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    except ValueError as exc:  # valid JSON Python will not read: an integer of over 4300 digits
        raise RequestError(f"unreadable JSON: {exc}") from None
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError(f"expected a JSON object, got a {type(doc).__name__}")
    return doc


def _parse_json(body: bytes) -> tuple[Any, dict[str, Any]]:
    doc = _json_object(body)
    if "inputs" not in doc:
        raise RequestError('expected a JSON object {"inputs": [...]}, one entry per sample')
    return doc["inputs"], doc


def _samples_from_json(inputs: Any, runner: Runner) -> np.ndarray:
    if not isinstance(inputs, list) or not inputs:
        raise RequestError('"inputs" must be a non-empty list, one entry per sample')
    try:
        array = np.asarray(inputs)
    except ValueError:
        raise RequestError('"inputs" is ragged or nested too deeply: every sample must be a '
                           f"nested list of shape {list(runner.input.shape)}") from None
    if array.dtype == object and all(type(v) in (int, float) for v in array.flat):
        array = _beyond_int64(array, runner)  # NumPy keeps integers beyond int64 as Python ints
    if array.dtype.kind not in "iuf" or array.dtype == object:
        raise RequestError(f'"inputs" must hold numbers ({runner.input.dtype.name}), not '
                           f"{'booleans' if array.dtype.kind == 'b' else 'strings or nulls'}")
    if _holds_booleans(inputs):  # NumPy made true 1.0 beside other numbers
        raise RequestError(f'"inputs" must hold numbers ({runner.input.dtype.name}), not booleans')
    if array.dtype.kind == "f" and runner.input.dtype.kind != "f":
        # whole numbers written as 1.0 (as many JSON encoders write them) are integers
        if not (np.isfinite(array).all() and (array == np.round(array)).all()):
            raise RequestError(f"model {runner.name!r} takes {runner.input.dtype.name} inputs; "
                               "got numbers with fractions")
        array = _exact_integers(inputs, array.shape, runner.input.dtype)
    return array


def _exact_integers(inputs: list, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """The JSON numbers `inputs` (whole, some written as floats) as `dtype`, each integer as it
    was written: NumPy read the mix as float64, which rounds integers past 2**53 (an id of
    9007199254740993 came back ...992) and int64's maximum up to 2**63."""
    values = np.asarray(inputs, dtype=object).reshape(-1)
    exact = [v if isinstance(v, int) else int(v) for v in values]
    limits = np.iinfo(dtype)
    if exact and (min(exact) < limits.min or max(exact) > limits.max):
        raise RequestError(f"inputs hold integers outside {dtype.name}'s range "
                           f"[{limits.min}, {limits.max}]")
    return np.array(exact, dtype=dtype).reshape(shape)


def _holds_booleans(inputs: list) -> bool:
    """Whether the nested lists hold a JSON true or false anywhere."""
    pending = [inputs]
    while pending:
        for value in pending.pop():
            if isinstance(value, bool):
                return True
            if isinstance(value, list):
                pending.append(value)
    return False


def _beyond_int64(array: np.ndarray, runner: Runner) -> np.ndarray:
    """Numbers some of which are integers too large for int64: floats for a model taking floats
    (its own range is checked later), refused for one taking integers."""
    if runner.input.dtype.kind != "f":
        raise RequestError(f"inputs hold integers outside {runner.input.dtype.name}'s range")
    try:
        return array.astype(np.float64)
    except OverflowError:
        raise RequestError(f"inputs hold numbers too large for {runner.input.dtype.name}") from None


def _checked_samples(array: np.ndarray, runner: Runner, max_batch: int, exact_dtype: bool) -> np.ndarray:
    spec = runner.input
    if array.ndim != len(spec.shape) + 1 or array.shape[1:] != spec.shape:
        raise RequestError(f"model {runner.name!r} takes samples of shape {list(spec.shape)}; got "
                           f"{array.shape[0] if array.ndim else 0} of shape "
                           f"{list(array.shape[1:])} (inputs shaped {list(array.shape)})")
    if not 1 <= array.shape[0] <= max_batch:
        raise RequestError(f"{array.shape[0]} samples in one request; model {runner.name!r} "
                           f"takes 1 to {max_batch}")
    if exact_dtype and array.dtype.newbyteorder("=") != spec.dtype:  # either byte order
        raise RequestError(f"model {runner.name!r} takes {spec.dtype.name} inputs; the .npy "
                           f"body holds {array.dtype.name}")
    if spec.dtype.kind in "iu" and array.dtype != spec.dtype and array.size:
        limits = np.iinfo(spec.dtype)
        if array.min() < limits.min or array.max() > limits.max:  # a cast would wrap them
            raise RequestError(f"inputs hold integers outside {spec.dtype.name}'s range "
                               f"[{limits.min}, {limits.max}]")
    samples = np.ascontiguousarray(array, dtype=spec.dtype)
    if spec.dtype.kind == "f" and not np.isfinite(samples).all():
        raise RequestError("inputs hold NaN or infinity, or numbers too large for "
                           f"{spec.dtype.name}")
    return samples


def _options(doc: dict[str, Any], runner: Runner) -> tuple[int | None, bool]:
    top_k, softmax = doc.get("top_k"), doc.get("softmax", False)
    if not isinstance(softmax, bool):
        raise RequestError('"softmax" must be true or false')
    classes = runner.output.shape[0] if len(runner.output.shape) == 1 else None
    if (softmax or top_k is not None) and classes is None:
        raise RequestError(f"top_k and softmax are for classifiers; model {runner.name!r} "
                           f"outputs samples of shape {list(runner.output.shape)}")
    if top_k is not None and (type(top_k) is not int or not 1 <= top_k <= classes):
        raise RequestError(f'"top_k" must be an integer from 1 to {classes}')
    return top_k, softmax


def _answer(outputs: np.ndarray, runner: Runner, top_k: int | None, softmax: bool) -> dict[str, Any]:
    if softmax:
        outputs = _softmax(outputs)
    answer: dict[str, Any] = {"outputs": _json_numbers(outputs), "model": runner.name,
                              "version": runner.version}
    if top_k is not None:
        order = np.argsort(-outputs, axis=1, kind="stable")[:, :top_k]
        answer["top_k"] = {"indices": order.tolist(),
                           "values": _json_numbers(np.take_along_axis(outputs, order, axis=1))}
    return answer


def _softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax along axis 1, its limit where a row holds +inf (shared by the infinite entries;
    inf - inf would make the row NaN); a row of -inf only, or holding NaN, is NaN."""
    top = logits.max(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):
        shifted = np.where(np.isposinf(top), np.where(np.isposinf(logits), 0.0, -np.inf),
                           logits - top)
        powers = np.exp(shifted)
        return powers / powers.sum(axis=1, keepdims=True)


def _json_numbers(array: np.ndarray) -> list:
    """Nested lists for a JSON answer: NaN and the infinities as the strings "NaN", "Infinity"
    and "-Infinity" (the Protobuf JSON mapping's), which strict JSON parsers read; json.dumps
    would write bare NaN and Infinity, which they refuse."""
    if np.isfinite(array).all():
        return array.tolist()
    values = array.astype(object)
    values[np.isnan(array)] = "NaN"
    values[np.isposinf(array)] = "Infinity"
    values[np.isneginf(array)] = "-Infinity"
    return values.tolist()


class _Server:
    def __init__(self, runners: Sequence[Runner], max_batch: int, max_delay_ms: float,
                 max_body_bytes: int, loader: Loader, body_timeout_s: float) -> None:
        if not (max_batch >= 1 and 0 <= max_delay_ms < math.inf and max_body_bytes >= 1
                and 0 < body_timeout_s < math.inf):  # NaN too
            raise GraphcError(f"serve: max_batch >= 1, max_delay_ms >= 0, max_body_bytes >= 1 and "
                              f"a finite body_timeout_s > 0 are needed (got {max_batch}, "
                              f"{max_delay_ms}, {max_body_bytes}, {body_timeout_s})")
        self.body_timeout_s = body_timeout_s
        names = [r.name for r in runners]
        if len(set(names)) != len(names):
            raise GraphcError(f"serve: two models are named {sorted(n for n in names if names.count(n) > 1)[0]!r}")
        self.max_batch, self.max_delay = max_batch, max_delay_ms / 1000
        self.max_body_bytes, self.loader = max_body_bytes, loader
        self.metrics = _Metrics(max_batch)
        self.models = {r.name: _Model(r, max_batch, self.max_delay, self.metrics) for r in runners}
        self.loading = ThreadPoolExecutor(1, thread_name_prefix="graphc-serve-load")

    def model(self, request: web.Request) -> _Model:
        name = request.match_info["name"]
        if name not in self.models:
            raise RequestError(f"no model named {name!r}; serving {sorted(self.models)}", 404)
        return self.models[name]

    async def body(self, request: web.Request) -> bytes:
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):  # a small gzip body may inflate to gigabytes
            raise RequestError(f"Content-Encoding {encoding!r} is not accepted: send the body "
                               "uncompressed", 415)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise RequestError(f"body of {request.content_length} bytes is over the "
                               f"{self.max_body_bytes}-byte limit", 413)
        try:
            # a deadline, so that clients sending slowly cannot hold every connection
            return await asyncio.wait_for(request.read(), self.body_timeout_s)
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(f"body is over the {self.max_body_bytes}-byte limit", 413) from None
        except asyncio.TimeoutError:
            raise RequestError(f"the body did not arrive within {self.body_timeout_s:g} s", 408) from None

    async def predict(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        label = _UNKNOWN_MODEL
        try:
            model = self.model(request)
            label = model.name
            runner = model.runner
            body = await self.body(request)
            if request.content_type == NPY_CONTENT_TYPE:
                array, exact = _parse_npy(body), True
                doc = {k: _query_option(v) for k, v in request.query.items() if k in ("top_k", "softmax")}
            else:
                inputs, doc = _parse_json(body)
                array, exact = _samples_from_json(inputs, runner), False
            top_k, softmax = _options(doc, runner)
            samples = _checked_samples(array, runner, model.limit(runner), exact)
            try:
                outputs = await model.predict(samples, runner)
            except _INPUT_FAULTS as exc:  # this request's own input, run alone
                raise RequestError(f"model {label!r} refused the inputs: {exc}") from exc
            except Exception as exc:  # the model's own failure: the server's fault, said so
                raise _ModelFailure(f"model {label!r} failed: {type(exc).__name__}: {exc}") from exc
            response = web.json_response(_answer(outputs, runner, top_k, softmax))
        except RequestError as exc:
            response = _json_error(str(exc), exc.status)
        except _ModelFailure as exc:
            response = _json_error(str(exc), 500)
        self.metrics.requests.labels(label, str(response.status)).inc()
        if response.status == 200:
            self.metrics.latency.labels(label).observe(time.perf_counter() - started)
        return response

    async def load(self, request: web.Request) -> web.Response:
        try:
            model = self.model(request)
            body = await self.body(request)
            doc = _json_object(body)
            if not isinstance(doc.get("path"), str):
                raise RequestError('expected a JSON object {"path": "model.gcx"}')
            async with model.load_lock:
                old = model.runner
                loop = asyncio.get_running_loop()
                try:
                    runner = await loop.run_in_executor(
                        self.loading, lambda: self.loader(doc["path"], name=model.name,
                                                          max_batch=self.max_batch))
                except (GraphcError, OSError, ValueError) as exc:  # ValueError: a NUL in the path
                    raise RequestError(f"{model.name!r} keeps version {old.version}: {exc}") from None
                runner.version = old.version + 1
                model.switch(runner)
            return web.json_response({"model": model.name, "version": runner.version,
                                      "previous_version": old.version})
        except RequestError as exc:
            return _json_error(str(exc), exc.status)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"models": [
            {"name": m.name, "version": m.runner.version, "input": m.runner.input.to_json(),
             "output": m.runner.output.to_json(), "max_batch": m.max_batch}
            for m in self.models.values()]})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "models": len(self.models)})

    async def metrics_text(self, request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def start(self, app: web.Application) -> None:
        for model in self.models.values():
            model.batcher = asyncio.create_task(model.run_batches())

    async def stop(self, app: web.Application) -> None:
        """After the HTTP server has answered what was in flight: the batchers and threads go."""
        for model in self.models.values():
            model.batcher.cancel()
        await asyncio.gather(*(m.batcher for m in self.models.values()), return_exceptions=True)
        for model in self.models.values():
            model.worker.shutdown(wait=True)
        self.loading.shutdown(wait=True)


def _query_option(value: str) -> Any:
    """`?top_k=3&softmax=true` on an .npy request, as the JSON body would carry them."""
    if value in ("true", "false"):
        return value == "true"
    # ASCII digits only: '²' is a digit to str.isdigit but not to int(); left as text, the
    # option's own check refuses it with a 400
    return int(value) if value.isascii() and value.isdigit() else value


@web.middleware
async def _json_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """aiohttp's own client errors (no such route, wrong method) as JSON too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json_error(exc.reason, exc.status)


class _InFlight:
    """The requests being answered, their bodies perhaps still arriving: draining waits until
    none is left before aiohttp closes the connections (its shutdown drops the bytes that
    arrive after it begins, so a request it catches mid-upload would never be answered)."""

    def __init__(self) -> None:
        self.count = 0
        self.idle = asyncio.Event()
        self.idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        self.count += 1
        self.idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if not self.count:
                self.idle.set()


_IN_FLIGHT = web.AppKey("in_flight", _InFlight)


def make_app(runners: Sequence[Runner], *, max_batch: int = 64, max_delay_ms: float = 2.0,
             max_body_bytes: int = 8 << 20, loader: Loader = GraphcRunner.from_file,
             body_timeout_s: float = 30.0) -> web.Application:
    """The server's aiohttp application over `runners` (see the package docstring)."""
    server = _Server(runners, max_batch, max_delay_ms, max_body_bytes, loader, body_timeout_s)
    in_flight = _InFlight()
    app = web.Application(client_max_size=max_body_bytes, middlewares=[in_flight.middleware, _json_errors])
    app[_IN_FLIGHT] = in_flight
    app.add_routes([web.post("/v1/models/{name}/predict", server.predict),
                    web.post("/v1/models/{name}/load", server.load),
                    web.get("/v1/models", server.list_models),
                    web.get("/healthz", server.healthz),
                    web.get("/metrics", server.metrics_text)])
    app.on_startup.append(server.start)
    app.on_cleanup.append(server.stop)
    return app


def serve(runners: Sequence[Runner], *, host: str = "127.0.0.1", port: int = 8000,
          drain_timeout_s: float = 30.0, ready: Callable[[str, int], None] | None = None,
          **options: Any) -> None:
    """Serve until SIGTERM or SIGINT; then stop accepting, answer every request in flight (up
    to `drain_timeout_s`) and return. `ready(host, port)` is called once listening (the port
    actually bound when `port` is 0)."""
    if not 0 <= drain_timeout_s < math.inf:  # NaN too
        raise GraphcError(f"serve: drain_timeout_s must be a finite number >= 0, got {drain_timeout_s}")
    asyncio.run(_serve(make_app(runners, **options), host, port, drain_timeout_s, ready))


class _AcceptErrorsOnceInAWhile:
    """The event loop's error handler: with every file descriptor taken (clients holding
    connections open), asyncio retries accepting each second and logged each failure with its
    traceback, hundreds of megabytes a minute; one line every 10 s says it instead."""

    def __init__(self) -> None:
        self.last = -math.inf

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last >= 10:
            self.last = now
            log.error("graphc serve: cannot accept connections: %s (open connections use every "
                      "file descriptor; raise the limit, ulimit -n)", context.get("exception"))


async def _serve(app: web.Application, host: str, port: int, drain_timeout_s: float,
                 ready: Callable[[str, int], None] | None) -> None:
    # aiohttp's own shutdown only gets what the drain left of its time (requests that came on a
    # kept-alive connection meanwhile)
    # auto_decompress off: a compressed body is refused (see _Server.body), never inflated
    # keepalive_timeout: a connection sending nothing is closed after 75 s (aiohttp's default
    # waits an hour, letting idle clients hold every descriptor)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=min(1.0, drain_timeout_s),
                           access_log=None, auto_decompress=False, keepalive_timeout=75)
    await runner.setup()
    asyncio.get_running_loop().set_exception_handler(_AcceptErrorsOnceInAWhile())
    site = web.TCPSite(runner, host, port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        bound_host, bound_port = runner.addresses[0][:2]
        ready(bound_host, bound_port)
    await stop.wait()
    for listening in list(runner.sites):  # no new connections; those open stay open
        await listening.stop()
    try:
        await asyncio.wait_for(app[_IN_FLIGHT].idle.wait(), drain_timeout_s)
    except asyncio.TimeoutError:
        pass  # aiohttp's shutdown cancels what is left
    await runner.cleanup()
