"""Retention: fold a run's old steps into its start state, so a long run keeps only its recent deltas on disk.

``S_0 += sum(folded deltas)``: ``S_T = S_0 + sum(kept deltas) (+ residual)`` still holds, ``verify`` still
passes and every kept step can still be undone, but a folded step cannot: its delta is gone from the disk. The
folded steps' metadata is kept (``folded.log``, :func:`deltastore.folded_metadata`) so that the layer above knows
what can no longer be undone (amnesiac refuses to forget a sample trained on in a folded step, naming it).
The rewrite is the crash-safe one of :mod:`deltastore.rewrite`; the kept steps are renumbered from 0.

Example:
    >>> import tempfile, torch
    >>> from deltastore import DeltaStore
    >>> path = tempfile.mkdtemp() + "/s"
    >>> with DeltaStore.create(path, {"w": torch.zeros(2)}, durable=False) as store:
    ...     for t in range(6):
    ...         _ = store.append_delta(torch.ones(2), {"ids": torch.tensor([t]), "epoch": torch.tensor([t // 2])})
    ...     store.finalize({"w": torch.full((2,), 6.0)})
    >>> report = gc(path, keep_last_epochs=1)
    >>> report["steps_folded"], report["steps_after"], DeltaStore.open(path).read_snapshot("start")["w"].tolist()
    (4, 2, [4.0, 4.0])
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .backends import directory_bytes
from .errors import InvalidArgumentError
from .rewrite import RunRewrite


def epoch_starts(store) -> np.ndarray:
    """The first step of each epoch, where an epoch is a run of consecutive steps with the same ``epoch`` value
    (so a fine-tune recorded after the training, which counts its epochs from 0 again, is epochs of its own)."""
    epoch = store.metadata().get("epoch")
    if epoch is None or store.num_steps == 0:
        if store.num_steps == 0:
            return np.zeros(0, np.int64)
        raise InvalidArgumentError(f"{store.path} records no epoch per step; use --before-step S instead")
    if not np.all(np.diff(epoch.offsets) == 1):
        raise InvalidArgumentError(f"{store.path}: the step metadata 'epoch' is not one value per step; use "
                                   "--before-step S instead")
    values = epoch.values
    return np.concatenate([[0], np.flatnonzero(values[1:] != values[:-1]) + 1]).astype(np.int64)


def gc(path: str | Path, *, keep_last_epochs: int | None = None, before_step: int | None = None) -> dict:
    """Fold every step before ``before_step`` (or before the last ``keep_last_epochs`` epochs) into the start state.

    Takes the writer lock (a live writer makes it fail with :class:`StoreLockedError`). Also removes what an
    interrupted rewrite left behind. Returns the steps folded and the bytes freed.
    """
    if (keep_last_epochs is None) == (before_step is None):
        raise InvalidArgumentError("give exactly one of --keep-last-epochs N or --before-step S")
    t0 = time.perf_counter()
    with RunRewrite(path) as rw:
        store = rw.store
        n = store.num_steps
        if before_step is not None:
            if type(before_step) is not int or not 0 <= before_step <= n:
                raise InvalidArgumentError(f"--before-step must be from 0 to {n} (the run's steps), not "
                                           f"{before_step!r}")
            cut = before_step
        else:
            if type(keep_last_epochs) is not int or keep_last_epochs < 1:
                raise InvalidArgumentError(f"--keep-last-epochs must be a positive integer, not {keep_last_epochs!r}")
            starts = epoch_starts(store)
            cut = int(starts[-keep_last_epochs]) if len(starts) > keep_last_epochs else 0
        before = directory_bytes(rw.path)
        if cut:
            result = rw.commit(fold=range(cut))
            freed, generation = result.bytes_freed, result.plan.generation
        else:
            freed, generation = rw.clean(), store.commit_record.get("generation", 0)
        after = directory_bytes(rw.path)
    return {"path": str(path), "steps_before": n, "steps_folded": cut, "steps_after": n - cut,
            "bytes_freed": freed, "bytes_on_disk_before": before, "bytes_on_disk": after, "generation": generation,
            "seconds": time.perf_counter() - t0}
