"""Training, fine-tuning and accuracy evaluation loops used by the command line, the demo and the benchmarks.

Example:
    >>> import torch
    >>> from amnesiac.data import load_dataset
    >>> from amnesiac.models import mlp
    >>> bundle = load_dataset("digits")
    >>> torch.manual_seed(0); model = mlp(bundle.input_shape, 10)  # doctest: +ELLIPSIS
    <...>
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> seconds = train(model, opt, bundle.train, epochs=3, batch_size=64, seed=0)
    >>> accuracy(model, bundle.test)["overall"] > 0.8
    True
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from torch.utils.data import DataLoader, default_collate

from .data import IndexedDataset
from .progress import TrainingProgress


def make_optimizer(model: torch.nn.Module, name: str = "adam", lr: float = 1e-3) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    raise ValueError(f"unknown optimizer {name!r}; choose adam or sgd")


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: IndexedDataset, *, epochs: int,
          batch_size: int = 64, seed: int = 0, recorder=None, progress: bool = False,
          relabel: dict | None = None, start_step: int = 0,
          after_step: Callable[[int, int, bool], bool] | None = None) -> float:
    """Train for ``epochs`` shuffled epochs; with a ``recorder``, declare each batch's ids and labels first.

    ``relabel`` maps sample ids to the label to train on instead of the true one (the paper's "Unlearning"
    baseline trains on the forget set with random wrong labels). ``start_step`` skips the first steps of the
    schedule, data order included, so that an interrupted training continues exactly where it stopped (the
    shuffles of the skipped epochs are replayed, without loading any data). ``after_step(steps_done, epoch,
    end_of_epoch)`` is called after every step; returning True stops the training there. ``progress`` shows
    epoch, loss and steps per second on stderr and leaves a summary line. Returns the wall time in seconds.
    """
    # the batches' indices come from a loader over positions: the same shuffles, drawn from the same generator, as a
    # DataLoader over the data itself, so skipped epochs can be replayed without touching the data
    order = DataLoader(range(len(data)), batch_size=batch_size, shuffle=True,
                       generator=torch.Generator().manual_seed(seed))
    loss_fn = torch.nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    start = time.perf_counter()
    first_epoch, skip = divmod(start_step, max(1, len(order)))
    meter = TrainingProgress(epochs, len(order), start_step) if progress else None
    relabel_ids = relabel_to = None
    if relabel:
        relabel_ids = torch.as_tensor(sorted(relabel), dtype=torch.long)
        relabel_to = torch.as_tensor([relabel[int(i)] for i in relabel_ids], dtype=torch.long)
    model.train()
    steps_done = start_step
    try:
        for _ in range(min(first_epoch, epochs)):  # replay the shuffles of the epochs already trained
            for _ in order:
                pass
        for epoch in range(first_epoch, epochs):
            if recorder is not None:
                recorder.epoch = epoch
            for i, index in enumerate(order):
                if i < skip:
                    continue
                x, y, ids = _batch(data, index)
                if recorder is not None:
                    recorder.add_batch(ids, labels=y)
                if relabel_ids is not None:
                    y = _relabelled(y, ids, relabel_ids, relabel_to)
                x, y = x.to(device), y.to(device)
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
                optimizer.step()
                steps_done += 1
                if meter is not None:
                    meter.step(epoch, loss.detach())
                last = i + 1 == len(order)
                if after_step is not None and after_step(steps_done, epoch, last):
                    return time.perf_counter() - start
            skip = 0
            if meter is not None:
                meter.end_epoch(epoch)
    finally:
        if meter is not None:
            meter.close(steps_done)
    return time.perf_counter() - start


def _batch(data, index: torch.Tensor):
    """The samples at ``index``: fancy indexing for an :class:`IndexedDataset` (the same tensors a DataLoader would
    collate), the default collation for any other data set."""
    if isinstance(data, IndexedDataset):
        return data.images[index], data.labels[index], data.ids[index]
    return default_collate([data[int(i)] for i in index])


def _relabelled(y: torch.Tensor, ids: torch.Tensor, relabel_ids: torch.Tensor, relabel_to: torch.Tensor):
    pos = torch.searchsorted(relabel_ids, ids).clamp_max(len(relabel_ids) - 1)
    hit = relabel_ids[pos] == ids
    return torch.where(hit, relabel_to[pos], y)


def train_steps_ascent(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: IndexedDataset, *,
                       epochs: int, batch_size: int = 64, seed: int = 0) -> float:
    """Gradient *ascent* on the cross-entropy of ``data`` (NegGrad); returns the wall time in seconds."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    loss_fn = torch.nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        for x, y, _ids in loader:
            optimizer.zero_grad(set_to_none=True)
            (-loss_fn(model(x.to(device)), y.to(device))).backward()
            optimizer.step()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: torch.nn.Module, data: IndexedDataset, batch_size: int = 512) -> torch.Tensor:
    """Logits for every sample, in order."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(data.images[i:i + batch_size].to(device)).cpu() for i in range(0, len(data), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(model: torch.nn.Module, data: IndexedDataset, forget_classes: Sequence[int] = ()) -> dict:
    """Accuracy overall, on ``forget_classes`` ("forgotten") and on the rest ("retained"); NaN where empty."""
    hit = (predict(model, data).argmax(1) == data.labels).float()
    forgotten = torch.isin(data.labels, torch.as_tensor(list(forget_classes), dtype=torch.long))

    def mean(mask):
        return hit[mask].mean().item() if mask.any() else float("nan")

    return {"overall": mean(torch.ones_like(forgotten)), "forgotten": mean(forgotten), "retained": mean(~forgotten)}


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each sample (no reduction)."""
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
