"""The asynchronous step writer: errors reach the training thread, memory stays bounded, CUDA copies are never torn.

The fake stores here implement the three things the writer uses (``codec``, ``num_steps``, ``append``) so that a
test decides when a write fails or how long it takes.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from amnesiac import Recorder
from deltastore import DeltaStore, WriterError, parse_codec
from deltastore.writer import AsyncStepWriter

class FakeStore:
    """Keeps a copy of every appended step; optionally fails on one step or waits on a gate before each write."""

    def __init__(self, numel: int = 1000, codec: str = "fp32", *, fail_at: int | None = None,
                 gate: threading.Event | None = None, chunk_elems: int = 256):
        self.codec = parse_codec(codec, numel=numel, chunk_elems=chunk_elems)
        self.num_steps = 0
        self.fail_at, self.gate = fail_at, gate
        self.steps: list[dict[str, np.ndarray]] = []
        self.side: list[dict[str, np.ndarray]] = []
        self.metadata: list[dict] = []
        self.buffers: set[int] = set()  # addresses of the host buffers the writer handed over
        self.attempts = 0

    def append(self, streams, side, metadata) -> int:
        self.attempts += 1
        if self.gate is not None:
            self.gate.wait()
        if self.num_steps == self.fail_at:
            raise OSError(28, "No space left on device")
        self.buffers.update(a.__array_interface__["data"][0] for a in streams.values())
        self.steps.append({k: np.array(v, copy=True) for k, v in streams.items()})
        self.side.append({k: np.array(v, copy=True) for k, v in side.items()})
        self.metadata.append(dict(metadata))
        self.num_steps += 1
        return self.num_steps - 1


def _step(t: int, numel: int = 1000) -> dict[str, torch.Tensor]:
    return {"data": torch.arange(numel, dtype=torch.float32) + 1000.0 * t}


def _submit(writer: AsyncStepWriter, t: int, numel: int = 1000) -> int:
    return writer.submit(_step(t, numel), {}, {"ids": np.array([t], np.int64)})


# ------------------------------------------------------------------ error propagation
def test_a_failed_write_is_raised_once_with_its_cause_then_every_later_call_still_raises():
    store = FakeStore(fail_at=3)
    writer = AsyncStepWriter(store, slots=2)
    calls = [lambda t=t: _submit(writer, t) for t in range(6)]
    calls += [writer.flush, writer.flush, lambda: _submit(writer, 99), writer.close, writer.close]
    outcomes = []
    for call in calls:  # the training thread may see the failure at any of the later submits: it must not matter
        try:
            call()
            outcomes.append(None)
        except WriterError as e:
            outcomes.append(e)
    first = next(i for i, e in enumerate(outcomes) if e is not None)
    assert first >= 4, "steps 0-3 were submitted before step 3 could fail"
    assert all(e is not None for e in outcomes[first:]), "every call after the failure must raise"
    assert "writing step 3 failed: OSError" in str(outcomes[first])
    assert isinstance(outcomes[first].__cause__, OSError)
    for e in outcomes[first + 1:]:  # later calls remind, without repeating the original exception
        assert "step 3" in str(e) and e.__cause__ is None
    # nothing after the failed step was written, and the steps before it were, in order and intact
    assert store.num_steps == 3
    for t, stored in enumerate(store.steps):
        np.testing.assert_array_equal(stored["data"], _step(t)["data"].numpy())
        assert store.metadata[t]["ids"].tolist() == [t]


def test_the_first_error_names_the_step_and_keeps_the_original_exception():
    store = FakeStore(fail_at=2)
    writer = AsyncStepWriter(store, slots=4)
    for t in range(3):
        _submit(writer, t)
    with pytest.raises(WriterError, match=r"writing step 2 failed: OSError") as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(WriterError, match="recording stopped after writing step 2 failed"):
        writer.flush()
    with pytest.raises(WriterError):
        writer.close()


def test_recorder_surfaces_a_disk_error_in_the_training_loop_and_keeps_committed_steps(tmp_path, bn_model):
    model = bn_model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, opt, tmp_path / "run", durable=False, slots=2)
    real_begin = rec.store.begin_step
    calls = []

    def failing_begin():
        calls.append(len(calls))
        if len(calls) == 4:  # the fourth write (step 3) hits a full disk
            raise OSError(28, "No space left on device")
        return real_begin()

    rec.store.begin_step = failing_begin
    states = [{k: v.clone() for k, v in model.state_dict().items()}]
    raised: list[tuple[str, WriterError]] = []
    for t in range(8):
        rec.add_batch([t])
        model(torch.randn(4, 1, 8, 8)).sum().backward()
        try:
            opt.step()
        except WriterError as e:
            raised.append((f"step {t}", e))
        opt.zero_grad()
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    try:
        rec.flush()
    except WriterError as e:
        raised.append(("flush", e))
    assert raised, "a failed write must reach the training thread"
    # once the failure was seen, every later call raised; the first one carries the cause, and all name step 3
    first_seen = [where for where, _ in raised][0]
    if first_seen.startswith("step"):
        expected = [f"step {t}" for t in range(int(first_seen.split()[1]), 8)] + ["flush"]
        assert [where for where, _ in raised] == expected
    assert all("step 3" in str(e) for _, e in raised), [str(e) for _, e in raised]
    assert isinstance(raised[0][1].__cause__, OSError)
    assert all(e.__cause__ is None for _, e in raised[1:])
    # close raises too and leaves the run incomplete: steps after the failure are missing, so no final state
    with pytest.raises(WriterError):
        rec.close()
    store = DeltaStore.open(tmp_path / "run")
    assert store.num_steps == 3 and not store.complete
    flat = [store.layout.flatten({k: v for k, v in s.items() if torch.is_floating_point(v)}) for s in states]
    for t in range(3):
        assert torch.allclose(store.read_step(t), flat[t + 1] - flat[t], atol=1e-6)


# ------------------------------------------------------------------ bounded memory, nothing dropped
def test_submit_blocks_when_every_slot_is_busy_and_slots_are_reused():
    gate = threading.Event()
    store = FakeStore(gate=gate)
    writer = AsyncStepWriter(store, slots=2)
    assert writer.num_slots == 2
    _submit(writer, 0)  # taken by the writer thread, which waits at the gate (it keeps its buffer until committed)
    _submit(writer, 1)  # waits in the queue
    third = threading.Thread(target=_submit, args=(writer, 2))
    third.start()
    third.join(timeout=0.5)
    assert third.is_alive(), "with both slots busy, submit must wait rather than allocate or drop"
    assert store.num_steps == 0
    gate.set()
    third.join(timeout=30)
    assert not third.is_alive()
    for t in range(3, 12):
        _submit(writer, t)
    writer.close()
    assert store.num_steps == 12
    for t, stored in enumerate(store.steps):
        np.testing.assert_array_equal(stored["data"], _step(t)["data"].numpy())
    assert len(store.buffers) <= 2, "the writer must cycle through its two slots, not allocate per step"
    assert writer.stats["steps_written"] == 12 and writer.stats["submit_wait_s"] > 0


def test_a_slow_store_never_loses_or_reorders_steps_and_the_caller_may_reuse_its_buffer():
    class SlowStore(FakeStore):
        def append(self, streams, side, metadata):
            threading.Event().wait(0.002)
            return super().append(streams, side, metadata)

    store = SlowStore(codec="fp16")
    writer = AsyncStepWriter(store, slots=3)
    enc = store.codec.encoder(torch.device("cpu"))
    expected = []
    buf = torch.empty(1000)
    for t in range(40):
        torch.manual_seed(t)
        buf.copy_(torch.randn(1000) * 10.0 ** -(t % 5))
        streams, side = enc.encode(buf)
        expected.append((streams["data"].clone(), side["scale"].clone()))
        writer.submit(streams, side, {"ids": np.array([t])})
        buf.fill_(float("nan"))  # the caller reuses its buffer at once; the writer must have copied it
        streams["data"].fill_(float("nan"))
    writer.close()
    assert store.num_steps == 40
    for t, (data, scale) in enumerate(expected):
        np.testing.assert_array_equal(store.steps[t]["data"], data.numpy())
        np.testing.assert_array_equal(store.side[t]["scale"], scale.numpy())
        assert store.metadata[t]["ids"].tolist() == [t]


def test_default_slot_count_follows_the_buffer_budget():
    store = FakeStore(numel=1 << 16)
    step_bytes = (1 << 16) * 4
    most = 8 if torch.cuda.is_available() else 3  # CPU copies are synchronous: 3 slots are enough there
    assert AsyncStepWriter(store, max_buffer_bytes=3 * step_bytes).num_slots == 3
    assert AsyncStepWriter(store, max_buffer_bytes=step_bytes).num_slots == 2  # never fewer than 2
    assert AsyncStepWriter(store, max_buffer_bytes=1 << 40).num_slots == most  # nor more than the cap
    assert AsyncStepWriter(store, slots=6).num_slots == 6  # an explicit count wins
    with pytest.raises(ValueError):
        AsyncStepWriter(store, slots=0)


def test_pinning_without_a_gpu_is_refused():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: pinning is allowed")
    from deltastore import DeltaStoreError
    with pytest.raises(DeltaStoreError, match="pin"):
        AsyncStepWriter(FakeStore(), pin=True)


# ------------------------------------------------------------------ CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "topk:0.05"])
def test_cuda_copies_are_never_torn(codec):
    """Random data, many steps, a ring of 2 slots: every stored step equals a synchronous copy taken at submit."""
    numel = 1 << 18
    store = FakeStore(numel=numel, codec=codec, chunk_elems=1 << 16)
    writer = AsyncStepWriter(store, device="cuda", slots=2)
    enc = store.codec.encoder(torch.device("cuda"))
    delta = torch.empty(numel, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    expected = []
    for t in range(60):
        writer.wait_copy_done()  # as the Recorder does before overwriting its delta buffer
        torch.cuda._sleep(200_000)  # delay the work the copy depends on, so a race would show
        delta.normal_(generator=g)
        streams, side = enc.encode(delta)
        expected.append(({k: v.cpu().clone() for k, v in streams.items()}, {k: v.cpu().clone() for k, v in side.items()}))
        writer.submit(streams, side, {"ids": np.array([t])})
        del streams, side
        for _ in range(3):  # churn the caching allocator so freed encoder outputs get reused at once
            torch.randn(numel, device="cuda").mul_(float("nan"))
    writer.close()
    assert store.num_steps == 60
    for t, (streams, side) in enumerate(expected):
        for k, v in streams.items():
            want = v.view(torch.int16) if v.dtype == torch.bfloat16 else v
            np.testing.assert_array_equal(store.steps[t][k], want.numpy(), err_msg=f"step {t} stream {k}")
        for k, v in side.items():
            np.testing.assert_array_equal(store.side[t][k], v.numpy())


@pytest.mark.cuda
def test_cuda_buffer_is_not_handed_out_before_its_copy_event_completed():
    numel = 1 << 20
    store = FakeStore(numel=numel, chunk_elems=1 << 18)
    writer = AsyncStepWriter(store, device="cuda", slots=2, piece_bytes=2 << 20)  # two pieces per step
    pool, real_acquire, handed = writer.pool, writer.pool.acquire, []

    def acquire(timeout=None):
        index = real_acquire(timeout)
        event = pool.event(index)
        handed.append(event is None or event.query())  # its last copy must have run
        return index

    pool.acquire = acquire
    delta = torch.zeros(numel, device="cuda")
    for t in range(12):
        writer.wait_copy_done()
        torch.cuda._sleep(2_000_000)  # the copy of this step waits behind a long kernel
        delta.fill_(float(t))
        writer.submit({"data": delta}, {}, {"ids": np.array([t])})
    writer.close()
    assert len(handed) == 24 and all(handed), "a buffer was handed out while its copy was still queued"
    for t in range(12):
        assert np.all(store.steps[t]["data"] == float(t))


@pytest.mark.cuda
def test_cuda_recorder_matches_a_synchronous_reference(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    flat = [torch.cat([p.detach().reshape(-1).cpu().clone() for p in model.state_dict().values()])]
    with Recorder(model, opt, tmp_path / "run", durable=False, slots=2) as rec:
        for t in range(30):
            rec.add_batch([t])
            model(torch.randn(32, 64, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
            flat.append(torch.cat([p.detach().reshape(-1).cpu().clone() for p in model.state_dict().values()]))
    store = DeltaStore.open(tmp_path / "run")
    for t in range(30):
        assert torch.allclose(store.read_step(t), flat[t + 1] - flat[t], atol=1e-6), f"step {t}"


# ------------------------------------------------------------------ pieces, failures part-way (issue 16)
def _run_with_timeout(fn, seconds: float = 30.0):
    """Run ``fn`` on a thread; fail the test (instead of hanging the suite) if it does not return in time."""
    result: list = []

    def target():
        try:
            result.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            result.append(("error", e))

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"blocked for more than {seconds} s (a leaked buffer?)"
    kind, value = result[0]
    if kind == "error":
        raise value
    return value


def test_a_submit_failing_after_it_took_the_only_buffer_leaks_nothing():
    store = FakeStore()
    writer = AsyncStepWriter(store, slots=1)
    assert writer.num_slots == 1
    bad = {"data": torch.empty(1000, device="meta")}  # the right size, but copying out of it fails
    with pytest.raises(NotImplementedError):
        _run_with_timeout(lambda: writer.submit(bad, {}, {"ids": np.array([0])}))
    assert writer.pool.free_count == 1, "the failed submit must give its buffer back"
    assert _run_with_timeout(lambda: _submit(writer, 1)) == 0, "the failed step's number is not used"
    _run_with_timeout(writer.close)
    assert store.num_steps == 1
    np.testing.assert_array_equal(store.steps[0]["data"], _step(1)["data"].numpy())


def test_a_wrong_shaped_submit_with_one_slot_is_refused_and_close_does_not_block():
    store = FakeStore()
    writer = AsyncStepWriter(store, slots=1)
    with pytest.raises(ValueError, match="1000 elements"):
        _run_with_timeout(lambda: writer.submit({"data": torch.zeros(999)}, {}, {}))
    _run_with_timeout(writer.close)
    assert store.num_steps == 0 and writer.pool.free_count == 1


def test_a_step_cut_into_pieces_is_stored_whole_and_a_failed_piece_abandons_only_its_step():
    store = FakeStore(numel=1000, chunk_elems=100, codec="fp16")  # 10 chunks
    writer = AsyncStepWriter(store, slots=2, piece_bytes=3 * (100 * 2 + 4))  # 3 chunks per piece
    assert (writer.chunks_per_piece, writer.pieces_per_step) == (3, 4)
    enc = store.codec.encoder(torch.device("cpu"))
    expected = []
    for t in range(5):
        torch.manual_seed(t)
        streams, side = enc.encode(torch.randn(1000))
        if t == 2:  # send two pieces, then a wrong one: the step is abandoned, its number reused
            for c0 in (0, 3):
                writer.submit_piece(c0, c0 + 3, {"data": streams["data"][c0 * 100:(c0 + 3) * 100]},
                                    {"scale": side["scale"][c0:c0 + 3]})
            with pytest.raises(ValueError, match="out of order"):
                writer.submit_piece(7, 10, {"data": streams["data"][700:]}, {"scale": side["scale"][7:]})
        expected.append((streams["data"].clone(), side["scale"].clone()))
        _run_with_timeout(lambda: writer.submit(streams, side, {"ids": np.array([t])}))
    _run_with_timeout(writer.close)
    assert store.num_steps == 5 and writer.stats["pieces_written"] == 4 * 5 + 2
    for t, (data, scale) in enumerate(expected):
        np.testing.assert_array_equal(store.steps[t]["data"], data.numpy())
        np.testing.assert_array_equal(store.side[t]["scale"], scale.numpy())
        assert store.metadata[t]["ids"].tolist() == [t]
    assert writer.pool.free_count == writer.num_slots


def test_a_real_store_takes_steps_piece_by_piece(tmp_path):
    store = DeltaStore.create(tmp_path / "s", {"w": torch.zeros(10, 100), "b": torch.zeros(7)}, codec="topk:0.1",
                              chunk_elems=64, durable=False)
    writer = AsyncStepWriter(store, piece_bytes=200)
    assert writer.pieces_per_step > 3
    enc, ref = store.codec.encoder(torch.device("cpu")), store.codec.encoder(torch.device("cpu"))
    for t in range(4):
        delta = torch.randn(1007, generator=torch.Generator().manual_seed(t))
        writer.submit(*enc.encode(delta), {"ids": np.array([t])})
        streams, side = ref.encode(delta)
        want = torch.zeros(1007)
        store.codec.accumulate(want, 0, store.codec.num_chunks, {k: v.numpy() for k, v in streams.items()},
                               {k: v.numpy() for k, v in side.items()})
        writer.flush()
        assert torch.equal(store.read_step(t), want), f"step {t}"
    writer.close()


@pytest.mark.cuda
def test_the_writer_thread_works_on_the_writers_device():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    store = FakeStore(numel=1 << 16, chunk_elems=1 << 12)
    seen = []
    real_append = store.append

    def append(streams, side, metadata):
        seen.append(torch.cuda.current_device())
        return real_append(streams, side, metadata)

    store.append = append
    writer = AsyncStepWriter(store, device=device, slots=2)
    for t in range(3):
        writer.submit({"data": torch.full((1 << 16,), float(t), device=device)}, {}, {})
    writer.close()
    assert seen == [device.index] * 3
