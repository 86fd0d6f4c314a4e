"""Bad input gets one clear error naming the remedy, and nothing is written or lost."""

from __future__ import annotations

import os

import pytest
import torch

import amnesiac
from amnesiac import ModelMismatchError, RunExistsError, RunNotFoundError
from deltastore import DeltaStore, StoreLockedError, UnknownCodecError


def record(tmp_path, steps=2):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, tmp_path / "run", durable=False) as rec:
        for i in range(steps):
            rec.add_batch([i], labels=[i % 2])
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
    return model


def snapshot(path):
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


def test_unknown_codec_writes_nothing(tmp_path):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UnknownCodecError, match="topk:0.01"):
        amnesiac.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", codec="int3")
    assert not (tmp_path / "run").exists()


def test_existing_run_is_refused_and_untouched(tmp_path):
    record(tmp_path)
    before = snapshot(tmp_path / "run")
    model = torch.nn.Linear(3, 2)
    with pytest.raises(RunExistsError, match="already holds a run"):
        amnesiac.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run")
    assert snapshot(tmp_path / "run") == before
    assert amnesiac.open_run(tmp_path / "run").num_steps == 2


def test_not_a_run(tmp_path):
    with pytest.raises(RunNotFoundError, match="not a delta store or run directory"):
        amnesiac.open_run(tmp_path)
    with pytest.raises(FileNotFoundError):
        amnesiac.open_run(tmp_path / "nowhere")


def test_model_that_does_not_match(tmp_path):
    record(tmp_path)
    run = amnesiac.open_run(tmp_path / "run")
    with pytest.raises(ModelMismatchError, match="same model architecture"):
        run.check_model(torch.nn.Linear(4, 2))
    with pytest.raises(ModelMismatchError):
        run.load_into(torch.nn.Linear(4, 2), run.final_state())


def test_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    store = DeltaStore.create(tmp_path / "s", {"w": torch.zeros(4)}, durable=False)
    with pytest.raises(StoreLockedError, match="already being written"):
        DeltaStore.open(tmp_path / "s", writable=True)
    store.close()
    # a lock left by a process that no longer exists is stale
    (tmp_path / "s" / "writer.lock").write_text('{"pid": %d, "host": "%s"}' % (2 ** 22 + 17, os.uname().nodename))
    again = DeltaStore.open(tmp_path / "s", writable=True)
    again.append_delta(torch.ones(4))
    again.close()
    assert DeltaStore.open(tmp_path / "s").num_steps == 1


def test_malformed_ids_are_rejected(tmp_path):
    model = torch.nn.Linear(3, 2)
    rec = amnesiac.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "run", durable=False)
    with pytest.raises(amnesiac.RecorderError, match="integers"):
        rec.add_batch([0.5, 1.5])
    with pytest.raises(amnesiac.RecorderError, match="labels"):
        rec.add_batch([1, 2], labels=[0])
    rec.close()
