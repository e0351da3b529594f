"""The `graphc` command line: inspect, info, train, export-inference, trace and serve.

Exit codes: 0 on success, 2 for usage errors, 1 for failures (a one-line message, no traceback
for the errors graphc expects).
"""
from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import inspect
import math
import os
import re
import shutil
import subprocess
import sys
from typing import TYPE_CHECKING, Callable, Sequence

from graphc.ir import Graph, TensorType
from graphc.ir.errors import GraphcError

if TYPE_CHECKING:
    from .export import LoadedFunction, LoadedTrainStep


class CommandError(Exception):
    """An expected failure: printed as one line, exit status 1."""


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` with control characters escaped: names and locations read from a file reach the
    terminal as text, never as escape sequences."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _load(path: str, backend: str | None = None):
    """An export, verified and compiled (see graphc.export.load); a bad file raises LoadError."""
    from .export import load
    return load(path, backend=backend or "reference")


def _stage(loaded, stage: str) -> Graph:
    if stage == "optimized":
        return loaded.graph
    if stage == "traced":
        graph = loaded.traced_graph()
        if graph is None:
            raise CommandError(f"{loaded.path} holds no traced graph")
        return graph
    from graphc.passes.fusion import fuse
    return fuse(loaded.graph)


def _render(dot: str, fmt: str, out: str) -> None:
    if shutil.which("dot") is None:
        raise CommandError(f"rendering {fmt} needs Graphviz's `dot` on PATH (e.g. apt-get install "
                           "graphviz); use --format dot to write the DOT source instead")
    done = subprocess.run(["dot", f"-T{fmt}", "-o", out], input=dot.encode(), capture_output=True)
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()
        raise CommandError(f"Graphviz's dot could not write {out}: "
                           f"{said[-1] if said else f'exit status {done.returncode}'}")


def cmd_inspect(args: argparse.Namespace) -> None:
    if args.format in ("svg", "png") and not args.output:  # an image is never written unasked
        raise CommandError(f"--format {args.format} renders an image: name its file with -o PATH")
    loaded = _load(args.file)
    graph = _stage(loaded, args.stage)
    if args.format == "text":
        text = str(graph) + "\n"
    else:
        slot_of = None
        if args.memory:
            from graphc.passes.memplan import plan_memory
            fused = graph if args.stage == "fused" else _stage(loaded, "fused")
            if graph is not fused:
                raise CommandError("--memory colours buffers of the fused graph: use --stage fused")
            slot_of = plan_memory(fused).slot_of
        text = graph.to_dot(slot_of=slot_of)
    if args.format in ("svg", "png"):
        _render(text, args.format, args.output)
        print(f"wrote {args.output}")
    elif args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(printable(text))


def info_lines(loaded: LoadedFunction | LoadedTrainStep) -> list[str]:
    from .export import LoadedTrainStep

    graph = loaded.graph
    params = {n: a for n, a in loaded.state_dict().items()
              if any(i.name == n and i.role == "param" for i in graph.inputs)}
    meta = loaded.metadata
    lines = [f"file: {loaded.path}", f"kind: {type(loaded).__name__} ({loaded.name}), "
             f"exported from backend {meta.get('backend')} at {meta.get('created')}",
             "inputs:"]
    lines += [f"  {i.name}: {i.value.type} [{i.role}]" for i in graph.inputs if i.role in ("data", "rng")]
    lines.append("outputs: " + ", ".join(f"{n}: {v.type}" for n, v in graph.outputs
                                          if not n.startswith(("param:", "state:", "buffer:"))))
    lines.append(f"parameters: {sum(a.size for a in params.values()):,} in {len(params)} tensors, "
                 f"{sum(a.nbytes for a in params.values()):,} bytes")
    if getattr(loaded, "buckets", None):
        lines.append(f"batch: 1 to {loaded.max_batch} samples, compiled per bucket "
                     f"{', '.join(map(str, loaded.buckets))}")
    lines.append(f"graph: {len(graph.nodes)} nodes")
    modules: dict[str, int] = {}
    for node in graph.nodes:
        if node.module:
            modules[node.module] = modules.get(node.module, 0) + 1
    if modules:
        lines.append("modules (nodes): " + ", ".join(f"{m} ({n})" for m, n in modules.items()))
    plan = loaded.plan
    kernels = plan.get("kernels") or []
    lines.append(f"kernels: {len(kernels)}")
    memory = plan.get("memory")
    if memory:
        lines.append(f"arena: peak {memory['peak_bytes']:,} bytes vs {memory['naive_bytes']:,} "
                     "bytes naive")
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(meta.get("versions", {}).items())))
    if isinstance(loaded, LoadedTrainStep):
        lines.append(f"training steps taken: {loaded.step_count}, learning rate {', '.join(map(str, loaded.lrs))}")
    return lines


def cmd_info(args: argparse.Namespace) -> None:
    print(printable("\n".join(info_lines(_load(args.file)))))


def _require_writable(path: str) -> None:
    """Refuse a path a file cannot be written to: a folder, or in a folder missing or not ours
    to write (the write itself may still fail: a full disk)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise CommandError(f"cannot write {path}: it is a folder")
    if not os.path.isdir(folder):
        raise CommandError(f"cannot write {path}: no folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write {path}: the folder {folder} is not writable")


def cmd_train(args: argparse.Namespace) -> None:
    from tqdm.auto import tqdm

    from . import data
    from .export import LoadedTrainStep

    if args.save:
        _require_writable(args.save)  # before training, not after it
    step = _load(args.file, args.backend)
    if not isinstance(step, LoadedTrainStep):
        raise CommandError(f"{args.file} holds an inference function, not a training step")
    # --data alone, never find_mnist's fallbacks: training on other data than named is worse
    # than an error (load_mnist's DatasetError names the directory)
    x, y = data.mnist_arrays(args.data)
    x, y = x[data.MNIST_TRAIN], y[data.MNIST_TRAIN]
    inputs = step._data_inputs
    if len(inputs) != 2 or inputs[0].value.type.shape[1:] != x.shape[1:]:
        raise CommandError(f"the step takes {[str(i.value.type) for i in inputs]}, MNIST gives "
                           f"images {x.shape[1:]}: this step was not exported for MNIST")
    batch = inputs[0].value.type.shape[0]
    if len(x) < batch:  # no full batch: the loader below would yield nothing, forever
        raise CommandError(f"{args.data} has {len(x)} training images, fewer than the step's "
                           f"batch of {batch}")
    loader = data.DataLoader(data.TensorDataset(x, y.astype(inputs[1].value.dtype)), batch_size=batch,
                             shuffle=True, seed=args.seed + step.step_count, drop_last=True)
    bar = tqdm(total=args.steps, desc="training", disable=args.quiet)
    done = 0
    while done < args.steps:
        for xb, yb in loader:
            loss = step(xb, yb)
            if not math.isfinite(loss):  # the weights are lost: the file given stays as it was
                bar.close()
                raise CommandError(f"the training loss became {loss} at step {done + 1}; "
                                   f"{'nothing was saved' if args.save else 'stopped'} (lower the "
                                   "learning rate, or find the op with graphc.train.fit(..., "
                                   "check_numerics=True) on the model's code)")
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if done == args.steps:
                break
    bar.close()
    print(f"trained {done} steps; last loss {loss:.4f}; total steps {step.step_count}")
    if args.save:
        step.export(args.save)
        print(f"wrote {args.save}")


def cmd_export_inference(args: argparse.Namespace) -> None:
    from .export import LoadedTrainStep

    if os.path.exists(args.output) and os.path.samefile(args.output, args.step):
        raise CommandError(f"{args.output} is the training step itself: writing the inference "
                           "function there would lose the step (its optimizer state, its count); "
                           "give another output file")
    step = _load(args.step, args.backend)
    if not isinstance(step, LoadedTrainStep):
        raise CommandError(f"{args.step} holds an inference function already, not a training step")
    step.export_inference(args.output, max_batch=args.max_batch)
    batches = f"any batch of 1 to {args.max_batch} samples" if args.max_batch else "its batch"
    print(f"wrote {args.output}: the eval-mode forward after {step.step_count} training steps, "
          f"for {batches}")


def _parse_example(spec: str) -> TensorType:
    try:
        return TensorType.parse(spec)
    except (KeyError, ValueError):
        raise CommandError(f"bad example shape {spec!r}: write it like f32[4,784] or i64[4]") from None


def cmd_trace(args: argparse.Namespace) -> None:
    from .api import Staged

    script, _, function = args.target.rpartition(":")
    if not script or not function:
        raise CommandError(f"expected SCRIPT.py:FUNCTION, got {args.target!r}")
    if not os.path.exists(script):
        raise CommandError(f"no such script: {script}")
    if not os.path.isfile(script):
        raise CommandError(f"{script} is not a file: expected SCRIPT.py:FUNCTION")
    # a file of any name read as Python source (spec_from_file_location knows .py files only)
    loader = importlib.machinery.SourceFileLoader("graphc_traced_script", script)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        spec.loader.exec_module(module)  # the user's own script, run as they asked
    finally:
        sys.path.pop(0)
    fn = getattr(module, function, None)
    if not callable(fn):
        raise CommandError(f"{script} defines no function {function!r}")
    examples = [_parse_example(s) for s in args.example_shapes]
    try:
        inspect.signature(fn).bind(*examples)
    except TypeError as exc:  # the script's own function, named in the error: no traceback
        raise CommandError(f"{function}{inspect.signature(fn)} cannot take the "
                           f"{len(examples)} --example-shapes given: {exc}") from None
    except ValueError:  # a callable without a signature Python can read: let the trace tell
        pass
    graph = Staged(fn).lower(*examples)
    if args.stage == "fused":
        from graphc.passes.fusion import fuse
        graph = fuse(graph)
    with open(args.dot, "w") as f:
        f.write(graph.to_dot())
    print(f"wrote {args.dot} ({len(graph.nodes)} nodes)")


def cmd_serve(args: argparse.Namespace) -> None:
    from functools import partial

    from .serve import GraphcRunner, serve

    # Before the first parallel kernel starts the OpenMP team: idle team threads then sleep
    # instead of spinning on the cores the event loop needs between batches (MNIST CNN, batch
    # 64, on the 2 busy cores: 43 ms a call instead of 240 ms).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    load = partial(GraphcRunner.from_file, backend=args.backend)
    runners = [load(path, max_batch=args.max_batch) for path in args.models]

    def ready(host: str, port: int) -> None:
        names = ", ".join(f"{r.name} v{r.version} (batch <= {min(r.max_batch, args.max_batch)})"
                          for r in runners)
        print(f"graphc serve: {names} on http://{host}:{port}", flush=True)

    serve(runners, host=args.host, port=args.port, max_batch=args.max_batch,
          max_delay_ms=args.max_delay_ms, max_body_bytes=args.max_body_bytes,
          body_timeout_s=args.body_timeout_s, drain_timeout_s=args.drain_timeout_s, loader=load,
          ready=ready)


def _integer_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, else a usage error saying so."""
    return _integer_in(minimum, None)


def _integer_in(minimum: int, maximum: int | None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum], else a usage error saying so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {value}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="graphc", description="Inspect, run and trace graphc graphs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show an exported step's graph")
    p.add_argument("file")
    p.add_argument("--stage", choices=["traced", "optimized", "fused"], default="optimized")
    p.add_argument("--format", choices=["text", "dot", "svg", "png"], default="text")
    p.add_argument("--memory", action="store_true", help="colour buffers by arena slot (fused stage)")
    p.add_argument("-o", "--output", help="the file to write (text and dot: stdout without it; "
                   "svg and png need it)")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("info", help="signature, sizes, kernels, memory and versions of an export")
    p.add_argument("file")
    p.set_defaults(run=cmd_info)

    p = sub.add_parser("train", help="continue training an exported step on MNIST-format data")
    p.add_argument("file")
    p.add_argument("--data", required=True, help="directory with MNIST IDX files")
    p.add_argument("--steps", type=_integer_at_least(1), required=True)
    p.add_argument("--save")
    p.add_argument("--seed", type=_integer_at_least(0), default=0)
    p.add_argument("--backend", default=None)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("export-inference", help="write a training step's model in eval mode, with "
                       "its current weights, as an inference export (for gc.load and serve)")
    p.add_argument("step", metavar="STEP.gcx")
    p.add_argument("output", metavar="OUT.gcx")
    p.add_argument("--max-batch", type=int, default=None,
                   help="take any batch of 1 to N samples (N: the step's batch or a power of two)")
    p.add_argument("--backend", default=None, help="compile the forward here to record its "
                   "kernels and memory plan (default: reference)")
    p.set_defaults(run=cmd_export_inference)

    p = sub.add_parser("trace", help="trace a function of a script and write its graph as DOT")
    p.add_argument("target", help="SCRIPT.py:FUNCTION")
    p.add_argument("--example-shapes", nargs="+", required=True, metavar="TYPE",
                   help="one per argument, e.g. f32[4,784] i64[4]")
    p.add_argument("--stage", choices=["optimized", "fused"], default="optimized")
    p.add_argument("--dot", required=True)
    p.set_defaults(run=cmd_trace)

    p = sub.add_parser("serve", help="serve inference exports over HTTP with dynamic batching",
                       description="POST /v1/models/NAME/predict, /v1/models/NAME/load; GET "
                       "/v1/models, /healthz, /metrics (see graphc/serve/__init__.py). NAME is "
                       "the file name without .gcx. SIGTERM drains in-flight requests and exits 0.")
    p.add_argument("models", nargs="+", metavar="MODEL.gcx")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_integer_in(0, 65535), default=8000,
                   help="0 picks a free port (printed)")
    p.add_argument("--max-batch", type=int, default=64, help="most samples in one compiled call")
    p.add_argument("--max-delay-ms", type=float, default=2.0,
                   help="longest wait for more requests after a batch's first")
    p.add_argument("--max-body-bytes", type=int, default=8 << 20, help="larger bodies get 413")
    p.add_argument("--body-timeout-s", type=float, default=30.0,
                   help="a body not in within this time gets 408 (slow clients cannot hold "
                        "every connection)")
    p.add_argument("--drain-timeout-s", type=float, default=30.0,
                   help="on SIGTERM, the longest wait for requests in flight")
    p.add_argument("--backend", default=None)
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (CommandError, GraphcError, OSError) as exc:
        print(printable(f"graphc {args.command}: error: {exc}"), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
