"""Forget a class with controls, seeds, a retraining ensemble, intervals and fair timing (issue 12).

For every training seed and every forget draw (which ``keep_count`` samples of the class are kept) of a setting:

- the target is trained while recording; the held-out data is split (:func:`amnesiac.attacks.held_out_split`)
  into validation / attack non-members / test;
- an **ensemble of retrainings** on the retained data: member 0 from the run's own initial weights S_0 and batch
  order (the ``retrain`` method), the others with new initial weights and batch orders: their spread is the noise
  floor every other figure is judged against;
- every method, plus the **original model** as a control; NegGrad stops at the accuracy the ensemble gets on
  validation data of the forgotten class (not at 0%);
- metrics per method: test accuracy (overall / forgotten / retained), forget-set accuracy, the sound shadow attack
  and the loss attack (AUC, bootstrap interval, FPR, TPR at 1% FPR), and **per-sample forgetting**: the share of
  forget / retained / held-out samples whose loss lies inside the ensemble's 2.5-97.5% band (for ensemble members,
  leave-one-out, which gives the share an exact retraining would score);
- **timing end to end from a cold cache** (:mod:`.timing`), amnesiac and retraining interleaved, medians; the
  recording overhead and the break-even number of requests (overhead / (retrain - amnesiac)).

Across replicates every figure gets a mean and a 95% t-interval; the verdicts are equivalence tests: a method is
"equivalent to retraining" on a metric when the interval of its difference to the ensemble mean lies within the
ensemble's own spread (the mean over replicates of max - min across the ensemble).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import numpy as np

from ..attacks import fit_population_attack, held_out_split
from ..baselines import UnlearnTask, run_method
from ..data import DataBundle
from ..evaluation import evaluate
from ..training import accuracy, per_sample_loss, predict
from .common import SkipSetting, load_bundle, plain_training_seconds, train_target
from .timing import COLD_CACHE, amnesiac_end_to_end, retrain_end_to_end

METRICS = {"retained": ("test", "retained"), "forgotten": ("test", "forgotten"), "forget_set": ("forget_set",),
           "mia_shadow_auc": ("mia_shadow", "auc"), "mia_loss_auc": ("mia_loss", "auc"),
           "forget_in_band": ("bands", "forget"), "retained_in_band": ("bands", "retained"),
           "heldout_in_band": ("bands", "held_out")}


def _get(d, path):
    for k in path:
        d = None if d is None else d.get(k)
    return d


def mean_ci(values) -> dict:
    """Mean and 95% t-interval (n - 1 degrees of freedom); the interval is null for fewer than 2 values."""
    v = np.asarray([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], float)
    if len(v) == 0:
        return {"mean": None, "ci95": None, "n": 0}
    if len(v) == 1:
        return {"mean": float(v[0]), "ci95": None, "n": 1}
    from scipy.stats import t
    half = float(t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)], "n": int(len(v))}


def _losses(state, task, data) -> np.ndarray:
    return per_sample_loss(predict(task.model(state), data), data.labels).numpy()


def band_shares(states: dict, ensemble: list, task, parts: dict) -> dict:
    """Per method and part: the share of samples whose loss lies in the ensemble's 2.5-97.5% band; ensemble
    members are placed in the band of the others (leave-one-out)."""
    ens_loss = {p: np.stack([_losses(s, task, d) for s in ensemble]) for p, d in parts.items()}

    def share(loss, others):
        lo, hi = np.percentile(others, 2.5, axis=0), np.percentile(others, 97.5, axis=0)
        return float(((loss >= lo) & (loss <= hi)).mean())
    out = {m: {p: share(_losses(s, task, d), ens_loss[p]) for p, d in parts.items()} for m, s in states.items()}
    loo = {p: [share(ens_loss[p][i], np.delete(ens_loss[p], i, 0)) for i in range(len(ensemble))] for p in parts}
    out["retrain"] = {p: float(np.mean(v)) for p, v in loo.items()}
    return out


def _replicate(s: dict, cfg: dict, bundle: DataBundle, data_spec: dict, seed: int, draw: int, out: Path,
               log) -> dict:
    target = int(cfg["forget_class"])
    split = held_out_split(bundle.test, seed=seed)
    train_set = bundle.train.keep_few_of_class(target, int(s["keep_count"]), seed=1000 + draw)
    rep = DataBundle(bundle.name, train_set, split.test, bundle.num_classes, data_spec)
    s_rep = {**s, "seed": seed}
    run_dir = out / "runs" / f"{s.get('name', 'setting')}-{seed}-{draw}"
    run, record_seconds = train_target(s_rep, rep, {**data_spec, "keep_class": target, "draw": draw}, run_dir)
    task = UnlearnTask.from_run(run, classes=[target], bundle=rep)
    log(f"seed {seed}, draw {draw}: {run.num_steps} steps recorded in {record_seconds:.1f} s; timing and ensemble")
    # interleaved, cold-cache repeats: amnesiac, retrain member i, amnesiac, ...; the members are the ensemble
    am_times, rt_times, ensemble = [], [], []
    for i in range(int(cfg["retrain_ensemble"])):
        sec, am_state = amnesiac_end_to_end(run_dir, task.selection.kwargs(), out / "amnesiac.safetensors")
        am_times.append(sec)
        sec, state = retrain_end_to_end(run_dir, task, init_seed=None if i == 0 else 50_000 + 97 * seed + i,
                                        order_seed=seed + 100 * i, out=out / "retrain.safetensors")
        rt_times.append(sec)
        ensemble.append(state)
    for _ in range(max(0, int(cfg.get("timing_repeats", 5)) - len(am_times))):
        am_times.append(amnesiac_end_to_end(run_dir, task.selection.kwargs(), out / "amnesiac.safetensors")[0])
    val_same = split.validation.only_classes([target])
    stop_at = float(np.mean([accuracy(task.model(e), val_same)["overall"] for e in ensemble]))
    states, seconds = {"original": run.final_state(), "amnesiac": am_state}, {"amnesiac": statistics.median(am_times)}
    for name, options in cfg["methods"].items():
        if name in ("retrain", "amnesiac"):
            continue
        options = {**(options or {}), **({"stop_at": stop_at} if name == "neggrad" else {})}
        r = run_method(name, task, **options)
        states[name], seconds[name] = r.state, r.seconds
        if name == "amnesiac-finetune":  # the unlearning part as measured end to end, plus its fine-tune
            seconds[name] = statistics.median(am_times) + r.info.get("finetune_seconds", 0.0)
    states["retrain"] = ensemble[0]
    attack = fit_population_attack(task, split, shadows=int(cfg["mia"]["shadows"]), seed=seed) \
        if cfg.get("mia", {}).get("shadows") else None
    metrics = {m: evaluate(task, st, attack=attack, nonmembers=split.attack_nonmembers) for m, st in states.items()}
    members = [metrics["retrain"]] + [evaluate(task, e, attack=attack, nonmembers=split.attack_nonmembers)
                                      for e in ensemble[1:]]
    spread = {k: _spread(members, path) for k, path in METRICS.items() if path[0] != "bands"}
    parts = {"forget": task.forget_set, "retained": task.retained.sample(1000, seed), "held_out": split.test}
    bands = band_shares({m: st for m, st in states.items() if m != "retrain"}, ensemble, task, parts)
    for m in metrics:
        metrics[m]["bands"] = bands[m]
    plain = plain_training_seconds(s_rep, rep) if cfg.get("measure_plain", True) else None
    rt, am = statistics.median(rt_times), statistics.median(am_times)
    overhead = None if plain is None else record_seconds - plain
    return {"seed": seed, "draw": draw, "steps_undone": int(run.steps_for(classes=[target]).size),
            "total_steps": run.num_steps, "forget_set_size": len(task.forget_set), "metrics": metrics,
            "ensemble_spread": spread, "ensemble_size": len(ensemble), "neggrad_stop_at": stop_at,
            "shadow_accuracy": attack.shadow_accuracy if attack else None,
            "timing": {"amnesiac_seconds": am_times, "retrain_seconds": rt_times, "amnesiac_median": am,
                       "retrain_median": rt, "speedup_median": rt / max(am, 1e-9), "record_seconds": record_seconds,
                       "plain_train_seconds": plain, "recording_overhead_seconds": overhead,
                       "break_even_requests": None if overhead is None or rt <= am else overhead / (rt - am),
                       "method_seconds": seconds, "cold_cache": COLD_CACHE}}


def _spread(evals: list, path) -> float | None:
    v = [x for x in (_get(e, path) for e in evals) if x is not None and not math.isnan(x)]
    return float(max(v) - min(v)) if len(v) > 1 else None


def seeds_experiment(cfg: dict, out: Path, log) -> dict:
    """The runner of ``amnesiac experiment seeds`` (see the module docstring)."""
    results = {"experiment": cfg["name"], "forget_class": int(cfg["forget_class"]), "settings": {}, "skipped": {}}
    for s in cfg["settings"]:
        name = s.get("name") or s["dataset"]
        try:
            bundle, data_spec = load_bundle({**s, "keep_class": None})
        except SkipSetting as e:
            results["skipped"][name] = str(e)
            log(f"[{name}] skipped: {e}")
            continue
        reps = [_replicate(s, cfg, bundle, data_spec, seed, draw, out, lambda m: log(f"[{name}] {m}"))
                for seed in s.get("seeds", cfg["seeds"]) for draw in range(int(s.get("draws", cfg["draws"])))]
        results["settings"][name] = {"setting": s, "replicates": reps, "summary": summarise(reps)}
    return results


def summarise(reps: list[dict]) -> dict:
    """Mean and interval of every metric per method, the equivalence verdicts and the timing figures."""
    methods = list(reps[0]["metrics"])
    table = {m: {k: mean_ci([_get(r["metrics"][m], p) for r in reps]) for k, p in METRICS.items()} for m in methods}
    margins = {k: mean_ci([r["ensemble_spread"].get(k) for r in reps])["mean"] for k in METRICS}
    band_margin = {k: 0.05 for k in METRICS if k.endswith("in_band")}  # shares: within 5 points of retraining's
    verdicts = {}
    for m in methods:
        verdicts[m] = {}
        for k, p in METRICS.items():
            margin = margins.get(k) if not k.endswith("in_band") else band_margin[k]
            diffs = [(_get(r["metrics"][m], p) or 0.0) - (_get(r["metrics"]["retrain"], p) or 0.0) for r in reps]
            d = mean_ci(diffs)
            if margin is None or d["mean"] is None:
                verdicts[m][k] = {"difference": d, "margin": margin, "equivalent": None}
                continue
            lo, hi = d["ci95"] or [d["mean"], d["mean"]]
            verdicts[m][k] = {"difference": d, "margin": margin, "equivalent": bool(-margin <= lo and hi <= margin)}
    timing = {k: mean_ci([r["timing"][k] for r in reps]) for k in
              ("amnesiac_median", "retrain_median", "speedup_median", "recording_overhead_seconds",
               "break_even_requests")}
    timing["fraction_undone"] = mean_ci([r["steps_undone"] / r["total_steps"] for r in reps])
    return {"table": table, "margins": margins, "verdicts": verdicts, "timing": timing, "replicates": len(reps)}


__all__ = ["band_shares", "mean_ci", "seeds_experiment", "summarise"]
