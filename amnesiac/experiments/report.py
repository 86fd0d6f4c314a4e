"""Markdown tables and matplotlib plots (Agg backend) for the experiments' results."""

from __future__ import annotations

import math
from pathlib import Path

# The paper's MNIST figures (Graves et al., AAAI 2021: ResNet-18, full MNIST, 100 threes kept, batch 64, Adam).
PAPER_MNIST = {
    "original": {"mia_recall": 0.952},
    "amnesiac": {"forgotten": 0.0, "retained": 0.95, "mia_recall": 0.127},
    "amnesiac-finetune": {"retained": 0.99, "mia_recall": 0.016},
}
LABELS = {"original": "trained (before)", "retrain": "retrain from scratch", "finetune": "fine-tune on retained",
          "relabel": "random relabel (paper's 'Unlearning')", "neggrad": "gradient ascent (NegGrad)",
          "amnesiac": "amnesiac", "amnesiac-finetune": "amnesiac + fine-tune"}


def pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def num(x, fmt="{:.3f}") -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def secs(x) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.2f} s"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _g(d, *keys):
    for k in keys:
        if d is None:
            return None
        d = d.get(k)
    return d


def methods_table(rows: dict, *, classes: bool, paper: bool = False) -> str:
    retrain_s = rows["retrain"]["seconds"]
    header = ["method", "time", "vs retrain", "test overall"]
    header += ["test forgotten cls", "test retained cls"] if classes else []
    header += ["forget-set acc", "MIA recall (shadow)", "MIA AUC (shadow)", "MIA recall (loss)", "MIA AUC (loss)",
               "L2 to retrain (rel.)", "agree w/ retrain", "KL to retrain"]
    if paper:
        header += ["paper: forgotten / retained / MIA recall"]
    out = []
    for name, row in rows.items():
        m = row["metrics"]
        s = row["seconds"]
        line = [LABELS.get(name, name), secs(s), "" if s is None else f"{retrain_s / max(s, 1e-9):.1f}x",
                pct(m["test"]["overall"])]
        if classes:
            line += [pct(m["test"]["forgotten"]), pct(m["test"]["retained"])]
        line += [pct(m["forget_set"]), num(_g(m, "mia_shadow", "recall")), num(_g(m, "mia_shadow", "auc")),
                 num(_g(m, "mia_loss", "recall")), num(_g(m, "mia_loss", "auc")),
                 num(_g(m, "distance", "weights_l2_relative")), pct(_g(m, "distance", "test_agreement")),
                 num(_g(m, "distance", "test_kl"), "{:.4f}")]
        if paper:
            p = PAPER_MNIST.get(name, {})
            line.append(" / ".join([pct(p.get("forgotten")), pct(p.get("retained")), num(p.get("mia_recall"))])
                        if p else "")
        out.append(line)
    return table(header, out)


def targets_lines(targets: dict) -> list[str]:
    names = {"retained_accuracy_gap": "retained-class accuracy, |amnesiac+FT - retrain|",
             "forgotten_accuracy_gap": "forgotten-class accuracy, |amnesiac+FT - retrain|",
             "mia_recall_gap": "MIA recall on the forget set, |amnesiac+FT - retrain|",
             "speedup_amnesiac": "amnesiac speed-up over retraining"}
    lines = []
    for key, t in targets.items():
        if key == "speedup_amnesiac":
            verdict = ("n/a: the target applies at <= 1% of batches undone; here "
                       f"{t['fraction_undone']:.1%}" if t["met"] is None else ("met" if t["met"] else "MISSED"))
            lines.append(f"- {names[key]}: {t['value']:.1f}x (target >= {t['limit']:.0f}x): {verdict}")
        else:
            unit = 100 if "accuracy" in key else 1
            fmt = "{:.1f} points" if unit == 100 else "{:.3f}"
            lines.append(f"- {names[key]}: {fmt.format(t['value'] * unit)} (target <= {fmt.format(t['limit'] * unit)}):"
                         f" {'met' if t['met'] else 'MISSED'}")
    return lines


def setting_line(s: dict) -> str:
    data = s["dataset"] + (f" ({Path(s['data_path']).name})" if s.get("data_path") else "")
    keep = f", class {s['keep_class']} reduced to {s['keep_count']} samples" if s.get("keep_class") is not None else ""
    lim = f", train limited to {s['train_limit']}" if s.get("train_limit") else ""
    return (f"{data}{keep}{lim}; model {s['model']}; {s['epochs']} epochs, batch {s['batch_size']}, "
            f"{s['optimizer']} lr {s['lr']}, codec {s['codec']}, seed {s['seed']}")


def storage_line(st: dict) -> str:
    return (f"delta store: {st['steps']} steps, {st['delta_bytes'] / 1e6:.1f} MB on disk for "
            f"{st['raw_fp32_bytes'] / 1e6:.1f} MB of raw fp32 deltas (ratio {st['ratio']:.2f}, codec {st['codec']})")


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_methods(rows: dict, path: Path, title: str, classes: bool) -> None:
    plt = _plt()
    names = list(rows)
    series = ([("test forgotten cls", lambda m: m["test"]["forgotten"]),
               ("test retained cls", lambda m: m["test"]["retained"])] if classes else
              [("test overall", lambda m: m["test"]["overall"])])
    series += [("forget-set acc", lambda m: m["forget_set"]),
               ("MIA recall (shadow)", lambda m: _g(m, "mia_shadow", "recall"))]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    width = 0.8 / len(series)
    for i, (label, fn) in enumerate(series):
        vals = [fn(rows[n]["metrics"]) for n in names]
        vals = [0 if v is None else v for v in vals]
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [LABELS.get(n, n) for n in names], rotation=20,
                  ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=len(series), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_fraction(points: list[dict], path: Path, title: str) -> None:
    plt = _plt()
    x = [100 * p["fraction"] for p in points]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for key, label in (("amnesiac", "amnesiac"), ("amnesiac_finetune", "amnesiac + 1 fine-tune epoch"),
                       ("retrain", "retrain from scratch")):
        if all(key in p for p in points):
            ax.plot(x, [100 * p[key] for p in points], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("batches undone (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    if all("speedup" in p for p in points):
        ax2.plot(x, [p["speedup"] for p in points], marker="o")
        ax2.axhline(100, color="gray", linestyle="--", linewidth=1)
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("batches undone (%)")
        ax2.set_ylabel("retrain time / amnesiac time")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_codecs(rows: dict, path: Path, title: str) -> None:
    plt = _plt()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    series = [("forgotten cls (amnesiac)", lambda r: r["amnesiac"]["test"]["forgotten"]),
              ("retained cls (amnesiac)", lambda r: r["amnesiac"]["test"]["retained"]),
              ("retained cls (+ fine-tune)", lambda r: r["amnesiac_finetune"]["test"]["retained"]),
              ("disk / raw fp32", lambda r: r["storage"]["ratio"])]
    width = 0.8 / len(series)
    for i, (label, fn) in enumerate(series):
        ax.bar([j + i * width for j in range(len(names))], [fn(rows[n]) for n in names], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report_forget_class(res: dict, out: Path, *, paper: bool) -> str:
    lines = [f"# Experiment `{res['experiment']}`: forget class {res['forget_class']}", ""]
    for name, r in res["settings"].items():
        lines += [f"## {name}", "", f"Setting: {setting_line(r['setting'])}.", "",
                  f"Forget set: {r['forget_set_size']} training samples; {r['steps_undone']} of {r['total_steps']} "
                  f"steps undone ({r['fraction_undone']:.1%}). Training while recording {secs(r['record_seconds'])}, "
                  f"without recording {secs(r['plain_train_seconds'])}. Shadow models' held-out accuracy: "
                  f"{pct(r['shadow_accuracy'])}. {storage_line(r['storage'])}.", "",
                  methods_table(r["rows"], classes=True, paper=paper), "", "Targets:", ""]
        lines += targets_lines(r["targets"])
        png = f"{name}.png"
        plot_methods(r["rows"], out / png, f"{res['experiment']} / {name}: forget class {res['forget_class']}", True)
        lines += ["", f"![{name}]({png})", ""]
    lines += _skipped(res)
    return "\n".join(lines)


def report_samples(res: dict, out: Path) -> str:
    lines = [f"# Experiment `{res['experiment']}`: forget random training samples", ""]
    for name, r in res["settings"].items():
        lines += [f"## {name}", "", f"Setting: {setting_line(r['setting'])}. {storage_line(r['storage'])}.", ""]
        for count, c in r["counts"].items():
            lines += [f"### {count} random samples ({c['steps_undone']} of {c['total_steps']} steps undone, "
                      f"{c['fraction_undone']:.1%})", "", methods_table(c["rows"], classes=False), "", "Targets:", ""]
            lines += targets_lines(c["targets"]) + [""]
            png = f"{name}-{count}.png"
            plot_methods(c["rows"], out / png, f"{name}: forget {count} random samples", False)
            lines += [f"![{name} {count}]({png})", ""]
    lines += _skipped(res)
    return "\n".join(lines)


def report_fraction(res: dict, out: Path) -> str:
    lines = [f"# Experiment `{res['experiment']}`: accuracy against the fraction of batches undone (paper Fig. 7)",
             ""]
    for name, r in res["settings"].items():
        lines += [f"## {name}", "", f"Setting: {setting_line(r['setting'])}. Trained model's test accuracy "
                  f"{pct(r['original'])}. {storage_line(r['storage'])}.", ""]
        header = ["batches undone", "samples seen", "amnesiac acc", "+1 FT epoch acc",
                  "retrain without every sample seen: acc"]
        rows = [[f"{p['steps_undone']} ({p['fraction']:.2%})", str(p["forget_set_size"]), pct(p["amnesiac"]),
                 pct(p.get("amnesiac_finetune")), pct(p.get("retrain"))] for p in r["points"]]
        lines += [table(header, rows), "",
                  "No speed is claimed here: undoing randomly chosen steps and retraining without every sample "
                  "those steps saw are different operations. Fair speed figures: `amnesiac experiment seeds`.", ""]
        png = f"{name}.png"
        plot_fraction(r["points"], out / png, f"{name}: test accuracy vs batches undone")
        lines += [f"![{name}]({png})", ""]
    lines += _skipped(res)
    return "\n".join(lines)


def report_codecs(res: dict, out: Path) -> str:
    lines = [f"# Experiment `{res['experiment']}`: forgetting quality against the delta codec "
             f"(forget class {res['forget_class']})", ""]
    for name, r in res["settings"].items():
        rt = r["retrain"]["metrics"]
        lines += [f"## {name}", "", f"Setting: {setting_line(r['setting'])}; {r['steps_undone']} of "
                  f"{r['total_steps']} steps undone. Retrained: forgotten {pct(rt['test']['forgotten'])}, retained "
                  f"{pct(rt['test']['retained'])}, MIA recall {num(_g(rt, 'mia_shadow', 'recall'))}.", ""]
        header = ["codec", "disk (MB)", "ratio to raw fp32", "codec error", "L2 to exact amnesiac (rel.)",
                  "amnesiac: forgotten / retained", "MIA recall", "+ fine-tune: forgotten / retained",
                  "MIA recall (+FT)", "L2 to retrain (rel., +FT)"]
        rows = []
        for codec, c in r["codecs"].items():
            a, f = c["amnesiac"], c["amnesiac_finetune"]
            rows.append([codec, f"{c['storage']['delta_bytes'] / 1e6:.1f}", num(c["storage"]["ratio"]),
                         num(c["storage"]["codec_error"], "{:.2e}"), num(c["to_exact"]["weights_l2_relative"], "{:.2e}"),
                         f"{pct(a['test']['forgotten'])} / {pct(a['test']['retained'])}",
                         num(_g(a, "mia_shadow", "recall")),
                         f"{pct(f['test']['forgotten'])} / {pct(f['test']['retained'])}",
                         num(_g(f, "mia_shadow", "recall")), num(_g(f, "distance", "weights_l2_relative"))])
        lines += [table(header, rows), ""]
        png = f"{name}.png"
        plot_codecs(r["codecs"], out / png, f"{name}: forgetting quality and disk use per codec")
        lines += [f"![{name}]({png})", ""]
    lines += _skipped(res)
    return "\n".join(lines)


def _skipped(res: dict) -> list[str]:
    return [f"Skipped setting `{k}`: {v}." for k, v in res.get("skipped", {}).items()]
