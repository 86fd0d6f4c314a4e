"""A batch sampler that keeps the deletable samples together, so that forgetting them undoes few steps.

Amnesiac unlearning undoes every step whose batch held a forgotten sample. Under plain shuffling, 1% of deletable
samples at batch size 128 land in about 72% of all batches (1 - 0.99**128): forgetting all of them undoes most of the
training, and a selective recording (``Recorder(..., deletable=...)``) must store most steps.
:class:`IsolatingBatchSampler` packs the deletable samples into ``ceil(len(deletable) / batch_size)`` batches per epoch
instead, placed at random positions among the others, so that both the steps to store and the steps to undo shrink to
about 1% of the run.

Example:
    >>> import torch
    >>> sampler = IsolatingBatchSampler(10, deletable=[0, 1, 2], batch_size=4, seed=0)
    >>> len(sampler)
    3
    >>> batches = list(sampler)
    >>> sorted(i for b in batches for i in b)
    [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    >>> sum(1 for b in batches if set(b) & {0, 1, 2})    # the deletable ones share one batch
    1
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.arange(10)), batch_sampler=sampler)
    >>> sampler.set_epoch(1); sum(len(x) for (x,) in loader)
    10
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from .selection import int_array


class IsolatingBatchSampler(Sampler[list[int]]):
    """Yields batches of dataset indices (for ``DataLoader(batch_sampler=...)``) in which the deletable samples are
    concentrated in as few batches as possible.

    Each epoch every index in ``range(num_samples)`` appears exactly once (unless ``drop_last`` drops the final
    incomplete batch of non-deletable samples). The deletable indices are shuffled and cut into groups of
    ``per_batch`` (default ``batch_size``: fully packed, ``ceil(len(deletable) / batch_size)`` batches); a group
    smaller than ``batch_size`` is filled up with non-deletable samples so that batches keep one size (BatchNorm and
    the learning rate see the same batch size as under plain shuffling). The remaining non-deletable samples are
    shuffled into full batches, and the order of all batches is shuffled, so the deletable batches fall at random
    positions. The order depends on ``seed`` and the epoch set by :meth:`set_epoch` only: the same pair gives the
    same batches, a new epoch a new order.

    Args:
        num_samples: the size of the dataset.
        deletable: indices (list, array or tensor of integers in ``[0, num_samples)``) that may have to be forgotten.
        batch_size: indices per batch.
        seed: seed of the shuffles.
        drop_last: drop the final incomplete batch of non-deletable samples (a batch holding deletable samples is
            never dropped, so that every deletable sample is trained on and can be forgotten).
        per_batch: spread the deletable samples ``per_batch`` to a batch instead of packing them (1 <= per_batch <=
            batch_size): more batches hold deletable samples, each with fewer of them, which trades storage and
            steps undone for a smaller share of deletable data in any one step.

    Raises:
        ValueError: ``batch_size`` or ``per_batch`` out of range, or ``deletable`` holds an index out of range or
            twice.
    """

    def __init__(self, num_samples: int, deletable: Sequence[int] | np.ndarray | torch.Tensor, batch_size: int, *,
                 seed: int = 0, drop_last: bool = False, per_batch: int | None = None) -> None:
        if int(num_samples) < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        per_batch = int(batch_size) if per_batch is None else int(per_batch)
        if not 1 <= per_batch <= int(batch_size):
            raise ValueError(f"per_batch must be between 1 and batch_size={batch_size}, got {per_batch}")
        ids = int_array(deletable, "deletable indices")
        if ids.size and (ids.min() < 0 or ids.max() >= num_samples):
            bad = ids[(ids < 0) | (ids >= num_samples)][0]
            raise ValueError(f"deletable index {bad} is outside range(num_samples={num_samples})")
        if np.unique(ids).size != ids.size:
            raise ValueError("deletable indices must not repeat")
        self.num_samples, self.batch_size, self.per_batch = int(num_samples), int(batch_size), per_batch
        self.seed, self.drop_last, self.epoch = int(seed), bool(drop_last), 0
        self.deletable = np.sort(ids)
        is_deletable = np.zeros(self.num_samples, dtype=bool)
        is_deletable[self.deletable] = True
        self.regular = np.flatnonzero(~is_deletable)

    def set_epoch(self, epoch: int) -> None:
        """Use the order of ``epoch`` on the next iteration (call it at the start of each epoch)."""
        self.epoch = int(epoch)

    @property
    def deletable_batches(self) -> int:
        """How many batches per epoch hold deletable samples: ``ceil(len(deletable) / per_batch)``."""
        return math.ceil(self.deletable.size / self.per_batch)

    def _regular_left(self) -> int:
        """Non-deletable samples left after filling up the deletable batches."""
        groups = self.deletable_batches
        fill = groups * self.batch_size - self.deletable.size
        return max(0, self.regular.size - fill)

    def __len__(self) -> int:
        left = self._regular_left()
        full, rest = divmod(left, self.batch_size)
        return self.deletable_batches + full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        deletable = self.deletable[torch.randperm(self.deletable.size, generator=gen).numpy()]
        regular = self.regular[torch.randperm(self.regular.size, generator=gen).numpy()]
        batches: list[np.ndarray] = []
        used = 0
        for start in range(0, deletable.size, self.per_batch):
            group = deletable[start:start + self.per_batch]
            take = min(self.batch_size - group.size, regular.size - used)
            batches.append(np.concatenate([group, regular[used:used + take]]))
            used += take
        for start in range(used, regular.size, self.batch_size):
            batch = regular[start:start + self.batch_size]
            if batch.size == self.batch_size or not self.drop_last:
                batches.append(batch)
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i].tolist()
