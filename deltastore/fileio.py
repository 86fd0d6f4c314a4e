"""Small file primitives the commit protocol rests on: atomic replace, fsync, bounded reads, crc32c.

Everything a reader opens in a run directory goes through :func:`read_regular_file` (or :func:`read_json`), which
refuses symbolic links, FIFOs and devices (a crafted run directory must not make a reader block on a pipe or read
``/dev/zero`` forever) and bounds how much it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import threading
from pathlib import Path

from crc32c import crc32c
from safetensors.torch import load as safetensors_from_bytes  # never pickle: plain tensors only
import torch

from .errors import CorruptionError, FormatError

MAX_JSON_BYTES = 64 << 20  # a store's JSON files are small; a crafted huge one is refused before it is parsed
MAX_SAFETENSORS_HEADER = 100_000_000  # what the safetensors library itself accepts

__all__ = ["crc32c", "atomic_writer", "atomic_write_bytes", "atomic_write_json", "read_json", "read_regular_file", "read_upto",
           "fsync_path", "fsync_dir", "json_crc32c", "check_tree", "MAX_SAFETENSORS_HEADER", "tensor_crc32c",
           "read_safetensors_file", "parse_safetensors"]


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, *, durable: bool = True):
    """A binary file to write ``path``'s new content into; on leaving the block it replaces ``path`` atomically
    (after an fsync when ``durable``), so readers see the old or the new content, never a torn one. On failure (a
    full disk) the temporary file is removed and ``path`` keeps its old content."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a torn one.

    On failure (a full disk) the temporary file is removed and ``path`` keeps its old content.
    """
    with atomic_writer(path, durable=durable) as f:
        f.write(data)


def json_crc32c(obj: dict, *, without: str = "crc32c") -> int:
    """crc32c of the canonical JSON form of ``obj`` minus its ``without`` key: a file's checksum of itself.

    Canonical (sorted keys, no whitespace, ASCII) so that any change of a value, however written, changes it.
    """
    body = {k: v for k, v in obj.items() if k != without}
    return crc32c(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                             allow_nan=True).encode())


def atomic_write_json(path: Path, obj: object, *, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), durable=durable)


def read_upto(fd: int, size: int) -> bytes:
    """Read ``size`` bytes from ``fd`` (fewer only if the file ends first), in pieces of at most 64 MiB."""
    parts, left = [], size
    while left > 0:
        part = os.read(fd, min(left, 64 << 20))
        if not part:
            break
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def read_regular_file(path: Path, what: str, *, max_bytes: int, expected_size: int | None = None) -> bytes:
    """The whole content of a regular file, refusing links, pipes, devices and files over ``max_bytes``.

    Raises FileNotFoundError when absent (callers decide what absence means), :class:`FormatError` for a file that
    is not a plain file or too large, :class:`CorruptionError` when ``expected_size`` is given and differs.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as e:  # ELOOP: the name is a symbolic link; others: unreadable
        raise FormatError(f"{what} ({path}) cannot be opened as a plain file: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FormatError(f"{what} ({path}) is not a regular file; a run directory holds only plain files")
        if st.st_size > max_bytes:
            raise FormatError(f"{what} ({path}) is {st.st_size} bytes, more than the {max_bytes} allowed")
        if expected_size is not None and st.st_size != expected_size:
            raise CorruptionError(f"{what} ({path}) is {st.st_size} bytes, {expected_size} were written: the file "
                                  "was truncated or changed")
        data = read_upto(fd, st.st_size)
    finally:
        os.close(fd)
    if len(data) != st.st_size:
        raise CorruptionError(f"{what} ({path}) changed size while it was read")
    return data


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object written by us; size-bounded, and any malformation becomes :class:`FormatError`."""
    path = Path(path)
    data = read_regular_file(path, what, max_bytes=MAX_JSON_BYTES)
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what} ({path}) is not valid JSON: {e}") from None
    except RecursionError:
        raise FormatError(f"{what} ({path}) nests too deeply") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} ({path}) must hold a JSON object")
    return obj


def tensor_crc32c(tensor: torch.Tensor) -> int:
    """crc32c of a tensor's raw bytes (C order, native byte order), whatever its dtype or device.

    Example:
        >>> tensor_crc32c(torch.zeros(0)) == crc32c(b"") and tensor_crc32c(torch.ones(2)) == tensor_crc32c(torch.ones(2))
        True
    """
    t = tensor.detach().cpu().contiguous()
    return crc32c(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def parse_safetensors(data: bytes, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and string metadata of a safetensors file's bytes; runs no code (no pickle).

    The header length is bounded by :data:`MAX_SAFETENSORS_HEADER` and the file's size before anything is parsed;
    any malformation becomes :class:`FormatError` naming ``what``.

    Example:
        >>> from safetensors.torch import save
        >>> tensors, meta = parse_safetensors(save({"w": torch.ones(2)}, metadata={"k": "v"}), "example")
        >>> tensors["w"].tolist(), meta
        ([1.0, 1.0], {'k': 'v'})
        >>> parse_safetensors((1 << 40).to_bytes(8, "little") + b"{}", "example")
        Traceback (most recent call last):
        ...
        deltastore.errors.FormatError: example has a malformed safetensors header
    """
    if len(data) < 8 or int.from_bytes(data[:8], "little") > min(len(data) - 8, MAX_SAFETENSORS_HEADER):
        raise FormatError(f"{what} has a malformed safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + header_len])
        meta = (header.get("__metadata__") or {}) if isinstance(header, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise ValueError("the metadata is not a map of strings")
        tensors = safetensors_from_bytes(data)
    except Exception as e:  # noqa: BLE001 - a crc-valid but malformed file: only possible if crafted
        raise FormatError(f"{what} is not a valid safetensors file: {type(e).__name__}: {e}") from None
    return tensors, meta


def read_safetensors_file(path: Path, what: str, *, max_bytes: int, expected_size: int | None = None,
                          expected_crc32c: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """:func:`read_regular_file`, the file's crc32c when one is expected, then :func:`parse_safetensors`: a
    size-bounded, checksummed, pickle-free safetensors read.

    Raises FileNotFoundError when absent, :class:`CorruptionError` when the size or crc32c differ from the expected
    ones, :class:`FormatError` when it is not a plain, bounded, valid safetensors file.
    """
    path = Path(path)
    data = read_regular_file(path, what, max_bytes=max_bytes, expected_size=expected_size)
    if expected_crc32c is not None and crc32c(data) != expected_crc32c:
        raise CorruptionError(f"{what} ({path}) fails its crc32c checksum: the file was changed or damaged")
    return parse_safetensors(data, f"{what} ({path})")


def check_tree(root: Path, *, max_entries: int = 50_000_000) -> None:
    """Refuse a directory tree holding anything but plain files and directories.

    A symbolic link could point a reader outside the run directory (or at ``/dev/zero``); a FIFO would block it
    forever. The walk uses directory entry types only, so it costs little even for a long run's many shard files.
    """
    root = Path(root)
    stack, seen = [str(root)], 0
    while stack:
        top = stack.pop()
        try:
            entries = os.scandir(top)
        except OSError as e:
            raise FormatError(f"{top} cannot be listed: {e.strerror or e}") from None
        with entries:
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    raise FormatError(f"{root} holds more than {max_entries} entries")
                if entry.is_symlink():
                    raise FormatError(f"{entry.path} is a symbolic link; a run directory must not point outside "
                                      "itself (copy the file in instead)")
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif not entry.is_file(follow_symlinks=False):
                    raise FormatError(f"{entry.path} is not a regular file or directory (a pipe, socket or device "
                                      "has no place in a run directory)")
