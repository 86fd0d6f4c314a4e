"""``amnesiac demo``: the paper's experiment in miniature, offline, in well under a minute on 2 CPU cores.

An MLP learns scikit-learn's handwritten digits while a Recorder stores every step; only a handful of threes are kept
in training (the paper kept 100 threes of ~6,000 on MNIST), so few batches hold them. Amnesiac unlearning then undoes
those batches, and one fine-tune epoch on the retained data repairs the collateral damage. Retraining from scratch
without the threes is measured beside it: the gold standard and the cost amnesiac unlearning avoids.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from .data import load_dataset
from .models import build_model, model_spec
from .recorder import Recorder
from .run import open_run
from .setting import TrainingSetting
from .training import accuracy, make_optimizer, train


def run_demo(run_dir: str | Path | None = None, *, target: int = 3, keep: int = 6, epochs: int = 20,
             batch_size: int = 32, lr: float = 1e-3, seed: int = 0, codec: str = "fp32",
             progress: bool = True) -> dict:
    """Run the demo and return its figures (see :func:`format_table`)."""
    run_dir = Path(run_dir) if run_dir else Path(tempfile.mkdtemp(prefix="amnesiac-demo-")) / "run"
    bundle = load_dataset("digits", seed=seed)
    train_set = bundle.train.keep_few_of_class(target, keep, seed)
    retained = train_set.without_classes([target])
    spec = model_spec("mlp", bundle.input_shape, bundle.num_classes)
    data_spec = {**bundle.spec, "keep_class": target, "keep_count": keep}

    torch.manual_seed(seed)
    model = build_model(spec)
    opt = make_optimizer(model, "adam", lr)
    setting = TrainingSetting(model_spec=spec, data=data_spec, optimizer="adam", lr=lr, batch_size=batch_size,
                              epochs=epochs, seed=seed)
    with Recorder(model, opt, run_dir, codec=codec, durable=False, **setting.recorder_options()) as rec:
        train_seconds = train(model, opt, train_set, epochs=epochs, batch_size=batch_size, seed=seed, recorder=rec,
                              progress=progress)
    rows = {"trained": accuracy(model, bundle.test, [target])}

    run = open_run(run_dir)
    report = run.unlearn_report(classes=[target])
    model.load_state_dict(report.state)
    rows["amnesiac"] = accuracy(model, bundle.test, [target])

    start = time.perf_counter()
    train(model, make_optimizer(model, "adam", lr), retained, epochs=1, batch_size=batch_size, seed=seed + 1)
    finetune_seconds = time.perf_counter() - start
    rows["amnesiac + 1 fine-tune epoch"] = accuracy(model, bundle.test, [target])

    torch.manual_seed(seed)
    scratch = build_model(spec)
    retrain_seconds = train(scratch, make_optimizer(scratch, "adam", lr), retained, epochs=epochs,
                            batch_size=batch_size, seed=seed)
    rows["retrained from scratch"] = accuracy(scratch, bundle.test, [target])

    info = run.store.info()
    return {"run_dir": str(run_dir), "target_class": target, "kept_of_target": keep, "epochs": epochs,
            "rows": rows, "steps_undone": int(report.steps_undone.size), "total_steps": report.total_steps,
            "unlearn_seconds": report.seconds, "finetune_seconds": finetune_seconds,
            "retrain_seconds": retrain_seconds, "train_seconds": train_seconds,
            "store_bytes": info["delta_bytes"], "raw_fp32_bytes": info["raw_fp32_bytes"], "ratio": info["ratio"],
            "codec": info["codec"]}


def format_table(r: dict) -> str:
    lines = [f"Forgetting class {r['target_class']} ({r['kept_of_target']} samples kept in training) from an MLP "
             f"trained {r['epochs']} epochs on scikit-learn digits", "",
             f"{'model':<32}{'overall':>9}{'class ' + str(r['target_class']):>10}{'others':>9}",
             "-" * 60]
    for name, acc in r["rows"].items():
        lines.append(f"{name:<32}{acc['overall']:>9.1%}{acc['forgotten']:>10.1%}{acc['retained']:>9.1%}")
    lines += ["",
              f"steps undone        {r['steps_undone']} of {r['total_steps']} "
              f"({r['steps_undone'] / max(1, r['total_steps']):.1%})",
              f"unlearning time     {r['unlearn_seconds'] * 1e3:.1f} ms "
              f"(+ {r['finetune_seconds'] * 1e3:.0f} ms for the fine-tune epoch)",
              f"retraining time     {r['retrain_seconds'] * 1e3:.0f} ms "
              f"({r['retrain_seconds'] / max(r['unlearn_seconds'], 1e-9):.0f}x the unlearning time)",
              f"delta store         {r['store_bytes'] / 1e6:.2f} MB on disk for {r['raw_fp32_bytes'] / 1e6:.2f} MB "
              f"of raw fp32 deltas (ratio {r['ratio']:.2f}, codec {r['codec']})",
              f"run directory       {r['run_dir']}"]
    return "\n".join(lines)
