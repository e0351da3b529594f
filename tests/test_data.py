"""graphc.data: IDX reading and its failure modes, MNIST, datasets, DataLoader, transforms."""
import gzip
import hashlib
import os
import struct

import numpy as np
import pytest

from graphc.data import (MNIST_EVAL, MNIST_TRAIN, Compose, DataLoader, Dataset, DatasetError,
                         Normalize, Subset, TensorDataset, find_mnist, load_digits, load_mnist,
                         mnist_arrays, mnist_or_digits, one_hot, read_idx, to_float)
from graphc.ir.errors import GraphcError

# Written here, independently of the reader: type code and big-endian dtype per the format.
IDX_TYPES = {np.uint8: (0x08, ">u1"), np.int8: (0x09, ">i1"), np.int16: (0x0B, ">i2"),
             np.int32: (0x0C, ">i4"), np.float32: (0x0D, ">f4"), np.float64: (0x0E, ">f8")}


def idx_bytes(array: np.ndarray) -> bytes:
    code, big_endian = IDX_TYPES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(big_endian).tobytes()


def write(path, blob: bytes, compress: bool = False) -> str:
    path.write_bytes(gzip.compress(blob) if compress else blob)
    return str(path)


def random_array(dtype, shape, seed=0):
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


# --------------------------------------------------------------------------- IDX round trips

@pytest.mark.parametrize("dtype", list(IDX_TYPES), ids=lambda t: t.__name__)
@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 4), (2, 0, 3)], ids=str)
def test_idx_round_trip(tmp_path, dtype, compress, shape):
    expected = random_array(dtype, shape)
    # a neutral name: compression must be recognised by content, not by extension
    path = write(tmp_path / "data.bin", idx_bytes(expected), compress)
    result = read_idx(path)
    assert result.dtype == np.dtype(dtype) and result.dtype.isnative
    assert result.shape == shape
    np.testing.assert_array_equal(result, expected)
    result[...] = 0  # writable, not a view on the file's bytes


def test_idx_is_big_endian(tmp_path):
    blob = bytes([0, 0, 0x0C, 1]) + (2).to_bytes(4, "big") + (1).to_bytes(4, "big") \
        + (256).to_bytes(4, "big")
    np.testing.assert_array_equal(read_idx(write(tmp_path / "x.idx", blob)), [1, 256])


def test_gzip_named_file_without_compression_reads(tmp_path):
    array = np.arange(6, dtype=np.uint8).reshape(2, 3)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "x.gz", idx_bytes(array))), array)


# --------------------------------------------------------------------------- IDX corruption

GOOD = idx_bytes(np.arange(24, dtype=np.int16).reshape(2, 3, 4))

CORRUPTIONS = {
    "empty": (b"", False, "too short"),
    "wrong magic": (b"\x08\x03" + GOOD[2:], False, "magic"),
    "unknown type": (GOOD[:2] + b"\x0A" + GOOD[3:], False, "type code 0x0A"),
    "zero dimensions": (GOOD[:3] + b"\x00", False, "0 dimensions"),
    "truncated header": (GOOD[:9], False, "truncated IDX header"),
    "truncated data": (GOOD[:-1], False, "truncated IDX data"),
    "trailing bytes": (GOOD + b"\x00\x00", False, "trailing bytes"),
    "truncated gzip": (gzip.compress(GOOD)[:-6], True, "corrupt gzip"),
    "gzip trailing garbage": (gzip.compress(GOOD) + b"garbage", True, "corrupt gzip"),
    "compressed truncated data": (gzip.compress(GOOD[:-2]), True, "truncated IDX data"),
}


def flip_crc(blob: bytes) -> bytes:
    # the gzip trailer is CRC32 then size; a wrong CRC means the stream was damaged
    return blob[:-8] + bytes([blob[-8] ^ 0xFF]) + blob[-7:]


CORRUPTIONS["gzip bad crc"] = (flip_crc(gzip.compress(GOOD)), True, "corrupt gzip")


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_idx_raises_dataset_error_naming_file(tmp_path, case):
    blob, already_compressed, fragment = CORRUPTIONS[case]
    path = write(tmp_path / "broken-file.idx", blob)
    with pytest.raises(DatasetError) as info:
        read_idx(path)
    message = str(info.value)
    assert path in message and fragment in message
    assert isinstance(info.value, GraphcError) and isinstance(info.value, ValueError)


def test_size_mismatch_message_gives_shape_and_bytes(tmp_path):
    path = write(tmp_path / "short.idx", GOOD[:-3])
    with pytest.raises(DatasetError, match=r"shape \(2, 3, 4\) of int16 needs 48 bytes.*holds 45"):
        read_idx(path)


# --------------------------------------------------------------------------- MNIST files

def write_fake_mnist(directory, n_images, n_labels, compress=True, prefix="t10k"):
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    images = random_array(np.uint8, (n_images, 28, 28))
    labels = (np.arange(n_labels) % 10).astype(np.uint8)
    write(directory / f"{prefix}-images-idx3-ubyte{suffix}", idx_bytes(images), compress)
    write(directory / f"{prefix}-labels-idx1-ubyte{suffix}", idx_bytes(labels), compress)
    return images, labels


@pytest.mark.parametrize("compress", [False, True], ids=["raw", "gzip"])
def test_load_mnist_from_written_files(tmp_path, compress):
    images, labels = write_fake_mnist(tmp_path / "m", 12, 12, compress)
    got_images, got_labels = load_mnist(tmp_path / "m")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_load_mnist_train_split_uses_train_files(tmp_path):
    images, _ = write_fake_mnist(tmp_path / "m", 4, 4, prefix="train")
    np.testing.assert_array_equal(load_mnist(tmp_path / "m", split="train")[0], images)
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte"):
        load_mnist(tmp_path / "m", split="test")
    with pytest.raises(ValueError, match="split"):
        load_mnist(tmp_path / "m", split="validation")


def test_load_mnist_rejects_count_mismatch(tmp_path):
    write_fake_mnist(tmp_path / "m", 5, 6)
    with pytest.raises(DatasetError, match="5 images but .* 6 labels"):
        load_mnist(tmp_path / "m")


def test_load_mnist_rejects_wrong_image_shape(tmp_path):
    write_fake_mnist(tmp_path / "m", 2, 2)
    write(tmp_path / "m" / "t10k-images-idx3-ubyte.gz", idx_bytes(np.zeros((2, 28), np.uint8)),
          compress=True)
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte.gz.*\(N, 28, 28\)"):
        load_mnist(tmp_path / "m")


def test_find_mnist_search_order(tmp_path, monkeypatch):
    write_fake_mnist(tmp_path / "explicit", 1, 1)
    write_fake_mnist(tmp_path / "from_env", 1, 1, compress=False)
    monkeypatch.setenv("GRAPHC_MNIST_DIR", str(tmp_path / "from_env"))
    assert find_mnist(tmp_path / "explicit") == str(tmp_path / "explicit")
    # a directory asked for is never swapped for another one
    with pytest.raises(DatasetError, match=r"no MNIST test images .*missing"):
        find_mnist(tmp_path / "missing")
    assert find_mnist() == str(tmp_path / "from_env")


@pytest.fixture
def isolated_find_mnist(tmp_path, monkeypatch):
    """find_mnist as if graphc lived in tmp_path/repo, with no $GRAPHC_MNIST_DIR."""
    import graphc.data as data
    monkeypatch.setattr(data, "__file__", str(tmp_path / "repo" / "graphc" / "data.py"))
    monkeypatch.delenv("GRAPHC_MNIST_DIR", raising=False)
    return tmp_path


def test_find_mnist_relative_to_repository(isolated_find_mnist, monkeypatch):
    root = isolated_find_mnist
    write_fake_mnist(root / "shared" / "data" / "mnist", 1, 1)
    monkeypatch.chdir(root)
    assert find_mnist() == str(root / "shared" / "data" / "mnist")


def test_find_mnist_relative_to_working_directory(isolated_find_mnist, monkeypatch):
    root = isolated_find_mnist
    write_fake_mnist(root / "elsewhere" / "shared" / "data" / "mnist", 1, 1)
    os.makedirs(root / "elsewhere" / "project")
    monkeypatch.chdir(root / "elsewhere" / "project")
    assert find_mnist() == str(root / "elsewhere" / "shared" / "data" / "mnist")


def test_find_mnist_returns_none_when_absent(isolated_find_mnist, monkeypatch):
    monkeypatch.chdir(isolated_find_mnist)
    assert find_mnist() is None


# MNIST test-set label counts, digits 0..9 (a property of the published file)
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist_dir():
    directory = find_mnist()
    if directory is None:
        pytest.skip("the MNIST test split is not available on this machine")
    return directory


def test_real_mnist_files_match_their_checksums(mnist_dir):
    with open(os.path.join(mnist_dir, "MD5SUMS")) as f:
        sums = dict(reversed(line.split()) for line in f if line.strip())
    for name, md5 in sums.items():
        with open(os.path.join(mnist_dir, name), "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, name


def test_real_mnist_loads(mnist_dir):
    images, labels = load_mnist(mnist_dir)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
    assert labels[:3].tolist() == [7, 2, 1]
    assert images.min() == 0 and images.max() == 255
    assert 0.12 < images.mean() / 255 < 0.14  # MNIST's mean intensity is about 0.13
    assert len(labels[MNIST_TRAIN]) == 8000 and len(labels[MNIST_EVAL]) == 2000


def test_real_mnist_arrays(mnist_dir):
    raw, raw_labels = load_mnist(mnist_dir)
    x, y = mnist_arrays(mnist_dir)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, raw_labels)
    np.testing.assert_allclose(x[:50, 0], (raw[:50] / 255 - 0.1307) / 0.3081, rtol=1e-5, atol=1e-6)
    plain, _ = mnist_arrays(mnist_dir, normalize=False)
    assert plain.min() == 0.0 and plain.max() == 1.0


def test_load_digits_fallback():
    pytest.importorskip("sklearn")
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and images.dtype == np.float32
    assert labels.shape == (1797,) and labels.dtype == np.int64
    assert images.min() == 0.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_mnist_or_digits_falls_back_to_standardised_digits():
    pytest.importorskip("sklearn")
    name, (x, y), (xe, ye) = mnist_or_digits(digits=True)
    assert name.startswith("scikit-learn digits")
    assert x.shape == (1437, 1, 8, 8) and xe.shape == (360, 1, 8, 8) and x.dtype == np.float32
    assert y.dtype == ye.dtype == np.int64 and len(y) == 1437 and len(ye) == 360
    together = np.concatenate([x, xe])
    assert abs(together.mean()) < 1e-5 and abs(together.std() - 1) < 1e-4


def test_mnist_or_digits_uses_the_mnist_split_when_found(mnist_dir):
    name, (x, y), (xe, ye) = mnist_or_digits(mnist_dir)
    assert name.startswith("MNIST")
    everything, labels = mnist_arrays(mnist_dir)
    np.testing.assert_array_equal(x, everything[MNIST_TRAIN])
    np.testing.assert_array_equal(ye, labels[MNIST_EVAL])


# --------------------------------------------------------------------------- datasets

def test_tensor_dataset_items_and_validation():
    x, y = np.arange(12).reshape(6, 2), np.arange(6) * 10
    ds = TensorDataset(x, y)
    assert len(ds) == 6 and isinstance(ds, Dataset)
    item = ds[4]
    np.testing.assert_array_equal(item[0], [8, 9])
    assert item[1] == 40
    with pytest.raises(ValueError, match=r"\(6, 2\), \(5,\)"):
        TensorDataset(x, y[:5])
    with pytest.raises(ValueError):
        TensorDataset()


def test_subset_maps_indices():
    ds = TensorDataset(np.arange(10) * 2)
    sub = Subset(ds, [7, 1, 3])
    assert len(sub) == 3 and sub[0][0] == 14
    np.testing.assert_array_equal(sub.take(np.array([2, 0]))[0], [6, 14])
    with pytest.raises(IndexError):
        Subset(ds, [10])


class ListDataset:
    """A dataset without `take`: the loader must stack its items one by one."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.full((2,), i, dtype=np.float32), np.int64(i)


def collect(loader):
    return [tuple(np.copy(a) for a in batch) for batch in loader]


@pytest.mark.parametrize("n,batch_size,drop_last,expected_sizes", [
    (10, 3, False, [3, 3, 3, 1]), (10, 3, True, [3, 3, 3]), (9, 3, False, [3, 3, 3]),
    (2, 5, False, [2]), (2, 5, True, []), (0, 4, False, []),
])
def test_loader_batch_sizes(n, batch_size, drop_last, expected_sizes):
    loader = DataLoader(TensorDataset(np.arange(n)), batch_size, drop_last=drop_last)
    batches = collect(loader)
    assert len(loader) == len(expected_sizes)
    assert [len(b[0]) for b in batches] == expected_sizes
    if not drop_last:
        np.testing.assert_array_equal(np.concatenate([b[0] for b in batches] or [[]]),
                                      np.arange(n))


def test_loader_stacks_tuples():
    x = np.random.default_rng(1).standard_normal((7, 3, 2)).astype(np.float32)
    y = np.arange(7)
    (bx, by), *_ = collect(DataLoader(TensorDataset(x, y), 4))
    assert bx.shape == (4, 3, 2) and bx.dtype == np.float32 and by.shape == (4,)
    np.testing.assert_array_equal(bx, x[:4])


def test_loader_over_per_item_dataset_and_subset():
    batches = collect(DataLoader(ListDataset(5), 2))
    assert [b[0].shape for b in batches] == [(2, 2), (2, 2), (1, 2)]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), np.arange(5))
    sub_batches = collect(DataLoader(Subset(ListDataset(10), [9, 4, 2]), 2))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in sub_batches]), [9, 4, 2])


def test_shuffle_is_a_permutation_reproducible_and_new_each_epoch():
    ds = TensorDataset(np.arange(100))
    loader = DataLoader(ds, 16, shuffle=True, seed=7)
    epoch0 = np.concatenate([b[0] for b in loader])
    epoch1 = np.concatenate([b[0] for b in loader])
    for epoch in (epoch0, epoch1):
        np.testing.assert_array_equal(np.sort(epoch), np.arange(100))
    assert not np.array_equal(epoch0, np.arange(100))
    assert not np.array_equal(epoch0, epoch1)

    again = DataLoader(ds, 16, shuffle=True, seed=7)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in again]), epoch0)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in again]), epoch1)
    again.set_epoch(0)
    np.testing.assert_array_equal(np.concatenate([b[0] for b in again]), epoch0)

    other_seed = DataLoader(ds, 16, shuffle=True, seed=8)
    assert not np.array_equal(np.concatenate([b[0] for b in other_seed]), epoch0)


def test_shuffle_keeps_arrays_aligned_and_drop_last():
    x = np.arange(50)
    loader = DataLoader(TensorDataset(x, x * 3), 8, shuffle=True, drop_last=True, seed=0)
    batches = collect(loader)
    assert len(batches) == len(loader) == 6
    for bx, by in batches:
        np.testing.assert_array_equal(by, bx * 3)


def test_unseeded_shuffle_differs_between_loaders():
    ds = TensorDataset(np.arange(200))
    first = np.concatenate([b[0] for b in DataLoader(ds, 50, shuffle=True)])
    second = np.concatenate([b[0] for b in DataLoader(ds, 50, shuffle=True)])
    assert not np.array_equal(first, second)


def test_loader_transforms():
    images = np.full((4, 1, 2, 2), 255, dtype=np.uint8)
    labels = np.array([0, 2, 1, 2])
    loader = DataLoader(TensorDataset(images, labels), 4,
                        transform=Compose([to_float(), Normalize(0.5, 0.25)]),
                        target_transform=lambda y: one_hot(y, 3))
    (x, y), = collect(loader)
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, 2.0)
    np.testing.assert_array_equal(y, np.eye(3, dtype=np.float32)[labels])


def test_loader_rejects_bad_batch_size_and_missing_target():
    with pytest.raises(ValueError, match="batch_size"):
        DataLoader(TensorDataset(np.arange(3)), 0)
    loader = DataLoader(TensorDataset(np.arange(3)), 2, target_transform=lambda y: y)
    with pytest.raises(ValueError, match="no second array"):
        next(iter(loader))


# --------------------------------------------------------------------------- transforms

def test_normalize_per_channel():
    x = np.random.default_rng(2).standard_normal((5, 3, 4, 4)).astype(np.float32)
    mean, std = [0.1, -0.2, 0.3], [1.0, 2.0, 0.5]
    out = Normalize(mean, std)(x)
    assert out.dtype == np.float32
    expected = (x - np.array(mean)[None, :, None, None]) / np.array(std)[None, :, None, None]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="per-channel"):
        Normalize([0.0, 0.0], [1.0, 1.0])(x)
    with pytest.raises(TypeError, match="to_float"):
        Normalize(0.0, 1.0)(np.zeros(3, dtype=np.uint8))
    with pytest.raises(ValueError, match="non-zero"):
        Normalize(0.0, 0.0)


def test_to_float_and_one_hot():
    np.testing.assert_allclose(to_float()(np.array([0, 51, 255], np.uint8)), [0, 0.2, 1.0])
    assert to_float(0.5)(np.array([4])).tolist() == [2.0]
    np.testing.assert_array_equal(one_hot(np.array([[1], [0]]), 2), [[[0, 1]], [[1, 0]]])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        one_hot(np.array([3]), 3)
    with pytest.raises(TypeError):
        one_hot(np.array([0.5]), 3)


class _Items:
    """A dataset without `take`, whose items are whatever `make(i)` returns."""

    def __init__(self, make, n=4):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


def test_an_item_that_is_one_array_batches_as_a_one_tuple():
    """It was split column by column into several (batch,) arrays."""
    (batch,) = next(iter(DataLoader(_Items(lambda i: np.full(3, float(i), np.float32)), 2)))
    np.testing.assert_array_equal(batch, [[0, 0, 0], [1, 1, 1]])


@pytest.mark.parametrize("make, message", [
    (lambda i: {"x": np.full(2, i), "y": i}, r"item 0 of the dataset is a dict; items must be tuples"),
    (lambda i: (np.zeros(2),) * (1 + i % 2), r"the items of a batch hold different numbers of arrays"),
])
def test_items_batches_cannot_be_stacked_from_are_refused(make, message):
    """A dict item batched its key names."""
    with pytest.raises(DatasetError, match=message):
        next(iter(DataLoader(_Items(make), 2)))
