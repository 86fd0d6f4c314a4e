"""Properties of amnesiac.IsolatingBatchSampler, checked with hypothesis over sizes, deletable sets and options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import amnesiac
from amnesiac import IsolatingBatchSampler


@st.composite
def setups(draw):
    n = draw(st.integers(0, 300))
    deletable = draw(st.lists(st.integers(0, max(n - 1, 0)), unique=True, max_size=n)) if n else []
    batch = draw(st.integers(1, 40))
    per_batch = draw(st.one_of(st.none(), st.integers(1, batch)))
    return n, deletable, batch, per_batch, draw(st.integers(0, 2 ** 31)), draw(st.booleans())


@settings(max_examples=150, deadline=None)
@given(setups(), st.integers(0, 5))
def test_every_index_once_and_deletable_ones_isolated(setup, epoch):
    n, deletable, batch, per_batch, seed, drop_last = setup
    sampler = IsolatingBatchSampler(n, deletable, batch, seed=seed, drop_last=drop_last, per_batch=per_batch)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = [i for b in batches for i in b]
    assert len(seen) == len(set(seen))                     # nothing twice
    assert all(1 <= len(b) <= batch for b in batches)
    dset = set(deletable)
    assert dset <= set(seen)                               # every deletable sample is trained on, even with drop_last
    missing = set(range(n)) - set(seen)
    if drop_last:
        assert len(missing) < batch and not (missing & dset)
        assert all(len(b) == batch for b in batches if not set(b) & dset)
    else:
        assert not missing                                 # every index exactly once
    k = batch if per_batch is None else per_batch
    holding = [b for b in batches if set(b) & dset]
    assert len(holding) == math.ceil(len(deletable) / k) == sampler.deletable_batches
    assert all(len(set(b) & dset) <= k for b in holding)
    # a batch holding deletable samples is filled up with others while there are any left to fill it with
    if n - len(deletable) >= len(holding) * batch - len(deletable):
        assert all(len(b) == batch for b in holding)


@settings(max_examples=50, deadline=None)
@given(setups())
def test_same_seed_and_epoch_same_batches(setup):
    n, deletable, batch, per_batch, seed, drop_last = setup
    a = IsolatingBatchSampler(n, deletable, batch, seed=seed, drop_last=drop_last, per_batch=per_batch)
    b = IsolatingBatchSampler(n, deletable, batch, seed=seed, drop_last=drop_last, per_batch=per_batch)
    a.set_epoch(3), b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == list(a)                              # iterating again repeats the epoch


def test_new_epoch_new_order_and_deletable_batches_move():
    sampler = IsolatingBatchSampler(1000, list(range(0, 1000, 50)), 10, seed=7)
    orders, positions = [], []
    for epoch in range(6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        orders.append(batches)
        positions.append(tuple(i for i, b in enumerate(batches) if any(x % 50 == 0 for x in b)))
    assert len({str(o) for o in orders}) == 6
    assert len(set(positions)) > 1                         # the deletable batches are not always in the same place
    assert all(len(p) == 2 for p in positions)             # 20 deletable samples, batch 10: two batches


def test_spread_option_puts_k_per_batch():
    deletable = list(range(30))
    sampler = IsolatingBatchSampler(600, deletable, 20, per_batch=3, seed=1)
    holding = [b for b in sampler if set(b) & set(deletable)]
    assert len(holding) == 10 and all(len(set(b) & set(deletable)) == 3 and len(b) == 20 for b in holding)


def test_works_as_a_dataloader_batch_sampler():
    data = torch.utils.data.TensorDataset(torch.arange(103))
    sampler = IsolatingBatchSampler(103, [5, 17, 80], 8, seed=2)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    got = torch.cat([x for (x,) in loader])
    assert sorted(got.tolist()) == list(range(103)) and len(loader) == len(sampler)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_samples=10, deletable=[10], batch_size=2), "outside range"),
    (dict(num_samples=10, deletable=[-1], batch_size=2), "outside range"),
    (dict(num_samples=10, deletable=[1, 1], batch_size=2), "repeat"),
    (dict(num_samples=10, deletable=[1], batch_size=0), "batch_size"),
    (dict(num_samples=10, deletable=[1], batch_size=4, per_batch=5), "per_batch"),
    (dict(num_samples=10, deletable=[1.5], batch_size=4), "integers"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        IsolatingBatchSampler(**kwargs)


def test_exported():
    assert "IsolatingBatchSampler" in amnesiac.__all__
