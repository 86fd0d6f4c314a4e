"""Deletion requests served in place (amnesiac.purge): composition, receipts, audit, exclusivity, fine-tune."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import amnesiac
from amnesiac.audit import audit
from amnesiac.cli import main as amnesiac_main
from amnesiac.receipts import state_sha256
from deltastore import DeltaStore, verify_store
from deltastore.fileio import atomic_write_json, crc32c, json_crc32c

def _load_small_runs():
    spec = importlib.util.spec_from_file_location("small_runs", Path(__file__).with_name("small_runs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_runs = _load_small_runs()
STEPS, flat, record, step_files = _runs.STEPS, _runs.flat, _runs.record, _runs.step_files


_slow = pytest.mark.slow  # every codec and both backends run in CI; the default run keeps one exact, one lossy
CASES = [("fp32", "zarr"), ("fp16", "safetensors"), pytest.param("fp16", "zarr", marks=_slow),
         pytest.param("bf16", "zarr", marks=_slow), pytest.param("topk:0.25", "zarr", marks=_slow),
         pytest.param("fp32", "safetensors", marks=_slow)]


@pytest.mark.parametrize("codec,backend", CASES)
def test_purges_compose_to_one_unlearn_of_the_union(tmp_path, codec, backend):
    run_dir = tmp_path / "run"
    record(run_dir, codec=codec, backend=backend)
    original = amnesiac.open_run(run_dir)
    a, b = [7], [501, 1202]  # 7 is in steps 2 and 9; 501 in step 5; 1202 in step 12
    expected = original.unlearn(sample_ids=a + b)
    moved = (flat(original.final_state()) - flat(original.start_state())).norm().item()
    stated = original.store.commit_record["codec_error"]

    first = amnesiac.purge(run_dir, sample_ids=a, request_id="A")
    assert first["undone_steps"] == [2, 9] and first["steps_after"] == STEPS - 2 and first["bytes_removed"] > 0
    second = amnesiac.purge(run_dir, sample_ids=b, request_id="B")
    assert second["undone_steps"] == [4, 10]  # steps 5 and 12, renumbered after the first purge
    run = amnesiac.open_run(run_dir)
    got = run.final_state()
    error = (flat(got) - flat(expected)).norm().item()
    if codec == "fp32":
        assert torch.allclose(flat(got), flat(expected), atol=1e-5)
    else:  # the same stored deltas, summed in another order: far inside the codec's stated error
        assert error <= (stated + 1e-5) * moved
    assert set(got) == set(expected) and all(got[k].dtype == expected[k].dtype for k in got)
    # the run is an ordinary run of the kept steps: steps, ledger, files and verify agree
    assert run.num_steps == STEPS - 4 and len(step_files(run_dir)) == run.num_steps * (
        len(run.store.codec.streams()) if backend == "zarr" else 1)
    assert not np.isin([7, 501, 1202, 500, 1200], run.sample_ids()).any()  # their batch-mates went with them
    assert run.steps_for(sample_ids=[1300]).tolist() == [run.num_steps - 1]
    report = verify_store(run.store)
    assert report["ok"], report["faults"]
    assert audit(run_dir, verify=True)["ok"]
    assert second["weights_sha256"] == state_sha256(got)
    assert second["codec"] == codec and second["lossy"] == (codec != "fp32")


def test_requests_already_served_unknown_ids_classes_and_duplicate_ids(tmp_path):
    run_dir = tmp_path / "run"
    record(run_dir)
    amnesiac.purge(run_dir, sample_ids=[7], request_id="r1")
    # 201 shared step 2 with id 7: already removed, so the request costs nothing but still gets its receipt
    again = amnesiac.purge(run_dir, sample_ids=[201], request_id="r2")
    assert again["steps_undone"] == 0 and again["already_removed_by"] == ["r1"]
    with pytest.raises(amnesiac.SelectionError, match="never appear"):
        amnesiac.purge(run_dir, sample_ids=[99999], request_id="r3")
    with pytest.raises(amnesiac.SelectionError, match="already served"):
        amnesiac.purge(run_dir, sample_ids=[300], request_id="r1")
    with pytest.raises(amnesiac.SelectionError, match="exactly one"):
        amnesiac.purge(run_dir, request_id="r4")
    by_class = amnesiac.purge(run_dir, classes=[2], request_id="r5")
    run = amnesiac.open_run(run_dir)
    assert by_class["steps_undone"] == STEPS - 2 and run.num_steps == 0
    with pytest.raises(amnesiac.SelectionError, match="never appear"):
        amnesiac.purge(run_dir, classes=[5], request_id="r6")
    report = audit(run_dir, verify=True)
    assert report["ok"], report["faults"]
    assert [r["request_id"] for r in report["receipts"]] == ["r1", "r2", "r5"]
    # every step undone: the final state is the start state again (exactly)
    assert torch.equal(flat(run.final_state()), flat(run.start_state()))


def test_audit_finds_altered_and_removed_receipts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    record(run_dir)
    for i, ids in enumerate(([7], [300], [1100])):
        amnesiac.purge(run_dir, sample_ids=ids, request_id=f"req-{i}")
    listed = json.loads(_cli(["audit", str(run_dir), "--json"], capsys, 0))
    assert [r["request_id"] for r in listed] == ["req-0", "req-1", "req-2"]
    assert all({"request_id", "steps_undone", "weights_sha256", "digest", "prev_digest"} <= set(r) for r in listed)
    assert "OK: 3 receipt(s)" in _cli(["audit", str(run_dir), "--verify"], capsys, 0)
    store = DeltaStore.open(run_dir)
    entry = store.commit_record["attachments"]["receipts"]
    file = store.data_dir / entry["file"]
    good = file.read_bytes()
    lines = good.splitlines(keepends=True)

    # 1. a receipt altered in place: the file's checksum and the receipt's digest both fail
    altered = json.loads(lines[1])
    altered["steps_undone"] = 0
    _replace(run_dir, file, lines[0] + (json.dumps(altered) + "\n").encode() + lines[2])
    out = _cli(["audit", str(run_dir), "--verify"], capsys, 1)
    assert "receipt 1 (request 'req-1') was altered" in out and "FAULT receipts file:" in out
    # 2. the middle receipt removed by someone who also fixed the commit file's checksum: the chain breaks
    _replace(run_dir, file, lines[0] + lines[2], fix_commit=True)
    out = _cli(["audit", str(run_dir), "--verify"], capsys, 1)
    assert "numbered 2, expected 1" in out and "prev_digest differs" in out
    # 3. the last receipt removed (commit file fixed too): the weights no longer match the last receipt
    _replace(run_dir, file, lines[0] + lines[1], fix_commit=True)
    out = _cli(["audit", str(run_dir), "--verify"], capsys, 1)
    assert "is not the one the last receipt (request 'req-1') states" in out
    # 4. the whole receipts file deleted
    _replace(run_dir, file, good, fix_commit=True)
    assert audit(run_dir, verify=True)["ok"]
    file.unlink()
    assert "missing" in _cli(["audit", str(run_dir), "--verify"], capsys, 1)
    # a run whose receipts do not verify takes no further request
    with pytest.raises(amnesiac.AmnesiacError, match="receipts"):
        amnesiac.purge(run_dir, sample_ids=[400], request_id="req-3")


def _cli(argv, capsys, status) -> str:
    assert amnesiac_main(argv) == status
    captured = capsys.readouterr()
    return captured.out + captured.err


def _replace(run_dir: Path, file: Path, data: bytes, *, fix_commit: bool = False) -> None:
    os.chmod(file, 0o644)
    file.unlink()  # hard links: never write through into an older generation's copy
    file.write_bytes(data)
    if fix_commit:
        commit = json.loads((run_dir / "commit.json").read_bytes())
        commit["attachments"]["receipts"].update(crc32c=crc32c(data), bytes=len(data))
        commit["crc32c"] = json_crc32c(commit)
        atomic_write_json(run_dir / "commit.json", commit, durable=False)


def test_a_live_recorder_or_an_incomplete_run_refuses_a_purge(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", durable=False)
    for t in range(3):
        rec.add_batch([t])
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
    rec.flush()
    with pytest.raises(amnesiac.RunBusyError, match="already being written by process"):
        amnesiac.purge(tmp_path / "run", sample_ids=[1])
    rec.close(finalize=False)
    with pytest.raises(amnesiac.AmnesiacError, match="incomplete run"):
        amnesiac.purge(tmp_path / "run", sample_ids=[1])
    with pytest.raises(amnesiac.RunNotFoundError):
        amnesiac.purge(tmp_path / "nothing", sample_ids=[1])


def test_recording_continues_in_the_purged_run_and_later_requests_undo_it(tmp_path):
    run_dir = tmp_path / "run"
    model = record(run_dir)
    amnesiac.purge(run_dir, sample_ids=[7], request_id="first")
    run = amnesiac.open_run(run_dir)
    model.load_state_dict(run.final_state())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    steps_before = run.num_steps
    with pytest.raises(amnesiac.ResumeError, match="final state"):
        amnesiac.Recorder(torch.nn.Sequential(*[type(m)(*_args(m)) for m in model]), opt, run_dir, reopen=True)
    with amnesiac.Recorder(model, opt, run_dir, reopen=True, request_id="first") as rec:
        for t in range(3):
            rec.add_batch([5000 + t, 101], labels=[0, 1])
            torch.nn.functional.cross_entropy(model(torch.randn(2, 5)), torch.tensor([0, 1])).backward()
            opt.step()
            opt.zero_grad()
    run = amnesiac.open_run(run_dir)
    assert run.complete and run.num_steps == steps_before + 3
    assert torch.equal(flat(run.final_state()), flat(model.state_dict()))
    report = audit(run_dir, verify=True)
    assert report["ok"], report["faults"]
    assert [(r["action"], r.get("steps_added")) for r in report["receipts"]] == [("purge", None), ("finetune", 3)]
    # 101 was in step 1 and in every fine-tune step: a later request undoes both
    expected = run.unlearn(sample_ids=[101])
    later = amnesiac.purge(run_dir, sample_ids=[101], request_id="second")
    assert later["undone_steps"] == [1] + list(range(steps_before, steps_before + 3))
    assert torch.allclose(flat(amnesiac.open_run(run_dir).final_state()), flat(expected), atol=1e-5)
    assert audit(run_dir, verify=True)["ok"]


def _args(m):
    return {torch.nn.Linear: lambda: (m.in_features, m.out_features), torch.nn.BatchNorm1d: lambda: (m.num_features,),
            torch.nn.ReLU: lambda: ()}[type(m)]()


def test_forget_purge_on_the_command_line_with_finetune(cli_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(cli_run, run_dir)
    before = amnesiac.open_run(run_dir).num_steps
    out = tmp_path / "w.safetensors"
    result = json.loads(_cli(["forget", "--run", str(run_dir), "--classes", "3", "--purge", "--request-id",
                              "dpo-1", "--out", str(out), "--finetune-epochs", "1", "--json"], capsys, 0))
    receipt = result["receipt"]
    assert receipt["request_id"] == "dpo-1" and 0 < receipt["steps_undone"] < before
    assert result["finetune"]["steps_added"] > 0 and out.is_file()
    run = amnesiac.open_run(run_dir)
    assert run.num_steps == before - receipt["steps_undone"] + result["finetune"]["steps_added"]
    # the fine-tune trained on the retained data only: class 3 never comes back into the ledger
    with pytest.raises(amnesiac.SelectionError, match="never appear"):
        run.steps_for(classes=[3])
    listed = json.loads(_cli(["audit", str(run_dir), "--json"], capsys, 0))
    assert [r["action"] for r in listed] == ["purge", "finetune"]
    assert listed[-1]["weights_sha256"] == state_sha256(run.final_state())
    assert "OK" in _cli(["audit", str(run_dir), "--verify"], capsys, 0)
    # careless input: one line, exit 2
    err = _cli(["forget", "--run", str(run_dir), "--steps", "1", "--purge"], capsys, 2)
    assert "--purge forgets samples or classes" in err and "Traceback" not in err
    assert "--out" in _cli(["forget", "--run", str(run_dir), "--samples", "1"], capsys, 2)
