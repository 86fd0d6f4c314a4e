"""Data sets that yield ``(x, y, sample_id)``, so the Recorder can log which samples each step saw.

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 real images, no download), fixed-seed split.
- ``synthetic``: generated 10-class 8x8 images (class templates plus noise), any size, for tests and benchmarks.
- ``npz``: any ``.npz`` with ``images`` (N, H, W) or (N, C, H, W) and ``labels`` (N,), e.g. ``mnist10k.npz``, 10,000
  real MNIST digits; fixed-seed split.
- ``mnist`` and ``cifar100``: torchvision's loaders, from ``data_dir``; ``download=True`` fetches them.
- ``fashion-mnist``: the real Fashion-MNIST (60,000 + 10,000 images) from Debian's ``dataset-fashion-mnist`` package
  or ``data_dir`` (IDX files, read by :mod:`amnesiac.idx`); its own train/test split.

Where data files are found: a path or folder given as an option; a relative ``.npz`` path that does not exist in the
working directory is looked up in the folder named by the environment variable ``AMNESIAC_DATA``, which is also the
default ``data_dir`` of the torchvision loaders (else ``./data``). Nothing is looked up in the package's own folders.

Example:
    >>> bundle = load_dataset("digits")
    >>> x, y, sample_id = bundle.train[0]
    >>> tuple(x.shape), bundle.num_classes, len(bundle.train) + len(bundle.test)
    ((1, 8, 8), 10, 1797)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError

DATASETS = ("digits", "synthetic", "npz", "mnist", "cifar100", "fashion-mnist")
DATA_ENV = "AMNESIAC_DATA"  # a folder holding data files (mnist10k.npz, torchvision's copies)


def data_root(option: str | Path | None = None) -> Path | None:
    """The data folder: ``option`` if given, else ``$AMNESIAC_DATA``, else None."""
    value = option or os.environ.get(DATA_ENV)
    return Path(value).expanduser() if value else None


def resolve_data_path(path: str | Path, root: str | Path | None = None) -> Path:
    """``path`` itself when absolute or present in the working directory, else under the data folder
    (:func:`data_root` of ``root``) when it is there; otherwise ``path`` unchanged (the caller reports it missing).

    Example:
        >>> import os, tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp()); (folder / "x.npz").touch()
        >>> resolve_data_path("x.npz", folder) == folder / "x.npz", resolve_data_path("nowhere.npz", folder)
        (True, PosixPath('nowhere.npz'))
    """
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    root = data_root(root)
    if root is not None and (root / path).exists():
        return root / path
    return path


class IndexedDataset(Dataset):
    """In-memory images and labels with a stable integer id per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor):
        if not (len(images) == len(labels) == len(ids)):
            raise DataError("images, labels and ids must have the same length")
        self.images, self.labels, self.ids = images.float(), labels.long(), ids.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.images[i], self.labels[i], self.ids[i]

    def subset(self, mask: torch.Tensor | np.ndarray) -> IndexedDataset:
        mask = torch.as_tensor(mask)
        return IndexedDataset(self.images[mask], self.labels[mask], self.ids[mask])

    def without_classes(self, classes) -> IndexedDataset:
        return self.subset(~torch.isin(self.labels, torch.as_tensor(list(classes))))

    def only_classes(self, classes) -> IndexedDataset:
        return self.subset(torch.isin(self.labels, torch.as_tensor(list(classes))))

    def without_ids(self, ids) -> IndexedDataset:
        return self.subset(~torch.isin(self.ids, torch.as_tensor(np.asarray(ids, np.int64))))

    def only_ids(self, ids) -> IndexedDataset:
        return self.subset(torch.isin(self.ids, torch.as_tensor(np.asarray(ids, np.int64))))

    def sample(self, count: int, seed: int = 0) -> IndexedDataset:
        """A fixed-seed random subset of ``count`` samples (all of them if there are fewer), in original order."""
        if count >= len(self):
            return self
        keep = torch.zeros(len(self), dtype=torch.bool)
        keep[torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count]] = True
        return self.subset(keep)

    def keep_few_of_class(self, target: int, count: int, seed: int = 0) -> IndexedDataset:
        """Keep only ``count`` samples of class ``target`` (chosen with ``seed``): the paper's setting, where
        few batches hold the class to forget."""
        members = torch.nonzero(self.labels == target).flatten()
        g = torch.Generator().manual_seed(seed)
        keep = members[torch.randperm(len(members), generator=g)[:count]]
        mask = self.labels != target
        mask[keep] = True
        return self.subset(mask)


@dataclass
class DataBundle:
    name: str
    train: IndexedDataset
    test: IndexedDataset
    num_classes: int
    spec: dict = field(default_factory=dict)  # how to load it again (stored in the run)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.images.shape[1:])


def _split(images: torch.Tensor, labels: torch.Tensor, test_fraction: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    ids = torch.arange(len(labels))
    return (IndexedDataset(images[train], labels[train], ids[train]),
            IndexedDataset(images[test], labels[test], ids[test]))


def _normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - images.mean()) / images.std().clamp_min(1e-8)


def load_dataset(name: str, *, data_dir: str | Path | None = None, download: bool = False, seed: int = 0,
                 path: str | Path | None = None, size: int = 2000, test_fraction: float = 0.2) -> DataBundle:
    """Load a data set by name (see the module docstring). ``path`` is the ``.npz`` file for ``npz``."""
    spec = {"dataset": name, "seed": seed, "test_fraction": test_fraction}
    if name == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        images = _normalise(torch.tensor(d.images, dtype=torch.float32).unsqueeze(1))
        train, test = _split(images, torch.tensor(d.target), test_fraction, seed)
        return DataBundle(name, train, test, 10, spec)
    if name == "synthetic":
        g = torch.Generator().manual_seed(seed)
        templates = torch.randn(10, 1, 8, 8, generator=g)
        labels = torch.randint(0, 10, (size,), generator=g)
        images = templates[labels] + 0.8 * torch.randn(size, 1, 8, 8, generator=g)
        train, test = _split(images, labels, test_fraction, seed)
        return DataBundle(name, train, test, 10, {**spec, "size": size})
    if name == "npz":
        if path is None:
            raise DataError("the npz data set needs a path (--data-path FILE.npz)")
        path = resolve_data_path(path, data_dir)
        if not path.is_file():
            raise DataError(f"{path} does not exist; give an .npz file with arrays 'images' and 'labels' (a relative "
                            f"path is looked up in the working directory, then in ${DATA_ENV})")
        with np.load(path, allow_pickle=False) as f:  # never unpickle data files
            if "images" not in f or "labels" not in f:
                raise DataError(f"{path} must hold arrays 'images' and 'labels'; it has {sorted(f.files)}")
            images, labels = f["images"], f["labels"]
        images = torch.tensor(images, dtype=torch.float32)
        images = images.unsqueeze(1) if images.ndim == 3 else images
        labels = torch.tensor(labels).long()
        train, test = _split(_normalise(images), labels, test_fraction, seed)
        return DataBundle(name, train, test, int(labels.max()) + 1, {**spec, "path": str(path.resolve())})
    if name in ("mnist", "cifar100"):
        return _torchvision(name, data_dir, download, spec)
    if name == "fashion-mnist":
        return _fashion_mnist(data_dir, spec)
    raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")


def _torchvision(name: str, data_dir, download: bool, spec: dict) -> DataBundle:
    import torchvision
    root = data_root(data_dir) or Path("data")
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.CIFAR100
    try:
        parts = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as e:
        raise DataError(f"{name} is not in {root} ({e}); pass --download on a connected machine, or --data-dir "
                        "pointing at a copy") from None
    out, offset = [], 0
    for part in parts:
        images = torch.as_tensor(np.asarray(part.data), dtype=torch.float32)
        images = images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)
        labels = torch.as_tensor(np.asarray(part.targets)).long()
        ids = torch.arange(offset, offset + len(labels))
        offset += len(labels)
        out.append(IndexedDataset(_normalise(images / 255.0), labels, ids))
    return DataBundle(name, out[0], out[1], 10 if name == "mnist" else 100, {**spec, "data_dir": str(root)})


def _fashion_mnist(data_dir, spec: dict) -> DataBundle:
    from .idx import load_fashion_mnist
    xtr, ytr, xte, yte = load_fashion_mnist(data_dir)
    train = torch.as_tensor(xtr, dtype=torch.float32).unsqueeze(1) / 255.0
    test = torch.as_tensor(xte, dtype=torch.float32).unsqueeze(1) / 255.0
    mean, std = train.mean(), train.std().clamp_min(1e-8)  # the training set's statistics for both parts
    parts = (IndexedDataset((train - mean) / std, torch.as_tensor(ytr.astype(np.int64)), torch.arange(len(ytr))),
             IndexedDataset((test - mean) / std, torch.as_tensor(yte.astype(np.int64)),
                            torch.arange(len(ytr), len(ytr) + len(yte))))
    return DataBundle("fashion-mnist", parts[0], parts[1], 10,
                      {**spec, **({"data_dir": str(data_dir)} if data_dir else {})})


def bundle_from_spec(spec: dict, *, download: bool = False) -> DataBundle:
    """Reload the data set a run was trained on, from the spec stored in the run."""
    try:
        name = spec["dataset"]
    except (TypeError, KeyError):
        raise DataError("the run does not say which data set it was trained on; pass --dataset") from None
    bundle = load_dataset(name, data_dir=spec.get("data_dir"), download=download, seed=spec.get("seed", 0),
                          path=spec.get("path"), size=spec.get("size", 2000),
                          test_fraction=spec.get("test_fraction", 0.2))
    return apply_reductions(bundle, spec)


def apply_reductions(bundle: DataBundle, spec: dict) -> DataBundle:
    """Apply the reductions a spec records, in a fixed order: ``train_limit`` / ``test_limit`` (fixed-seed random
    subsets, for reduced runs of slow models), then ``keep_class`` / ``keep_count`` (the paper's few samples of the
    class to forget)."""
    seed = spec.get("seed", 0)
    if spec.get("train_limit"):
        bundle.train = bundle.train.sample(int(spec["train_limit"]), seed)
    if spec.get("test_limit"):
        bundle.test = bundle.test.sample(int(spec["test_limit"]), seed)
    if spec.get("keep_class") is not None:
        bundle.train = bundle.train.keep_few_of_class(spec["keep_class"], spec["keep_count"], seed)
    return bundle
