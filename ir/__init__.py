"""graphc.ir: the static, typed dataflow IR every other layer speaks."""
from . import ops  # noqa: F401  (registers the primitives)
from .builder import Builder
from .errors import (AttributeSchemaError, DTypeError, GraphcError, IndexOutOfRangeError, InputError,
                     SerializationError, ShapeError, VerificationError)
from .graph import ROLES, Graph, GraphInput, Node, Value
from .registry import PRIMITIVES, Primitive
from .types import DTYPES, TensorType

__all__ = [
    "AttributeSchemaError", "Builder", "DTYPES", "DTypeError", "Graph", "GraphInput", "GraphcError",
    "IndexOutOfRangeError", "InputError", "Node", "PRIMITIVES", "Primitive", "ROLES",
    "SerializationError", "ShapeError", "TensorType", "Value", "VerificationError",
]
