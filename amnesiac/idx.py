"""Reading IDX files (the MNIST family's format: big-endian header, then raw unsigned bytes), plain or gzipped,
without pickle or torchvision; and the Fashion-MNIST data set from Debian's ``dataset-fashion-mnist`` package.

Fashion-MNIST (Xiao et al., 2017; MIT licence): 60,000 training and 10,000 test 28x28 grey images of 10 clothing
classes. ``apt-get install dataset-fashion-mnist`` puts the four IDX files under ``/usr/share/datasets/fashion-mnist``;
:func:`find_fashion_mnist` looks there, or in a folder given with ``--data-dir``.

Example:
    >>> import gzip, io, struct
    >>> raw = struct.pack(">BBBBIII", 0, 0, 8, 3, 2, 2, 3) + bytes(range(12))
    >>> read_idx(io.BytesIO(gzip.compress(raw))).shape
    (2, 2, 3)
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
                       "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(source: str | Path | BinaryIO) -> np.ndarray:
    """The array an IDX file holds (``.gz`` or not: recognised by the gzip magic bytes)."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            return read_idx(f)
    head = source.read(2)
    source.seek(0)
    stream = gzip.GzipFile(fileobj=source) if head == b"\x1f\x8b" else source
    data = stream.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DataError("not an IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[data[2]])
    body = data[4 + 4 * ndim:]
    if len(body) != int(np.prod(dims)) * dtype.itemsize:
        raise DataError(f"IDX file truncated or padded: header says {dims}, body has {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(dims).copy()  # writable, so torch may share it


def find_fashion_mnist(data_dir: str | Path | None = None) -> dict[str, Path]:
    """The four Fashion-MNIST IDX files (plain or ``.gz``) in ``data_dir`` (or its ``fashion-mnist`` /
    ``FashionMNIST/raw`` subfolder) or, without it, in Debian's package folder; a :class:`DataError` naming the
    remedy when they are missing."""
    bases = [Path(data_dir)] if data_dir else [FASHION_MNIST_DIR]
    candidates = [d for b in bases for d in (b, b / "fashion-mnist", b / "FashionMNIST" / "raw")]
    for folder in candidates:
        found = {}
        for key, stem in FASHION_MNIST_FILES.items():
            for name in (stem + ".gz", stem):
                if (folder / name).is_file():
                    found[key] = folder / name
                    break
        if len(found) == 4:
            return found
    where = data_dir or FASHION_MNIST_DIR
    raise DataError(f"Fashion-MNIST's IDX files are not in {where}; run `apt-get install dataset-fashion-mnist` "
                    "(Debian/Ubuntu) or pass --data-dir pointing at a folder with train-images-idx3-ubyte(.gz) etc.")


def load_fashion_mnist(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, test images, test labels) as uint8 arrays."""
    files = find_fashion_mnist(data_dir)
    out = [read_idx(files[k]) for k in ("train_images", "train_labels", "test_images", "test_labels")]
    if out[0].shape[0] != out[1].shape[0] or out[2].shape[0] != out[3].shape[0]:
        raise DataError("Fashion-MNIST: the image and label files disagree on the number of samples")
    return out[0], out[1], out[2], out[3]


__all__ = ["FASHION_MNIST_DIR", "find_fashion_mnist", "load_fashion_mnist", "read_idx"]
