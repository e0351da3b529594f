"""An LSTM sequence classifier: each MNIST image is read as 28 rows of 28 pixels.

    python examples/mnist_lstm.py [--epochs 2] [--limit N] [--data DIR]

The recurrence runs inside one compiled training step: as a loop over the 28 steps in blocks of
rows side by side on several threads, unrolled into 28 cells on one.
"""
from __future__ import annotations

import argparse

import graphc as gc
import graphc.nn.functional as F
from graphc import data, nn, optim
from graphc.tensor import Tensor
from graphc.train import fit


class RowLSTM(nn.Module):
    def __init__(self, width: int, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.lstm = nn.LSTM(width, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, images: Tensor) -> Tensor:
        rows = images.reshape(images.shape[0], images.shape[-2], images.shape[-1])
        _, (h, _) = self.lstm(rows)
        return self.head(h[-1])  # the last layer's final hidden state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=None)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    directory = data.find_mnist(args.data)
    if directory:
        x, y = data.mnist_arrays(directory)
        train, evaluation = (x[data.MNIST_TRAIN], y[data.MNIST_TRAIN]), (x[data.MNIST_EVAL], y[data.MNIST_EVAL])
    else:
        images, labels = data.load_digits()
        x = images[:, None]
        train, evaluation = (x[:1400], labels[:1400]), (x[1400:], labels[1400:])
    if args.limit:
        train = (train[0][:args.limit], train[1][:args.limit])
    gc.manual_seed(0)
    model = RowLSTM(width=train[0].shape[-1])
    step = gc.compile_train_step(model, F.cross_entropy, optim.Adam(model.parameters(), lr=2e-3),
                                 (train[0][:args.batch_size], train[1][:args.batch_size]))
    print(f"training step: {len(step.graph.nodes)} nodes for a {train[0].shape[-2]}-step recurrence")
    history = fit(step, data.DataLoader(data.TensorDataset(*train), args.batch_size, shuffle=True,
                                        seed=0, drop_last=True),
                  epochs=args.epochs, val_loader=data.DataLoader(data.TensorDataset(*evaluation), 500),
                  on_epoch_end=lambda e, logs: print(f"epoch {e}: loss {logs['loss']:.4f}, "
                                                     f"eval accuracy {logs['val_accuracy']:.4f}"))
    print(f"final eval accuracy {history['val_accuracy'][-1]:.4f}")


if __name__ == "__main__":
    main()
