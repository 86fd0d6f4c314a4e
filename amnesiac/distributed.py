"""Recording under ``torch.distributed``: DDP (one writer) and FSDP2 (every rank writes its own shard).

Every rank constructs ``amnesiac.Recorder(model, optimizer, run_dir)`` with the same ``run_dir`` and calls
``add_batch`` with the ids of its own local batch; the Recorder notices the process group and becomes a
:class:`DistributedRecorder`. All coordination goes through the process group itself (``all_gather`` of a few bytes
per optimizer step), never through files:

- The ledger of a step is the union of the ranks' ids (in rank order), gathered inside the optimizer step hook.
- **DDP** (replicated parameters): rank 0 alone writes deltas, snapshots and the ledger, under the unwrapped
  module's names; the other ranks never touch the disk. A run recorded this way is an ordinary run directory.
- **FSDP2** (``fully_shard``: parameters are DTensors sharded along a dimension): each rank records the delta of its
  own local shard into ``run_dir/rank-NNNNN`` (an ordinary delta store) and nothing is gathered while training;
  rank 0 also keeps the ledger, the replicated tensors (buffers) and the description of how the shards go back
  together. ``amnesiac.open_run(run_dir)`` in one process then returns full tensors (see :mod:`amnesiac.sharded`).
- The same step exchange carries a status flag: a writer failure on any rank is raised on every rank at the next
  step (or ``flush`` / ``close``), so no rank is left waiting in a collective. ``flush``, ``checkpoint`` and
  ``close`` are collective: every rank calls them.

Device placement: the collective tensors live on the current CUDA device under NCCL (call
``torch.cuda.set_device(local_rank)`` first, as usual) and on the CPU under gloo; each writing rank's writer thread
works on the device of its own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from deltastore import TensorLayout, WriterError

from .errors import RecorderError, RunExistsError
from .loops import StepTrigger, as_optimizers, check_dtypes, is_sharded, recorded_state, unwrap_model
from .recorder import Recorder
from .sharded import local_description, shard_dir, sharding_attrs

_MAX_MESSAGE = 2000


def resolve_group(process_group="auto"):
    """The process group to record over, or None to record as one process."""
    if process_group is None:
        return None
    if isinstance(process_group, str):
        if process_group != "auto":
            raise RecorderError(f"process_group must be 'auto', None or a ProcessGroup, not {process_group!r}")
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        return dist.group.WORLD
    return process_group if dist.get_world_size(process_group) > 1 else None


def recorder_class(process_group="auto") -> type:
    return Recorder if resolve_group(process_group) is None else DistributedRecorder


class Peers:
    """This rank's side of the byte exchanges the recording needs (two ``all_gather`` calls each)."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's ``data``, in rank order."""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        lengths = [int(s.item()) for s in sizes]
        width = max(lengths)
        if width == 0:
            return [b""] * self.world
        buf = torch.zeros(width, dtype=torch.uint8)
        if data:
            buf[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        buf = buf.to(self.device)
        bufs = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(bufs, buf, group=self.group)
        return [b[:n].cpu().numpy().tobytes() for b, n in zip(bufs, lengths)]

    def agree(self, error: BaseException | None, what: str) -> None:
        """Collective: raise ``error`` on its rank and a matching error on every other rank, if any rank has one."""
        mine = b"" if error is None else (b"W" if isinstance(error, WriterError) else b"E") + \
            f"{type(error).__name__}: {error}".encode()[:_MAX_MESSAGE]
        messages = self.all_gather_bytes(mine)
        if error is not None:
            raise error
        for rank, message in enumerate(messages):
            if message:
                cls = WriterError if message[:1] == b"W" else RecorderError
                raise cls(f"{what} failed on rank {rank} ({message[1:].decode(errors='replace')}); every rank "
                          "stops here. The run keeps its committed steps.")

    def run(self, fn, what: str):
        """Run ``fn`` here, then :meth:`agree` on whether it worked on every rank; returns its result."""
        try:
            result, error = fn(), None
        except Exception as e:  # noqa: BLE001 - handed to every rank, then raised here as it was
            result, error = None, e
        self.agree(error, what)
        return result


def _pack_step(failed: bool, ids: list[np.ndarray], labels: list[np.ndarray]) -> bytes:
    ids_arr = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    has_labels = 1 if labels else 0
    head = np.array([int(failed), ids_arr.size, has_labels], np.int64)
    parts = [head, ids_arr] + ([np.concatenate(labels)] if labels else [])
    return b"".join(p.astype("<i8").tobytes() for p in parts)


def _unpack_step(blob: bytes) -> tuple[bool, np.ndarray, np.ndarray | None]:
    arr = np.frombuffer(blob, "<i8").astype(np.int64)
    failed, n, has_labels = bool(arr[0]), int(arr[1]), bool(arr[2])
    return failed, arr[3:3 + n], (arr[3 + n:3 + 2 * n] if has_labels else None)


class DistributedRecorder(Recorder):
    """The Recorder of one rank of a DDP or FSDP2 job (what ``amnesiac.Recorder`` builds under torch.distributed).

    Takes the Recorder's arguments; ``run_dir`` is the same on every rank. DDP runs can be resumed from a
    checkpoint (every rank passes the same ``resume=True, checkpoint=PATH``); FSDP2 runs cannot yet.
    """

    def __init__(self, model: torch.nn.Module, optimizer, run_dir: str | Path, *, process_group="auto",
                 resume: bool = False, checkpoint: str | Path | None = None, record_on=None, scaler=None,
                 **options):
        self._peers = peers = Peers(resolve_group(process_group))
        self._top_dir = Path(run_dir)
        self._pending_error: BaseException | None = None
        self._trailing_done = False
        self._writer = None
        local = unwrap_model(model).state_dict().values()
        flags = peers.all_gather_bytes(bytes([any(is_sharded(t) for t in local)]))
        if len(set(flags)) != 1:
            raise RecorderError("some ranks hold sharded (FSDP2) parameters and others do not: record the same "
                                "model on every rank")
        self.sharded = flags[0] == b"\x01"
        self._keeps_ledger = peers.rank == 0
        kwargs = dict(resume=resume, checkpoint=checkpoint, record_on=record_on, scaler=scaler,
                      process_group=None, **options)
        if self.sharded:
            if resume or checkpoint is not None:
                raise RecorderError("resuming an FSDP2 run is not supported yet: record into a new directory "
                                    "(checkpoint the model and optimizer with torch.distributed.checkpoint)")
            mine = peers.run(lambda: json.dumps(local_description(unwrap_model(model).state_dict(), peers.rank)),
                             "describing the sharding")
            parts = [json.loads(p) for p in peers.all_gather_bytes(mine.encode())]
            self._sharding = peers.run(lambda: sharding_attrs(parts, peers.rank), "describing the sharding")
            peers.run(lambda: _claim(self._top_dir) if peers.rank == 0 else None, "creating the run directory")
            peers.run(lambda: Recorder.__init__(self, model, optimizer, shard_dir(self._top_dir, peers.rank),
                                                **kwargs), "creating this rank's store")
        elif peers.rank == 0:
            peers.run(lambda: Recorder.__init__(self, model, optimizer, run_dir, **kwargs), "opening the run")
            peers.all_gather_bytes(int(self.steps_submitted).to_bytes(8, "little"))
        else:
            peers.run(lambda: self._follow(model, optimizer, checkpoint, record_on, scaler), "opening the run")
            self._steps = int.from_bytes(peers.all_gather_bytes(b"")[0], "little")

    def _follow(self, model, optimizer, checkpoint, record_on, scaler) -> None:
        """A DDP rank other than 0: the same hooks and checks, no store, no writer, no disk."""
        from .checkpoint import load_checkpoint
        self.model, self.optimizer, self._module = model, optimizer, unwrap_model(model)
        self.epoch, self.store, self._closed = 0, None, False
        self._ids, self._labels = [], []
        if isinstance(checkpoint, dict):  # a position(): the trainer restored the model and optimizer itself
            self.epoch = int(checkpoint.get("epoch", 0))
        elif checkpoint is not None:  # the model and optimizer of every rank go back to the checkpoint's step
            self.epoch = load_checkpoint(checkpoint, self._module, optimizer)["epoch"]
        state = self._state()
        self.layout = TensorLayout.from_tensors(state)
        self._dtypes = {e.name: state[e.name].dtype for e in self.layout.entries}
        self._trigger = StepTrigger(as_optimizers(optimizer), self._record_step, self._drop_pending,
                                    record_on=record_on, scaler=scaler)

    def _more_attrs(self) -> dict:
        return {"sharding": self._sharding} if self.sharded else {}

    def _state(self) -> dict[str, torch.Tensor]:
        """FSDP2: ranks other than 0 record only their shards (rank 0 keeps the replicated tensors)."""
        if not self.sharded or self._peers.rank == 0:
            return recorded_state(self._module)
        full = self._module.state_dict()
        return {k: v for k, v in recorded_state(self._module).items() if is_sharded(full.get(k, v))}

    @property
    def run_dir(self) -> Path:
        return self._top_dir

    @property
    def steps_submitted(self) -> int:
        return self._writer.next_step if self._writer is not None else self._steps

    # ------------------------------------------------------------ one step, on every rank
    def _failed_here(self) -> bool:
        return self._pending_error is not None or (self._writer is not None and self._writer.failed)

    def _raise_failure(self, flags: list[bool], what: str) -> None:
        if self._pending_error is not None:
            raise self._pending_error
        if self._writer is not None and self._writer.failed:
            self._writer.flush()  # raises the writer's own error
        rank = flags.index(True)
        raise WriterError(f"{what}: the writer of rank {rank} failed (rank {rank} raised the details); recording "
                          "stopped on every rank. The run keeps its committed steps.")

    def _record_step(self) -> None:
        check_dtypes(self._state(), self._dtypes, self.steps_submitted)  # same model, same answer on every rank
        parts = [_unpack_step(b) for b in self._peers.all_gather_bytes(
            _pack_step(self._failed_here(), self._ids, self._labels))]
        self._ids, self._labels = [], []
        flags = [p[0] for p in parts]
        if any(flags):
            self._raise_failure(flags, f"step {self.steps_submitted}")
        with_labels = {p[2] is not None for p in parts if p[1].size}
        if len(with_labels) > 1:
            raise RecorderError("some ranks gave labels to add_batch and others did not: give them on every rank "
                                "(or on none)")
        if self._writer is None:  # a DDP rank other than 0
            self._steps += 1
            return
        if self._keeps_ledger:
            self._ids = [p[1] for p in parts]
            self._labels = [p[2] for p in parts if p[2] is not None] if True in with_labels else []
        try:
            super()._record_step()
        except WriterError as e:  # raised on every rank at the next exchange, so that no rank waits in it
            self._pending_error = e

    def _record_trailing_change(self) -> None:
        """A change after the last optimizer step is recorded as one more step: by rank 0 alone under DDP, by
        every rank (its shard, maybe unchanged) under FSDP2 if any shard changed, so all stores count the same."""
        if self._trailing_done:
            return
        if not self.sharded:
            if self._writer is not None:
                super()._record_trailing_change()
            return
        failed = self._failed_here()
        now = None if failed else self.layout.flatten(self._state(), out=torch.empty_like(self._prev))
        changed = now is not None and not torch.equal(now, self._prev)
        flags = self._peers.all_gather_bytes(bytes([int(failed), int(changed)]))
        if any(f[0] for f in flags) or not any(f[1] for f in flags):
            return
        try:
            self._submit_change(now)
        except WriterError as e:
            self._pending_error = e

    # ------------------------------------------------------------ collective calls
    def flush(self) -> None:
        """Collective: wait until every rank's recorded steps are committed; a failure is raised on every rank."""
        error = self._pending_error
        if error is None and self._writer is not None:
            try:
                self._writer.flush()
            except WriterError as e:
                error = e
        self._peers.agree(error, "flushing the recording")

    def checkpoint(self, path: str | Path) -> int:
        """Collective (DDP): rank 0 writes the checkpoint; every rank returns the step it was taken at."""
        if self.sharded:
            raise RecorderError("Recorder.checkpoint is not supported under FSDP2 yet; save the model and optimizer "
                                "with torch.distributed.checkpoint")
        if self._closed:
            raise RecorderError("the Recorder is closed")
        step = self._peers.run(lambda: super(DistributedRecorder, self).checkpoint(path)
                               if self._writer is not None else None, "taking a checkpoint")
        got = self._peers.all_gather_bytes(b"" if step is None else int(step).to_bytes(8, "little"))[0]
        return int.from_bytes(got, "little")

    def position(self) -> dict:
        """Not collective. Rank 0's position is the one trainers save (and pass to every rank when resuming); the
        other DDP ranks have none and return ``{}``."""
        if self.sharded:
            raise RecorderError("resuming an FSDP2 run is not supported yet, so it has no recording position")
        if self._writer is None:
            return {}
        return super().position()

    def close(self, *, finalize: bool = True) -> None:
        """Collective: flush, finalize (rank 0 / every shard), release; an error on any rank is raised on all."""
        if self._closed:
            return
        error = None
        if finalize:
            try:
                self._record_trailing_change()
            except Exception as e:  # noqa: BLE001 - agreed on below
                error = e
        self._trailing_done = True
        error = error or self._pending_error
        everywhere_ok = all(f == b"\x01" for f in self._peers.all_gather_bytes(
            bytes([int(error is None and not self._failed_here())])))
        if self._writer is not None:
            try:
                super().close(finalize=finalize and everywhere_ok)
            except Exception as e:  # noqa: BLE001
                error = error or e
        else:
            self._closed = True
            self._trigger.remove()
        if not everywhere_ok and error is None and finalize:
            error = RecorderError("the run was not finalized because another rank failed")
        self._peers.agree(error, "closing the run")


def _claim(run_dir: Path) -> None:
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunExistsError(f"{run_dir} already holds files; choose a new directory or delete it first "
                             "(nothing was written)")
    run_dir.mkdir(parents=True, exist_ok=True)
