"""Conformance tests every delta backend passes (the way zarr-python's ``StoreTests`` is subclassed per store).

A new backend gets the whole suite with a two-line subclass naming it. The tests only use the store interface and
find a step's files by what appeared on disk when the step was appended, so they know nothing of the file layout.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deltastore import DeltaStore
from deltastore.errors import CorruptionError

CHUNK = 1024
NUMEL = 2 * CHUNK + 300  # two whole chunks and a short last one
CODECS = ["fp32", "fp16", "bf16", "topk:0.05"]


def _deltas(steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Adam-like: lr times a sign-ish value with exponents spread over a few decades
    return [1e-3 * torch.randn(NUMEL, generator=g) * torch.exp(torch.randn(NUMEL, generator=g)) for _ in range(steps)]


def _files(root: Path) -> set[Path]:
    return {p for p in (root / "deltas").rglob("*") if p.is_file()}


def _decoded(codec, delta: torch.Tensor) -> torch.Tensor:
    """What the codec itself decodes ``delta`` to, with a fresh encoder (as ``append_delta`` uses)."""
    streams, side = codec.encoder(torch.device("cpu")).encode(delta)
    out = torch.zeros(codec.numel)
    to_np = lambda t: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
    codec.accumulate(out, 0, codec.num_chunks, {k: to_np(v) for k, v in streams.items()},
                     {k: to_np(v) for k, v in side.items()})
    return out


class BackendConformance:
    """Subclass with ``backend = "name"``."""

    backend: str

    def make(self, path: Path, codec: str = "fp32", steps: int = 4, zero_step: int | None = None):
        """A complete store of ``steps`` steps; returns it (open for reading), the true deltas and each step's files."""
        deltas = _deltas(steps)
        if zero_step is not None:
            deltas[zero_step] = torch.zeros(NUMEL)
        start = {"a": torch.randn(CHUNK + 100), "b": torch.randn(NUMEL - CHUNK - 100),
                 "n": torch.tensor(3, dtype=torch.int64)}
        step_files = []
        with DeltaStore.create(path, start, codec=codec, backend=self.backend, chunk_elems=CHUNK,
                               durable=False) as store:
            for d in deltas:
                before = _files(path)
                store.append_delta(d)
                step_files.append(sorted(_files(path) - before))
            flat = store.read_snapshot_flat("start") + torch.stack(deltas).sum(0)
            final = store.layout.unflatten(flat)
            final["n"] = torch.tensor(7, dtype=torch.int64)
            store.finalize(final)
        assert all(step_files), "every step must leave at least one file of its own"
        return DeltaStore.open(path), deltas, step_files

    @pytest.mark.parametrize("codec", CODECS)
    def test_round_trip_every_codec(self, tmp_path, codec):
        store, deltas, _ = self.make(tmp_path / "s", codec)
        assert store.meta["backend"] == self.backend
        for t, d in enumerate(deltas):
            expected = _decoded(store.codec, d)
            assert torch.equal(store.read_step(t), expected), f"step {t} does not read back as written"
            if codec == "fp32":
                assert torch.equal(expected, d)

    @pytest.mark.parametrize("codec", ["fp32", "topk:0.05"])
    def test_chunk_aligned_partial_reads(self, tmp_path, codec):
        store, _, _ = self.make(tmp_path / "s", codec)
        backend, side = store.backend, store.side_arrays(2)
        for spec in store.codec.streams():
            whole = np.array(backend.read_range(2, spec.name, 0, spec.length, side))
            assert whole.shape == (spec.length,) and whole.dtype == np.dtype(spec.dtype)
            for c0, c1 in [(0, 1), (1, 2), (2, 3), (1, 3), (0, 3)]:
                lo, hi = spec.chunk_range(c0, c1)
                part = backend.read_range(2, spec.name, lo, hi, side)
                assert np.array_equal(part, whole[lo:hi]), (spec.name, c0, c1)
                size = backend.buffer_elems(spec.name, lo, hi) if hasattr(backend, "buffer_elems") else hi - lo
                out = np.full(size, 7, spec.dtype)
                into = backend.read_range(2, spec.name, lo, hi, side, out=out)
                assert np.array_equal(into, whole[lo:hi]) and np.shares_memory(into, out)

    def test_all_zero_step_reads_back(self, tmp_path):
        store, deltas, _ = self.make(tmp_path / "s", zero_step=1)
        assert torch.equal(store.read_step(1), torch.zeros(NUMEL))
        assert torch.equal(store.sum_steps([0, 1, 2]), deltas[0] + deltas[2])

    def test_missing_file_is_an_error(self, tmp_path):
        store, _, step_files = self.make(tmp_path / "s")
        step_files[2][0].unlink()
        assert torch.equal(store.read_step(1), store.read_step(1))  # other steps still read
        with pytest.raises(CorruptionError, match="step 2"):
            store.sum_steps([1, 2])
        with pytest.raises(CorruptionError, match="step 2"):
            store.state_without([0, 1, 3])  # the start-plus-others plan reads step 2

    @pytest.mark.parametrize("where", [0.3, 0.5, 0.75, 1.0])
    def test_flipped_bit_is_an_error(self, tmp_path, where):
        store, _, step_files = self.make(tmp_path / "s")
        path = step_files[1][0]
        data = bytearray(path.read_bytes())
        pos = min(int(len(data) * where), len(data) - 1)
        data[pos] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(CorruptionError, match="step 1"):
            store.sum_steps([0, 1, 2])
        assert torch.equal(store.sum_steps([0, 2]), store.read_step(0) + store.read_step(2))

    def test_reopen(self, tmp_path):
        store, deltas, _ = self.make(tmp_path / "s", "fp16")
        first = [store.read_step(t) for t in range(len(deltas))]
        again = DeltaStore.open(tmp_path / "s")
        assert again.num_steps == len(deltas) and again.complete and again.info()["backend"] == self.backend
        for t, x in enumerate(first):
            assert torch.equal(again.read_step(t), x)

    def test_sum_and_both_unlearning_plans(self, tmp_path):
        store, deltas, _ = self.make(tmp_path / "s", steps=6)
        assert torch.allclose(store.sum_steps([1, 3, 4]), deltas[1] + deltas[3] + deltas[4], atol=1e-7)
        small_blocks = store.sum_steps(range(6), block_bytes=CHUNK * 4, max_inflight_bytes=CHUNK * 8, workers=3)
        assert torch.allclose(small_blocks, torch.stack(deltas).sum(0), atol=1e-6)
        final = store.read_snapshot_flat("final")
        reference = final - deltas[1] - deltas[4]
        assert torch.allclose(store.state_without([1, 4]), reference, atol=1e-6)  # final minus selected
        assert torch.allclose(store.state_without([0, 1, 2, 4, 5]), final - sum(deltas[t] for t in (0, 1, 2, 4, 5)),
                              atol=1e-6)  # start plus the others


class TestZarrBackend(BackendConformance):
    backend = "zarr"


class TestSafetensorsBackend(BackendConformance):
    backend = "safetensors"


# ---------------------------------------------------------------- the zarr backend's own shard reader
def test_zarr_shards_stay_readable_by_zarr(tmp_path):
    import zarr
    store, deltas, _ = BackendConformance.make(TestZarrBackend(), tmp_path / "s")
    arr = zarr.open_array(tmp_path / "s" / "deltas" / "data", mode="r")
    assert arr.metadata.zarr_format == 3
    for t, d in enumerate(deltas):
        assert np.array_equal(arr[t, :], d.numpy())
        assert np.array_equal(store.backend.read_range(t, "data", 0, NUMEL, {}), arr[t, :])


def test_zarr_falls_back_to_zarr_for_unknown_layouts(tmp_path):
    store, deltas, step_files = BackendConformance.make(TestZarrBackend(), tmp_path / "s")
    store.backend._shards["data"] = None  # as for metadata the shard reader does not recognise
    assert torch.equal(store.sum_steps([0, 3]), deltas[0] + deltas[3])
    step_files[1][0].unlink()
    with pytest.raises(CorruptionError, match="step 1"):
        store.sum_steps([1])
