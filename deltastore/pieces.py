"""Writing one step piece by piece: the encoded streams arrive in runs of whole data chunks, in order, and go to
the step's files as they arrive; the step is committed whole at the end (or abandoned, leaving nothing visible).

This is what keeps recording's memory independent of the model's size: no buffer ever holds a whole step. The
commit protocol is the store's (see ``store.py``): the step's files are complete and durable before its step-log
record, which comes before the commit file. A step abandoned half-way leaves files that no commit names; the next
attempt at that step number overwrites them.

- Zarr (our blosc layout): each stream's shard file is written front to back: each inner chunk compressed (on the
  backend's thread pool; blosc releases the GIL) and appended as it arrives, the shard index and its crc32c last.
  The bytes are exactly those of :meth:`ZarrBackend.write_step` (tests read both back through zarr itself).
- Zarr arrays laid out some other way: each piece is written through zarr (a partial write rewrites the shard).
- safetensors: the header is known up front (fixed stream lengths), so each piece is written at its place in the
  file; the per-chunk crc32c values go to the step log as before.

Example:
    >>> import tempfile, numpy as np, torch
    >>> from deltastore import DeltaStore
    >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(6)}, chunk_elems=2, durable=False)
    >>> step = store.begin_step()
    >>> for c0 in range(3):
    ...     step.write(c0, c0 + 1, {"data": np.full(2, c0, np.float32)}, {})
    >>> step.commit({"ids": np.array([5])}), store.read_step(0).tolist()
    (0, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from numcodecs import blosc as _blosc

from .errors import DeltaStoreError
from .fileio import crc32c, fsync_dir, fsync_path

_EMPTY = np.uint64(2 ** 64 - 1)


class StepAppender:
    """One step of ``store`` being written: :meth:`write` each piece (chunks in order), then :meth:`commit`."""

    def __init__(self, store):
        self.store, self.step = store, store.num_steps
        self.codec = store.codec
        self._next_chunk = 0
        self._side = {k: np.zeros(n, np.float32) for k, n in self.codec.side_arrays().items()}
        self._files = begin_backend_step(store.backend, self.step)

    def write(self, c0: int, c1: int, streams: Mapping[str, np.ndarray], side: Mapping[str, np.ndarray]) -> None:
        """Write data chunks ``[c0, c1)``: ``streams`` hold exactly their stream elements, ``side`` their values
        (or the step's whole side arrays)."""
        if c0 != self._next_chunk or not c0 < c1 <= self.codec.num_chunks:
            raise DeltaStoreError(f"piece [{c0}, {c1}) out of order: step {self.step} continues at chunk "
                                  f"{self._next_chunk} of {self.codec.num_chunks}")
        for s in self.codec.streams():
            lo, hi = s.chunk_range(c0, c1)
            data = np.asarray(streams[s.name]).reshape(-1)
            if data.size != hi - lo:
                raise DeltaStoreError(f"stream {s.name!r} of chunks [{c0}, {c1}) must hold {hi - lo} elements, "
                                      f"not {data.size}")
            self._files.write(s.name, lo, data.view(s.dtype) if data.dtype.itemsize == np.dtype(s.dtype).itemsize
                              else data.astype(s.dtype))
        for k, v in side.items():
            v = np.asarray(v, np.float32).reshape(-1)
            self._side[k][c0:c1] = v if v.size == c1 - c0 else v[c0:c1]
        self._next_chunk = c1

    def commit(self, metadata: Mapping[str, np.ndarray]) -> int:
        """Finish the step's files (durably when the store is durable) and commit it; returns its number."""
        if self._next_chunk != self.codec.num_chunks:
            raise DeltaStoreError(f"step {self.step} is incomplete: chunks {self._next_chunk}.. were never written")
        return self.store._commit_step(self.step, metadata, self._side, self._files.finish)

    def abort(self) -> None:
        """Give up the step: close its files; nothing of it is committed."""
        self._files.abort()


def begin_backend_step(backend, step: int):
    """The piece writer of ``backend`` for ``step`` (zarr, safetensors, or any backend with ``begin_step``)."""
    own = getattr(backend, "begin_step", None)
    if own is not None:
        return own(step)
    if getattr(backend, "name", None) == "zarr":
        return _ZarrStep(backend, step)
    if getattr(backend, "name", None) == "safetensors":
        return _SafetensorsStep(backend, step)
    return _Gathered(backend, step)


class _Gathered:
    """Fallback for a backend without piece writing: gathers the step, then ``write_step`` (whole-step memory)."""

    def __init__(self, backend, step: int):
        self.backend, self.step = backend, step
        self.arrays = {name: np.zeros(spec.length, spec.dtype) for name, spec in backend.streams.items()}

    def write(self, name: str, lo: int, data: np.ndarray) -> None:
        self.arrays[name][lo:lo + data.size] = data

    def finish(self) -> dict:
        return self.backend.write_step(self.step, self.arrays)

    def abort(self) -> None:
        self.arrays = {}


class _ZarrStep:
    def __init__(self, backend, step: int):
        self.backend, self.step = backend, step
        backend._grow(step + 1)
        self.open: dict[str, tuple] = {}  # stream -> (file, index, bytes written, next inner chunk)

    def write(self, name: str, lo: int, data: np.ndarray) -> None:
        b = self.backend
        fmt = b._shards[name]
        if fmt is None or fmt.blosc is None:  # not our layout: zarr writes it (rewriting the shard each time)
            b.arrays[name][self.step, lo:lo + data.size] = data
            self.open.setdefault(name, None)
            return
        if name not in self.open:
            path = b._shard_path(name, self.step)
            new_dir = not path.parent.exists()
            path.parent.mkdir(parents=True, exist_ok=True)
            if new_dir and b.durable:
                fsync_dir(path.parent.parent)  # the new c/<step>/ entry itself must survive a power loss
            index = np.full((fmt.per_shard, 2), _EMPTY, "<u8")
            self.open[name] = [open(path, "wb"), index, 0, 0]
        f, index, offset, expected = self.open[name]
        first = lo // fmt.inner
        if lo % fmt.inner or first != expected:
            raise DeltaStoreError(f"stream {name!r}: piece at element {lo} is not the next inner chunk")
        chunks = []
        for i in range(0, data.size, fmt.inner):
            chunk = np.ascontiguousarray(data[i:i + fmt.inner], dtype=fmt.dtype)
            if chunk.size != fmt.inner:  # the stream's last inner chunk is padded, as zarr pads it
                chunk = np.concatenate([chunk, np.full(fmt.inner - chunk.size, fmt.fill, fmt.dtype)])
            chunks.append(chunk)
        cname, clevel, shuffle, blocksize = fmt.blosc

        def encode(chunk: np.ndarray) -> bytes:
            body = _blosc.compress(chunk, cname.encode(), clevel, shuffle, blocksize)
            return body + crc32c(body).to_bytes(4, "little")

        parts = list(b._pool.map(encode, chunks)) if len(chunks) > 1 else [encode(c) for c in chunks]
        for k, part in enumerate(parts):
            f.write(part)
            index[first + k] = offset, len(part)
            offset += len(part)
        self.open[name][2:] = [offset, first + len(parts)]

    def finish(self) -> dict:
        b = self.backend
        for name, state in self.open.items():
            path = b._shard_path(name, self.step)
            if state is None:
                if b.durable:
                    fsync_path(path)
            else:
                f, index, _, written = state
                if written != b._shards[name].per_shard:
                    raise DeltaStoreError(f"stream {name!r} of step {self.step} is incomplete")
                raw = index.tobytes()
                f.write(raw + crc32c(raw).to_bytes(4, "little"))
                if b.durable:
                    f.flush()
                    os.fsync(f.fileno())
                f.close()
            if b.durable:
                fsync_dir(path.parent)
        self.open = {}
        return {}

    def abort(self) -> None:
        for state in self.open.values():
            if state is not None:
                state[0].close()
        self.open = {}


_ST_DTYPES = {"float32": "F32", "float16": "F16", "uint16": "U16", "int32": "I32"}


class _SafetensorsStep:
    def __init__(self, backend, step: int):
        self.backend, self.step = backend, step
        header, offset, self.offsets = {}, 0, {}
        for name, spec in backend.streams.items():
            nbytes = spec.length * np.dtype(spec.dtype).itemsize
            header[name] = {"dtype": _ST_DTYPES[spec.dtype], "shape": [spec.length],
                            "data_offsets": [offset, offset + nbytes]}
            self.offsets[name] = offset
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base = 8 + len(raw)
        self.path: Path = backend._path(step)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.pwrite(self.fd, len(raw).to_bytes(8, "little") + raw, 0)
        os.ftruncate(self.fd, self.base + offset)
        self.crcs: dict[str, list[int]] = {name: [] for name in backend.streams}

    def write(self, name: str, lo: int, data: np.ndarray) -> None:
        spec = self.backend.streams[name]
        raw = np.ascontiguousarray(data, dtype=spec.dtype).view(np.uint8)
        os.pwrite(self.fd, raw, self.base + self.offsets[name] + lo * np.dtype(spec.dtype).itemsize)
        step_bytes = spec.per_chunk * np.dtype(spec.dtype).itemsize
        self.crcs[name] += [crc32c(raw[i:i + step_bytes]) for i in range(0, raw.size, step_bytes)]

    def finish(self) -> dict:
        if self.backend.durable:
            os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        if self.backend.durable:
            fsync_dir(self.backend.root)
        return {f"_crc_{name}": np.array(c or [0], np.uint32) for name, c in self.crcs.items()}

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
