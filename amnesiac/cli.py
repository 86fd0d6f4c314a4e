"""The ``amnesiac`` command line: demo, train, forget, eval, experiment, audit.

Run ``amnesiac COMMAND --help`` for each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from deltastore import DeltaStoreError, resolve_device

from .errors import AmnesiacError, SelectionError
from .selection import Selection
from .setting import TrainingSetting

EPILOG = "Errors exit with status 2 and one line naming the remedy; nothing is written on bad input."


def parse_ints(text: str) -> list[int]:
    """``"1,2,5-7"`` -> ``[1, 2, 5, 6, 7]``; ``@FILE`` reads whitespace/comma separated ids from a file."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text().replace("\n", ",").replace(" ", ",")
    out: list[int] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, part)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise SelectionError(f"cannot read {part!r} as an integer or a range like 5-9") from None
    return out


def cmd_demo(args) -> dict:
    from .demo import format_table, run_demo
    result = run_demo(args.run, keep=args.keep, epochs=args.epochs, codec=args.codec, progress=not args.json)
    if not args.json:
        print(format_table(result))
    return result


def cmd_train(args) -> dict:
    from .data import load_dataset
    from .models import build_model, model_spec
    from .recorder import Recorder
    from .training import accuracy, make_optimizer, train
    device = resolve_device(args.device)
    bundle = load_dataset(args.dataset, data_dir=args.data_dir, download=args.download, seed=args.seed,
                          path=args.data_path, size=args.size)
    data_spec = dict(bundle.spec)
    if args.keep_class is not None:
        bundle.train = bundle.train.keep_few_of_class(args.keep_class, args.keep_count, args.seed)
        data_spec.update(keep_class=args.keep_class, keep_count=args.keep_count)
    spec = model_spec(args.model, bundle.input_shape, bundle.num_classes)
    torch.manual_seed(args.seed)
    model = build_model(spec).to(device)
    opt = make_optimizer(model, args.optimizer, args.lr)
    setting = TrainingSetting(model_spec=spec, data=data_spec, optimizer=args.optimizer, lr=args.lr,
                              batch_size=args.batch_size, epochs=args.epochs, seed=args.seed)
    with Recorder(model, opt, args.run, codec=args.codec, backend=args.backend,
                  **setting.recorder_options()) as rec:
        seconds = train(model, opt, bundle.train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        recorder=rec, progress=not args.json)
    acc = accuracy(model, bundle.test)
    result = {"run": str(args.run), "steps": rec.store.num_steps, "train_seconds": seconds,
              "test_accuracy": acc["overall"], "codec": rec.store.codec.name}
    if not args.json:
        print(f"recorded {result['steps']} steps into {args.run} in {seconds:.1f} s; test accuracy "
              f"{acc['overall']:.1%}")
    return result


def _selection(args) -> Selection:
    return Selection.of(sample_ids=parse_ints(args.samples) if args.samples else None,
                        classes=parse_ints(args.classes) if args.classes else None,
                        steps=parse_ints(args.steps) if args.steps else None)


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
    run = open_run(args.run)
    selection = _selection(args)
    method = args.method
    if method == "amnesiac" and args.finetune_epochs:
        method = "amnesiac-finetune"  # the older spelling: amnesiac + --finetune-epochs K
    elif args.finetune_epochs and method != "amnesiac-finetune":
        raise AmnesiacError(f"--finetune-epochs is for amnesiac; --method {method} takes its length from --epochs")
    if method == "amnesiac":
        report = run.unlearn_report(**selection.kwargs(), device=resolve_device(args.device), progress=not args.json)
        state = {k: v.cpu() for k, v in report.state.items()}
        result = {"run": str(run.path), "out": str(out), "method": method, **report.summary(), "finetune_epochs": 0,
                  "finetune_seconds": 0.0, "complete_run": run.complete}
    else:
        state, result = _baseline(run, selection, method, args)
        result = {"run": str(run.path), "out": str(out), **result, "complete_run": run.complete}
    meta = {"amnesiac": json.dumps({k: v for k, v in result.items() if k != "out"}, default=_jsonable)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    if not args.json:
        if "steps_undone" in result:
            print(f"{method}: undid {result['steps_undone']} of {result['total_steps']} steps ({result['plan']}, "
                  f"read {result['steps_read']} steps) in {result['seconds']:.2f} s"
                  + (f" + {result['finetune_seconds']:.2f} s of fine-tuning" if result["finetune_epochs"] else "")
                  + f"; wrote {out}")
        else:
            print(f"{method}: {result['seconds']:.2f} s; wrote {out}")
    return result


def _baseline(run, selection, method, args):
    """Every --method but plain amnesiac: needs the model and data description `amnesiac train` stores."""
    from .baselines import UnlearnTask, run_method
    TrainingSetting.of_run(run).require_model(f"--method {method} (or --finetune-epochs)")
    task = UnlearnTask.from_run(run, **selection.kwargs(), download=args.download)
    options: dict = {}
    if method == "amnesiac-finetune":
        options = {"epochs": args.finetune_epochs or args.epochs or 1, "device": str(resolve_device(args.device))}
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
    run = open_run(args.run)
    setting = TrainingSetting.of_run(run)
    model = build_model(setting.require_model("amnesiac eval (otherwise evaluate from Python with "
                                              "amnesiac.training.accuracy and amnesiac.evaluation)"))
    bundle = bundle_from_spec(setting.data, download=args.download)
    state = load_file(args.weights) if args.weights else run.final_state()
    run.load_into(model, state)
    forget = parse_ints(args.forget_classes) if args.forget_classes else []
    result = {"run": str(run.path), "weights": args.weights or "final", "forget_classes": forget,
              "test": accuracy(model, bundle.test, forget), "train": accuracy(model, bundle.train, forget),
              "storage": storage(run)}
    if args.weights:
        with safe_open(args.weights, "pt") as f:
            made = json.loads((f.metadata() or {}).get("amnesiac", "{}"))
        result["method"] = made.get("method", "amnesiac" if "steps_undone" in made else None)
        result["seconds"] = made.get("total_seconds", made.get("seconds"))
        result["made_by"] = made
    forget_samples = parse_ints(args.forget_samples) if args.forget_samples else None
    if forget and forget_samples:
        raise SelectionError("pass --forget-classes or --forget-samples, not both")
    if args.shadows and not (forget or forget_samples):
        raise SelectionError("--shadows attacks a forget set: give --forget-classes or --forget-samples too")
    if forget or forget_samples:
        from .baselines import UnlearnTask
        task = UnlearnTask.from_run(run, classes=forget or None, sample_ids=None if forget else forget_samples,
                                    bundle=bundle)
        reference = load_file(args.reference) if args.reference else None
        attack = fit_shadow_attack(task, shadows=args.shadows) if args.shadows else None
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


def build_parser() -> argparse.ArgumentParser:
    from deltastore import CODEC_NAMES

    from .baselines import METHODS
    from .data import DATASETS
    from .experiments import EXPERIMENTS
    from .models import MODELS
    p = argparse.ArgumentParser(prog="amnesiac", description="Record PyTorch training runs and forget training "
                                "samples by undoing the optimizer steps that saw them (amnesiac unlearning).",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="forget a digit from an MLP trained on scikit-learn digits (offline, <1 min)",
                       description="Train an MLP on scikit-learn's digits with only a few threes, recording every "
                       "step; forget the threes; print accuracy before, after, after one fine-tune epoch and of a "
                       "model retrained from scratch, with timings and the store's size.")
    d.add_argument("--run", help="run directory to create (default: a new temporary directory)")
    d.add_argument("--keep", type=int, default=6, help="threes kept in training (default 6)")
    d.add_argument("--epochs", type=int, default=20)
    d.add_argument("--codec", default="fp32", help=f"delta codec: {', '.join(CODEC_NAMES)}")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model while recording every step into a run directory")
    t.add_argument("--dataset", choices=DATASETS, required=True)
    t.add_argument("--model", choices=MODELS, required=True)
    t.add_argument("--run", required=True, help="new run directory")
    t.add_argument("--codec", default="fp32", help=f"{', '.join(CODEC_NAMES)} (default fp32, exact)")
    t.add_argument("--backend", default="zarr", choices=["zarr", "safetensors"])
    t.add_argument("--epochs", type=int, default=5)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--optimizer", default="adam", choices=["adam", "sgd"])
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--keep-class", type=int, help="keep only --keep-count samples of this class (paper setting)")
    t.add_argument("--keep-count", type=int, default=100)
    t.add_argument("--size", type=int, default=2000, help="samples of the synthetic data set")
    t.add_argument("--data-dir", help="data folder: torchvision's copies (mnist, cifar100), and where a relative "
                   "--data-path is found if not in the working directory (default: $AMNESIAC_DATA, else ./data)")
    t.add_argument("--data-path", help="the .npz file for --dataset npz (arrays images, labels)")
    t.add_argument("--download", action="store_true", help="let torchvision download mnist/cifar100")
    t.add_argument("--device", default="cpu")
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("forget", help="unlearn samples, classes or steps from a saved run (offline)",
                       description="Undo every step whose batch held the selected samples and write the resulting "
                       "state_dict as safetensors. Needs only the run directory. IDS: 1,2,5-9 or @file.")
    f.add_argument("--run", required=True)
    sel = f.add_mutually_exclusive_group(required=True)
    sel.add_argument("--samples", help="sample ids to forget")
    sel.add_argument("--classes", help="classes to forget (the run must have recorded labels)")
    sel.add_argument("--steps", help="steps to undo")
    f.add_argument("--out", help="output FILE.safetensors (required unless --purge; with --purge: a copy of the "
                   "run's new final state)")
    f.add_argument("--purge", action="store_true",
                   help="forget in place: undo the steps from the run's final state, delete their deltas and ledger "
                   "records, and append a receipt (see `amnesiac audit`); --finetune-epochs K then records the "
                   "fine-tune into the run")
    f.add_argument("--request-id", help="with --purge: the request's id in its receipt (default request-N)")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--method", default="amnesiac", choices=list(METHODS),
                   help="amnesiac (default: undo the steps), amnesiac-finetune, or a baseline: retrain (from the "
                   "run's initial weights), finetune (on the retained data), relabel (random wrong labels for the "
                   "forget set), neggrad (gradient ascent on the forget set); all but amnesiac need the run's data")
    f.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune epochs on the retained data afterwards (needs the run's data set); with the "
                   "default method this means amnesiac-finetune")
    f.add_argument("--epochs", type=int, help="epochs of the baseline (default: retrain as long as the run "
                   "trained; finetune, relabel: 1; neggrad: 1)")
    f.add_argument("--lr", type=float, help="neggrad's learning rate (default: the run's)")
    f.add_argument("--device", default="cpu", help="cpu or cuda: where the deltas are summed")
    f.add_argument("--download", action="store_true")
    f.set_defaults(func=cmd_forget)

    e = sub.add_parser("eval", help="test accuracy of a run's final weights or of a forget result")
    e.add_argument("--run", required=True)
    e.add_argument("--weights", help="FILE.safetensors from `amnesiac forget` (default: the run's final state)")
    e.add_argument("--forget-classes", help="classes to report apart, e.g. 3")
    e.add_argument("--forget-samples", help="sample ids that were forgotten (for the forget-set metrics)")
    e.add_argument("--reference", help="FILE.safetensors to measure the distance to (e.g. `forget --method retrain`)")
    e.add_argument("--shadows", type=int, default=0,
                   help="shadow models for the membership inference attack (default 0: only the loss-threshold "
                   "attack; 4 is a good choice): trained like the target (same class mix and optimizer steps) on "
                   "its retained data plus half of the held-out data; attacks are scored on a disjoint quarter")
    e.add_argument("--download", action="store_true")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser("experiment", help="run one of the paper's experiments and write a report with plots",
                       description="Run an experiment with every hyper-parameter and seed from a config file and "
                       "write results.json, report.md and PNG plots into OUT/NAME.")
    x.add_argument("name", choices=list(EXPERIMENTS))
    x.add_argument("--config", help="JSON or TOML config FILE, or the name of a packaged config such as "
                   "mnist_resnet18 (default: the packaged NAME config)")
    x.add_argument("--data-dir", help="folder where the config's relative data paths (mnist10k.npz) are found "
                   "(default: $AMNESIAC_DATA; settings whose data is missing are skipped and reported)")
    x.add_argument("--out", default="runs/experiments", help="output folder (default runs/experiments)")
    x.add_argument("--smoke", action="store_true", help="a tiny version (seconds): the config's smoke overrides")
    x.add_argument("--keep-runs", action="store_true", help="keep the recorded run directories (large)")
    x.set_defaults(func=cmd_experiment)
    for sp in (d, t, f, e, x):
        sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    from .audit import add_audit_parser
    add_audit_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (AmnesiacError, DeltaStoreError) as e:
        print(f"amnesiac {args.command}: error: {e}", file=sys.stderr)
        return 2
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
