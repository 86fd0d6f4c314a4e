"""Rewriting a run in place, crash-safe: remove steps, fold old steps into the start state, replace attachments.

Two operations of the layer above rest on this: purging the steps that saw samples to forget (their deltas leave
the disk and the final state loses them) and retention (old steps are folded into the start state). The store
knows nothing of samples: the caller says which steps go, and the store keeps ``S_final = S_0 + sum(kept deltas)
(+ residual)`` true, so ``verify`` keeps passing.

Call order::

    with RunRewrite(path) as rw:     # takes the writer lock: a live Recorder makes it fail (StoreLockedError)
        ...                          # read rw.store (the ledger, the states) to decide what to change
        result = rw.commit(drop=steps, fold=(), attachments=...)   # once

Commit protocol (see :mod:`deltastore.generation`): (1) delete what interrupted rewrites left; (2) build the next
generation in ``gen-<N>/``: the new start (``S_0 + sum(fold)``) or final (``S_T - sum(drop)``) snapshot written
new, the step log rewritten with the kept records renumbered, the kept steps' files hard-linked under their new
numbers (copied where links are not possible), unchanged files linked, attachments written; fsync all of it when
the store is durable; (3) replace ``commit.json`` naming generation N: this is the single switch, so a SIGKILL at
any moment leaves the old run or the new one; (4) delete the old generation: the dropped steps' bytes leave the
disk. Readers that opened the run before the switch must open it again.

Step numbering: the kept steps are renumbered ``0..n-1`` in their order, so a rewritten run is an ordinary run
(``num_steps``, step selections and ``verify`` work unchanged); callers that record step numbers (receipts) record
them as numbered before their rewrite. Folded steps' metadata is kept (``folded.log``, read by
:func:`folded_metadata`): the layer above can tell which of its records can no longer be undone.

Example:
    >>> import tempfile, torch
    >>> from deltastore import DeltaStore
    >>> path = tempfile.mkdtemp() + "/s"
    >>> with DeltaStore.create(path, {"w": torch.zeros(2)}, durable=False) as store:
    ...     for t in range(4):
    ...         _ = store.append_delta(torch.full((2,), 10.0 ** t), {"ids": torch.tensor([t])})
    ...     store.finalize({"w": torch.full((2,), 1111.0)})
    >>> with RunRewrite(path) as rw:
    ...     result = rw.commit(drop=[1])
    >>> store = DeltaStore.open(path)
    >>> store.num_steps, store.read_snapshot("final")["w"].tolist(), store.metadata()["ids"].values.tolist()
    (3, [1101.0, 1101.0], [0, 2, 3])
    >>> with RunRewrite(path) as rw:
    ...     result = rw.commit(fold=[0])
    >>> store = DeltaStore.open(path)
    >>> store.num_steps, store.read_snapshot("start")["w"].tolist(), folded_metadata(store)["ids"].values.tolist()
    (2, [1.0, 1.0], [0])
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidArgumentError, ReadOnlyError
from .fileio import atomic_write_bytes, atomic_write_json, crc32c, fsync_dir, read_upto
from .generation import GEN_PREFIX, generation_fields, generation_of, remove_stale, write_attachment
from .lock import WriterLock
from .steplog import _HEADER, _MAGIC, RaggedField, _records, read_step_log
from .store import DeltaStore, _save_snapshot
from .validation import COMPLETE, RECORDING, _sealed

__all__ = ["RewritePlan", "RewriteResult", "RunRewrite", "folded_metadata", "reopen_store"]


@dataclass(frozen=True)
class RewritePlan:
    """What a rewrite is about to commit; handed to an ``attachments`` callable before the switch."""

    generation: int
    steps_before: int
    kept: np.ndarray  # the kept steps, numbered as before the rewrite; kept[i] becomes step i
    dropped: np.ndarray
    folded: np.ndarray
    dropped_bytes: int  # bytes of the dropped steps' files, which leave the disk with the old generation
    final_state: dict[str, torch.Tensor] | None = field(repr=False)  # the new S_T (None for an incomplete run)
    codec: str
    codec_error: float | None


@dataclass(frozen=True)
class RewriteResult:
    """What a committed rewrite did."""

    plan: RewritePlan
    steps_after: int
    bytes_freed: int  # disk bytes released by deleting the old generation (dropped and folded steps' files)
    seconds: float

    def summary(self) -> dict:
        p = self.plan
        return {"generation": p.generation, "steps_before": p.steps_before, "steps_after": self.steps_after,
                "steps_dropped": int(p.dropped.size), "steps_folded": int(p.folded.size),
                "bytes_freed": self.bytes_freed, "seconds": self.seconds}


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # no hard links on this file system (or across devices): a copy is as good, only slower
        shutil.copyfile(src, dst)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def _renumbered_log(path: Path, committed_bytes: int, num_steps: int, keep: np.ndarray, first: int = 0) -> bytes:
    """The records of steps ``keep`` (in order) renumbered ``first, first + 1, ...``; payloads are unchanged."""
    wanted = {int(s): i for i, s in enumerate(keep)}
    parts: list[bytes] = [b""] * len(keep)
    for step, payload, _ in _records(path, committed_bytes, num_steps):
        i = wanted.get(step)
        if i is not None:
            parts[i] = _HEADER.pack(_MAGIC, first + i, len(payload), crc32c(payload)) + bytes(payload)
    return b"".join(parts)


def _committed_prefix(path: Path, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        return read_upto(fd, size)
    finally:
        os.close(fd)


def folded_metadata(store: DeltaStore) -> dict[str, RaggedField]:
    """The metadata of every step folded into the start state (in the order folded), by field; empty if none."""
    commit = store.commit_record
    count = commit.get("folded_steps", 0)
    if not count:
        return {}
    table = read_step_log(store.data_dir / "folded.log", committed_bytes=commit["folded_log_bytes"], num_steps=count)
    return {k: v for k, v in table.items() if not k.startswith("_")}


class RunRewrite:
    """Exclusive access to a store for one rewrite: holds the writer lock from ``__enter__`` to ``__exit__``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = WriterLock(self.path)
        self.store: DeltaStore | None = None
        self._done = False

    def __enter__(self) -> RunRewrite:
        self.store = DeltaStore.open(self.path)  # refuses a directory that is not a store, before any lock file
        self._lock.acquire()
        try:
            # a writer may have committed between the open above and the lock: read the commit file again
            self.store = DeltaStore.open(self.path)
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def clean(self) -> int:
        """Only delete what interrupted rewrites left (no new generation); return the bytes freed."""
        if self.store is None or not self._lock.held:
            raise ReadOnlyError("use RunRewrite as a context manager: cleaning needs the writer lock")
        return remove_stale(self.path, self.store.commit_record)

    def commit(self, *, drop: Iterable[int] = (), fold: Iterable[int] = (),
               attachments: Mapping[str, bytes] | Callable[[RewritePlan], Mapping[str, bytes]] | None = None
               ) -> RewriteResult:
        """Remove ``drop``, fold ``fold`` into the start state, write ``attachments``; switch atomically."""
        if self.store is None or not self._lock.held:
            raise ReadOnlyError("use RunRewrite as a context manager: the rewrite needs the writer lock")
        if self._done:
            raise InvalidArgumentError("one commit per RunRewrite: open a new one for the next rewrite")
        t0 = time.perf_counter()
        store, root = self.store, self.path
        drop, fold = store.check_steps(drop), store.check_steps(fold)
        if np.intersect1d(drop, fold).size:
            raise InvalidArgumentError("a step cannot be both dropped and folded")
        durable = store.meta["durable"]
        old = store.commit_record
        remove_stale(root, old)
        gen = generation_of(old) + 1
        old_dir, new_dir = store.data_dir, root / f"{GEN_PREFIX}{gen}"
        new_dir.mkdir()
        commit = {**{k: v for k, v in old.items() if k != "crc32c"}, "generation": gen}

        # the snapshots: S_0 + sum(fold) and S_T - sum(drop); unchanged ones are linked
        layout = store.layout
        start_flat = store.read_snapshot_flat("start")
        if fold.size:
            start_flat = store.sum_steps(fold) + start_flat  # the same order verify adds them in
            tensors = store.read_snapshot("start")
            commit["start_crc32c"], commit["start_bytes"] = _save_snapshot(
                new_dir / "start.safetensors", {**tensors, **layout.unflatten(start_flat)})
        else:
            _link_or_copy(old_dir / "start.safetensors", new_dir / "start.safetensors")
            source = old if "start_crc32c" in old else store.meta
            commit["start_crc32c"], commit["start_bytes"] = source["start_crc32c"], source["start_bytes"]
        final_state = None
        if store.complete:
            final_state = store.read_snapshot("final")
            if drop.size:
                final_flat = store.state_without(drop)
                final_state = {**final_state, **layout.unflatten(final_flat)}
                commit["final_crc32c"], commit["final_bytes"] = _save_snapshot(new_dir / "final.safetensors",
                                                                               final_state)
            else:
                final_flat = layout.flatten(final_state)
                _link_or_copy(old_dir / "final.safetensors", new_dir / "final.safetensors")
            if "residual_crc32c" in old:
                _link_or_copy(old_dir / "residual.safetensors", new_dir / "residual.safetensors")
                moved = (final_flat - start_flat).norm().item()  # the codec error is relative to this distance
                residual = store.read_snapshot_flat("residual").norm().item()
                commit["codec_error"] = residual / moved if moved > 0 else 0.0

        # the step logs: kept records renumbered; folded records appended to the folded log
        keep = np.setdiff1d(np.arange(store.num_steps, dtype=np.int64), np.union1d(drop, fold))
        log = _renumbered_log(old_dir / "steps.log", old["log_bytes"], store.num_steps, keep)
        atomic_write_bytes(new_dir / "steps.log", log, durable=durable)
        commit["steps"], commit["log_bytes"] = int(keep.size), len(log)
        folded_before = old.get("folded_steps", 0)
        if fold.size or folded_before:
            folded = _committed_prefix(old_dir / "folded.log", old["folded_log_bytes"]) if folded_before else b""
            folded += _renumbered_log(old_dir / "steps.log", old["log_bytes"], store.num_steps, fold, folded_before)
            atomic_write_bytes(new_dir / "folded.log", folded, durable=durable)
            commit["folded_steps"], commit["folded_log_bytes"] = folded_before + int(fold.size), len(folded)

        # the deltas: the backend's description copied, the kept steps' files linked under their new numbers
        backend, old_deltas, new_deltas = store.backend, old_dir / "deltas", new_dir / "deltas"
        new_deltas.mkdir()
        for rel in backend.metadata_files():
            (new_deltas / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(old_deltas / rel, new_deltas / rel)
        for new_step, old_step in enumerate(keep.tolist()):
            for src, dst in zip(backend.step_files(old_step), backend.step_files(new_step), strict=True):
                (new_deltas / dst).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(old_deltas / src, new_deltas / dst)
        dropped_bytes = sum(os.stat(old_deltas / f).st_size for s in drop.tolist() for f in backend.step_files(s))

        plan = RewritePlan(gen, store.num_steps, keep, drop, fold, dropped_bytes, final_state, store.codec.name,
                           commit.get("codec_error"))
        new_files = attachments(plan) if callable(attachments) else (attachments or {})
        entries = dict(old.get("attachments", {}))
        for name, entry in list(entries.items()):
            if name not in new_files:
                _link_or_copy(old_dir / entry["file"], new_dir / entry["file"])
        for name, data in new_files.items():
            entries[name] = write_attachment(new_dir, name, bytes(data), old, durable=durable)
        if entries:
            commit["attachments"] = entries
        if durable:
            _fsync_tree(new_dir)
            fsync_dir(root)

        commit = _sealed(commit)
        atomic_write_json(root / "commit.json", commit, durable=durable)  # the switch
        self._done = True
        freed = remove_stale(root, commit)
        if durable:
            fsync_dir(root)
        self.store = DeltaStore.open(root)
        return RewriteResult(plan, int(keep.size), freed, time.perf_counter() - t0)


def reopen_store(path: str | Path, *, check: Callable[[DeltaStore], None] | None = None
                 ) -> tuple[DeltaStore, torch.Tensor | None]:
    """Open a complete store to record more steps after its last one (a fine-tune after a purge).

    Takes the writer lock, calls ``check(store)`` (which may raise to refuse: nothing is changed then), reads the
    lossy codec's residual, and marks the store recording again (its final state is written anew at
    ``finalize``). Returns the writable store and the residual (None for an exact codec), which the new steps'
    encoder must carry on. An incomplete store is opened for writing as it is.
    """
    path = Path(path)
    DeltaStore.open(path)  # a clear error for a directory that is not a store, before any lock file
    lock = WriterLock(path)
    lock.acquire()
    try:
        store = DeltaStore.open(path)
        if check is not None:
            check(store)
        residual = store.read_snapshot_flat("residual") if store.complete and store.codec.lossy else None
        commit = store.commit_record
        remove_stale(path, commit)
        if commit["status"] == COMPLETE:
            commit = _sealed({**generation_fields(commit), "steps": commit["steps"], "log_bytes": commit["log_bytes"],
                              "status": RECORDING})
            atomic_write_json(path / "commit.json", commit, durable=store.meta["durable"])
        return DeltaStore(path, store.meta, commit, writable=True, lock=lock), residual
    except BaseException:
        lock.release()
        raise

