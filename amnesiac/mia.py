"""Membership inference attacks: does a model still reveal that it was trained on the forget set?

- :class:`ShadowAttack`, in the paper's style (Shokri et al., 2017, as used by Graves et al.): shadow models of the
  target's architecture, trained like the target on data disjoint from the target's training set, each on one half
  of a pool (members) with the other half held out (non-members); one attack classifier per true class, trained on
  the shadows' softmax outputs to tell members from non-members. Applied to the model under test, it reports the
  *recall* on the forget set (the fraction of forget samples it calls members: the paper's figure) and the AUC
  of its member score between the forget set and non-members of the same classes.
- :func:`loss_attack`, cheap and shadow-free (Yeom et al., 2018): a sample is called a member when its loss is below
  the model's mean loss on known training members; recall on the forget set and AUC of the negative loss.

Example:
    >>> import torch
    >>> from amnesiac.data import load_dataset
    >>> from amnesiac.models import mlp
    >>> from amnesiac.training import make_optimizer, train
    >>> bundle = load_dataset("digits")
    >>> def trainer(data, seed):
    ...     torch.manual_seed(seed); m = mlp(bundle.input_shape, 10)
    ...     train(m, make_optimizer(m), data, epochs=2, seed=seed); return m
    >>> attack = ShadowAttack.fit(bundle.test, trainer, num_classes=10, shadows=1, seed=0)
    >>> model = trainer(bundle.train, 0)
    >>> r = attack.evaluate(model, bundle.train.subset(torch.arange(len(bundle.train)) < 100), bundle.test)
    >>> 0 <= r["recall"] <= 1 and 0 <= r["auc"] <= 1
    True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .data import IndexedDataset
from .training import per_sample_loss, predict


def attack_features(logits: torch.Tensor) -> np.ndarray:
    """The attack's input: the softmax output, as log-probabilities (clipped) so that confident outputs differ."""
    return torch.log_softmax(logits.float(), dim=1).clamp_min(-30.0).numpy()


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    from sklearn.metrics import roc_auc_score
    y = np.r_[np.ones(len(pos)), np.zeros(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


def _classifier(kind: str, seed: int):
    if kind == "gbdt":
        from sklearn.ensemble import HistGradientBoostingClassifier
        return HistGradientBoostingClassifier(max_iter=60, learning_rate=0.1, max_leaf_nodes=15, random_state=seed)
    if kind == "logistic":
        from sklearn.linear_model import LogisticRegression
        return LogisticRegression(max_iter=500)
    if kind == "mlp":
        from sklearn.neural_network import MLPClassifier
        return MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
    raise ValueError(f"unknown attack classifier {kind!r}; choose gbdt, logistic or mlp")


@dataclass
class ShadowAttack:
    """Per-class attack classifiers trained on shadow models' outputs (see the module docstring)."""

    attackers: dict[int, object]      # class -> fitted classifier, or a constant member probability (float)
    num_classes: int
    shadow_accuracy: float = float("nan")  # mean held-out accuracy of the shadows (how like the target they are)

    @classmethod
    def fit(cls, pool: IndexedDataset, train_shadow: Callable[[IndexedDataset, int], torch.nn.Module], *,
            num_classes: int, shadows: int = 4, seed: int = 0, classifier: str = "gbdt") -> ShadowAttack:
        """Train ``shadows`` models with ``train_shadow(data, seed)`` on random halves of ``pool`` (data the target
        never saw) and one attack classifier per class on their outputs for the pool (in: trained on, out: not)."""
        g = torch.Generator().manual_seed(seed)
        masks, models = [], []
        for k in range(shadows):
            order = torch.randperm(len(pool), generator=g)
            inside = torch.zeros(len(pool), dtype=torch.bool)
            inside[order[: len(pool) // 2]] = True
            masks.append(inside)
            models.append(train_shadow(pool.subset(inside), seed + 1000 + k))
        return cls.from_shadows(pool, models, masks, num_classes=num_classes,
                                make_classifier=lambda: _classifier(classifier, seed))

    @classmethod
    def from_shadows(cls, pool: IndexedDataset, models: list, masks: list, *, num_classes: int,
                     make_classifier: Callable[[], object], empty: float | None = None) -> ShadowAttack:
        """Fit one attack classifier per class on the shadow ``models``' outputs for ``pool`` (``masks[k]``: the
        samples shadow k trained on). A class with one kind of row only gets a constant: ``empty`` if given, else
        the share of members among its rows."""
        feats, labels, member, accs = [], [], [], []
        for model, inside in zip(models, masks):
            logits = predict(model, pool)
            accs.append((logits.argmax(1) == pool.labels)[~inside].float().mean().item())
            feats.append(attack_features(logits))
            labels.append(pool.labels.numpy())
            member.append(inside.numpy())
        x, y, m = np.concatenate(feats), np.concatenate(labels), np.concatenate(member)
        attackers: dict[int, object] = {}
        for c in range(num_classes):
            rows = y == c
            if rows.sum() == 0 or len(np.unique(m[rows])) < 2:
                attackers[c] = empty if empty is not None else (float(m[rows].mean()) if rows.any() else 0.5)
                continue
            attackers[c] = make_classifier().fit(x[rows], m[rows])
        return cls(attackers, num_classes, float(np.mean(accs)))

    def member_scores(self, model: torch.nn.Module, data: IndexedDataset) -> np.ndarray:
        """The attack's member probability for every sample of ``data``, under ``model``."""
        if len(data) == 0:
            return np.zeros(0)
        x = attack_features(predict(model, data))
        y = data.labels.numpy()
        scores = np.zeros(len(data))
        for c in np.unique(y):
            rows = y == c
            attacker = self.attackers.get(int(c), 0.5)
            scores[rows] = attacker if isinstance(attacker, float) else attacker.predict_proba(x[rows])[:, 1]
        return scores

    def evaluate(self, model: torch.nn.Module, forget: IndexedDataset, nonmembers: IndexedDataset) -> dict:
        """Recall on ``forget`` (fraction called members) and the AUC between ``forget`` and the ``nonmembers`` of
        the same classes (samples the model never trained on)."""
        same = nonmembers.only_classes(torch.unique(forget.labels).tolist())
        pos, neg = self.member_scores(model, forget), self.member_scores(model, same)
        return {"recall": float((pos > 0.5).mean()) if len(pos) else float("nan"), "auc": _auc(pos, neg),
                "nonmember_false_positive_rate": float((neg > 0.5).mean()) if len(neg) else float("nan")}


def loss_attack(model: torch.nn.Module, forget: IndexedDataset, nonmembers: IndexedDataset,
                members: IndexedDataset) -> dict:
    """Loss-threshold attack: member when the loss is below the mean loss on ``members`` (known training samples,
    e.g. retained training data). Recall on ``forget``; AUC of -loss between ``forget`` and same-class
    ``nonmembers``."""
    def losses(data):
        return per_sample_loss(predict(model, data), data.labels).numpy() if len(data) else np.zeros(0)
    threshold = float(losses(members).mean())
    same = nonmembers.only_classes(torch.unique(forget.labels).tolist())
    pos, neg = losses(forget), losses(same)
    return {"recall": float((pos < threshold).mean()) if len(pos) else float("nan"), "auc": _auc(-pos, -neg),
            "threshold": threshold}
