"""The host buffer pool: one allocation cut into equal buffers, one event per buffer, strict bookkeeping.

Pinning needs a GPU, but the bookkeeping does not: it is tested here on ordinary memory, with a stand-in for the
CUDA event class where the event logic is concerned.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from deltastore.hostpool import ALIGN, HostBufferPool, PoolTimeout, align


def test_buffers_are_disjoint_aligned_slices_of_one_allocation():
    pool = HostBufferPool(3, 1000)
    assert pool.buffer_bytes == align(1000) == 1024 and pool.total_bytes == 3 * 1024
    taken = [pool.acquire() for _ in range(3)]
    base = pool._base.data_ptr()
    ptrs = sorted(pool.tensor(i, torch.uint8, 1).data_ptr() for i in taken)
    assert ptrs == [base, base + 1024, base + 2048], "every buffer is a slice of the one allocation"
    for i in taken:
        pool.tensor(i, torch.float32, 256).fill_(float(i))
    for i in taken:  # writing one buffer never touches another
        assert pool.array(i, np.float32, 256).tolist() == [float(i)] * 256
    view = pool.array(taken[0], "int32", 4, offset=ALIGN)
    assert view.ctypes.data == pool.tensor(taken[0], torch.uint8, 1).data_ptr() + ALIGN
    with pytest.raises(ValueError):
        pool.tensor(taken[0], torch.float32, 257)  # past the buffer's end
    with pytest.raises(ValueError):
        pool.array(taken[0], np.float32, 1, offset=3)  # a misaligned region


def test_acquire_waits_for_a_release_and_times_out_when_none_comes():
    pool = HostBufferPool(1, 64)
    first = pool.acquire()
    with pytest.raises(PoolTimeout):
        pool.acquire(timeout=0.05)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(timeout=10)))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive(), "acquire must block while no buffer is free"
    pool.release(first)
    waiter.join(10)
    assert got == [first] and pool.free_count == 0


def test_releasing_a_buffer_twice_or_never_taken_is_an_error():
    pool = HostBufferPool(2, 64)
    i = pool.acquire()
    pool.release(i)
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(i)
    with pytest.raises(RuntimeError):
        pool.release(1 - i if pool.free_count == 2 else i)
    assert pool.free_count == 2


class _FakeEvent:
    log: list = []

    def __init__(self, blocking: bool = False):
        self.blocking = blocking

    def record(self, stream=None):
        _FakeEvent.log.append(("record", id(self)))

    def synchronize(self):
        _FakeEvent.log.append(("synchronize", id(self)))


def test_one_blocking_event_per_buffer_is_reused_and_waited_on_before_the_buffer_is_handed_out(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    _FakeEvent.log = []
    pool = HostBufferPool(2, 64)
    a = pool.acquire()
    assert _FakeEvent.log == [], "a buffer that no copy touched has nothing to wait for"
    ev = pool.record(a, stream=None)
    assert ev.blocking, "a waiting thread must sleep, not spin a core"
    assert pool.record(a, stream=None) is ev, "one event per buffer, re-recorded"
    pool.release(a)
    b = pool.acquire()
    assert b == a, "the most recently used buffer comes back first"
    assert _FakeEvent.log[-1] == ("synchronize", id(ev)), "its last copy must be waited on first"
    other = pool.acquire()
    assert pool.event(other) is None


def test_a_pinned_pool_uses_the_whole_power_of_two_block_the_allocator_reserves(monkeypatch):
    sizes = []
    real_empty = torch.empty

    def fake_empty(n, dtype=None, pin_memory=False):  # no GPU needed: only the sizing is under test
        sizes.append((n, pin_memory))
        return real_empty(n, dtype=dtype)

    monkeypatch.setattr(torch, "empty", fake_empty)
    pool = HostBufferPool(3, 3 << 20, pin=True)  # 9 MiB asked; the host allocator would reserve 16 MiB
    assert sizes[-1] == (15 << 20, True) and pool.count == 5 and pool.buffer_bytes == 3 << 20
