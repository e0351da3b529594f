"""graphc.nn: neural-network building blocks with PyTorch's names."""
from . import functional
from .containers import ModuleDict, ModuleList
from .layers import (AvgPool2d, Conv2d, Dropout, Flatten, Identity, Linear, LogSoftmax, MaxPool2d,
                     ReLU, Sequential, Sigmoid, Softmax, Tanh)
from .layers import ELU, GELU, LeakyReLU, SiLU, Softplus
from .module import Module, Parameter, functional_call
from .normalization import BatchNorm1d, BatchNorm2d, LayerNorm
from .recurrent import GRU, LSTM, RNN
from .sparse import Embedding

__all__ = ["AvgPool2d", "Conv2d", "Dropout", "Flatten", "Identity", "Linear", "LogSoftmax",
           "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "Sigmoid", "Softmax", "Tanh",
           "functional", "functional_call"]
__all__ += ["BatchNorm1d", "BatchNorm2d", "Embedding", "GRU", "LSTM", "LayerNorm", "ModuleDict",
            "ModuleList", "RNN"]
__all__ += ["ELU", "GELU", "LeakyReLU", "SiLU", "Softplus"]
