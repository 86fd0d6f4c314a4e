"""The ``amnesiac`` command line: demo, train, forget, eval, experiment, audit.

Run ``amnesiac COMMAND --help`` for each."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from deltastore import DeltaStoreError

from .cli_args import UsageError, check_weights_file, note, parse_device, parse_ids
from .cli_parser import build_parser as _build_parser
from .cli_train import TrainingInterrupted, cmd_train, interrupted_exit
from .errors import AmnesiacError, SelectionError
from .setting import TrainingSetting
from .progress import interactive



def parse_ints(text: str) -> list[int]:
    """``"1,2,5-7"`` -> ``[1, 2, 5, 6, 7]``; ``@FILE`` reads whitespace/comma separated ids from a file."""
    return parse_ids(text).tolist()


def cmd_demo(args) -> dict:
    import shutil
    import tempfile

    from .demo import format_table, run_demo
    if args.keep_dir is not None and args.keep_dir.isdigit():
        raise UsageError(f"--keep {args.keep_dir} names the directory that keeps the run; to keep "
                         f"{args.keep_dir} threes in training use --keep-count {args.keep_dir}")
    scratch = None if args.keep_dir else Path(tempfile.mkdtemp(prefix="amnesiac-demo-"))
    try:
        result = run_demo(args.keep_dir or scratch / "run", keep=args.keep_count, epochs=args.epochs,
                          codec=args.codec, progress=not args.json)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    result["run_kept"] = scratch is None
    if not args.json:
        print(format_table(result))
    return result


def _selection(args, run) -> dict:
    """The one selection given (``--samples``, ``--classes`` or ``--steps``), checked against the run."""
    if args.samples is not None:
        ids = run.sample_ids()
        return {"sample_ids": parse_ids(args.samples, option="--samples", what="sample id",
                                        limit=int(ids[-1]) if ids.size else -1)}
    if args.classes is not None:
        return {"classes": parse_ids(args.classes, option="--classes", what="class")}
    return {"steps": parse_ids(args.steps, option="--steps", what="step", limit=run.num_steps - 1)}


def cmd_forget(args) -> dict:
    from safetensors.torch import save_file

    from .run import open_run
    if args.purge:  # the request served in place, with a receipt: amnesiac/audit.py
        from .audit import cmd_purge
        return cmd_purge(args)
    if args.out is None:
        raise AmnesiacError("give --out FILE.safetensors for the new weights (or --purge to forget in place)")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise AmnesiacError(f"{out} exists; pass --overwrite or choose another --out")
    device = parse_device(args.device)
    run = open_run(args.run)
    selection = _selection(args, run)
    method = args.method
    if method == "amnesiac" and args.finetune_epochs:
        method = "amnesiac-finetune"  # the older spelling: amnesiac + --finetune-epochs K
    elif args.finetune_epochs and method != "amnesiac-finetune":
        raise AmnesiacError(f"--finetune-epochs is for amnesiac; --method {method} takes its length from --epochs")
    if method not in ("amnesiac", "amnesiac-finetune") and device.type != "cpu":
        raise UsageError(f"--method {method} trains on the CPU here; leave out --device {args.device} (it sums "
                         "deltas for amnesiac and amnesiac-finetune only)")
    if method == "amnesiac":
        report = run.unlearn_report(**selection, device=device, progress=not args.json and interactive())
        state = {k: v.cpu() for k, v in report.state.items()}
        result = {"run": str(run.path), "out": str(out), "method": method, **report.summary(), "finetune_epochs": 0,
                  "finetune_seconds": 0.0, "complete_run": run.complete}
    else:
        state, result = _baseline(run, selection, method, args, device)
        result = {"run": str(run.path), "out": str(out), **result, "complete_run": run.complete}
    meta = {"amnesiac": json.dumps({k: v for k, v in result.items() if k != "out"}, default=_jsonable)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    if not args.json:
        if "steps_undone" in result:
            print(f"{method}: undid {result['steps_undone']} of {result['total_steps']} steps in "
                  f"{result['seconds']:.2f} s ({plan_in_words(result)})"
                  + (f" + {result['finetune_seconds']:.2f} s of fine-tuning" if result["finetune_epochs"] else "")
                  + f"; wrote {out}")
        else:
            print(f"{method}: {result['seconds']:.2f} s; wrote {out}")
        if not run.complete:
            print(incomplete_notice(run))
    if "steps_undone" in result:
        warning = undo_warning(result["steps_undone"], result["total_steps"], method)
        if warning:
            note(warning)
    return result


def plan_in_words(result: dict) -> str:
    """How the weights were computed, for people: ``final-minus-selected`` and ``start-plus-others`` are for JSON.

    >>> plan_in_words({"plan": "start-plus-others", "steps_read": 3})
    'rebuilt from the initial weights plus the 3 steps kept'
    """
    if result["plan"] == "start-plus-others":
        if not result["steps_read"]:
            return "the initial weights: no step was kept"
        return f"rebuilt from the initial weights plus the {result['steps_read']} steps kept"
    return f"subtracted the {result['steps_read']} undone steps from the final weights"


def undo_warning(undone: int, total: int, method: str) -> str | None:
    """A warning when a forget undoes more than half of the run (it then returns close to the initial weights).

    >>> undo_warning(10, 100, "amnesiac") is None
    True
    >>> undo_warning(90, 100, "amnesiac").startswith("warning: this undid 90% of the run's steps")
    True
    """
    if total == 0 or undone * 2 <= total:
        return None
    fine_tune = "" if method == "amnesiac-finetune" else "fine-tune afterwards (--finetune-epochs 1), "
    return (f"warning: this undid {undone / total:.0%} of the run's steps ({undone} of {total}): most batches held a "
            "selected sample, so little of the training is left (at 100% the result is the initial weights). "
            f"Remedies: {fine_tune}"
            "use a baseline (--method retrain or finetune), or record with few samples of the class to forget "
            "(amnesiac train --keep-class C --keep-count N, the paper's setting)")


def incomplete_notice(run) -> str:
    return (f"note: {run.path} is an incomplete run (training was interrupted) with {run.num_steps} committed "
            "steps; results are for those steps. `amnesiac train ... --resume` continues it")


def _baseline(run, selection, method, args, device):
    """Every --method but plain amnesiac: needs the model and data description `amnesiac train` stores."""
    from .baselines import UnlearnTask, run_method
    TrainingSetting.of_run(run).require_model(f"--method {method} (or --finetune-epochs)")
    task = UnlearnTask.from_run(run, **selection, download=args.download)
    options: dict = {}
    if method == "amnesiac-finetune":
        options = {"epochs": args.finetune_epochs or args.epochs or 1, "device": str(device)}
    elif method in ("finetune", "relabel", "neggrad") and args.epochs:
        options = {"epochs": args.epochs}
    elif method == "retrain" and args.epochs:
        options = {"epochs": args.epochs}
    if method == "neggrad" and args.lr:
        options["lr"] = args.lr
    r = run_method(method, task, **options)
    result = {"method": method, "seconds": r.seconds, **{k: v for k, v in r.info.items() if k != "seconds"},
              "forget_set_size": len(task.forget_set)}
    if method == "amnesiac-finetune":
        result.update(seconds=r.info.get("unlearn_seconds", r.seconds), total_seconds=r.seconds,
                      finetune_seconds=r.info.get("finetune_seconds", 0.0))
    return r.state, result


def cmd_eval(args) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .data import bundle_from_spec
    from .evaluation import evaluate, fit_shadow_attack, json_ready, storage
    from .models import build_model
    from .run import open_run
    from .training import accuracy
    if args.weights:
        check_weights_file(args.weights)
    if args.reference:
        check_weights_file(args.reference, "--reference")
    run = open_run(args.run)
    setting = TrainingSetting.of_run(run)
    model = build_model(setting.require_model("amnesiac eval (otherwise evaluate from Python with "
                                              "amnesiac.training.accuracy and amnesiac.evaluation)"))
    bundle = bundle_from_spec(setting.data, download=args.download)
    state = load_file(args.weights) if args.weights else run.final_state()
    run.load_into(model, state)
    forget = parse_ids(args.forget_classes, option="--forget-classes", what="class",
                       limit=bundle.num_classes - 1).tolist() if args.forget_classes is not None else []
    result = {"run": str(run.path), "weights": args.weights or "final", "forget_classes": forget,
              "test": accuracy(model, bundle.test, forget), "train": accuracy(model, bundle.train, forget),
              "storage": storage(run), "complete_run": run.complete}
    if args.weights:
        with safe_open(args.weights, "pt") as f:
            try:
                made = json.loads((f.metadata() or {}).get("amnesiac", "{}"))
            except ValueError:  # a file not written by `amnesiac forget`: nothing to say about how it was made
                made = {}
        made = made if isinstance(made, dict) else {}
        result["method"] = made.get("method", "amnesiac" if "steps_undone" in made else None)
        result["seconds"] = made.get("total_seconds", made.get("seconds"))
        result["made_by"] = made
    forget_samples = None
    if args.forget_samples is not None:
        ids = run.sample_ids()
        forget_samples = parse_ids(args.forget_samples, option="--forget-samples", what="sample id",
                                   limit=int(ids[-1]) if ids.size else -1).tolist()
    if forget and forget_samples:
        raise SelectionError("pass --forget-classes or --forget-samples, not both")
    if args.shadows and not (forget or forget_samples):
        raise SelectionError("--shadows attacks a forget set: give --forget-classes or --forget-samples too")
    if forget or forget_samples:
        from .baselines import UnlearnTask
        task = UnlearnTask.from_run(run, classes=forget or None, sample_ids=None if forget else forget_samples,
                                    bundle=bundle)
        reference = load_file(args.reference) if args.reference else None
        attack = fit_shadow_attack(task, shadows=args.shadows, progress=not args.json) if args.shadows else None
        metrics = evaluate(task, state, reference=reference, attack=attack)
        result.update({k: v for k, v in metrics.items() if k != "test"})
        if attack is not None:  # how good the attack's shadow models are says how much its numbers mean
            result["shadow_accuracy"] = getattr(attack, "shadow_accuracy", None)
    result = json_ready(result)
    if not args.json:
        t = result["test"]
        print(f"test accuracy: overall {_p(t['overall'])}"
              + (f", forgotten classes {_p(t['forgotten'])}, retained {_p(t['retained'])}" if forget else ""))
        if "mia_loss" in result:
            print(f"forget set: accuracy {_p(result.get('forget_set'))}, loss attack {_attack(result['mia_loss'])}"
                  + (f", shadow attack {_attack(result['mia_shadow'])} (shadow models' accuracy "
                     f"{_p(result.get('shadow_accuracy'))})" if "mia_shadow" in result else ""))
        if "distance" in result:
            d = result["distance"]
            print(f"to the reference: weights L2 {_f(d['weights_l2'])} ({_f(d['weights_l2_relative'])} relative), "
                  f"test agreement {_p(d['test_agreement'])}, KL {_f(d['test_kl'], 4)}")
        if not run.complete:
            print(incomplete_notice(run))
    return result


def _p(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _attack(r: dict) -> str:
    """One attack object of `eval --json` as text: recall at its false-positive rate, AUC with its interval."""
    ci = r.get("auc_ci95") or [None, None]
    return (f"recall {_f(r['recall'])} at FPR {_f(r.get('fpr'))}, AUC {_f(r['auc'])} [95% CI {_f(ci[0])}, "
            f"{_f(ci[1])}], TPR at 1% FPR {_f(r.get('tpr_at_1pct_fpr'))}")


def _f(x, digits: int = 3) -> str:
    """A metric for text output: JSON-ready results hold None where a metric is undefined (NaN)."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def cmd_experiment(args) -> dict:
    from .experiments import run_experiment
    result = run_experiment(args.name, config=args.config, out=args.out, smoke=args.smoke, keep_runs=args.keep_runs,
                            quiet=args.json, data_dir=args.data_dir)
    if not args.json:
        print(Path(result["report"]).read_text())
        print(f"wrote {result['out']}/ (report.md, results.json, plots)")
    return result


def build_parser():
    """The ``amnesiac`` argument parser (see :mod:`amnesiac.cli_parser`)."""
    return _build_parser({"demo": cmd_demo, "train": cmd_train, "forget": cmd_forget, "eval": cmd_eval,
                          "experiment": cmd_experiment})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = args.func(args)
    except TrainingInterrupted as e:
        return interrupted_exit(e)
    except (AmnesiacError, DeltaStoreError) as e:
        print(f"amnesiac {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # `train` handles Ctrl-C itself; elsewhere nothing half-done is left to keep
        print(f"amnesiac {args.command}: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        print(json.dumps(result, indent=1, default=_jsonable))
    return getattr(args, "exit_status", 0)  # audit --verify: 1 when it finds a fault


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
