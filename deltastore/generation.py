"""Generations of a run directory: where the data files of the committed state live, and small attached files.

A store that was never rewritten keeps its data files at the top of the directory (generation 0). A rewrite
(:mod:`deltastore.rewrite`: removing steps, folding old steps into the start state) never edits those files: it
builds the next generation in ``gen-<N>/`` beside them (unchanged files hard-linked, changed ones written new) and
switches to it by replacing ``commit.json``, whose ``generation`` field names the directory readers use. So a crash
at any moment leaves the old generation (the commit file was not replaced) or the new one (it was), never a mix.
The old generation is deleted once the new one is committed; files of a generation that is not the committed one
are garbage, removed by the next writer that holds the lock (:func:`remove_stale`).

``store.json``, ``commit.json`` and ``writer.lock`` always stay at the top. Data files of a generation::

    start.safetensors  final.safetensors  residual.safetensors  steps.log  folded.log  deltas/  att.<name>.<n>

Attachments are small files owned by the layer above (amnesiac keeps its deletion receipts in one): the commit file
names each with its crc32c and size, a rewrite carries them to the next generation, and replacing one is atomic
(a new file, then the commit file). The commit fields this module adds are all optional, so a store that was never
rewritten reads exactly as before: ``generation``, ``start_crc32c``/``start_bytes`` (once the start state changed),
``folded_steps``/``folded_log_bytes`` (steps folded into the start state) and ``attachments``.

Example:
    >>> from pathlib import Path
    >>> data_dir(Path("run"), {"steps": 3}), data_dir(Path("run"), {"generation": 2})
    (PosixPath('run'), PosixPath('run/gen-2'))
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .errors import CorruptionError, FormatError
from .fileio import atomic_write_bytes, crc32c, read_regular_file

GEN_PREFIX = "gen-"
DATA_FILES = ("start.safetensors", "final.safetensors", "residual.safetensors", "steps.log", "folded.log")
DATA_DIRS = ("deltas",)
MAX_ATTACHMENT_BYTES = 1 << 30
_ATTACHMENT_NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_GEN_DIR = re.compile(r"^gen-(\d{1,12})$")


def generation_of(commit: dict) -> int:
    return int(commit.get("generation", 0))


GENERATION_FIELDS = ("generation", "start_crc32c", "start_bytes", "folded_steps", "folded_log_bytes", "attachments")


def generation_fields(commit: dict) -> dict:
    """The commit fields that describe the generation: every commit of the same generation carries them over."""
    return {k: commit[k] for k in GENERATION_FIELDS if k in commit}


def data_dir(root: Path, commit: dict) -> Path:
    """The directory holding the data files of the generation ``commit`` names."""
    gen = generation_of(commit)
    return Path(root) if gen == 0 else Path(root) / f"{GEN_PREFIX}{gen}"


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_generation_fields(commit: dict, path: Path) -> None:
    """Refuse a commit file whose generation fields are malformed (they name files a reader will open)."""
    ok = all(_is_count(commit[k]) for k in ("generation", "start_crc32c", "start_bytes", "folded_steps",
                                            "folded_log_bytes") if k in commit)
    ok = ok and commit.get("generation", 0) < 10 ** 12 and ("folded_steps" in commit) == ("folded_log_bytes" in commit)
    attachments = commit.get("attachments", {})
    ok = ok and isinstance(attachments, dict) and all(
        isinstance(name, str) and _ATTACHMENT_NAME.match(name) and isinstance(entry, dict)
        and isinstance(entry.get("file"), str) and entry["file"].startswith(f"att.{name}.")
        and "/" not in entry["file"] and _is_count(entry.get("crc32c")) and _is_count(entry.get("bytes"))
        for name, entry in attachments.items())
    if not ok:
        raise FormatError(f"{path}/commit.json has malformed generation fields (generation, start, folded steps or "
                          "attachments)")


def read_attachment(store, name: str, *, check: bool = True) -> bytes | None:
    """The content of attachment ``name`` of ``store``'s committed generation (checked against its crc32c unless
    ``check=False``: an auditor reads a damaged one to say what is wrong in it), or None when it has none."""
    root, commit = store.path, store.commit_record
    entry = commit.get("attachments", {}).get(name)
    if entry is None:
        return None
    file = data_dir(root, commit) / entry["file"]
    try:
        data = read_regular_file(file, f"attachment {name!r}", max_bytes=MAX_ATTACHMENT_BYTES,
                                 expected_size=entry["bytes"] if check else None)
    except FileNotFoundError:
        raise CorruptionError(f"{file} (attachment {name!r}) is missing") from None
    if check and crc32c(data) != entry["crc32c"]:
        raise CorruptionError(f"{file} (attachment {name!r}) fails its crc32c checksum: the file was changed or "
                              "damaged")
    return data


def write_attachment(directory: Path, name: str, data: bytes, commit: dict, *, durable: bool) -> dict:
    """Write a new version of attachment ``name`` into ``directory``; return its commit entry (not yet committed)."""
    if not _ATTACHMENT_NAME.match(name):
        raise FormatError(f"attachment names are 1-64 characters [a-z0-9_.-] starting with a letter, not {name!r}")
    old = commit.get("attachments", {}).get(name)
    serial = int(old["file"].rsplit(".", 1)[1]) + 1 if old and old["file"].rsplit(".", 1)[1].isdigit() else 1
    file = f"att.{name}.{serial}"
    atomic_write_bytes(Path(directory) / file, data, durable=durable)
    return {"file": file, "crc32c": crc32c(data), "bytes": len(data)}


def _remove(path: Path) -> int:
    """Delete a file or tree; return the bytes it freed (files whose last link this was)."""
    freed = 0
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    if os.path.isdir(path) and not os.path.islink(path):
        for dirpath, _, files in os.walk(path):
            for f in files:
                try:
                    s = os.stat(os.path.join(dirpath, f), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if s.st_nlink == 1:
                    freed += s.st_size
        shutil.rmtree(path, ignore_errors=True)
    else:
        freed = st.st_size if st.st_nlink == 1 else 0
        os.unlink(path)
    return freed


def stale_files(root: Path, commit: dict) -> list[Path]:
    """The files and directories of ``root`` that the committed generation does not use: an older generation
    (a rewrite interrupted after its switch: its bytes are still on disk), a staged one (interrupted before it),
    or a replaced attachment."""
    root = Path(root)
    current = data_dir(root, commit)
    found = [Path(e.path) for e in os.scandir(root) if _GEN_DIR.match(e.name) and Path(e.path) != current]
    if current != root:  # the top-level data files belong to generation 0, which is no longer committed
        found += [root / name for name in DATA_FILES + DATA_DIRS if os.path.lexists(root / name)]
    used = {e["file"] for e in commit.get("attachments", {}).values()}
    for top in {root, current}:
        if top.is_dir():
            found += [Path(e.path) for e in os.scandir(top)
                      if e.name.startswith("att.") and not (top == current and e.name in used)]
    return sorted(found)


def remove_stale(root: Path, commit: dict) -> int:
    """Delete :func:`stale_files`; return the bytes freed.

    Only a holder of the writer lock may call this: a rewrite in progress stages its generation beside the
    committed one, and that staging area is garbage only when nobody holds the lock.
    """
    return sum(_remove(p) for p in stale_files(root, commit))
