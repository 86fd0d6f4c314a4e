"""Auditing a run's deletion requests, and the ``amnesiac audit`` / ``amnesiac forget --purge`` commands.

:func:`audit` lists the receipts; with ``verify=True`` it also checks what they claim, and names every fault:

- the receipts file matches the checksum the commit file holds for it, and the hash chain holds (no receipt
  altered, removed or reordered);
- no sample id or class that a purge request named remains in the ledger (so no step of it remains in the store),
  and no file of an earlier generation (the deleted steps' bytes) remains on disk;
- the run's current final state hashes to the last receipt's ``weights_sha256`` (so the last receipt was not
  removed, and nothing changed the weights since);
- ``deltastore verify``: every checksum, and ``theta_0 + sum(deltas) == theta_final``.

Example:
    >>> import tempfile, torch, amnesiac
    >>> model = torch.nn.Linear(2, 2); opt = torch.optim.SGD(model.parameters(), lr=0.5)
    >>> run_dir = tempfile.mkdtemp() + "/run"
    >>> with amnesiac.Recorder(model, opt, run_dir, durable=False) as rec:
    ...     for ids in ([0, 1], [2, 3]):
    ...         rec.add_batch(ids); model(torch.ones(1, 2)).sum().backward(); opt.step(); opt.zero_grad()
    >>> _ = amnesiac.purge(run_dir, sample_ids=[3], request_id="ticket-9")
    >>> report = audit(run_dir, verify=True)
    >>> report["ok"], [(r["request_id"], r["steps_undone"]) for r in report["receipts"]]
    (True, [('ticket-9', 1)])
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from deltastore import DeltaStore, DeltaStoreError, StoreNotFoundError, read_attachment, stale_files, verify_store

from .errors import AmnesiacError, RunNotFoundError, SelectionError
from .receipts import RECEIPTS, chain_faults, parse, state_sha256
from .run import Run, _damage_is_reported


def audit(run_dir: str | Path, *, verify: bool = False) -> dict:
    """``{"receipts": [...], "ok": bool, "faults": [...]}``; the checks run only with ``verify=True``."""
    path = Path(run_dir)
    try:
        with _damage_is_reported(path):
            store = DeltaStore.open(path)
    except StoreNotFoundError as e:
        raise RunNotFoundError(str(e)) from None
    try:
        raw, unreadable = read_attachment(store, RECEIPTS, check=False), []
    except DeltaStoreError as e:  # the receipts file itself is gone or not a plain file: that is the finding
        raw, unreadable = None, [f"receipts file: {e}"]
    receipts, faults = parse(raw or b"")
    faults = unreadable + faults
    report = {"run": str(path), "receipts": receipts, "verified": verify}
    if verify:
        faults = list(dict.fromkeys(faults + _verify(store, receipts)))
    report["faults"], report["ok"] = faults, not faults
    return report


def _verify(store: DeltaStore, receipts: list[dict]) -> list[str]:
    faults: list[str] = []
    try:
        read_attachment(store, RECEIPTS)
    except DeltaStoreError as e:
        faults.append(f"receipts file: {e}")
    faults = list(dict.fromkeys(faults))
    faults += chain_faults(receipts)
    for r in receipts:
        if r.get("run_uid") != store.uid:
            faults.append(f"receipt {r.get('seq')} (request {r.get('request_id')!r}) belongs to another run")
    run = Run(store)
    fields = store.metadata()
    for r in receipts:
        sel = r.get("selection") or {}
        for key, field in (("sample_ids", "ids"), ("classes", "labels")):
            named = np.asarray(sel.get(key, []), np.int64)
            left = np.intersect1d(named, fields[field].values) if field in fields and named.size else named[:0]
            if left.size:
                steps = np.unique(fields[field].step_of_each_value()[np.isin(fields[field].values, left)])
                faults.append(f"request {r.get('request_id')!r}: {key.replace('_', ' ')} {left[:5].tolist()} are "
                              f"still in the ledger, in steps {steps[:10].tolist()}: they were recorded again after "
                              "the purge, or the ledger was altered")
    stale = stale_files(store.path, store.commit_record)
    if stale:
        faults.append(f"{len(stale)} file(s) outside the committed generation remain on disk (e.g. {stale[0]}): a "
                      "purge or gc was interrupted (after its switch they hold the deleted steps' bytes). "
                      f"`deltastore gc {store.path} --before-step 0` removes them")
    if receipts:
        last = receipts[-1]
        try:
            now = state_sha256(run.final_state())
        except (DeltaStoreError, AmnesiacError) as e:
            now = f"unreadable ({e})"
        if now != last.get("weights_sha256"):
            faults.append(f"the run's final state (sha256 {now[:16]}...) is not the one the last receipt (request "
                          f"{last.get('request_id')!r}) states ({str(last.get('weights_sha256'))[:16]}...): the "
                          "weights changed after it, or later receipts were removed")
    report = verify_store(store)
    faults += [f"deltastore verify: {f}" for f in report["faults"]]
    return faults


# ---------------------------------------------------------------- command line
def cmd_audit(args) -> list | dict | None:
    report = audit(args.run, verify=args.verify)
    args.exit_status = 0 if report["ok"] else 1
    if args.json:
        return report if args.verify else report["receipts"]
    if not report["receipts"]:
        print(f"{args.run}: no deletion requests served")
    for r in report["receipts"]:
        sel = r.get("selection") or {}
        what = ", ".join(f"{k.replace('_', ' ')} {_short(v)}" for k, v in sel.items())
        extra = (f"undid {r.get('steps_undone')} step(s), removed {r.get('ids_removed', 0)} id(s) and "
                 f"{r.get('bytes_removed', 0):,} bytes" if r.get("action") == "purge" else
                 f"recorded {r.get('steps_added')} fine-tune step(s)")
        if r.get("already_removed_by"):
            extra += f" (part already removed by {', '.join(map(repr, r['already_removed_by']))})"
        print(f"#{r.get('seq')} {r.get('time')} {r.get('action')} request {r.get('request_id')!r}"
              + (f" ({what})" if what else "") + f": {extra}; {r.get('steps_after')} steps left; codec "
              f"{r.get('codec')}; weights sha256 {str(r.get('weights_sha256'))[:16]}...")
    for fault in report["faults"]:
        print(f"FAULT {fault}")
    if args.verify:
        print(("OK" if report["ok"] else "FAILED") + f": {len(report['receipts'])} receipt(s) checked")
    elif report["receipts"]:
        print("(listed, not checked: add --verify to check the chain, the ledger and the weights)")
    return None


def _short(values: list) -> str:
    return ",".join(map(str, values[:8])) + (f" and {len(values) - 8} more" if len(values) > 8 else "")


def cmd_purge(args) -> dict:
    """``amnesiac forget --purge``: serve one request in place (and optionally fine-tune into the run)."""
    from safetensors.torch import save_file

    from .cli import parse_ints
    from .requests import finetune, purge
    if args.steps:
        raise SelectionError("--purge forgets samples or classes (--samples or --classes); undoing bare --steps "
                             "in place is not a deletion request")
    if args.method != "amnesiac":
        raise AmnesiacError(f"--purge serves the request with amnesiac itself; --method {args.method} writes new "
                            "weights to --out without changing the run")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and not args.overwrite:
        raise AmnesiacError(f"{out} exists; pass --overwrite or choose another --out (nothing was purged)")
    if args.finetune_epochs and not Run(DeltaStore.open(args.run)).spec.get("model_spec"):
        raise AmnesiacError("--finetune-epochs needs the model and data description that `amnesiac train` stores; "
                            "this run was recorded from Python (nothing was purged)")
    receipt = purge(args.run, sample_ids=parse_ints(args.samples) if args.samples else None,
                    classes=parse_ints(args.classes) if args.classes else None, request_id=args.request_id)
    result = {"run": str(args.run), "receipt": receipt}
    if args.finetune_epochs:
        result["finetune"] = finetune(args.run, epochs=args.finetune_epochs, request_id=receipt["request_id"],
                                      device=args.device, download=args.download, progress=not args.json)
    if out is not None:
        state = Run(DeltaStore.open(args.run)).final_state()
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"amnesiac": json.dumps({"method": "amnesiac-purge", "request_id": receipt["request_id"],
                                        "steps_undone": receipt["steps_undone"],
                                        "weights_sha256": state_sha256(state)})}
        save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
        result["out"] = str(out)
    if not args.json:
        earlier = receipt["already_removed_by"]
        print(f"purged request {receipt['request_id']!r}: undid {receipt['steps_undone']} of "
              f"{receipt['steps_before']} steps, removed {receipt['ids_removed']} id(s) from the ledger, freed "
              f"{receipt['bytes_freed']:,} bytes in {receipt['seconds']:.2f} s; weights sha256 "
              f"{receipt['weights_sha256'][:16]}..."
              + (f" (part of it was already removed by {', '.join(map(repr, earlier))})" if earlier else ""))
        if "finetune" in result:
            ft = result["finetune"]
            print(f"fine-tuned {ft['finetune_epochs']} epoch(s) on {ft['retained_samples']} retained samples: "
                  f"{ft['steps_added']} steps recorded into the run")
        if out is not None:
            print(f"wrote {out}")
    return result


def add_audit_parser(sub) -> None:
    a = sub.add_parser("audit", help="list the deletion requests a run has served; --verify checks them",
                       description="List the receipts of the deletion requests served in place (`amnesiac forget "
                       "--purge`). --verify checks the hash chain, that no purged id remains in the ledger or its "
                       "steps on disk, that the final weights match the last receipt, and every checksum of the "
                       "run; it exits 1 and names each fault otherwise.")
    a.add_argument("run", help="the run directory")
    a.add_argument("--verify", action="store_true", help="check the receipts against the run, exit 1 on a fault "
                   "(default: only list them)")
    a.add_argument("--json", action="store_true", help="print the receipts as a JSON list (with --verify: an "
                   "object with ok, faults and receipts; default: text)")
    a.set_defaults(func=cmd_audit)

