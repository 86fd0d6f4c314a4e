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

Resuming after a crash: take checkpoints with :meth:`Recorder.checkpoint` while recording (model, optimizer and the
codec's error-feedback residual at a committed step, in safetensors + JSON, never pickle), then continue the run
from the last one; the steps committed after it are dropped and recorded again, numbering continues:

    >>> model = torch.nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    >>> run_dir, ckpt = tempfile.mkdtemp() + "/run", tempfile.mkdtemp() + "/ckpt.safetensors"
    >>> rec = amnesiac.Recorder(model, opt, run_dir, durable=False)
    >>> for step in range(5):
    ...     rec.add_batch([step]); model(torch.ones(1, 4)).sum().backward(); opt.step(); opt.zero_grad()
    ...     if step == 2:
    ...         at = rec.checkpoint(ckpt)   # at committed step 3
    >>> rec.close(finalize=False)      # (or a crash: SIGKILL, power loss)
    >>> rec = amnesiac.Recorder(model, opt, run_dir, resume=True, checkpoint=ckpt)
    >>> rec.steps_submitted            # steps 3 and 4 were dropped; the model and optimizer are back at step 3
    3
    >>> rec.close(finalize=False)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from deltastore import (DEFAULT_BUFFER_BYTES, AsyncStepWriter, DeltaStore, LayoutMismatchError, ReadOnlyError,
                        StoreExistsError, StoreNotFoundError, WriterError, check_state_at, log_tail_crc32c)

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import ModelMismatchError, RecorderError, ResumeError, RunExistsError, RunNotFoundError
from .loops import StepTrigger, as_optimizers, check_dtypes, recorded_state, unwrap_model
from .selective import DeletableRule, check_same_declaration

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
        record_on: with several optimizers stepping one model (a list as ``optimizer``), the one whose step ends
            a recorded step (the optimizer or its index; the last one by default): one recorded step per iteration.
        scaler: the ``torch.amp.GradScaler`` of an AMP loop: a step it skips (inf/NaN gradients) records nothing,
            and the samples declared for it are dropped (that step changed nothing), not charged to the next one.
        process_group: under ``torch.distributed`` (DDP or FSDP2, see :mod:`amnesiac.distributed`) every rank
            constructs the Recorder with the same ``run_dir``; ``"auto"`` uses the default group when it has more
            than one rank, ``None`` records as one process.
        resume: continue an incomplete run (one left by a crash, or closed with ``finalize=False``) instead of
            creating one. ``codec``, ``backend``, ``chunk_elems`` and ``durable`` are then the run's own.
        reopen: record more steps into a complete run (a fine-tune after ``amnesiac.purge``); the model must hold
            ``open_run(run_dir).final_state()``. Closing writes the new final state (and, if the run has deletion
            receipts, a ``finetune`` receipt naming ``request_id``).
        checkpoint: with ``resume``, a file written by :meth:`checkpoint`: the model and optimizer are loaded from
            it, the run is cut back to the step it was taken at (later committed steps are dropped: the training
            repeats them) and step numbering continues from there. Without it, the model must already hold the
            state at the run's last committed step (``open_run(run_dir).final_state()``); only exact (fp32) runs
            can resume that way, since a lossy codec's residual lives only in checkpoints.
        deletable: record selectively (ids that may be forgotten, or ``id -> bool``); see :mod:`amnesiac.selective`.

    Resuming checks that the model's state equals theta_0 plus the kept steps (plus the checkpoint's residual)
    within float32 rounding, reading those steps once, so that the recorded deltas keep adding up to the model's
    actual state; otherwise it raises :class:`ResumeError` and changes nothing.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
                 codec: str = "fp32", backend: str = "zarr", chunk_elems: int = 1 << 20, durable: bool = True,
                 slots: int | None = None, max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
                 model_spec: dict | None = None, extra: dict | None = None, resume: bool = False,
                 checkpoint: str | Path | None = None, record_on=None, scaler=None, process_group="auto",
                 reopen: bool = False, request_id: str | None = None, deletable=None):
        self.model, self.optimizer = model, optimizer
        self._deletable = None if deletable is None else DeletableRule.of(deletable, type(self) is Recorder)
        self._module = unwrap_model(model)  # DDP / torch.compile wrappers: store the plain module's names
        optimizers = as_optimizers(optimizer)
        self.epoch = 0  # stored with every step; set it from the training loop if you like
        residual = None
        self._finalize_attachments = None
        if checkpoint is not None and not resume:
            raise RecorderError("checkpoint= is for resuming a run: pass resume=True as well")
        if reopen:  # more steps into a complete (e.g. purged) run: see amnesiac/requests.py
            from .requests import reopen_run
            self.store, residual, self._finalize_attachments = reopen_run(run_dir, self._module, request_id)
            state = self._state()
        elif resume:
            self.store = _open_for_resume(run_dir)
            try:
                residual = self._resume(checkpoint)
            except BaseException:
                self.store.close()
                raise
            state = self._state()
        else:
            state = self._state()
            attrs = {"amnesiac": {"format": RUN_FORMAT, "model_class": type(self._module).__qualname__,
                                  "model_spec": model_spec, "extra": extra or {}, **self._more_attrs()}}
            try:
                self.store = DeltaStore.create(run_dir, state, codec=codec, backend=backend,
                                               chunk_elems=chunk_elems, durable=durable, attrs=attrs)
            except StoreExistsError as e:
                raise RunExistsError(str(e) + (" To continue an incomplete run, pass resume=True."
                                               if (Path(run_dir) / "store.json").exists() else "")) from None
        self.layout = self.store.layout
        tensors = [t for t in state.values() if torch.is_floating_point(t)]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        self._prev = self.layout.flatten(state, out=torch.empty(self.layout.numel, device=self.device))
        self._delta = torch.empty_like(self._prev)
        self._encoder = self.store.codec.encoder(self.device)
        if residual is not None:
            self._encoder.residual.copy_(residual.to(self.device))
        self._writer = AsyncStepWriter(self.store, device=self.device, slots=slots, max_buffer_bytes=max_buffer_bytes)
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._closed = False
        self._dtypes = {e.name: state[e.name].dtype for e in self.layout.entries}
        self._trigger = StepTrigger(optimizers, self._record_step, self._drop_pending, record_on=record_on,
                                    scaler=scaler)

    def __new__(cls, model=None, *args, process_group="auto", **kwargs):
        if cls is Recorder:  # under torch.distributed every rank gets the distributed recorder
            from .distributed import recorder_class
            cls = recorder_class(process_group)
        return super().__new__(cls)

    def _more_attrs(self) -> dict:
        """Further run attributes: a selective run's declaration; a subclass's own (the sharding of an FSDP2 run)."""
        return {"deletable": self._deletable.attrs()} if self._deletable is not None else {}

    def _state(self) -> dict[str, torch.Tensor]:
        """The tensors recorded: the unwrapped module's state_dict (see :func:`amnesiac.loops.recorded_state`)."""
        return recorded_state(self._module)

    def _drop_pending(self) -> None:
        """The step the declared samples were for was skipped (a GradScaler found inf/NaN): they trained nothing."""
        self._ids, self._labels = [], []

    # ------------------------------------------------------------ resuming
    def _resume(self, checkpoint) -> torch.Tensor | None:
        """Load the checkpoint (if any), check the model is at a committed step, cut the run back to it."""
        store = self.store
        try:
            store.layout.check(self._state())
        except LayoutMismatchError as e:
            raise ModelMismatchError(f"cannot resume {store.path}: {e}") from None
        selective, residual = check_same_declaration(store, self._deletable, checkpoint), None
        if isinstance(checkpoint, dict):  # a position(): the trainer restored the model and optimizer itself
            _check_position(checkpoint, store)
            step, residual, self.epoch = checkpoint["step"], checkpoint.get("residual"), checkpoint["epoch"]
        elif checkpoint is not None:
            info = load_checkpoint(checkpoint, self._module, self.optimizer, for_store=store)
            step, residual, self.epoch = info["step"], info.get("residual"), info["epoch"]
        else:
            if store.codec.lossy:
                raise ResumeError(f"{store.path} uses the lossy codec {store.codec.name}, whose error-feedback "
                                  "residual is kept only in checkpoints: resume with checkpoint=<a file written "
                                  "by Recorder.checkpoint>")
            step = store.num_steps
        if not selective:  # a selective run's deltas add up to no state: the checkpoint is trusted
            _check_state_at(store, self._state(), step, residual)
        store.truncate(step)
        return residual

    def checkpoint(self, path: str | Path) -> int:
        """Save the model, the optimizer and the recording position at the current (committed) step.

        Waits until every step so far is committed, then writes ``path`` atomically as one safetensors file
        (tensors) with JSON metadata; no pickle. Pass it to ``Recorder(..., resume=True, checkpoint=path)`` after
        a crash. Returns the step number the checkpoint was taken at (the number of committed steps).
        """
        store = self._settle("checkpoints")
        step = store.num_steps
        save_checkpoint(path, self._module, self.optimizer, step=step, epoch=self.epoch, store=store,
                        residual=self._encoder.residual, durable=store.meta["durable"])
        return step

    def _settle(self, what: str) -> DeltaStore:
        """Between steps only: record any trailing change and wait until every step so far is committed."""
        if self._closed:
            raise RecorderError("the Recorder is closed")
        if self._ids or self._labels:
            raise RecorderError(f"take {what} between steps: add_batch was called for a step not taken yet")
        self._record_trailing_change()
        self._writer.flush()
        return self.store

    def position(self) -> dict:
        """The recording position at the current (committed) step, for a trainer's own checkpoint.

        Trainers (Lightning, the Hugging Face Trainer) save the model and optimizer themselves; this is what the
        Recorder adds: ``{"run_uid", "step", "log_bytes", "log_tail_crc32c", "epoch"}`` (JSON) and ``"residual"``
        (a lossy codec's error-feedback residual, a CPU tensor, or None). After the trainer restored the model and
        optimizer saved with it, ``Recorder(model, optimizer, run_dir, resume=True, checkpoint=position)`` continues
        the run from there. Waits until every step so far is committed.
        """
        store = self._settle("the position")
        log_bytes = store.commit_record["log_bytes"]
        residual = self._encoder.residual
        return {"run_uid": store.uid, "step": store.num_steps, "log_bytes": log_bytes,
                "log_tail_crc32c": log_tail_crc32c(store, log_bytes), "epoch": int(self.epoch),
                "residual": None if residual is None else residual.detach().cpu().clone()}

    load_checkpoint = staticmethod(lambda path, model, optimizer: load_checkpoint(path, model, optimizer))

    @property
    def run_dir(self) -> Path:
        return self.store.path

    @property
    def steps_submitted(self) -> int:
        return self._writer.next_step

    def add_batch(self, ids, labels=None) -> None:
        """Declare the samples (by integer id; labels optional) that the coming optimizer step trains on.

        May be called several times per step (gradient accumulation); the ids add up until the step.
        """
        if self._closed:
            raise RecorderError("the Recorder is closed")
        # everything is checked before anything is kept: a rejected call leaves the step as it was
        ids = _as_int64(ids, "sample ids")
        if labels is not None:
            labels = _as_int64(labels, "labels")
            if labels.size != ids.size:
                raise RecorderError(f"{ids.size} ids but {labels.size} labels were given")
        if (labels is not None) != bool(self._labels) and self._ids:
            raise RecorderError("labels were given for some batches of this step but not for others; give them "
                                "for every batch (or for none)")
        self._ids.append(ids)
        if labels is not None:
            self._labels.append(labels)

    def _record_step(self) -> None:
        """Record ``S_now - S_prev`` as the next step, with the ids declared since the previous one."""
        if self._deletable is not None and not any(self._deletable.mask(ids).any() for ids in self._ids):
            return self._skip_step()
        state = self._state()
        check_dtypes(state, self._dtypes, self.steps_submitted)
        self._writer.wait_copy_done()  # the delta buffer is still being copied out for the previous step
        with torch.no_grad():
            for e in self.layout.entries:
                now = state[e.name].reshape(-1)
                prev = self._prev[e.offset:e.offset + e.numel]
                torch.sub(now, prev, out=self._delta[e.offset:e.offset + e.numel])
                prev.copy_(now)
            streams, side = self._encoder.encode(self._delta)
        metadata = self._step_metadata()
        self._ids, self._labels = [], []
        self._writer.submit(streams, side, metadata)

    def _skip_step(self) -> None:
        """Selective recording, a step without deletable samples: a ledger record; S_prev follows the model."""
        self.layout.flatten(self._state(), out=self._prev)  # (the writer copies from the encoded streams, not this)
        metadata, self._ids, self._labels = self._step_metadata(), [], []
        self._writer.submit_unstored(metadata)

    def _step_metadata(self) -> dict[str, np.ndarray]:
        metadata = {"ids": np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64),
                    "epoch": np.array([self.epoch], np.int64)}
        if self._labels:
            metadata["labels"] = np.concatenate(self._labels)
        metadata.update(self._deletable.ledger(metadata["ids"]) if self._deletable is not None else {})
        return metadata

    def _record_trailing_change(self) -> None:
        """Record, as one last step without samples, any change since the last optimizer step (BatchNorm statistics
        updated by a forward pass in training mode after it, say), so that theta_0 + sum(deltas) stays theta_final
        and both unlearning plans keep agreeing. Ids declared for a step that never came are not recorded."""
        if self._writer.failed:
            return
        state = self._state()
        check_dtypes(state, self._dtypes, self.steps_submitted)
        now = self.layout.flatten(state, out=torch.empty_like(self._prev))
        if not torch.equal(now, self._prev):
            self._submit_change(now)

    def _submit_change(self, now: torch.Tensor) -> None:
        """Record ``now - S_prev`` (flat) as a step without samples."""
        self._ids, self._labels = [], []
        if self._deletable is not None:  # no samples, so nothing deletable: a ledger record only
            return self._skip_step()
        self._writer.wait_copy_done()
        with torch.no_grad():
            streams, side = self._encoder.encode(torch.sub(now, self._prev, out=self._delta))
        self._prev.copy_(now)
        self._writer.submit(streams, side, self._step_metadata())

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
        self._trigger.remove()
        try:
            already_told = self._writer.failed and self._writer.error_reported
            if finalize and not self._writer.failed:
                try:
                    self._record_trailing_change()  # written by the writer's close below
                except WriterError:
                    pass  # the writer failed meanwhile: its close below raises the error
            try:
                self._writer.close()
            except WriterError:
                # a failed recording is never finalized (that would claim steps that were never written): closing
                # raises, unless the caller already knows and asked for no finalization (``with`` on an error)
                if finalize or not already_told:
                    raise
            if finalize and self._writer.failed:
                # marking the run complete would claim steps that were never written: it stays incomplete
                raise RecorderError(f"recording failed (see the WriterError raised earlier); {self.store.path} "
                                    f"stays incomplete with its {self.store.num_steps} committed steps, which "
                                    "remain usable. Resume it from a checkpoint to record the rest.")
            if finalize:
                residual, state = self._encoder.residual, self._state()
                extra = self._finalize_attachments(state) if self._finalize_attachments else None
                self.store.finalize(state, residual, attachments=extra)
        finally:
            self.store.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finalize=exc_type is None)


# ---------------------------------------------------------------- resuming
def _open_for_resume(run_dir) -> DeltaStore:
    try:
        return DeltaStore.open(run_dir, writable=True)
    except StoreNotFoundError as e:
        raise RunNotFoundError(str(e)) from None
    except ReadOnlyError:
        raise RecorderError(f"{run_dir} holds a complete run (closed normally); there is nothing to resume. "
                            "Record into a new directory, or pass reopen=True to record more steps into it.") from None


def _check_position(position: dict, store: DeltaStore) -> None:
    """A position from :meth:`Recorder.position` must belong to this run and to the history it holds now."""
    ints = ("step", "log_bytes", "log_tail_crc32c", "epoch")
    if not all(type(position.get(k)) is int for k in ints) or not isinstance(position.get("residual"),
                                                                               (torch.Tensor, type(None))):
        raise ResumeError("checkpoint= must be a checkpoint file or a dict returned by Recorder.position()")
    if position.get("run_uid") != store.uid:
        raise ResumeError(f"the recording position belongs to another run than {store.path}")
    if position["step"] > store.num_steps or store.commit_record["log_bytes"] < position["log_bytes"] \
            or log_tail_crc32c(store, position["log_bytes"]) != position["log_tail_crc32c"]:
        raise ResumeError(f"the recording position (step {position['step']}) does not match the steps {store.path} "
                          "committed (a position from another history of this run, cut back since)")


def _check_state_at(store: DeltaStore, state: dict, step: int, residual: torch.Tensor | None) -> None:
    """Raise :class:`ResumeError` unless ``state`` is theta_0 + the first ``step`` deltas (+ residual)."""
    now = store.layout.flatten({k: v.detach().float().cpu() for k, v in state.items() if k in store.layout.names},
                               out=torch.empty(store.layout.numel))
    check = check_state_at(store, now, step, residual)
    if not check.ok:
        raise ResumeError(f"the model is not at committed step {step} of {store.path}: it differs from theta_0 plus "
                          f"the first {step} recorded deltas by {check.error:.3g} (it moved {check.moved:.3g} from "
                          "theta_0). Load the checkpoint taken at that step (Recorder(..., resume=True, "
                          "checkpoint=PATH)), or the state open_run(run_dir).final_state() for an exact run. Nothing "
                          "was changed.")
