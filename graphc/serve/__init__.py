"""graphc serve: compiled models behind an HTTP inference server with dynamic batching.

The HTTP stack is aiohttp: one well-kept package gives both the asyncio server and the client
the tests and the load generator use, with no ASGI server or framework between the socket and
the batcher (Starlette would need uvicorn besides, and a second package for the client).

Endpoints (`make_app`):
    POST /v1/models/{name}/predict   {"inputs": [...]} (one entry per sample; optional "top_k",
                                     "softmax") or an .npy body (Content-Type application/x-npy,
                                     raw or base64) -> {"outputs": [...], "model", "version"}
    POST /v1/models/{name}/load      {"path": "new.gcx"}: load a new version beside the old one,
                                     switch atomically; a bad file leaves the old one serving
    GET  /v1/models                  names, versions, input/output signatures, max batch
    GET  /healthz                    {"status": "ok"}
    GET  /metrics                    Prometheus text format (prometheus_client)
Client mistakes get a 4xx with {"error": "..."} (413 for a body over the cap, 404 for an
unknown model); a request is validated before it joins a batch, so one bad request never
fails the others.

The model behind a name is a *runner* (graphc.serve.runner.Runner), so any engine can serve
behind the same HTTP stack, batcher and metrics:

    class Runner(Protocol):
        name: str                  # the URL name
        version: int               # shown in responses; the server sets it on load
        input: TensorSpec          # TensorSpec(shape=one sample's shape, dtype=np.dtype)
        output: TensorSpec         # one sample's output
        max_batch: int             # the most samples one run() may take
        def run(self, batch: np.ndarray) -> np.ndarray: ...
            # batch: (n, *input.shape), input.dtype, C-contiguous, 1 <= n <= max_batch;
            # returns (n, *output.shape). Called from ONE worker thread per model, never
            # concurrently with itself; it may release the GIL.

    GraphcRunner.from_file(path, name=None, max_batch=None, backend=None) loads a .gcx
    inference export (graphc.export.load) and compiles its batch buckets ahead.

    make_app(runners, *, max_batch=64, max_delay_ms=2.0, max_body_bytes=8 << 20,
             loader=GraphcRunner.from_file, body_timeout_s=30.0) -> aiohttp.web.Application
        `runners`: Runner objects, their names unique. `loader(path, name=..., max_batch=...)`
        builds the runner a /load request asks for (another engine passes its own). A body
        not in within `body_timeout_s` gets 408 and its connection is closed.
    serve(runners, *, host="127.0.0.1", port=8000, **make_app_options) -> None
        runs until SIGTERM or SIGINT: stops accepting, answers what is in flight, returns.

`graphc serve MODEL.gcx [MODEL2.gcx ...]` (graphc/cli.py) is `serve` over GraphcRunners. It
sets OMP_WAIT_POLICY=PASSIVE unless set: OpenMP threads spinning between parallel kernels take
the cores the event loop needs (a program embedding `serve` should do the same before its first
compiled call).

/load reads a path on the server's machine: anyone who can reach the port can make it load any
graphc export there (never run code: exports are data, verified on load). Bind to loopback, or
put the server behind an authenticating proxy.
"""
from __future__ import annotations

from .app import NPY_CONTENT_TYPE, make_app, serve
from .runner import GraphcRunner, Runner, TensorSpec

__all__ = ["NPY_CONTENT_TYPE", "GraphcRunner", "Runner", "TensorSpec", "make_app", "serve"]
