"""The reduce core: sum a selection of steps chunk by chunk, with bounded memory, on the CPU or a CUDA device.

Work is cut into tasks of (step, block of data chunks), visited step by step so each step's file is read front to
back. A few prefetch threads read and decode-ready the tasks' stream ranges (zarr and blosc release the GIL) while
the calling thread adds the previous blocks into the accumulator on the target device. At most
``max_inflight_bytes`` of encoded data are read ahead, whatever the number of steps; the accumulator itself is one
flat float32 vector (the size of the model).

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

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .errors import CorruptionError, DeltaStoreError

DEFAULT_INFLIGHT_BYTES = 512 << 20
DEFAULT_BLOCK_BYTES = 64 << 20


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
    """Choose the plan that reads fewer steps (only the start path exists for a run that was not finalized)."""
    others = np.setdiff1d(np.arange(store.num_steps, dtype=np.int64), undo)
    if store.complete and len(undo) <= len(others):
        return UnlearnPlan("final", undo, -1.0, False, undo)
    has_residual = store.complete and store.codec.lossy
    return UnlearnPlan("start", others, 1.0, has_residual, undo)


def run_plan(store, plan: UnlearnPlan, *, device: torch.device, **options) -> ReduceResult:
    start = time.perf_counter()
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
                 progress: bool = False) -> ReduceResult:
    """Add ``sign`` times the sum of ``steps`` (sorted, committed) into ``into`` (or zeros) and return it."""
    t0 = time.perf_counter()
    device = torch.device(device)
    codec, backend, n = store.codec, store.backend, store.layout.numel
    acc = into if into is not None else torch.zeros(n, device=device)
    streams = codec.streams()
    chunk_bytes = sum(s.per_chunk * np.dtype(s.dtype).itemsize for s in streams)
    per_block = max(1, block_bytes // max(1, chunk_bytes))
    blocks = _blocks(codec.num_chunks, per_block)
    depth = max(1, max_inflight_bytes // max(1, per_block * chunk_bytes))
    pin = device.type == "cuda"

    def read(step: int, c0: int, c1: int):
        side = store.side_arrays(step)
        try:
            data = {s.name: backend.read_range(step, s.name, *s.chunk_range(c0, c1), side) for s in streams}
        except DeltaStoreError:
            raise
        except Exception as e:  # zarr/blosc report checksum and decode failures as plain exceptions
            tensors = store.layout.tensors_in(c0 * codec.chunk_elems, min(c1 * codec.chunk_elems, n))
            raise CorruptionError(f"step {step}, tensors {_short(tensors)}: stored data is damaged "
                                  f"({type(e).__name__}: {e}). Run `deltastore verify {store.path}`.") from None
        if pin:
            data = {k: torch.from_numpy(np.ascontiguousarray(v)).pin_memory() for k, v in data.items()}
        return step, c0, c1, data, side

    tasks = ((int(s), c0, c1) for s in steps for c0, c1 in blocks)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(steps) * len(blocks), unit="block", desc="reducing", leave=False)
    encoded = 0
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="deltastore-read") as pool:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.submit(read, *task))
            if len(pending) >= depth:
                encoded += _add(codec, acc, pending.popleft().result(), sign)
                bar and bar.update()
        while pending:
            encoded += _add(codec, acc, pending.popleft().result(), sign)
            bar and bar.update()
    if bar is not None:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return ReduceResult(acc, len(steps), encoded, len(steps) * n * 4, time.perf_counter() - t0)


def _add(codec, acc: torch.Tensor, item, sign: float) -> int:
    step, c0, c1, data, side = item
    lo, hi = c0 * codec.chunk_elems, min(c1 * codec.chunk_elems, acc.numel())
    codec.accumulate(acc[lo:hi], c0, c1, data, side, sign)
    return sum(v.nbytes for v in data.values())


def _short(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
