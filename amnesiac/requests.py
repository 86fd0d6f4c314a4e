"""Deletion requests served in place: purge the steps that saw samples from the run itself, with a receipt.

:func:`purge` undoes the steps whose batches held the selected samples (or classes) from the run's current final
state, makes the result the run's new final state, deletes those steps' deltas and ledger records, and appends a
receipt (:mod:`amnesiac.receipts`), all in one atomic switch of the run's commit file (:mod:`deltastore.rewrite`).
Requests compose: purging B after A gives what ``unlearn(sample_ids=A + B)`` gave on the original run. Steps are
renumbered ``0..n-1`` after each purge; receipts record step numbers as they were before their request.

:func:`finetune` continues the run itself after a purge: the fine-tune's steps are recorded into the run with their
batches in the ledger (so a later request undoes them too), and its end appends a ``finetune`` receipt.

Example:
    >>> import tempfile, torch, amnesiac
    >>> model = torch.nn.Linear(2, 2)
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> with amnesiac.Recorder(model, opt, run_dir, durable=False) as rec:
    ...     for ids in ([0, 1], [2, 3], [1, 4], [5, 6]):
    ...         rec.add_batch(ids)
    ...         model(torch.ones(2, 2)).sum().backward()
    ...         opt.step(); opt.zero_grad()
    >>> expected = amnesiac.open_run(run_dir).unlearn(sample_ids=[1, 2])
    >>> receipt = amnesiac.purge(run_dir, sample_ids=[1], request_id="user-17")
    >>> receipt["request_id"], receipt["steps_undone"], receipt["undone_steps"]
    ('user-17', 2, [0, 2])
    >>> _ = amnesiac.purge(run_dir, sample_ids=[2], request_id="user-18")
    >>> run = amnesiac.open_run(run_dir)
    >>> run.num_steps, torch.allclose(run.final_state()["weight"], expected["weight"])
    (1, True)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from deltastore import (DeltaStore, DeltaStoreError, RunRewrite, StoreLockedError, StoreNotFoundError, folded_metadata,
                        read_attachment, reopen_store)

from .errors import AmnesiacError, ResumeError, RunBusyError, RunDamagedError, RunNotFoundError, SelectionError
from .receipts import (RECEIPTS, chain_faults, encode, id_ranges, ids_of_ranges, parse, seal, state_sha256)
from .run import Run, _damage_is_reported
from .selection import Selection, int_array

METHOD = "amnesiac: the steps whose batches held the selection are subtracted from the final state and deleted"


def load_receipts(store: DeltaStore) -> list[dict]:
    """The run's receipts, oldest first; raises :class:`RunDamagedError` if the chain does not verify."""
    try:
        data = read_attachment(store, RECEIPTS)
    except DeltaStoreError as e:
        raise RunDamagedError(f"{store.path}: the deletion receipts cannot be read ({e}); run `amnesiac audit "
                              f"{store.path} --verify`. Nothing was changed.") from None
    if data is None:
        return []
    receipts, faults = parse(data)
    faults += chain_faults(receipts)
    if faults:
        raise RunDamagedError(f"{store.path}: the deletion receipts do not verify ({faults[0]}); run `amnesiac "
                              f"audit {store.path} --verify` for the full list. Nothing was changed.")
    return receipts


def refuse_folded(store: DeltaStore, *, sample_ids=None, classes=None) -> None:
    """Raise :class:`SelectionError` if any selected sample was trained on in a step folded into the start state."""
    folded = folded_metadata(store)
    if sample_ids is not None and "ids" in folded:
        hit = np.intersect1d(int_array(sample_ids, "sample ids"), folded["ids"].values)
        what = f"sample id(s) {hit[:5].tolist()}"
    elif classes is not None and "labels" in folded:
        hit = np.intersect1d(int_array(classes, "classes"), folded["labels"].values)
        what = f"class(es) {hit[:5].tolist()}"
    else:
        return
    if hit.size:
        raise SelectionError(f"{what} were trained on in steps that `deltastore gc` folded into the start state "
                             f"of {store.path}; their influence can no longer be undone (retention traded it for "
                             "disk). Retrain without them to forget them. Nothing was changed.")


def _resolve(run: Run, receipts: list[dict], sample_ids, classes) -> tuple[np.ndarray, dict, list]:
    """The steps to undo, the selection as recorded, and the earlier requests that already removed part of it."""
    selection = Selection.of(sample_ids=sample_ids, classes=classes, kinds=("sample_ids", "classes"))
    key, wanted = selection.kind, np.unique(selection.values)
    if not wanted.size:
        raise SelectionError(f"the {key.replace('_', ' ')} to purge are empty: nothing to forget")
    refuse_folded(run.store, **{key: wanted})
    fields = run.store.metadata()
    field = "ids" if key == "sample_ids" else "labels"
    if key == "classes" and "labels" not in fields and "ids" in fields:
        raise SelectionError("this run recorded no labels, so it cannot select by class; select by sample_ids")
    present = np.intersect1d(wanted, fields[field].values) if field in fields else np.zeros(0, np.int64)
    earlier, removed_before = [], []
    for r in receipts:
        gone = (ids_of_ranges(r.get("ids_removed_ranges", [])) if key == "sample_ids"
                else np.asarray(r.get("labels_removed", []), np.int64))
        if np.isin(wanted, gone).any():
            earlier.append(r.get("request_id"))
            removed_before.append(gone)
    gone = np.concatenate(removed_before) if removed_before else np.zeros(0, np.int64)
    unknown = np.setdiff1d(np.setdiff1d(wanted, present), gone)
    if unknown.size:
        raise SelectionError(f"{unknown.size} of the {key.replace('_', ' ')} never appear in this run's ledger nor "
                             f"in an earlier request's receipt, e.g. {unknown[:5].tolist()}; check them. Nothing was "
                             "purged.")
    steps = run.steps_for(**{key: present}) if present.size else np.zeros(0, np.int64)
    return steps, {key: wanted.tolist()}, earlier


def purge(run_dir: str | Path, *, sample_ids=None, classes=None, request_id: str | None = None) -> dict:
    """Forget samples (or classes) in place and return the receipt (a dict, also appended to the run's receipts).

    Takes the run's writer lock: a live Recorder on the run makes it fail with :class:`RunBusyError`. A SIGKILL at
    any moment leaves the run as it was before or after the purge. Samples that an earlier request already removed
    (they shared its steps) are accepted and cost nothing; ids that never were in the run are refused.
    """
    path = Path(run_dir)
    try:
        with _damage_is_reported(path), RunRewrite(path) as rw:
            store = rw.store
            if not store.complete:
                raise AmnesiacError(f"{path} is an incomplete run (recording, or left by a crash): finish it first "
                                    "(resume the Recorder and close it), then purge")
            receipts = load_receipts(store)
            request_id = str(request_id) if request_id is not None else f"request-{len(receipts) + 1}"
            for r in receipts:
                if r.get("request_id") == request_id and r.get("action") == "purge":
                    raise SelectionError(f"request {request_id!r} was already served (receipt {r['seq']}, "
                                         f"{r.get('time')}); give each request its own id. Nothing was purged.")
            run = Run(store)
            steps, selection, earlier = _resolve(run, receipts, sample_ids, classes)
            fields = store.metadata()
            removed_ids = np.concatenate([fields["ids"].of(int(s)) for s in steps]) if "ids" in fields and \
                steps.size else np.zeros(0, np.int64)
            removed_labels = np.unique(np.concatenate([fields["labels"].of(int(s)) for s in steps])) if \
                "labels" in fields and steps.size else np.zeros(0, np.int64)
            made = {}

            def receipt_for(plan) -> dict[str, bytes]:
                made["receipt"] = seal({
                    "action": "purge", "request_id": request_id, "time": _now(), "run_uid": store.uid,
                    "selection": selection, "method": METHOD, "steps_undone": int(steps.size),
                    "undone_steps": steps.tolist(), "steps_before": plan.steps_before,
                    "steps_after": int(plan.kept.size), "ids_removed": int(np.unique(removed_ids).size),
                    "ids_removed_ranges": id_ranges(removed_ids), "labels_removed": removed_labels.tolist(),
                    "already_removed_by": earlier, "bytes_removed": plan.dropped_bytes, "codec": plan.codec,
                    "lossy": store.codec.lossy, "codec_error": plan.codec_error or 0.0,
                    "weights_sha256": state_sha256(plan.final_state), "generation": plan.generation},
                    receipts[-1] if receipts else None)
                return {RECEIPTS: encode(receipts + [made["receipt"]])}

            result = rw.commit(drop=steps, attachments=receipt_for)
            return {**made["receipt"], "bytes_freed": result.bytes_freed, "seconds": result.seconds}
    except StoreLockedError as e:
        raise RunBusyError(f"cannot purge {path}: {e}") from None
    except StoreNotFoundError as e:
        raise RunNotFoundError(str(e)) from None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ---------------------------------------------------------------- recording more steps into a purged run
REOPEN_TOLERANCE = 1e-6  # relative: the model must hold the run's final state as loaded from it


def reopen_run(run_dir, model: torch.nn.Module, request_id: str | None):
    """For ``Recorder(..., reopen=True)``: open a complete run for more steps after checking that ``model`` holds
    its final state; returns the writable store, the codec residual to carry on, and the function that makes the
    attachments to commit with the new final state (a ``finetune`` receipt, if the run has receipts)."""
    state = model.state_dict()

    def check(store: DeltaStore) -> None:
        if not store.complete:
            raise ResumeError(f"{run_dir} is not a complete run: use resume=True (with a checkpoint) to continue "
                              "an interrupted recording")
        final = store.layout.flatten(store.read_snapshot("final"))
        now = store.layout.flatten({k: v.detach().float().cpu() for k, v in state.items()
                                    if k in store.layout.names}, out=torch.empty(store.layout.numel))
        if not (now - final).norm().item() <= REOPEN_TOLERANCE * final.norm().item():
            raise ResumeError(f"the model does not hold the final state of {run_dir}: load "
                              "amnesiac.open_run(run_dir).final_state() into it before reopening. Nothing was changed.")
        load_receipts(store)  # a run whose receipts do not verify gets no more steps until that is looked at

    try:
        store, residual = reopen_store(run_dir, check=check)
    except StoreLockedError as e:
        raise RunBusyError(f"cannot reopen {run_dir}: {e}") from None
    except StoreNotFoundError as e:
        raise RunNotFoundError(str(e)) from None
    steps_before = store.num_steps

    def attachments(final_state: dict[str, torch.Tensor]) -> dict[str, bytes] | None:
        receipts = load_receipts(store)
        if not receipts:
            return None
        last = next((r for r in reversed(receipts) if r.get("action") == "purge"), receipts[-1])
        receipt = seal({"action": "finetune", "request_id": request_id or last.get("request_id"), "time": _now(),
                        "run_uid": store.uid, "method": "training recorded into the run after a purge",
                        "steps_undone": 0, "steps_added": store.num_steps - steps_before,
                        "steps_before": steps_before, "steps_after": store.num_steps, "codec": store.codec.name,
                        "lossy": store.codec.lossy, "weights_sha256": state_sha256(final_state),
                        "generation": store.commit_record.get("generation", 0)}, receipts[-1])
        return {RECEIPTS: encode(receipts + [receipt])}

    return store, residual, attachments


def forgotten_so_far(store: DeltaStore) -> dict:
    """Every sample id and class that a purge request named (for choosing the data of a fine-tune)."""
    ids, classes = [], []
    for r in load_receipts(store):
        sel = r.get("selection", {}) if r.get("action") == "purge" else {}
        ids += sel.get("sample_ids", [])
        classes += sel.get("classes", [])
    return {"sample_ids": sorted(set(ids)), "classes": sorted(set(classes))}


def finetune(run_dir: str | Path, *, epochs: int, request_id: str | None = None, device: str = "cpu",
             download: bool = False, progress: bool = False) -> dict:
    """Fine-tune the run's final model on its retained data for ``epochs`` epochs, recording into the run itself.

    Needs the model and data description that ``amnesiac train`` stores. The retained data is the training set
    without every sample and class any purge request named. Returns what was recorded.
    """
    from .data import bundle_from_spec
    from .models import build_model
    from .recorder import Recorder
    from .setting import TrainingSetting
    from .training import make_optimizer, train
    if type(epochs) is not int or epochs < 1:
        raise AmnesiacError(f"--finetune-epochs must be a positive integer, not {epochs!r}")
    run = Run(DeltaStore.open(run_dir)) if not isinstance(run_dir, Run) else run_dir
    setting = TrainingSetting.of_run(run)
    model_spec = setting.require_model("fine-tuning into the run (from Python: Recorder(..., reopen=True))")
    bundle = bundle_from_spec(setting.data, download=download)
    gone = forgotten_so_far(run.store)
    retained = bundle.train.without_ids(np.asarray(gone["sample_ids"], np.int64))
    if gone["classes"]:
        retained = retained.without_classes(gone["classes"])
    model = build_model(model_spec)
    model.load_state_dict(run.final_state())
    model.to(device)
    opt = make_optimizer(model, setting.optimizer, setting.lr)
    start = time.perf_counter()
    with Recorder(model, opt, run.path, reopen=True, request_id=request_id) as rec:
        steps_before = rec.store.num_steps
        train(model, opt, retained, epochs=epochs, batch_size=setting.batch_size,
              seed=setting.seed + 1 + steps_before, recorder=rec, progress=progress)
    after = Run(DeltaStore.open(run.path))
    return {"finetune_epochs": epochs, "steps_added": after.num_steps - steps_before,
            "retained_samples": len(retained), "finetune_seconds": time.perf_counter() - start,
            "weights_sha256": state_sha256(after.final_state())}

