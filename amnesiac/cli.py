"""The ``amnesiac`` command line: demo, train, forget, eval. Run ``amnesiac COMMAND --help`` for each."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from deltastore import DeltaStoreError

from .errors import AmnesiacError, SelectionError

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


def _device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AmnesiacError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return device


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
    device = _device(args.device)
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
    extra = {"data": data_spec, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
             "epochs": args.epochs}
    with Recorder(model, opt, args.run, codec=args.codec, backend=args.backend, model_spec=spec,
                  extra=extra) as rec:
        seconds = train(model, opt, bundle.train, epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                        recorder=rec, progress=not args.json)
    acc = accuracy(model, bundle.test)
    result = {"run": str(args.run), "steps": rec.store.num_steps, "train_seconds": seconds,
              "test_accuracy": acc["overall"], "codec": rec.store.codec.name}
    if not args.json:
        print(f"recorded {result['steps']} steps into {args.run} in {seconds:.1f} s; test accuracy "
              f"{acc['overall']:.1%}")
    return result


def cmd_forget(args) -> dict:
    from safetensors.torch import save_file

    from .run import open_run
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise AmnesiacError(f"{out} exists; pass --overwrite or choose another --out")
    run = open_run(args.run)
    selection = {"sample_ids": parse_ints(args.samples) if args.samples else None,
                 "classes": parse_ints(args.classes) if args.classes else None,
                 "steps": parse_ints(args.steps) if args.steps else None}
    report = run.unlearn_report(**selection, device=_device(args.device), progress=not args.json)
    state = {k: v.cpu() for k, v in report.state.items()}
    finetune_seconds = 0.0
    if args.finetune_epochs:
        state, finetune_seconds = _finetune(run, state, selection, args)
    result = {"run": str(run.path), "out": str(out), **report.summary(), "finetune_epochs": args.finetune_epochs,
              "finetune_seconds": finetune_seconds, "complete_run": run.complete}
    meta = {"amnesiac": json.dumps({k: v for k, v in result.items() if k != "out"})}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out), metadata=meta)
    if not args.json:
        print(f"undid {result['steps_undone']} of {result['total_steps']} steps ({report.plan}, read "
              f"{result['steps_read']} steps) in {result['seconds']:.2f} s; wrote {out}")
    return result


def _finetune(run, state, selection, args):
    from .data import bundle_from_spec
    from .models import build_model
    from .training import make_optimizer, train
    spec = run.spec
    if not spec.get("model_spec"):
        raise AmnesiacError("--finetune-epochs needs the model and data description that `amnesiac train` stores; "
                            "this run was recorded from Python: fine-tune there with amnesiac.training.train")
    extra = spec.get("extra", {})
    bundle = bundle_from_spec(extra.get("data", {}), download=args.download)
    retained = bundle.train
    if selection["classes"]:
        retained = retained.without_classes(selection["classes"])
    if selection["sample_ids"]:
        retained = retained.without_ids(selection["sample_ids"])
    if selection["steps"]:
        # forgetting by steps: drop every sample those steps saw
        seen = np.concatenate([run.samples_of_step(s) for s in selection["steps"]])
        retained = retained.without_ids(seen)
    model = build_model(spec["model_spec"])
    model.load_state_dict(state)
    opt = make_optimizer(model, extra.get("optimizer", "adam"), extra.get("lr", 1e-3))
    seconds = train(model, opt, retained, epochs=args.finetune_epochs, batch_size=extra.get("batch_size", 64),
                    seed=1)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, seconds


def cmd_eval(args) -> dict:
    from safetensors.torch import load_file

    from .data import bundle_from_spec
    from .models import build_model
    from .run import open_run
    from .training import accuracy
    run = open_run(args.run)
    spec = run.spec
    if not spec.get("model_spec"):
        raise AmnesiacError("this run holds no model description (it was not recorded by `amnesiac train`); "
                            "evaluate it from Python with amnesiac.training.accuracy")
    bundle = bundle_from_spec(spec.get("extra", {}).get("data", {}), download=args.download)
    model = build_model(spec["model_spec"])
    state = load_file(args.weights) if args.weights else run.final_state()
    run.load_into(model, state)
    forget = parse_ints(args.forget_classes) if args.forget_classes else []
    result = {"run": str(run.path), "weights": args.weights or "final", "forget_classes": forget,
              "test": accuracy(model, bundle.test, forget), "train": accuracy(model, bundle.train, forget)}
    if not args.json:
        t = result["test"]
        print(f"test accuracy: overall {t['overall']:.1%}"
              + (f", forgotten classes {t['forgotten']:.1%}, retained {t['retained']:.1%}" if forget else ""))
    return result


def build_parser() -> argparse.ArgumentParser:
    from deltastore.codecs import CODEC_NAMES

    from .data import DATASETS
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
    t.add_argument("--data-dir", help="torchvision data folder (mnist, cifar100)")
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
    f.add_argument("--out", required=True, help="output FILE.safetensors")
    f.add_argument("--overwrite", action="store_true")
    f.add_argument("--finetune-epochs", type=int, default=0,
                   help="fine-tune epochs on the retained data afterwards (needs the run's data set)")
    f.add_argument("--device", default="cpu", help="cpu or cuda: where the deltas are summed")
    f.add_argument("--download", action="store_true")
    f.set_defaults(func=cmd_forget)

    e = sub.add_parser("eval", help="test accuracy of a run's final weights or of a forget result")
    e.add_argument("--run", required=True)
    e.add_argument("--weights", help="FILE.safetensors from `amnesiac forget` (default: the run's final state)")
    e.add_argument("--forget-classes", help="classes to report apart, e.g. 3")
    e.add_argument("--download", action="store_true")
    e.set_defaults(func=cmd_eval)
    for sp in (d, t, f, e):
        sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except (AmnesiacError, DeltaStoreError) as e:
        print(f"amnesiac {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=1, default=_jsonable))
    return 0


def _jsonable(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
