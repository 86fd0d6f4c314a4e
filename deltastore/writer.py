"""The asynchronous write pipeline: the training thread hands encoded steps over, piece by piece; a writer thread
stores them.

A step travels in *pieces*: runs of whole data chunks ``[c0, c1)`` whose encoded streams and per-chunk side arrays
fit one buffer of a fixed :class:`~deltastore.hostpool.HostBufferPool` (cut from one host allocation, pinned on
CUDA). Call order per step: :meth:`submit_piece` for chunks ``0..`` in order, then :meth:`end_step` with the step's
metadata; or :meth:`submit` for a whole step at once (it cuts the pieces itself). :meth:`flush` waits for everything
submitted; :meth:`close` once at the end. So the host memory in flight is the pool, whatever the model size.

On CUDA each piece is copied into its buffer on a side stream (after that stream waits for the training stream) and
the buffer's event is recorded; the writer thread, which sets its device first (a DDP rank on ``cuda:N`` never
touches ``cuda:0``), sleeps on that blocking event, then hands the piece to the store, which compresses and appends
it to the step's files; the store commits the step when its metadata arrives. When every buffer is busy, the
training thread waits: memory is bounded and no step is ever dropped. Without CUDA the same pipeline runs over
ordinary host memory with synchronous copies.

Failures: a piece that cannot be taken (wrong shape, a failed copy) gives its buffer back and abandons its step (the
writer thread discards the pieces already sent; the step number is not used), so nothing leaks and a later call,
``close`` included, never blocks on a lost buffer. An exception in the writer thread is kept and raised once, as
:class:`WriterError` naming the step, on the training thread at the next call; steps after the failed one are not
written (their numbers would shift), and every later call, ``close`` included, says so.

``stats`` counts where the time goes (seconds the training thread waited for a free buffer or copied into one,
seconds the writer thread spent storing): the recording benchmark reports them.

Example:
    >>> import tempfile, numpy as np, torch
    >>> from deltastore import DeltaStore
    >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(6)}, chunk_elems=2, durable=False)
    >>> writer = AsyncStepWriter(store, piece_bytes=8)   # pieces of one 2-element chunk: three per step
    >>> writer.chunks_per_piece, writer.pieces_per_step
    (1, 3)
    >>> writer.submit({"data": torch.arange(6.0)}, {}, {"ids": np.array([7])})
    0
    >>> writer.close(); store.read_step(0).tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
"""

from __future__ import annotations

import functools
import math
import queue
import threading
import time
from collections.abc import Mapping

import numpy as np
import torch

from .errors import DeltaStoreError, WriterError
from .hostpool import HostBufferPool, align

DEFAULT_BUFFER_BYTES = 512 << 20  # the pinned pool's budget on a GPU (issue 15: at most 1 GiB)
CPU_BUFFER_BYTES = 48 << 20  # on the CPU the copy is synchronous: three 16 MiB pieces absorb the writer's jitter
DEFAULT_PIECE_BYTES = 32 << 20  # encoded bytes per piece: big enough for blosc's threads, small against any model


@functools.lru_cache(maxsize=None)
def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype a stream of numpy dtype ``name`` travels as (unsigned 16/32-bit types as their signed
    bit patterns: torch cannot copy those on every device)."""
    carrier = {"uint16": "int16", "uint32": "int32"}.get(name, name)
    return torch.from_numpy(np.empty(0, carrier)).dtype


class AsyncStepWriter:
    """Writes encoded steps to ``store`` on a background thread, through a fixed pool of host buffers.

    Args:
        store: a :class:`~deltastore.DeltaStore` opened for writing (or anything with ``codec``, ``num_steps`` and
            ``append``; ``begin_step`` when it can take a step piece by piece).
        device: where the encoded tensors live; ``cuda`` copies them on a side stream into pinned buffers.
        slots: number of pool buffers (default: from ``max_buffer_bytes``, at least 2).
        max_buffer_bytes: budget for the pool (on the CPU at most :data:`CPU_BUFFER_BYTES` is used by default).
        pin: page-lock the pool (default: on CUDA).
        piece_bytes: encoded bytes per piece (rounded to whole data chunks, at least one chunk).
        piece_chunks: data chunks per piece instead (what a caller cutting its own pieces passes).
    """

    def __init__(self, store, *, device: torch.device | str = "cpu", slots: int | None = None,
                 max_buffer_bytes: int = DEFAULT_BUFFER_BYTES, pin: bool | None = None,
                 piece_bytes: int = DEFAULT_PIECE_BYTES, piece_chunks: int | None = None):
        self.store, self.device = store, torch.device(device)
        codec = store.codec
        self._cuda = self.device.type == "cuda"
        pin = self._cuda if pin is None else pin
        if pin and not torch.cuda.is_available():
            raise DeltaStoreError("pinned host memory needs a CUDA build with a GPU; pass pin=False")
        self._specs = codec.streams()
        self._num_chunks = codec.num_chunks
        sides = codec.side_arrays()
        if any(n != self._num_chunks for n in sides.values()):
            raise DeltaStoreError(f"side arrays must hold one value per data chunk, got {sides}")
        self._side_names = tuple(sides)
        chunk_bytes = sum(s.per_chunk * np.dtype(s.dtype).itemsize for s in self._specs) + 4 * len(sides)
        per = piece_chunks if piece_chunks is not None else piece_bytes // max(1, chunk_bytes)
        self.chunks_per_piece = max(1, min(self._num_chunks, per))
        self.pieces_per_step = math.ceil(self._num_chunks / self.chunks_per_piece)
        buffer_bytes = max(self._piece_bytes(c0, min(c0 + self.chunks_per_piece, self._num_chunks))
                           for c0 in range(0, self._num_chunks, self.chunks_per_piece))
        step_bytes = codec.stored_bytes_per_step() + 4 * sum(sides.values())
        # on a GPU more buffers absorb bursts while copies overlap compute; on the CPU the copy is synchronous and
        # the trainer was measured never to wait with 3 whole steps (benchmarks/RECORD.md)
        most_steps = 8 if self._cuda else 3
        budget = max_buffer_bytes if (self._cuda or max_buffer_bytes != DEFAULT_BUFFER_BYTES) else CPU_BUFFER_BYTES
        count = slots if slots is not None else max(2, min(most_steps * self.pieces_per_step,
                                                          budget // max(1, buffer_bytes)))
        if count < 1:
            raise ValueError("slots must be at least 1")
        self._pool = HostBufferPool(count, buffer_bytes, pin=pin)
        self.num_slots, self.slot_bytes, self.step_bytes = self._pool.count, self._pool.buffer_bytes, step_bytes
        self._work: queue.Queue = queue.Queue()
        self._copy_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._last_copy = None
        self._error: tuple[int, BaseException] | None = None
        self._error_raised = False
        self._next_step = store.num_steps
        self._open_chunk: int | None = None  # the next chunk of the step being submitted (None between steps)
        self._closed = False
        self._assembly: dict[str, np.ndarray] | None = None  # whole-step arrays, for stores without begin_step
        self.stats = {"steps_submitted": 0, "steps_written": 0, "pieces_written": 0, "submit_wait_s": 0.0,
                      "fill_s": 0.0, "write_s": 0.0}
        self._thread = threading.Thread(target=self._run, name="deltastore-writer", daemon=True)
        self._thread.start()

    def _piece_layout(self, c0: int, c1: int) -> list[tuple[str, str, int, int]]:
        """``(key, numpy dtype, elements, byte offset)`` of each stream and side array of chunks ``[c0, c1)`` in a
        buffer; every region starts aligned."""
        out, offset = [], 0
        for s in self._specs:
            lo, hi = s.chunk_range(c0, c1)
            out.append((s.name, s.dtype, hi - lo, offset))
            offset += align((hi - lo) * np.dtype(s.dtype).itemsize)
        for name in self._side_names:
            out.append((f"side:{name}", "float32", c1 - c0, offset))
            offset += align(4 * (c1 - c0))
        return out

    def _piece_bytes(self, c0: int, c1: int) -> int:
        layout = self._piece_layout(c0, c1)
        return max(1, layout[-1][3] + align(layout[-1][2] * np.dtype(layout[-1][1]).itemsize)) if layout else 1

    # ------------------------------------------------------------ training thread
    @property
    def pool(self) -> HostBufferPool:
        """The host buffers between the training thread and the writer thread."""
        return self._pool

    def wait_copy_done(self) -> None:
        """Make the current CUDA stream wait until the last submitted piece left the device buffers it read."""
        if self._last_copy is not None:
            torch.cuda.current_stream(self.device).wait_event(self._last_copy)

    def submit(self, streams: Mapping[str, torch.Tensor], side: Mapping[str, torch.Tensor],
               metadata: Mapping[str, np.ndarray]) -> int:
        """Queue one whole encoded step; returns its step number. Blocks while every buffer is busy."""
        self._check_open()
        for s in self._specs:
            t = streams.get(s.name)
            if t is None or t.numel() != s.length:
                raise ValueError(f"stream {s.name!r} must hold {s.length} elements, got "
                                 f"{None if t is None else tuple(t.shape)} (nothing was queued)")
        for name in self._side_names:
            if side.get(name) is None or side[name].numel() != self._num_chunks:
                raise ValueError(f"side array {name!r} must hold {self._num_chunks} values (nothing was queued)")
        flat = {k: v.reshape(-1) for k, v in streams.items()}
        for c0 in range(0, self._num_chunks, self.chunks_per_piece):
            c1 = min(c0 + self.chunks_per_piece, self._num_chunks)
            piece = {}
            for s in self._specs:
                lo, hi = s.chunk_range(c0, c1)
                piece[s.name] = flat[s.name][lo:hi]
            # a failure of the writer thread is raised when the step starts (above), not half-way through it: a
            # whole step is handed over as one operation, as before pieces existed
            self._submit_piece(c0, c1, piece, {k: side[k].reshape(-1)[c0:c1] for k in self._side_names},
                               check=c0 == 0)
        return self._end_step(metadata, check=False)

    def submit_piece(self, c0: int, c1: int, streams: Mapping[str, torch.Tensor],
                     side: Mapping[str, torch.Tensor]):
        """Queue data chunks ``[c0, c1)`` of the current step (pieces in order, at most :attr:`chunks_per_piece`
        chunks each): ``streams`` hold exactly those chunks' stream elements, ``side`` their side values.

        Returns the buffer's copy event on CUDA (the device memory of ``streams`` may be overwritten once the
        training stream waits on it), else None. Any failure abandons the step and raises.
        """
        return self._submit_piece(c0, c1, streams, side, check=True)

    def _submit_piece(self, c0: int, c1: int, streams, side, *, check: bool):
        if check:
            self._check_open()
        elif self._closed:
            raise DeltaStoreError("the writer is closed")
        try:
            expected = 0 if self._open_chunk is None else self._open_chunk
            if c0 != expected or not c0 < c1 <= min(self._num_chunks, c0 + self.chunks_per_piece):
                raise ValueError(f"piece [{c0}, {c1}) out of order: the step's next chunk is {expected}, pieces "
                                 f"hold at most {self.chunks_per_piece} of {self._num_chunks} chunks")
            layout = self._piece_layout(c0, c1)
            sources = []
            for key, _, count, _ in layout:
                t = side.get(key[5:]) if key.startswith("side:") else streams.get(key)
                if t is None or t.numel() != count:
                    raise ValueError(f"{key!r} of chunks [{c0}, {c1}) must hold {count} elements, got "
                                     f"{None if t is None else tuple(t.shape)}")
                sources.append(t.reshape(-1))
            t0 = time.perf_counter()
            index = self._pool.acquire()
            t1 = time.perf_counter()
            queued = False
            try:
                if check:
                    self._raise_pending()  # the writer failed while this thread waited for the buffer
                event = self._fill(index, layout, sources)
                self._work.put(("piece", self._next_step, c0, c1, index))
                queued = True
            finally:
                if not queued:
                    self._pool.release(index)  # never lose a buffer, whatever failed
        except BaseException:
            self._abandon_step()
            raise
        self._open_chunk = c1
        self.stats["submit_wait_s"] += t1 - t0
        self.stats["fill_s"] += time.perf_counter() - t1
        return event

    def end_step(self, metadata: Mapping[str, np.ndarray]) -> int:
        """Close the current step (every chunk submitted) with its metadata; returns its step number."""
        return self._end_step(metadata, check=True)

    def _end_step(self, metadata: Mapping[str, np.ndarray], *, check: bool) -> int:
        if check:
            self._check_open()
        elif self._closed:
            raise DeltaStoreError("the writer is closed")
        if self._open_chunk != self._num_chunks:
            self._abandon_step()
            raise ValueError(f"end_step after chunk {self._open_chunk} of {self._num_chunks}: the step was "
                             "abandoned")
        step = self._next_step
        self._work.put(("end", step, dict(metadata)))
        self._next_step += 1
        self._open_chunk = None
        self.stats["steps_submitted"] += 1
        return step

    def submit_unstored(self, metadata: Mapping[str, np.ndarray]) -> int:
        """Queue a step committed with its metadata but without a delta (selective recording, see
        :meth:`DeltaStore.append`); returns its step number. Takes no buffer."""
        self._check_open()
        if self._open_chunk is not None:
            raise ValueError("a step is half submitted: end it before submitting a step without a delta")
        step = self._next_step
        self._work.put(("unstored", step, dict(metadata)))
        self._next_step += 1
        self.stats["steps_submitted"] += 1
        return step

    def _abandon_step(self) -> None:
        if self._open_chunk is not None:
            self._work.put(("abort", self._next_step))
        self._open_chunk = None

    def _check_open(self) -> None:
        try:
            self._raise_pending()
        except WriterError:
            self._abandon_step()
            raise
        if self._closed:
            raise DeltaStoreError("the writer is closed")

    def _fill(self, index: int, layout, sources: list[torch.Tensor]):
        pool = self._pool

        def copy() -> None:
            for (_, dtype, count, offset), src in zip(layout, sources):
                dst = pool.tensor(index, _torch_dtype(dtype), count, offset)
                if src.dtype != dst.dtype and src.element_size() == dst.element_size():
                    src = src.view(dst.dtype)  # bf16 travels as its raw 16 bits
                dst.copy_(src, non_blocking=True)

        if not self._cuda:
            copy()
            return None
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            copy()
            event = pool.record(index, self._copy_stream)
        # the sources were allocated on the training stream and may be freed when the caller drops them: without
        # this the caching allocator could hand their memory to the next kernel while the side stream still copies
        for t in sources:
            if t.is_cuda:
                t.record_stream(self._copy_stream)
        self._last_copy = event
        return event

    def flush(self) -> None:
        """Wait until every submitted step is committed (or the writer failed), then raise any pending error."""
        self._work.join()
        self._raise_pending()

    def close(self) -> None:
        """Write what was submitted and stop the thread; raises :class:`WriterError` if the writer failed (the
        first time with the original error, on every later call as a reminder that steps are missing). A step
        left half-submitted is abandoned."""
        if not self._closed:
            self._closed = True
            self._abandon_step()
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

    def _raise_pending(self) -> None:
        if self._error is None:
            return
        step, exc = self._error
        if self._error_raised:
            raise WriterError(f"recording stopped after writing step {step} failed ({exc}); steps after it were "
                              "not written. The run keeps every step before it.")
        self._error_raised = True
        raise WriterError(f"writing step {step} failed: {type(exc).__name__}: {exc}. Steps before it are "
                          "committed; this step and later ones are not.") from exc

    # ------------------------------------------------------------ writer thread
    def _run(self) -> None:
        if self._cuda:
            torch.cuda.set_device(self.device)  # else a rank on cuda:N would create a context on cuda:0
        appender, held = None, None  # held: the buffer of a step's last piece, given back once the step is done
        while True:
            item = self._work.get()
            release = []
            try:
                if item is None:
                    release.append(held)
                    if appender is not None:
                        appender.abort()
                    return
                kind, step = item[0], item[1]
                if kind == "unstored":
                    if self._error is None and self.store.append(None, None, item[2]) != step:
                        raise DeltaStoreError(f"step numbering diverged at step {step}")
                    continue
                if kind == "piece":
                    _, _, c0, c1, index = item
                    # the last piece's buffer is kept until the step is committed, so that a training thread with
                    # one buffer cannot run more than one step ahead of the commits (nor miss a failed one)
                    if c1 == self._num_chunks:
                        held = index
                    else:
                        release.append(index)
                    self._pool.synchronize(index)  # the device -> host copy has landed
                    if self._error is None:
                        t0 = time.perf_counter()
                        if appender is None:
                            appender = self._begin_step()
                        arrays = {key: self._pool.array(index, dtype, count, offset)
                                  for key, dtype, count, offset in self._piece_layout(c0, c1)}
                        appender.write(c0, c1, {k: v for k, v in arrays.items() if not k.startswith("side:")},
                                       {k[5:]: v for k, v in arrays.items() if k.startswith("side:")})
                        self.stats["pieces_written"] += 1
                        self.stats["write_s"] += time.perf_counter() - t0
                    continue
                release.append(held)
                held = None
                if kind == "abort":
                    if appender is not None:
                        appender, old = None, appender
                        old.abort()
                elif self._error is None:  # "end"
                    t0 = time.perf_counter()
                    if appender is None:
                        appender = self._begin_step()
                    appender, current = None, appender
                    committed = current.commit(item[2])
                    if committed != step:
                        raise DeltaStoreError(f"step numbering diverged: wrote {committed}, expected {step}")
                    self.stats["steps_written"] += 1
                    self.stats["write_s"] += time.perf_counter() - t0
            except BaseException as exc:  # kept and re-raised on the training thread, never swallowed
                if self._error is None:
                    self._error = (step, exc)
                if appender is not None:
                    appender, old = None, appender
                    try:
                        old.abort()
                    except Exception:  # noqa: BLE001 - the first error is the one reported
                        pass
            finally:
                # buffers go back only after a failure is recorded: a training thread that gets one sees the error
                for index in release:
                    if index is not None:
                        self._pool.release(index)
                self._work.task_done()

    def _begin_step(self):
        begin = getattr(self.store, "begin_step", None)
        if begin is not None:
            return begin()
        if self._assembly is None:
            self._assembly = {s.name: np.empty(s.length, s.dtype) for s in self._specs}
            self._assembly.update({f"side:{k}": np.empty(self._num_chunks, np.float32) for k in self._side_names})
        return _WholeStepAppender(self.store, self._specs, self._assembly)


class _WholeStepAppender:
    """For a store that only appends whole steps: gathers the pieces into one reusable set of arrays."""

    def __init__(self, store, specs, arrays: dict[str, np.ndarray]):
        self.store, self.specs, self.arrays = store, specs, arrays

    def write(self, c0: int, c1: int, streams: Mapping[str, np.ndarray], side: Mapping[str, np.ndarray]) -> None:
        for s in self.specs:
            lo, hi = s.chunk_range(c0, c1)
            self.arrays[s.name][lo:hi] = streams[s.name]
        for k, v in side.items():
            self.arrays[f"side:{k}"][c0:c1] = v

    def commit(self, metadata: Mapping[str, np.ndarray]) -> int:
        streams = {s.name: self.arrays[s.name] for s in self.specs}
        side = {k[5:]: v for k, v in self.arrays.items() if k.startswith("side:")}
        return self.store.append(streams, side, metadata)

    def abort(self) -> None:
        pass
