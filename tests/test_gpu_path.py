"""The GPU path (issue 16), tested on the CPU where the logic allows and on CUDA where there is a GPU.

On the CPU: the pipelined reduce (host buffer pool, the path CUDA takes) against the threaded CPU reduce for every
codec with tiny blocks and forced buffer reuse; decoding reads scales and checks top-k indices on the host, and
never masks a tensor with booleans (each of those would wait for the GPU). With CUDA (``-m cuda``): the same checks
on the device, the writer race stress and the recorded training against device-side snapshots, from
``benchmarks/gpu_check.py`` at small sizes.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from deltastore import CorruptionError, DeltaStore, parse_codec
from deltastore.reduce import reduce_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gpu_check  # noqa: E402

CODECS = ["fp32", "fp16", "bf16", "topk:0.1"]


def _store(tmp_path, codec: str, numel: int = 3000, steps: int = 9, chunk: int = 64) -> DeltaStore:
    store = DeltaStore.create(tmp_path / codec.replace(":", ""), {"w": torch.zeros(numel)}, codec=codec,
                              chunk_elems=chunk, durable=False)
    enc, gen = store.codec.encoder(torch.device("cpu")), torch.Generator().manual_seed(1)
    for t in range(steps):
        store.append_delta(torch.randn(numel, generator=gen) * 10.0 ** -(t % 3), encoder=enc)
    return store


@pytest.mark.parametrize("codec", CODECS)
def test_the_pipelined_reduce_equals_the_cpu_reduce_bit_for_bit(tmp_path, codec):
    store = _store(tmp_path, codec)
    steps = store.check_steps([0, 2, 3, 7, 8])
    want = reduce_steps(store, steps, block_bytes=300).total
    # blocks of ~2 chunks and room for 2 in flight: the 4-buffer pool is reused dozens of times
    got = reduce_steps(store, steps, block_bytes=300, max_inflight_bytes=700, workers=2, pipeline=True).total
    assert torch.equal(want, got)
    naive = sum(store.read_step(int(s)) for s in steps)
    assert torch.allclose(got, naive, rtol=1e-5, atol=1e-7)


def test_a_damaged_block_in_the_pipelined_reduce_raises_and_returns(tmp_path):
    store = _store(tmp_path, "topk:0.1")
    path = tmp_path / "topk0.1" / "deltas" / "indices" / "c" / "4" / "0"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    box = []
    t = threading.Thread(target=lambda: box.append(_try(lambda: reduce_steps(
        store, store.check_steps(range(9)), block_bytes=300, max_inflight_bytes=700, pipeline=True))), daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "a failed block must not leave the reduce waiting for a buffer"
    assert isinstance(box[0], CorruptionError) and "step 4" in str(box[0])


def _try(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - handed to the test
        return e


class _Tripwire:
    """Fails the test if decoding reads a tensor's value on the host or masks a tensor with booleans: on a GPU
    each of those waits for the device."""

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in ("item", "tolist", "__float__", "__int__",
                                                                     "__bool__", "__getitem__", "nonzero")}

        def refuse(name):
            def f(*args, **kwargs):
                raise AssertionError(f"decoding called Tensor.{name}: a host sync on a GPU")
            return f

        for name in ("item", "tolist", "__float__", "__int__", "__bool__", "nonzero"):
            setattr(torch.Tensor, name, refuse(name))
        getitem = self.saved["__getitem__"]

        def checked_getitem(t, index):
            parts = index if isinstance(index, tuple) else (index,)
            if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                raise AssertionError("decoding indexed a tensor with a boolean mask: a host sync on a GPU")
            return getitem(t, index)

        torch.Tensor.__getitem__ = checked_getitem
        return self

    def __exit__(self, *exc):
        for name, f in self.saved.items():
            setattr(torch.Tensor, name, f)


@pytest.mark.parametrize("codec", CODECS)
def test_decoding_reads_scales_and_checks_indices_on_the_host(codec):
    numel, chunk = 1000, 128  # the last chunk is partial: top-k may have picked padding there
    c = parse_codec(codec, numel=numel, chunk_elems=chunk)
    enc = c.encoder(torch.device("cpu"))
    delta = torch.randn(numel, generator=torch.Generator().manual_seed(0))
    streams, side = enc.encode(delta)
    host = {k: gpu_check._as_numpy(v).copy() for k, v in streams.items()}
    host_side = {k: v.numpy().copy() for k, v in side.items()}
    want = torch.zeros(numel)
    c.accumulate(want, 0, c.num_chunks, dict(host), dict(host_side))
    acc = torch.zeros(numel)
    with _Tripwire():
        c.accumulate(acc, 0, c.num_chunks, dict(host), dict(host_side))
        part = torch.zeros(3 * chunk)  # a block, with a block-sized side array
        c.accumulate(part, 2, 5, {s.name: host[s.name][slice(*s.chunk_range(2, 5))] for s in c.streams()},
                     {k: v[2:5] for k, v in host_side.items()})
    assert torch.equal(acc, want)
    assert torch.equal(part, want[2 * chunk:5 * chunk])
    kept = want != 0 if c.kind == "topk" else torch.ones(numel, dtype=torch.bool)
    assert kept.sum() >= (100 if c.kind == "topk" else numel)
    assert torch.allclose(want[kept], delta[kept], atol=0, rtol=1e-2)


def test_top_k_indices_outside_their_chunk_are_refused_before_anything_is_uploaded(monkeypatch):
    c = parse_codec("topk:0.1", numel=1000, chunk_elems=128)
    streams, side = c.encoder(torch.device("cpu")).encode(torch.randn(1000))
    indices = streams["indices"].numpy().copy()
    indices[5] = 200  # pushes the first chunk's later indices past 128
    monkeypatch.setattr(torch, "cumsum", lambda *a, **k: pytest.fail("indices were uploaded before the check"))
    with pytest.raises(CorruptionError, match="outside their chunk"):
        c.accumulate(torch.zeros(1000), 0, c.num_chunks, {"values": streams["values"].numpy(), "indices": indices},
                     {"scale": side["scale"].numpy()})
    indices[5] = -3
    with pytest.raises(CorruptionError):
        c.accumulate(torch.zeros(1000), 0, c.num_chunks, {"values": streams["values"].numpy(), "indices": indices},
                     {"scale": side["scale"].numpy()})


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@pytest.mark.cuda
@pytest.mark.parametrize("check, options", [
    (gpu_check.reduce_check, {"numel": 5000, "steps": 10}),  # device reduce == CPU reduce, every codec
    (gpu_check.writer_stress, {"numel": 1 << 18, "steps": 12}),  # late inputs, allocator churn, slow store
    (gpu_check.recording, {"steps": 8}),  # fp32 == device snapshots; async == sync bytes
    (gpu_check.encoders, {"numel": 1 << 16, "steps": 4}),  # CPU and device encoders agree
    (gpu_check.sync_debug, {"steps": 4}),  # set_sync_debug_mode("error") around recording and reduce
], ids=["reduce", "writer_stress", "recording", "encoders", "sync_debug"])
def test_gpu_path_on_the_device(tmp_path, check, options):
    res = check(torch.device("cuda"), tmp_path, **options)
    assert res["ok"], res
