"""The step log: small per-step metadata (named 1-D arrays) in an append-only, checksummed file.

Each committed step has exactly one record. A record is a fixed header (magic, step, payload length, crc32c of the
payload) followed by the payload: a count of fields, then per field its name, dtype code, length and raw
little-endian values. The store's commit file holds the number of log bytes that are committed, so a record torn by
a crash is simply past the committed length and never read. Nothing here can run code: it is plain numbers.

Example:
    >>> import numpy as np, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "steps.log"
    >>> with StepLogWriter(path, committed_bytes=0) as log:
    ...     end = log.append(0, {"ids": np.array([4, 7])})
    ...     end = log.append(1, {"ids": np.array([9])})
    >>> table = read_step_log(path, committed_bytes=end, num_steps=2)
    >>> table["ids"].values.tolist(), table["ids"].offsets.tolist()
    ([4, 7, 9], [0, 2, 3])
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CorruptionError, FormatError
from .fileio import crc32c, read_upto

_MAGIC = b"DSTP"
_HEADER = struct.Struct("<4sQII")  # magic, step, payload bytes, crc32c(payload)
_FIELD = struct.Struct("<B16sQ")  # dtype code, name (utf-8, NUL-padded), element count
_DTYPES = {1: np.dtype("<i8"), 2: np.dtype("<f4"), 3: np.dtype("<i4"), 4: np.dtype("<u4")}
_CODES = {v: k for k, v in _DTYPES.items()}
MAX_RECORD_BYTES = 256 << 20
MAX_FIELDS = 64
LOG_NAME = "steps.log"  # the step log's file name inside a store directory
LOG_TAIL_BYTES = 4096


@dataclass(frozen=True)
class RaggedField:
    """A field's values for every step, CSR style: step ``s`` owns ``values[offsets[s]:offsets[s+1]]``."""

    values: np.ndarray
    offsets: np.ndarray

    def of(self, step: int) -> np.ndarray:
        return self.values[self.offsets[step]:self.offsets[step + 1]]

    def step_of_each_value(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.offsets) - 1, dtype=np.int64), np.diff(self.offsets))


def encode_record(step: int, fields: dict[str, np.ndarray]) -> bytes:
    if len(fields) > MAX_FIELDS:
        raise FormatError(f"at most {MAX_FIELDS} metadata fields per step")
    parts = [struct.pack("<H", len(fields))]
    for name, arr in fields.items():
        raw_name = name.encode()
        arr = np.asarray(arr).reshape(-1)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
        if len(raw_name) > 16 or dtype not in _CODES:
            raise FormatError(f"metadata field {name!r}: names are at most 16 bytes, dtypes one of "
                              f"{sorted(str(d) for d in _CODES)}; got dtype {arr.dtype}")
        parts += [_FIELD.pack(_CODES[dtype], raw_name, arr.size), np.ascontiguousarray(arr, dtype=dtype).tobytes()]
    payload = b"".join(parts)
    return _HEADER.pack(_MAGIC, step, len(payload), crc32c(payload)) + payload


def _field_spans(payload: memoryview, step: int):
    """Yield ``(name, dtype, byte offset, count)`` for each field of a record's payload, validating as it goes."""
    # a record passed its crc32c, so only a crafted file reaches a malformed payload: still one clear error
    if len(payload) < 2:
        raise FormatError(f"step log record of step {step} is too short")
    (count,), pos = struct.unpack_from("<H", payload, 0), 2
    if count > MAX_FIELDS:
        raise FormatError(f"step log record of step {step} claims {count} fields")
    for _ in range(count):
        if pos + _FIELD.size > len(payload):
            raise FormatError(f"step log record of step {step} has a malformed field")
        code, raw_name, n = _FIELD.unpack_from(payload, pos)
        pos += _FIELD.size
        dtype = _DTYPES.get(code)
        if dtype is None or pos + n * dtype.itemsize > len(payload):
            raise FormatError(f"step log record of step {step} has a malformed field")
        yield raw_name.rstrip(b"\0").decode("utf-8", "replace"), dtype, pos, n
        pos += n * dtype.itemsize
    if pos != len(payload):
        raise FormatError(f"step log record of step {step} has {len(payload) - pos} trailing bytes")


def _read_committed(path: Path, committed_bytes: int) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        data = b""
    except OSError as e:
        raise FormatError(f"the step log {path} cannot be opened as a plain file: {e.strerror or e}") from None
    else:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise FormatError(f"the step log {path} is not a regular file")
            # the commit file may name fewer bytes than the log holds (a torn record after a crash), never more
            data = read_upto(fd, min(committed_bytes, st.st_size))
        finally:
            os.close(fd)
    if len(data) != committed_bytes:
        raise CorruptionError(f"the step log {path} holds {len(data)} bytes, the commit file says "
                              f"{committed_bytes}: it was truncated. The steps past the truncation are lost.")
    return data


def _records(path: Path, committed_bytes: int, num_steps: int):
    """Yield ``(step, payload view, end offset)`` for each committed record, checking headers and crc32c."""
    data = _read_committed(path, committed_bytes)
    view, pos = memoryview(data), 0
    for step in range(num_steps):
        if pos + _HEADER.size > len(data):
            raise CorruptionError(f"the step log ends before step {step}'s record")
        magic, rec_step, size, crc = _HEADER.unpack_from(view, pos)
        pos += _HEADER.size
        if magic != _MAGIC or rec_step != step or size > MAX_RECORD_BYTES or pos + size > len(data):
            raise CorruptionError(f"the step log record of step {step} has a damaged header")
        payload = view[pos:pos + size]
        if crc32c(payload) != crc:
            raise CorruptionError(f"the step log record of step {step} fails its crc32c checksum")
        pos += size
        yield step, payload, pos
    if pos != len(data):
        raise CorruptionError(f"the step log has {len(data) - pos} bytes after the last committed record")


def record_ends(path: Path, *, committed_bytes: int, num_steps: int) -> list[int]:
    """Byte offset just past each committed record (checked): where the log ends if cut after step ``i``."""
    return [end for _, _, end in _records(path, committed_bytes, num_steps)]


def read_step_log(path: Path, *, committed_bytes: int, num_steps: int) -> dict[str, RaggedField]:
    """Read the committed records and return every field as a :class:`RaggedField` over ``num_steps`` steps."""
    # each field's bytes are gathered as slices and joined once: no array per field per record (the parse is
    # the fixed cost of opening a run, so it is kept to a few microseconds per step)
    fields: dict[str, tuple[np.dtype, list, np.ndarray]] = {}
    for step, payload, _ in _records(path, committed_bytes, num_steps):
        seen = set()
        for name, dtype, pos, n in _field_spans(payload, step):
            entry = fields.get(name)
            if entry is None:
                entry = fields[name] = (dtype, [], np.zeros(num_steps, np.int64))
            if name in seen or entry[0] != dtype:
                raise FormatError(f"step log record of step {step}: field {name!r} repeated or of another dtype")
            seen.add(name)
            entry[1].append(payload[pos:pos + n * dtype.itemsize])
            entry[2][step] = n
    table = {}
    for name in sorted(fields):
        dtype, parts, counts = fields[name]
        offsets = np.zeros(num_steps + 1, np.int64)
        np.cumsum(counts, out=offsets[1:])
        table[name] = RaggedField(np.frombuffer(b"".join(parts), dtype).copy(), offsets)
    return table


def log_tail_crc32c(store, log_bytes: int | None = None, *, tail: int = LOG_TAIL_BYTES) -> int:
    """crc32c of the last ``tail`` bytes of ``store``'s step log before offset ``log_bytes`` (default: the committed
    length): a cheap fingerprint of the history up to a step, so that a file taken at that step (a checkpoint) can
    tell whether the store still holds the same history. A missing log counts as empty.

    Example:
        >>> import tempfile, torch
        >>> from deltastore import DeltaStore
        >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(2)}, durable=False)
        >>> empty = log_tail_crc32c(store)
        >>> _ = store.append_delta(torch.ones(2))
        >>> log_tail_crc32c(store) != empty, log_tail_crc32c(store, 0) == empty
        (True, True)
    """
    end = store.commit_record["log_bytes"] if log_bytes is None else int(log_bytes)
    lo = max(0, end - tail)
    path = Path(store.data_dir) / LOG_NAME  # the committed generation's log (see generation.py)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return crc32c(b"")
    except OSError as e:
        raise FormatError(f"the step log {path} cannot be opened as a plain file: {e.strerror or e}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise FormatError(f"the step log {path} is not a regular file")
        os.lseek(fd, lo, os.SEEK_SET)
        return crc32c(read_upto(fd, end - lo))
    finally:
        os.close(fd)


class StepLogWriter:
    """Appends records; :meth:`append` returns the log's new length in bytes, which the commit file records."""

    def __init__(self, path: Path, *, committed_bytes: int, durable: bool = True):
        self.path, self.durable = Path(path), durable
        self._f = open(self.path, "ab+")
        # a crash may have left a torn record after the committed length: cut it off before appending
        self._f.truncate(committed_bytes)
        self._f.seek(committed_bytes)
        self.end = committed_bytes

    def append(self, step: int, fields: dict[str, np.ndarray]) -> int:
        record = encode_record(step, fields)
        try:
            self._f.write(record)
            self._f.flush()
            if self.durable:
                os.fsync(self._f.fileno())
        except BaseException:
            self.rollback(self.end)  # a record half-written on a full disk must not sit before the next one
            raise
        self.end += len(record)
        return self.end

    def rollback(self, end: int) -> None:
        """Cut the log back to ``end`` bytes (the committed length): the next record is written there."""
        try:
            self._f.seek(end)
            self._f.truncate(end)
            self._f.flush()
        except (OSError, ValueError):
            pass  # best effort: the commit file still names the committed length, so readers stay correct
        self.end = end

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> StepLogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
