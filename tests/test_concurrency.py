"""One writer per run, across processes; a crashed writer's lock is taken over; readers that follow a live writer
always see a consistent prefix of committed steps."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import amnesiac
from deltastore import DeltaStore, StoreLockedError
from deltastore import backends as backends_module

HOLDER = textwrap.dedent("""
    import sys, torch, amnesiac
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = amnesiac.Recorder(model, opt, sys.argv[1], durable=False)
    for t in range(3):
        rec.add_batch([t]); model(torch.ones(1, 3)).sum().backward(); opt.step(); opt.zero_grad()
    rec.flush()
    print("ready", flush=True)
    sys.stdin.readline()   # hold the run until told to go
    rec.close()
    print("closed", flush=True)
""")


def spawn_holder(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("ready"), proc.stderr.read()
    return proc


def resume_model(run_dir):
    model = torch.nn.Linear(3, 2)
    model.load_state_dict(amnesiac.open_run(run_dir).final_state())
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_a_second_writer_in_another_process_is_refused(tmp_path):
    proc = spawn_holder(tmp_path)
    try:
        model, opt = resume_model(tmp_path / "run")
        with pytest.raises(StoreLockedError, match=f"process {proc.pid}"):
            amnesiac.Recorder(model, opt, tmp_path / "run", resume=True)
        with pytest.raises(StoreLockedError):
            DeltaStore.open(tmp_path / "run", writable=True)
        with pytest.raises(amnesiac.RunExistsError):
            amnesiac.Recorder(model, opt, tmp_path / "run")
        assert amnesiac.open_run(tmp_path / "run").num_steps == 3  # reading is always allowed
    finally:
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().startswith("closed")
        proc.wait(timeout=60)
    assert amnesiac.open_run(tmp_path / "run").complete  # and the holder finished undisturbed


def test_a_sigkilled_writers_lock_is_taken_over(tmp_path):
    proc = spawn_holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "run" / "writer.lock").exists()  # left behind by the killed writer
    assert str(proc.pid) in (tmp_path / "run" / "writer.lock").read_text()
    model, opt = resume_model(tmp_path / "run")
    rec = amnesiac.Recorder(model, opt, tmp_path / "run", resume=True)
    rec.add_batch([99])
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    rec.close()
    run = amnesiac.open_run(tmp_path / "run")
    assert run.complete and run.num_steps == 4 and run.samples_of_step(3).tolist() == [99]
    assert not (tmp_path / "run" / "writer.lock").exists()


def test_two_writers_racing_in_threads_never_both_hold_the_lock(tmp_path):
    store = DeltaStore.create(tmp_path / "s", {"w": torch.zeros(8)}, durable=False)
    store.close()
    holders, errors = [], []

    def take():
        try:
            holders.append(DeltaStore.open(tmp_path / "s", writable=True))
        except StoreLockedError as e:
            errors.append(e)
    threads = [threading.Thread(target=take) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(holders) == 1 and len(errors) == 7
    holders[0].close()


READER = textwrap.dedent("""
    import sys, numpy as np
    from deltastore import DeltaStore
    path, total = sys.argv[1], int(sys.argv[2])
    print("started", flush=True)
    seen, last, store = 0, 0, None
    while last < total:
        try:
            if store is None or seen % 7 == 0:
                store = DeltaStore.open(path)   # now and then a fresh open, otherwise a refresh
            else:
                store.refresh()
        except FileNotFoundError:
            continue
        n = store.num_steps
        assert n >= last, f"went back from {last} to {n}"
        ids = store.metadata()["ids"].values.tolist() if n else []
        assert ids == list(range(n)), f"ledger of {n} steps is not the committed prefix"
        if n:
            assert float(store.read_step(n - 1)[0]) == float(n), "newest step reads wrong"
        seen, last = seen + 1, n
    print("observations", seen, flush=True)
""")


def test_readers_following_a_live_writer_see_a_consistent_prefix(tmp_path, monkeypatch):
    monkeypatch.setattr(backends_module, "CAPACITY_BLOCK", 4)  # the arrays grow under the readers' feet
    total = 60
    store = DeltaStore.create(tmp_path / "s", {"w": torch.zeros(300)}, durable=False, chunk_elems=128)
    script = tmp_path / "reader.py"
    script.write_text(READER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "s"), str(total)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("started")
    problems, observations, done = [], [], threading.Event()

    def follow():
        reader = DeltaStore.open(tmp_path / "s")
        last = 0
        while True:
            finished = done.is_set()
            try:
                reader.refresh()
                n = reader.num_steps
                assert n >= last
                meta = reader.metadata()
                assert (meta["ids"].values.tolist() if n else []) == list(range(n))
                if n:
                    assert reader.read_step(n - 1)[0].item() == float(n)
                    assert torch.equal(reader.sum_steps(range(n)), torch.full((300,), n * (n + 1) / 2))
                observations.append(n)
                last = n
            except Exception as e:  # noqa: BLE001 - reported below
                problems.append(repr(e))
                return
            if finished:
                return
    thread = threading.Thread(target=follow)
    thread.start()
    for t in range(total):
        store.append_delta(torch.full((300,), float(t + 1)), {"ids": torch.tensor([t])})
    done.set()
    thread.join(timeout=120)
    store.close()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert not problems, problems
    assert observations and observations[-1] == total
    assert np.all(np.diff(observations) >= 0)
    assert "observations" in out
