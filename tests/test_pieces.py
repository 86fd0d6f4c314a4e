"""Steps written piece by piece (issue 15) are the same files a whole-step write makes, and commit whole or not at
all."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from deltastore import DeltaStore


def _encoded(store, seed: int):
    enc = store.codec.encoder(torch.device("cpu"))
    streams, side = enc.encode(torch.randn(store.layout.numel, generator=torch.Generator().manual_seed(seed)))
    conv = lambda t: (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()  # noqa: E731
    return {k: conv(v) for k, v in streams.items()}, {k: conv(v) for k, v in side.items()}


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
@pytest.mark.parametrize("codec", ["fp32", "fp16", "bf16", "topk:0.2"])
def test_pieces_make_the_same_files_as_a_whole_step(tmp_path, backend, codec):
    start = {"w": torch.zeros(1000), "b": torch.zeros(30)}
    whole = DeltaStore.create(tmp_path / "whole", start, codec=codec, backend=backend, chunk_elems=96,
                              durable=False)
    piecewise = DeltaStore.create(tmp_path / "pieces", start, codec=codec, backend=backend, chunk_elems=96,
                                  durable=False)
    nc = whole.codec.num_chunks
    for t in range(3):
        streams, side = _encoded(whole, t)
        whole.append(streams, side, {"ids": np.array([t])})
        step = piecewise.begin_step()
        for c0 in range(0, nc, 4):
            c1 = min(c0 + 4, nc)
            step.write(c0, c1, {s.name: streams[s.name][slice(*s.chunk_range(c0, c1))]
                                for s in whole.codec.streams()}, {k: v[c0:c1] for k, v in side.items()})
        assert step.commit({"ids": np.array([t])}) == t
        assert torch.equal(whole.read_step(t), piecewise.read_step(t))
        assert whole.side_arrays(t).keys() == piecewise.side_arrays(t).keys()
        for k, v in whole.side_arrays(t).items():
            np.testing.assert_array_equal(v, piecewise.side_arrays(t)[k])
    if backend == "zarr":
        for s in whole.codec.streams():
            for t in range(3):
                a = (tmp_path / "whole" / "deltas" / s.name / "c" / str(t) / "0").read_bytes()
                b = (tmp_path / "pieces" / "deltas" / s.name / "c" / str(t) / "0").read_bytes()
                assert a == b, f"stream {s.name} step {t}: the shard files differ"
            arr = zarr.open_array(tmp_path / "pieces" / "deltas" / s.name, mode="r")  # zarr itself reads them
            np.testing.assert_array_equal(arr[2, :].view(np.uint8), _encoded(whole, 2)[0][s.name].view(np.uint8))


def test_an_abandoned_step_leaves_nothing_and_its_number_is_written_again(tmp_path):
    store = DeltaStore.create(tmp_path / "s", {"w": torch.zeros(500)}, codec="fp16", chunk_elems=100,
                              durable=False)
    streams, side = _encoded(store, 0)
    step = store.begin_step()
    step.write(0, 2, {"data": streams["data"][:200]}, {"scale": side["scale"][:2]})
    with pytest.raises(Exception, match="out of order"):
        step.write(3, 5, {"data": streams["data"][300:]}, {"scale": side["scale"][3:]})
    with pytest.raises(Exception, match="incomplete"):
        step.commit({})
    step.abort()
    assert store.num_steps == 0
    store.append(streams, side, {})
    reopened = DeltaStore.open(tmp_path / "s")
    assert reopened.num_steps == 1
    want = torch.zeros(500)
    store.codec.accumulate(want, 0, 5, streams, side)
    assert torch.equal(reopened.read_step(0), want)
