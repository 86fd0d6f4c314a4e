"""Experiments reproducing the paper and comparing amnesiac unlearning with its baselines (issue 5).

Each experiment runs from one command, ``amnesiac experiment NAME [--config FILE] [--out DIR] [--smoke]``, with
every hyper-parameter and seed in a config file (by default the packaged ``amnesiac/configs/NAME.json``; JSON or
TOML), and writes
``results.json``, ``report.md`` (Markdown tables, the paper's numbers beside ours where the setting matches) and PNG
plots into ``DIR/NAME``. ``--smoke`` applies the config's ``smoke`` overrides: a tiny version that runs in seconds.
Relative data paths in a config (``mnist10k.npz``) are found in ``--data-dir`` or the ``AMNESIAC_DATA`` folder (for a
config file given with ``--config``, else next to that file); a setting whose data is not there is skipped and
reported, so the experiments run from an installed wheel in any directory.

==========  ======================================================================  =========================
name        what                                                                    runner
==========  ======================================================================  =========================
mnist       (a) the paper's MNIST setting: forget digit 3, 100 threes kept          :func:`forget_class`
cifar100    (b) the paper's CIFAR-100 setting: forget one class, ResNet-18          :func:`forget_class`
samples     (c) forget a few random sample ids                                      :func:`forget_samples`
fraction    (d) accuracy against the fraction of batches undone (paper Fig. 7)      :func:`batch_fraction`
codecs      (e) forgetting quality and disk use against the delta codec             :func:`codecs`
seeds       forget a class: controls, seeds x draws, retrain ensemble, intervals    :func:`.seeds.seeds_experiment`
ulira       per-example attack: unlearned vs retrained (Hayes et al., 2024)         :func:`.ulira.ulira`
==========  ======================================================================  =========================

Example:
    >>> sorted(EXPERIMENTS)
    ['cifar100', 'codecs', 'fraction', 'mnist', 'samples', 'seeds', 'ulira']
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import AmnesiacError
from . import report
from .common import read_config, resolve_config, write_json
from .runners import batch_fraction, codecs, forget_class, forget_samples
from .seeds import seeds_experiment
from .seeds_report import report_seeds
from .ulira import report_ulira, ulira

EXPERIMENTS = {
    "mnist": (forget_class, lambda r, o: report.report_forget_class(r, o, paper=True)),
    "cifar100": (forget_class, lambda r, o: report.report_forget_class(r, o, paper=False)),
    "samples": (forget_samples, report.report_samples),
    "fraction": (batch_fraction, report.report_fraction),
    "codecs": (codecs, report.report_codecs),
    "seeds": (seeds_experiment, report_seeds),
    "ulira": (ulira, report_ulira),
}


def run_experiment(name: str, *, config: str | Path | None = None, out: str | Path = "runs/experiments",
                   smoke: bool = False, keep_runs: bool = False, quiet: bool = False,
                   data_dir: str | Path | None = None) -> dict:
    """Run experiment ``name`` and write its results, report and plots into ``out/name``; returns the results
    (with ``report`` and ``out`` added). ``config`` is a file or a packaged config's name (default: ``name``);
    ``data_dir`` the folder relative data paths are found in (default: ``$AMNESIAC_DATA``)."""
    if name not in EXPERIMENTS:
        raise AmnesiacError(f"unknown experiment {name!r}; choose one of {', '.join(EXPERIMENTS)}")
    raw, config_file = read_config(config or name)
    cfg = resolve_config(raw, base=config_file.resolve().parent if config_file else None, smoke=smoke,
                         data_dir=data_dir)
    cfg.setdefault("name", name)
    out_dir = Path(out) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    runner, reporter = EXPERIMENTS[name]

    def log(msg: str) -> None:
        if not quiet:
            print(f"amnesiac experiment {name}: {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    threads = torch.get_num_threads()
    # one thread: these models are small, and on a shared 2-core machine intra-op threads only contend
    torch.set_num_threads(int(cfg.get("torch_threads", 1)))
    try:
        results = runner(cfg, out_dir, log)
    finally:
        torch.set_num_threads(threads)
        if not keep_runs:
            shutil.rmtree(out_dir / "runs", ignore_errors=True)
    if config_file is None:
        shown, option = f"{config or name} (packaged)", f" --config {config}" if config else ""
    else:
        try:
            shown = str(config_file.resolve().relative_to(Path.cwd()))
        except ValueError:
            shown = str(config_file)
        option = f" --config {shown}"
    results.update(config=shown, smoke=smoke, seconds=time.perf_counter() - start, out=str(out_dir))
    text = reporter(results, out_dir)
    text += (f"\n\nProduced by `amnesiac experiment {name}{option}"
             f"{' --smoke' if smoke else ''}` in {results['seconds']:.0f} s.\n")
    (out_dir / "report.md").write_text(text)
    write_json(out_dir / "results.json", results)
    results["report"] = str(out_dir / "report.md")
    return results


__all__ = ["EXPERIMENTS", "run_experiment"]
