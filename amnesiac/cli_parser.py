"""The ``amnesiac`` command line's options: every one says what it does and what it is when left out."""

from __future__ import annotations

import argparse

from .cli_args import OneLineParser, non_negative_int, positive_float, positive_int

EPILOG = "Errors exit with status 2 and one line naming the remedy; nothing is written on bad input."
IDS = "IDS: 1,2,5-9 or @FILE (ids separated by commas, spaces or newlines)."


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The parser; ``commands`` maps each subcommand's name to the function that runs it."""
    from deltastore import CODEC_NAMES

    from .baselines import METHODS  # method and experiment names are defined once, where they are implemented
    from .data import DATASETS
    from .experiments import EXPERIMENTS
    from .models import MODELS
    codecs = ", ".join(CODEC_NAMES)
    p = OneLineParser(prog="amnesiac", description="Record PyTorch training runs and forget training samples by "
                      "undoing the optimizer steps that saw them (amnesiac unlearning).", epilog=EPILOG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="forget a digit from an MLP trained on scikit-learn digits (offline, <1 min)",
                       description="Train an MLP on scikit-learn's digits with only a few threes, recording every "
                       "step; forget the threes; print accuracy before, after, after one fine-tune epoch and of a "
                       "model retrained from scratch, with timings and the store's size.", epilog=EPILOG)
    d.add_argument("--keep", "--run", dest="keep_dir", metavar="DIR",
                   help="record the run into DIR and keep it (default: a temporary directory, removed at the end)")
    d.add_argument("--keep-count", type=non_negative_int, default=6,
                   help="threes kept in training, out of about 140 (default 6)")
    d.add_argument("--epochs", type=positive_int, default=20, help="training epochs (default 20)")
    d.add_argument("--codec", default="fp32", help=f"delta codec: {codecs} (default fp32, exact)")
    d.set_defaults(func=commands["demo"])

    t = sub.add_parser("train", help="train a model while recording every step into a run directory",
                       description="Train with a fixed seed while recording every optimizer step. Ctrl-C stops "
                       "after the current step, keeps a checkpoint and prints the command that continues; "
                       "--resume continues an interrupted run in the same data order.", epilog=EPILOG)
    t.add_argument("--dataset", choices=DATASETS, required=True, help="the data set (required)")
    t.add_argument("--model", choices=MODELS, required=True, help="the network (required)")
    t.add_argument("--run", required=True, help="the run directory: new, or an interrupted run with --resume")
    t.add_argument("--resume", action="store_true",
                   help="continue the interrupted run in --run from its last checkpoint up to --epochs (default: "
                   "start a new run)")
    t.add_argument("--checkpoint-every", type=non_negative_int, default=None, metavar="STEPS",
                   help="write the resume checkpoint every STEPS steps, 0 for never (default: after every epoch)")
    t.add_argument("--codec", default="fp32", help=f"delta codec: {codecs} (default fp32, exact)")
    t.add_argument("--backend", default="zarr", choices=["zarr", "safetensors"],
                   help="storage of the deltas: zarr (compressed) or safetensors (default zarr)")
    t.add_argument("--epochs", type=positive_int, default=5, help="epochs to train, in all (default 5)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="samples per step (default 64)")
    t.add_argument("--optimizer", default="adam", choices=["adam", "sgd"], help="the optimizer (default adam)")
    t.add_argument("--lr", type=positive_float, default=1e-3, help="learning rate (default 0.001)")
    t.add_argument("--seed", type=int, default=0, help="seed of the model, the split and the data order "
                   "(default 0)")
    t.add_argument("--keep-class", type=int, help="keep only --keep-count training samples of this class, the "
                   "paper's setting (default: keep every sample)")
    t.add_argument("--keep-count", type=non_negative_int, default=100,
                   help="samples of --keep-class kept (default 100)")
    t.add_argument("--size", type=positive_int, default=2000, help="samples of the synthetic data set (default "
                   "2000)")
    t.add_argument("--data-dir", help="data folder: torchvision's copies (mnist, cifar100), and where a relative "
                   "--data-path is found if not in the working directory (default: $AMNESIAC_DATA, else ./data)")
    t.add_argument("--data-path", help="the .npz file (arrays images, labels) for --dataset npz (no default)")
    t.add_argument("--download", action="store_true", help="let torchvision download mnist/cifar100 (default: "
                   "offline)")
    t.add_argument("--device", default="cpu", help="where to train: cpu, cuda or cuda:N (default cpu)")
    t.set_defaults(func=commands["train"])

    f = sub.add_parser("forget", help="unlearn samples, classes or steps from a saved run (offline)",
                       description="Undo every step whose batch held the selected samples and write the resulting "
                       "state_dict as safetensors. Needs only the run directory. " + IDS, epilog=EPILOG)
    f.add_argument("--run", required=True, help="the run directory (required)")
    sel = f.add_mutually_exclusive_group(required=True)
    one = "(required: one of --samples, --classes, --steps)"
    sel.add_argument("--samples", metavar="IDS", help=f"sample ids to forget {one}")
    sel.add_argument("--classes", metavar="IDS", help=f"classes to forget; the run must have recorded labels {one}")
    sel.add_argument("--steps", metavar="IDS", help=f"steps to undo, numbered from 0 {one}")
    f.add_argument("--out", help="the FILE.safetensors to write (required unless --purge; with --purge: a copy of "
                   "the run's new final state)")
    f.add_argument("--purge", action="store_true",
                   help="forget in place: undo the steps from the run's final state, delete their deltas and ledger "
                   "records, and append a receipt (see `amnesiac audit`); --finetune-epochs K then records the "
                   "fine-tune into the run (default: off, the run is left as it is)")
    f.add_argument("--request-id", help="with --purge: the request's id in its receipt (default request-N)")
    f.add_argument("--overwrite", action="store_true", help="replace --out if it exists (default: refuse)")
    f.add_argument("--method", default="amnesiac", choices=list(METHODS),
                   help="amnesiac (default: undo the steps), amnesiac-finetune, or a baseline: retrain (from the "
                   "run's initial weights), finetune (on the retained data), relabel (random wrong labels for the "
                   "forget set), neggrad (gradient ascent on the forget set); all but amnesiac need the run's data")
    f.add_argument("--finetune-epochs", type=non_negative_int, default=0,
                   help="fine-tune epochs on the retained data afterwards (needs the run's data set); with the "
                   "default method this means amnesiac-finetune (default 0)")
    f.add_argument("--epochs", type=positive_int, help="epochs of the baseline (default: retrain as long as the "
                   "run trained; finetune, relabel, neggrad: 1)")
    f.add_argument("--lr", type=positive_float, help="neggrad's learning rate (default: the run's)")
    f.add_argument("--device", default="cpu", help="where the deltas are summed: cpu, cuda or cuda:N (default "
                   "cpu)")
    f.add_argument("--download", action="store_true", help="let torchvision download the run's data set for the "
                   "baselines (default: offline)")
    f.set_defaults(func=commands["forget"])

    e = sub.add_parser("eval", help="test accuracy of a run's final weights or of a forget result",
                       description="Accuracy overall and per class group, membership inference on a forget set, "
                       "and the distance to a reference model. " + IDS, epilog=EPILOG)
    e.add_argument("--run", required=True, help="the run directory (required)")
    e.add_argument("--weights", help="FILE.safetensors from `amnesiac forget` (default: the run's final state)")
    e.add_argument("--forget-classes", metavar="IDS", help="classes to report apart, e.g. 3 (default: none)")
    e.add_argument("--forget-samples", metavar="IDS", help="sample ids that were forgotten, for the forget-set "
                   "metrics (default: none)")
    e.add_argument("--reference", help="FILE.safetensors to measure the distance to, e.g. from `forget --method "
                   "retrain` (default: none)")
    e.add_argument("--shadows", type=non_negative_int, default=0,
                   help="shadow models for the membership inference attack (default 0: only the loss-threshold "
                   "attack; 4 is a good choice): trained like the target (same class mix and optimizer steps) on "
                   "its retained data plus half of the held-out data; attacks are scored on a disjoint quarter")
    e.add_argument("--download", action="store_true", help="let torchvision download the run's data set "
                   "(default: offline)")
    e.set_defaults(func=commands["eval"])

    x = sub.add_parser("experiment", help="run one of the paper's experiments and write a report with plots",
                       description="Run an experiment with every hyper-parameter and seed from a config file and "
                       "write results.json, report.md and PNG plots into OUT/NAME.", epilog=EPILOG)
    x.add_argument("name", choices=list(EXPERIMENTS), help="the experiment")
    x.add_argument("--config", help="JSON or TOML config FILE, or the name of a packaged config such as "
                   "mnist_resnet18 (default: the packaged NAME config)")
    x.add_argument("--data-dir", help="folder where the config's relative data paths (mnist10k.npz) are found "
                   "(default: $AMNESIAC_DATA; settings whose data is missing are skipped and reported)")
    x.add_argument("--out", default="runs/experiments", help="output folder (default runs/experiments)")
    x.add_argument("--smoke", action="store_true", help="a tiny version (seconds): the config's smoke overrides "
                   "(default: the full experiment)")
    x.add_argument("--keep-runs", action="store_true", help="keep the recorded run directories, which are large "
                   "(default: delete them)")
    x.set_defaults(func=commands["experiment"])
    for sp in (d, t, f, e, x):
        sp.add_argument("--json", action="store_true", help="print one JSON object instead of text (default: text)")
    from .audit import add_audit_parser
    add_audit_parser(sub)
    return p
