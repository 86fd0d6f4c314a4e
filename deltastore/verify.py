"""Whole-store verification: every checksum, and theta_0 + sum(all deltas) == theta_final within the codec's error.

What is checked, in order: (at open) store.json and commit.json against their own crc32c, the backend's metadata
against store.json, sizes against the files present; then the start state's crc32c, every committed step-log
record's crc32c, every chunk of every committed step (backend crc32c: Zarr per chunk and per shard index,
safetensors per chunk from the step log), and for a complete run the final state (and residual) and
``theta_0 + sum(deltas) (+ residual) == theta_final`` within :data:`FP32_TOLERANCE` relative to how far the run
moved, and that the codec error stated at close is the one measured. A damaged step is narrowed down to the chunks
that fail, and the fault names the step and the tensors they hold.

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

from .errors import PROGRAMMING_ERRORS, CorruptionError, DeltaStoreError
from .reduce import reduce_steps

FP32_TOLERANCE = 1e-4  # float32 summation of many steps, relative to how far the run moved
MAX_FAULTS_PER_STEP = 8


def _describe(e: Exception, step: int | None = None) -> str:
    """One fault line; a bug (:data:`PROGRAMMING_ERRORS`) is raised, never reported as damage."""
    if isinstance(e, PROGRAMMING_ERRORS):
        raise e
    if isinstance(e, CorruptionError):
        return e.add_context(step=step).describe()
    text = str(e) if isinstance(e, DeltaStoreError) else f"{type(e).__name__}: {e}"
    return text if step is None else f"step {step}: {text}"


def _diagnose_step(store, step: int) -> list[str]:
    """Read each chunk of ``step`` on its own and name the tensors of those that fail."""
    faults: list[str] = []
    try:
        side = store.side_arrays(step)
    except Exception as e:  # noqa: BLE001 - every failure is a fault to report
        return [_describe(e, step)]
    for spec in store.codec.streams():
        for c in range(store.codec.num_chunks):
            lo, hi = spec.chunk_range(c, c + 1)
            if hi <= lo:
                continue
            try:
                store.backend.read_range(step, spec.name, lo, hi, side)
            except CorruptionError as e:
                faults.append(_describe(store.locate_damage(e, step, c, c + 1)))
            except Exception as e:  # noqa: BLE001
                faults.append(_describe(e, step))
            if len(faults) >= MAX_FAULTS_PER_STEP:
                return faults + [f"step {step}: further chunks not listed"]
    return faults


def verify_store(store, *, progress: bool = False) -> dict:
    """Check everything; returns a report whose ``faults`` list is empty when the store is sound."""
    faults: list[str] = []

    def attempt(what, fn):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - verify reports every failure as a fault, whatever raised it
            faults.append(f"{what}: {_describe(e)}")
        return None

    start = attempt("start state", lambda: store.read_snapshot_flat("start"))
    attempt("step log", store.metadata)
    total = torch.zeros(store.layout.numel)
    steps = range(store.num_steps)
    if progress:
        from tqdm import tqdm
        steps = tqdm(steps, unit="step", desc="verifying", leave=False)
    damaged_steps = []
    for step in steps:  # one step at a time, so that every damaged step is reported, not only the first
        try:
            reduce_steps(store, store.check_steps([step]), into=total)
        except Exception as e:  # noqa: BLE001
            damaged_steps.append(step)
            if isinstance(e, PROGRAMMING_ERRORS):
                raise
            faults.extend(_diagnose_step(store, step) or [_describe(e, step)])
    report = {"path": str(store.path), "steps_checked": store.num_steps, "status": store.status,
              "codec": store.codec.name, "stated_codec_error": store.commit_record.get("codec_error"),
              "damaged_steps": damaged_steps}
    if store.complete and start is not None:
        final = attempt("final state", lambda: store.read_snapshot_flat("final"))
        residual = attempt("residual", lambda: store.read_snapshot_flat("residual")) if store.codec.lossy else None
        if final is not None and not faults:
            moved = (final - start).norm().item() or 1.0
            rebuilt = start + total
            measured = (rebuilt - final).norm().item() / moved
            report["measured_codec_error"] = measured
            if residual is not None:
                rebuilt += residual
            error = (rebuilt - final).norm().item() / moved
            report["reconstruction_error"], report["tolerance"] = error, FP32_TOLERANCE
            if not error <= FP32_TOLERANCE:
                faults.append(f"theta_0 + sum of deltas{' + residual' if residual is not None else ''} differs "
                              f"from theta_final by {error:.3g} (relative), more than {FP32_TOLERANCE:g}: steps are "
                              "missing or altered")
            stated = report["stated_codec_error"]
            if stated is not None and not abs(measured - stated) <= FP32_TOLERANCE + 1e-3 * abs(stated):
                faults.append(f"the codec error stated at close ({stated:.4g}) is not the one measured "
                              f"({measured:.4g}): the stored deltas or the residual were altered")
    report["faults"], report["ok"] = faults, not faults
    return report
