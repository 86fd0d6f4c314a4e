"""The delta store: numbered steps of one flat float32 vector, plus whole-state snapshots and per-step metadata.

Directory layout (format version 1)::

    store.json          written once: format, layout, codec, chunk size, backend, crc32c of start.safetensors
    commit.json         replaced atomically after each step: committed steps, committed step-log bytes, status
    start.safetensors   S_0: every tensor given at creation (floating or not)
    final.safetensors   S_T, written by finalize()
    residual.safetensors  lossy codecs only: the error-feedback residual left at finalize()
    steps.log           per-step metadata records (see steplog.py), checksummed
    deltas/             the encoded steps (see backends.py)
    writer.lock         present while a writer has the store open

Commit protocol for step ``t``: write the step's streams whole (fsync), append its step-log record (fsync), then
replace ``commit.json`` (temp file, fsync, rename). A crash before the rename leaves step ``t`` invisible; after it,
step ``t`` and its metadata are both there. Readers only ever look at what ``commit.json`` says is committed.

Example:
    >>> import tempfile, torch
    >>> from deltastore import DeltaStore
    >>> path = tempfile.mkdtemp() + "/store"
    >>> start = {"w": torch.zeros(3)}
    >>> with DeltaStore.create(path, start, codec="fp32", durable=False) as store:
    ...     for t in range(3):
    ...         _ = store.append_delta(torch.full((3,), float(t + 1)), {"ids": torch.tensor([t])})
    ...     store.finalize({"w": torch.full((3,), 6.0)})
    >>> store = DeltaStore.open(path)
    >>> store.num_steps, store.sum_steps([0, 2]).tolist()
    (3, [4.0, 4.0, 4.0])
    >>> store.state_without([1]).tolist()
    [4.0, 4.0, 4.0]
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from .backends import backend_class, directory_bytes
from .codecs import Codec, parse_codec
from .errors import (CorruptionError, FormatError, ReadOnlyError, StepSelectionError, StoreExistsError,
                     StoreNotFoundError)
from .fileio import atomic_write_json, crc32c, fsync_dir, read_json
from .layout import TensorLayout
from .lock import WriterLock
from .steplog import RaggedField, StepLogWriter, read_step_log

FORMAT_VERSION = 1
DEFAULT_CHUNK_ELEMS = 1 << 20  # 4 MiB of float32 per chunk
RECORDING, COMPLETE = "recording", "complete"


class DeltaStore:
    """A delta store opened for reading (:meth:`open`) or writing (:meth:`create`, :meth:`open` with
    ``writable=True`` to resume)."""

    def __init__(self, path: Path, meta: dict, commit: dict, *, writable: bool):
        self.path, self.meta, self._commit = Path(path), meta, commit
        self.layout = TensorLayout.from_json(meta["layout"])
        self.codec: Codec = parse_codec(meta["codec"], numel=self.layout.numel, chunk_elems=meta["chunk_elems"])
        self.backend = backend_class(meta["backend"])(self.path / "deltas", self.codec.streams(),
                                                      durable=meta["durable"])
        self.writable = writable
        self._lock = WriterLock(self.path) if writable else None
        self._log: StepLogWriter | None = None
        self._table: dict[str, RaggedField] | None = None
        if writable:
            self._lock.acquire()
            self._log = StepLogWriter(self.path / "steps.log", committed_bytes=commit["log_bytes"],
                                      durable=meta["durable"])

    # ---------------------------------------------------------------- creation and opening
    @classmethod
    def create(cls, path: str | Path, start: Mapping[str, torch.Tensor], *, codec: str = "fp32",
               backend: str = "zarr", chunk_elems: int = DEFAULT_CHUNK_ELEMS, durable: bool = True,
               attrs: dict | None = None) -> DeltaStore:
        """Create a store whose steps are deltas of the floating tensors of ``start`` (saved as S_0).

        ``durable=True`` fsyncs every step before committing it (survives power loss, not only a killed process).
        ``attrs`` is free JSON kept in store.json for the layer above.
        """
        path = Path(path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            what = "a run" if (path / "store.json").exists() else "files"
            raise StoreExistsError(f"{path} already holds {what}; choose a new directory or delete it first "
                                   "(nothing was written)")
        layout = TensorLayout.from_tensors(start)
        parsed = parse_codec(codec, numel=layout.numel, chunk_elems=chunk_elems)  # raises before any write
        backend_cls = backend_class(backend)
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path)
        lock.acquire()
        try:
            start_crc = _save_snapshot(path / "start.safetensors", start)
            backend_cls.create(path / "deltas", parsed.streams(), durable=durable)
            meta = {"format": "deltastore", "version": FORMAT_VERSION, "layout": layout.to_json(),
                    "codec": parsed.name, "chunk_elems": chunk_elems, "backend": backend, "durable": durable,
                    "start_crc32c": start_crc, "created": time.time(), "attrs": attrs or {}}
            atomic_write_json(path / "store.json", meta, durable=durable)
            commit = {"steps": 0, "log_bytes": 0, "status": RECORDING}
            atomic_write_json(path / "commit.json", commit, durable=durable)
        except BaseException:
            lock.release()
            shutil.rmtree(path, ignore_errors=True)
            raise
        lock.release()
        return cls(path, meta, commit, writable=True)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> DeltaStore:
        """Open an existing store; ``writable=True`` continues recording after the last committed step."""
        path = Path(path)
        if not (path / "store.json").is_file():
            hint = " (it does not exist)" if not path.exists() else ""
            raise StoreNotFoundError(f"{path} is not a delta store or run directory{hint}: store.json is missing. "
                                     "Pass the directory given to the Recorder or to `amnesiac train --run`.")
        meta = read_json(path / "store.json", "store metadata")
        _check_meta(meta, path)
        store = cls(path, meta, _read_commit(path), writable=writable)
        if writable and store.complete:
            store.close()
            raise ReadOnlyError(f"{path} holds a complete run; it cannot be recorded into again")
        return store

    def refresh(self) -> None:
        """Re-read the commit file (a reader following a live writer sees the newest committed prefix)."""
        self._commit, self._table = _read_commit(self.path), None

    # ---------------------------------------------------------------- properties
    @property
    def num_steps(self) -> int:
        return self._commit["steps"]

    @property
    def status(self) -> str:
        return self._commit["status"]

    @property
    def complete(self) -> bool:
        return self.status == COMPLETE

    @property
    def attrs(self) -> dict:
        return self.meta["attrs"]

    # ---------------------------------------------------------------- writing
    def append(self, streams: Mapping[str, np.ndarray], side: Mapping[str, np.ndarray],
               metadata: Mapping[str, np.ndarray]) -> int:
        """Write one encoded step and commit it with its metadata; returns the step number."""
        if not self.writable:
            raise ReadOnlyError(f"{self.path} was opened for reading; open it with writable=True to append")
        if self.complete:
            raise ReadOnlyError(f"{self.path} is complete; no more steps can be appended")
        step = self.num_steps
        fields = {k: np.asarray(v) for k, v in metadata.items()}
        if any(k.startswith("_") for k in fields):
            raise FormatError("metadata names starting with '_' are reserved for the store")
        fields.update({f"_{k}": np.asarray(v, np.float32) for k, v in side.items()})
        fields.update(self.backend.write_step(step, dict(streams)))
        log_bytes = self._log.append(step, fields)
        self._write_commit({**self._commit, "steps": step + 1, "log_bytes": log_bytes})
        return step

    def append_delta(self, delta: torch.Tensor, metadata: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                     encoder=None) -> int:
        """Encode (with ``encoder``, or a fresh one: no error feedback) and append one flat delta, synchronously."""
        encoder = encoder or self.codec.encoder(delta.device)
        streams, side = encoder.encode(delta.float())
        return self.append({k: _to_numpy(v) for k, v in streams.items()}, {k: _to_numpy(v) for k, v in side.items()},
                           {k: _to_numpy(torch.as_tensor(v)).astype(np.int64) for k, v in (metadata or {}).items()})

    def finalize(self, final: Mapping[str, torch.Tensor], residual: torch.Tensor | None = None) -> None:
        """Save S_T (and a lossy codec's residual), record the codec's error and mark the store complete."""
        if not self.writable:
            raise ReadOnlyError(f"{self.path} was opened for reading")
        self.layout.check(final)
        commit = {**self._commit, "status": COMPLETE, "final_crc32c": _save_snapshot(self.path / "final.safetensors",
                                                                                       final)}
        final_flat = self.layout.flatten({k: v.detach().cpu() for k, v in final.items()})
        moved = (final_flat - self.read_snapshot_flat("start")).norm().item()
        if residual is not None:
            residual = residual.detach().float().cpu()
            commit["residual_crc32c"] = _save_snapshot(self.path / "residual.safetensors", {"residual": residual})
            commit["codec_error"] = residual.norm().item() / moved if moved > 0 else 0.0
        else:
            commit["codec_error"] = 0.0
        self._write_commit(commit)

    def _write_commit(self, commit: dict) -> None:
        atomic_write_json(self.path / "commit.json", commit, durable=self.meta["durable"])
        self._commit, self._table = commit, None

    def close(self) -> None:
        """Release the writer lock and files (idempotent). Committed steps stay; the store stays open for reading."""
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._lock is not None:
            self._lock.release()
        self.writable = False

    def __enter__(self) -> DeltaStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- reading
    def metadata(self) -> dict[str, RaggedField]:
        """Per-step metadata of the committed steps, by field name (store-internal fields left out)."""
        return {k: v for k, v in self._step_table().items() if not k.startswith("_")}

    def _step_table(self) -> dict[str, RaggedField]:
        if self._table is None:
            self._table = read_step_log(self.path / "steps.log", committed_bytes=self._commit["log_bytes"],
                                        num_steps=self.num_steps)
        return self._table

    def side_arrays(self, step: int) -> dict[str, np.ndarray]:
        """The store-internal per-step arrays (codec scales, backend checksums) of ``step``, without the '_'."""
        return {k[1:]: v.of(step) for k, v in self._step_table().items() if k.startswith("_")}

    def read_snapshot(self, which: str) -> dict[str, torch.Tensor]:
        """Load ``start``, ``final`` or ``residual`` after checking its crc32c."""
        key = {"start": None, "final": "final_crc32c", "residual": "residual_crc32c"}[which]
        expected = self.meta["start_crc32c"] if key is None else self._commit.get(key)
        if expected is None:
            raise StoreNotFoundError(f"{self.path} has no {which} state"
                                     + (" yet: the run was not closed (complete)" if which == "final" else ""))
        path = self.path / f"{which}.safetensors"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptionError(f"{path} is missing") from None
        if crc32c(data) != expected:
            raise CorruptionError(f"{path} fails its crc32c checksum: the file was changed or damaged")
        try:
            return safetensors.torch.load(data)
        except Exception as e:  # a crc-valid but malformed file: only possible if crafted
            raise FormatError(f"{path} is not a valid safetensors file: {e}") from None

    def read_snapshot_flat(self, which: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if which == "residual":
            if not self.codec.lossy:  # an exact codec leaves nothing behind
                return torch.zeros(self.layout.numel, device=device)
            return self.read_snapshot("residual")["residual"].to(device)
        tensors = self.read_snapshot(which)
        self.layout.check(tensors)
        return self.layout.flatten(tensors, out=torch.empty(self.layout.numel, device=device))

    def read_step(self, step: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """The decoded flat float32 delta of one committed step."""
        return self.sum_steps([step], device=device)

    def check_steps(self, steps: Iterable[int]) -> np.ndarray:
        """Sorted unique int64 steps; raises :class:`StepSelectionError` for any step not committed."""
        arr = np.unique(np.asarray(list(steps) if not isinstance(steps, np.ndarray) else steps, dtype=np.int64))
        bad = arr[(arr < 0) | (arr >= self.num_steps)]
        if bad.size:
            raise StepSelectionError(f"steps {bad[:5].tolist()} are not committed steps; the store has "
                                     f"{self.num_steps} (numbered 0..{self.num_steps - 1})")
        return arr

    def sum_steps(self, steps: Iterable[int], *, device: str | torch.device = "cpu", **reduce_options) -> torch.Tensor:
        """Sum of the decoded deltas of ``steps`` as one flat float32 tensor on ``device`` (streamed, bounded)."""
        from .reduce import reduce_steps
        return reduce_steps(self, self.check_steps(steps), device=torch.device(device), **reduce_options).total

    def state_without(self, steps: Iterable[int], *, device: str | torch.device = "cpu",
                      **reduce_options) -> torch.Tensor:
        """The flat state at the last committed step with ``steps`` undone.

        Picks the cheaper plan: S_T minus the selected steps, or S_0 (+ residual) plus the other steps. A store
        that was not finalized (a crash) can only take the second path: it gives the state at its last commit.
        """
        from .reduce import plan_unlearning, run_plan
        return run_plan(self, plan_unlearning(self, self.check_steps(steps)), device=torch.device(device),
                        **reduce_options).total

    # ---------------------------------------------------------------- reporting
    def info(self) -> dict:
        bytes_on_disk = directory_bytes(self.path)
        raw = self.num_steps * self.layout.numel * 4
        delta_bytes = directory_bytes(self.path / "deltas")
        return {"path": str(self.path), "format_version": self.meta["version"], "status": self.status,
                "steps": self.num_steps, "codec": self.codec.name, "lossy": self.codec.lossy,
                "backend": self.meta["backend"], "tensors": len(self.layout.entries), "elements": self.layout.numel,
                "chunk_elems": self.codec.chunk_elems, "bytes_on_disk": bytes_on_disk, "delta_bytes": delta_bytes,
                "raw_fp32_bytes": raw, "ratio": (delta_bytes / raw) if raw else math.nan,
                "codec_error": self._commit.get("codec_error"), "attrs": self.attrs}


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def _save_snapshot(path: Path, tensors: Mapping[str, torch.Tensor]) -> int:
    """Save tensors with safetensors (no pickle) and return the file's crc32c."""
    data = safetensors.torch.save({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()})
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    return crc32c(data)


def _check_meta(meta: dict, path: Path) -> None:
    if meta.get("format") != "deltastore" or not isinstance(meta.get("version"), int):
        raise FormatError(f"{path}/store.json is not a deltastore metadata file")
    if meta["version"] > FORMAT_VERSION:
        raise FormatError(f"{path} was written in format version {meta['version']}; this deltastore reads up to "
                          f"{FORMAT_VERSION}. Upgrade the package to read it.")
    required = {"layout": list, "codec": str, "chunk_elems": int, "backend": str, "durable": bool,
                "start_crc32c": int, "attrs": dict}
    for key, kind in required.items():
        if not isinstance(meta.get(key), kind):
            raise FormatError(f"{path}/store.json: field {key!r} is missing or not a {kind.__name__}")
    if not 1 <= meta["chunk_elems"] <= 1 << 28:
        raise FormatError(f"{path}/store.json: chunk_elems out of range")


def _read_commit(path: Path) -> dict:
    try:
        commit = read_json(path / "commit.json", "commit file")
    except FileNotFoundError:
        raise CorruptionError(f"{path}/commit.json is missing: the store cannot tell which steps are committed") from None
    ok = (isinstance(commit.get("steps"), int) and commit["steps"] >= 0 and isinstance(commit.get("log_bytes"), int)
          and commit["log_bytes"] >= 0 and commit.get("status") in (RECORDING, COMPLETE))
    if not ok:
        raise FormatError(f"{path}/commit.json is malformed")
    return commit
