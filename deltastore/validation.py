"""Validation of a store's own metadata: ``store.json``, ``commit.json``, the Zarr array descriptions and the start
snapshot's size, each checked before anything is read through it (format versions, checksums, bounds)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import CorruptionError, FormatError
from .fileio import json_crc32c, read_json
from .generation import check_generation_fields, data_dir
from .layout import TensorLayout
from .steplog import _HEADER as _LOG_HEADER

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_CHUNK_ELEMS = 1 << 28  # what create accepts is exactly what open accepts
RECORDING, COMPLETE = "recording", "complete"
_MIN_RECORD_BYTES = _LOG_HEADER.size + 2  # header plus the field count: bounds the steps a log of n bytes can hold


def _sealed(commit: dict) -> dict:
    """The commit record with its own crc32c (computed over every other field)."""
    body = {k: v for k, v in commit.items() if k != "crc32c"}
    body["crc32c"] = json_crc32c(body)
    return body


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_meta(meta: dict, path: Path) -> None:
    if meta.get("format") != "deltastore" or not _is_int(meta.get("version")):
        raise FormatError(f"{path}/store.json is not a deltastore metadata file")
    if meta["version"] not in READABLE_VERSIONS:
        newer = meta["version"] > FORMAT_VERSION
        raise FormatError(f"{path} was written in format version {meta['version']}; this deltastore reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}."
                          + (" Upgrade the package to read it." if newer else ""))
    if meta["version"] >= 2:
        if not _is_int(meta.get("crc32c")) or json_crc32c(meta) != meta["crc32c"]:
            raise CorruptionError(f"{path}/store.json fails its crc32c checksum: the file was changed or damaged")
    required = {"layout": list, "codec": str, "chunk_elems": int, "backend": str, "durable": bool,
                "start_crc32c": int, "attrs": dict}
    if meta["version"] >= 2:
        required.update({"start_bytes": int, "uid": str, "backend_meta_crc32c": dict})
    for key, kind in required.items():
        value = meta.get(key)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise FormatError(f"{path}/store.json: field {key!r} is missing or not a {kind.__name__}")
    if not 1 <= meta["chunk_elems"] <= MAX_CHUNK_ELEMS:
        raise FormatError(f"{path}/store.json: chunk_elems out of range")
    if not all(isinstance(k, str) and _is_int(v) for k, v in meta.get("backend_meta_crc32c", {}).items()):
        raise FormatError(f"{path}/store.json: field 'backend_meta_crc32c' is malformed")


_COMMIT_INTS = ("final_crc32c", "final_bytes", "residual_crc32c", "residual_bytes")


def _read_commit(path: Path, meta: dict) -> dict:
    try:
        commit = read_json(path / "commit.json", "commit file")
    except FileNotFoundError:
        raise CorruptionError(f"{path}/commit.json is missing: the store cannot tell which steps are committed") from None
    if "crc32c" in commit or meta.get("version", 1) >= 2:
        if not _is_int(commit.get("crc32c")) or json_crc32c(commit) != commit["crc32c"]:
            raise CorruptionError(f"{path}/commit.json fails its crc32c checksum: the file was changed or damaged")
    ok = (_is_int(commit.get("steps")) and commit["steps"] >= 0 and _is_int(commit.get("log_bytes"))
          and commit["log_bytes"] >= 0 and commit.get("status") in (RECORDING, COMPLETE)
          and all(_is_int(commit[k]) and commit[k] >= 0 for k in _COMMIT_INTS if k in commit)
          and (commit.get("codec_error") is None or (isinstance(commit["codec_error"], (int, float))
                                                     and not isinstance(commit["codec_error"], bool)))
          and (commit["status"] != COMPLETE or "final_crc32c" in commit))
    if not ok:
        raise FormatError(f"{path}/commit.json is malformed")
    # the log must hold the committed bytes, and a committed record takes at least a header: so a crafted step
    # count can never make a reader allocate per step more than the files on disk justify
    check_generation_fields(commit, path)
    log = data_dir(path, commit) / "steps.log"
    try:
        log_size = os.stat(log, follow_symlinks=False).st_size
    except FileNotFoundError:
        log_size = 0
    if commit["log_bytes"] > log_size:
        raise CorruptionError(f"the step log {log} holds {log_size} bytes, the commit file says {commit['log_bytes']}"
                              ": it was truncated. The steps past the truncation are lost.")
    if commit["steps"] * _MIN_RECORD_BYTES > commit["log_bytes"]:
        raise CorruptionError(f"{path}/commit.json claims {commit['steps']} steps in {commit['log_bytes']} bytes of "
                              "step log, more than it can hold")
    return commit


def _zarr_meta_digest(meta: dict) -> int:
    """crc32c of a Zarr array's metadata without its capacity (shape[0], which grows): what never changes."""
    normal = dict(meta)
    shape = normal.get("shape")
    if isinstance(shape, list) and shape:
        normal["shape"] = [None] + shape[1:]
    return json_crc32c({"zarr": normal})


def _backend_meta_crcs(root: Path, streams, backend: str) -> dict[str, int]:
    if backend != "zarr":
        return {}
    return {s.name: _zarr_meta_digest(read_json(root / s.name / "zarr.json", "zarr array metadata")) for s in streams}


def _check_backend_meta(path: Path, meta: dict, commit: dict, streams) -> None:
    """Check the backend's own metadata files against store.json before the backend parses them."""
    if meta["backend"] != "zarr":
        return
    expected = meta.get("backend_meta_crc32c")
    if expected is not None and set(expected) != {s.name for s in streams}:
        raise FormatError(f"{path}/store.json lists backend metadata for {sorted(expected)}, the codec has streams "
                          f"{sorted(s.name for s in streams)}")
    for s in streams:
        file = data_dir(path, commit) / "deltas" / s.name / "zarr.json"
        try:
            zmeta = read_json(file, "zarr array metadata")
        except FileNotFoundError:
            raise CorruptionError(f"{file} is missing: the steps of stream {s.name!r} cannot be read") from None
        if expected is not None and _zarr_meta_digest(zmeta) != expected[s.name]:
            raise CorruptionError(f"{file} fails its crc32c checksum (kept in store.json): the array description "
                                  "was changed or damaged")
        shape = zmeta.get("shape")
        if (zmeta.get("zarr_format") != 3 or zmeta.get("node_type") != "array" or not isinstance(shape, list)
                or len(shape) != 2 or not all(_is_int(n) for n in shape) or shape[1] != s.length
                or zmeta.get("data_type") != s.dtype):
            raise FormatError(f"{file} does not describe a ({s.length},)-element {s.dtype} array per step")
        if shape[0] < commit["steps"]:
            raise CorruptionError(f"{file} says the array holds {shape[0]} steps, the commit file "
                                  f"{commit['steps']}: the array description was damaged")


def _check_start_fits(path: Path, meta: dict, layout: TensorLayout) -> None:
    """The start state holds every floating tensor: so the layout cannot describe more bytes than it has."""
    size = meta.get("start_bytes")
    if size is None:
        try:
            size = os.stat(path / "start.safetensors", follow_symlinks=False).st_size
        except FileNotFoundError:
            size = 0
    needed = sum(e.numel * torch.empty(0, dtype=_TORCH_DTYPES[e.dtype]).element_size() for e in layout.entries)
    if needed > size:
        raise FormatError(f"{path}/store.json describes {layout.numel} elements, more than start.safetensors "
                          f"({size} bytes) can hold")


_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}
