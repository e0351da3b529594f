"""Datasets and batching on the host, in NumPy: IDX/MNIST reading, loaders, transforms.

Everything here runs before a compiled step sees the data, so it is plain NumPy and keeps the
per-batch Python small: a `DataLoader` over a `TensorDataset` gathers each batch with one
fancy-indexing call per array instead of a loop over samples.

The real MNIST test split lives outside the repository (`find_mnist` locates it); this project
trains on its images 0..7999 (`MNIST_TRAIN`) and evaluates on 8000..9999 (`MNIST_EVAL`).
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, Protocol, runtime_checkable

import numpy as np

from graphc.ir.errors import GraphcError, LoadError

from .bounded_io import open_regular

Batch = tuple[np.ndarray, ...]
Transform = Callable[[np.ndarray], np.ndarray]

MNIST_TRAIN = slice(0, 8000)
MNIST_EVAL = slice(8000, 10000)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class DatasetError(GraphcError, ValueError):
    """A data file that is missing, malformed or inconsistent with its companions."""


# --------------------------------------------------------------------------- IDX files

_GZIP_MAGIC = b"\x1f\x8b"
# IDX type codes; every multi-byte type is stored big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# A gzip stream inflates up to ~1000x: a compressed file may declare this much, a raw file
# whatever its size on disk holds.
MAX_IDX_BYTES = 1 << 30


def read_idx(path: str | os.PathLike, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed or raw, into a native-endian array.

    Compression is detected from the gzip magic bytes, not from the file name. The file is
    streamed: the header is read first, and then exactly the bytes it declares, so memory stays
    within the array the header describes however much a stream would decompress to; a
    compressed file may declare at most `max_bytes` (a raw file's size on disk must match its
    header). Raises `DatasetError` naming the file for something other than a regular file,
    a bad magic number, an unknown type code, a truncated header or payload, trailing bytes,
    a corrupt gzip stream, a compressed payload over `max_bytes`, or a shape NumPy cannot hold.
    """
    name = os.fspath(path)
    try:
        f = open_regular(name)
    except LoadError as exc:
        raise DatasetError(str(exc)) from None
    with f:
        compressed = f.read(2) == _GZIP_MAGIC
        f.seek(0)
        if not compressed:
            return _read_idx_stream(name, f, os.fstat(f.fileno()).st_size, max_bytes)
        try:
            with gzip.GzipFile(fileobj=f) as stream:
                return _read_idx_stream(name, stream, None, max_bytes)
        except (OSError, EOFError, zlib.error) as exc:
            raise DatasetError(f"{name}: corrupt gzip stream ({exc})") from exc


def _read_idx_stream(name: str, stream: BinaryIO, raw_size: int | None, max_bytes: int) -> np.ndarray:
    """The array of an IDX stream; `raw_size` is the file's size for an uncompressed one."""
    head = _read_exactly(stream, 4)
    dtype, ndim = _parse_idx_magic(name, head)
    dims = _read_exactly(stream, 4 * ndim)
    if len(dims) < 4 * ndim:
        raise DatasetError(f"{name}: truncated IDX header: {ndim} dimensions need {4 + 4 * ndim} "
                           f"bytes, the file holds {4 + len(dims)}")
    shape = tuple(int(d) for d in np.frombuffer(dims, dtype=">u4"))
    offset = 4 + 4 * ndim
    expected = math.prod(shape) * dtype.itemsize
    if raw_size is not None and raw_size - offset != expected:
        _size_mismatch(name, dtype, shape, expected, raw_size - offset)
    if raw_size is None and expected > max_bytes:
        raise DatasetError(f"{name}: the IDX header declares shape {shape} of "
                           f"{dtype.newbyteorder('=').name} ({expected:,} bytes), more than the "
                           f"{max_bytes:,} a compressed file may hold (read_idx's max_bytes)")
    try:
        array = np.empty(shape, dtype=dtype)
    except ValueError as exc:  # more dimensions than NumPy allows, or a size beyond its index range
        raise DatasetError(f"{name}: the IDX header declares a shape NumPy cannot hold: {ndim} "
                           f"dimensions {shape} ({exc})") from None
    view = memoryview(array.reshape(-1).view(np.uint8))
    filled = 0
    while filled < expected:
        count = stream.readinto(view[filled:filled + (1 << 20)])
        if not count:
            _size_mismatch(name, dtype, shape, expected, filled)
        filled += count
    if stream.read(1):
        raise DatasetError(f"{name}: trailing bytes after IDX data: shape {shape} of "
                           f"{dtype.newbyteorder('=').name} needs {expected} bytes after the "
                           "header, the file holds more")
    return array.astype(dtype.newbyteorder("="))  # a writable, native-endian copy


def _read_exactly(stream: BinaryIO, count: int) -> bytes:
    """Up to `count` bytes: fewer only at the end of the stream."""
    parts, got = [], 0
    while got < count:
        chunk = stream.read(count - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _parse_idx_magic(name: str, head: bytes) -> tuple[np.dtype, int]:
    if len(head) < 4:
        raise DatasetError(f"{name}: {len(head)} bytes is too short for an IDX header (needs 4)")
    zero0, zero1, type_code, ndim = head
    if zero0 != 0 or zero1 != 0:
        raise DatasetError(f"{name}: bad magic number 0x{head.hex()}: not an IDX file "
                           "(an IDX file starts with two zero bytes)")
    if type_code not in _IDX_DTYPES:
        known = ", ".join(f"0x{code:02X}" for code in _IDX_DTYPES)
        raise DatasetError(f"{name}: unknown IDX type code 0x{type_code:02X} (known: {known})")
    if ndim == 0:
        raise DatasetError(f"{name}: IDX header declares 0 dimensions")
    return _IDX_DTYPES[type_code], ndim


def _size_mismatch(name: str, dtype: np.dtype, shape: tuple[int, ...], expected: int,
                   actual: int) -> None:
    what = "truncated IDX data" if actual < expected else "trailing bytes after IDX data"
    raise DatasetError(f"{name}: {what}: shape {shape} of {dtype.newbyteorder('=').name} needs "
                       f"{expected} bytes after the header, the file holds {actual}")


# --------------------------------------------------------------------------- MNIST

_MNIST_PREFIX = {"test": "t10k", "train": "train"}


def _mnist_file(directory: str, split: str, kind: str) -> str | None:
    """Path of the compressed or raw MNIST file for (split, kind), or None if neither exists."""
    base = os.path.join(directory, f"{_MNIST_PREFIX[split]}-{kind}")
    for candidate in (base + ".gz", base):
        if os.path.isfile(candidate):
            return candidate
    return None


def load_mnist(directory: str | os.PathLike, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split from `directory`: images uint8 (N, 28, 28) and labels uint8 (N,).

    Reads `t10k-*` for split="test" and `train-*` for split="train", each `.gz` or raw.
    """
    if split not in _MNIST_PREFIX:
        raise ValueError(f"load_mnist: split must be one of {sorted(_MNIST_PREFIX)}, got {split!r}")
    directory = os.fspath(directory)
    paths = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        paths[kind] = _mnist_file(directory, split, kind)
        if paths[kind] is None:
            raise DatasetError(f"{directory}: no MNIST file {_MNIST_PREFIX[split]}-{kind}(.gz)")
    images = read_idx(paths["images-idx3-ubyte"])
    labels = read_idx(paths["labels-idx1-ubyte"])
    _check_mnist(paths["images-idx3-ubyte"], images, paths["labels-idx1-ubyte"], labels)
    return images, labels


def _check_mnist(images_path: str, images: np.ndarray, labels_path: str,
                 labels: np.ndarray) -> None:
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DatasetError(f"{images_path}: expected uint8 images of shape (N, 28, 28), "
                           f"got {images.dtype} {images.shape}")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected uint8 labels of shape (N,), "
                           f"got {labels.dtype} {labels.shape}")
    if len(images) != len(labels):
        raise DatasetError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                           f"{len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{labels_path}: label {int(labels.max())} is not a digit 0..9")


def find_mnist(explicit_dir: str | os.PathLike | None = None) -> str | None:
    """The directory holding the MNIST test split: `explicit_dir` where given (a DatasetError
    names it if the files are not there: data other than the one asked for is worse than an
    error); else the first of $GRAPHC_MNIST_DIR and `../shared/data/mnist` relative to the
    repository and to the working directory that holds it, or None if none does.
    """
    if explicit_dir is not None:
        directory = os.path.normpath(os.fspath(explicit_dir))
        if not _mnist_file(directory, "test", "images-idx3-ubyte"):
            raise DatasetError(f"no MNIST test images ({_MNIST_PREFIX['test']}-images-idx3-ubyte"
                               f"[.gz]) in {directory}")
        return directory
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [
        os.environ.get("GRAPHC_MNIST_DIR"),
        os.path.join(repo_root, os.pardir, "shared", "data", "mnist"),
        os.path.join(os.getcwd(), os.pardir, "shared", "data", "mnist"),
    ]
    for candidate in candidates:
        if not candidate:
            continue
        # lexically, so that `..` is taken from the path as written (as a shell user reads it)
        directory = os.path.normpath(os.fspath(candidate))
        if _mnist_file(directory, "test", "images-idx3-ubyte"):
            return directory
    return None


def mnist_arrays(directory: str | os.PathLike, normalize: bool = True,
                 split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """MNIST ready for a CNN: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,).

    With `normalize`, images become (x / 255 - 0.1307) / 0.3081, the usual MNIST statistics.
    """
    images, labels = load_mnist(directory, split)
    x = to_float()(images)[:, None]
    if normalize:
        x = Normalize(MNIST_MEAN, MNIST_STD)(x)
    return x, labels.astype(np.int64)


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (offline): images float32 (N, 8, 8) in [0, 1], labels
    int64 (N,). The fallback dataset where MNIST is not available."""
    from sklearn.datasets import load_digits as sklearn_digits  # optional dependency

    digits = sklearn_digits()
    images = (digits.images / 16.0).astype(np.float32)  # pixel intensities are 0..16
    return images, digits.target.astype(np.int64)


def mnist_or_digits(directory: str | os.PathLike | None = None, digits: bool = False
                    ) -> tuple[str, tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """A digit-classification split for examples and benchmarks: MNIST's training and evaluation
    images (MNIST_TRAIN, MNIST_EVAL) when `find_mnist(directory)` finds the files (a `directory`
    without them is an error), else (or with `digits`) scikit-learn's 8x8 digits, standardised and split 80/20. Returns (a
    description of the data, (x, y) to train on, (x, y) to evaluate on): images float32
    (N, 1, H, W), labels int64."""
    found = None if digits else find_mnist(directory)
    if found:
        x, y = mnist_arrays(found)
        return f"MNIST ({found})", (x[MNIST_TRAIN], y[MNIST_TRAIN]), (x[MNIST_EVAL], y[MNIST_EVAL])
    images, labels = load_digits()
    x = ((images - images.mean()) / images.std())[:, None].astype(np.float32)
    split = int(len(x) * 0.8)
    return "scikit-learn digits (8x8)", (x[:split], labels[:split]), (x[split:], labels[split:])


# --------------------------------------------------------------------------- datasets

@runtime_checkable
class Dataset(Protocol):
    """Anything with a length whose items are tuples of arrays (e.g. (image, label)); an item
    that is one array batches as a 1-tuple."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Batch: ...


class TensorDataset:
    """Parallel arrays indexed together along their first axis."""

    def __init__(self, *arrays: np.ndarray) -> None:
        if not arrays:
            raise ValueError("TensorDataset needs at least one array")
        self.arrays = tuple(np.asarray(a) for a in arrays)
        lengths = [len(a) if a.ndim else None for a in self.arrays]
        if None in lengths or len(set(lengths)) != 1:
            shapes = ", ".join(str(a.shape) for a in self.arrays)
            raise ValueError(f"TensorDataset arrays must share their first dimension, "
                             f"got shapes {shapes}")

    def __len__(self) -> int:
        return len(self.arrays[0])

    def __getitem__(self, index: int) -> Batch:
        return tuple(a[index] for a in self.arrays)

    def take(self, indices: np.ndarray) -> Batch:
        """A whole batch at once: each array gathered with `indices`."""
        return tuple(a[indices] for a in self.arrays)


class Subset:
    """The items of `dataset` at `indices`, in that order; or, as NumPy reads a boolean mask of
    the dataset's length, the items where it is True."""

    def __init__(self, dataset: Dataset, indices: Sequence[int] | Sequence[bool] | np.ndarray) -> None:
        self.dataset = dataset
        n = len(dataset)
        indices = np.asarray(indices)
        if indices.dtype == np.bool_:
            if indices.shape != (n,):
                raise IndexError(f"Subset: a boolean mask must have the dataset's length {n}, got "
                                 f"shape {indices.shape}")
            indices = np.flatnonzero(indices)
        elif indices.size and not np.issubdtype(indices.dtype, np.integer):
            raise TypeError(f"Subset: indices must be integers or a boolean mask, got {indices.dtype}")
        if indices.dtype.kind == "u" and indices.size and indices.max() >= n:  # before it wraps to int64
            raise IndexError(f"Subset indices out of range for a dataset of length {n}")
        self.indices = indices.astype(np.int64).reshape(-1)
        if self.indices.size and (self.indices.min() < -n or self.indices.max() >= n):
            raise IndexError(f"Subset indices out of range for a dataset of length {n}")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Batch:
        return self.dataset[int(self.indices[index])]

    def take(self, indices: np.ndarray) -> Batch:
        return _gather(self.dataset, self.indices[indices])


def _gather(dataset: Dataset, indices: np.ndarray) -> Batch:
    """Batch `indices` of `dataset`: vectorised when it can `take`, else stacked per item."""
    if hasattr(dataset, "take"):
        return dataset.take(indices)
    items = [_as_tuple(dataset[int(i)], int(i)) for i in indices]
    if len({len(item) for item in items}) > 1:
        raise DatasetError(f"DataLoader: the items of a batch hold different numbers of arrays "
                           f"({sorted({len(item) for item in items})}); every item must be alike")
    columns = []
    for position, column in enumerate(zip(*items)):
        shapes = {np.shape(a) for a in column}
        if len(shapes) > 1:
            first = np.shape(column[0])
            other = next(i for i, a in enumerate(column) if np.shape(a) != first)
            raise DatasetError(
                f"DataLoader: position {position} of the items of a batch differs in shape: "
                f"{first} in item {int(indices[0])}, {np.shape(column[other])} in item "
                f"{int(indices[other])}; batches stack items of one shape (pad or crop them)")
        columns.append(np.stack(column))
    return tuple(columns)


def _as_tuple(item: Any, index: int) -> tuple:
    """A dataset item as the tuple of arrays batches are stacked from: an array (or number)
    alone is a 1-tuple, as the batch of an autoencoder's dataset is (its inputs,)."""
    if isinstance(item, (tuple, list)):
        return tuple(item)
    if isinstance(item, (np.ndarray, np.generic, int, float, bool)):
        return (item,)
    raise DatasetError(f"DataLoader: item {index} of the dataset is a {type(item).__name__}; "
                       f"items must be tuples of arrays (inputs..., target), which batches "
                       f"stack position by position: return a tuple, e.g. (item['x'], item['y'])")


# --------------------------------------------------------------------------- loading

def _is_integer(value: object) -> bool:
    """An int or NumPy integer, but not a bool (True would be a batch of 1)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


class DataLoader:
    """Iterate over a dataset in batches: tuples of stacked NumPy arrays.

    With `shuffle`, each epoch visits the items in a fresh permutation drawn from
    (seed, epoch), so a seeded loader is reproducible yet differs from one epoch to the next;
    `set_epoch` rewinds or skips that counter (e.g. to resume). Without a seed the loader draws
    one from the OS once. `transform` is applied to each batch of inputs (the first array) and
    `target_transform` to each batch of targets (the second), vectorised over the batch.
    """

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None,
                 transform: Transform | None = None,
                 target_transform: Transform | None = None) -> None:
        if not _is_integer(batch_size) or batch_size < 1:
            raise ValueError(f"DataLoader: batch_size must be a positive integer, "
                             f"got {batch_size!r}")
        if seed is not None and not (_is_integer(seed) and seed >= 0):
            raise ValueError(f"DataLoader: seed must be None or a non-negative integer (NumPy's "
                             f"generators take no other), got {seed!r}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = np.random.SeedSequence().entropy if seed is None else int(seed)
        self.transform = transform
        self.target_transform = target_transform
        self.epoch = 0

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration use the permutation of `epoch`."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise DatasetError(f"DataLoader.set_epoch: the epoch is an int >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Batch]:
        order = self._order()
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start:start + self.batch_size]
            yield self._apply_transforms(_gather(self.dataset, indices))

    def _order(self) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, self.epoch]).permutation(n)

    def _apply_transforms(self, batch: Batch) -> Batch:
        parts = list(batch)
        for position, transform in ((0, self.transform), (1, self.target_transform)):
            if transform is not None:
                if position >= len(parts):
                    raise ValueError("DataLoader: target_transform given but the dataset's "
                                     "items have no second array")
                parts[position] = transform(parts[position])
        return tuple(parts)


# --------------------------------------------------------------------------- transforms

class Normalize:
    """(x - mean) / std over a batch (N, C, ...): scalars, or one value per channel (axis 1)."""

    def __init__(self, mean: float | Sequence[float], std: float | Sequence[float]) -> None:
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if self.mean.ndim > 1 or self.std.ndim > 1:
            raise ValueError("Normalize: mean and std must be scalars or 1-D per-channel values")
        if np.any(self.std == 0):
            raise ValueError(f"Normalize: std must be non-zero, got {self.std.tolist()}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"Normalize expects floating-point input, got {x.dtype}; "
                            "apply to_float() first")
        return ((x - self._per_channel(self.mean, x)) / self._per_channel(self.std, x)).astype(
            x.dtype, copy=False)

    @staticmethod
    def _per_channel(values: np.ndarray, x: np.ndarray) -> np.ndarray:
        if values.ndim == 0:
            return values.astype(x.dtype)
        if x.ndim < 2 or x.shape[1] != len(values):
            raise ValueError(f"Normalize: {len(values)} per-channel values do not match a batch "
                             f"of shape {x.shape} (channels on axis 1)")
        return values.astype(x.dtype).reshape((1, -1) + (1,) * (x.ndim - 2))


def to_float(scale: float = 1 / 255) -> Transform:
    """A transform casting to float32 and multiplying by `scale` (uint8 pixels to [0, 1])."""
    def cast(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float32) * np.float32(scale)

    return cast


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (..., num_classes) rows with a 1 at each label."""
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"one_hot expects integer labels, got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"one_hot: labels must lie in [0, {num_classes}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    return np.eye(num_classes, dtype=np.float32)[labels]


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            x = transform(x)
        return x
