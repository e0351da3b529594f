"""Load generator for `graphc serve`: throughput and latency under concurrency, and a
malformed-request soak.

    python benchmarks/serve.py [--requests 2000] [--seconds 20] [--concurrency 1 8 64]
    python benchmarks/serve.py --malformed [--requests 10000]

The model is the MNIST CNN of the demo (graphc.models.mnist_cnn, random weights: serving cost
does not depend on them), exported once as a batch-polymorphic `.gcx` and once as ONNX. Four
servers, one at a time, each a subprocess on a free loopback port:

  graphc          `graphc serve` with dynamic batching (--max-batch, --max-delay-ms)
  graphc b=1      `graphc serve --max-batch 1`: one compiled call per request
  onnxruntime     the ONNX file in an onnxruntime session behind the same HTTP stack, batcher
                  and metrics (graphc.serve.make_app with the OnnxRunner below)
  onnxruntime b=1 the same, --max-batch 1

Each is driven by an aiohttp client at every --concurrency: that many requests in flight, one
sample per request, until --requests are answered or --seconds have passed (whichever first),
after --warmup unmeasured requests. The table gives throughput, p50/p95/p99 latency, failures,
the server's resident memory after start-up and at the end, and the batching / batch-1 ratios
at the highest concurrency. The client runs on the same cores as the server: on a small
machine it takes part of the throughput it measures, the same part for every server. The
`server CPU` and `client CPU` columns say how much: CPU milliseconds per answered request, of
the server process (all its threads: event loop, model worker, compute threads) and of the
client, which bound the throughput of a machine that has nothing else to do at
cores / (server + client CPU).

--malformed sends --requests requests to `graphc serve` (1% malformed: wrong shape, bad JSON,
wrong dtype, an .npy body that is not one) and checks that every valid answer equals
gc.load(model)(x), every bad one is a 4xx, none is a 5xx, the server is still alive and its
resident memory stays flat. Exit status 1 if any check fails.

Everything stays on 127.0.0.1; nothing is downloaded. `--json PATH` writes the results.
"""
from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

HOST = "127.0.0.1"
ONNX_EXPORT_BATCH = 3  # a batch no other dimension of the model has (see dynamic_batch_onnx)


# --- the models -------------------------------------------------------------------------------

@dataclass
class Models:
    gcx: str
    onnx: str
    samples: np.ndarray  # (n, *sample shape): the inputs requests are made of
    expected: np.ndarray  # gc.load(gcx)(samples)


def export_models(workdir: str, image_size: int, max_batch: int, pool: int, seed: int) -> Models:
    """The MNIST CNN exported as `model.gcx` (batch-polymorphic up to max_batch) and
    `model.onnx` (any batch), with `pool` input samples and the .gcx's outputs for them."""
    import graphc as gc
    from graphc.models import mnist_cnn
    from graphc.onnx_export import export_onnx

    gc.manual_seed(seed)
    model = mnist_cnn(image_size=image_size)
    rng = np.random.default_rng(seed)
    samples = rng.standard_normal((pool, 1, image_size, image_size)).astype(np.float32)
    gcx, onnx_path = os.path.join(workdir, "model.gcx"), os.path.join(workdir, "model.onnx")
    gc.compile(model, example_inputs=samples[:1]).export(gcx, max_batch=max_batch)
    export_onnx(model, onnx_path, example_inputs=samples[:ONNX_EXPORT_BATCH])
    dynamic_batch_onnx(onnx_path)

    loaded = gc.load(gcx)
    expected = np.concatenate([loaded(samples[i:i + max_batch]) for i in range(0, pool, max_batch)])
    check_onnx_agrees(onnx_path, samples, expected)
    return Models(gcx, onnx_path, samples, expected)


def dynamic_batch_onnx(path: str) -> None:
    """export_onnx writes the example's batch size into the file: the first dimension of the
    input and output, and the target shape of the flatten's Reshape. Make the first a symbolic
    `batch` and the second -1 so one onnxruntime session takes any batch, as graphc's export
    does (the example batch is a size no other dimension has, and check_onnx_agrees checks the
    result at several batch sizes)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    for value in [*model.graph.input, *model.graph.output]:
        dim = value.type.tensor_type.shape.dim[0]
        if dim.dim_value != ONNX_EXPORT_BATCH:
            raise SystemExit(f"{path}: {value.name} has first dimension {dim}, expected the "
                             f"example batch {ONNX_EXPORT_BATCH}")
        dim.ClearField("dim_value")
        dim.dim_param = "batch"
    reshape_shapes = {node.input[1] for node in model.graph.node if node.op_type == "Reshape"}
    for i, initializer in enumerate(model.graph.initializer):
        shape = numpy_helper.to_array(initializer)
        if initializer.name in reshape_shapes and shape[0] == ONNX_EXPORT_BATCH:
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(np.array([-1, *shape[1:]], np.int64), initializer.name))
    del model.graph.value_info[:]  # intermediate shapes were inferred at the fixed batch
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)


def check_onnx_agrees(path: str, samples: np.ndarray, expected: np.ndarray) -> None:
    runner = OnnxRunner(path)
    for size in sorted({1, 2, min(len(samples), 64)}):
        got = runner.run(samples[:size])
        if not np.allclose(got, expected[:size], rtol=1e-4, atol=1e-4):
            raise SystemExit(f"the ONNX model disagrees with the .gcx at batch {size}: max "
                             f"difference {np.abs(got - expected[:size]).max():.3g}")


class OnnxRunner:
    """The peer engine: an ONNX file in an onnxruntime session, as a graphc.serve runner, so it
    is served by the same HTTP stack, batcher and metrics as graphc's own."""

    def __init__(self, path: str, name: str | None = None, max_batch: int | None = None,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        from graphc.serve import TensorSpec

        options = ort.SessionOptions()
        # Idle pool threads sleep rather than spin on the cores the event loop needs, as
        # `graphc serve` sets OMP_WAIT_POLICY=PASSIVE for graphc's OpenMP threads.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self._input_name, self._output_name = inp.name, out.name
        self.name = name or os.path.splitext(os.path.basename(path))[0]
        self.version = 1
        self.input = TensorSpec(shape=tuple(inp.shape[1:]), dtype=np.dtype(np.float32))
        self.output = TensorSpec(shape=tuple(out.shape[1:]), dtype=np.dtype(np.float32))
        self.max_batch = max_batch or 64

    @classmethod
    def from_file(cls, path: str, name: str | None = None, max_batch: int | None = None
                  ) -> "OnnxRunner":
        return cls(path, name, max_batch)

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([self._output_name], {self._input_name: batch})[0]


def serve_onnx(args: argparse.Namespace) -> None:
    """The peer's server process (--serve-onnx PATH)."""
    from graphc.serve import serve

    runner = OnnxRunner(args.serve_onnx, name="model", max_batch=args.max_batch,
                        threads=args.threads)
    serve([runner], host=HOST, port=args.port, max_batch=args.max_batch,
          max_delay_ms=args.max_delay_ms, loader=OnnxRunner.from_file)


# --- servers ----------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """A process's user + system CPU time so far, all its threads (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields 3 on: state, ppid, ...
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """This process's (the client's) user + system CPU time so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def resident_mib(pid: int) -> float:
    """A process's resident set size (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """A server subprocess on a free loopback port, up once /healthz answers."""

    def __init__(self, label: str, command: list[str], startup_seconds: float) -> None:
        self.label = label
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen([*command, "--port", str(self.port)],
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_healthy(startup_seconds)

    def _wait_healthy(self, seconds: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"{self.label}: the server exited with {self.process.returncode}"
                                 f" at start-up:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{self.label}: no answer on /healthz within {seconds:.0f} s:\n{self.output()}")

    def model_name(self) -> str:
        import urllib.request

        with urllib.request.urlopen(self.url + "/v1/models", timeout=10) as response:
            listing = json.load(response)
        models = listing["models"] if isinstance(listing, dict) else listing
        return models[0]["name"]

    def batch_counts(self, model: str) -> tuple[float, float]:
        """(samples, model calls) so far, from the graphc_batch_size histogram of /metrics."""
        import urllib.request

        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
        totals = {}
        for suffix in ("sum", "count"):
            match = re.search(rf'^graphc_batch_size_{suffix}{{model="{re.escape(model)}"}} (\S+)$',
                              text, re.M)
            totals[suffix] = float(match.group(1)) if match else 0.0
        return totals["sum"], totals["count"]

    def alive(self) -> bool:
        return self.process.poll() is None

    def rss_mib(self) -> float:
        return resident_mib(self.process.pid)

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.process.pid)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]

    def stop(self) -> int:
        """SIGTERM (the server drains and exits); the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def graphc_command(gcx: str, max_batch: int, max_delay_ms: float, threads: int | None
                   ) -> list[str]:
    environment = [f"GRAPHC_NUM_THREADS={threads}"] if threads else []
    return ["env", *environment, sys.executable, "-m", "graphc.cli", "serve", gcx, "--host", HOST,
            "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms)]


def onnx_command(onnx_path: str, max_batch: int, max_delay_ms: float, threads: int | None
                 ) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--serve-onnx", onnx_path,
            "--max-batch", str(max_batch), "--max-delay-ms", str(max_delay_ms),
            *(["--threads", str(threads)] if threads else [])]


# --- requests ---------------------------------------------------------------------------------

@dataclass
class Request:
    body: bytes
    content_type: str
    sample: int | None  # index of the expected output; None: a malformed request


def json_request(sample: np.ndarray, index: int | None) -> Request:
    return Request(json.dumps({"inputs": sample[None].tolist()}).encode(), "application/json", index)


def npy_request(batch: np.ndarray, index: int | None) -> Request:
    buffer = io.BytesIO()
    np.save(buffer, batch, allow_pickle=False)
    return Request(buffer.getvalue(), "application/x-npy", index)


def valid_requests(samples: np.ndarray, body: str) -> list[Request]:
    encode = json_request if body == "json" else lambda s, i: npy_request(s[None], i)
    return [encode(sample, i) for i, sample in enumerate(samples)]


def malformed_requests(samples: np.ndarray) -> list[Request]:
    """One of each kind of bad request a client makes."""
    sample = samples[0]
    truncated = json_request(sample, None).body[:-7]
    return [
        json_request(sample[:, :-1], None),                                   # wrong shape
        Request(truncated, "application/json", None),                         # bad JSON
        Request(b'{"inputs": "not a list"}', "application/json", None),       # wrong type
        Request(json.dumps({"inputs": [[["x"] * sample.shape[-1]] * sample.shape[-2]]}).encode(),
                "application/json", None),                                    # wrong dtype
        npy_request(sample[None, :, :-1], None),                              # wrong shape
        npy_request(np.full((1, *sample.shape), "x"), None),                  # wrong dtype
        Request(b"\x93NUMPY not really", "application/x-npy", None),          # bad .npy
    ]


@dataclass
class Outcome:
    latencies: list[float] = field(default_factory=list)  # seconds, answered requests
    statuses: dict[int, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # transport failures, wrong answers
    seconds: float = 0.0

    @property
    def answered(self) -> int:
        return len(self.latencies)

    @property
    def failed(self) -> int:
        return len(self.errors) + sum(n for s, n in self.statuses.items() if s != 200)


async def drive(url: str, requests: list[Request], *, concurrency: int, count: int,
                seconds: float, expected: np.ndarray | None = None) -> Outcome:
    """Send requests[i % len(requests)] for i < count with `concurrency` in flight, stopping
    early after `seconds`. With `expected`, every 200 is compared with expected[sample] and
    every malformed request must get a 4xx."""
    outcome = Outcome()
    next_index = 0
    deadline = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def one(session: aiohttp.ClientSession, index: int) -> None:
        request = requests[index % len(requests)]
        start = time.perf_counter()
        try:
            async with session.post(url, data=request.body,
                                    headers={"Content-Type": request.content_type}) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            outcome.errors.append(f"request {index}: {type(exc).__name__}: {exc}")
            return
        outcome.latencies.append(time.perf_counter() - start)
        outcome.statuses[status] = outcome.statuses.get(status, 0) + 1
        if expected is not None:
            outcome.errors.extend(checked(index, request, status, body, expected))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < count and time.perf_counter() < deadline:
            index, next_index = next_index, next_index + 1
            await one(session, index)

    start = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    outcome.seconds = time.perf_counter() - start
    return outcome


def checked(index: int, request: Request, status: int, body: bytes, expected: np.ndarray
            ) -> list[str]:
    """What is wrong with one answer (nothing: an empty list)."""
    if request.sample is None:
        if not 400 <= status < 500:
            return [f"request {index} (malformed): status {status}, expected a 4xx: {body[:200]!r}"]
        try:
            error = json.loads(body)["error"]
        except (ValueError, KeyError, TypeError):
            return [f"request {index} (malformed): a {status} without a JSON error: {body[:200]!r}"]
        return [] if isinstance(error, str) and error else [f"request {index}: empty error"]
    if status != 200:
        return [f"request {index}: status {status}: {body[:200]!r}"]
    outputs = np.asarray(json.loads(body)["outputs"], np.float32)
    want = expected[request.sample][None]
    if outputs.shape != want.shape or not np.allclose(outputs, want, rtol=1e-4, atol=1e-4):
        return [f"request {index}: outputs {outputs.ravel()[:4]}... differ from gc.load's "
                f"{want.ravel()[:4]}..."]
    return []


# --- the two modes ----------------------------------------------------------------------------

@dataclass
class Row:
    server: str
    concurrency: int
    requests: int
    failed: int
    throughput: float  # answered requests per second
    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_batch: float  # samples per model call, from the server's graphc_batch_size histogram
    server_cpu_ms: float  # CPU time per answered request: the server process, all threads
    client_cpu_ms: float  # the load generator's


def row(label: str, concurrency: int, outcome: Outcome, mean_batch: float,
        cpu_seconds: tuple[float, float]) -> Row:
    p50, p95, p99 = (np.percentile(outcome.latencies, [50, 95, 99]) * 1e3
                     if outcome.latencies else (float("nan"),) * 3)
    server_ms, client_ms = (1e3 * seconds / max(outcome.answered, 1) for seconds in cpu_seconds)
    return Row(label, concurrency, outcome.answered, outcome.failed,
               outcome.answered / outcome.seconds, float(p50), float(p95), float(p99), mean_batch,
               server_ms, client_ms)


def benchmark(args: argparse.Namespace, models: Models) -> dict[str, Any]:
    """Every server at every concurrency, --rounds times with the servers interleaved (a busy
    neighbour slows one round of each, not all of one); the median over rounds."""
    servers = [
        ("graphc", graphc_command(models.gcx, args.max_batch, args.max_delay_ms, args.threads)),
        ("graphc b=1", graphc_command(models.gcx, 1, args.max_delay_ms, args.threads)),
        ("onnxruntime", onnx_command(models.onnx, args.max_batch, args.max_delay_ms, args.threads)),
        ("onnxruntime b=1", onnx_command(models.onnx, 1, args.max_delay_ms, args.threads)),
    ]
    servers = [(label, command) for label, command in servers
               if not args.servers or label in args.servers]
    requests = valid_requests(models.samples, args.body)
    rounds: list[list[Row]] = []
    memory: dict[str, tuple[float, float]] = {}
    for round_index in range(args.rounds):
        rows: list[Row] = []
        for label, command in servers:
            server = Server(label, command, args.startup_seconds)
            try:
                model = server.model_name()
                url = f"{server.url}/v1/models/{model}/predict"
                rss_start = server.rss_mib()
                for concurrency in args.concurrency:
                    warm = asyncio.run(drive(url, requests, concurrency=concurrency,
                                             count=args.warmup, seconds=args.seconds))
                    calls_before = server.batch_counts(model)
                    cpu_before = (server.cpu_seconds(), own_cpu_seconds())
                    outcome = asyncio.run(drive(url, requests, concurrency=concurrency,
                                                count=args.requests, seconds=args.seconds))
                    cpu = np.subtract((server.cpu_seconds(), own_cpu_seconds()), cpu_before)
                    samples, calls = np.subtract(server.batch_counts(model), calls_before)
                    outcome.errors += warm.errors
                    rows.append(row(label, concurrency, outcome, samples / max(calls, 1), cpu))
                    print(f"round {round_index + 1}: {format_row(rows[-1])}", file=sys.stderr,
                          flush=True)
                rss_end = server.rss_mib()
                # start-up memory of the first round, the largest end of any round
                memory[label] = (memory.get(label, (rss_start,))[0],
                                 max(rss_end, memory.get(label, (0, 0))[1]))
            finally:
                status = server.stop()
            if status != 0:
                raise SystemExit(f"{label}: exit status {status} after SIGTERM:\n{server.output()}")
        rounds.append(rows)
    top = max(args.concurrency)
    per_round = [ratios(rows, top) for rows in rounds]
    return {"rows": [r.__dict__ for r in median_rows(rounds)], "rss_mib": memory,
            "ratios": {name: float(np.median([r[name] for r in per_round])) for name in per_round[0]},
            "ratios_by_round": per_round, "rounds": args.rounds}


def median_rows(rounds: list[list[Row]]) -> list[Row]:
    """Per server and concurrency: requests and failures summed over rounds, the rest medians."""
    merged = []
    for same in zip(*rounds):
        median = lambda attribute: float(np.median([getattr(r, attribute) for r in same]))
        merged.append(Row(same[0].server, same[0].concurrency, sum(r.requests for r in same),
                          sum(r.failed for r in same), median("throughput"), median("p50_ms"),
                          median("p95_ms"), median("p99_ms"), median("mean_batch"),
                          median("server_cpu_ms"), median("client_cpu_ms")))
    return merged


def ratios(rows: list[Row], concurrency: int) -> dict[str, float]:
    at = {r.server: r.throughput for r in rows if r.concurrency == concurrency}
    pairs = {"graphc / graphc b=1": ("graphc", "graphc b=1"),
             "onnxruntime / onnxruntime b=1": ("onnxruntime", "onnxruntime b=1"),
             "graphc / onnxruntime": ("graphc", "onnxruntime")}
    return {name: at[a] / at[b] for name, (a, b) in pairs.items() if a in at and b in at}


HEADER = ("| server | concurrency | requests | failed | req/s | p50 ms | p95 ms | p99 ms | batch "
          "| server CPU ms/req | client CPU ms/req |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: Row) -> str:
    return (f"| {r.server} | {r.concurrency} | {r.requests} | {r.failed} | {r.throughput:.0f} | "
            f"{r.p50_ms:.1f} | {r.p95_ms:.1f} | {r.p99_ms:.1f} | {r.mean_batch:.1f} | "
            f"{r.server_cpu_ms:.2f} | {r.client_cpu_ms:.2f} |")


def print_table(results: dict[str, Any], concurrency: int) -> None:
    print(HEADER)
    for r in results["rows"]:
        print(format_row(Row(**r)))
    print()
    for label, (start, end) in results["rss_mib"].items():
        print(f"{label}: RSS {start:.0f} MiB after start-up, {end:.0f} MiB at the end")
    for name, value in results["ratios"].items():
        by_round = ", ".join(f"{r[name]:.2f}" for r in results["ratios_by_round"])
        print(f"throughput at concurrency {concurrency}, {name}: {value:.2f}x "
              f"(median of {results['rounds']} rounds: {by_round})")


def soak(args: argparse.Namespace, models: Models) -> dict[str, Any]:
    """--malformed: every valid answer right, every bad request a 4xx, no 5xx, RSS flat."""
    valid = [request for body in ("json", "npy") for request in valid_requests(models.samples, body)]
    bad = malformed_requests(models.samples)
    # every 100th request is malformed, the kinds in turn
    requests = [bad[(i // 100) % len(bad)] if i % 100 == 50 else valid[i % len(valid)]
                for i in range(args.requests)]
    server = Server("graphc", graphc_command(models.gcx, args.max_batch, args.max_delay_ms,
                                             args.threads),
                    args.startup_seconds)
    try:
        url = f"{server.url}/v1/models/{server.model_name()}/predict"
        warmup = max(args.requests // 10, 1)
        first = asyncio.run(drive(url, requests, concurrency=args.soak_concurrency, count=warmup,
                                  seconds=args.seconds, expected=models.expected))
        rss_warm = server.rss_mib()
        rest = asyncio.run(drive(url, requests[warmup:], concurrency=args.soak_concurrency,
                                 count=args.requests - warmup,
                                 seconds=args.seconds - first.seconds, expected=models.expected))
        rss_end = server.rss_mib()
        alive = server.alive()
    finally:
        status = server.stop()
    statuses: dict[int, int] = {}
    for outcome in (first, rest):
        for code, n in outcome.statuses.items():
            statuses[code] = statuses.get(code, 0) + n
    errors = first.errors + rest.errors
    growth = rss_end - rss_warm
    result = {
        "requests": first.answered + rest.answered,
        "malformed": sum(1 for r in requests[:first.answered + rest.answered] if r.sample is None),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "server_errors": sum(n for code, n in statuses.items() if code >= 500),
        "errors": errors[:20], "error_count": len(errors),
        "alive": alive, "exit_status": status,
        "rss_mib": {"after_warmup": rss_warm, "end": rss_end},
        "rss_flat": growth <= max(16.0, 0.05 * rss_warm),
        "seconds": first.seconds + rest.seconds, "sent_limit": args.requests,
    }
    result["passed"] = (not errors and result["server_errors"] == 0 and alive and status == 0
                        and result["rss_flat"] and result["requests"] == args.requests)
    return result


def print_soak(result: dict[str, Any]) -> None:
    rss = result["rss_mib"]
    print(f"{result['requests']} requests ({result['malformed']} malformed) in "
          f"{result['seconds']:.1f} s; statuses {result['statuses']}; 5xx: "
          f"{result['server_errors']}; wrong or missing answers: {result['error_count']}")
    for error in result["errors"]:
        print(f"  {error}")
    print(f"server alive: {result['alive']}, exit status after SIGTERM: {result['exit_status']}; "
          f"RSS {rss['after_warmup']:.0f} MiB after the first tenth, {rss['end']:.0f} MiB at the "
          f"end ({'flat' if result['rss_flat'] else 'GROWING'})")
    if result["requests"] < result["sent_limit"]:
        print(f"stopped by the time limit after {result['requests']} of {result['sent_limit']} "
              "requests (--seconds)")
    print("PASSED" if result["passed"] else "FAILED")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=None,
                        help="measured requests per run (default 2000; --malformed: 10000)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="time limit per run (default 20; --malformed: 600 in all)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured requests per run")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--servers", nargs="+", default=None,
                        help='only these (e.g. "graphc" "graphc b=1")')
    parser.add_argument("--rounds", type=int, default=1,
                        help="sweeps over all servers, interleaved; the table gives medians")
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads per server (GRAPHC_NUM_THREADS, onnxruntime's "
                        "intra_op_num_threads); default: all cores")
    parser.add_argument("--body", choices=["json", "npy"], default="json")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--image-size", type=int, default=28, help="8: a tiny CNN for tests")
    parser.add_argument("--pool", type=int, default=256, help="distinct input samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--startup-seconds", type=float, default=300.0)
    parser.add_argument("--malformed", action="store_true", help="the malformed-request soak")
    parser.add_argument("--soak-concurrency", type=int, default=16)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--serve-onnx", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_onnx:
        serve_onnx(args)
        return
    if args.requests is None:
        args.requests = 10_000 if args.malformed else 2000
    if args.seconds is None:
        args.seconds = 600.0 if args.malformed else 20.0
    with tempfile.TemporaryDirectory(prefix="graphc-serve-bench-") as workdir:
        models = export_models(workdir, args.image_size, args.max_batch, args.pool, args.seed)
        if args.malformed:
            results = soak(args, models)
            print_soak(results)
        else:
            results = benchmark(args, models)
            print_table(results, max(args.concurrency))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.malformed and not results["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
