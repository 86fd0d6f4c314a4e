"""The experiments' plots (matplotlib, Agg backend): every panel titled, every axis labelled, legends beside the data
rather than over it, accuracies in percent and disk ratios on their own axis, missing values marked "n/a"."""

from __future__ import annotations

import math
from pathlib import Path

LABELS = {"original": "trained (before)", "retrain": "retrain from scratch", "finetune": "fine-tune on retained",
          "relabel": "random relabel (paper's 'Unlearning')", "neggrad": "gradient ascent (NegGrad)",
          "amnesiac": "amnesiac", "amnesiac-finetune": "amnesiac + fine-tune"}


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _get(d: dict, *keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def grouped_bars(ax, groups: list[str], series: list[tuple[str, list]], *, scale: float = 1.0) -> None:
    """Bars of each series side by side per group; a missing value gets a small "n/a" instead of a bar that would
    read as zero, and a zero gets a thin line so that it does not read as missing."""
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(groups))]
        shown = [0.0 if _missing(v) else scale * v for v in values]
        bars = ax.bar(xs, shown, width, label=label)
        color = bars.patches[0].get_facecolor() if bars.patches else None
        for x, v in zip(xs, values):
            if _missing(v):
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=6, rotation=90, color="gray")
            elif v == 0:
                ax.plot([x - width / 2, x + width / 2], [0, 0], color=color, linewidth=2.5)
    ax.set_xticks(range(len(groups)), groups)


def plot_methods(rows: dict, path: Path, title: str, classes: bool) -> None:
    """Accuracy and membership-inference recall of every method, in percent."""
    plt = _plt()
    names = list(rows)
    metrics = [rows[n]["metrics"] for n in names]
    series = ([("test accuracy, forgotten class", [_get(m, "test", "forgotten") for m in metrics]),
               ("test accuracy, retained classes", [_get(m, "test", "retained") for m in metrics])] if classes else
              [("test accuracy", [_get(m, "test", "overall") for m in metrics])])
    series += [("forget-set accuracy", [_get(m, "forget_set") for m in metrics]),
               ("membership attack recall on the forget set (shadow models)",
                [_get(m, "mia_shadow", "recall") for m in metrics])]
    series = [(label, values) for label, values in series if not all(_missing(v) for v in values)]
    fig, ax = plt.subplots(figsize=(10, 4.2))
    grouped_bars(ax, [LABELS.get(n, n) for n in names], series, scale=100)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    for label in ax.get_xticklabels():
        label.set_horizontalalignment("right")
    ax.set_ylim(0, 105)
    ax.set_ylabel("percent")
    ax.set_xlabel("unlearning method")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="bars", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _log_ticks(axis, values, unit: str) -> None:
    """Label a log axis at 1-2-5 steps over up to two decades, at powers of ten beyond, and no minor tick labels,
    so that the labels never crowd."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    shown = [v for v in values if not _missing(v) and v > 0]
    decades = math.log10(max(shown) / min(shown)) if shown else 0.0
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2 else (1.0,)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}{unit}"))
    axis.set_minor_formatter(NullFormatter())


def plot_fraction(points: list[dict], path: Path, title: str) -> None:
    """Left: test accuracy against the share of batches undone; right: how much faster than retraining."""
    plt = _plt()
    x = [100 * p["fraction"] for p in points]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("amnesiac", "amnesiac"), ("amnesiac_finetune", "amnesiac + 1 fine-tune epoch"),
                       ("retrain", "retrain from scratch")):
        if all(key in p for p in points):
            ax.plot(x, [100 * p[key] for p in points], marker="o", label=label)
    for a in (ax, ax2):
        a.set_xscale("log")
        _log_ticks(a.xaxis, x, "%")
        a.set_xlabel("batches undone (share of all training steps)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("test accuracy after forgetting", fontsize=10)
    ax2.set_title("speed-up over retraining", fontsize=10)
    if all("speedup" in p for p in points):
        ax2.plot(x, [p["speedup"] for p in points], marker="o", label="retraining time / amnesiac time")
        ax2.axhline(100, color="gray", linestyle="--", linewidth=1, label="target: 100x at <= 1% undone")
        ax2.set_yscale("log")
        _log_ticks(ax2.yaxis, [p["speedup"] for p in points] + [100], "x")
        ax2.legend(fontsize=7, loc="lower left")
    else:
        ax2.text(0.5, 0.5, "not measured (no retraining in this run)", ha="center", transform=ax2.transAxes)
    ax2.set_ylabel("times faster than retraining")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_codecs(rows: dict, path: Path, title: str) -> None:
    """Left: accuracy after forgetting with each codec (percent); right: disk use against raw fp32 (a ratio)."""
    plt = _plt()
    names = list(rows)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [2, 1]})
    grouped_bars(ax, names, [
        ("forgotten class (amnesiac)", [_get(rows[n], "amnesiac", "test", "forgotten") for n in names]),
        ("retained classes (amnesiac)", [_get(rows[n], "amnesiac", "test", "retained") for n in names]),
        ("retained classes (+ fine-tune)", [_get(rows[n], "amnesiac_finetune", "test", "retained") for n in names])],
        scale=100)
    ax.set_ylim(0, 125)  # room above 100% for the legend, so that it covers no bar
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("delta codec")
    ax.set_title("accuracy after forgetting", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ratios = [_get(rows[n], "storage", "ratio") for n in names]
    grouped_bars(ax2, names, [("disk / raw fp32", ratios)])
    for j, r in enumerate(ratios):
        if not _missing(r):
            ax2.text(j, r, f"{r:.2f}", ha="center", va="bottom", fontsize=7)
    top = max([r for r in ratios if not _missing(r)] or [1.0])
    ax2.set_ylim(0, 1.15 * top)
    ax2.set_ylabel("bytes on disk / raw fp32 bytes")
    ax2.set_xlabel("delta codec")
    ax2.set_title("disk use of the deltas", fontsize=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
