"""U-LiRA: the per-example game on synthetic scores with known answers (the smoke run is in test_experiments)."""

from __future__ import annotations

import numpy as np
import torch

from amnesiac.experiments.ulira import attack_method, logit_confidence


def _arrays(shift: float, runs: int = 64, examples: int = 40, seed: int = 0):
    """phi for a trained model, a retrained reference and a method whose scores on forgotten examples sit
    ``shift`` above what retraining gives."""
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 2, examples)                    # per-example difficulty
    in_train = rng.random((runs, examples)) < 0.5
    forgot = in_train & (rng.random((runs, examples)) < 0.4)
    original = base + 3 * in_train + rng.normal(0, 0.5, (runs, examples))
    reference = base + rng.normal(0, 0.5, (runs, examples))
    method = base + shift * forgot + rng.normal(0, 0.5, (runs, examples))
    return method, reference, original, in_train, forgot, np.arange(examples) < 4


def test_exact_unlearning_scores_about_half_and_leaky_unlearning_scores_high():
    same = attack_method(*_arrays(0.0, seed=1))["all"]
    leaky = attack_method(*_arrays(2.0))["all"]
    assert 0.4 < same["accuracy"] < 0.6 and same["accuracy_ci95"][0] < 0.5 < same["accuracy_ci95"][1]
    assert leaky["accuracy"] > 0.85 and leaky["tpr_at_1pct_fpr"] > 0.3
    assert attack_method(*_arrays(2.0))["atypical"]["examples"] <= 4


def test_logit_confidence_is_stable_for_confident_logits():
    phi = logit_confidence(torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0, 2]))
    assert abs(phi[0].item() - (60 - np.log(2))) < 1e-4 and abs(phi[1].item() - np.log(1 / 2)) < 1e-6
