"""Whole-store verification: every checksum, and theta_0 + sum(all deltas) == theta_final within the codec's error.

Example:
    >>> import tempfile, torch
    >>> from deltastore import DeltaStore
    >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(2)}, durable=False)
    >>> _ = store.append_delta(torch.ones(2)); store.finalize({"w": torch.ones(2)})
    >>> verify_store(store)["ok"]
    True
"""

from __future__ import annotations

import torch

from .errors import DeltaStoreError
from .reduce import reduce_steps

FP32_TOLERANCE = 1e-4  # float32 summation of many steps, relative to how far the run moved


def verify_store(store, *, progress: bool = False) -> dict:
    """Check everything; returns a report whose ``faults`` list is empty when the store is sound."""
    faults: list[str] = []

    def attempt(what, fn):
        try:
            return fn()
        except DeltaStoreError as e:
            faults.append(f"{what}: {e}")
        except OSError as e:
            faults.append(f"{what}: {type(e).__name__}: {e}")
        return None

    start = attempt("start state", lambda: store.read_snapshot_flat("start"))
    attempt("step log", store.metadata)
    total = torch.zeros(store.layout.numel)
    steps = range(store.num_steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, unit="step", desc="verifying", leave=False)
    for step in steps:  # one step at a time, so that every damaged step is reported, not only the first
        attempt(f"step {step}", lambda: reduce_steps(store, store.check_steps([step]), into=total))
    report = {"path": str(store.path), "steps_checked": store.num_steps, "status": store.status,
              "codec": store.codec.name, "stated_codec_error": store._commit.get("codec_error")}
    if store.complete and start is not None:
        final = attempt("final state", lambda: store.read_snapshot_flat("final"))
        residual = attempt("residual", lambda: store.read_snapshot_flat("residual")) if store.codec.lossy else None
        if final is not None and not faults:
            moved = (final - start).norm().item() or 1.0
            rebuilt = start + total
            report["measured_codec_error"] = (rebuilt - final).norm().item() / moved
            if residual is not None:
                rebuilt += residual
            error = (rebuilt - final).norm().item() / moved
            report["reconstruction_error"], report["tolerance"] = error, FP32_TOLERANCE
            if not error <= FP32_TOLERANCE:
                faults.append(f"theta_0 + sum of deltas{' + residual' if residual is not None else ''} differs "
                              f"from theta_final by {error:.3g} (relative), more than {FP32_TOLERANCE:g}: steps are "
                              "missing or altered")
    report["faults"], report["ok"] = faults, not faults
    return report
