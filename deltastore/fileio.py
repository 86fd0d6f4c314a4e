"""Small file primitives the commit protocol rests on: atomic replace, fsync, bounded JSON, crc32c."""

from __future__ import annotations

import json
import os
from pathlib import Path

from crc32c import crc32c

from .errors import FormatError

MAX_JSON_BYTES = 64 << 20  # a store's JSON files are small; a crafted huge one is refused before it is parsed

__all__ = ["crc32c", "atomic_write_bytes", "atomic_write_json", "read_json", "fsync_path", "fsync_dir"]


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


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new content, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object, *, durable: bool = True) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1, sort_keys=True).encode(), durable=durable)


def read_json(path: Path, what: str) -> dict:
    """Read a JSON object written by us; size-bounded, and any malformation becomes :class:`FormatError`."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise FormatError(f"{what} ({path}) is {size} bytes, more than the {MAX_JSON_BYTES} allowed")
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{what} ({path}) is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{what} ({path}) must hold a JSON object")
    return obj
