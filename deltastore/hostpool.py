"""A fixed pool of equal host buffers cut from one allocation, with one CUDA event per buffer.

Both directions of the GPU path stage data in host memory: the writer copies encoded pieces device -> host, the
device reduce copies decoded blocks host -> device. Either way a buffer may be handed out again only once the copy
that used it has run. Keying that on the buffer's pointer breaks as soon as a view has an offset, and the caching
host allocator rounds every pinned block up to a power of two; so the pool allocates once, cuts that block into
``count`` buffers (plain slices of the one tensor: they stay pinned) and keeps, per buffer, the event of the last
copy that touched it. :meth:`acquire` waits on that event before handing the buffer out; :meth:`record` is called
right after queueing a copy. The events are *blocking* (``torch.cuda.Event(blocking=True)``): a waiting thread
sleeps instead of spinning a core that compression needs.

Without a GPU (``pin=False``) the same bookkeeping runs over ordinary memory and :meth:`record` is never needed.

Example:
    >>> pool = HostBufferPool(2, 1000)
    >>> i = pool.acquire()
    >>> view = pool.tensor(i, torch.float32, 10)
    >>> view.fill_(1.5).sum().item(), pool.buffer_bytes, pool.free_count
    (15.0, 1024, 1)
    >>> pool.release(i); pool.free_count
    2
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch

ALIGN = 64  # every buffer, and every typed region a caller places in one, starts at a multiple of this


def align(nbytes: int) -> int:
    """``nbytes`` rounded up to a multiple of :data:`ALIGN`."""
    return -(-nbytes // ALIGN) * ALIGN


class PoolTimeout(TimeoutError):
    """:meth:`HostBufferPool.acquire` gave up waiting for a free buffer."""


class HostBufferPool:
    """``count`` host buffers of ``buffer_bytes`` each (rounded up to :data:`ALIGN`), from one allocation.

    Args:
        count: number of buffers (at least 1).
        buffer_bytes: bytes per buffer.
        pin: page-lock the allocation (needs CUDA). A pinned pool takes whatever power of two the caching host
            allocator rounds the block up to and cuts that many buffers, so no rounded-up memory is held unused.
    """

    def __init__(self, count: int, buffer_bytes: int, *, pin: bool = False):
        if count < 1 or buffer_bytes < 1:
            raise ValueError("a pool needs at least one buffer of at least one byte")
        size = align(buffer_bytes)
        total = count * size
        if pin:
            rounded = 1 << max(0, (total - 1).bit_length())  # what the caching host allocator reserves anyway
            count, total = rounded // size, rounded // size * size
        self.buffer_bytes, self.count, self.pinned = size, count, pin
        self._base = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        self._buffers = [self._base[i * size:(i + 1) * size] for i in range(count)]
        self._events: list = [None] * count
        self._free = list(range(count - 1, -1, -1))  # a stack: the most recently used buffer is warm in cache
        self._held: set[int] = set()
        self._cond = threading.Condition()

    @property
    def total_bytes(self) -> int:
        return self._base.numel()

    @property
    def free_count(self) -> int:
        with self._cond:
            return len(self._free)

    def acquire(self, timeout: float | None = None) -> int:
        """Take a free buffer (blocking while none is free); its last copy has completed when this returns.

        Raises :class:`PoolTimeout` after ``timeout`` seconds without a free buffer.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._free:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolTimeout(f"no free host buffer within {timeout} s (all {self.count} in use)")
                self._cond.wait(left)
            index = self._free.pop()
            self._held.add(index)
        event = self._events[index]
        if event is not None:
            event.synchronize()  # a host -> device copy out of this buffer may still be queued
        return index

    def release(self, index: int) -> None:
        """Give a buffer back. Releasing a buffer that is not held is a bookkeeping bug: it raises."""
        with self._cond:
            if index not in self._held:
                raise RuntimeError(f"host buffer {index} released twice or never acquired")
            self._held.remove(index)
            self._free.append(index)
            self._cond.notify()

    def record(self, index: int, stream) -> object:
        """Record buffer ``index``'s event on ``stream`` after queueing a copy that reads or writes it."""
        event = self._events[index]
        if event is None:
            event = self._events[index] = torch.cuda.Event(blocking=True)
        event.record(stream)
        return event

    def event(self, index: int):
        """The event of the last copy recorded for buffer ``index`` (None if none was)."""
        return self._events[index]

    def synchronize(self, index: int) -> None:
        """Wait (sleeping, not spinning) until the last copy recorded for buffer ``index`` has run."""
        event = self._events[index]
        if event is not None:
            event.synchronize()

    def tensor(self, index: int, dtype: torch.dtype, numel: int, offset: int = 0) -> torch.Tensor:
        """A ``dtype`` view of ``numel`` elements of buffer ``index`` starting ``offset`` bytes in (a slice of the
        pool's own tensor, so it is pinned when the pool is)."""
        nbytes = numel * torch.empty(0, dtype=dtype).element_size()
        if offset % ALIGN or offset + nbytes > self.buffer_bytes:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a {self.buffer_bytes}-byte buffer")
        return self._buffers[index][offset:offset + nbytes].view(dtype)

    def array(self, index: int, dtype: np.dtype | str, numel: int, offset: int = 0) -> np.ndarray:
        """The same region as :meth:`tensor`, as a numpy array (shares the memory)."""
        dtype = np.dtype(dtype)
        nbytes = numel * dtype.itemsize
        if offset % ALIGN or offset + nbytes > self.buffer_bytes:
            raise ValueError(f"{nbytes} bytes at offset {offset} do not fit a {self.buffer_bytes}-byte buffer")
        return self._buffers[index][offset:offset + nbytes].numpy().view(dtype)
