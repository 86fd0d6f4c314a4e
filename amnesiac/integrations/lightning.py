"""PyTorch Lightning: record a ``Trainer.fit`` with a callback (``pip install amnesiac[lightning]``).

Example:
    >>> import tempfile, torch, lightning as L, amnesiac
    >>> from amnesiac.integrations.lightning import AmnesiacCallback
    >>> class Tiny(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__(); self.net = torch.nn.Linear(4, 2)
    ...     def training_step(self, batch, i):
    ...         return torch.nn.functional.cross_entropy(self.net(batch["x"]), batch["y"])
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.1)
    >>> data = [{"x": torch.randn(4), "y": i % 2, "sample_id": i} for i in range(8)]
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> trainer = L.Trainer(max_epochs=1, callbacks=[AmnesiacCallback(run_dir, durable=False)], logger=False,
    ...                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    >>> trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    >>> amnesiac.open_run(run_dir).steps_for(sample_ids=[5]).tolist()
    [1]

Checkpoints: the callback's state (the recording position) is saved in Lightning's own checkpoint; after a crash,
``trainer.fit(model, ckpt_path=...)`` with a new ``AmnesiacCallback`` on the same ``run_dir`` continues the run
from that checkpoint's step (steps committed after it are dropped and recorded again).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ..recorder import Recorder
from . import batch_values


class AmnesiacCallback(pl.Callback):
    """Records every optimizer step of ``trainer.fit`` into ``run_dir``.

    Args:
        run_dir: the run directory (the same on every rank of a DDP / FSDP strategy).
        ids_key: where a batch holds its sample ids: a dict key (default ``"sample_id"``) or a tuple index.
        ids_fn: instead of ``ids_key``, a function of the batch returning its ids.
        labels_key, labels_fn: the same for class labels (optional; they allow unlearning by class).
        **recorder_options: passed to :class:`amnesiac.Recorder` (``codec``, ``durable``, ``record_on``, ...).
    """

    def __init__(self, run_dir: str | Path, *, ids_key: str | int = "sample_id",
                 ids_fn: Callable[[Any], Any] | None = None, labels_key: str | int | None = None,
                 labels_fn: Callable[[Any], Any] | None = None, **recorder_options):
        self.run_dir, self.recorder = Path(run_dir), None
        self._ids, self._labels = (ids_key, ids_fn), (labels_key, labels_fn)
        self._options, self._position = recorder_options, None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, after Lightning restored the model, the optimizers and this callback's state from a checkpoint
        model = trainer.strategy.model or pl_module  # DDP-wrapped under a DDP strategy: the Recorder unwraps it
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        optimizers = list(trainer.optimizers)
        self.recorder = Recorder(model, optimizers if len(optimizers) > 1 else optimizers[0], self.run_dir,
                                 scaler=scaler, resume=self._position is not None, checkpoint=self._position,
                                 **self._options)
        self._position = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        key, fn = self._labels
        labels = batch_values(batch, key, fn) if key is not None or fn is not None else None
        self.recorder.epoch = trainer.current_epoch
        self.recorder.add_batch(batch_values(batch, *self._ids), labels=labels)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.recorder is not None:  # the committed steps stay usable; resume from the last checkpoint
            try:
                self.recorder.close(finalize=False)
            finally:
                self.recorder = None

    def close(self) -> None:
        """Finalize the run (called at the end of ``fit``)."""
        if self.recorder is not None:
            try:
                self.recorder.close()
            finally:
                self.recorder = None

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.recorder.position()} if self.recorder is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = state_dict.get("position")
