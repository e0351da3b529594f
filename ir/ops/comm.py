"""Point-to-point communication: `send` and `recv`, the messages between pipeline stages.

A pipeline stage's graphs (graphc/distributed/pipeline.py) say where values enter and leave
the stage: a `recv` node where an activation (or a cotangent, in the backward) arrives from
the stage `peer`, a `send` node where one leaves for it. `tag` names the message among those
two stages exchange for one micro-batch (the runtime adds the micro-batch), and `bytes` is
its size on the wire, the contiguous buffer the tensor fills.

    recv[shape, dtype, peer, tag, bytes]  ->  x          (no operands: the message is the source)
    x  ->  send[peer, tag, bytes]  ->  x                 (the value sent, so it can be an output)

The ops sit only at a stage graph's boundary (recv nodes read nothing computed, send nodes
feed only outputs), and no backend compiles them: `split_comm` in the pipeline module cuts
them off, the backend compiles the rest, and the stage's executor runs the receives before
it and the sends after it, as graphc/scan_lowering.py runs scans between compiled segments.
Their NumPy implementations therefore only refuse: without a communicator there is no
message to read or write. Nor do they differentiate: a stage's backward is the VJP of its
forward's compiled part, its cotangents received and sent by comm nodes of its own, whose
tags the pipeline numbers.
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import GraphcError
from ..registry import OPAQUE, SOURCE, Attr, OpTypeError, Primitive, register
from ..types import TensorType

SEND, RECV = "send", "recv"
COMM_OPS = (SEND, RECV)


class CommunicationError(GraphcError):
    """A communication op evaluated where no communicator can carry its message."""


def message_bytes(type: TensorType) -> int:
    """Bytes of a tensor of `type` in one contiguous buffer."""
    return math.prod(type.shape) * np.dtype(type.np_dtype).itemsize


def _check_message(type: TensorType, peer: int, tag: int, nbytes: int) -> None:
    if peer < 0 or tag < 0:
        raise OpTypeError(f"peer ({peer}) and tag ({tag}) must be non-negative")
    if nbytes != message_bytes(type):
        raise OpTypeError(f"bytes={nbytes} does not match {type}, which is {message_bytes(type)} bytes")


def _recv_type(*, shape: tuple[int, ...], dtype: str, peer: int, tag: int, bytes: int) -> TensorType:
    result = TensorType(shape, dtype)
    _check_message(result, peer, tag, bytes)
    return result


def _send_type(x: TensorType, *, peer: int, tag: int, bytes: int) -> TensorType:
    _check_message(x, peer, tag, bytes)
    return x


def _no_communicator(op: str):
    def impl(*arrays: np.ndarray, peer: int, tag: int, **attrs) -> np.ndarray:
        raise CommunicationError(
            f"{op} (peer {peer}, tag {tag}) needs a communicator: the reference interpreter has "
            "none; run the stage graph through graphc.distributed.pipeline.StageExecutable, "
            "which compiles the rest on any backend and carries the messages")
    return impl


_MESSAGE = {"peer": Attr("int"), "tag": Attr("int"), "bytes": Attr("int")}

register(Primitive(
    RECV, SOURCE, _recv_type, _no_communicator(RECV), None,
    attrs={"shape": Attr("ints"), "dtype": Attr("dtype"), **_MESSAGE}, num_inputs=0,
    doc="The tensor stage `peer` sends with `tag`: `bytes` bytes into a contiguous buffer."))

register(Primitive(
    SEND, OPAQUE, _send_type, _no_communicator(SEND), None, attrs=dict(_MESSAGE), num_inputs=1,
    doc="Sends its operand (`bytes` bytes, contiguous) to stage `peer` with `tag`; returns it."))
