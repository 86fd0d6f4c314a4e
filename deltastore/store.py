"""The delta store: numbered steps of one flat float32 vector, plus whole-state snapshots and per-step metadata.

Directory layout (format version 2; version 1, without the self-checksums, is still read)::

    store.json          written once: format, layout, codec, chunk size, backend, crc32c and size of
                        start.safetensors, crc32c of each backend metadata file, and its own crc32c
    commit.json         replaced atomically after each step: committed steps, committed step-log bytes, status,
                        crc32c and size of final/residual, and its own crc32c
    start.safetensors   S_0: every tensor given at creation (floating or not)
    final.safetensors   S_T, written by finalize()
    residual.safetensors  lossy codecs only: the error-feedback residual left at finalize()
    steps.log           per-step metadata records (see steplog.py), checksummed
    deltas/             the encoded steps (see backends.py)
    writer.lock         present while a writer has the store open

Commit protocol for step ``t``: write the step's streams whole (fsync), append its step-log record (fsync), then
replace ``commit.json`` (temp file, fsync, rename). A crash before the rename leaves step ``t`` invisible; after it,
step ``t`` and its metadata are both there. Readers only ever look at what ``commit.json`` says is committed.

Integrity: every byte a reader uses is covered by a checksum (see docs/reliability.md): store.json and commit.json
carry their own crc32c, snapshots theirs (in those files), step-log records theirs, and the backend checks its
chunks. Opening refuses symbolic links and special files anywhere in the directory and bounds every size by the
files actually present, so a crafted directory gets one :class:`DeltaStoreError`, never a hang or a huge allocation.

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
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .backends import backend_class, directory_bytes
from .codecs import Codec, parse_codec
from .devices import resolve_device
from .errors import (CorruptionError, DeltaStoreError, FormatError, InvalidArgumentError, LayoutMismatchError,
                     ReadOnlyError, StepSelectionError, StoreExistsError, StoreNotFoundError)
from .generation import data_dir, generation_fields, generation_of, remove_stale, write_attachment
from .fileio import atomic_write_json, check_tree, json_crc32c, read_json
from .layout import TensorLayout
from .lock import WriterLock
from .snapshots import PIECE_BYTES, SnapshotFile, flat_into, write_snapshot
from .steplog import RaggedField, StepLogWriter, read_step_log, record_ends
from .validation import (COMPLETE, FORMAT_VERSION, MAX_CHUNK_ELEMS, RECORDING, _backend_meta_crcs, _check_backend_meta,
                         _check_meta, _check_start_fits, _read_commit, _sealed)

DEFAULT_CHUNK_ELEMS = 1 << 20  # 4 MiB of float32 per chunk
MIN_PADDED_CHUNK = 1 << 17
UNSTORED_FIELD = "_unstored"  # step-log field present (one element) on a step committed without its delta


class DeltaStore:
    """A delta store opened for reading (:meth:`open`) or writing (:meth:`create`, :meth:`open` with
    ``writable=True`` to resume)."""

    def __init__(self, path: Path, meta: dict, commit: dict, *, writable: bool, lock: WriterLock | None = None):
        self.path, self.meta, self._commit = Path(path), meta, commit
        self.layout = TensorLayout.from_json(meta["layout"])
        self.codec: Codec = parse_codec(meta["codec"], numel=self.layout.numel, chunk_elems=meta["chunk_elems"])
        _check_start_fits(self.path, meta, self.layout)
        _check_backend_meta(self.path, meta, commit, self.codec.streams())
        self.writable = writable
        self._lock = (lock or WriterLock(self.path)) if writable else None
        self._log: StepLogWriter | None = None
        self._table: dict[str, RaggedField] | None = None
        if writable and not self._lock.held:
            self._lock.acquire()
        try:
            self.backend = self._open_backend()
            if writable:
                self._log = StepLogWriter(self.data_dir / "steps.log", committed_bytes=commit["log_bytes"],
                                          durable=meta["durable"])
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _open_backend(self):
        try:
            backend = backend_class(self.meta["backend"])(self.data_dir / "deltas", self.codec.streams(),
                                                          durable=self.meta["durable"])
        except DeltaStoreError:
            raise
        except Exception as e:  # zarr reports malformed array metadata with assorted built-in errors
            raise FormatError(f"{self.path}/deltas cannot be opened ({type(e).__name__}: {str(e)[:300]})") from None
        return backend

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
        if type(chunk_elems) is not int or not 1 <= chunk_elems <= MAX_CHUNK_ELEMS:
            raise InvalidArgumentError(f"chunk_elems must be an integer from 1 to {MAX_CHUNK_ELEMS}, not "
                                       f"{chunk_elems!r} (nothing was written)")
        # a small model's vector is not padded to 2**20 elements (that compressed 4 MiB, mostly zeros, every step),
        # but to at least 2**17: then each byte plane of blosc's shuffle fills its own 128 KiB zstd block, and
        # exponent bytes never share an entropy table with mantissa noise (0.65 -> 0.59 of raw fp32 on the digits
        # MLP, benchmarks/README.md)
        chunk_elems = min(chunk_elems, max(layout.numel, MIN_PADDED_CHUNK))
        parsed = parse_codec(codec, numel=layout.numel, chunk_elems=chunk_elems)  # raises before any write
        backend_cls = backend_class(backend)
        path.mkdir(parents=True, exist_ok=True)
        lock = WriterLock(path)
        lock.acquire()
        try:
            start_crc, start_bytes = write_snapshot(path / "start.safetensors", start)
            backend_cls.create(path / "deltas", parsed.streams(), durable=durable)
            meta = {"format": "deltastore", "version": FORMAT_VERSION, "layout": layout.to_json(),
                    "codec": parsed.name, "chunk_elems": chunk_elems, "backend": backend, "durable": durable,
                    "start_crc32c": start_crc, "start_bytes": start_bytes, "created": time.time(),
                    "uid": uuid.uuid4().hex, "attrs": attrs or {},
                    "backend_meta_crc32c": _backend_meta_crcs(path / "deltas", parsed.streams(), backend)}
            meta["crc32c"] = json_crc32c(meta)
            commit = _sealed({"steps": 0, "log_bytes": 0, "status": RECORDING})
            atomic_write_json(path / "commit.json", commit, durable=durable)
            # store.json last: its presence is what makes the directory a store, so a crash during creation
            # leaves a directory that is plainly not a run (never one missing its commit file)
            atomic_write_json(path / "store.json", meta, durable=durable)
        except BaseException:
            lock.release()
            shutil.rmtree(path, ignore_errors=True)
            raise
        return cls(path, meta, commit, writable=True, lock=lock)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False) -> DeltaStore:
        """Open an existing store; ``writable=True`` continues recording after the last committed step."""
        path = Path(path)
        if not (path / "store.json").is_file():
            hint = " (it does not exist)" if not path.exists() else ""
            raise StoreNotFoundError(f"{path} is not a delta store or run directory{hint}: store.json is missing. "
                                     "Pass the directory given to the Recorder or to `amnesiac train --run`.")
        check_tree(path)
        meta = read_json(path / "store.json", "store metadata")
        _check_meta(meta, path)
        store = cls(path, meta, _read_commit(path, meta), writable=writable)
        if writable and store.complete:
            store.close()
            raise ReadOnlyError(f"{path} holds a complete run; it cannot be recorded into again")
        return store

    def refresh(self) -> None:
        """Re-read the commit file (a reader following a live writer sees the newest committed prefix)."""
        commit = _read_commit(self.path, self.meta)
        if commit["steps"] != self.num_steps or generation_of(commit) != generation_of(self._commit):
            _check_backend_meta(self.path, self.meta, commit, self.codec.streams())
            self.backend = self._open_backend()  # the writer may have grown the arrays since they were opened
        self._commit, self._table = commit, None

    @property
    def uid(self) -> str:
        """A random id given at creation (version 1 stores: their creation time), to tell runs apart."""
        return str(self.meta.get("uid", self.meta.get("created")))

    def truncate(self, steps: int) -> None:
        """Forget the committed steps from ``steps`` on (a writer resuming from a checkpoint taken at ``steps``).

        The commit file is replaced first, so a crash here leaves either the old or the shorter run, both sound.
        """
        if not self.writable:
            raise ReadOnlyError(f"{self.path} was opened for reading")
        if not 0 <= steps <= self.num_steps:
            raise StepSelectionError(f"cannot cut the store to {steps} steps: it has {self.num_steps}")
        if steps == self.num_steps:
            return
        ends = record_ends(self.data_dir / "steps.log", committed_bytes=self._commit["log_bytes"],
                           num_steps=self.num_steps)
        log_bytes = ends[steps - 1] if steps else 0
        self._write_commit(_sealed({**generation_fields(self._commit), "steps": steps, "log_bytes": log_bytes,
                                    "status": RECORDING}))
        self._log.rollback(log_bytes)

    # ---------------------------------------------------------------- properties
    @property
    def data_dir(self) -> Path:
        """Where the committed generation's data files live (the directory itself until a rewrite)."""
        return data_dir(self.path, self._commit)

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
    def append(self, streams: Mapping[str, np.ndarray] | None, side: Mapping[str, np.ndarray] | None,
               metadata: Mapping[str, np.ndarray]) -> int:
        """Write one encoded step and commit it with its metadata; returns the step number.

        ``streams=None`` (and ``side=None``) commits a step whose delta is not stored (selective recording): it
        keeps its number and metadata, but it can be neither read nor undone, and ``S_0 + sum(deltas) == S_T`` no
        longer holds for the store (see :attr:`stored_mask`).
        """
        self._check_appendable()
        step = self.num_steps
        if streams is None:
            return self._commit_step(step, metadata, {}, lambda: {UNSTORED_FIELD: np.ones(1, np.int32)})
        return self._commit_step(step, metadata, side, lambda: self.backend.write_step(step, dict(streams)))

    def begin_step(self):
        """Start the next step, to be written piece by piece as the pieces arrive and committed whole at the end
        (a :class:`deltastore.pieces.StepAppender`: ``write(c0, c1, streams, side)`` per piece of data chunks,
        then ``commit(metadata)`` or ``abort()``). Until the commit nothing of the step is visible."""
        from .pieces import StepAppender
        self._check_appendable()
        return StepAppender(self)

    def _check_appendable(self) -> None:
        if not self.writable:
            raise ReadOnlyError(f"{self.path} was opened for reading; open it with writable=True to append")
        if self.complete:
            raise ReadOnlyError(f"{self.path} is complete; no more steps can be appended")

    def _commit_step(self, step: int, metadata: Mapping[str, np.ndarray], side: Mapping[str, np.ndarray],
                     write) -> int:
        """Commit protocol: ``write()`` makes the step's data durable (returning backend fields for the log),
        then the step-log record, then the commit file."""
        if step != self.num_steps:
            raise DeltaStoreError(f"step {step} cannot be committed: the store has {self.num_steps} steps")
        fields = {k: np.asarray(v) for k, v in metadata.items()}
        if any(k.startswith("_") for k in fields):
            raise FormatError("metadata names starting with '_' are reserved for the store")
        fields.update({f"_{k}": np.asarray(v, np.float32) for k, v in side.items()})
        try:
            fields.update(write())
            log_bytes = self._log.append(step, fields)
            self._write_commit(_sealed({**self._commit, "steps": step + 1, "log_bytes": log_bytes}))
        except BaseException:
            # nothing of this step is committed; the log is cut back so that a retry writes a clean record
            self._log.rollback(self._commit["log_bytes"])
            raise
        return step

    def append_delta(self, delta: torch.Tensor, metadata: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                     encoder=None) -> int:
        """Encode (with ``encoder``, or a fresh one: no error feedback) and append one flat delta, synchronously."""
        encoder = encoder or self.codec.encoder(delta.device)
        streams, side = encoder.encode(delta.float())
        return self.append({k: _to_numpy(v) for k, v in streams.items()}, {k: _to_numpy(v) for k, v in side.items()},
                           {k: _to_numpy(torch.as_tensor(v)).astype(np.int64) for k, v in (metadata or {}).items()})

    def finalize(self, final: Mapping[str, torch.Tensor],
                 residual: torch.Tensor | Callable[[int, int], torch.Tensor] | None = None, *,
                 attachments: Mapping[str, bytes] | None = None) -> None:
        """Save S_T (and a lossy codec's residual), record the codec's error and mark the store complete.

        Both are written tensor by tensor (the residual piece by piece: it may be given as a function returning
        its flat elements ``[lo, hi)``), so finalizing holds no extra copy of the state. ``attachments`` (name ->
        bytes) are committed with it (see :mod:`deltastore.generation`).
        """
        if not self.writable:
            raise ReadOnlyError(f"{self.path} was opened for reading")
        self.layout.check(final)
        final_crc, final_bytes = write_snapshot(self.data_dir / "final.safetensors", final)
        commit = {**self._commit, "status": COMPLETE, "final_crc32c": final_crc, "final_bytes": final_bytes}
        moved = math.sqrt(self._moved_squared(final))
        commit["codec_error"] = 0.0
        if residual is not None:
            squares = [0.0]
            n = self.layout.numel
            step = PIECE_BYTES // 4

            def pieces():  # the residual given whole or as a function of a range, written and measured piecewise
                for lo in range(0, n, step):
                    hi = min(lo + step, n)
                    piece = residual(lo, hi) if callable(residual) else residual.reshape(-1)[lo:hi]
                    piece = piece.detach().float().cpu()
                    squares[0] += float(torch.linalg.vector_norm(piece)) ** 2  # no piece-sized temporary
                    yield piece

            commit["residual_crc32c"], commit["residual_bytes"] = write_snapshot(
                self.data_dir / "residual.safetensors", {"residual": (torch.float32, (n,), pieces)})
            commit["codec_error"] = math.sqrt(squares[0]) / moved if moved > 0 else 0.0
        for name, data in (attachments or {}).items():
            commit["attachments"] = {**commit.get("attachments", {}),
                                     name: write_attachment(self.data_dir, name, data, self._commit,
                                                            durable=self.meta["durable"])}
        self._write_commit(_sealed(commit))
        if attachments:
            remove_stale(self.path, self._commit)  # the replaced versions (this writer holds the lock)

    def _moved_squared(self, final: Mapping[str, torch.Tensor]) -> float:
        """``|S_T - S_0|^2`` over the layout's tensors, read and compared piece by piece."""
        total = 0.0
        with self._snapshot_file("start") as start:
            for e in self.layout.entries:
                flat = final[e.name].detach().reshape(-1)
                for a, b in start.ranges(e.name):
                    diff = flat[a:b].float().cpu() - start.read_range(e.name, a, b).float()
                    total += float(torch.linalg.vector_norm(diff)) ** 2
        return total

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
            self._table = read_step_log(self.data_dir / "steps.log", committed_bytes=self._commit["log_bytes"],
                                        num_steps=self.num_steps)
        return self._table

    @property
    def stored_mask(self) -> np.ndarray:
        """One bool per committed step: False for a step committed without its delta (selective recording)."""
        unstored = self._step_table().get(UNSTORED_FIELD)
        if unstored is None:
            return np.ones(self.num_steps, bool)
        return np.diff(unstored.offsets) == 0

    @property
    def selective(self) -> bool:
        """True if some committed step was not stored: only stored steps can be undone, and only from S_T."""
        return UNSTORED_FIELD in self._step_table()

    def check_stored(self, steps: np.ndarray) -> None:
        """Raise :class:`StepSelectionError` naming the steps among ``steps`` (checked, sorted) that were not
        stored."""
        missing = steps[~self.stored_mask[steps]] if steps.size else steps
        if missing.size:
            raise StepSelectionError(f"{missing.size} of the selected steps were not stored (selective recording), "
                                     f"e.g. {missing[:5].tolist()}: they cannot be read or undone")

    def side_arrays(self, step: int) -> dict[str, np.ndarray]:
        """The store-internal per-step arrays (codec scales, backend checksums) of ``step``, without the '_'."""
        side = {k[1:]: v.of(step) for k, v in self._step_table().items() if k.startswith("_")}
        for name, length in self.codec.side_arrays().items():
            arr = side.get(name)
            if arr is None or arr.size != length or arr.dtype != np.float32 or not np.isfinite(arr).all():
                raise CorruptionError(f"the codec's {name!r} values in the step log are missing or malformed; the "
                                      "step cannot be decoded", step=step)
        return side

    def _snapshot_file(self, which: str) -> SnapshotFile:
        """Open ``start``, ``final`` or ``residual`` for reading, after checking its size and crc32c."""
        key = {"start": None, "final": "final", "residual": "residual"}[which]
        # a rewrite that changed the start state (retention) records its checksum in the commit file
        source = self._commit if key is not None or "start_crc32c" in self._commit else self.meta
        expected = source.get(f"{which}_crc32c")
        if expected is None:
            raise StoreNotFoundError(f"{self.path} has no {which} state"
                                     + (" yet: the run was not closed (complete)" if which == "final" else ""))
        snap = SnapshotFile(self.data_dir / f"{which}.safetensors", expected_crc=expected,
                            expected_size=source.get(f"{which}_bytes"), what=f"the {which} state")
        if which == "residual":
            meta = snap.meta()
            if set(meta) != {"residual"} or meta["residual"].numel() != self.layout.numel \
                    or not meta["residual"].is_floating_point():
                snap.close()
                raise FormatError(f"{snap.path} does not hold one residual vector of {self.layout.numel} elements")
        return snap

    def read_snapshot(self, which: str) -> dict[str, torch.Tensor]:
        """Load ``start``, ``final`` or ``residual`` after checking its crc32c (tensor by tensor, no extra copy)."""
        with self._snapshot_file(which) as snap:
            return {name: snap.tensor(name) for name in snap.names()}

    def read_snapshot_flat(self, which: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """A snapshot's floating tensors as one flat float32 vector on ``device``, read piece by piece."""
        device = resolve_device(device)
        if which == "residual" and not self.codec.lossy:  # an exact codec leaves nothing behind
            return torch.zeros(self.layout.numel, device=device)
        out = torch.empty(self.layout.numel, device=device)
        with self._snapshot_file(which) as snap:
            if which == "residual":
                for a, b in snap.ranges("residual"):
                    out[a:b].copy_(snap.read_range("residual", a, b))
                return out
            try:
                self.layout.check(snap.meta())
            except LayoutMismatchError as e:
                raise CorruptionError(f"the {which} state does not match the store's layout: {e}",
                                      path=self.data_dir / f"{which}.safetensors") from None
            return flat_into(snap, self.layout, out)

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
        steps = self.check_steps(steps)
        self.check_stored(steps)
        return reduce_steps(self, steps, device=resolve_device(device), **reduce_options).total

    def state_without(self, steps: Iterable[int], *, device: str | torch.device = "cpu",
                      **reduce_options) -> torch.Tensor:
        """The flat state at the last committed step with ``steps`` undone.

        Picks the cheaper plan: S_T minus the selected steps, or S_0 (+ residual) plus the other steps. A store
        that was not finalized (a crash) can only take the second path: it gives the state at its last commit.
        """
        from .reduce import plan_unlearning, run_plan
        return run_plan(self, plan_unlearning(self, self.check_steps(steps)), device=resolve_device(device),
                        **reduce_options).total

    def locate_damage(self, error: CorruptionError, step: int, c0: int, c1: int) -> CorruptionError:
        """Add what only the store knows to ``error``, met while reading data chunks ``[c0, c1)`` of ``step``: the
        step, the chunks, the tensors they hold (only the failing chunk's, when the backend named it) and the store's
        path. Fields the backend set stay as they are. Returns ``error``, to be re-raised."""
        lo, hi = (error.chunk, error.chunk + 1) if error.chunk is not None and c0 <= error.chunk < c1 else (c0, c1)
        ce = self.codec.chunk_elems
        return error.add_context(step=step, chunks=(c0, c1), store_path=self.path,
                                 tensors=self.layout.tensors_in(lo * ce, min(hi * ce, self.layout.numel)))

    # ---------------------------------------------------------------- reporting
    def info(self) -> dict:
        bytes_on_disk = directory_bytes(self.path)
        stored = int(self.stored_mask.sum())
        raw = stored * self.layout.numel * 4
        delta_bytes = directory_bytes(self.data_dir / "deltas")
        return {"path": str(self.path), "format_version": self.meta["version"], "status": self.status,
                "steps": self.num_steps, "stored_steps": stored, "codec": self.codec.name, "lossy": self.codec.lossy,
                "backend": self.meta["backend"], "tensors": len(self.layout.entries), "elements": self.layout.numel,
                "chunk_elems": self.codec.chunk_elems, "bytes_on_disk": bytes_on_disk, "delta_bytes": delta_bytes,
                "raw_fp32_bytes": raw, "ratio": (delta_bytes / raw) if raw else math.nan,
                "codec_error": self._commit.get("codec_error"), "generation": generation_of(self._commit),
                "folded_steps": self._commit.get("folded_steps", 0), "attrs": self.attrs}

    @property
    def commit_record(self) -> dict:
        """A copy of the commit file's content (steps, log bytes, status, snapshot checksums, codec error)."""
        return dict(self._commit)


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()




def _save_snapshot(path: Path, tensors: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """Save tensors as safetensors (no pickle), atomically and durably, tensor by tensor; return crc32c and size."""
    return write_snapshot(path, tensors, durable=True)
