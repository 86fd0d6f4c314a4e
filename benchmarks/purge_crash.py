"""Purge/gc crash stress: SIGKILL a process that serves deletion requests (and a retention gc) at random moments.

A run is recorded once (a small MLP, durable, zarr or safetensors, any codec). A fixed sequence of operations is
then applied: purges of a few samples each, with one ``deltastore gc`` among them. The sequence is first applied
without interruption to record the reference after each operation: steps, sha256 of the final and start states,
number of receipts. Then, over and over, a forked child applies the rest of the sequence and the parent kills it
(SIGKILL) after a random delay drawn over the time the remaining operations take. After every kill the run must
be exactly at one of the reference points, at or after the one it was at before (never between two), and pass
``deltastore verify`` and the receipt chain of ``amnesiac audit --verify``. Files a kill left behind (a generation
switched to but not yet cleaned up, or one staged but never switched to) are counted, and the next operation
removes them. When the sequence is complete the run is reset from a pristine copy.

Children are forked from this process (torch limited to one thread before anything runs), so that a kill costs
milliseconds rather than a Python start-up.

Usage::

    python benchmarks/purge_crash.py --kills 30                  # ~1 minute on 2 cores
    python benchmarks/purge_crash.py --kills 20 --codec fp16 --backend safetensors --json out.json

``tests/test_purge_crash.py`` runs it with 20 kills.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

STEPS, BATCH = 40, 8
OPS = [("purge", "u1", [8 * 3 + 1]), ("purge", "u2", [8 * 10, 8 * 30 + 2]), ("gc", None, 4),
       ("purge", "u3", [8 * 17 + 5]), ("purge", "u4", [8 * 22, 8 * 23, 8 * 35 + 7]), ("purge", "u5", [8 * 39 + 1]),
       ("gc", None, 3), ("purge", "u6", [8 * 12 + 3])]


def record(path: Path, codec: str, backend: str) -> None:
    import torch

    import amnesiac
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 128),
                                torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with amnesiac.Recorder(model, opt, path, codec=codec, backend=backend, durable=True) as rec:
        for t in range(STEPS):
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(BATCH, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
            rec.add_batch(list(range(8 * t, 8 * t + BATCH)), labels=y)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()


def apply(path: Path, op) -> None:
    import amnesiac
    from deltastore.retention import gc
    kind, request, arg = op
    if kind == "purge":
        amnesiac.purge(path, sample_ids=arg, request_id=request)
    else:
        gc(path, before_step=arg)


def signature(path: Path) -> tuple:
    import amnesiac
    from amnesiac.receipts import state_sha256
    from amnesiac.requests import load_receipts
    run = amnesiac.open_run(path)
    return (run.num_steps, state_sha256(run.final_state()), state_sha256(run.start_state()),
            len(load_receipts(run.store)))


def check(path: Path) -> list[str]:
    """Faults of the run besides files left behind by a kill (which the next operation removes)."""
    from amnesiac.audit import audit
    report = audit(path, verify=True)
    return [f for f in report["faults"] if "outside the committed generation remain" not in f]


def stress(kills: int, *, codec: str = "fp32", backend: str = "zarr", seed: int = 0, workdir: Path | None = None,
           log=print) -> dict:
    import torch
    torch.set_num_threads(1)  # children are forked: no OpenMP pool may exist in this process
    from deltastore import stale_files
    from deltastore.store import DeltaStore
    rng = random.Random(seed)
    work = Path(workdir or tempfile.mkdtemp(prefix="purge-crash-"))
    pristine, run = work / "pristine", work / "run"
    record(pristine, codec, backend)
    shutil.copytree(pristine, run)
    refs, durations = [signature(run)], []
    for op in OPS:
        t0 = time.perf_counter()
        apply(run, op)
        durations.append(time.perf_counter() - t0)
        refs.append(signature(run))
    faults = check(run)
    assert not faults, faults
    figures = {"kills": 0, "rounds": 0, "landed_before_or_after": {}, "left_files": 0, "op_seconds": durations,
               "codec": codec, "backend": backend}
    shutil.rmtree(run)
    shutil.copytree(pristine, run)
    at = 0
    while figures["kills"] < kills:
        window = sum(durations[at:]) * 1.3 + 0.5  # a forked child starts cold and first removes what was left
        pid = os.fork()
        if pid == 0:  # the child: serve the rest of the sequence
            code = 0
            try:
                for op in OPS[at:]:
                    apply(run, op)
            except BaseException:  # noqa: BLE001 - the parent sees the status
                code = 3
            os._exit(code)
        time.sleep(rng.uniform(0, window))
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status = os.waitpid(pid, 0)
        finished = os.WIFEXITED(status)
        if finished and os.WEXITSTATUS(status) != 0:
            raise AssertionError(f"the child failed (status {os.WEXITSTATUS(status)}) without being killed")
        figures["kills"] += 0 if finished else 1
        sig = signature(run)
        if sig not in refs[at:]:
            raise AssertionError(f"after a kill the run matches no reference point at or after {at}: {sig[:1]}")
        new_at = refs.index(sig, at)
        figures["landed_before_or_after"][new_at - at] = figures["landed_before_or_after"].get(new_at - at, 0) + 1
        faults = check(run)
        if faults:
            raise AssertionError(f"after a kill at point {new_at}: {faults}")
        figures["left_files"] += bool(stale_files(run, DeltaStore.open(run).commit_record))
        at = new_at
        if at == len(OPS):
            figures["rounds"] += 1
            shutil.rmtree(run)
            shutil.copytree(pristine, run)
            at = 0
        log(f"kill {figures['kills']}: at point {at}")
    figures["landed_before_or_after"] = {str(k): v for k, v in sorted(figures["landed_before_or_after"].items())}
    if workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--codec", default="fp32")
    p.add_argument("--backend", default="zarr", choices=["zarr", "safetensors"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the figures to this file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    figures = stress(args.kills, codec=args.codec, backend=args.backend, seed=args.seed,
                     log=lambda *a: print(*a, file=sys.stderr))
    figures["seconds"] = time.perf_counter() - t0
    print(json.dumps(figures, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
