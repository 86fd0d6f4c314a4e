"""Trainer integrations: callbacks that record a run while a trainer trains (optional extras).

- :mod:`amnesiac.integrations.lightning`: ``AmnesiacCallback`` for PyTorch Lightning (``pip install
  amnesiac[lightning]``).
- :mod:`amnesiac.integrations.hf`: ``AmnesiacCallback`` for the Hugging Face ``transformers.Trainer``
  (``pip install amnesiac[hf]``).

Both take the sample ids of a batch from a key (``"sample_id"`` by default; an index for tuple batches) or from a
function, and checkpoint and resume through the trainer's own checkpoints: what they add is the recording position
(:meth:`amnesiac.Recorder.position`), never a second copy of the model.

Example (the helper both callbacks use):
    >>> import torch
    >>> batch_values({"x": torch.zeros(2, 3), "sample_id": torch.tensor([7, 9])}, "sample_id", None).tolist()
    [7, 9]
    >>> batch_values((torch.zeros(2, 3), torch.tensor([1, 0]), [7, 9]), 2, None)
    [7, 9]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..errors import RecorderError


def batch_values(batch: Any, key: str | int | None, fn: Callable[[Any], Any] | None):
    """``fn(batch)`` if given, else ``batch[key]`` (a dict key, or an index into a tuple/list batch)."""
    if fn is not None:
        return fn(batch)
    try:
        if isinstance(batch, Mapping) or (isinstance(key, int) and isinstance(batch, (tuple, list))):
            return batch[key]
    except (KeyError, IndexError):
        pass
    raise RecorderError(f"the batch has no {key!r} entry for the sample ids: give each sample its id under that key "
                        "(or pass ids_key= / ids_fn= to the AmnesiacCallback)")
