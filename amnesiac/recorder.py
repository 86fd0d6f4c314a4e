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

import json
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
from safetensors.torch import load as safetensors_from_bytes  # never pickle: plain tensors only
import torch

from deltastore import (DEFAULT_PIECE_ELEMS, DeltaStore, LayoutMismatchError, ReadOnlyError, StepStreamer,
                        StoreExistsError, StoreNotFoundError, WriterError)
from deltastore.fileio import atomic_write_bytes, crc32c, read_regular_file

from .errors import ModelMismatchError, RecorderError, ResumeError, RunExistsError, RunNotFoundError

RUN_FORMAT = 1
CHECKPOINT_FORMAT = 1
RESUME_TOLERANCE = 1e-4  # relative to how far the model moved from theta_0: float32 summation of many steps
MAX_CHECKPOINT_BYTES = 1 << 40
_LOG_TAIL = 4096  # the checkpoint keeps the crc32c of the step log's last bytes at its step: the same history?


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
        slots, max_buffer_bytes: the pool of host buffers between the training thread and the writer thread.
        piece_elems: parameters per piece: each step streams through delta, encoder and writer this many at a time,
            so recording holds one model-sized buffer (the previous state) plus a bounded amount.
        model_spec: JSON describing how to rebuild the model (used by the command line); free for the caller.
        resume: continue an incomplete run (one left by a crash, or closed with ``finalize=False``) instead of
            creating one. ``codec``, ``backend``, ``chunk_elems`` and ``durable`` are then the run's own.
        checkpoint: with ``resume``, a file written by :meth:`checkpoint`: the model and optimizer are loaded from
            it, the run is cut back to the step it was taken at (later committed steps are dropped: the training
            repeats them) and step numbering continues from there. Without it, the model must already hold the
            state at the run's last committed step (``open_run(run_dir).final_state()``); only exact (fp32) runs
            can resume that way, since a lossy codec's residual lives only in checkpoints.

    Resuming checks that the model's state equals theta_0 plus the kept steps (plus the checkpoint's residual)
    within float32 rounding, reading those steps once, so that the recorded deltas keep adding up to the model's
    actual state; otherwise it raises :class:`ResumeError` and changes nothing.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, run_dir: str | Path, *,
                 codec: str = "fp32", backend: str = "zarr", chunk_elems: int = 1 << 20, durable: bool = True,
                 slots: int | None = None, max_buffer_bytes: int | None = None,
                 model_spec: dict | None = None, extra: dict | None = None, resume: bool = False,
                 checkpoint: str | Path | None = None, piece_elems: int = DEFAULT_PIECE_ELEMS):
        self.model, self.optimizer = model, optimizer
        self.epoch = 0  # stored with every step; set it from the training loop if you like
        residual = None
        if checkpoint is not None and not resume:
            raise RecorderError("checkpoint= is for resuming a run: pass resume=True as well")
        if resume:
            self.store = _open_for_resume(run_dir)
            try:
                residual = self._resume(checkpoint)
            except BaseException:
                self.store.close()
                raise
            state = model.state_dict()
        else:
            state = model.state_dict()
            attrs = {"amnesiac": {"format": RUN_FORMAT, "model_class": type(model).__qualname__,
                                  "model_spec": model_spec, "extra": extra or {}}}
            try:
                self.store = DeltaStore.create(run_dir, state, codec=codec, backend=backend,
                                               chunk_elems=chunk_elems, durable=durable, attrs=attrs)
            except StoreExistsError as e:
                raise RunExistsError(str(e) + (" To continue an incomplete run, pass resume=True."
                                               if (Path(run_dir) / "store.json").exists() else "")) from None
        self.layout = self.store.layout
        tensors = [t for t in state.values() if torch.is_floating_point(t)]
        self.device = tensors[0].device if tensors else torch.device("cpu")
        try:
            self._stream = StepStreamer(self.store, state, device=self.device, piece_elems=piece_elems, slots=slots,
                                        max_buffer_bytes=max_buffer_bytes, residual=residual)
        except BaseException:
            self.store.close()
            raise
        self._writer = self._stream.writer
        self._ids: list[np.ndarray] = []
        self._labels: list[np.ndarray] = []
        self._closed = False
        self._hook = optimizer.register_step_post_hook(self._on_step)

    # ------------------------------------------------------------ resuming
    def _resume(self, checkpoint) -> torch.Tensor | None:
        """Load the checkpoint (if any), check the model is at a committed step, cut the run back to it."""
        store = self.store
        try:
            store.layout.check(self.model.state_dict())
        except LayoutMismatchError as e:
            raise ModelMismatchError(f"cannot resume {store.path}: {e}") from None
        residual = None
        if checkpoint is not None:
            info = load_checkpoint(checkpoint, self.model, self.optimizer, _for_store=store)
            step, residual, self.epoch = info["step"], info.get("residual"), info["epoch"]
        else:
            if store.codec.lossy:
                raise ResumeError(f"{store.path} uses the lossy codec {store.codec.name}, whose error-feedback "
                                  "residual is kept only in checkpoints: resume with checkpoint=<a file written "
                                  "by Recorder.checkpoint>")
            step = store.num_steps
        _check_state_at(store, self.model.state_dict(), step, residual)
        store.truncate(step)
        return residual

    def checkpoint(self, path: str | Path) -> int:
        """Save the model, the optimizer and the recording position at the current (committed) step.

        Waits until every step so far is committed, then writes ``path`` atomically as one safetensors file
        (tensors) with JSON metadata; no pickle. Pass it to ``Recorder(..., resume=True, checkpoint=path)`` after
        a crash. Returns the step number the checkpoint was taken at (the number of committed steps).
        """
        if self._closed:
            raise RecorderError("the Recorder is closed")
        if self._ids or self._labels:
            raise RecorderError("take checkpoints between steps: add_batch was called for a step not taken yet")
        self._record_trailing_change()
        self._writer.flush()
        store = self.store
        step, log_bytes = store.num_steps, store.commit_record["log_bytes"]
        tensors = {f"model/{k}": v for k, v in self.model.state_dict().items()}
        optim = _optimizer_to_tensors(self.optimizer, tensors)
        residual = self._stream.residual(self.model.state_dict())
        if residual is not None:
            tensors["recorder/residual"] = residual
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
        head = {"format": CHECKPOINT_FORMAT, "run_uid": store.uid, "step": step, "log_bytes": log_bytes,
                "log_tail_crc32c": _log_tail_crc(store, log_bytes), "epoch": int(self.epoch), "optimizer": optim,
                "tensor_crc32c": {k: crc32c(_raw_bytes(v)) for k, v in tensors.items()}}
        data = safetensors.torch.save(tensors, metadata={"amnesiac_checkpoint": json.dumps(head)})
        atomic_write_bytes(Path(path), data, durable=store.meta["durable"])
        return step

    load_checkpoint = staticmethod(lambda path, model, optimizer: load_checkpoint(path, model, optimizer))

    @property
    def run_dir(self) -> Path:
        return self.store.path

    @property
    def steps_submitted(self) -> int:
        return self._writer._next_step

    def add_batch(self, ids, labels=None) -> None:
        """Declare the samples (by integer id; labels optional) that the coming optimizer step trains on.

        May be called several times per step (gradient accumulation); the ids add up until the step. Pass ids
        and labels as lists, numpy arrays or CPU tensors: a CUDA tensor is copied to the host here, which waits for
        the GPU to finish the work queued so far (a DataLoader's ids are on the CPU anyway).
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

    def _on_step(self, optimizer, args, kwargs) -> None:
        self._record_step()

    def _record_step(self) -> None:
        """Record ``S_now - S_prev`` as the next step, with the ids declared since the previous one."""
        metadata = self._step_metadata()
        self._ids, self._labels = [], []
        self._stream.record(self.model.state_dict(), metadata)

    def _step_metadata(self) -> dict[str, np.ndarray]:
        metadata = {"ids": np.concatenate(self._ids) if self._ids else np.zeros(0, np.int64),
                    "epoch": np.array([self.epoch], np.int64)}
        if self._labels:
            metadata["labels"] = np.concatenate(self._labels)
        return metadata

    def _record_trailing_change(self) -> None:
        """Record, as one last step without samples, any change since the last optimizer step (BatchNorm statistics
        updated by a forward pass in training mode after it, say), so that theta_0 + sum(deltas) stays theta_final
        and both unlearning plans keep agreeing. Ids declared for a step that never came are not recorded."""
        if self._writer.failed:
            return
        state = self.model.state_dict()
        if not self._stream.changed(state):
            return
        self._ids, self._labels = [], []
        self._stream.record(state, self._step_metadata())

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
            already_told = self._writer.failed and getattr(self._writer, "_error_raised", True)
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
                self._stream.finalize(self.model.state_dict())
        finally:
            self.store.close()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(finalize=exc_type is None)


# ---------------------------------------------------------------- checkpoints and resuming
def _open_for_resume(run_dir) -> DeltaStore:
    try:
        return DeltaStore.open(run_dir, writable=True)
    except StoreNotFoundError as e:
        raise RunNotFoundError(str(e)) from None
    except ReadOnlyError:
        raise RecorderError(f"{run_dir} holds a complete run (closed normally); there is nothing to resume. "
                            "Record into a new directory.") from None


def _raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _log_tail_crc(store: DeltaStore, log_bytes: int) -> int:
    lo = max(0, log_bytes - _LOG_TAIL)
    try:
        with open(store.path / "steps.log", "rb") as f:
            f.seek(lo)
            return crc32c(f.read(log_bytes - lo))
    except FileNotFoundError:
        return crc32c(b"")


def _jsonable(value, where: str):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, where) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _jsonable(v, where) for k, v in value.items()}
    raise RecorderError(f"cannot checkpoint the optimizer: {where} holds a {type(value).__name__}, which is "
                        "neither a tensor nor plain JSON (checkpoints never pickle)")


def _optimizer_to_tensors(optimizer: torch.optim.Optimizer, tensors: dict) -> dict:
    """Split the optimizer's state_dict into tensors (added to ``tensors``) and a JSON description."""
    def split(entry: dict, prefix: str, where: str) -> dict:
        out = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{key}"] = value
                out[key] = {"tensor": f"{prefix}/{key}"}
            else:
                out[key] = {"value": _jsonable(value, f"{where}[{key!r}]")}
        return out

    sd = optimizer.state_dict()
    return {"state": {str(pid): split(entry, f"optim/{pid}", f"state[{pid}]") for pid, entry in sd["state"].items()},
            "param_groups": [split(group, f"optim_group/{i}", f"param_groups[{i}]")
                             for i, group in enumerate(sd["param_groups"])]}


def _like(value, template):
    """JSON gives lists where the optimizer had tuples (Adam's betas): give them back their type."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(value)
    return value


def _optimizer_from_tensors(optimizer: torch.optim.Optimizer, desc: dict, tensors: dict) -> None:
    def unpack(item):
        if not isinstance(item, dict) or len(item) != 1:
            raise ResumeError("the checkpoint's optimizer description is malformed")
        if "tensor" in item:
            try:
                return tensors[item["tensor"]]
            except (KeyError, TypeError):
                raise ResumeError("the checkpoint lacks an optimizer tensor it names") from None
        return item.get("value")

    current = optimizer.state_dict()
    try:
        state = {int(pid): {k: unpack(v) for k, v in entry.items()} for pid, entry in desc["state"].items()}
        groups = []
        for group, template in zip(desc["param_groups"], current["param_groups"], strict=True):
            groups.append({k: _like(unpack(v), template.get(k)) for k, v in group.items()})
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except ResumeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise ResumeError(f"the checkpoint's optimizer state does not fit this optimizer: {e}") from None


def load_checkpoint(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    _for_store: DeltaStore | None = None) -> dict:
    """Load a checkpoint written by :meth:`Recorder.checkpoint` into ``model`` (and ``optimizer``).

    Returns ``{"step", "epoch", "run_uid", "residual"}``. Every tensor is checked against its crc32c first; the
    file is safetensors with JSON metadata, so loading it runs no code.
    """
    path = Path(path)
    try:
        data = read_regular_file(path, "checkpoint", max_bytes=MAX_CHECKPOINT_BYTES)
    except FileNotFoundError:
        raise ResumeError(f"checkpoint {path} does not exist") from None
    except ValueError as e:
        raise ResumeError(str(e)) from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        if len(data) < 8 or header_len > min(len(data) - 8, 100_000_000):
            raise ValueError("malformed header")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        head = json.loads(meta["amnesiac_checkpoint"])
        tensors = safetensors_from_bytes(data)
        ok = (isinstance(head, dict) and head.get("format") == CHECKPOINT_FORMAT
              and all(isinstance(head.get(k), int) for k in ("step", "log_bytes", "log_tail_crc32c", "epoch"))
              and isinstance(head.get("tensor_crc32c"), dict) and isinstance(head.get("optimizer"), dict))
    except Exception as e:  # noqa: BLE001 - any malformation is one clear error
        raise ResumeError(f"{path} is not a checkpoint written by Recorder.checkpoint ({type(e).__name__}: {e})") \
            from None
    if not ok:
        raise ResumeError(f"{path} is not a checkpoint written by Recorder.checkpoint (or of an unknown version)")
    if set(head["tensor_crc32c"]) != set(tensors) or any(crc32c(_raw_bytes(t)) != head["tensor_crc32c"][k]
                                                         for k, t in tensors.items()):
        raise ResumeError(f"checkpoint {path} fails its crc32c checksums: the file was changed or damaged")
    store = _for_store
    if store is not None:
        if head.get("run_uid") != store.uid:
            raise ResumeError(f"checkpoint {path} belongs to another run than {store.path}")
        if head["step"] > store.num_steps:
            raise ResumeError(f"checkpoint {path} was taken at step {head['step']}, but {store.path} has only "
                              f"{store.num_steps} committed steps: it comes from a history that was since cut "
                              "back. Resume from a checkpoint taken at or before the last committed step.")
        if (store.commit_record["log_bytes"] < head["log_bytes"]
                or _log_tail_crc(store, head["log_bytes"]) != head["log_tail_crc32c"]):
            raise ResumeError(f"checkpoint {path} does not match the steps {store.path} committed before it (a "
                              "checkpoint from another history of this run)")
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    try:
        model.load_state_dict(model_state)
    except RuntimeError as e:
        raise ModelMismatchError(f"checkpoint {path} does not fit the model: {str(e)[:500]}") from None
    if optimizer is not None:
        _optimizer_from_tensors(optimizer, head["optimizer"], tensors)
    return {"step": head["step"], "epoch": head["epoch"], "run_uid": head.get("run_uid"),
            "residual": tensors.get("recorder/residual")}


def _check_state_at(store: DeltaStore, state: dict, step: int, residual: torch.Tensor | None) -> None:
    """Raise :class:`ResumeError` unless ``state`` is theta_0 + the first ``step`` deltas (+ residual)."""
    now = store.layout.flatten({k: v.detach().float().cpu() for k, v in state.items() if k in store.layout.names},
                               out=torch.empty(store.layout.numel))
    start = store.read_snapshot_flat("start")
    rebuilt = start + store.sum_steps(range(step)) if step else start.clone()
    if residual is not None:
        rebuilt += residual.float().cpu().reshape(-1)
    moved = (now - start).norm().item()
    error = (now - rebuilt).norm().item()
    if not error <= RESUME_TOLERANCE * moved + 1e-7 * now.norm().item():
        raise ResumeError(f"the model is not at committed step {step} of {store.path}: it differs from theta_0 plus "
                          f"the first {step} recorded deltas by {error:.3g} (it moved {moved:.3g} from theta_0). "
                          "Load the checkpoint taken at that step (Recorder(..., resume=True, checkpoint=PATH)), or "
                          "the state open_run(run_dir).final_state() for an exact run. Nothing was changed.")
