"""Hugging Face ``transformers.Trainer``: record training with a callback (``pip install amnesiac[hf]``).

The Trainer gives callbacks no batches, so the callback takes the ids where they pass through: it wraps the training
DataLoader's collate function (which sees the dataset's items, before the Trainer drops the columns its model does not
take) and puts the ids into the batch under ``ids_key``; a forward pre-hook on the model takes them out again before
the model sees them and declares them to the Recorder. Only training forwards declare ids (evaluation batches come
from other loaders). With a ``datasets.Dataset``, the Trainer removes unused columns from the data set itself, so
pass ``remove_unused_columns=False`` in the ``TrainingArguments`` (a torch Dataset of dicts needs nothing).

Checkpoints: at each Trainer checkpoint the callback writes the recording position next to it
(``checkpoint-N/amnesiac-position.safetensors``); ``trainer.train(resume_from_checkpoint=...)`` with a new callback on
the same ``run_dir`` continues the run from there (the callback finds ``output_dir/checkpoint-<global step>``, or
pass ``resume_from=``).

Example:
    >>> import tempfile, torch, transformers, amnesiac
    >>> from amnesiac.integrations.hf import AmnesiacCallback
    >>> class Tiny(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.net = torch.nn.Linear(4, 2)
    ...     def forward(self, x, labels=None):
    ...         return {"loss": torch.nn.functional.cross_entropy(self.net(x), labels)}
    >>> data = [{"x": torch.randn(4), "labels": i % 2, "sample_id": i} for i in range(8)]
    >>> out = tempfile.mkdtemp()
    >>> args = transformers.TrainingArguments(out, per_device_train_batch_size=4, num_train_epochs=1, report_to=[],
    ...                                       save_strategy="no", use_cpu=True, disable_tqdm=True)
    >>> callback = AmnesiacCallback(out + "/run", durable=False)
    >>> trainer = transformers.Trainer(Tiny(), args, train_dataset=data, callbacks=[callback])
    >>> trainer.remove_callback(transformers.PrinterCallback)  # keep the doctest's output quiet
    >>> _ = trainer.train()
    >>> run = amnesiac.open_run(out + "/run")
    >>> run.num_steps, run.sample_ids().tolist()
    (2, [0, 1, 2, 3, 4, 5, 6, 7])
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import transformers

from ..errors import RecorderError, ResumeError
from ..recorder import Recorder
from . import batch_values

POSITION_FILE = "amnesiac-position.safetensors"
_LABELS = "__amnesiac_labels__"


def save_position(path: Path, position: dict) -> None:
    """The recording position as one safetensors file (residual tensor + JSON), no pickle."""
    residual = position.get("residual")
    head = {k: v for k, v in position.items() if k != "residual"}
    tensors = {"residual": residual} if residual is not None else {}
    data = safetensors.torch.save(tensors, metadata={"amnesiac_position": json.dumps(head)})
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def load_position(path: Path) -> dict:
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            head = json.loads(f.metadata()["amnesiac_position"])
            residual = f.get_tensor("residual") if "residual" in f.keys() else None
    except FileNotFoundError:
        raise ResumeError(f"{path} does not exist: the checkpoint was not written with an AmnesiacCallback; pass "
                          "resume_from=<the checkpoint directory>") from None
    except Exception as e:  # noqa: BLE001 - any malformation is one clear error
        raise ResumeError(f"{path} is not a recording position written by AmnesiacCallback ({e})") from None
    if not isinstance(head, dict):
        raise ResumeError(f"{path} is not a recording position written by AmnesiacCallback")
    return {**head, "residual": residual}


class _CollateWithIds:
    """Sees the dataset's items before the Trainer's collator drops unknown columns; adds their ids to the batch."""

    def __init__(self, inner, ids_key: str, ids_fn, labels_key, labels_fn):
        self.inner, self.ids_key, self.ids_fn = inner, ids_key, ids_fn
        self.labels_key, self.labels_fn = labels_key, labels_fn

    def __call__(self, features):
        ids = torch.as_tensor([batch_values(f, self.ids_key, None) for f in features] if self.ids_fn is None
                              else self.ids_fn(features))
        labels = None
        if self.labels_key is not None or self.labels_fn is not None:
            labels = torch.as_tensor([batch_values(f, self.labels_key, None) for f in features]
                                     if self.labels_fn is None else self.labels_fn(features))
        batch = self.inner(features)
        batch[self.ids_key] = ids
        if labels is not None:
            batch[_LABELS] = labels
        return batch


class AmnesiacCallback(transformers.TrainerCallback):
    """Records every optimizer step of ``Trainer.train`` into ``run_dir``.

    Args:
        run_dir: the run directory (the same on every rank of a distributed run).
        ids_key: the key of each dataset item holding its sample id (default ``"sample_id"``).
        ids_fn: instead, a function of the list of dataset items of a batch returning their ids.
        labels_key, labels_fn: the same for class labels (optional; they allow unlearning by class).
        resume_from: the checkpoint directory to resume from, when it is not ``output_dir/checkpoint-<step>``.
        **recorder_options: passed to :class:`amnesiac.Recorder` (``codec``, ``durable``, ...).
    """

    def __init__(self, run_dir: str | Path, *, ids_key: str = "sample_id", ids_fn: Callable[[list], Any] | None = None,
                 labels_key: str | None = None, labels_fn: Callable[[list], Any] | None = None,
                 resume_from: str | Path | None = None, **recorder_options):
        self.run_dir, self.recorder = Path(run_dir), None
        self._collate = (ids_key, ids_fn, labels_key, labels_fn)
        self._resume_from, self._options = resume_from, recorder_options
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if model is None or optimizer is None or train_dataloader is None:
            raise RecorderError("the Trainer did not pass the model, optimizer and training DataLoader to the callback")
        position = None
        if state.global_step > 0 or self._resume_from is not None:  # the Trainer resumed from a checkpoint
            folder = Path(self._resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}")
            position = load_position(folder / POSITION_FILE)
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)  # accelerate wraps the DataLoader
        if not isinstance(loader.collate_fn, _CollateWithIds):
            loader.collate_fn = _CollateWithIds(loader.collate_fn, *self._collate)
        self._hook = model.register_forward_pre_hook(self._declare, with_kwargs=True)
        self.recorder = Recorder(model, optimizer, self.run_dir, scaler=getattr(optimizer, "scaler", None),
                                 resume=position is not None, checkpoint=position, **self._options)

    def _declare(self, module, args, kwargs):
        ids = kwargs.pop(self._collate[0], None)
        labels = kwargs.pop(_LABELS, None)
        if ids is not None and module.training and torch.is_grad_enabled():
            self.recorder.add_batch(ids, labels=labels)
        return args, kwargs

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.recorder is not None:
            self.recorder.epoch = int(state.epoch or 0)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.recorder is not None and folder.is_dir() and args.should_save:
            save_position(folder / POSITION_FILE, self.recorder.position())

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self, *, finalize: bool = True) -> None:
        """Finalize the run (called at the end of ``train``); ``finalize=False`` after a failed training."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.recorder is not None:
            try:
                self.recorder.close(finalize=finalize)
            finally:
                self.recorder = None
