"""The delta store on its own: round trips, commits, codecs, growth, info."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltastore import DeltaStore, ReadOnlyError, StepSelectionError
from deltastore import backends as backends_module

CODECS = ["fp32", "fp16", "bf16", "topk:0.1"]


def make_store(tmp_path, codec="fp32", backend="zarr", numel=5000, chunk=1024, name="s"):
    start = {"a": torch.zeros(numel - 100), "b": torch.zeros(10, 10), "n": torch.tensor(3)}
    return DeltaStore.create(tmp_path / name, start, codec=codec, backend=backend, chunk_elems=chunk, durable=False)


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_fp32_round_trip_is_exact(tmp_path, backend):
    store = make_store(tmp_path, backend=backend)
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(5000, generator=g) * 1e-3 for _ in range(7)]
    for i, d in enumerate(deltas):
        assert store.append_delta(d, {"ids": torch.tensor([i, i + 100])}) == i
    store.close()
    store = DeltaStore.open(tmp_path / "s")
    assert store.num_steps == 7
    for i, d in enumerate(deltas):
        assert torch.equal(store.read_step(i), d)
    assert torch.allclose(store.sum_steps([1, 4, 6]), deltas[1] + deltas[4] + deltas[6], atol=1e-7)
    assert store.metadata()["ids"].of(4).tolist() == [4, 104]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_lossy_codecs_with_residual_rebuild_the_final_state(tmp_path, codec, backend):
    """theta_0 + sum(stored) + residual == theta_final, and both unlearning plans agree."""
    start = {"w": torch.zeros(3000)}
    store = DeltaStore.create(tmp_path / "s", start, codec=codec, backend=backend, chunk_elems=512, durable=False)
    enc = store.codec.encoder(torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    theta, deltas = torch.zeros(3000), []
    for _ in range(12):
        d = torch.randn(3000, generator=g) * 1e-3
        d[::7] *= 1e-4  # small deltas that a plain fp16 cast would flush to zero
        deltas.append(d)
        theta += d
        store.append_delta(d, encoder=enc)
    store.finalize({"w": theta}, enc.residual)
    store.close()
    store = DeltaStore.open(tmp_path / "s")
    total = store.sum_steps(range(12)) + store.read_snapshot_flat("residual")
    assert torch.allclose(total, theta, atol=1e-6)
    direct = store.state_without([3])  # final minus step 3
    other = store.state_without(range(2, 12))  # start plus the few others (complement plan)
    assert torch.allclose(direct, theta - store.read_step(3), atol=1e-6)
    assert torch.allclose(other, store.sum_steps([0, 1]) + store.read_snapshot_flat("residual"), atol=1e-6)
    info = store.info()
    assert info["lossy"] == (codec != "fp32") and info["codec_error"] is not None
    if codec in ("fp16", "bf16"):
        err = (store.read_step(5) - deltas[5]).abs()
        assert (store.read_step(5)[::7] != 0).all(), "small deltas must not underflow to zero"
        assert info["codec_error"] < 0.02 and err.max() < 1e-4


def test_fp16_scale_keeps_tiny_deltas_that_a_cast_zeroes(tmp_path):
    store = make_store(tmp_path, "fp16", numel=2048)
    d = torch.full((2048,), 1e-9)
    d[0] = 1e-3
    assert (d.half() == 0).float().mean() > 0.9  # a plain cast loses them
    store.append_delta(d)
    back = store.read_step(0)
    assert torch.allclose(back, d, rtol=2e-3, atol=0)


def test_topk_keeps_the_requested_fraction(tmp_path):
    store = make_store(tmp_path, "topk:0.01", numel=100_000, chunk=10_000)
    d = torch.randn(100_000)
    store.append_delta(d)
    back = store.read_step(0)
    assert (back != 0).sum().item() == 100 * 10  # 1% of each of the 10 chunks
    kept = back != 0
    for c in range(10):
        seg = slice(c * 10_000, (c + 1) * 10_000)
        assert d[seg].abs()[kept[seg]].min() >= d[seg].abs()[~kept[seg]].max()


def test_uncommitted_data_is_invisible(tmp_path):
    store = make_store(tmp_path)
    store.append_delta(torch.ones(5000))
    # a step written to the backend but never committed (a crash between data and commit)
    store.backend.write_step(1, {"data": np.full(5000, 7, np.float32)})
    reader = DeltaStore.open(tmp_path / "s")
    assert reader.num_steps == 1
    with pytest.raises(StepSelectionError):
        reader.read_step(1)


def test_capacity_grows_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(backends_module, "CAPACITY_BLOCK", 4)
    store = make_store(tmp_path, numel=300, chunk=128)
    for i in range(11):
        store.append_delta(torch.full((300,), float(i)))
    assert store.backend.arrays["data"].shape[0] == 12
    store.close()
    assert DeltaStore.open(tmp_path / "s").read_step(10)[0].item() == 10.0


def test_reader_cannot_write(tmp_path):
    make_store(tmp_path).close()
    with pytest.raises(ReadOnlyError):
        DeltaStore.open(tmp_path / "s").append_delta(torch.ones(5000))


def test_reduce_memory_options_give_the_same_sum(tmp_path):
    store = make_store(tmp_path, numel=10_000, chunk=1000)
    g = torch.Generator().manual_seed(3)
    for _ in range(20):
        store.append_delta(torch.randn(10_000, generator=g))
    a = store.sum_steps(range(20))
    b = store.sum_steps(range(20), block_bytes=4000, max_inflight_bytes=8000, workers=3)
    assert torch.allclose(a, b, atol=1e-5)


def test_topk_indices_outside_their_chunk_are_refused():
    """A crafted step whose checksums were recomputed must not scatter outside its chunk."""
    from deltastore import CorruptionError, parse_codec
    codec = parse_codec("topk:0.5", numel=8, chunk_elems=4)
    acc = torch.zeros(8)
    side = {"scale": np.ones(2, np.float32)}
    values = np.ones(4, np.float16)
    good = np.array([0, 3, 1, 1], np.int32)  # chunk 0: 0, 3; chunk 1: 1, 2
    codec.accumulate(acc, 0, 2, {"values": values, "indices": good}, side)
    assert acc.tolist() == [1, 0, 0, 1, 0, 1, 1, 0]
    for bad in ([0, 4, 0, 1], [-1, 1, 0, 1]):  # past the chunk's end; negative
        with pytest.raises(CorruptionError, match="outside their chunk"):
            codec.accumulate(acc, 0, 2, {"values": values, "indices": np.array(bad, np.int32)}, side)


@pytest.mark.parametrize("codec", CODECS)
def test_shards_we_write_are_read_back_by_zarr_itself(tmp_path, codec):
    """The zarr backend encodes shard files itself (faster than zarr's write path): zarr must read them unchanged,
    including a last inner chunk that the vector fills only partly."""
    import zarr
    store = make_store(tmp_path, codec, numel=2500, chunk=1024)  # chunks of 1024, 1024, 452 elements
    g = torch.Generator().manual_seed(4)
    for _ in range(3):
        store.append_delta(torch.randn(2500, generator=g))
    for spec in store.codec.streams():
        arr = zarr.open_array(tmp_path / "s" / "deltas" / spec.name, mode="r")
        for step in range(3):
            ours = store.backend.read_range(step, spec.name, 0, spec.length, {})
            assert np.array_equal(arr[step, :], ours)


def test_small_models_get_one_chunk_smaller_than_the_default(tmp_path):
    store = make_store(tmp_path, numel=5000, chunk=1 << 20)
    assert store.codec.chunk_elems == 1 << 17 and store.codec.num_chunks == 1  # padded to 2**17, not 2**20
    store = make_store(tmp_path, numel=300_000, chunk=1 << 20, name="t")
    assert store.codec.chunk_elems == 300_000 and store.codec.num_chunks == 1
    assert make_store(tmp_path, numel=5000, chunk=1024, name="u").codec.chunk_elems == 1024  # asked for: kept


@pytest.mark.parametrize("bad", [0, -5, 1 << 29, 2.5, True])
def test_chunk_sizes_that_open_would_refuse_are_refused_at_creation(tmp_path, bad):
    from deltastore import InvalidArgumentError
    with pytest.raises(InvalidArgumentError, match="chunk_elems"):
        DeltaStore.create(tmp_path / "s", {"w": torch.zeros(10)}, chunk_elems=bad, durable=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_a_model_without_floating_tensors_records_empty_steps(tmp_path, backend):
    store = DeltaStore.create(tmp_path / "s", {"n": torch.tensor(3)}, backend=backend, durable=False)
    store.append_delta(torch.zeros(0), {"ids": torch.tensor([1])})
    store.finalize({"n": torch.tensor(4)})
    store.close()
    store = DeltaStore.open(tmp_path / "s")
    assert store.read_step(0).numel() == 0 and store.metadata()["ids"].of(0).tolist() == [1]
    from deltastore.verify import verify_store
    assert verify_store(store)["ok"]
