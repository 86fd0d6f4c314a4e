"""U-LiRA (Hayes et al., 2024, "Inexact unlearning needs more careful evaluations"): a per-example attack that
tells an unlearned model from one retrained without the example.

Design (``amnesiac experiment ulira``):

- A pool (a data set's train and test parts together, or a random ``pool_size`` subset) and a target subset T of it,
  cut into groups of ``2 * forget_size`` examples.
- ``shadow_runs`` recorded runs (bf16 deltas by default; each deleted once measured). Run k trains on a random half
  H_k of the pool with its own initial weights and batch order; its forget set is F_k = (group k mod G) & H_k, a
  random set inside the run's training data. Every method of the config unlearns F_k from run k. ``retrain`` (from
  the run's own initial weights S_0, on H_k - F_k) is the reference the attack must tell the method apart from;
  ``retrain-control`` (new initial weights and batch order) is that reference's own noise (50% expected);
  ``original`` (no unlearning) shows what the attack can see at all.
- Score: the logit-scaled confidence of the true class, phi = log p_y - log(1 - p_y) (LiRA). For example x and
  method m, "unlearned" = N(mu_in, s_in) fitted to phi under m's model in the *other* runs that forgot x; "retrained"
  = N(mu_out, s_out) fitted to phi under the models of runs that never trained on x (per-example means, variances
  pooled over the examples: LiRA's fixed-variance form, since each example is forgotten in only a few runs).
- The game: for every run t and x in F_t, two trials: m's unlearned model (truth "unlearned") and R_t, the retrained
  one (truth "retrained"). The attack says "unlearned" when the likelihood ratio exceeds 1. Reported per method:
  accuracy over the trials (50% = indistinguishable from retraining, the ideal) with a bootstrap 95% interval over
  examples, TPR at 1% and 0.1% FPR, and the same on atypical examples (the ``atypical_share`` of T with the highest
  loss under models that never trained on them).

Example:
    >>> logit_confidence(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).round(decimals=3)
    tensor([2.])
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from ..attacks import tpr_at_fpr
from ..baselines import UnlearnTask, run_method
from ..data import DataBundle, IndexedDataset
from ..models import build_model
from ..training import accuracy, make_optimizer, predict, train
from .common import spec_of, train_target

ORDER = ["original", "amnesiac", "amnesiac-finetune", "finetune", "relabel", "neggrad", "retrain-control"]


def logit_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """phi = log p_y - log(1 - p_y), computed from the logits without rounding p_y to 1."""
    logits = logits.float()
    true = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.scatter(1, labels[:, None], float("-inf")).logsumexp(1)
    return true - others


def _merge(a: IndexedDataset, b: IndexedDataset) -> IndexedDataset:
    return IndexedDataset(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), torch.cat([a.ids, b.ids]))


def _retrain_control(task: UnlearnTask, seed: int) -> dict:
    """Retraining with new initial weights and a new batch order: what a second, equally valid retraining gives."""
    torch.manual_seed(seed)
    model = build_model(task.model_spec)
    train(model, make_optimizer(model, task.optimizer, task.lr), task.retained, epochs=task.epochs,
          batch_size=task.batch_size, seed=seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _neggrad_options(options: dict, task: UnlearnTask, model_state: dict, held: IndexedDataset) -> dict:
    """NegGrad stops at the accuracy that held-out data of the forget set's classes gets (what a model that never
    saw the forget set would score on it), not at 0%."""
    same = held.only_classes(torch.unique(task.forget_set.labels).tolist())
    target = accuracy(task.model(model_state), same)["overall"] if len(same) else 0.0
    return {**options, "stop_at": target}


def _one_run(k: int, s: dict, cfg: dict, pool: IndexedDataset, targets: np.ndarray, group: np.ndarray,
             data_spec: dict, run_dir: Path) -> dict:
    """Train, record, unlearn and score shadow run ``k``; returns phi on T per method, membership and accuracy."""
    g = torch.Generator().manual_seed(s["seed"] * 7_919 + k)
    inside = torch.zeros(len(pool), dtype=torch.bool)
    inside[torch.randperm(len(pool), generator=g)[: len(pool) // 2]] = True
    groups = int(group.max()) + 1
    in_t = inside[torch.as_tensor(targets)].numpy()
    forget_pos = np.nonzero(in_t & (group == k % groups))[0]          # positions in T
    train_part, held = pool.subset(inside), pool.subset(~inside)
    bundle = DataBundle("ulira", train_part, held, int(pool.labels.max()) + 1, data_spec)
    s_k = {**s, "seed": s["seed"] + 1 + k}
    run, _ = train_target(s_k, bundle, data_spec, run_dir, codec=cfg.get("codec", "bf16"))
    forget_ids = pool.ids[torch.as_tensor(targets[forget_pos])].tolist()
    task = UnlearnTask.from_run(run, sample_ids=forget_ids, bundle=bundle)
    t_data = pool.subset(torch.as_tensor(targets))
    states = {"original": run.final_state()}
    seconds = {}
    for name, options in cfg["methods"].items():
        options = dict(options or {})
        if name == "neggrad":
            options = _neggrad_options(options, task, states["original"], held)
        start = time.perf_counter()
        states[name] = run_method(name, task, **options).state
        seconds[name] = time.perf_counter() - start
    start = time.perf_counter()
    states["retrain-control"] = _retrain_control(task, seed=10_000 + s_k["seed"])
    seconds["retrain-control"] = time.perf_counter() - start
    phi, test_acc, forget_acc = {}, {}, {}
    for name, state in states.items():
        model = task.model(state)
        phi[name] = logit_confidence(predict(model, t_data), t_data.labels).numpy()
        test_acc[name] = accuracy(model, held)["overall"]
        forget_acc[name] = accuracy(model, task.forget_set)["overall"] if len(task.forget_set) else float("nan")
    steps_undone = int(run.steps_for(sample_ids=forget_ids).size)
    total = run.num_steps
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"phi": phi, "in_train": in_t, "forgot": np.isin(np.arange(len(targets)), forget_pos),
            "test_acc": test_acc, "forget_acc": forget_acc, "seconds": seconds,
            "fraction_undone": steps_undone / max(total, 1), "forget_size": len(forget_pos)}


def _gauss_llr(x: np.ndarray, mu_in, s_in, mu_out, s_out) -> np.ndarray:
    return (-0.5 * ((x - mu_in) / s_in) ** 2 - math.log(s_in)) - (-0.5 * ((x - mu_out) / s_out) ** 2 - math.log(s_out))


def attack_method(phi: np.ndarray, ref_phi: np.ndarray, out_phi: np.ndarray, in_train: np.ndarray,
                  forgot: np.ndarray, atypical: np.ndarray, *, reps: int = 500, seed: int = 0) -> dict:
    """U-LiRA for one method. Arrays are (runs, examples): ``phi`` under the method's model, ``ref_phi`` under the
    retrained reference R_k, ``out_phi`` under the trained model M_k; ``in_train``/``forgot`` say whether run k
    trained on / forgot the example. Leave-one-run-out: a trial on run t is judged by Gaussians fitted without t."""
    out_mask = ~in_train
    n_out = out_mask.sum(0)
    mu_out = np.where(n_out > 0, (out_phi * out_mask).sum(0) / np.maximum(n_out, 1), np.nan)
    s_out = np.sqrt(np.nansum(((out_phi - mu_out) ** 2) * out_mask) / max(out_mask.sum() - out_mask.shape[1], 1))
    n_in = forgot.sum(0)
    sum_in = (phi * forgot).sum(0)
    pos, neg, who = [], [], []
    resid = []
    for t, x in zip(*np.nonzero(forgot)):
        if n_in[x] < 2 or n_out[x] < 1:
            continue
        mu_in = (sum_in[x] - phi[t, x]) / (n_in[x] - 1)
        resid.append((t, x, mu_in))
    if not resid:
        return {"trials": 0}
    s_in = math.sqrt(np.mean([(phi[t, x] - m) ** 2 for t, x, m in resid]))
    s_in, s_out = max(s_in, 1e-3), max(float(s_out), 1e-3)
    for t, x, mu_in in resid:
        pos.append(_gauss_llr(phi[t, x], mu_in, s_in, mu_out[x], s_out))
        neg.append(_gauss_llr(ref_phi[t, x], mu_in, s_in, mu_out[x], s_out))
        who.append(x)
    pos, neg, who = np.array(pos), np.array(neg), np.array(who)
    return {"all": _game(pos, neg, who, reps, seed),
            "atypical": _game(pos[atypical[who]], neg[atypical[who]], who[atypical[who]], reps, seed)}


def _game(pos: np.ndarray, neg: np.ndarray, who: np.ndarray, reps: int, seed: int) -> dict:
    if len(pos) == 0:
        return {"trials": 0}
    hits = ((pos > 0).astype(float) + (neg <= 0).astype(float)) / 2  # per trial pair: both calls right = 1
    examples = np.unique(who)
    per_example = np.array([hits[who == x].mean() for x in examples])
    rng = np.random.default_rng(seed)
    boot = [per_example[rng.integers(0, len(examples), len(examples))].mean() for _ in range(reps)]
    return {"accuracy": float(hits.mean()), "accuracy_ci95": [float(np.percentile(boot, 2.5)),
                                                             float(np.percentile(boot, 97.5))],
            "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01), "tpr_at_0.1pct_fpr": tpr_at_fpr(pos, neg, 0.001),
            "trials": int(2 * len(pos)), "examples": int(len(examples))}


def _mean_ci(values: list[float]) -> dict:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], float)
    if len(v) == 0:
        return {"mean": float("nan"), "ci95": [float("nan"), float("nan")], "n": 0}
    half = 1.96 * v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": int(len(v))}


def ulira(cfg: dict, out: Path, log) -> dict:
    """The experiment runner (see the module docstring)."""
    from .runners import _settings
    results = {"experiment": cfg["name"], "settings": {}, "skipped": {}}
    for name, s, bundle, data_spec in _settings(cfg, results, log):
        results["settings"][name] = _setting(name, s, cfg, bundle, data_spec, out, log)
    return results


def _setting(name: str, s: dict, cfg: dict, bundle: DataBundle, data_spec: dict, out: Path, log) -> dict:
    pool = _merge(bundle.train, bundle.test)
    rng = np.random.default_rng(s["seed"])
    if s.get("pool_size") and s["pool_size"] < len(pool):
        pool = pool.subset(torch.as_tensor(np.sort(rng.choice(len(pool), s["pool_size"], replace=False))))
    forget_size, n_targets = int(cfg["forget_size"]), int(cfg["targets"])
    targets = rng.choice(len(pool), n_targets, replace=False)
    group = np.arange(n_targets) // (2 * forget_size)
    runs = []
    spec_of(s, bundle)  # fails early on a bad model option
    start = time.perf_counter()
    for k in range(int(cfg["shadow_runs"])):
        runs.append(_one_run(k, s, cfg, pool, targets, group, data_spec, out / "runs" / f"{name}-{k}"))
        if k % 8 == 7 or k == int(cfg["shadow_runs"]) - 1:
            log(f"[{name}] {k + 1} of {cfg['shadow_runs']} shadow runs ({time.perf_counter() - start:.0f} s)")
    in_train = np.stack([r["in_train"] for r in runs])
    forgot = np.stack([r["forgot"] for r in runs])
    phi = {m: np.stack([r["phi"][m] for r in runs]) for m in runs[0]["phi"]}
    out_phi = np.where(~in_train, phi["original"], np.nan)
    out_loss = np.nanmean(np.log1p(np.exp(-out_phi)), axis=0)   # cross-entropy from phi: log(1 + e^-phi)
    atypical = out_loss >= np.nanquantile(out_loss, 1 - float(cfg.get("atypical_share", 0.1)))
    methods = [m for m in ORDER if m in phi]
    attack = {m: attack_method(phi[m], phi["retrain"], phi["original"], in_train, forgot, atypical, seed=s["seed"])
              for m in methods}
    summary = {m: {"test_accuracy": _mean_ci([r["test_acc"][m] for r in runs]),
                   "forget_accuracy": _mean_ci([r["forget_acc"][m] for r in runs]),
                   "seconds": _mean_ci([r["seconds"].get(m, float("nan")) for r in runs])}
               for m in methods + ["retrain"]}
    return {"setting": s, "pool": len(pool), "targets": n_targets, "forget_size": forget_size,
            "shadow_runs": len(runs), "codec": cfg.get("codec", "bf16"), "atypical_examples": int(atypical.sum()),
            "fraction_undone": _mean_ci([r["fraction_undone"] for r in runs]),
            "forget_set_size": _mean_ci([float(r["forget_size"]) for r in runs]),
            "attack": attack, "models": summary, "seconds": time.perf_counter() - start}


def report_ulira(results: dict, out: Path) -> str:
    """Markdown tables and one plot (attack accuracy per method with its interval)."""
    from .report import LABELS, num, pct, table
    lines = [f"# Experiment `{results['experiment']}`: U-LiRA, can an attacker tell the unlearned model from a "
             "retrained one?", "",
             "Per-example likelihood-ratio attack (Hayes et al., 2024). Accuracy 50% is ideal (indistinguishable "
             "from retraining); TPR at low FPR shows whether *some* examples are exposed. Intervals: 95%, bootstrap "
             "over examples (attack) or normal over runs (accuracy).", ""]
    for name, r in results["settings"].items():
        s = r["setting"]
        lines += [f"## {name}", "",
                  f"Pool {r['pool']} samples, {r['shadow_runs']} recorded runs on random halves ({r['codec']} "
                  f"deltas), {s['epochs']} epochs, batch {s['batch_size']}, {s['optimizer']} lr {s['lr']}; "
                  f"{r['targets']} target examples; forget set {r['forget_set_size']['mean']:.1f} samples per run "
                  f"on average, {pct(r['fraction_undone']['mean'])} of the steps undone by amnesiac; atypical = "
                  f"the {r['atypical_examples']} targets with the highest loss when not trained on.", ""]
        rows = []
        for m, a in r["attack"].items():
            al, at, mod = a.get("all", {}), a.get("atypical", {}), r["models"][m]
            ci = al.get("accuracy_ci95", [None, None])
            rows.append([LABELS.get(m, m), f"{pct(al.get('accuracy'))} [{pct(ci[0])}, {pct(ci[1])}]",
                         num(al.get("tpr_at_1pct_fpr")), num(al.get("tpr_at_0.1pct_fpr")), pct(at.get("accuracy")),
                         num(at.get("tpr_at_1pct_fpr")), _ci_pct(mod["test_accuracy"]),
                         _ci_pct(mod["forget_accuracy"]), str(al.get("trials", 0))])
        ref = r["models"]["retrain"]
        rows.append(["retrain (the reference)", "n/a", "", "", "", "", _ci_pct(ref["test_accuracy"]),
                     _ci_pct(ref["forget_accuracy"]), ""])
        lines += [table(["method", "U-LiRA accuracy [95% CI]", "TPR@1%FPR", "TPR@0.1%FPR", "atypical acc.",
                         "atypical TPR@1%", "held-out acc.", "forget-set acc.", "trials"], rows), ""]
    _plot(results, out)
    return "\n".join(lines)


def _ci_pct(d: dict) -> str:
    from .report import pct
    return f"{pct(d['mean'])} [{pct(d['ci95'][0])}, {pct(d['ci95'][1])}]"


def _plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    for name, r in results["settings"].items():
        ms = [m for m, a in r["attack"].items() if "all" in a and "accuracy" in a["all"]]
        if not ms:
            continue
        acc = np.array([r["attack"][m]["all"]["accuracy"] for m in ms])
        ci = np.array([r["attack"][m]["all"]["accuracy_ci95"] for m in ms])
        fig, ax = plt.subplots(figsize=(7, 3.2))
        ax.barh(range(len(ms)), acc, xerr=[acc - ci[:, 0], ci[:, 1] - acc], color="#4c72b0")
        ax.axvline(0.5, color="k", lw=1, ls="--", label="ideal (50%)")
        ax.set_yticks(range(len(ms)), ms)
        ax.set_xlim(0.4, 1.0)
        ax.set_xlabel("U-LiRA accuracy (unlearned vs retrained)")
        ax.set_title(name)
        ax.legend(loc="lower right")
        fig.tight_layout()
        fig.savefig(out / f"ulira-{name}.png", dpi=110)
        plt.close(fig)


__all__ = ["attack_method", "logit_confidence", "report_ulira", "ulira"]
