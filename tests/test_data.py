"""Data loaders, and one end-to-end record + forget on real MNIST digits (../shared/data/mnist10k.npz)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import amnesiac
from amnesiac import DataError
from amnesiac.data import load_dataset
from amnesiac.models import build_model, model_spec
from amnesiac.training import accuracy, make_optimizer, train
from deltastore.verify import verify_store


def test_npz_loader_reads_the_real_mnist_subset(mnist10k):
    bundle = load_dataset("npz", path=mnist10k, seed=0)
    assert bundle.input_shape == (1, 28, 28) and bundle.num_classes == 10
    assert len(bundle.train) == 8000 and len(bundle.test) == 2000
    labels = torch.cat([bundle.train.labels, bundle.test.labels])
    # the class counts its README gives
    assert torch.bincount(labels).tolist() == [1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978]
    ids = torch.cat([bundle.train.ids, bundle.test.ids])
    assert torch.equal(ids.sort().values, torch.arange(10_000))  # one stable id per sample, no overlap
    again = load_dataset("npz", path=mnist10k, seed=0)
    assert torch.equal(again.train.ids, bundle.train.ids)  # the split is fixed by the seed


def test_loaders_name_the_remedy(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("npz", path=tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", pictures=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="'images' and 'labels'"):
        load_dataset("npz", path=tmp_path / "bad.npz")
    with pytest.raises(DataError, match="--download"):
        load_dataset("mnist", data_dir=tmp_path)  # nothing there, and no download allowed
    with pytest.raises(DataError, match="unknown data set"):
        load_dataset("imagenet")


def test_forgetting_a_digit_of_real_mnist(tmp_path, mnist10k):
    """The paper's setting in small: few threes, recorded with fp16, forgotten, checked, verified."""
    bundle = load_dataset("npz", path=mnist10k, seed=0)
    train_set = bundle.train.subset(torch.arange(len(bundle.train)) < 3000).keep_few_of_class(3, 20, seed=0)
    spec = model_spec("mlp", bundle.input_shape, bundle.num_classes)
    torch.manual_seed(0)
    model = build_model(spec)
    opt = make_optimizer(model, "adam", 1e-3)
    with amnesiac.Recorder(model, opt, tmp_path / "run", codec="fp16", durable=False) as rec:
        train(model, opt, train_set, epochs=3, batch_size=64, seed=0, recorder=rec)
    before = accuracy(model, bundle.test, [3])
    run = amnesiac.open_run(tmp_path / "run")
    undo = run.steps_for(classes=[3])
    assert 0 < len(undo) < run.num_steps
    model.load_state_dict(run.unlearn(classes=[3]))
    after = accuracy(model, bundle.test, [3])
    assert before["forgotten"] > 0.1  # twenty threes taught some of the class (24% here)
    assert after["forgotten"] < before["forgotten"] / 2  # undone (0% here)
    assert after["retained"] > 0.7
    assert verify_store(run.store)["ok"]
    assert run.store.info()["ratio"] < 0.45  # fp16 on real deltas: about half of raw fp32, or less
