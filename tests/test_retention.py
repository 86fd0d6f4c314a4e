"""deltastore gc: folding old steps into the start state keeps verify passing and refuses what it folded."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import amnesiac
from deltastore import DeltaStore, StoreLockedError, folded_metadata, verify_store
from deltastore.cli import main as deltastore_main
from deltastore.retention import gc

def _load_small_runs():
    spec = importlib.util.spec_from_file_location("small_runs", Path(__file__).with_name("small_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
_runs = _load_small_runs()
STEPS, flat, record, step_files = _runs.STEPS, _runs.flat, _runs.record, _runs.step_files


@pytest.mark.parametrize("codec,backend", [("fp32", "zarr"),
                                           pytest.param("fp16", "safetensors", marks=pytest.mark.slow),
                                           pytest.param("topk:0.25", "zarr", marks=pytest.mark.slow)])
def test_gc_folds_old_steps_and_refuses_to_unlearn_them(tmp_path, codec, backend):
    run_dir = tmp_path / "run"
    record(run_dir, codec=codec, backend=backend)
    original = amnesiac.open_run(run_dir)
    expected = original.unlearn(sample_ids=[1200])  # step 12: kept
    moved = (flat(original.final_state()) - flat(original.start_state())).norm().item()
    files_before = len(step_files(run_dir))
    report = gc(run_dir, before_step=6)
    assert report["steps_folded"] == 6 and report["steps_after"] == STEPS - 6 and report["bytes_freed"] > 0
    assert len(step_files(run_dir)) == files_before * (STEPS - 6) // STEPS
    run = amnesiac.open_run(run_dir)
    assert run.num_steps == STEPS - 6 and run.steps_for(sample_ids=[1200]).tolist() == [6]
    assert verify_store(run.store)["ok"], verify_store(run.store)["faults"]
    got = run.unlearn(sample_ids=[1200])
    assert (flat(got) - flat(expected)).norm().item() <= 1e-5 * max(1.0, moved)
    # the ledger says what was folded, and both unlearn and purge refuse it by name
    assert folded_metadata(run.store)["ids"].values.min() == 0
    with pytest.raises(amnesiac.SelectionError, match=r"sample id\(s\) \[7\].*folded into the start state"):
        run.unlearn(sample_ids=[7])  # step 2 (folded) and step 9 (kept): partly undoable is not undoable
    with pytest.raises(amnesiac.SelectionError, match="folded"):
        amnesiac.purge(run_dir, sample_ids=[300])
    with pytest.raises(amnesiac.SelectionError, match=r"class\(es\) \[1\]"):
        run.steps_for(classes=[1])
    # a purge of kept samples after gc still composes with what unlearn gives
    amnesiac.purge(run_dir, sample_ids=[1200], request_id="after-gc")
    assert (flat(amnesiac.open_run(run_dir).final_state()) - flat(expected)).norm().item() <= 1e-5 * max(1, moved)


def test_gc_on_the_command_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    record(run_dir)  # epochs 0..2: steps 0-4, 5-9, 10-13
    assert deltastore_main(["gc", str(run_dir), "--keep-last-epochs", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps_folded"] == 5 and report["bytes_on_disk"] < report["bytes_on_disk_before"]
    assert deltastore_main(["info", str(run_dir), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["folded_steps"] == 5 and info["steps"] == STEPS - 5
    assert deltastore_main(["verify", str(run_dir)]) == 0
    capsys.readouterr()
    # nothing more to fold: still a success, nothing changes
    assert deltastore_main(["gc", str(run_dir), "--keep-last-epochs", "5"]) == 0
    assert "folded 0 of 9" in capsys.readouterr().out
    for argv, message in ((["--before-step", "99"], "from 0 to 9"), (["--keep-last-epochs", "0"], "positive")):
        assert deltastore_main(["gc", str(run_dir), *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    # a live writer holds the lock: gc refuses with the writer's name
    model = torch.nn.Linear(2, 2)
    rec = amnesiac.Recorder(model, torch.optim.SGD(model.parameters(), lr=0.1), tmp_path / "live", durable=False)
    with pytest.raises(StoreLockedError, match="already being written"):
        gc(tmp_path / "live", before_step=0)
    assert deltastore_main(["gc", str(tmp_path / "live"), "--before-step", "0"]) == 2
    rec.close()
    assert np.array_equal(DeltaStore.open(run_dir).metadata()["epoch"].values, np.repeat([1, 2], [5, 4]))
