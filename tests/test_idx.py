"""IDX reading and the Fashion-MNIST data set (Debian's dataset-fashion-mnist package)."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from amnesiac.errors import DataError
from amnesiac.idx import FASHION_MNIST_DIR, find_fashion_mnist, read_idx


def _idx(arr: np.ndarray) -> bytes:
    return struct.pack(f">BBBB{arr.ndim}I", 0, 0, 8, arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()


def test_read_idx_plain_and_gzipped(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a").write_bytes(_idx(arr))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(arr)))
    assert np.array_equal(read_idx(tmp_path / "a"), arr) and np.array_equal(read_idx(tmp_path / "a.gz"), arr)
    (tmp_path / "bad").write_bytes(_idx(arr)[:-1])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "bad")
    (tmp_path / "junk").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="magic"):
        read_idx(tmp_path / "junk")


def test_fashion_mnist_from_a_data_dir(tmp_path):
    """A miniature copy in the package's layout loads through load_dataset and the CLI's --data-dir."""
    from amnesiac.data import load_dataset
    rng = np.random.default_rng(0)
    for stem, n in (("train", 30), ("t10k", 10)):
        (tmp_path / f"{stem}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(rng.integers(0, 255, (n, 28, 28)))))
        (tmp_path / f"{stem}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(np.arange(n) % 10)))
    b = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert (len(b.train), len(b.test), b.input_shape) == (30, 10, (1, 28, 28))
    assert b.test.ids.min() == 30 and abs(float(b.train.images.mean())) < 1e-4
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "nowhere")


@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_DIR} (apt-get install "
                           "dataset-fashion-mnist)")
def test_real_fashion_mnist():
    from amnesiac.data import load_dataset
    b = load_dataset("fashion-mnist")
    assert (len(b.train), len(b.test)) == (60000, 10000)
    assert b.train.labels.bincount().tolist() == [6000] * 10 and b.test.labels.bincount().tolist() == [1000] * 10
