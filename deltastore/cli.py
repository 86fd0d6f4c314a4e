"""The ``deltastore`` command line: ``info``, ``verify`` and ``gc`` (retention) a store or run directory, ``plan``
a recording."""

from __future__ import annotations

import argparse
import json
import sys

from .errors import DeltaStoreError
from .plan import calibration, plan
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
    stored = ("" if info["stored_steps"] == info["steps"] else
              f" ({info['stored_steps']} stored: recorded selectively)")
    print(f"{info['path']}: {info['status']}, {info['steps']} steps{stored} of {info['elements']:,} elements "
          f"({info['tensors']} tensors)\n"
          f"codec {info['codec']}{' (lossy)' if info['lossy'] else ' (exact)'}, backend {info['backend']}"
          + (f", codec error {err:.3g}" if err is not None else "") + "\n"
          f"deltas {_human(info['delta_bytes'])} on disk for {_human(info['raw_fp32_bytes'])} of raw fp32 "
          f"(ratio {info['ratio']:.3f}); whole directory {_human(info['bytes_on_disk'])}")
    return 0


def cmd_verify(args) -> int:
    # a bar only where it can be redrawn: in a log it would leave a line of clutter per refresh
    report = verify_store(DeltaStore.open(args.path), progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        for fault in report["faults"]:
            print(f"FAULT {fault}")
        extra = (f"; reconstruction error {report['reconstruction_error']:.3g}"
                 if "reconstruction_error" in report else f"; reconstruction {report['reconstruction']}"
                 if "reconstruction" in report else "")
        print(f"{'OK' if report['ok'] else 'DAMAGED'}: {report['steps_checked']} steps checked{extra}")
    return 0 if report["ok"] else 1


def cmd_plan(args) -> int:
    params = args.params if args.params is not None else calibration()["models"][args.model]
    p = plan(params=params, steps=args.steps, codec=args.codec, epochs=args.epochs,
             deletable_fraction=args.deletable_fraction, batch_size=args.batch_size, isolate=args.isolate,
             calibrate=args.calibrate)
    if args.json:
        print(json.dumps(p, indent=1))
        return 0
    print(f"{p['steps']} steps of {p['params']:,} floats, codec {p['codec']}: {p['stored_steps']} steps stored\n"
          f"raw fp32 {_human(p['raw_fp32_bytes'])}, on disk {_human(p['bytes_on_disk'])} (ratio "
          f"{p['figures']['ratio']:.3g}, with S_0, S_T and the ledger)\n"
          f"written per step {_human(p['write_bytes_per_step'])} on average; the writer takes "
          f"{p['writer_seconds_per_stored_step']:.3f} s per stored step on 2 cores\n"
          f"forget one sample: {p['steps_undone_per_sample']} steps undone, about "
          f"{p['forget_one_sample_seconds']:.2f} s")
    return 0


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
    pl = sub.add_parser("plan", help="estimate a recording's size and the cost of forgetting, before the run",
                        description="Estimate raw_fp32_bytes, bytes_on_disk, write_bytes_per_step and "
                        "forget_one_sample_seconds from the ratios and speeds the benchmarks measured (shipped with "
                        "the package, each figure with its source) or from an existing run (--calibrate RUN). "
                        "Example: deltastore plan --model resnet18 --steps 7813 --epochs 10 --codec fp16 "
                        "--deletable-fraction 0.01 --batch-size 64 --isolate")
    size = pl.add_mutually_exclusive_group(required=True)
    size.add_argument("--params", type=int, help="floats per step (the model's floating state_dict elements)")
    size.add_argument("--model", choices=["resnet18", "resnet50"], help="a model whose size is known (ImageNet head)")
    pl.add_argument("--steps", type=int, required=True, help="optimizer steps of the training")
    pl.add_argument("--codec", required=True, help="fp32, fp16, bf16 or topk:F")
    pl.add_argument("--epochs", type=int, default=1,
                    help="epochs the steps make (each sample is seen once per epoch; default 1)")
    pl.add_argument("--deletable-fraction", type=float, help="record selectively: this fraction may be forgotten")
    pl.add_argument("--batch-size", type=int, help="samples per step (for plain shuffling and the ledger)")
    pl.add_argument("--isolate", action="store_true", help="the deletable samples are batched together "
                    "(amnesiac.IsolatingBatchSampler)")
    pl.add_argument("--calibrate", metavar="RUN", help="take the ratio and the reduce speed from this run")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)
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
