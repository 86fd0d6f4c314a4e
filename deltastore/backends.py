"""Storage backends: where the encoded streams of each step live.

A backend stores, per step, one fixed-length array per codec stream, and reads back any chunk-aligned range of it.
It never decides what is committed: the store's commit file does. Call order: ``create`` (or ``open``), then any
number of ``write_step`` for steps ``0, 1, ...`` (a step rewritten after a crash is overwritten whole), and
``read_range`` for committed steps only.

- :class:`ZarrBackend` (default): one Zarr v3 array per stream, shape (capacity, length), inner chunks aligned with
  the codec's data chunks, one shard per step written whole, blosc-compressed, every chunk and shard index
  checksummed (crc32c). Capacity grows in blocks by an atomic rewrite of the array metadata. Writes go through
  zarr; reads parse the shard file directly (index at its end, crc32c of the index and of every inner chunk
  checked, blosc/zstd decoded straight into the caller's buffer), because zarr's per-read overhead, not the disk or
  the decompressor, limited the reduce. Arrays whose metadata this reader does not recognise are read through zarr.
- :class:`SafetensorsBackend`: one uncompressed safetensors file per step; reads are zero-copy slices through
  ``safe_open``/``get_slice``; per-chunk crc32c values travel in the step log (returned by ``write_step``).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from numcodecs import blosc as _blosc
from zarr.codecs import BloscCodec, Crc32cCodec

from .codecs import StreamSpec
from .errors import CorruptionError, FormatError
from .fileio import atomic_write_bytes, crc32c, fsync_dir, fsync_path, read_json

CAPACITY_BLOCK = 4096  # steps added per growth of a Zarr array: growth is a metadata rewrite, cheap and rare


def _shuffle_for(dtype: str) -> str:
    # Measured on real MNIST-MLP deltas (benchmarks/RECORD.md, "compressor study"): byte-shuffle beats bit-shuffle
    # for every stream we write (fp32, fp16, bf16-as-uint16, top-k values and delta-coded indices) with zstd; the
    # low mantissa bits are noise either way, and byte-shuffle keeps the exponent byte whole for zstd to model.
    return "shuffle"


# Blosc's automatic block size at clevel 1 is small (tens of KiB); 1 MiB blocks let zstd see more context (fp16
# 0.383 -> 0.366 of raw fp32 on MNIST-MLP deltas) at the same or better speed. Higher clevels gained <= 0.015 more
# at less than half the speed (benchmarks/RECORD.md).
_BLOSC_BLOCK_BYTES = 1 << 20


class ZarrBackend:
    name = "zarr"

    def __init__(self, root: Path, streams: tuple[StreamSpec, ...], *, durable: bool):
        self.root, self.streams, self.durable = Path(root), {s.name: s for s in streams}, durable
        self.arrays = {name: self._open(name) for name in self.streams}
        self._shards = {name: _ShardFormat.from_metadata(self.root / name, spec) for name, spec in self.streams.items()}
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="deltastore-compress")

    def _open(self, name: str):
        # an all-zero step (a frozen model, lr 0) must still leave its shard file: with zarr's default
        # write_empty_chunks=False it would leave none, and a committed step without its file reads as damaged
        return zarr.open_array(self.root / name, mode="r+").with_config({"write_empty_chunks": True})

    @classmethod
    def create(cls, root: Path, streams: tuple[StreamSpec, ...], *, durable: bool) -> ZarrBackend:
        for s in streams:
            inner = max(1, s.per_chunk)
            zarr.create_array(
                store=str(Path(root) / s.name), shape=(CAPACITY_BLOCK, s.length), dtype=s.dtype,
                chunks=(1, inner), shards=(1, inner * -(-s.length // inner)), fill_value=0,
                compressors=[BloscCodec(cname="zstd", clevel=1, shuffle=_shuffle_for(s.dtype),
                                       blocksize=_BLOSC_BLOCK_BYTES), Crc32cCodec()],
                zarr_format=3)
        return cls(root, streams, durable=durable)

    def _shard_path(self, stream: str, step: int) -> Path:
        return self.root / stream / "c" / str(step) / "0"

    def step_files(self, step: int) -> list[str]:
        """The files holding ``step``, relative to the backend's root (a rewrite links them under new numbers)."""
        return [f"{name}/c/{step}/0" for name in self.streams]

    def metadata_files(self) -> list[str]:
        """The backend's files that describe every step (copied as they are into a rewritten generation)."""
        return [f"{name}/zarr.json" for name in self.streams]

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
            self.arrays[name] = self._open(name)

    def write_step(self, step: int, streams: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._grow(step + 1)
        for name, data in streams.items():
            fmt, path = self._shards[name], self._shard_path(name, step)
            if fmt is not None and fmt.blosc is not None:
                # the shard file zarr would write, encoded and written by us: zarr's per-call machinery cost more
                # than compressing a small model's step (benchmarks/RECORD.md); tests check zarr reads it back
                shard = fmt.encode(data, self._pool)
                new_dir = not path.parent.exists()
                path.parent.mkdir(parents=True, exist_ok=True)
                if new_dir and self.durable:
                    fsync_dir(path.parent.parent)  # the new c/<step>/ entry itself must survive a power loss
                with open(path, "wb") as f:
                    f.write(shard)
                    if self.durable:
                        f.flush()
                        os.fsync(f.fileno())
            else:
                self.arrays[name][step, :] = data
                if self.durable:
                    fsync_path(path)
            if self.durable:
                fsync_dir(path.parent)
        return {}

    def read_range(self, step: int, stream: str, lo: int, hi: int, side: dict[str, np.ndarray], *,
                   out: np.ndarray | None = None) -> np.ndarray:
        """Elements ``[lo, hi)`` of ``stream`` at ``step``; decoded into ``out`` (any dtype-compatible buffer of at
        least :meth:`buffer_elems` elements) when given, so a caller can reuse or pin its buffers."""
        path, fmt = self._shard_path(stream, step), self._shards[stream]
        if fmt is None:
            # a missing shard would read as zeros (zarr's fill value): a committed step must have its file
            if not path.exists():
                raise CorruptionError("the data file is missing", path=path, step=step, stream=stream)
            try:
                data = self.arrays[stream][step, lo:hi]
            except (ValueError, RuntimeError, OSError, KeyError, IndexError) as e:  # zarr's checksum and codec errors
                raise CorruptionError(f"the data file cannot be decoded ({type(e).__name__}: {str(e)[:200]})",
                                      path=path, step=step, stream=stream) from None
            if out is None:
                return data
            view = np.asarray(out).view(data.dtype).reshape(-1)[:hi - lo]
            view[:] = data
            return view
        return fmt.read(path, step, stream, lo, hi, out)

    def buffer_elems(self, stream: str, lo: int, hi: int) -> int:
        """How many elements an ``out`` buffer for :meth:`read_range` of ``[lo, hi)`` must hold."""
        fmt = self._shards[stream]
        if fmt is None:
            return hi - lo
        return (-(-hi // fmt.inner) - lo // fmt.inner) * fmt.inner


_SHUFFLES = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}
_EMPTY = np.uint64(2 ** 64 - 1)  # zarr's shard index marks an absent inner chunk with (2**64-1, 2**64-1)
_scratch = threading.local()


@dataclass(frozen=True)
class _ShardFormat:
    """How to read one stream's shard files without zarr: the layout zarr v3's ``sharding_indexed`` codec writes.

    A shard file is the encoded inner chunks back to back, then the index: ``(offset, nbytes)`` as little-endian
    uint64 per inner chunk, then the crc32c of the index. Each inner chunk is ``bytes -> [blosc|zstd] -> crc32c``,
    so its last 4 bytes are the crc32c of the rest.
    """

    inner: int  # elements per inner chunk
    per_shard: int  # inner chunks per shard (one shard holds one step's whole row)
    dtype: np.dtype
    compressor: str  # "blosc", "zstd" or "" (stored raw)
    fill: float
    blosc: tuple | None = None  # (cname, clevel, shuffle, blocksize) when compressor == "blosc": what encode uses

    @classmethod
    def from_metadata(cls, array_dir: Path, spec: StreamSpec) -> _ShardFormat | None:
        """The format, or None when the array is not laid out the way this reader understands (then zarr reads)."""
        try:
            meta = read_json(array_dir / "zarr.json", "zarr array metadata")
            (shard,) = meta["codecs"]
            conf = shard["configuration"]
            inner_shape, shard_shape = conf["chunk_shape"], meta["chunk_grid"]["configuration"]["chunk_shape"]
            codecs, index_codecs = [c["name"] for c in conf["codecs"]], [c["name"] for c in conf["index_codecs"]]
            dtype = np.dtype(meta["data_type"])
            ok = (shard["name"] == "sharding_indexed" and conf.get("index_location", "end") == "end"
                  and meta["chunk_grid"]["name"] == "regular" and inner_shape[0] == 1 and shard_shape[0] == 1
                  and shard_shape[1] % inner_shape[1] == 0 and shard_shape[1] >= meta["shape"][1]
                  and dtype == np.dtype(spec.dtype) and meta["shape"][1] == spec.length
                  and index_codecs == ["bytes", "crc32c"] and codecs[0] == "bytes" and codecs[-1] == "crc32c"
                  and codecs[1:-1] in ([], ["blosc"], ["zstd"])
                  and all(c.get("configuration", {}).get("endian", "little") == "little"
                          for c in conf["codecs"] + conf["index_codecs"] if c["name"] == "bytes"))
            if not ok:
                return None
            blosc = None
            if codecs[1:-1] == ["blosc"]:
                b = conf["codecs"][1]["configuration"]
                blosc = (str(b["cname"]), int(b["clevel"]), _SHUFFLES[b["shuffle"]], int(b.get("blocksize", 0)))
            return cls(inner_shape[1], shard_shape[1] // inner_shape[1], dtype, "".join(codecs[1:-1]),
                       float(meta.get("fill_value") or 0), blosc)
        except (KeyError, TypeError, ValueError, IndexError, OSError):
            return None

    def encode(self, data: np.ndarray, pool: ThreadPoolExecutor | None) -> bytes:
        """One step's row as the shard file zarr would write: every inner chunk ``blosc`` + crc32c, then the index.

        Only used for blosc arrays (ours); chunks are compressed on ``pool`` (blosc releases the GIL). The last
        inner chunk is padded with the fill value, as zarr pads it.
        """
        row = np.ascontiguousarray(data, dtype=self.dtype).reshape(-1)
        padded = self.per_shard * self.inner
        if row.size != padded:
            row = np.concatenate([row, np.full(padded - row.size, self.fill, self.dtype)])
        cname, clevel, shuffle, blocksize = self.blosc
        chunks = [row[i * self.inner:(i + 1) * self.inner] for i in range(self.per_shard)]

        def encode_chunk(chunk: np.ndarray) -> bytes:
            body = _blosc.compress(chunk, cname.encode(), clevel, shuffle, blocksize)
            return body + crc32c(body).to_bytes(4, "little")

        parts = list(pool.map(encode_chunk, chunks)) if pool is not None and len(chunks) > 1 else \
            [encode_chunk(c) for c in chunks]
        index, offset = np.empty((self.per_shard, 2), "<u8"), 0
        for i, part in enumerate(parts):
            index[i] = offset, len(part)
            offset += len(part)
        raw_index = index.tobytes()
        return b"".join(parts) + raw_index + crc32c(raw_index).to_bytes(4, "little")

    def read(self, path: Path, step: int, stream: str, lo: int, hi: int, out: np.ndarray | None) -> np.ndarray:
        first, last = lo // self.inner, -(-hi // self.inner)
        need = (last - first) * self.inner
        if out is None:
            dst = np.empty(need, self.dtype)
        else:
            dst = np.asarray(out).reshape(-1).view(self.dtype)
            if dst.size < need:
                raise ValueError(f"out holds {dst.size} elements; reading [{lo}, {hi}) needs {need}")
            dst = dst[:need]
        where = {"path": path, "step": step, "stream": stream}
        try:
            # never follow a link planted in a run directory, never block on a FIFO posing as a shard
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise CorruptionError("the data file is missing", **where) from None
        except OSError as e:  # ELOOP (a link), EACCES, EIO: the step's data cannot be had
            raise CorruptionError(f"the data file cannot be opened ({e.strerror or e})", **where) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptionError("the data file is not a regular file", **where)
            size = st.st_size
            index_bytes = self.per_shard * 16 + 4
            if size < index_bytes:
                raise CorruptionError(f"the data file is truncated ({size} bytes)", **where)
            raw = os.pread(fd, index_bytes, size - index_bytes)
            if len(raw) != index_bytes or crc32c(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
                raise CorruptionError("the shard index fails its crc32c checksum", **where)
            index = np.frombuffer(raw, "<u8", count=2 * self.per_shard).reshape(-1, 2)
            chunk_bytes = self.inner * self.dtype.itemsize
            for k, c in enumerate(range(first, last)):
                target = dst[k * self.inner:(k + 1) * self.inner]
                offset, nbytes = index[c]
                if offset == _EMPTY and nbytes == _EMPTY:
                    target.fill(self.fill)
                    continue
                offset, nbytes = int(offset), int(nbytes)
                if nbytes < 4 or offset + nbytes > size - index_bytes:
                    raise CorruptionError("the shard index points outside the file", chunk=c, **where)
                buf = _scratch_view(nbytes)
                if os.preadv(fd, [buf], offset) != nbytes:
                    raise CorruptionError("the chunk is truncated", chunk=c, **where)
                body = buf[:-4]
                if crc32c(body) != int.from_bytes(buf[-4:], "little"):
                    raise CorruptionError("the chunk fails its crc32c checksum", chunk=c, **where)
                self._decode(body, target.view(np.uint8), chunk_bytes, {"chunk": c, **where})
        except OSError as e:  # EIO on a failing disk: the data cannot be had
            raise CorruptionError(f"the data file cannot be read ({e.strerror or e})", **where) from None
        finally:
            os.close(fd)
        return dst[lo - first * self.inner:hi - first * self.inner]

    def _decode(self, body: memoryview, target: np.ndarray, nbytes: int, where: dict) -> None:
        if self.compressor == "blosc":
            # blosc's 16-byte header: version, versionlz, flags, typesize, then uint32 nbytes, blocksize, cbytes
            if (len(body) < 16 or int.from_bytes(body[4:8], "little") != nbytes
                    or int.from_bytes(body[12:16], "little") != len(body)):
                raise CorruptionError("the chunk decodes to the wrong size", **where)
            try:
                _blosc.decompress(body, target)
            except RuntimeError as e:  # a crc-valid but crafted blosc stream
                raise CorruptionError(f"the chunk cannot be decompressed ({e})", **where) from None
        elif self.compressor == "zstd":
            from numcodecs import Zstd
            try:
                data = Zstd().decode(body)
            except RuntimeError as e:
                raise CorruptionError(f"the chunk cannot be decompressed ({e})", **where) from None
            if len(data) != nbytes:
                raise CorruptionError("the chunk decodes to the wrong size", **where)
            target[:] = np.frombuffer(data, np.uint8)
        else:
            if len(body) != nbytes:
                raise CorruptionError("the chunk has the wrong size", **where)
            target[:] = np.frombuffer(body, np.uint8)


def _scratch_view(nbytes: int) -> memoryview:
    """A per-thread reusable read buffer of ``nbytes`` (the encoded chunk is read into it, then decoded out)."""
    buf = getattr(_scratch, "buf", None)
    if buf is None or len(buf) < nbytes:
        buf = _scratch.buf = bytearray(max(nbytes, 1 << 20))
    return memoryview(buf)[:nbytes]


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

    def step_files(self, step: int) -> list[str]:
        """The files holding ``step``, relative to the backend's root (a rewrite links them under new numbers)."""
        return [self._path(step).name]

    def metadata_files(self) -> list[str]:
        return []

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

    def read_range(self, step: int, stream: str, lo: int, hi: int, side: dict[str, np.ndarray], *,
                   out: np.ndarray | None = None) -> np.ndarray:
        spec, path = self.streams[stream], self._path(step)
        try:
            with safe_open(str(path), framework="numpy") as f:
                # safetensors refuses the slice [0:0] of an empty tensor (a model with no floating tensors)
                data = f.get_slice(stream)[lo:hi] if hi > lo else np.zeros(0, spec.dtype)
        except FileNotFoundError:
            raise CorruptionError("the data file is missing", path=path, step=step, stream=stream) from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # damaged headers, short files
            raise CorruptionError(f"the data file is damaged ({type(e).__name__}: {str(e)[:200]})", path=path,
                                  step=step, stream=stream) from None
        if data.size != hi - lo:
            raise CorruptionError("the data file holds too few elements", path=path, step=step, stream=stream)
        # the store hands side arrays over without their leading '_' (the step log's field is "_crc_<stream>")
        crcs = side.get(f"crc_{stream}", side.get(f"_crc_{stream}"))
        if crcs is None:
            raise CorruptionError("the step log holds no chunk checksums", step=step, stream=stream)
        per = spec.per_chunk
        for c in range(lo // per, -(-hi // per)):
            part = data[c * per - lo:min((c + 1) * per, hi) - lo]
            if c >= len(crcs) or crc32c(np.ascontiguousarray(part).view(np.uint8)) != int(crcs[c]):
                raise CorruptionError("the chunk fails its crc32c checksum", path=path, step=step, stream=stream,
                                      chunk=c)
        if out is None:
            return data
        view = np.asarray(out).reshape(-1).view(data.dtype)[:hi - lo]
        view[:] = data
        return view


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
