"""Snapshots (start, final, residual) written and read tensor by tensor, never as a full extra copy of the state.

The files are ordinary safetensors files (an 8-byte header length, a JSON header, the tensors' bytes), so any
safetensors reader opens them. Writing streams each tensor's bytes to a temporary file as it goes (a CPU tensor
straight from its memory, a device tensor copied over in pieces of :data:`PIECE_BYTES`; a tensor may also be given
as a function producing its pieces, like a residual computed piece by piece), computing the crc32c on the way, then
renames the file into place. Reading checks the file's size and crc32c in bounded reads, validates the header, and
reads any element range of any tensor with ``pread``: a reader never holds more than what it asked for.

Example:
    >>> import tempfile, pathlib, torch
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.safetensors"
    >>> crc, size = write_snapshot(path, {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor([7])},
    ...                            durable=False)
    >>> with SnapshotFile(path, expected_crc=crc, expected_size=size) as snap:
    ...     snap.read_range("w", 2, 5).tolist(), snap.tensor("n").tolist(), snap.shape("w")
    ([2.0, 3.0, 4.0], [7], (2, 3))
"""

from __future__ import annotations

import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import torch

from .errors import CorruptionError, FormatError
from .fileio import atomic_writer, crc32c

PIECE_BYTES = 16 << 20  # device tensors travel to the file in pieces of this size; reads go in pieces of it too
MAX_HEADER = 100_000_000  # what the safetensors library itself accepts
_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}
_DTYPES = {v: k for k, v in _CODES.items()}

# a tensor to write: a tensor, or (dtype, shape, function yielding its flat pieces in order as CPU tensors)
Entry = torch.Tensor | tuple[torch.dtype, tuple[int, ...], Callable[[], Iterable[torch.Tensor]]]


def _pieces_of(t: torch.Tensor) -> Iterable[torch.Tensor]:
    t = t.detach()
    if t.device.type == "cpu":
        yield t.contiguous().reshape(-1)  # a contiguous CPU tensor is written from its own memory
        return
    flat, step = t.reshape(-1), max(1, PIECE_BYTES // t.element_size())
    for a in range(0, flat.numel(), step):
        yield flat[a:a + step].cpu()


def _raw(piece: torch.Tensor) -> memoryview:
    if piece.numel() == 0:
        return memoryview(b"")
    piece = piece.contiguous().reshape(-1)
    if piece.dtype == torch.bool:
        piece = piece.view(torch.uint8)
    return memoryview(piece.view(torch.uint8).numpy())


def write_snapshot(path: Path, tensors: Mapping[str, Entry], *, durable: bool = True) -> tuple[int, int]:
    """Write ``tensors`` as a safetensors file, atomically; returns the file's crc32c and size."""
    path = Path(path)
    header, specs, offset = {}, [], 0
    for name, entry in tensors.items():
        if isinstance(entry, torch.Tensor):
            dtype, shape, pieces = entry.dtype, tuple(entry.shape), (lambda t=entry: _pieces_of(t))
        else:
            dtype, shape, pieces = entry
        if dtype not in _CODES:
            raise FormatError(f"tensor {name!r} has dtype {dtype}, which a snapshot cannot hold")
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        specs.append((name, nbytes, pieces))
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    head = len(raw).to_bytes(8, "little") + raw
    crc, size = crc32c(head), len(head)
    with atomic_writer(path, durable=durable) as f:
        f.write(head)
        for name, nbytes, pieces in specs:
            written = 0
            for piece in pieces():
                data = _raw(piece)
                f.write(data)
                crc, written = crc32c(data, crc), written + len(data)
            if written != nbytes:
                raise FormatError(f"tensor {name!r}: {written} bytes were produced where {nbytes} were declared")
            size += written
    return crc, size


class SnapshotFile:
    """A snapshot opened for reading: size and crc32c checked (in bounded reads), header validated.

    Raises :class:`CorruptionError` for a missing, truncated or changed file, :class:`FormatError` for a header
    that is not a valid safetensors header.
    """

    def __init__(self, path: Path, *, expected_crc: int | None = None, expected_size: int | None = None,
                 what: str = "the snapshot"):
        self.path = Path(path)
        try:
            # never follow a link planted in a run directory, never block on a FIFO posing as a snapshot
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise CorruptionError(f"{what} is missing", path=self.path) from None
        except OSError as e:
            raise CorruptionError(f"{what} cannot be opened ({e.strerror})", path=self.path) from None
        try:
            self._open(expected_crc, expected_size, what)
        except BaseException:
            os.close(self._fd)
            raise

    def _open(self, expected_crc, expected_size, what) -> None:
        st = os.fstat(self._fd)
        if not stat.S_ISREG(st.st_mode):
            raise CorruptionError(f"{what} is not a regular file", path=self.path)
        size = st.st_size
        if expected_size is not None and size != expected_size:
            raise CorruptionError(f"{what} holds {size} bytes where {expected_size} were written: it was truncated "
                                  "or changed", path=self.path)
        if expected_crc is not None:
            crc, pos, buf = 0, 0, bytearray(min(PIECE_BYTES, max(size, 1)))
            while pos < size:
                n = os.preadv(self._fd, [buf], pos)
                if n <= 0:
                    raise CorruptionError(f"{what} is shorter than it claims", path=self.path)
                crc, pos = crc32c(memoryview(buf)[:n], crc), pos + n
            if crc != expected_crc:
                raise CorruptionError(f"{what} fails its crc32c checksum: the file was changed or damaged",
                                      path=self.path)
        head = os.pread(self._fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER):
            raise FormatError(f"{self.path} has a malformed safetensors header")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
            self._entries = {}
            data_bytes, base = size - 8 - n, 8 + n
            for name, e in header.items():
                if name == "__metadata__":
                    continue
                dtype, shape, (b, end) = _DTYPES[e["dtype"]], tuple(int(x) for x in e["shape"]), e["data_offsets"]
                itemsize = torch.empty(0, dtype=dtype).element_size()
                if not (0 <= b <= end <= data_bytes and end - b == math.prod(shape) * itemsize
                        and all(x >= 0 for x in shape)):
                    raise ValueError(f"tensor {name!r} lies outside the file or has the wrong size")
                self._entries[name] = (dtype, shape, base + b)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"{self.path} is not a valid safetensors file: {e}") from None

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a ``meta`` tensor: names, shapes and dtypes, no data (for layout checks)."""
        return {k: torch.empty(shape, dtype=dtype, device="meta") for k, (dtype, shape, _) in self._entries.items()}

    def read_range(self, name: str, a: int, b: int) -> torch.Tensor:
        """Flat elements ``[a, b)`` of tensor ``name``, read from the file into a new CPU tensor."""
        dtype, shape, offset = self._entries[name]
        numel = math.prod(shape)
        if not 0 <= a <= b <= numel:
            raise IndexError(f"[{a}, {b}) is outside tensor {name!r} of {numel} elements")
        out = torch.empty(b - a, dtype=dtype)
        if b > a:
            view = out.view(torch.uint8)
            itemsize = out.element_size()
            if os.preadv(self._fd, [memoryview(view.numpy())], offset + a * itemsize) != (b - a) * itemsize:
                raise CorruptionError("the file is shorter than its header says", path=self.path)
        return out

    def tensor(self, name: str) -> torch.Tensor:
        """Tensor ``name`` whole, in its shape."""
        return self.read_range(name, 0, math.prod(self.shape(name))).reshape(self.shape(name))

    def ranges(self, name: str, elems: int | None = None) -> Iterable[tuple[int, int]]:
        """``[a, b)`` ranges covering tensor ``name`` in pieces of at most ``elems`` elements."""
        numel = math.prod(self.shape(name))
        step = elems or max(1, PIECE_BYTES // torch.empty(0, dtype=self.dtype(name)).element_size())
        return [(a, min(a + step, numel)) for a in range(0, numel, step)]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> SnapshotFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def flat_into(snap: SnapshotFile, layout, out: torch.Tensor) -> torch.Tensor:
    """Fill ``out`` (float32, ``layout.numel`` elements, any device) with the layout's tensors, piece by piece."""
    for e in layout.entries:
        for a, b in snap.ranges(e.name):
            out[e.offset + a:e.offset + b].copy_(snap.read_range(e.name, a, b), non_blocking=False)
    return out
