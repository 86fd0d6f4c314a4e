"""Errors carry data: a damaged chunk's CorruptionError names step, stream, chunk, tensors and file in fields set where
each is known; a bug (AttributeError, TypeError) is never reported as damage; a missing device is its own error."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from deltastore import (PROGRAMMING_ERRORS, CorruptionError, DeltaStore, DeviceUnavailableError,
                        InvalidArgumentError, resolve_device)
from deltastore.verify import verify_store

CHUNK = 1024


def _store(path: Path, backend: str = "zarr", codec: str = "fp32") -> DeltaStore:
    """Three steps over tensors 'a' (chunk 0 and part of 1) and 'b' (the rest of chunk 1 and chunk 2)."""
    start = {"a": torch.zeros(1500), "b": torch.zeros(1100)}
    g = torch.Generator().manual_seed(0)
    with DeltaStore.create(path, start, codec=codec, backend=backend, chunk_elems=CHUNK, durable=False) as store:
        for _ in range(3):
            store.append_delta(torch.randn(2600, generator=g))
        store.finalize(start)
    return DeltaStore.open(path)


def _flip_in_last_chunk(store: DeltaStore, step: int) -> Path:
    """Flip one bit of ``step``'s data inside data chunk 2 (tensor 'b' only); returns the file."""
    if store.meta["backend"] == "zarr":
        shard = store.path / "deltas" / "data" / "c" / str(step) / "0"
        index = np.frombuffer(shard.read_bytes()[-(3 * 16 + 4):-4], "<u8").reshape(-1, 2)
        pos = int(index[2, 0]) + 20  # inside the third inner chunk's compressed body
    else:
        shard = store.path / "deltas" / f"step-{step:010d}.safetensors"
        pos = shard.stat().st_size - 8  # the last elements of the vector: chunk 2
    data = bytearray(shard.read_bytes())
    data[pos] ^= 0x08
    shard.write_bytes(bytes(data))
    return shard


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_damage_carries_its_location_in_fields(tmp_path, backend):
    store = _store(tmp_path / "s", backend)
    shard = _flip_in_last_chunk(store, 1)
    with pytest.raises(CorruptionError) as info:
        store.sum_steps([0, 1, 2])
    e = info.value
    assert (e.step, e.stream, e.chunk, e.tensors) == (1, "data", 2, ("b",))
    assert Path(e.path) == shard and Path(e.store_path) == store.path
    assert str(e).startswith("step 1, tensor 'b' (data chunk 2, stream 'data'): ")
    assert f"deltastore verify {store.path}" in str(e)
    report = verify_store(store)
    assert report["damaged_steps"] == [1]
    assert report["faults"][0].startswith("step 1, tensor 'b' (data chunk 2, stream 'data'): "), report["faults"]
    # the same exception crosses a process boundary with its fields
    again = pickle.loads(pickle.dumps(e))
    assert (again.step, again.chunk, again.tensors, str(again)) == (e.step, e.chunk, e.tensors, str(e))


def test_context_is_added_once():
    e = CorruptionError("the chunk is truncated", step=3, chunk=1)
    e.add_context(step=7, stream="values", tensors=["w"])
    assert (e.step, e.stream, e.tensors, e.chunk) == (3, "values", ("w",), 1)
    with pytest.raises(TypeError):
        e.add_context(colour="red")


def test_a_bug_in_a_backend_is_not_reported_as_damage(tmp_path, monkeypatch):
    store = _store(tmp_path / "s")

    def broken(self, *args, **kwargs):
        raise AttributeError("'NoneType' object has no attribute 'read'")

    monkeypatch.setattr(type(store.backend), "read_range", broken)
    for call in (lambda: store.sum_steps([0]), lambda: store.state_without([1]), lambda: verify_store(store)):
        with pytest.raises(AttributeError, match="NoneType"):
            call()
    assert AttributeError in PROGRAMMING_ERRORS and TypeError in PROGRAMMING_ERRORS


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_cuda_without_cuda_says_so(tmp_path):
    store = _store(tmp_path / "s")
    for call in (lambda: store.state_without([1], device="cuda"), lambda: store.sum_steps([0], device="cuda:0"),
                 lambda: store.read_snapshot_flat("final", "cuda")):
        with pytest.raises(DeviceUnavailableError, match="CUDA is not available"):
            call()
    assert issubclass(DeviceUnavailableError, InvalidArgumentError)
    assert not issubclass(DeviceUnavailableError, CorruptionError)


def test_device_names_are_checked():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(InvalidArgumentError, match="not a device"):
        resolve_device("gpu please")
    if torch.cuda.is_available():
        with pytest.raises(DeviceUnavailableError, match="not available"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
