"""The ``deltastore`` command line: ``info``, ``verify`` and ``gc`` (retention) a store or run directory."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DeltaStoreError
from .store import DeltaStore
from .verify import verify_store


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def cmd_info(args) -> int:
    info = DeltaStore.open(args.path).info()
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    err = info["codec_error"]
    print(f"{info['path']}: {info['status']}, {info['steps']} steps of {info['elements']:,} elements "
          f"({info['tensors']} tensors)\n"
          f"codec {info['codec']}{' (lossy)' if info['lossy'] else ' (exact)'}, backend {info['backend']}"
          + (f", codec error {err:.3g}" if err is not None else "") + "\n"
          f"deltas {_human(info['delta_bytes'])} on disk for {_human(info['raw_fp32_bytes'])} of raw fp32 "
          f"(ratio {info['ratio']:.3f}); whole directory {_human(info['bytes_on_disk'])}")
    return 0


def cmd_verify(args) -> int:
    report = verify_store(DeltaStore.open(args.path), progress=not args.json)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for fault in report["faults"]:
            print(f"FAULT {fault}")
        extra = (f"; reconstruction error {report['reconstruction_error']:.3g}"
                 if "reconstruction_error" in report else "")
        print(f"{'OK' if report['ok'] else 'DAMAGED'}: {report['steps_checked']} steps checked{extra}")
    return 0 if report["ok"] else 1


def cmd_gc(args) -> int:
    from .retention import gc
    report = gc(args.path, keep_last_epochs=args.keep_last_epochs, before_step=args.before_step)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['path']}: folded {report['steps_folded']} of {report['steps_before']} steps into the start "
              f"state, {report['steps_after']} kept; freed {_human(report['bytes_freed'])} "
              f"({_human(report['bytes_on_disk_before'])} -> {_human(report['bytes_on_disk'])} on disk)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deltastore", description="Inspect and check delta stores (run directories).",
                                epilog="Exit status: 0 sound, 1 damaged (verify), 2 not a readable store.")
    sub = p.add_subparsers(dest="command", required=True)
    i = sub.add_parser("info", help="steps, codec, bytes on disk and the ratio to raw fp32")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    v = sub.add_parser("verify", help="check every checksum and theta_0 + sum(deltas) == theta_final")
    v.add_argument("path")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)
    g = sub.add_parser("gc", help="retention: fold old steps into the start state and free their disk",
                       description="Fold the steps before --before-step S (or before the last --keep-last-epochs N "
                       "epochs) into the start state: S_0 += their deltas, their files are deleted, the kept steps "
                       "are renumbered from 0 and verify still passes. Samples trained on in folded steps can no "
                       "longer be forgotten (amnesiac refuses them, naming them). Crash-safe; takes the writer "
                       "lock. Also removes files an interrupted purge or gc left (--before-step 0 does only that).")
    g.add_argument("path")
    which = g.add_mutually_exclusive_group(required=True)
    which.add_argument("--keep-last-epochs", type=int, metavar="N", help="keep the steps of the last N epochs")
    which.add_argument("--before-step", type=int, metavar="S", help="fold steps 0..S-1")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_gc)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DeltaStoreError as e:
        print(f"deltastore {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
