"""Whole-store verification: every checksum, and theta_0 + sum(all deltas) == theta_final within the codec's error.

What is checked, in order: (at open) store.json and commit.json against their own crc32c, the backend's metadata
against store.json, sizes against the files present; then the start state's crc32c, every committed step-log
record's crc32c, every chunk of every committed step (backend crc32c: Zarr per chunk and per shard index,
safetensors per chunk from the step log), and for a complete run (unless it was recorded selectively: then some
steps have no delta, the sum cannot add up, and the final state's checksum is all that is checked of it) the final
state (and residual) and ``theta_0 + sum(deltas) (+ residual) == theta_final`` within :data:`FP32_TOLERANCE`
relative to how far the run moved, and that the codec error stated at close is the one measured. A damaged step is
narrowed down to the chunks that fail, and the fault names the step and the tensors they hold.

Example:
    >>> import tempfile, torch
    >>> from deltastore import DeltaStore
    >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(2)}, durable=False)
    >>> _ = store.append_delta(torch.ones(2)); store.finalize({"w": torch.ones(2)})
    >>> verify_store(store)["ok"]
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import PROGRAMMING_ERRORS, CorruptionError, DeltaStoreError
from .reduce import reduce_steps

FP32_TOLERANCE = 1e-4  # float32 summation of many steps, relative to how far the run moved
ROUNDING_SLACK = 1e-7  # float32 rounding of theta_0 + sum itself, relative to the state's norm (a run that barely moved)
MAX_FAULTS_PER_STEP = 8


@dataclass(frozen=True)
class Reconstruction:
    """How far ``theta_0 + sum of deltas (+ residual)`` lands from a target state: the one check shared by
    :func:`verify_store` (target: the final state) and resuming a recording (target: the model's state).

    ``error`` is the L2 distance, ``moved`` how far the target is from theta_0, ``scale`` the target's norm.
    """

    error: float
    moved: float
    scale: float

    @property
    def relative_error(self) -> float:
        """``error`` relative to how far the run moved (1.0 stands in for a run that did not move)."""
        return self.error / (self.moved or 1.0)

    @property
    def ok(self) -> bool:
        """Within float32 summation error: :data:`FP32_TOLERANCE` of the distance moved, plus rounding."""
        return self.error <= FP32_TOLERANCE * self.moved + ROUNDING_SLACK * self.scale


def reconstruction(start: torch.Tensor, total: torch.Tensor, target: torch.Tensor,
                   residual: torch.Tensor | None = None) -> Reconstruction:
    """Compare ``start + total (+ residual)`` with ``target`` (flat float32 vectors on one device).

    Example:
        >>> r = reconstruction(torch.zeros(2), torch.ones(2), torch.ones(2))
        >>> r.ok, r.error, round(r.moved, 4)
        (True, 0.0, 1.4142)
        >>> reconstruction(torch.zeros(2), torch.ones(2), torch.full((2,), 1.1)).ok
        False
    """
    rebuilt = start + total
    if residual is not None:
        rebuilt += residual.to(rebuilt)
    return Reconstruction((target - rebuilt).norm().item(), (target - start).norm().item(), target.norm().item())


def check_state_at(store, target: torch.Tensor, steps: int, residual: torch.Tensor | None = None) -> Reconstruction:
    """:func:`reconstruction` of the flat ``target`` against theta_0 plus the first ``steps`` committed deltas
    (plus ``residual``), reading those steps once on the CPU.

    Example:
        >>> import tempfile
        >>> from deltastore import DeltaStore
        >>> store = DeltaStore.create(tempfile.mkdtemp() + "/s", {"w": torch.zeros(2)}, durable=False)
        >>> _ = store.append_delta(torch.ones(2)); _ = store.append_delta(torch.ones(2))
        >>> check_state_at(store, torch.ones(2), 1).ok, check_state_at(store, torch.ones(2), 2).ok
        (True, False)
    """
    start = store.read_snapshot_flat("start")
    total = store.sum_steps(range(steps)) if steps else torch.zeros_like(start)
    return reconstruction(start, total, target.detach().float().cpu().reshape(-1),
                          None if residual is None else residual.detach().float().cpu().reshape(-1))


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
    log_ok = attempt("step log", store.metadata) is not None
    total = torch.zeros(store.layout.numel)
    # a selective store's unstored steps have no data to check (their step-log records are checked above); with a
    # damaged step log, which steps were stored is unknown: every step is read, the fault is already reported
    selective = log_ok and store.selective
    steps = [int(t) for t in store.stored_mask.nonzero()[0]] if selective else list(range(store.num_steps))
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
              "damaged_steps": damaged_steps, "stored_steps": len(steps)}
    if selective:
        # S_0 + sum(stored deltas) != S_T by design: what is left to check is every checksum (done above)
        report["reconstruction"] = (f"not checkable: {store.num_steps - len(steps)} of {store.num_steps} steps were "
                                    "not stored (selective recording); checksums checked only")
        if store.complete and start is not None:
            attempt("final state", lambda: store.read_snapshot_flat("final"))
    elif store.complete and start is not None:
        final = attempt("final state", lambda: store.read_snapshot_flat("final"))
        residual = attempt("residual", lambda: store.read_snapshot_flat("residual")) if store.codec.lossy else None
        if final is not None and not faults:
            measured = reconstruction(start, total, final).relative_error
            report["measured_codec_error"] = measured
            check = reconstruction(start, total, final, residual)
            error = check.relative_error
            report["reconstruction_error"], report["tolerance"] = error, FP32_TOLERANCE
            if not check.ok:
                faults.append(f"theta_0 + sum of deltas{' + residual' if residual is not None else ''} differs "
                              f"from theta_final by {error:.3g} (relative), more than {FP32_TOLERANCE:g}: steps are "
                              "missing or altered")
            stated = report["stated_codec_error"]
            if stated is not None and not abs(measured - stated) <= FP32_TOLERANCE + 1e-3 * abs(stated):
                faults.append(f"the codec error stated at close ({stated:.4g}) is not the one measured "
                              f"({measured:.4g}): the stored deltas or the residual were altered")
    report["faults"], report["ok"] = faults, not faults
    return report
