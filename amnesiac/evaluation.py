"""How well a model forgot: accuracy splits, membership inference, distance to the retrained model, storage.

:func:`evaluate` measures one set of weights for one :class:`~amnesiac.baselines.UnlearnTask`:

- ``test``: test accuracy overall, on the forgotten classes and on the retained ones (NaN where a split is empty);
- ``forget_set``: accuracy on the forget set itself (training samples the model should no longer fit);
- ``retained_train``: accuracy on (a fixed sample of) the retained training data;
- ``mia_loss``: the loss-threshold attack (:func:`amnesiac.attacks.loss_attack_summary`);
- ``mia_shadow``: the shadow-model attack, when a fitted :class:`~amnesiac.mia.ShadowAttack` is given (fit it with
  :func:`amnesiac.attacks.fit_population_attack`); both attack objects hold ``auc``, ``auc_ci95`` (bootstrap 95%
  interval), ``recall`` and ``fpr`` at the attack's threshold, and ``tpr_at_1pct_fpr``, scored against held-out
  non-members (``nonmembers``, which must not have been used to fit the attack);
- ``distance``: when reference weights (the retrained model) are given: L2 distance of the weights (absolute and
  relative to the reference's norm), prediction agreement and mean KL(reference || model) on the test set and on
  the forget set.

Example:
    >>> import torch
    >>> a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    >>> d = weight_distance(a.state_dict(), a.state_dict())
    >>> d["weights_l2"], d["weights_l2_relative"]
    (0.0, 0.0)
    >>> weight_distance(a.state_dict(), b.state_dict())["weights_l2"] > 0
    True
"""

from __future__ import annotations

import math

import torch

from .attacks import fit_population_attack, held_out_split, loss_attack_summary, shadow_attack_summary
from .data import IndexedDataset
from .mia import ShadowAttack
from .training import accuracy, predict


def weight_distance(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """L2 norm of the difference of every floating tensor, absolute and relative to the reference's norm."""
    diff = ref = 0.0
    for name, r in reference.items():
        if torch.is_floating_point(r):
            diff += float((state[name].float() - r.float()).pow(2).sum())
            ref += float(r.float().pow(2).sum())
    return {"weights_l2": math.sqrt(diff), "weights_l2_relative": math.sqrt(diff) / max(math.sqrt(ref), 1e-12)}


def prediction_distance(model: torch.nn.Module, reference: torch.nn.Module, data: IndexedDataset) -> dict:
    """Fraction of samples where both models predict the same class, and the mean KL(reference || model)."""
    if len(data) == 0:
        return {"agreement": float("nan"), "kl": float("nan")}
    p, q = predict(reference, data).log_softmax(1), predict(model, data).log_softmax(1)
    kl = (p.exp() * (p - q)).sum(1).mean().item()
    return {"agreement": (p.argmax(1) == q.argmax(1)).float().mean().item(), "kl": kl}


def _fixed_sample(data: IndexedDataset, limit: int, seed: int = 0) -> IndexedDataset:
    if len(data) <= limit:
        return data
    keep = torch.zeros(len(data), dtype=torch.bool)
    keep[torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]] = True
    return data.subset(keep)


def forget_classes_of(task) -> list[int]:
    return task.selection.classes


def evaluate(task, state: dict[str, torch.Tensor], *, reference: dict[str, torch.Tensor] | None = None,
             attack: ShadowAttack | None = None, member_sample: int = 2000,
             nonmembers: IndexedDataset | None = None) -> dict:
    """Every metric of the module docstring for ``state`` on ``task`` (see :class:`amnesiac.baselines.UnlearnTask`).

    ``reference`` is the retrained model's state (distances are skipped without it); ``attack`` a fitted shadow
    attack (skipped without it). ``member_sample`` caps the retained training samples used as known members.
    ``nonmembers``: the held-out samples the attacks are scored against; by default the ``attack_nonmembers`` part
    of :func:`amnesiac.attacks.held_out_split` of the test set, which :func:`fit_shadow_attack` never trains on.
    """
    model = task.model(state)
    classes = forget_classes_of(task)
    test = task.test_set
    retained = _fixed_sample(task.retained, member_sample, task.seed)
    out = {"test": accuracy(model, test, classes) if test is not None else None,
           "forget_set": accuracy(model, task.forget_set)["overall"] if len(task.forget_set) else float("nan"),
           "retained_train": accuracy(model, retained)["overall"],
           "forget_set_size": len(task.forget_set)}
    held = nonmembers
    if held is None and test is not None:
        held = held_out_split(test, seed=task.seed).attack_nonmembers
    if held is not None and len(task.forget_set):
        out["mia_loss"] = loss_attack_summary(model, task.forget_set, held, retained, seed=task.seed)
        if attack is not None:
            out["mia_shadow"] = shadow_attack_summary(attack, model, task.forget_set, held, seed=task.seed)
    if reference is not None:
        ref_model = task.model(reference)
        out["distance"] = {**weight_distance(state, reference),
                           **({"test_" + k: v for k, v in prediction_distance(model, ref_model, test).items()}
                              if test is not None else {}),
                           **{"forget_" + k: v for k, v in prediction_distance(model, ref_model,
                                                                               task.forget_set).items()}}
    return out


def storage(run) -> dict:
    """What the run's delta store costs on disk (from ``run.store.info()``)."""
    info = run.store.info()
    keys = ("steps", "codec", "lossy", "backend", "elements", "bytes_on_disk", "delta_bytes", "raw_fp32_bytes",
            "ratio", "codec_error")
    return {k: info.get(k) for k in keys}


def fit_shadow_attack(task, *, shadows: int = 4, classifier: str = "gbdt", seed: int | None = None) -> ShadowAttack:
    """Fit the shadow-model attack for ``task`` (:func:`amnesiac.attacks.fit_population_attack`): shadows drawn
    like the target's training set from its retained data plus the ``validation`` part of the test set, trained for
    the target's number of optimizer steps; :func:`evaluate` scores it on the disjoint ``attack_nonmembers`` part."""
    split = held_out_split(task.test_set, seed=task.seed)
    return fit_population_attack(task, split, shadows=shadows, classifier=classifier, seed=seed)


def json_ready(obj):
    """Replace NaN by None (strict JSON), recursively."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
