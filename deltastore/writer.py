"""The asynchronous write pipeline: the training thread hands encoded steps over; a writer thread stores them.

Call order: ``submit`` once per step (from the training thread), ``flush`` to wait for everything submitted,
``close`` once. On CUDA, encoded streams are copied into a ring of pinned host slots on a side stream and an event is
recorded; the writer thread waits on that event, writes the step (zarr compresses chunks in its thread pool; blosc
releases the GIL) and commits it. When every slot is busy, ``submit`` waits: memory is bounded and no step is ever
dropped. Without CUDA the same pipeline runs with plain host slots and synchronous copies.

An exception in the writer is kept and raised once, as :class:`WriterError` naming the step, on the training thread
at the next ``submit``, ``flush`` or ``close``. Steps submitted after the failed one are not written (their numbers
would shift); every later call, ``close`` included, says so rather than dropping steps silently (so a caller that
closes after a failure cannot go on to mark the run complete).

``stats`` counts where the time goes (seconds the training thread waited for a free slot or copied into one,
seconds the writer thread spent storing): the recording benchmark reports them.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Mapping

import numpy as np
import torch

from .errors import DeltaStoreError, WriterError

DEFAULT_BUFFER_BYTES = 512 << 20
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "uint16": torch.int16, "int32": torch.int32}


class AsyncStepWriter:
    def __init__(self, store, *, device: torch.device | str = "cpu", slots: int | None = None,
                 max_buffer_bytes: int = DEFAULT_BUFFER_BYTES, pin: bool | None = None):
        self.store, self.device = store, torch.device(device)
        codec = store.codec
        self._cuda = self.device.type == "cuda"
        pin = self._cuda if pin is None else pin
        if pin and not torch.cuda.is_available():
            raise DeltaStoreError("pinned host memory needs a CUDA build with a GPU; pass pin=False")
        step_bytes = codec.stored_bytes_per_step() + 4 * sum(codec.side_arrays().values())
        # on a GPU more slots absorb bursts while copies overlap compute; on the CPU the copy is synchronous and the
        # trainer was measured never to wait with 3 (benchmarks/RECORD.md), so more would only hold memory
        most = 8 if self._cuda else 3
        n_slots = slots if slots is not None else min(most, max(2, max_buffer_bytes // max(1, step_bytes)))
        if n_slots < 1:
            raise ValueError("slots must be at least 1")
        self.num_slots, self.slot_bytes = n_slots, step_bytes
        self._slots = []
        for _ in range(n_slots):
            slot = {s.name: torch.empty(s.length, dtype=_TORCH_DTYPES[s.dtype], pin_memory=pin)
                    for s in codec.streams()}
            slot.update({f"side:{k}": torch.empty(n, dtype=torch.float32, pin_memory=pin)
                         for k, n in codec.side_arrays().items()})
            self._slots.append(slot)
        self._dtypes = {s.name: np.dtype(s.dtype) for s in codec.streams()}
        self._free: queue.Queue[int] = queue.Queue()
        for i in range(n_slots):
            self._free.put(i)
        self._work: queue.Queue = queue.Queue()
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._last_copy: torch.cuda.Event | None = None
        self._error: tuple[int, BaseException] | None = None
        self._error_raised = False
        self._next_step = store.num_steps
        self._closed = False
        self.stats = {"steps_submitted": 0, "steps_written": 0, "submit_wait_s": 0.0, "fill_s": 0.0, "write_s": 0.0}
        self._thread = threading.Thread(target=self._run, name="deltastore-writer", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ training thread
    def wait_copy_done(self) -> None:
        """Make the current CUDA stream wait until the last submitted step left the device buffers it read."""
        if self._last_copy is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_copy)

    def submit(self, streams: Mapping[str, torch.Tensor], side: Mapping[str, torch.Tensor],
               metadata: Mapping[str, np.ndarray]) -> int:
        """Queue one encoded step; returns its step number. Blocks while every slot is busy."""
        self._raise_pending()
        if self._closed:
            raise DeltaStoreError("the writer is closed")
        t0 = time.perf_counter()
        index = self._free.get()
        t1 = time.perf_counter()
        self._raise_pending(release=index)
        slot = self._slots[index]
        event = None
        if self._cuda:
            self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._copy_stream):
                self._fill(slot, streams, side)
                event = torch.cuda.Event()
                event.record(self._copy_stream)
            # the encoded tensors were allocated on the training stream and are freed when the caller drops them:
            # without this the caching allocator could hand their memory to the next forward pass while the side
            # stream is still copying out of it (a torn copy)
            for t in (*streams.values(), *side.values()):
                if t.is_cuda:
                    t.record_stream(self._copy_stream)
            self._last_copy = event
        else:
            self._fill(slot, streams, side)
        step = self._next_step
        self._next_step += 1
        stats = self.stats
        stats["steps_submitted"] += 1
        stats["submit_wait_s"] += t1 - t0
        stats["fill_s"] += time.perf_counter() - t1
        self._work.put((step, index, event, dict(metadata)))
        return step

    def submit_unstored(self, metadata: Mapping[str, np.ndarray]) -> int:
        """Queue a step committed with its metadata but without a delta (selective recording, see
        :meth:`DeltaStore.append`); returns its step number. Takes no slot."""
        self._raise_pending()
        if self._closed:
            raise DeltaStoreError("the writer is closed")
        step = self._next_step
        self._next_step += 1
        self.stats["steps_submitted"] += 1
        self._work.put((step, None, None, dict(metadata)))
        return step

    @staticmethod
    def _fill(slot: dict[str, torch.Tensor], streams: Mapping[str, torch.Tensor],
              side: Mapping[str, torch.Tensor]) -> None:
        for name, t in streams.items():
            slot[name].copy_(t.view(slot[name].dtype) if t.dtype.itemsize == slot[name].dtype.itemsize else t,
                             non_blocking=True)
        for name, t in side.items():
            slot[f"side:{name}"].copy_(t, non_blocking=True)

    def flush(self) -> None:
        """Wait until every submitted step is committed (or the writer failed), then raise any pending error."""
        self._work.join()
        self._raise_pending()

    def close(self) -> None:
        """Write what was submitted and stop the thread; raises :class:`WriterError` if the writer failed (the
        first time with the original error, on every later call as a reminder that steps are missing)."""
        if not self._closed:
            self._closed = True
            self._work.put(None)
            self._thread.join()
        self._raise_pending()

    @property
    def failed(self) -> bool:
        """True once writing a step failed (the error is raised on the training thread, see :attr:`error`)."""
        return self._error is not None

    @property
    def error(self) -> BaseException | None:
        """The exception that stopped the writer thread, or None."""
        return None if self._error is None else self._error[1]

    @property
    def error_reported(self) -> bool:
        """True once the writer's error was raised to the caller (as :class:`WriterError`) at least once."""
        return self._error_raised

    @property
    def next_step(self) -> int:
        """The number the next submitted step will get (the store's committed steps plus those in flight)."""
        return self._next_step

    def _raise_pending(self, release: int | None = None) -> None:
        if self._error is None:
            return
        if release is not None:
            self._free.put(release)
        step, exc = self._error
        if self._error_raised:
            raise WriterError(f"recording stopped after writing step {step} failed ({exc}); steps after it were "
                              "not written. The run keeps every step before it.")
        self._error_raised = True
        raise WriterError(f"writing step {step} failed: {type(exc).__name__}: {exc}. Steps before it are "
                          "committed; this step and later ones are not.") from exc

    # ------------------------------------------------------------ writer thread
    def _run(self) -> None:
        if self._cuda:  # this thread's CUDA work (event waits) on the recording rank's own GPU, never on cuda:0
            torch.cuda.set_device(self.device)
        while True:
            item = self._work.get()
            if item is None:
                self._work.task_done()
                return
            step, index, event, metadata = item
            try:
                if event is not None:
                    event.synchronize()  # even after a failure: a slot goes back to the ring only once copied into
                if self._error is None and index is None:
                    if self.store.append(None, None, metadata) != step:
                        raise DeltaStoreError(f"step numbering diverged at step {step}")
                elif self._error is None:
                    t0 = time.perf_counter()
                    slot = self._slots[index]
                    streams = {k: slot[k].numpy().view(dt) for k, dt in self._dtypes.items()}
                    side = {k[5:]: v.numpy() for k, v in slot.items() if k.startswith("side:")}
                    committed = self.store.append(streams, side, metadata)
                    if committed != step:
                        raise DeltaStoreError(f"step numbering diverged: wrote {committed}, expected {step}")
                    self.stats["steps_written"] += 1
                    self.stats["write_s"] += time.perf_counter() - t0
            except BaseException as exc:  # kept and re-raised on the training thread, never swallowed
                if self._error is None:
                    self._error = (step, exc)
            finally:
                if index is not None:
                    self._free.put(index)
                self._work.task_done()
