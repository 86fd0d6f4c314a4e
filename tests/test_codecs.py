"""The codec registry: names parse to classes and back, and a new codec is one class plus one registration."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deltastore import CODEC_NAMES, Codec, DeltaStore, UnknownCodecError, parse_codec
from deltastore import codecs
from deltastore.verify import verify_store


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16", "topk:0.05", "topk:1"])
def test_names_round_trip(name):
    codec = parse_codec(name, numel=3000, chunk_elems=1024)
    assert isinstance(codec, Codec) and codec.kind == name.split(":")[0]
    assert parse_codec(codec.name, numel=3000, chunk_elems=1024) == codec
    assert codec.lossy == (name != "fp32")


def test_built_in_names_and_refusals():
    assert CODEC_NAMES == ("fp32", "fp16", "bf16", "topk:F")
    for bad in ["fp64", "topk", "topk:0", "topk:1.5", "topk:nan", "fp32:2", ""]:
        with pytest.raises(UnknownCodecError, match="topk:F with 0 < F <= 1"):
            parse_codec(bad, numel=10, chunk_elems=4)
    with pytest.raises(UnknownCodecError, match="must be a string"):
        parse_codec(16, numel=10, chunk_elems=4)
    with pytest.raises(TypeError):
        codecs.register_codec(int)


class _Int8Codec(Codec):
    """Symmetric int8 with one scale per chunk and error feedback: a codec the package does not ship."""

    kind = syntax = "int8"

    def streams(self):
        return (codecs.StreamSpec("data", "int8", self.numel, self.chunk_elems),)

    def side_arrays(self):
        return {"scale": self.num_chunks}

    def encode(self, enc, delta):
        rows = enc.add_residual(delta)
        scale = torch.where(rows.abs().amax(dim=1) > 0, rows.abs().amax(dim=1) / 127, torch.ones(rows.shape[0]))
        q = torch.round(rows / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
        rows.sub_(q.float() * scale.unsqueeze(1))
        enc.swap()
        return {"data": q.view(-1)[:self.numel]}, {"scale": scale.float()}

    def accumulate(self, acc, c0, c1, streams, side, sign=1.0):
        data = codecs.as_tensor(streams["data"], acc.device).float()
        scale, c = codecs.as_tensor(side["scale"], acc.device)[c0:c1], self.chunk_elems
        for i in range(c1 - c0):
            seg = slice(i * c, min((i + 1) * c, acc.numel()))
            acc[seg].add_(data[seg], alpha=sign * float(scale[i]))


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_a_registered_codec_works_everywhere_without_other_changes(tmp_path, monkeypatch, backend):
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))
    codecs.register_codec(_Int8Codec)
    g = torch.Generator().manual_seed(0)
    deltas = [1e-3 * torch.randn(2500, generator=g) for _ in range(5)]
    start = {"w": torch.randn(2500, generator=g)}
    with DeltaStore.create(tmp_path / "s", start, codec="int8", backend=backend, chunk_elems=1024,
                           durable=False) as store:
        enc = store.codec.encoder("cpu")
        for d in deltas:
            store.append_delta(d, encoder=enc)
        store.finalize({"w": start["w"] + sum(deltas)}, enc.residual)
    store = DeltaStore.open(tmp_path / "s")
    assert isinstance(store.codec, _Int8Codec) and store.info()["codec"] == "int8"
    report = verify_store(store)
    assert report["ok"], report["faults"]
    # the first step (no residual yet) reads back within half a quantisation step of its chunk's scale
    half_step = float(deltas[0].abs().max()) / 127 / 2
    assert (store.read_step(0) - deltas[0]).abs().max() <= half_step * 1.001
    undone = store.state_without([2])
    exact = start["w"] + sum(d for t, d in enumerate(deltas) if t != 2)
    assert (undone - exact).abs().max() < 5 * float(np.abs(deltas[2].numpy()).max()) / 127
    assert "int8" in codecs.codec_names()


def test_a_registered_codec_records_piece_by_piece_through_the_default_encode_piece(tmp_path, monkeypatch):
    from deltastore import StepStreamer
    monkeypatch.setattr(codecs, "_REGISTRY", dict(codecs._REGISTRY))
    codecs.register_codec(_Int8Codec)
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(3030, generator=g)}
    store = DeltaStore.create(tmp_path / "s", state, codec="int8", chunk_elems=512, durable=False)
    streamer = StepStreamer(store, state, device="cpu", piece_elems=1024)
    for t in range(4):
        state["w"] += 1e-3 * torch.randn(3030, generator=g)
        streamer.record(state, {"ids": np.array([t])})
    streamer.close()
    streamer.finalize(state)
    store = DeltaStore.open(tmp_path / "s")
    report = verify_store(store)
    assert report["ok"], report["faults"]
    assert store.num_steps == 4 and store.commit_record["codec_error"] < 0.05
