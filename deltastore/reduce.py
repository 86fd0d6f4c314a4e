"""The reduce core: sum a selection of steps chunk by chunk, with bounded memory, on the CPU or a CUDA device.

Work is cut into tasks of (step, block of data chunks), handed out step by step so each step's file is read front to
back. On the CPU, ``workers`` threads each take a task, read and decode its stream ranges into the thread's own
reusable buffers (file reads, crc32c, blosc and torch's adds all release the GIL) and add the block into the
accumulator under that block's lock, so two threads never add into the same elements at once and nothing is queued:
memory in flight is ``workers`` decoded blocks. For a CUDA device the threads decode into pinned host buffers and
queue them (at most ``max_inflight_bytes``) for the calling thread, which copies them to the device without blocking
and sums there while the threads read on. Either way the accumulator is one flat float32 vector (the size of the
model) and the extra memory does not grow with the number of steps.

Example:
    >>> import tempfile, torch
    >>> from deltastore import DeltaStore
    >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(4)}, durable=False)
    >>> for t in range(4):
    ...     _ = store.append_delta(torch.full((4,), 2.0 ** t))
    >>> reduce_steps(store, store.check_steps([1, 3])).total.tolist()
    [10.0, 10.0, 10.0, 10.0]
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .devices import resolve_device
from .errors import CorruptionError, StepSelectionError

DEFAULT_INFLIGHT_BYTES = 512 << 20
DEFAULT_BLOCK_BYTES = 16 << 20  # small enough that a ResNet-18 gives every thread a block of its own


@dataclass(frozen=True)
class UnlearnPlan:
    """What to read to undo ``undo``: ``base`` state plus ``sign`` times the sum of ``steps``."""

    base: str  # "final" or "start"
    steps: np.ndarray
    sign: float
    add_residual: bool
    undo: np.ndarray


@dataclass
class ReduceResult:
    total: torch.Tensor
    steps_read: int
    encoded_bytes_read: int  # encoded stream bytes before lossless decompression
    raw_fp32_bytes: int  # what the same steps weigh as raw float32
    seconds: float
    plan: UnlearnPlan | None = None


def plan_unlearning(store, undo: np.ndarray) -> UnlearnPlan:
    """Choose the plan that reads fewer steps (only the start path exists for a run that was not finalized).

    A selective store (some steps not stored) has only the first plan, for stored steps of a finalized store:
    :class:`StepSelectionError` otherwise."""
    if store.selective:
        store.check_stored(undo)
        if not store.complete:
            raise StepSelectionError(f"{store.path} was recorded selectively and not finalized: without its final "
                                     "state no step can be undone (the steps not stored are needed to rebuild it)")
        return UnlearnPlan("final", undo, -1.0, False, undo)
    others = np.setdiff1d(np.arange(store.num_steps, dtype=np.int64), undo)
    if store.complete and len(undo) <= len(others):
        return UnlearnPlan("final", undo, -1.0, False, undo)
    has_residual = store.complete and store.codec.lossy
    return UnlearnPlan("start", others, 1.0, has_residual, undo)


def run_plan(store, plan: UnlearnPlan, *, device: torch.device, **options) -> ReduceResult:
    start = time.perf_counter()
    device = resolve_device(device)
    base = store.read_snapshot_flat(plan.base, device)
    if plan.add_residual:
        base += store.read_snapshot_flat("residual", device)
    result = reduce_steps(store, plan.steps, device=device, into=base, sign=plan.sign, **options)
    result.plan, result.seconds = plan, time.perf_counter() - start
    return result


def _blocks(num_chunks: int, chunks_per_block: int) -> list[tuple[int, int]]:
    return [(c, min(c + chunks_per_block, num_chunks)) for c in range(0, num_chunks, chunks_per_block)]


def reduce_steps(store, steps: np.ndarray, *, device: torch.device = torch.device("cpu"),
                 into: torch.Tensor | None = None, sign: float = 1.0, workers: int = 2,
                 max_inflight_bytes: int = DEFAULT_INFLIGHT_BYTES, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 progress: bool = False, pipeline: bool | None = None) -> ReduceResult:
    """Add ``sign`` times the sum of ``steps`` (sorted, committed) into ``into`` (or zeros) and return it.

    ``block_bytes`` (encoded stream bytes per task) and ``max_inflight_bytes`` bound the memory used besides the
    accumulator; ``workers`` is the number of reading threads. ``pipeline`` (default: on CUDA) decodes into a
    fixed pool of host buffers (pinned on CUDA) and sums on the calling thread; on the CPU it exists so that
    tests can run that path without a GPU. A damaged or missing chunk raises
    :class:`CorruptionError` naming the step and the tensors it holds.
    """
    t0 = time.perf_counter()
    device = resolve_device(device)
    codec, backend, n = store.codec, store.backend, store.layout.numel
    acc = into if into is not None else torch.zeros(n, device=device)
    streams = codec.streams()
    chunk_bytes = sum(s.per_chunk * np.dtype(s.dtype).itemsize for s in streams)
    per_block = max(1, block_bytes // max(1, chunk_bytes))
    blocks = _blocks(codec.num_chunks, per_block)
    task_bytes = per_block * chunk_bytes
    depth = max(1, max_inflight_bytes // max(1, task_bytes))
    workers = max(1, min(workers, depth, len(steps) * len(blocks)))
    sizer = getattr(backend, "buffer_elems", None)

    def read(step: int, c0: int, c1: int, alloc):
        with _located(store, step, c0, c1):
            side = store.side_arrays(step)
            data = {}
            for s in streams:
                lo, hi = s.chunk_range(c0, c1)
                need = sizer(s.name, lo, hi) if sizer else hi - lo
                data[s.name] = backend.read_range(step, s.name, lo, hi, side, out=alloc(s, need))
                if data[s.name].size != hi - lo:
                    raise CorruptionError(f"the data file holds {data[s.name].size} elements where {hi - lo} were "
                                          "written", stream=s.name)
        return data, side

    def add(task, data, side) -> int:
        with _located(store, *task):
            return _add(codec, acc, task, data, side, sign)

    tasks = [(int(s), c0, c1) for s in steps for c0, c1 in blocks]
    bar = None
    if progress and tasks:  # no bar for no work: it would only leave "reducing: 0block" behind
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), unit="block", desc="reducing", leave=False)
    try:
        if pipeline if pipeline is not None else device.type == "cuda":
            encoded = _reduce_to_device(codec, acc, tasks, read, add, workers, depth, bar)
            if device.type == "cuda":
                done = torch.cuda.Event(blocking=True)  # sleep until the sums are in, rather than spin a core
                done.record(torch.cuda.current_stream(device))
                done.synchronize()
        else:
            encoded = _reduce_on_cpu(tasks, read, add, workers, len(blocks), bar)
    finally:
        if bar is not None:
            bar.close()
    return ReduceResult(acc, len(steps), encoded, len(steps) * n * 4, time.perf_counter() - t0)


def _reduce_on_cpu(tasks, read, add, workers, num_blocks, bar) -> int:
    """Each thread reads, decodes and adds its tasks itself.

    Tasks go out in step order; a thread adds its block only once the block's earlier steps are in, so every element
    sums its steps in the same order whatever the threads do (the result is bitwise reproducible), and no two threads
    ever add into the same block at once. The earliest unfinished task never waits, so this cannot deadlock.
    """
    block_of = {c0: i for i, c0 in enumerate(sorted({t[1] for t in tasks}))}
    next_task = iter(enumerate(tasks))
    take, turn, stop = threading.Lock(), threading.Condition(), threading.Event()
    added = [0] * num_blocks  # per block: how many of its tasks (in task order) are summed
    rank = {}  # task position -> its rank among its block's tasks
    counts = [0] * num_blocks
    for i, (_, c0, _) in enumerate(tasks):
        rank[i] = counts[block_of[c0]]
        counts[block_of[c0]] += 1

    def work() -> int:
        buffers: dict[str, np.ndarray] = {}

        def alloc(spec, need: int) -> np.ndarray:  # the thread's own buffer, reused once the add is done
            buf = buffers.get(spec.name)
            if buf is None or buf.size < need:
                buf = buffers[spec.name] = np.empty(need, spec.dtype)
            return buf[:need]

        done = 0
        while not stop.is_set():
            with take:
                i, task = next(next_task, (None, None))
            if task is None:
                break
            b = block_of[task[1]]
            try:
                data, side = read(*task, alloc)
                with turn:
                    turn.wait_for(lambda: added[b] == rank[i] or stop.is_set())
                if stop.is_set():
                    break
                done += add(task, data, side)
            except BaseException:
                stop.set()
                with turn:
                    turn.notify_all()
                raise
            with turn:
                added[b] += 1
                turn.notify_all()
            if bar is not None:
                bar.update()
        return done

    if workers == 1:
        return work()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltastore-reduce") as pool:
        futures = [pool.submit(work) for _ in range(workers)]
        return sum(f.result() for f in futures)


def _reduce_to_device(codec, acc, tasks, read, add, workers, depth, bar) -> int:
    """Threads decode into a fixed pool of host buffers; this thread uploads each block and sums it on the device.

    The pool is ``depth + workers`` buffers of one task each, cut from one (pinned) allocation, with one event per
    buffer: after queueing a block's uploads and sums this thread records the buffer's event and gives the buffer
    back; a reading thread that takes it waits on that event first, so a queued copy never reads a refilled buffer.
    Nothing here waits for the device (scales and top-k indices are checked on the host, see
    :meth:`Codec.accumulate`), so reading, decoding and summing overlap.
    """
    from .hostpool import HostBufferPool
    cuda = acc.device.type == "cuda"
    largest = max((_task_buffer_bytes(codec, c0, c1) for _, c0, c1 in tasks), default=1)
    pool = HostBufferPool(depth + workers, largest, pin=cuda)
    stream = torch.cuda.current_stream(acc.device) if cuda else None

    def produce(step: int, c0: int, c1: int):
        index = pool.acquire()
        try:
            regions = iter(_regions(codec, c0, c1))

            def alloc(spec, need: int) -> np.ndarray:
                name, offset = next(regions)
                assert name == spec.name
                return pool.array(index, spec.dtype, need, offset)

            data, side = read(step, c0, c1, alloc)
        except BaseException:
            pool.release(index)
            raise
        return index, (step, c0, c1), data, side

    def consume(future) -> int:
        index, task, data, side = future.result()
        try:
            added = add(task, data, side)
            if cuda:
                pool.record(index, stream)  # the uploads just queued read this buffer
        finally:
            pool.release(index)
        if bar is not None:
            bar.update()
        return added

    encoded = 0
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deltastore-read") as threads:
        pending: deque = deque()
        try:
            for task in tasks:
                pending.append(threads.submit(produce, *task))
                if len(pending) >= depth:
                    encoded += consume(pending.popleft())
            while pending:
                encoded += consume(pending.popleft())
        finally:
            for f in pending:  # give back the buffers of blocks read but never summed (after an error)
                if not f.cancel():
                    try:
                        pool.release(f.result()[0])
                    except BaseException:  # noqa: BLE001 - the first error is the one raised
                        pass
    return encoded


def _regions(codec, c0: int, c1: int) -> list[tuple[str, int]]:
    """Where each stream of block ``[c0, c1)`` goes in a pool buffer: (stream name, byte offset), aligned."""
    from .hostpool import align
    out, offset = [], 0
    for s in codec.streams():
        out.append((s.name, offset))
        offset += align(_stream_buffer_elems(s, c0, c1) * np.dtype(s.dtype).itemsize)
    return out


def _task_buffer_bytes(codec, c0: int, c1: int) -> int:
    from .hostpool import align
    return sum(align(_stream_buffer_elems(s, c0, c1) * np.dtype(s.dtype).itemsize) for s in codec.streams())


def _stream_buffer_elems(spec, c0: int, c1: int) -> int:
    """Elements a reader may need for stream ``spec`` of chunks ``[c0, c1)``: backends decode whole inner chunks
    (``per_chunk`` each), so the range is rounded out to them."""
    lo, hi = spec.chunk_range(c0, c1)
    per = max(1, spec.per_chunk)
    return (-(-hi // per) - lo // per) * per


def _add(codec, acc: torch.Tensor, task, data, side, sign: float) -> int:
    _, c0, c1 = task
    lo, hi = c0 * codec.chunk_elems, min(c1 * codec.chunk_elems, acc.numel())
    codec.accumulate(acc[lo:hi], c0, c1, data, side, sign)
    return sum(v.nbytes for v in data.values())


@contextlib.contextmanager
def _located(store, step: int, c0: int, c1: int):
    """Damage met while reading or adding data chunks ``[c0, c1)`` of ``step`` leaves here naming the step and the
    tensors (only :class:`CorruptionError`: anything else is not damage and passes unchanged)."""
    try:
        yield
    except CorruptionError as e:
        store.locate_damage(e, step, c0, c1)
        raise
