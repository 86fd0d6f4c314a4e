"""The Recorder: attach to a model and optimizer, record every optimizer step's delta into a run directory.

Example:
    >>> import tempfile, torch, amnesiac
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> with amnesiac.Recorder(model, opt, run_dir, durable=False) as rec:
    ...     for step in range(3):
    ...         rec.add_batch([2 * step, 2 * step + 1], labels=[0, 1])
    ...         model(torch.randn(2, 4)).sum().backward()
    ...         opt.step(); opt.zero_grad()
    >>> amnesiac.open_run(run_dir).steps_for(sample_ids=[3]).tolist()
    [1]
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deltastore import DeltaStore, StoreExistsError
from deltastore.writer import DEFAULT_BUFFER_BYTES, AsyncStepWriter

from .errors import RecorderError, RunExistsError

RUN_FORMAT = 1


def _as_int64(values, what: str) -> np.ndarray:
    arr = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    if arr.dtype.kind not in "iu" and arr.size:
        raise RecorderError(f"{what} must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64).reshape(-1)


class Recorder:
    """Records ``delta_t = S_t - S_{t-1}`` of every floating tensor of ``model.state_dict()`` after each
    ``optimizer.step()`` (an optimizer step post-hook), with the ids passed to :meth:`add_batch` since the step
    before. BatchNorm running statistics are included because they are floating state_dict tensors.

    Args:
        model: the model being trained; its state_dict at construction is S_0.
        optimizer: the optimizer whose ``step()`` ends a recorded step.
        run_dir: a new (or empty) directory for the run.
        codec: ``"fp32"`` (exact), ``"fp16"``, ``"bf16"`` or ``"topk:F"``.
        backend: ``"zarr"`` (compressed, default) or ``"safetensors"`` (one uncompressed file per step).
        durable: fsync each step before committing it (survives power loss, not only a killed process).
        slots, max_buffer_bytes: the host ring buffer between the training thread and the writer thread.
        model_spec: JSON describing how to rebuild the model (used by the command line); free for the caller.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
                 codec: str = "fp32", backend: str = "zarr", chunk_elems: int = 1 << 20, durable: bool = True,
                 slots: int | None = None, max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 model_spec: dict | None = None, extra: dict | None = None):
        self.model, self.optimizer = model, optimizer
        state = model.state_dict()
        attrs = {"amnesiac": {"format": RUN_FORMAT, "model_class": type(model).__qualname__,
                              "model_spec": model_spec, "extra": extra or {}}}
        try:
            self.store = DeltaStore.create(run_dir, state, codec=codec, backend=backend, chunk_elems=chunk_elems,
                                           durable=durable, attrs=attrs)
        except StoreExistsError as e:
            raise RunExistsError(str(e)) from None
        self.layout = self.store.layout
        tensors = [t for t in state.values() if torch.is_floating_point(t)]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self._prev = self.layout.flatten(state, out=torch.empty(self.layout.numel, device=self.device))
        self._delta = torch.empty_like(self._prev)
        self._encoder = self.store.codec.encoder(self.device)
        self._writer = AsyncStepWriter(self.store, device=self.device, slots=slots, max_buffer_bytes=max_buffer_bytes)
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self.epoch = 0  # stored with every step; set it from the training loop if you like
        self._closed = False
        self._hook = optimizer.register_step_post_hook(self._on_step)

    @property
    def run_dir(self) -> Path:
        return self.store.path

    @property
    def steps_submitted(self) -> int:
        return self._writer._next_step

    def add_batch(self, ids, labels=None) -> None:
        """Declare the samples (by integer id; labels optional) that the coming optimizer step trains on.

        May be called several times per step (gradient accumulation); the ids add up until the step.
        """
        if self._closed:
            raise RecorderError("the Recorder is closed")
        ids = _as_int64(ids, "sample ids")
        self._ids.append(ids)
        if labels is not None:
            labels = _as_int64(labels, "labels")
            if labels.size != ids.size:
                raise RecorderError(f"{ids.size} ids but {labels.size} labels were given")
            self._labels.append(labels)
        elif self._labels:
            raise RecorderError("labels were given for some batches of this step but not for others")

    def _on_step(self, optimizer, args, kwargs) -> None:
        state = self.model.state_dict()
        self._writer.wait_copy_done()  # the delta buffer is still being copied out for the previous step
        with torch.no_grad():
            for e in self.layout.entries:
                now = state[e.name].reshape(-1)
                prev = self._prev[e.offset:e.offset + e.numel]
                torch.sub(now, prev, out=self._delta[e.offset:e.offset + e.numel])
                prev.copy_(now)
            streams, side = self._encoder.encode(self._delta)
        metadata = {"ids": np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64),
                    "epoch": np.array([self.epoch], np.int64)}
        if self._labels:
            metadata["labels"] = np.concatenate(self._labels)
        self._ids, self._labels = [], []
        self._writer.submit(streams, side, metadata)

    def flush(self) -> None:
        """Wait until every recorded step is committed; raises a background write error, if any."""
        self._writer.flush()

    def close(self, *, finalize: bool = True) -> None:
        """Flush, save the final state (and a lossy codec's residual), mark the run complete, release the lock.

        With ``finalize=False`` (used when training failed) the run stays incomplete: its committed steps remain
        usable, as after a crash.
        """
        if self._closed:
            return
        self._closed = True
        self._hook.remove()
        try:
            self._writer.close()
            if finalize:
                residual = self._encoder.residual
                self.store.finalize(self.model.state_dict(), residual)
        finally:
            self.store.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finalize=exc_type is None)
