"""The vocabulary of fused graphs, shared by fusion (which writes them) and the backends (which
lower them): how each op is grouped, which constants are inlined as literals, and how kernels are
named. A fused graph's nodes are all ``kernel`` nodes (KERNEL_OP), each holding its subgraph.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

from .graph import Node
from .registry import ELEMENTWISE, OPAQUE, REDUCTION, SHAPE, SOURCE, get
from .verify import KERNEL_OP

def is_literal(node: Node) -> bool:
    """A one-element constant: code generators inline it instead of loading it."""
    return node.op == "constant" and node.output.type.size == 1


def op_class(op: str) -> str:
    """How fusion treats an op: 'constant', 'view', 'pointwise', 'reduction' or 'library'.
    Read from the op's registry properties: views alias their operand; opaque ops with an
    indexed load (gather-like) fuse as pointwise members."""
    if op == "constant":
        return "constant"
    prim = get(op)
    if prim.view:
        return "view"
    kind = prim.kind
    if kind in (ELEMENTWISE, SHAPE, SOURCE) or prim.indexed_load:
        return "pointwise"
    if kind == REDUCTION:
        return "reduction"
    if kind != OPAQUE:
        raise ValueError(f"fusion: op {op!r} has unknown kind {kind!r}")
    return "library"


# Kernel names become function names, and Numba names its cache files after the function: an
# LSTM unrolled over 60 steps fused 59 adds into one name, longer than a file name may be. The
# bound leaves room for the backends' prefixes and suffixes ("kernel_", "_epilogue").
MAX_LABEL_LENGTH = 40
LABEL_HASH_LENGTH = 8


def bounded_label(words: Sequence[str], limit: int = MAX_LABEL_LENGTH) -> str:
    """`words` joined by '_', readable and at most `limit` characters: a label that is too long
    keeps its start and ends in a short hash of the whole. Deterministic (a function of `words`
    alone), so one kernel is named alike in every graph and process and its source, the
    kernel cache's key, stays the same."""
    label = "_".join(words)
    if len(label) <= limit:
        return label
    digest = hashlib.sha256(label.encode()).hexdigest()[:LABEL_HASH_LENGTH]
    return f"{label[:limit - LABEL_HASH_LENGTH - 1].rstrip('_')}_{digest}"


__all__ = ["KERNEL_OP", "LABEL_HASH_LENGTH", "MAX_LABEL_LENGTH", "bounded_label", "is_literal", "op_class"]
