"""Markdown and a plot for ``amnesiac experiment seeds``: every figure as mean [95% interval] over replicates."""

from __future__ import annotations

from pathlib import Path

from .report import LABELS, table

COLUMNS = [("retained", "test retained cls", True), ("forgotten", "test forgotten cls", True),
           ("forget_set", "forget-set acc", True), ("mia_shadow_auc", "MIA AUC shadow", False),
           ("mia_loss_auc", "MIA AUC loss", False), ("forget_in_band", "forget in band", True),
           ("retained_in_band", "retained in band", True), ("heldout_in_band", "held-out in band", True)]


def fmt(d: dict | None, percent: bool, bounded: bool = True) -> str:
    """``mean [low, high]`` (percent or 3 decimals); ``n/a`` when undefined, no interval for one replicate."""
    if not d or d.get("mean") is None:
        return "n/a"
    f = (lambda x: f"{100 * x:.1f}") if percent else (lambda x: f"{x:.3f}")
    ci = d.get("ci95")
    if ci and bounded:  # shares, accuracies and AUCs live in [0, 1]: a t-interval past the ends is cut there
        ci = [max(ci[0], 0.0), min(ci[1], 1.0)]
    return f(d["mean"]) + (f" [{f(ci[0])}, {f(ci[1])}]" if ci else "")


def report_seeds(results: dict, out: Path) -> str:
    lines = [f"# Experiment `{results['experiment']}`: forgetting a class with controls, seeds, a retraining "
             "ensemble and intervals", "",
             "Every cell: mean [95% t-interval] over the replicates (training seeds x forget draws); accuracies "
             "in %. \"in band\": share of samples whose loss lies in the 2.5-97.5% band of the retraining "
             "ensemble (for retraining itself: leave-one-out). Verdicts are equivalence tests: the interval of "
             "the difference to retraining must lie within the ensemble's own spread (max - min across its "
             "members; 5 points for the band shares).", ""]
    for name, r in results["settings"].items():
        s, summ = r["setting"], r["summary"]
        rep0 = r["replicates"][0]
        lines += [f"## {name}", "",
                  f"Setting: {s['dataset']}, class {results['forget_class']} reduced to {s['keep_count']} samples "
                  f"({rep0['forget_set_size']} forgotten); model {s['model']}; {s['epochs']} epochs, batch "
                  f"{s['batch_size']}, {s['optimizer']} lr {s['lr']}; {summ['replicates']} replicates; retraining "
                  f"ensemble of {rep0['ensemble_size']}; steps undone "
                  f"{fmt(summ['timing']['fraction_undone'], True)}%.", ""]
        rows = []
        for m, cells in summ["table"].items():
            name_m = LABELS.get(m, m) + (" (ensemble member 0)" if m == "retrain" else "")
            rows.append([name_m] + [fmt(cells[k], pct) for k, _, pct in COLUMNS])
        lines += [table(["method"] + [c[1] for c in COLUMNS], rows), ""]
        lines += ["Equivalent to retraining (difference interval within the margin):", ""]
        vrows = []
        for m, v in summ["verdicts"].items():
            if m == "retrain":
                continue
            vrows.append([LABELS.get(m, m)] + [_verdict(v[k]) for k, _, _ in COLUMNS])
        margins = ["margin"] + [_margin(summ["margins"].get(k) if not k.endswith("band") else 0.05, pct)
                                for k, _, pct in COLUMNS]
        lines += [table(["method"] + [c[1] for c in COLUMNS], vrows + [margins]), ""]
        _plot(name, summ, out / f"seeds-{name}.png")
        lines += [f"![{name}](seeds-{name}.png)", ""]
        t = summ["timing"]
        cold = "cold page cache (posix_fadvise DONTNEED)" if rep0["timing"]["cold_cache"] else "warm cache"
        f = (lambda k: fmt(t[k], False, False))  # noqa: E731 - seconds and counts: no [0, 1] bounds
        lines += [f"Timing, end to end from a {cold}, median of {len(rep0['timing']['amnesiac_seconds'])} "
                  f"interleaved repeats per replicate: amnesiac {f('amnesiac_median')} s, retraining "
                  f"{f('retrain_median')} s, speed-up {f('speedup_median')}x; recording overhead "
                  f"{f('recording_overhead_seconds')} s per training run, so recording pays off after "
                  f"{f('break_even_requests')} unlearning requests.", ""]
    return "\n".join(lines)


def _plot(name: str, summ: dict, path: Path) -> None:
    """Retained-class accuracy and the forget set's in-band share per method, with their intervals."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    methods = list(summ["table"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, key, title in ((axes[0], "retained", "test accuracy, retained classes"),
                           (axes[1], "forget_in_band", "forget samples in retraining's 95% band")):
        cells = [summ["table"][m][key] for m in methods]
        mean = [c["mean"] if c["mean"] is not None else float("nan") for c in cells]
        err = [[(c["mean"] - c["ci95"][0]) if c.get("ci95") else 0 for c in cells],
               [(c["ci95"][1] - c["mean"]) if c.get("ci95") else 0 for c in cells]]
        ax.barh(range(len(methods)), mean, xerr=err, color="#4c72b0")
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, 1)
    axes[0].set_yticks(range(len(methods)), [LABELS.get(m, m) for m in methods], fontsize=8)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _margin(m: float | None, percent: bool) -> str:
    return "n/a" if m is None else (f"{100 * m:.1f} points" if percent else f"{m:.3f}")


def _verdict(v: dict) -> str:
    if v.get("equivalent") is None:
        return "n/a"
    d = v["difference"]
    ci = d.get("ci95")
    span = f"{d['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else " (n=1)")
    return ("yes " if v["equivalent"] else "no ") + span


__all__ = ["report_seeds"]
