"""graphc.nn: neural-network building blocks with PyTorch's names."""
from . import functional, init, utils
from .attention import (MultiheadAttention, Transformer, TransformerDecoder, TransformerDecoderLayer,
                        TransformerEncoder, TransformerEncoderLayer)
from .containers import ModuleDict, ModuleList, ParameterDict, ParameterList
from .conv import Conv1d, ConvTranspose1d, ConvTranspose2d
from .layers import (AvgPool2d, Conv2d, Dropout, Flatten, Identity, Linear, LogSoftmax, MaxPool2d,
                     ReLU, Sequential, Sigmoid, Softmax, Tanh)
from .layers import ELU, GELU, LeakyReLU, SiLU, Softplus
from .layers import (AlphaDropout, Dropout1d, Dropout2d, Hardtanh, PixelShuffle, PixelUnshuffle,
                     PReLU, ReLU6, Upsample)
from .layers import (CELU, GLU, SELU, CosineSimilarity, Hardsigmoid, Hardswish, LogSigmoid, Mish,
                     PairwiseDistance, Softmin, Softsign, Tanhshrink, Unflatten)
from .loss import (BCELoss, BCEWithLogitsLoss, CosineEmbeddingLoss, CrossEntropyLoss, CTCLoss,
                   GaussianNLLLoss, HingeEmbeddingLoss, HuberLoss, KLDivLoss, L1Loss,
                   MarginRankingLoss, MSELoss, MultiLabelSoftMarginLoss, NLLLoss, PoissonNLLLoss,
                   SmoothL1Loss, SoftMarginLoss, TripletMarginLoss)
from .module import Module, Parameter, functional_call
from .normalization import (BatchNorm1d, BatchNorm2d, GroupNorm, InstanceNorm1d, InstanceNorm2d,
                            LayerNorm, RMSNorm)
from .pooling import AdaptiveAvgPool2d, AdaptiveMaxPool2d, AvgPool1d, MaxPool1d
from .recurrent import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .sparse import Embedding, EmbeddingBag

__all__ = ["AvgPool2d", "Conv2d", "Dropout", "Flatten", "Identity", "Linear", "LogSoftmax",
           "MaxPool2d", "Module", "Parameter", "ReLU", "Sequential", "Sigmoid", "Softmax", "Tanh",
           "functional", "functional_call", "init"]
__all__ += ["BatchNorm1d", "BatchNorm2d", "Embedding", "GRU", "LSTM", "LayerNorm", "RMSNorm", "ModuleDict",
            "ModuleList", "RNN"]
__all__ += ["AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "Conv1d", "MultiheadAttention",
            "Transformer", "TransformerEncoder", "TransformerEncoderLayer"]
__all__ += ["ELU", "GELU", "LeakyReLU", "SiLU", "Softplus"]
__all__ += ["ConvTranspose2d", "Dropout1d", "Dropout2d", "GroupNorm", "Hardtanh", "PReLU", "ReLU6",
            "Upsample"]
__all__ += ["CELU", "GLU", "SELU", "CosineSimilarity", "Hardsigmoid", "Hardswish", "LogSigmoid",
            "Mish", "PairwiseDistance", "Softmin", "Softsign", "Tanhshrink", "Unflatten"]
__all__ += ["GRUCell", "LSTMCell", "RNNCell"]
__all__ += ["BCELoss", "BCEWithLogitsLoss", "CosineEmbeddingLoss", "CrossEntropyLoss", "CTCLoss",
            "GaussianNLLLoss", "HingeEmbeddingLoss", "HuberLoss", "KLDivLoss", "L1Loss",
            "MarginRankingLoss", "MSELoss", "MultiLabelSoftMarginLoss", "NLLLoss", "PoissonNLLLoss",
            "SmoothL1Loss", "SoftMarginLoss", "TripletMarginLoss"]
__all__ += ["AlphaDropout", "AvgPool1d", "ConvTranspose1d", "InstanceNorm1d", "InstanceNorm2d",
            "MaxPool1d", "EmbeddingBag", "ParameterDict", "ParameterList", "PixelShuffle", "PixelUnshuffle",
            "TransformerDecoder", "TransformerDecoderLayer"]
