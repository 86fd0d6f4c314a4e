"""Deletion receipts: an append-only, hash-chained record of every request a run has served.

A run's receipts live in one attachment of its store (``receipts``: JSON lines, one canonical JSON object per
receipt), committed in the same atomic switch as the change they describe, so a receipt exists exactly when its
change does. Each receipt carries ``digest``, the sha256 of its own canonical JSON without that field, and
``prev_digest``, the digest of the receipt before it (64 zeros for the first): altering or removing a receipt
breaks the chain at that point, and the last receipt's ``weights_sha256`` must be the hash of the run's current
final state (see :func:`state_sha256`), so removing the last one is seen too.

Example:
    >>> import torch
    >>> first = seal({"action": "purge", "request_id": "r1", "steps_undone": 2}, previous=None)
    >>> second = seal({"action": "purge", "request_id": "r2", "steps_undone": 0}, previous=first)
    >>> second["prev_digest"] == first["digest"], chain_faults([first, second])
    (True, [])
    >>> state_sha256({"w": torch.zeros(2)}) == state_sha256({"w": torch.zeros(2)})
    True
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

RECEIPTS = "receipts"  # the attachment's name
RECEIPT_FORMAT = 1
GENESIS = "0" * 64
MAX_RECEIPTS = 1_000_000


def canonical_json(obj: dict) -> bytes:
    """Sorted keys, no spaces, ASCII: the byte form every digest is taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def receipt_digest(receipt: dict) -> str:
    return hashlib.sha256(canonical_json({k: v for k, v in receipt.items() if k != "digest"})).hexdigest()


def seal(body: dict, previous: dict | None) -> dict:
    """The receipt ``body`` with its place in the chain (``seq``, ``prev_digest``) and its own ``digest``."""
    receipt = {**body, "receipt_format": RECEIPT_FORMAT, "seq": 0 if previous is None else previous["seq"] + 1,
               "prev_digest": GENESIS if previous is None else previous["digest"]}
    receipt["digest"] = receipt_digest(receipt)
    return receipt


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the canonical bytes of a state_dict: per tensor in name order, a JSON header (name, dtype,
    shape) and the tensor's raw little-endian bytes, each prefixed by its length. Equal states, equal hashes,
    whatever device or memory layout the tensors had."""
    h = hashlib.sha256(b"amnesiac-state-sha256-v1\0")
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        header = canonical_json({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)})
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        for part in (header, raw):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


def encode(receipts: list[dict]) -> bytes:
    return b"".join(canonical_json(r) + b"\n" for r in receipts)


def parse(data: bytes) -> tuple[list[dict], list[str]]:
    """Receipts from the attachment's bytes, and a fault for each line that is not a receipt."""
    receipts, faults = [], []
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, line in enumerate(lines[:MAX_RECEIPTS]):
        try:
            obj = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            faults.append(f"receipt line {i + 1} is not JSON ({e})")
            continue
        if not isinstance(obj, dict):
            faults.append(f"receipt line {i + 1} is not a JSON object")
            continue
        receipts.append(obj)
    return receipts, faults


def chain_faults(receipts: list[dict]) -> list[str]:
    """What is wrong with the chain: altered receipts, removed or reordered ones; empty when it holds."""
    faults, prev = [], GENESIS
    for i, r in enumerate(receipts):
        name = f"receipt {i} (request {r.get('request_id')!r})"
        if r.get("digest") != receipt_digest(r):
            faults.append(f"{name} was altered: its content does not match its digest")
        if r.get("seq") != i:
            faults.append(f"{name} is numbered {r.get('seq')!r}, expected {i}: receipts were removed or reordered")
        if r.get("prev_digest") != prev:
            faults.append(f"{name} does not follow the receipt before it (prev_digest differs): a receipt before it "
                          "was removed, altered or replaced")
        prev = r.get("digest") if isinstance(r.get("digest"), str) else ""
    return faults


def id_ranges(ids: np.ndarray) -> list[list[int]]:
    """Sorted unique ids as inclusive ``[first, last]`` runs (compact for the dense sets a purge removes)."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    if not ids.size:
        return []
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts = np.concatenate([[0], breaks + 1])
    ends = np.concatenate([breaks, [ids.size - 1]])
    return [[int(ids[a]), int(ids[b])] for a, b in zip(starts, ends)]


def ids_of_ranges(ranges: list) -> np.ndarray:
    """The inverse of :func:`id_ranges`."""
    parts = [np.arange(int(a), int(b) + 1, dtype=np.int64) for a, b in ranges]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
