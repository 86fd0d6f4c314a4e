"""Crashes and full disks while recording: nothing committed is lost, nothing uncommitted is visible, no step is
dropped silently.

The SIGKILL stress runs ``benchmarks/crash_stress.py`` in a short version (AMNESIAC_CRASH_KILLS kills, default 6);
``python benchmarks/crash_stress.py --kills 50`` is the full one.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import amnesiac
from deltastore import DeltaStore, WriterError
from deltastore.verify import verify_store

ROOT = Path(__file__).resolve().parents[1]


def _load_stress():
    spec = importlib.util.spec_from_file_location("crash_stress", ROOT / "benchmarks" / "crash_stress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_committed(tmp_path):
    kills = int(os.environ.get("AMNESIAC_CRASH_KILLS", "6"))
    figures = _load_stress().stress(kills, seed=int(os.environ.get("AMNESIAC_CRASH_SEED", "0")), workdir=tmp_path,
                                    log=lambda *_: None)
    assert figures["kills"] == kills
    assert figures["rounds"] >= 1  # at least one run was killed, resumed and finished equal to an uninterrupted one
    assert figures["steps_checked"] > 0


# ---------------------------------------------------------------- a full disk, injected at each write of a step
def _train(model, opt, rec, steps, deltas, ids_per_step, *, stop_on_error=True):
    """Train ``steps`` steps; returns (step at which an error reached the loop, the error)."""
    for t in range(steps):
        ids = np.array([10 * t, 10 * t + 1])
        rec.add_batch(ids)
        before = torch.cat([v.detach().reshape(-1).clone() for v in model.state_dict().values()])
        model(torch.ones(2, 3) * (t + 1)).pow(2).sum().backward()
        try:
            opt.step()
        except WriterError as e:
            opt.zero_grad()
            return t, e
        opt.zero_grad()
        deltas.append(torch.cat([v.detach().reshape(-1) for v in model.state_dict().values()]) - before)
        ids_per_step.append(ids)
    return None, None


def _enospc(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")


FAULT_POINTS = ["backend", "step-log", "commit"]


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
@pytest.mark.parametrize("where", FAULT_POINTS)
def test_full_disk_reaches_the_training_loop_at_the_next_step(tmp_path, monkeypatch, backend, where):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fail_at = 4
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", backend=backend, durable=False, slots=1)
    store = rec.store
    if where == "backend":  # steps reach the backend piece by piece (deltastore/pieces.py)
        import deltastore.pieces as pieces_module
        original = pieces_module.begin_backend_step
        monkeypatch.setattr(pieces_module, "begin_backend_step",
                            lambda backend, step: _enospc() if step == fail_at else original(backend, step))
    elif where == "step-log":
        original = store._log.append
        monkeypatch.setattr(store._log, "append",
                            lambda step, fields: _enospc() if step == fail_at else original(step, fields))
    else:
        import deltastore.store as store_module
        original = store_module.atomic_write_json

        def commit_write(path, obj, **kw):
            if Path(path).name == "commit.json" and obj.get("steps") == fail_at + 1:
                _enospc()
            return original(path, obj, **kw)
        monkeypatch.setattr(store_module, "atomic_write_json", commit_write)
    deltas, ids = [], []
    raised_at, error = _train(model, opt, rec, 12, deltas, ids)
    # with one slot the writer is one step behind at most: the error surfaces at the very next step
    assert raised_at == fail_at + 1
    assert f"step {fail_at}" in str(error) and "No space left" in str(error)
    # every later step says so too: none is dropped silently
    rec.add_batch([999])
    model(torch.ones(2, 3)).sum().backward()
    with pytest.raises(WriterError, match="stopped"):
        opt.step()
    with pytest.raises((WriterError, amnesiac.RecorderError), match=f"step {fail_at}"):
        rec.close()  # never marks a run complete that misses steps
    run = amnesiac.open_run(tmp_path / "run")
    assert not run.complete and run.num_steps == fail_at
    for t in range(fail_at):
        assert torch.equal(run.store.read_step(t), deltas[t])
        assert run.samples_of_step(t).tolist() == ids[t].tolist()
    assert verify_store(run.store)["ok"]
    # it serves unlearning from theta_0 + the committed deltas: the state after step fail_at - 1
    start_state, served_state = run.start_state(), run.unlearn(steps=[])
    start = torch.cat([start_state[k].reshape(-1) for k in model.state_dict()])
    served = torch.cat([served_state[k].reshape(-1) for k in model.state_dict()])
    assert torch.allclose(served, start + torch.stack(deltas[:fail_at]).sum(0), atol=1e-6)


def test_a_failed_append_leaves_the_store_writable_and_consistent(tmp_path, monkeypatch):
    """After the disk is freed the same step can be written again: the half-written record was cut back."""
    store = DeltaStore.create(tmp_path / "s", {"w": torch.zeros(100)}, durable=False, chunk_elems=32)
    store.append_delta(torch.ones(100), {"ids": torch.tensor([1])})
    log = store._log
    real_write = log._f.write

    def half_write(data):  # the disk fills in the middle of the record
        real_write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(log._f, "write", half_write)
    with pytest.raises(OSError):
        store.append_delta(torch.full((100,), 2.0), {"ids": torch.tensor([2])})
    monkeypatch.setattr(log._f, "write", real_write)
    assert store.append_delta(torch.full((100,), 3.0), {"ids": torch.tensor([3])}) == 1
    store.close()
    store = DeltaStore.open(tmp_path / "s")
    assert store.num_steps == 2
    assert store.metadata()["ids"].values.tolist() == [1, 3]
    assert store.read_step(1)[0].item() == 3.0
    assert verify_store(store)["ok"]
    assert not list((tmp_path / "s").glob(".*.tmp"))


# ---------------------------------------------------------------- a real full file system (tmpfs with a size limit)
TMPFS_CHILD = textwrap.dedent("""
    import json, sys, torch, numpy as np, amnesiac
    from deltastore import WriterError
    from deltastore.verify import verify_store
    torch.manual_seed(0)
    run_dir = sys.argv[1]
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = amnesiac.Recorder(model, opt, run_dir, slots=1)
    deltas, out = [], {}
    for t in range(10_000):
        rec.add_batch([t])
        before = torch.cat([v.detach().reshape(-1).clone() for v in model.state_dict().values()])
        model(torch.randn(4, 64)).pow(2).sum().backward()
        try:
            opt.step()
        except WriterError as e:
            out = {"raised_at": t, "message": str(e)}
            break
        opt.zero_grad()
        deltas.append(torch.cat([v.detach().reshape(-1) for v in model.state_dict().values()]) - before)
    try:
        rec.close()
    except (WriterError, amnesiac.RecorderError) as e:
        out["close"] = str(e)
    run = amnesiac.open_run(run_dir)
    out["committed"] = run.num_steps
    out["complete"] = run.complete
    out["exact"] = all(torch.equal(run.store.read_step(t), deltas[t]) for t in range(run.num_steps))
    out["ids"] = all(run.samples_of_step(t).tolist() == [t] for t in range(run.num_steps))
    out["verify_ok"] = verify_store(run.store)["ok"]
    print("RESULT " + json.dumps(out))
""")


def test_full_tmpfs_reaches_the_training_loop(tmp_path):
    unshare = shutil.which("unshare")
    if unshare is None or sys.platform != "linux":
        pytest.skip("needs Linux unshare to mount a private size-limited tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "child.py").write_text(TMPFS_CHILD)
    script = (f"mount -t tmpfs -o size=400k tmpfs {mnt} || exit 77; "
              f"exec {sys.executable} {tmp_path / 'child.py'} {mnt / 'run'}")
    proc = subprocess.run([unshare, "-m", "sh", "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode == 77 or "Operation not permitted" in proc.stderr or "unshare failed" in proc.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert "raised_at" in result, "the disk never filled up"
    # the step that failed is named, and it is the one after the last committed step
    assert f"step {result['committed']}" in result["message"]
    assert result["raised_at"] == result["committed"] + 1
    assert result["exact"] and result["ids"] and result["verify_ok"] and not result["complete"]
    assert f"step {result['committed']}" in result["close"]  # closing raises too: never marked complete
