"""How well a model forgot: accuracy splits, membership inference, distance to the retrained model, storage.

:func:`evaluate` measures one set of weights for one :class:`~amnesiac.baselines.UnlearnTask`:

- ``test``: test accuracy overall, on the forgotten classes and on the retained ones (NaN where a split is empty);
- ``forget_set``: accuracy on the forget set itself (training samples the model should no longer fit);
- ``retained_train``: accuracy on (a fixed sample of) the retained training data;
- ``mia_loss``: the loss-threshold attack (:func:`amnesiac.mia.loss_attack`): recall on the forget set and AUC;
- ``mia_shadow``: the paper's shadow-model attack, when a fitted :class:`~amnesiac.mia.ShadowAttack` is given;
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

from .data import IndexedDataset
from .mia import ShadowAttack, loss_attack
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
             attack: ShadowAttack | None = None, member_sample: int = 2000) -> dict:
    """Every metric of the module docstring for ``state`` on ``task`` (see :class:`amnesiac.baselines.UnlearnTask`).

    ``reference`` is the retrained model's state (distances are skipped without it); ``attack`` a fitted shadow
    attack (skipped without it). ``member_sample`` caps the retained training samples used as known members.
    """
    model = task.model(state)
    classes = forget_classes_of(task)
    test = task.test_set
    retained = _fixed_sample(task.retained, member_sample, task.seed)
    out = {"test": accuracy(model, test, classes) if test is not None else None,
           "forget_set": accuracy(model, task.forget_set)["overall"] if len(task.forget_set) else float("nan"),
           "retained_train": accuracy(model, retained)["overall"],
           "forget_set_size": len(task.forget_set)}
    if test is not None and len(task.forget_set):
        out["mia_loss"] = loss_attack(model, task.forget_set, test, retained)
        if attack is not None:
            out["mia_shadow"] = attack.evaluate(model, task.forget_set, test)
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


def fit_shadow_attack(task, pool: IndexedDataset | None = None, *, shadows: int = 4, epochs: int | None = None,
                      classifier: str = "gbdt", seed: int | None = None) -> ShadowAttack:
    """Fit the paper's shadow-model attack for ``task``: shadows of the run's architecture, trained with the run's
    optimizer, learning rate, batch size and epochs on halves of ``pool`` (default: the test set, which the target
    never saw)."""
    from .models import build_model
    from .training import make_optimizer, train
    pool = task.test_set if pool is None else pool
    epochs = task.epochs if epochs is None else epochs

    def train_shadow(data: IndexedDataset, shadow_seed: int) -> torch.nn.Module:
        torch.manual_seed(shadow_seed)
        model = build_model(task.model_spec)
        train(model, make_optimizer(model, task.optimizer, task.lr), data, epochs=epochs,
              batch_size=task.batch_size, seed=shadow_seed)
        return model

    return ShadowAttack.fit(pool, train_shadow, num_classes=int(task.model_spec["num_classes"]), shadows=shadows,
                            seed=task.seed if seed is None else seed, classifier=classifier)


def json_ready(obj):
    """Replace NaN by None (strict JSON), recursively."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
