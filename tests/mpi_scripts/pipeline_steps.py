"""A few pipeline-parallel steps, run by tests/test_pipeline_parallel.py under `mpiexec -n 2`.

    python pipeline_steps.py equivalent MODEL DTYPE OPTIMIZER OUT_DIR [BACKEND] [SCHEDULE]
    python pipeline_steps.py exit

  equivalent  2 stages, 4 micro-batches, STEPS steps on `batches()`; rank r writes
              OUT_DIR/rank<r>.npz: the losses, its stage's state (`stage_state()`), its times
              and the messages its stage graphs send and receive (`messages()`).
              Under 4 ranks: 2 stages x 2 replicas, replica k taking rows [kB/2, (k+1)B/2)
              of each batch in 2 micro-batches
  exit        rank 1 leaves quietly before its first step: rank 0 must give up on the
              activation's cotangent within $GRAPHC_DDP_TIMEOUT and name rank 1
"""
from __future__ import annotations

import os
import sys

import numpy as np

BATCH = 8  # the global batch: 4 micro-batches of 2
STEPS = 3
MICROBATCHES = 4


def build(model: str, dtype: str):
    """The model (its weights drawn from seed 0) and its batches: an MLP or the MNIST CNN on
    8x8 images with dropout off (eval mode), so that micro-batches see what the batch sees."""
    import graphc as gc
    from graphc.models import mlp, mnist_cnn
    gc.manual_seed(0)
    rng = np.random.default_rng(1234)
    if model == "mlp":
        net, shape = mlp((12, 16, 16, 4)), (BATCH, 12)
    else:
        net, shape = mnist_cnn(image_size=8, num_classes=4).eval(), (BATCH, 1, 8, 8)
    batches = [(rng.standard_normal(shape).astype(dtype), rng.integers(0, 4, BATCH).astype(np.int64))
               for _ in range(STEPS)]
    return net.to(dtype), batches


def optimizer(model, name: str = "adam"):
    """Adam, or SGD with momentum: in float32 Adam turns the rounding differences of summing
    micro-batch gradients into ~1e-6 absolute, beyond the tests' tolerance."""
    from graphc import optim
    if name == "sgd":
        return optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    return optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)


def main(argv: list[str]) -> None:
    from graphc import distributed
    world = distributed.init()
    import graphc.nn.functional as F

    mode = argv[0]
    if mode == "exit":
        model, batches = build("mlp", "float32")
        step = distributed.PipelineParallelStep(model, F.cross_entropy, optimizer(model),
                                                batches[0], stages=2, microbatches=MICROBATCHES,
                                                backend="reference", world=world)
        if world.rank == 1:
            print("rank 1 leaving before its first step", flush=True)
            sys.exit(0)  # MPI_Finalize: rank 0 sees no error, only silence
        step(*batches[0])
        return
    model_name, dtype, optimizer_name, out_dir = argv[1:5]
    backend = argv[5] if len(argv) > 5 else "reference"
    schedule = argv[6] if len(argv) > 6 else "1f1b"
    model, batches = build(model_name, dtype)
    replicas = world.size // 2
    if replicas > 1:
        replica, rows = world.rank % replicas, BATCH // replicas
        batches = [tuple(a[replica * rows:(replica + 1) * rows] for a in batch) for batch in batches]
    step = distributed.PipelineParallelStep(model, F.cross_entropy,
                                            optimizer(model, optimizer_name), batches[0],
                                            stages=2, microbatches=MICROBATCHES // replicas,
                                            schedule=schedule, backend=backend, world=world)
    losses = [step(*batch) for batch in batches]
    (times,) = step.times
    np.savez(os.path.join(out_dir, f"rank{world.rank}.npz"), losses=np.array(losses),
             times=np.array([times.forward, times.backward, times.update, times.wait,
                             times.allreduce, times.total]),
             messages=np.array(messages(step)), **step.stage_state())


def messages(step) -> list[str]:
    """The comm nodes of the one stage this rank compiled: "STAGE GRAPH OP PEER TAG BYTES"."""
    ((stage, graphs),) = step.stage_graphs().items()
    return [f"{stage} {part} {node.op} {node.attrs['peer']} {node.attrs['tag']} {node.attrs['bytes']}"
            for part, graph in zip(("forward", "backward"), graphs) for node in graph.nodes
            if node.op in ("send", "recv")]


if __name__ == "__main__":
    main(sys.argv[1:])
