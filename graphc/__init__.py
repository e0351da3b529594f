"""graphc: a JIT-compiled computation-graph compiler for deep learning.

Write plain Python over tensors; graphc traces it into a static, typed dataflow IR,
differentiates and optimizes the graph, and runs it through Numba.
"""
from graphc.ir import (DTypeError, Graph, GraphcError, IndexOutOfRangeError, InputError,
                       SerializationError, ShapeError, TensorType, VerificationError)
from graphc.ir.errors import TracedValueError

from . import nn, optim
from .api import Staged, grad, jit, trace, value_and_grad
from .functions import *  # noqa: F401,F403  (gc.exp, gc.where, ...)
from .functions import __all__ as _function_names
from .compile import CompiledModel, TrainStep, compile, compile_train_step, finish_compiling
from .control import scan
from .export import load
from .onnx_export import export_onnx
from .random import manual_seed
from .tensor import Tensor

__version__ = "0.1.0"

# dtypes under PyTorch's names (x.to(gc.float64), gc.zeros(3, dtype=gc.long)): graphc names a
# dtype by a string, as Tensor.dtype gives it. Left out of __all__: `from graphc import *` must
# not rebind Python's bool, int and float.
float32, float64, int32, int64 = "float32", "float64", "int32", "int64"
float, double, int, long, bool = "float32", "float64", "int32", "int64", "bool"

__all__ = ["DTypeError", "Graph", "GraphcError", "IndexOutOfRangeError", "InputError", "SerializationError", "ShapeError",
           "CompiledModel", "Staged", "Tensor", "TracedValueError", "TrainStep", "compile", "compile_train_step", "optim", "TensorType", "VerificationError", "grad", "jit", "load", "manual_seed", "nn",
           "trace", "value_and_grad", *_function_names]
__all__ += ["export_onnx", "finish_compiling", "scan"]
