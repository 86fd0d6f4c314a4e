"""Crash stress: SIGKILL a recording process at random moments, check the run after every kill, resume it.

Each *round* records one run of a few hundred optimizer steps (a tiny network with BatchNorm, SGD with momentum,
checkpoints every few steps) in a child process. The parent kills the child at a random moment (while it records,
checkpoints, resumes or closes), then checks the run directory:

- it opens, and reports itself incomplete;
- every committed step's delta equals, bit for bit, the delta an uninterrupted run computes, and its ledger entry
  (sample ids, labels) is the one the child added;
- nothing after the last commit is visible (the next step is not readable, its samples are unknown);
- ``open_run`` serves unlearning from theta_0 + the committed deltas (the state at the last commit), and
  ``deltastore verify`` finds no fault.

Then a new child resumes the run from its last checkpoint (``Recorder(..., resume=True, checkpoint=...)``), and so
on until a child finishes and closes the run; the finished run must equal an uninterrupted one exactly and verify.

Usage::

    python benchmarks/crash_stress.py --kills 50            # the stress run (a few minutes on 2 cores)
    python benchmarks/crash_stress.py --kills 6 --json out.json

``tests/test_crash.py`` runs a short version (AMNESIAC_CRASH_KILLS, default 6).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH, FEATURES, CLASSES = 8, 6, 3
CHECKPOINT_EVERY = 7


# ---------------------------------------------------------------- the training both sides agree on
def build(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                                torch.nn.Linear(16, CLASSES))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, opt


def batch(torch, step: int):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(BATCH, FEATURES, generator=g)
    y = torch.randint(0, CLASSES, (BATCH,), generator=g)
    ids = torch.arange(BATCH * step, BATCH * (step + 1)) * 3 + 1  # ids that are not positions
    return x, y, ids


def train_step(torch, model, opt, step: int):
    x, y, _ = batch(torch, step)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


# ---------------------------------------------------------------- the child: record (or resume), then close
def child(run_dir: str, ckpt: str, total: int, durable: bool) -> None:
    import torch

    import amnesiac
    torch.set_num_threads(1)
    model, opt = build(torch)
    run = Path(run_dir)
    if run.exists() and not (run / "store.json").exists():
        shutil.rmtree(run)  # killed while creating the run: the directory is not a run, start again
    print("opening", flush=True)
    if (run / "store.json").exists():
        if Path(ckpt).exists():
            rec = amnesiac.Recorder(model, opt, run, resume=True, checkpoint=ckpt)
        else:  # killed before the first checkpoint: no step is committed yet and the model is theta_0
            rec = amnesiac.Recorder(model, opt, run, resume=True)
    else:
        rec = amnesiac.Recorder(model, opt, run, durable=durable, chunk_elems=64)
        rec.checkpoint(ckpt)
    print("ready", rec.steps_submitted, flush=True)
    for step in range(rec.steps_submitted, total):
        _, y, ids = batch(torch, step)
        rec.add_batch(ids, labels=y)
        train_step(torch, model, opt, step)
        if (step + 1) % CHECKPOINT_EVERY == 0:
            rec.checkpoint(ckpt)
    rec.close()
    print("closed", flush=True)


# ---------------------------------------------------------------- the parent: reference, checks, kills
class Reference:
    """The uninterrupted run, computed in-process with the same code: flat states S_0, S_1, ..."""

    def __init__(self):
        import torch
        self.torch = torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            self.model, self.opt = build(torch)
        finally:
            torch.set_num_threads(threads)
        self.names = [k for k, v in self.model.state_dict().items() if v.is_floating_point()]
        self.states = [self._flat()]

    def _flat(self):
        sd = self.model.state_dict()
        return self.torch.cat([sd[k].detach().reshape(-1).clone() for k in self.names])

    def state(self, step: int):
        torch = self.torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while len(self.states) <= step:
                train_step(torch, self.model, self.opt, len(self.states) - 1)
                self.states.append(self._flat())
        finally:
            torch.set_num_threads(threads)
        return self.states[step]

    def delta(self, step: int):
        return self.state(step + 1) - self.state(step)


def check_run(run_dir: Path, ref: Reference, *, expect_complete: bool | None = None) -> dict:
    """Check everything the guarantees promise about a run directory after a kill; returns counts."""
    import numpy as np
    import torch

    import amnesiac
    from deltastore import StepSelectionError
    from deltastore.verify import verify_store
    if not (run_dir / "store.json").exists():
        return {"steps": 0, "created": False}
    run = amnesiac.open_run(run_dir)
    n = run.num_steps
    if expect_complete is not None:
        assert run.complete == expect_complete, f"complete={run.complete}, expected {expect_complete}"
    meta = run.store.metadata()
    layout = run.store.layout
    for t in range(n):
        _, y, ids = batch(torch, t)
        assert np.array_equal(run.samples_of_step(t), ids.numpy()), f"ledger ids of step {t} differ"
        assert np.array_equal(meta["labels"].of(t), y.numpy()), f"ledger labels of step {t} differ"
        got = run.store.read_step(t)
        assert torch.equal(got, ref.delta(t)), f"delta of step {t} differs by {(got - ref.delta(t)).abs().max()}"
    # nothing after the last commit is visible
    try:
        run.store.read_step(n)
        raise AssertionError(f"step {n} (past the last commit) was readable")
    except StepSelectionError:
        pass
    _, _, next_ids = batch(torch, n)
    try:  # unknown ids are refused (a run with no committed step has no ledger at all: nothing is found)
        found = run.steps_for(sample_ids=next_ids[:1])
        if found.size:
            raise AssertionError(f"samples of step {n} (past the last commit) are in the ledger")
    except amnesiac.SelectionError:
        pass
    # unlearning serves the state at the last commit (theta_0 + committed deltas), and undoes a step
    state = layout.flatten({k: v for k, v in run.unlearn(steps=[]).items() if k in layout.names})
    assert torch.allclose(state, ref.state(n), atol=1e-5), "unlearn(steps=[]) is not the state at the last commit"
    if n:
        undo = int(np.random.default_rng(n).integers(n))
        forgot = layout.flatten({k: v for k, v in run.unlearn(steps=[undo]).items() if k in layout.names})
        assert torch.allclose(forgot, ref.state(n) - ref.delta(undo), atol=1e-5), "unlearning one step is wrong"
    report = verify_store(run.store)
    assert report["ok"], report["faults"]
    return {"steps": n, "created": True, "complete": run.complete}


def stress(kills: int, *, seed: int = 0, workdir: str | Path | None = None, max_delay: float = 0.6,
           log=print) -> dict:
    """Run rounds until ``kills`` SIGKILLs have been survived; raise AssertionError on any broken guarantee."""
    rng = random.Random(seed)
    workdir = Path(workdir or tempfile.mkdtemp(prefix="crash-stress-"))
    ref = Reference()
    figures = {"kills": 0, "rounds": 0, "children": 0, "steps_checked": 0, "resumes": 0, "kills_before_ready": 0,
               "kills_while_recording": 0, "seconds": 0.0}
    t0 = time.time()
    round_no = 0
    while figures["kills"] < kills:
        round_no += 1
        run_dir, ckpt = workdir / f"run{round_no}", workdir / f"ckpt{round_no}.safetensors"
        total = rng.randint(120, 320)
        durable = round_no % 2 == 1
        while True:
            env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen([sys.executable, __file__, "--child", str(run_dir), str(ckpt), str(total),
                                     str(int(durable))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=env)
            figures["children"] += 1
            line = proc.stdout.readline()
            if not line.startswith("opening"):
                proc.kill()
                raise AssertionError(f"child failed to start: {line!r} {proc.stderr.read()[-3000:]}")
            kill_now = figures["kills"] < kills
            early = kill_now and rng.random() < 0.25
            if early:  # while it creates or resumes the run
                time.sleep(rng.uniform(0.0, 0.15))
            elif kill_now:
                line = proc.stdout.readline()
                if not line.startswith("ready"):
                    proc.wait()
                    raise AssertionError(f"child failed: {line!r} {proc.stderr.read()[-3000:]}")
                time.sleep(rng.uniform(0.0, max_delay))
            if kill_now:
                proc.send_signal(signal.SIGKILL)
            proc.wait()  # reaped: its pid is gone, so its lock is stale
            err = proc.stderr.read()
            if proc.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"child exited with {proc.returncode}: {err[-3000:]}")
            finished = proc.returncode == 0
            if not finished:
                figures["kills"] += 1
                figures["kills_before_ready" if early else "kills_while_recording"] += 1
            result = check_run(run_dir, ref, expect_complete=True if finished else None)
            if result.get("created") and not finished and result.get("complete"):
                finished = True  # killed after the close had committed: a complete run is the right outcome
            figures["steps_checked"] += result["steps"]
            log(f"round {round_no}: child {figures['children']} {'finished' if finished else 'killed'}"
                f"{' early' if early and not finished else ''}; {result['steps']} committed steps check out "
                f"(kills so far {figures['kills']})")
            if finished:
                assert result["steps"] == total, f"closed run has {result['steps']} steps, expected {total}"
                break
            figures["resumes"] += 1
        figures["rounds"] += 1
    figures["seconds"] = round(time.time() - t0, 1)
    figures["workdir"] = str(workdir)
    return figures


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        run_dir, ckpt, total, durable = argv[1:5]
        child(run_dir, ckpt, int(total), bool(int(durable)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=int(os.environ.get("AMNESIAC_CRASH_KILLS", 50)))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    figures = stress(args.kills, seed=args.seed, workdir=args.workdir)
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
