"""Reference models used by the demo, examples, notebooks and benchmarks."""
from __future__ import annotations

from . import nn


def mnist_cnn(image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """The canonical MNIST CNN: conv 1->32 3x3, ReLU, conv 32->64 3x3, ReLU, 2x2 max-pool,
    dropout 0.25, flatten, linear ->128, ReLU, dropout 0.5, linear 128->classes.
    `image_size` adapts the first linear layer (28 -> 9216 features, 8 -> 256)."""
    pooled = (image_size - 4) // 2
    return nn.Sequential(
        nn.Conv2d(1, 32, 3), nn.ReLU(),
        nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.MaxPool2d(2), nn.Dropout(0.25), nn.Flatten(),
        nn.Linear(64 * pooled * pooled, 128), nn.ReLU(), nn.Dropout(0.5),
        nn.Linear(128, num_classes),
    )


def mlp(sizes: tuple[int, ...] = (784, 256, 256, 10)) -> nn.Sequential:
    """A ReLU multi-layer perceptron with the given layer widths."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
