"""The benchmark workloads: one model definition shared by graphc and PyTorch, seeded data, and
the optimizer each workload trains with.

The models are written once against the names both frameworks share (nn.Linear, nn.LayerNorm,
F.softmax, Tensor.transpose, ...) and instantiated per framework, so the two sides cannot drift
apart; `Framework` holds the few things that differ (constants and GELU). PyTorch's state dict,
converted to NumPy, loads into the graphc model: both start from the same weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable

import numpy as np


@dataclass(frozen=True)
class Workload:
    """A model family with its sizes, the batch (samples are images or sequences), the optimizer
    (name and keyword arguments, the same on every side) and smaller sizes for smoke tests."""

    family: str
    config: dict[str, Any]
    batch: int
    optimizer: tuple[str, dict[str, Any]]
    tiny: dict[str, Any] = field(default_factory=dict)  # config overrides, "batch" included
    # Dropout draws different masks on each side, so first losses are comparable only without it.
    deterministic: bool = True

    def sized(self, tiny: bool) -> tuple[dict[str, Any], int]:
        """(model config, batch) at full size or at the tiny smoke-test size."""
        if not tiny:
            return self.config, self.batch
        config = {**self.config, **self.tiny}
        return config, config.pop("batch", self.batch)


ADAM = ("adam", {"lr": 1e-3})
TINY_TRANSFORMER = {"vocab": 32, "d_model": 16, "heads": 2, "context": 8, "layers": 1, "batch": 2}
TINY_RESNET = {"widths": (4, 8), "blocks": 1, "image": 8, "batch": 4}
TINY_LSTM = {"features": 4, "hidden": 8, "steps": 3, "batch": 2}

WORKLOADS: dict[str, Workload] = {
    "mlp": Workload("mlp", {"sizes": (784, 256, 256, 10)}, 128, ADAM,
                    {"sizes": (8, 16, 10), "batch": 4}),
    "cnn": Workload("cnn", {"image": 28}, 64, ADAM, {"image": 8, "batch": 2}, deterministic=False),
    # 2-layer causal LM, d 64, 4 heads, context 32, batch 16 (issue 21's reference size)
    "transformer-s": Workload("transformer", {"vocab": 256, "d_model": 64, "heads": 4, "context": 32,
                                              "layers": 2}, 16,
                              ("adamw", {"lr": 1e-3, "weight_decay": 0.01}), TINY_TRANSFORMER),
    "transformer-m": Workload("transformer", {"vocab": 512, "d_model": 128, "heads": 4,
                                              "context": 64, "layers": 4}, 16,
                              ("adamw", {"lr": 1e-3, "weight_decay": 0.01}), TINY_TRANSFORMER),
    "resnet-s": Workload("resnet", {"widths": (16, 32, 64), "blocks": 1, "image": 32}, 32,
                         ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}), TINY_RESNET),
    "resnet-m": Workload("resnet", {"widths": (32, 64, 128), "blocks": 2, "image": 32}, 32,
                         ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}), TINY_RESNET),
    # sequential MNIST: 28 rows of 28 pixels, LSTM(28 -> 128), batch 64 (the reference size)
    "lstm-28": Workload("lstm", {"features": 28, "hidden": 128, "steps": 28}, 64, ADAM, TINY_LSTM),
    "lstm-64": Workload("lstm", {"features": 32, "hidden": 256, "steps": 64}, 32, ADAM, TINY_LSTM),
    # MNIST as 112 steps of 7 pixels, and pixel by pixel: 784 steps of one (the scan issue's targets)
    "lstm-112": Workload("lstm", {"features": 7, "hidden": 128, "steps": 112}, 64, ADAM, TINY_LSTM),
    "lstm-784": Workload("lstm", {"features": 1, "hidden": 128, "steps": 784}, 64, ADAM, TINY_LSTM),
}
CLASSES = 10


def batch_data(workload: str, tiny: bool = False, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One seeded batch (inputs, integer targets), float32 and int64."""
    spec = WORKLOADS[workload]
    config, batch = spec.sized(tiny)
    rng = np.random.default_rng(seed)
    if spec.family == "transformer":
        # targets are the next tokens, flattened to (batch * context,) for the cross entropy
        tokens = rng.integers(0, config["vocab"], (batch, config["context"] + 1))
        return tokens[:, :-1].copy(), tokens[:, 1:].reshape(-1).copy()
    shape = {"mlp": lambda: (config["sizes"][0],),
             "cnn": lambda: (1, config["image"], config["image"]),
             "resnet": lambda: (3, config["image"], config["image"]),
             "lstm": lambda: (config["steps"], config["features"])}[spec.family]()
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    return x, rng.integers(0, CLASSES, batch).astype(np.int64)


@dataclass(frozen=True)
class Framework:
    """What the shared definitions need from one framework."""

    nn: ModuleType
    F: ModuleType
    constant: Callable[[np.ndarray], Any]  # a NumPy array as the framework's constant
    gelu: Callable[[Any], Any]             # tanh-approximated GELU


def graphc_framework() -> Framework:
    import graphc.nn as nn
    import graphc.nn.functional as F

    return Framework(nn, F, lambda a: a, lambda x: F.gelu(x, approximate="tanh"))


def torch_framework() -> Framework:
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    return Framework(nn, F, torch.from_numpy, lambda x: F.gelu(x, approximate="tanh"))


def build_model(workload: str, fw: Framework, tiny: bool = False) -> Any:
    """The workload's model in framework `fw` (initialised by that framework's seeded RNG)."""
    spec = WORKLOADS[workload]
    config, _ = spec.sized(tiny)
    return {"mlp": _mlp, "cnn": _cnn, "transformer": _transformer, "resnet": _resnet,
            "lstm": _lstm}[spec.family](fw, **config)


def optimizer_for(workload: str, module: ModuleType, params: Any) -> Any:
    """The workload's optimizer from `module` (graphc.optim or torch.optim)."""
    name, kwargs = WORKLOADS[workload].optimizer
    cls = {"adam": module.Adam, "adamw": module.AdamW, "sgd": module.SGD}[name]
    return cls(params, **kwargs)


# -- the shared definitions ----------------------------------------------------------------------
def _mlp(fw: Framework, sizes: tuple[int, ...]) -> Any:
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(fw.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(fw.nn.ReLU())
    return fw.nn.Sequential(*layers)


def _cnn(fw: Framework, image: int) -> Any:
    """The MNIST CNN (graphc.models.mnist_cnn)."""
    nn = fw.nn
    pooled = (image - 4) // 2
    return nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
                         nn.Linear(64 * pooled * pooled, 128), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(128, CLASSES))


def _transformer(fw: Framework, vocab: int, d_model: int, heads: int, context: int,
                 layers: int) -> Any:
    """A pre-norm causal language model (GPT-2's layout, no dropout): token and position
    embeddings, `layers` blocks of attention and a 4x GELU MLP, a final LayerNorm and an
    unbiased head. forward(tokens (B, T)) -> logits (B*T, vocab)."""
    nn, F = fw.nn, fw.F
    head_dim = d_model // heads
    # -1e9 rather than -inf above the diagonal: graphc compiles with fastmath (no infinities)
    mask = fw.constant(np.triu(np.full((context, context), -1e9, np.float32), k=1))
    positions = fw.constant(np.arange(context, dtype=np.int64))

    class CausalSelfAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)

        def forward(self, x: Any) -> Any:
            B, T, _ = x.shape
            qkv = self.qkv(x)
            q, k, v = (qkv[:, :, i * d_model:(i + 1) * d_model].reshape(B, T, heads, head_dim)
                       .transpose(1, 2) for i in range(3))
            scores = q @ k.transpose(-2, -1) * (1 / math.sqrt(head_dim)) + mask
            out = F.softmax(scores, dim=-1) @ v
            return self.proj(out.transpose(1, 2).reshape(B, T, d_model))

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(d_model, 4 * d_model)
            self.proj = nn.Linear(4 * d_model, d_model)

        def forward(self, x: Any) -> Any:
            return self.proj(fw.gelu(self.fc(x)))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1, self.attn = nn.LayerNorm(d_model), CausalSelfAttention()
            self.ln2, self.mlp = nn.LayerNorm(d_model), MLP()

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))

    class LanguageModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.token_embedding = nn.Embedding(vocab, d_model)
            self.position_embedding = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList([Block() for _ in range(layers)])
            self.ln_f = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, vocab, bias=False)

        def forward(self, tokens: Any) -> Any:
            x = self.token_embedding(tokens) + self.position_embedding(positions)
            for block in self.blocks:
                x = block(x)
            return self.head(self.ln_f(x)).reshape(-1, vocab)

    return LanguageModel()


def _resnet(fw: Framework, widths: tuple[int, ...], blocks: int, image: int) -> Any:
    """A CIFAR-style ResNet: a 3x3 stem, one stage per width of `blocks` basic blocks (two 3x3
    convolutions with batch norm, the first stage keeps the resolution, later ones halve it by
    stride 2 with a 1x1 strided projection on the shortcut), global average pooling, linear.
    `image` only documents the input size: the pooling makes the model size-independent."""
    nn, F = fw.nn, fw.F

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                             nn.BatchNorm2d(cout))
                               if stride != 1 or cin != cout else None)

        def forward(self, x: Any) -> Any:
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            shortcut = x if self.downsample is None else self.downsample(x)
            return F.relu(out + shortcut)

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(widths[0])
            stages, cin = [], widths[0]
            for s, width in enumerate(widths):
                for b in range(blocks):
                    stages.append(BasicBlock(cin, width, 2 if s > 0 and b == 0 else 1))
                    cin = width
            self.stages = nn.Sequential(*stages)
            self.fc = nn.Linear(widths[-1], CLASSES)

        def forward(self, x: Any) -> Any:
            x = self.stages(F.relu(self.bn(self.stem(x))))
            return self.fc(x.mean((2, 3)))

    return ResNet()


def _lstm(fw: Framework, features: int, hidden: int, steps: int) -> Any:
    """LSTM(features -> hidden), a linear classifier on the last hidden state (`steps`, the
    sequence length, sizes only the data)."""
    nn = fw.nn

    class SequenceClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # the data is (batch, steps, features); both defaults are time-major
            self.lstm = nn.LSTM(features, hidden, batch_first=True)
            self.fc = nn.Linear(hidden, CLASSES)

        def forward(self, x: Any) -> Any:
            out, _ = self.lstm(x)
            return self.fc(out[:, -1])

    return SequenceClassifier()
