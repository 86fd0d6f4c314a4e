"""Metrics and attacks: accuracy splits, distances, and membership inference that can tell members apart."""

from __future__ import annotations

import math

import pytest
import torch

from amnesiac.data import load_dataset
from amnesiac.evaluation import json_ready, prediction_distance, weight_distance
from amnesiac.mia import ShadowAttack, loss_attack
from amnesiac.models import mlp
from amnesiac.training import make_optimizer, train


def _trainer(shape, epochs):
    def fit(data, seed):
        torch.manual_seed(seed)
        model = mlp(shape, 10, hidden=(128,))
        train(model, make_optimizer(model, "adam", 3e-3), data, epochs=epochs, batch_size=32, seed=seed)
        return model
    return fit


@pytest.fixture(scope="module")
def overfit():
    """A model overfitted to 300 very noisy synthetic samples (it memorises them: 100% on members, ~50% on the
    rest), so membership is visible; members and non-members share the classes."""
    bundle = load_dataset("synthetic", size=1500, seed=1)
    g = torch.Generator().manual_seed(3)
    for part in (bundle.train, bundle.test):
        part.images = part.images + 4.0 * torch.randn(part.images.shape, generator=g)
    members = bundle.train.sample(300, seed=0)
    nonmembers = bundle.train.without_ids(members.ids.numpy())
    fit = _trainer(bundle.input_shape, 30)
    return bundle, fit(members, 0), members, nonmembers, fit


def test_loss_attack_separates_members_from_nonmembers(overfit):
    bundle, model, members, nonmembers, _ = overfit
    r = loss_attack(model, members.sample(100, 1), nonmembers, members)
    assert r["auc"] > 0.8 and 0 <= r["recall"] <= 1
    # a fresh, untrained model gives the attack nothing to go on
    torch.manual_seed(5)
    blank = mlp(bundle.input_shape, 10, hidden=(128,))
    assert abs(loss_attack(blank, members.sample(100, 1), nonmembers, members)["auc"] - 0.5) < 0.15


def test_shadow_attack_calls_members_members(overfit):
    bundle, model, members, nonmembers, fit = overfit
    attack = ShadowAttack.fit(bundle.test, fit, num_classes=10, shadows=1, seed=0, classifier="logistic")
    assert set(attack.attackers) == set(range(10))
    r = attack.evaluate(model, members.sample(150, 2), nonmembers)
    assert r["recall"] > r["nonmember_false_positive_rate"]
    assert r["auc"] > 0.7


def test_distances():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    d = weight_distance(a.state_dict(), b.state_dict())
    diff = torch.cat([(a.weight - b.weight).flatten(), a.bias - b.bias])
    assert d["weights_l2"] == pytest.approx(diff.norm().item(), rel=1e-5)
    bundle = load_dataset("synthetic", size=200)
    model = mlp(bundle.input_shape, 10)
    same = prediction_distance(model, model, bundle.test)
    assert same["agreement"] == 1.0 and abs(same["kl"]) < 1e-6
    other = prediction_distance(mlp(bundle.input_shape, 10), model, bundle.test)
    assert other["kl"] > 0 and other["agreement"] < 1.0


def test_json_ready_replaces_nan():
    assert json_ready({"a": [1.0, float("nan")], "b": {"c": math.nan}}) == {"a": [1.0, None], "b": {"c": None}}
