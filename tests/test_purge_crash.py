"""A purge or gc interrupted at any moment leaves the run before or after it, never between.

The SIGKILL stress (``benchmarks/purge_crash.py``: forked children killed at random moments, 20 kills here) runs in
its own process, so that forking happens where torch never started a thread pool. The fault-injection test makes
every file operation of a purge fail in turn, in this process, and checks the same promise deterministically.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import amnesiac
import deltastore.generation
import deltastore.rewrite
import deltastore.store
from amnesiac.audit import audit
from amnesiac.receipts import state_sha256
from deltastore import stale_files

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("codec,backend", [("fp32", "zarr"), ("fp16", "safetensors")])
def test_sigkill_during_purges_and_gc_leaves_the_run_before_or_after(tmp_path, codec, backend):
    kills = int(os.environ.get("AMNESIAC_PURGE_KILLS", "20"))
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "purge_crash.py"), "--kills", str(kills),
                           "--codec", codec, "--backend", backend, "--json", str(tmp_path / "figures.json")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["kills"] == kills
    # kills landed both before an operation committed and after: the "between" case had chances to show up
    assert len(figures["landed_before_or_after"]) >= 2


def _record(path):
    import torch
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, path, durable=False) as rec:
        for t in range(8):
            rec.add_batch([2 * t, 2 * t + 1])
            model(torch.randn(2, 6)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()


def _state(path):
    run = amnesiac.open_run(path)
    return run.num_steps, state_sha256(run.final_state()), len(audit(path)["receipts"])


class Boom(Exception):
    pass


def test_a_purge_failing_at_any_file_operation_leaves_the_run_before_or_after(tmp_path, monkeypatch):
    """Every file operation of a purge fails in turn (as a crash there would stop it): before the switch the run
    is as it was, from the switch on it is purged; what was left behind is removed by the next purge."""
    run = tmp_path / "run"
    _record(run)
    before = _state(run)
    amnesiac.purge(run, sample_ids=[5], request_id="probe")
    after = _state(run)
    import shutil
    targets = [(deltastore.rewrite, "_link_or_copy"), (deltastore.rewrite, "atomic_write_bytes"),
               (deltastore.rewrite, "atomic_write_json"), (deltastore.rewrite, "remove_stale"),
               (deltastore.generation, "atomic_write_bytes"), (deltastore.store, "write_snapshot"),
               (deltastore.rewrite.shutil, "copyfile")]
    seen_before = seen_after = 0
    for k in range(1, 200):
        shutil.rmtree(run)
        _record(run)
        calls = [0]
        with monkeypatch.context() as m:
            for module, name in targets:
                real = getattr(module, name)

                def failing(*a, _real=real, **kw):
                    calls[0] += 1
                    if calls[0] == k:
                        raise Boom(f"injected failure at file operation {k}")
                    return _real(*a, **kw)
                m.setattr(module, name, failing)
            try:
                amnesiac.purge(run, sample_ids=[5], request_id="probe")
                completed = True
            except Boom:
                completed = False
        state = _state(run)
        assert state in (before, after), f"operation {k}: the run is between before and after"
        assert not audit(run, verify=True)["faults"] or stale_files(run, amnesiac.open_run(run).store.commit_record)
        if completed:
            assert state == after
            break
        seen_before += state == before
        seen_after += state == after
        if state == before:  # the request is served on a retry, and the retry removes what the failure left
            amnesiac.purge(run, sample_ids=[5], request_id="probe")
        else:
            amnesiac.purge(run, sample_ids=[9], request_id="next")
        assert audit(run, verify=True)["ok"]
    assert completed and seen_before >= 5 and seen_after >= 1
