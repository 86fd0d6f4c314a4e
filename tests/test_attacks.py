"""The sound attack: ROC statistics against known answers, disjoint splits, shadows like the target, eval JSON."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from amnesiac.attacks import (auc, bootstrap_auc_ci, held_out_split, roc_summary, shadow_training_sets,
                              tpr_at_fpr)
from amnesiac.data import load_dataset


def test_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(1)
    pos, neg = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 70).astype(float)
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(70)], np.r_[pos, neg])
    assert auc(pos, neg) == pytest.approx(want, abs=1e-12)
    assert math.isnan(auc(np.zeros(0), neg))


def test_bootstrap_interval_covers_and_narrows():
    true_auc = 0.63816  # P(N(0.5,1) > N(0,1)) = Phi(0.5 / sqrt 2)
    covered, widths = 0, []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        lo, hi = bootstrap_auc_ci(rng.normal(0.5, 1, 300), rng.normal(0, 1, 300), reps=300, seed=seed)
        covered += lo < true_auc < hi
        widths.append(hi - lo)
    assert covered >= 16  # a 95% interval: 19 of 20 expected; 16 or fewer has probability < 2%
    rng = np.random.default_rng(0)
    small = bootstrap_auc_ci(rng.normal(0.5, 1, 20), rng.normal(0, 1, 20), reps=300)
    assert small[1] - small[0] > 2.5 * np.mean(widths)  # 15x fewer samples: about sqrt(15) ~ 3.9x wider


def test_tpr_at_fpr_and_rates():
    neg = np.arange(1000) / 1000  # ten non-members above 0.99
    pos = np.array([0.995, 0.9995, 0.5, 0.2])
    assert tpr_at_fpr(pos, neg, 0.01) == 0.5  # 10 non-members may be above: the threshold is the 11th, 0.989
    r = roc_summary(pos, neg, threshold=0.5)
    assert r["recall"] == 0.5 and r["fpr"] == pytest.approx(0.499)
    assert r["n_members"] == 4 and r["n_nonmembers"] == 1000


def test_held_out_split_is_disjoint_and_keeps_classes():
    test = load_dataset("digits").test
    s = held_out_split(test, seed=3)
    parts = [set(p.ids.tolist()) for p in (s.validation, s.attack_nonmembers, s.test)]
    assert sum(map(len, parts)) == len(test) and len(set.union(*parts)) == len(test)
    for p in (s.validation, s.attack_nonmembers):
        assert set(p.labels.tolist()) == set(range(10))


def test_shadow_sets_copy_the_target_class_mix():
    bundle = load_dataset("digits")
    target = bundle.train.keep_few_of_class(3, 10)
    pool = bundle.train.without_ids(target.only_classes([3]).ids.numpy())
    pool = type(pool)(torch.cat([pool.images, bundle.test.images]), torch.cat([pool.labels, bundle.test.labels]),
                      torch.cat([pool.ids, bundle.test.ids]))
    masks = shadow_training_sets(target, pool, shadows=2, seed=0)
    want = torch.bincount(target.labels, minlength=10)
    for m in masks:
        got = torch.bincount(pool.labels[m], minlength=10)
        have = torch.bincount(pool.labels, minlength=10)
        assert torch.all(got == torch.minimum(want, (have.float() * 0.75).long()))
    assert not torch.equal(masks[0], masks[1])


def test_eval_json_attack_objects_carry_interval_fpr_and_tpr(cli_run, capsys):
    from amnesiac.cli import main
    assert main(["eval", "--run", str(cli_run), "--forget-classes", "3", "--shadows", "1", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    for key in ("mia_loss", "mia_shadow"):
        a = ev[key]
        assert {"auc", "auc_ci95", "fpr", "recall", "tpr_at_1pct_fpr"} <= set(a)
        lo, hi = a["auc_ci95"]
        assert lo <= a["auc"] <= hi and 0 <= a["fpr"] <= 1
        # scored on held-out non-members of class 3 only: about a quarter of the test set's threes
        threes = int((load_dataset("digits").test.labels == 3).sum())
        assert 0 < a["n_nonmembers"] <= threes // 4 + 1
    from amnesiac.cli import _attack
    assert "95% CI" in _attack(ev["mia_shadow"]) and "n/a" in _attack({"recall": None, "auc": None})
