"""Selective recording (Recorder(deletable=...)): only steps that saw a deletable sample store a delta, unlearning
those samples gives exactly what a full recording of the same training gives, and the rest is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import amnesiac
from amnesiac import IsolatingBatchSampler, RecorderError, ResumeError, SelectionError
from deltastore import DeltaStore, StepSelectionError, verify_store

N, BATCH, STEPS_PER_EPOCH = 96, 8, 12
DELETABLE = [3, 40, 41, 77]


def _train(run_dir, *, deletable=None, codec="fp32", backend="zarr", epochs=2, sampler=None):
    """The same training every call: a BatchNorm MLP on fixed random data, batches from a seeded permutation."""
    torch.manual_seed(0)
    x, y = torch.randn(N, 6), torch.randint(0, 3, (N,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, 3))
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(1)
    with amnesiac.Recorder(model, opt, run_dir, codec=codec, backend=backend, durable=False,
                           deletable=deletable) as rec:
        for epoch in range(epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
                batches = list(sampler)
            else:
                batches = torch.randperm(N, generator=gen).view(-1, BATCH).tolist()
            for ids in batches:
                rec.add_batch(ids, labels=y[ids])
                torch.nn.functional.cross_entropy(model(x[ids]), y[ids]).backward()
                opt.step()
                opt.zero_grad()
    return amnesiac.open_run(run_dir)


@pytest.mark.parametrize("backend", ["safetensors"])
def test_selective_equals_full_on_deletable_ids(tmp_path, backend):
    full = _train(tmp_path / "full", backend=backend)
    sel = _train(tmp_path / "sel", deletable=np.array(DELETABLE), backend=backend)
    assert sel.num_steps == full.num_steps == 2 * STEPS_PER_EPOCH
    want, got = full.final_state(), sel.final_state()
    assert all(torch.equal(want[k], got[k]) for k in want)        # the recording does not change the training
    stored = sel.store.stored_mask
    expected = np.zeros(sel.num_steps, bool)
    expected[full.steps_for(sample_ids=DELETABLE)] = True
    assert np.array_equal(stored, expected) and 0 < stored.sum() < sel.num_steps
    for ids in ([3], [40, 41], DELETABLE):
        np.testing.assert_array_equal(sel.steps_for(sample_ids=ids), full.steps_for(sample_ids=ids))
        want, got = full.unlearn_report(sample_ids=ids), sel.unlearn_report(sample_ids=ids)
        assert want.plan == got.plan == "final-minus-selected"
        assert got.steps_read == want.steps_read
        for k in want.state:
            assert torch.equal(want.state[k], got.state[k]), k  # fp32: bit for bit the same
    # the ledger still lists every step's samples
    np.testing.assert_array_equal(sel.sample_ids(), np.arange(N))
    for t in range(sel.num_steps):
        np.testing.assert_array_equal(sel.samples_of_step(t), full.samples_of_step(t))


def test_selective_refuses_what_it_cannot_undo(tmp_path):
    sel = _train(tmp_path / "sel", deletable=lambda i: i in DELETABLE, epochs=1)
    assert sel.selective and sel.spec["deletable"]["rule"] == "callable"
    other = next(i for i in range(N) if i not in DELETABLE and
                 not np.isin(sel.steps_for(sample_ids=[i]), np.flatnonzero(sel.store.stored_mask)).all())
    with pytest.raises(SelectionError, match=rf"\[{other}\].*not declared deletable"):
        sel.unlearn(sample_ids=[3, other])
    partner = int(next(i for i in sel.samples_of_step(int(sel.steps_for(sample_ids=[3])[0])) if i != 3))
    with pytest.raises(SelectionError, match="not declared deletable"):  # its step is stored, still not declared
        sel.unlearn(sample_ids=[partner])
    with pytest.raises(SelectionError, match="not stored"):
        sel.unlearn(classes=[0])
    unstored = int(np.flatnonzero(~sel.store.stored_mask)[0])
    with pytest.raises(SelectionError, match="not stored"):
        sel.unlearn(steps=[unstored])
    with pytest.raises(StepSelectionError, match="not stored"):
        sel.store.sum_steps([unstored])


def test_verify_info_and_cli_on_a_selective_run(tmp_path):
    sel = _train(tmp_path / "sel", deletable=DELETABLE, codec="fp16")
    store = DeltaStore.open(tmp_path / "sel")
    report = verify_store(store)
    assert report["ok"] and report["stored_steps"] == int(store.stored_mask.sum()) < store.num_steps
    assert "not checkable" in report["reconstruction"]
    info = store.info()
    assert info["steps"] == sel.num_steps and info["stored_steps"] == report["stored_steps"]
    assert info["raw_fp32_bytes"] == info["stored_steps"] * info["elements"] * 4
    out = subprocess.run([sys.executable, "-m", "deltastore.cli", "info", str(tmp_path / "sel")], capture_output=True,
                         text=True, check=True).stdout
    assert f"{info['steps']} steps ({info['stored_steps']} stored" in out
    # a damaged stored step is still found
    shard = next(p for p in (tmp_path / "sel" / "deltas").rglob("*") if p.is_file() and p.name == "0")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert not verify_store(DeltaStore.open(tmp_path / "sel"))["ok"]


def test_isolating_sampler_stores_few_steps(tmp_path):
    sampler = IsolatingBatchSampler(N, DELETABLE, BATCH, seed=3)
    sel = _train(tmp_path / "sel", deletable=DELETABLE, sampler=sampler)
    assert int(sel.store.stored_mask.sum()) == 2          # one batch of deletable samples per epoch
    assert sel.unlearn_report(sample_ids=DELETABLE).steps_undone.size == 2


def test_selective_resume_needs_a_checkpoint_and_the_same_declaration(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run_dir, ckpt = tmp_path / "run", tmp_path / "ckpt.safetensors"
    rec = amnesiac.Recorder(model, opt, run_dir, durable=False, deletable=[1])
    for step in range(4):
        rec.add_batch([step])
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        opt.zero_grad()
        if step == 1:
            rec.checkpoint(ckpt)
    rec.close(finalize=False)
    with pytest.raises(ResumeError, match="checkpoint"):
        amnesiac.Recorder(model, opt, run_dir, resume=True, deletable=[1])
    with pytest.raises(ResumeError, match="same deletable"):
        amnesiac.Recorder(model, opt, run_dir, resume=True, checkpoint=ckpt)
    with pytest.raises(ResumeError, match="not the declaration"):
        amnesiac.Recorder(model, opt, run_dir, resume=True, checkpoint=ckpt, deletable=[2])
    with pytest.raises(SelectionError, match="not closed"):
        amnesiac.open_run(run_dir).unlearn(sample_ids=[1])
    rec = amnesiac.Recorder(model, opt, run_dir, resume=True, checkpoint=ckpt, deletable=[1])
    assert rec.steps_submitted == 2
    rec.close()
    assert amnesiac.open_run(run_dir).store.stored_mask.tolist() == [False, True]


def test_bad_deletable_is_named(tmp_path):
    with pytest.raises(RecorderError, match="deletable"):
        amnesiac.Recorder(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                          tmp_path / "r", deletable=[0.5])
