"""Storage backends: where the encoded streams of each step live.

A backend stores, per step, one fixed-length array per codec stream, and reads back any chunk-aligned range of it.
It never decides what is committed: the store's commit file does. Call order: ``create`` (or ``open``), then any
number of ``write_step`` for steps ``0, 1, ...`` (a step rewritten after a crash is overwritten whole), and
``read_range`` for committed steps only.

- :class:`ZarrBackend` (default): one Zarr v3 array per stream, shape (capacity, length), inner chunks aligned with
  the codec's data chunks, one shard per step written whole, blosc-compressed, every chunk and shard index
  checksummed (crc32c). Capacity grows in blocks by an atomic rewrite of the array metadata.
- :class:`SafetensorsBackend`: one uncompressed safetensors file per step; reads are zero-copy slices through
  ``safe_open``/``get_slice``; per-chunk crc32c values travel in the step log (returned by ``write_step``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import zarr
from safetensors import safe_open
from safetensors.numpy import save_file
from zarr.codecs import BloscCodec, Crc32cCodec

from .codecs import StreamSpec
from .errors import CorruptionError, FormatError
from .fileio import atomic_write_bytes, crc32c, fsync_dir, fsync_path, read_json

CAPACITY_BLOCK = 4096  # steps added per growth of a Zarr array: growth is a metadata rewrite, cheap and rare


def _shuffle_for(dtype: str) -> str:
    # Measured on real MNIST/digits deltas (benchmarks/README.md): bit-shuffle packs float exponent bits together
    # and wins for floats; byte-shuffle suits the small delta-coded top-k indices.
    return "shuffle" if dtype.startswith("int") else "bitshuffle"


class ZarrBackend:
    name = "zarr"

    def __init__(self, root: Path, streams: tuple[StreamSpec, ...], *, durable: bool):
        self.root, self.streams, self.durable = Path(root), {s.name: s for s in streams}, durable
        self.arrays = {name: zarr.open_array(self.root / name, mode="r+") for name in self.streams}

    @classmethod
    def create(cls, root: Path, streams: tuple[StreamSpec, ...], *, durable: bool) -> ZarrBackend:
        for s in streams:
            inner = max(1, s.per_chunk)
            zarr.create_array(
                store=str(Path(root) / s.name), shape=(CAPACITY_BLOCK, s.length), dtype=s.dtype,
                chunks=(1, inner), shards=(1, inner * -(-s.length // inner)), fill_value=0,
                compressors=[BloscCodec(cname="zstd", clevel=1, shuffle=_shuffle_for(s.dtype)), Crc32cCodec()],
                zarr_format=3)
        return cls(root, streams, durable=durable)

    def _shard_path(self, stream: str, step: int) -> Path:
        return self.root / stream / "c" / str(step) / "0"

    def _grow(self, needed_steps: int) -> None:
        for name, arr in self.arrays.items():
            capacity = arr.shape[0]
            if needed_steps <= capacity:
                continue
            meta_path = self.root / name / "zarr.json"
            meta = read_json(meta_path, "zarr array metadata")
            meta["shape"][0] = -(-needed_steps // CAPACITY_BLOCK) * CAPACITY_BLOCK
            # zarr's own resize writes zarr.json in place; a crash mid-write would lose the array, so we replace
            # the file atomically instead and reopen
            atomic_write_bytes(meta_path, json.dumps(meta, indent=2).encode(), durable=self.durable)
            self.arrays[name] = zarr.open_array(self.root / name, mode="r+")

    def write_step(self, step: int, streams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._grow(step + 1)
        for name, data in streams.items():
            self.arrays[name][step, :] = data
            if self.durable:
                path = self._shard_path(name, step)
                fsync_path(path)
                fsync_dir(path.parent)
        return {}

    def read_range(self, step: int, stream: str, lo: int, hi: int, side: dict[str, np.ndarray]) -> np.ndarray:
        # a missing shard would read as zeros (zarr's fill value): a committed step must have its file
        if not self._shard_path(stream, step).exists():
            raise CorruptionError(f"the data file of step {step} (stream {stream!r}) is missing")
        return self.arrays[stream][step, lo:hi]


class SafetensorsBackend:
    name = "safetensors"

    def __init__(self, root: Path, streams: tuple[StreamSpec, ...], *, durable: bool):
        self.root, self.streams, self.durable = Path(root), {s.name: s for s in streams}, durable

    @classmethod
    def create(cls, root: Path, streams: tuple[StreamSpec, ...], *, durable: bool) -> SafetensorsBackend:
        Path(root).mkdir(parents=True, exist_ok=True)
        return cls(root, streams, durable=durable)

    def _path(self, step: int) -> Path:
        return self.root / f"step-{step:010d}.safetensors"

    def write_step(self, step: int, streams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        path = self._path(step)
        save_file({k: np.ascontiguousarray(v) for k, v in streams.items()}, str(path))
        if self.durable:
            fsync_path(path)
            fsync_dir(self.root)
        return {f"_crc_{name}": self._chunk_crcs(self.streams[name], data) for name, data in streams.items()}

    @staticmethod
    def _chunk_crcs(spec: StreamSpec, data: np.ndarray) -> np.ndarray:
        raw = np.ascontiguousarray(data).view(np.uint8)
        step_bytes = spec.per_chunk * data.itemsize
        return np.array([crc32c(raw[i:i + step_bytes]) for i in range(0, raw.size, step_bytes)] or [0], np.uint32)

    def read_range(self, step: int, stream: str, lo: int, hi: int, side: dict[str, np.ndarray]) -> np.ndarray:
        spec, path = self.streams[stream], self._path(step)
        try:
            with safe_open(str(path), framework="numpy") as f:
                data = f.get_slice(stream)[lo:hi]
        except FileNotFoundError:
            raise CorruptionError(f"the data file of step {step} is missing: {path}") from None
        except Exception as e:  # safetensors raises its own error types for damaged headers and short files
            raise CorruptionError(f"the data file of step {step} is damaged ({type(e).__name__}: {e})") from None
        if data.size != hi - lo:
            raise CorruptionError(f"the data file of step {step} holds too few elements of {stream!r}")
        crcs = side.get(f"_crc_{stream}")
        if crcs is not None:
            per = spec.per_chunk
            for c in range(lo // per, -(-hi // per)):
                part = data[c * per - lo:min((c + 1) * per, hi) - lo]
                if crc32c(np.ascontiguousarray(part).view(np.uint8)) != int(crcs[c]):
                    raise CorruptionError(f"chunk {c} of step {step} (stream {stream!r}) fails its crc32c checksum")
        return data


BACKENDS = {"zarr": ZarrBackend, "safetensors": SafetensorsBackend}


def backend_class(name: str):
    try:
        return BACKENDS[name]
    except KeyError:
        raise FormatError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}") from None


def directory_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            try:
                total += os.stat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total
