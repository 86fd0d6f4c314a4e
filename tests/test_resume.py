"""Recorder(..., resume=True): continue an incomplete run so that the deltas still add up to the model's state."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import amnesiac
from amnesiac.errors import ResumeError
from deltastore import StoreLockedError
from deltastore.verify import verify_store


def make(seed=0, optimizer="adam"):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3))
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.0 if optimizer == "sgd" else 0.9))
    return model, opt


def step(rec, model, opt, t):
    g = torch.Generator().manual_seed(t)
    x, y = torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)
    rec.add_batch(torch.arange(6) + 6 * t, labels=y)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def record(run_dir, steps, *, codec="fp32", optimizer="adam", checkpoints=None, finalize=True):
    model, opt = make(optimizer=optimizer)
    rec = amnesiac.Recorder(model, opt, run_dir, codec=codec, durable=False, chunk_elems=32)
    for t in range(steps):
        step(rec, model, opt, t)
        if checkpoints and t + 1 in checkpoints:
            assert rec.checkpoint(checkpoints[t + 1]) == t + 1
    rec.close(finalize=finalize)
    return model


def same_runs(a, b, exact):
    ra, rb = amnesiac.open_run(a), amnesiac.open_run(b)
    assert ra.num_steps == rb.num_steps and ra.complete and rb.complete
    for t in range(ra.num_steps):
        assert np.array_equal(ra.samples_of_step(t), rb.samples_of_step(t))
        da, db = ra.store.read_step(t), rb.store.read_step(t)
        assert torch.equal(da, db) if exact else torch.allclose(da, db, atol=1e-6)
    for k, v in ra.final_state().items():
        if exact:
            assert torch.equal(v, rb.final_state()[k])
        elif v.is_floating_point():  # integer buffers (num_batches_tracked) are not recorded as deltas
            assert torch.allclose(v, rb.final_state()[k], atol=1e-5)
    assert verify_store(ra.store)["ok"] and verify_store(rb.store)["ok"]


@pytest.mark.parametrize("codec", ["fp32", "fp16", "topk:0.3"])
def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path, codec):
    record(tmp_path / "plain", 10, codec=codec)
    ckpt = tmp_path / "ckpt.safetensors"
    record(tmp_path / "run", 7, codec=codec, checkpoints={4: ckpt}, finalize=False)  # "crash" after step 7
    model, opt = make(seed=123)  # a fresh process: other weights until the checkpoint is loaded
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=ckpt)
    assert rec.steps_submitted == 4  # steps 4..6 were dropped: training repeats them from the checkpoint
    assert amnesiac.open_run(tmp_path / "run").num_steps == 4
    for t in range(4, 10):
        step(rec, model, opt, t)
    rec.close()
    same_runs(tmp_path / "plain", tmp_path / "run", exact=True)


def test_resume_without_checkpoint_from_the_last_committed_state(tmp_path):
    record(tmp_path / "plain", 8, optimizer="sgd")
    record(tmp_path / "run", 5, optimizer="sgd", finalize=False)
    model, opt = make(seed=7, optimizer="sgd")
    model.load_state_dict(amnesiac.open_run(tmp_path / "run").final_state())  # theta_0 + committed deltas
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", resume=True)
    assert rec.steps_submitted == 5
    for t in range(5, 8):
        step(rec, model, opt, t)
    rec.close()
    same_runs(tmp_path / "plain", tmp_path / "run", exact=False)  # final_state() is a float32 sum, not bitwise


def test_a_model_that_is_not_at_the_committed_step_is_refused_and_nothing_changes(tmp_path):
    record(tmp_path / "run", 4, finalize=False)
    model, opt = make(seed=5)
    with pytest.raises(ResumeError, match="not at committed step 4"):
        amnesiac.Recorder(model, opt, tmp_path / "run", resume=True)
    run = amnesiac.open_run(tmp_path / "run")
    assert run.num_steps == 4 and not run.complete
    model.load_state_dict(run.final_state())  # the lock was released: a correct resume works
    amnesiac.Recorder(model, opt, tmp_path / "run", resume=True).close()
    assert amnesiac.open_run(tmp_path / "run").complete


def test_lossy_runs_resume_only_from_checkpoints(tmp_path):
    record(tmp_path / "run", 3, codec="fp16", finalize=False)
    model, opt = make()
    with pytest.raises(ResumeError, match="checkpoint"):
        amnesiac.Recorder(model, opt, tmp_path / "run", resume=True)


def test_checkpoints_from_another_run_or_an_abandoned_history_are_refused(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    record(tmp_path / "other", 3, checkpoints={2: tmp_path / "other.safetensors"}, finalize=False)
    record(tmp_path / "run", 8, checkpoints={3: a, 6: b}, finalize=False)
    model, opt = make()
    with pytest.raises(ResumeError, match="another run"):
        amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=tmp_path / "other.safetensors")
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=a)  # back to step 3
    step(rec, model, opt, 3)
    rec.close(finalize=False)
    with pytest.raises(ResumeError, match="taken at step 6"):
        amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=b)


def test_damaged_checkpoint_and_complete_run_and_live_writer_are_refused(tmp_path):
    ckpt = tmp_path / "c.safetensors"
    record(tmp_path / "run", 3, checkpoints={2: ckpt}, finalize=False)
    data = bytearray(ckpt.read_bytes())
    data[-3] ^= 0x10
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    model, opt = make()
    with pytest.raises(ResumeError, match="crc32c"):
        amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=bad)
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=ckpt)
    with pytest.raises(StoreLockedError):
        amnesiac.Recorder(*make(), tmp_path / "run", resume=True, checkpoint=ckpt)
    rec.close()
    with pytest.raises(amnesiac.RecorderError, match="complete run"):
        amnesiac.Recorder(model, opt, tmp_path / "run", resume=True, checkpoint=ckpt)
    with pytest.raises(amnesiac.RunExistsError, match="resume=True"):
        amnesiac.Recorder(model, opt, tmp_path / "run")
