"""A sound membership inference evaluation: disjoint data splits, shadows trained like the target, intervals.

The earlier set-up (:mod:`amnesiac.mia` used alone) trained shadows on half of the test set for the target's number
of epochs (a fraction of its optimizer steps) and scored the attack on the very non-members it was fitted on. Here:

- :func:`held_out_split` cuts the held-out data (never trained on by the target) into three disjoint parts:
  ``validation`` (shadow pool and hyper-parameter choice), ``attack_nonmembers`` (used only to *score* attacks)
  and ``test`` (accuracy). Nothing that scores an attack was seen while fitting it.
- :func:`fit_population_attack`: shadows drawn like the target's training set (the same per-class counts, capped
  so that every class keeps non-members) from the target's retained data plus ``validation``, trained with the
  target's optimizer, learning rate, batch size and **number of optimizer steps**; per-class attack classifiers with
  balanced class weights fitted on the shadows' in/out outputs. The forget set is never in the shadow pool.
- :func:`roc_summary`: for member scores ``pos`` (the forget set) and non-member scores ``neg`` (held-out), the AUC
  with a bootstrap 95% interval, the true- and false-positive rate at the attack's threshold and the TPR at 1% FPR.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> r = roc_summary(rng.normal(1, 1, 300), rng.normal(0, 1, 300), threshold=0.5)
    >>> 0.7 < r["auc"] < 0.8 and r["auc_ci95"][0] < r["auc"] < r["auc_ci95"][1]
    True
    >>> sorted(r)
    ['auc', 'auc_ci95', 'fpr', 'n_members', 'n_nonmembers', 'recall', 'tpr_at_1pct_fpr']
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .data import IndexedDataset
from .mia import ShadowAttack
from .training import per_sample_loss, predict


def _weighted_auc(pos: np.ndarray, neg: np.ndarray, wpos: np.ndarray, wneg: np.ndarray) -> np.ndarray:
    """AUC (ties count one half) for each row of weights ``wpos`` (R, P) and ``wneg`` (R, N): a bootstrap
    resample is a row of multiplicities."""
    order = np.argsort(neg, kind="stable")
    neg_sorted, w_sorted = neg[order], wneg[:, order]
    below = np.concatenate([np.zeros((len(w_sorted), 1)), np.cumsum(w_sorted, axis=1)], axis=1)
    lo = np.searchsorted(neg_sorted, pos, side="left")   # negatives strictly below each positive
    hi = np.searchsorted(neg_sorted, pos, side="right")  # ... and those tied with it
    wins = below[:, lo] + 0.5 * (below[:, hi] - below[:, lo])
    return (wpos * wins).sum(1) / (wpos.sum(1) * wneg.sum(1))


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Probability that a member's score exceeds a non-member's (ties one half); NaN when a side is empty.

    >>> auc(np.array([2.0, 3.0]), np.array([1.0, 2.0]))
    0.875
    """
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    return float(_weighted_auc(pos, neg, np.ones((1, len(pos))), np.ones((1, len(neg))))[0])


def bootstrap_auc_ci(pos: np.ndarray, neg: np.ndarray, *, reps: int = 1000, seed: int = 0,
                     level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of the AUC, resampling members and non-members independently."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    values = []
    for start in range(0, reps, 250):  # chunks bound the (reps, n) weight matrices
        n = min(250, reps - start)
        wpos = rng.multinomial(len(pos), np.full(len(pos), 1 / len(pos)), size=n).astype(float)
        wneg = rng.multinomial(len(neg), np.full(len(neg), 1 / len(neg)), size=n).astype(float)
        values.append(_weighted_auc(pos, neg, wpos, wneg))
    v = np.concatenate(values)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))]


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The largest share of members scored above a threshold that at most ``fpr`` of the non-members exceed.

    >>> tpr_at_fpr(np.array([5.0, 4.0, 0.5]), np.arange(100) / 100, 0.01)
    0.6666666666666666
    """
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    allowed = int(math.floor(fpr * len(neg) + 1e-9))  # how many non-members may score above the threshold
    threshold = np.sort(neg)[::-1][allowed] if allowed < len(neg) else -np.inf
    return float((pos > threshold).mean())


def roc_summary(pos: np.ndarray, neg: np.ndarray, *, threshold: float, reps: int = 1000, seed: int = 0) -> dict:
    """AUC with its bootstrap 95% interval, recall (TPR) and FPR at ``threshold`` (score > threshold means
    "member"), the TPR at 1% FPR and the sample counts, for member scores ``pos`` and non-member scores ``neg``."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    nan = float("nan")
    return {"auc": auc(pos, neg), "auc_ci95": bootstrap_auc_ci(pos, neg, reps=reps, seed=seed),
            "recall": float((pos > threshold).mean()) if len(pos) else nan,
            "fpr": float((neg > threshold).mean()) if len(neg) else nan,
            "tpr_at_1pct_fpr": tpr_at_fpr(pos, neg, 0.01), "n_members": int(len(pos)), "n_nonmembers": int(len(neg))}


@dataclass(frozen=True)
class HeldOutSplit:
    """Disjoint parts of the held-out data: see the module docstring."""

    validation: IndexedDataset
    attack_nonmembers: IndexedDataset
    test: IndexedDataset


def held_out_split(held_out: IndexedDataset, *, seed: int = 0, shares: tuple[float, float] = (0.5, 0.25)
                   ) -> HeldOutSplit:
    """Split ``held_out`` per class (so every part keeps the class mix) into validation / attack non-members /
    test with the given shares of the first two (the rest is test).

    >>> from amnesiac.data import load_dataset
    >>> s = held_out_split(load_dataset("digits").test)
    >>> len(s.validation), len(s.attack_nonmembers), len(s.test)
    (177, 85, 97)
    """
    g = torch.Generator().manual_seed(seed + 7919)
    part = torch.full((len(held_out),), 2, dtype=torch.long)
    for c in torch.unique(held_out.labels).tolist():
        rows = torch.nonzero(held_out.labels == c).flatten()
        rows = rows[torch.randperm(len(rows), generator=g)]
        n_val, n_att = int(len(rows) * shares[0]), int(len(rows) * shares[1])
        part[rows[:n_val]] = 0
        part[rows[n_val:n_val + n_att]] = 1
    return HeldOutSplit(*(held_out.subset(part == k) for k in range(3)))


def shadow_training_sets(target_train: IndexedDataset, pool: IndexedDataset, *, shadows: int, seed: int,
                         max_share: float = 0.75) -> list[torch.Tensor]:
    """For each shadow, a boolean mask over ``pool``: per class as many samples as the target trained on (at most
    ``max_share`` of the pool's samples of that class, so each class keeps non-members for the attacker)."""
    g = torch.Generator().manual_seed(seed + 104729)
    counts = torch.bincount(target_train.labels, minlength=int(pool.labels.max()) + 1)
    masks = []
    for _ in range(shadows):
        inside = torch.zeros(len(pool), dtype=torch.bool)
        for c in torch.unique(pool.labels).tolist():
            rows = torch.nonzero(pool.labels == c).flatten()
            take = min(int(counts[c]) if c < len(counts) else 0, int(len(rows) * max_share))
            inside[rows[torch.randperm(len(rows), generator=g)[:take]]] = True
        masks.append(inside)
    return masks


def _balanced_classifier(kind: str, seed: int):
    if kind == "gbdt":
        from sklearn.ensemble import HistGradientBoostingClassifier
        return HistGradientBoostingClassifier(max_iter=60, learning_rate=0.1, max_leaf_nodes=15, random_state=seed,
                                              class_weight="balanced")
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression(max_iter=500, class_weight="balanced")
    raise ValueError(f"unknown attack classifier {kind!r}; choose gbdt or logistic")


def fit_population_attack(task, split: HeldOutSplit, *, shadows: int = 4, classifier: str = "gbdt",
                          seed: int | None = None) -> ShadowAttack:
    """The shadow attack of the module docstring for ``task`` (an :class:`amnesiac.baselines.UnlearnTask`)."""
    from .models import build_model
    from .training import make_optimizer, train
    seed = task.seed if seed is None else seed
    pool = _concat(task.retained, split.validation)
    target_steps = task.epochs * math.ceil(len(task.train_set) / task.batch_size)
    models, masks = [], []
    for k, inside in enumerate(shadow_training_sets(task.train_set, pool, shadows=shadows, seed=seed)):
        data = pool.subset(inside)
        per_epoch = math.ceil(len(data) / task.batch_size)
        epochs = max(1, round(target_steps / per_epoch))  # the target's number of optimizer steps
        torch.manual_seed(seed + 1000 + k)
        model = build_model(task.model_spec)
        train(model, make_optimizer(model, task.optimizer, task.lr), data, epochs=epochs,
              batch_size=task.batch_size, seed=seed + 1000 + k)
        models.append(model)
        masks.append(inside)
    # a class without both kinds of rows gets 0.5: no evidence either way, and the attack says so
    return ShadowAttack.from_shadows(pool, models, masks, num_classes=int(task.model_spec["num_classes"]),
                                     make_classifier=lambda: _balanced_classifier(classifier, seed), empty=0.5)


def _concat(a: IndexedDataset, b: IndexedDataset) -> IndexedDataset:
    return IndexedDataset(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), torch.cat([a.ids, b.ids]))


def shadow_attack_summary(attack: ShadowAttack, model: torch.nn.Module, forget: IndexedDataset,
                          nonmembers: IndexedDataset, *, seed: int = 0) -> dict:
    """The shadow attack on ``model``: members = ``forget``, non-members = the held-out ``nonmembers`` of the same
    classes (never used to fit the attack); threshold 0.5 on the balanced member probability."""
    same = nonmembers.only_classes(torch.unique(forget.labels).tolist())
    pos, neg = attack.member_scores(model, forget), attack.member_scores(model, same)
    return roc_summary(pos, neg, threshold=0.5, seed=seed)


def loss_attack_summary(model: torch.nn.Module, forget: IndexedDataset, nonmembers: IndexedDataset,
                        members: IndexedDataset, *, seed: int = 0) -> dict:
    """Loss-threshold attack (Yeom et al., 2018): member when the loss is below the mean loss of known training
    ``members`` of the forget set's classes (of all ``members`` when none shares them, as when a whole class is
    forgotten); scored against the held-out ``nonmembers`` of the same classes."""
    classes = torch.unique(forget.labels).tolist()
    known = members.only_classes(classes)
    known = known if len(known) else members

    def losses(data: IndexedDataset) -> np.ndarray:
        return per_sample_loss(predict(model, data), data.labels).numpy() if len(data) else np.zeros(0)
    threshold = float(losses(known).mean())
    out = roc_summary(-losses(forget), -losses(nonmembers.only_classes(classes)), threshold=-threshold, seed=seed)
    return {**out, "threshold": threshold}


__all__ = ["HeldOutSplit", "auc", "bootstrap_auc_ci", "fit_population_attack", "held_out_split",
           "loss_attack_summary", "roc_summary", "shadow_attack_summary", "shadow_training_sets", "tpr_at_fpr"]
