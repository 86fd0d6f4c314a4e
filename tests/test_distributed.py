"""DDP and FSDP2 recording with real torch.distributed: 2 processes under torchrun (gloo, CPU, loopback), compared
with a one-process reference trained on the same global batches (tests/dist_worker.py holds both sides)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import amnesiac

HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("dist_worker", HERE / "dist_worker.py")
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(out: Path, *scenarios: str, ranks: int = 2) -> list[dict]:
    """Run the scenarios in one torchrun job of ``ranks`` ranks; every rank's results."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(ranks),
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(HERE / "dist_worker.py"), str(out),
           *scenarios]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((out / f"result-{r}.json").read_text()) for r in range(ranks)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    results = torchrun(out, "ddp", "ddp_resume", "ddp_failure", "fsdp")
    worker.reference(out / "reference")
    return out, results


def assert_same_run(run, ref):
    assert run.complete and run.num_steps == ref.num_steps == worker.STEPS
    for t in range(ref.num_steps):  # the ledger of a step: every rank's ids (in rank order, then micro-batches)
        assert np.array_equal(np.sort(run.samples_of_step(t)), np.sort(ref.samples_of_step(t)))
    assert np.array_equal(run.steps_for(classes=[1]), ref.steps_for(classes=[1]))
    for select in ({"sample_ids": [5]}, {"sample_ids": [17, 60]}, {"steps": [0, 3, 4]}):
        got, want = run.unlearn(**select), ref.unlearn(**select)
        assert sorted(got) == sorted(want)
        for k in want:
            assert got[k].shape == want[k].shape and got[k].dtype == want[k].dtype
            torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-5)
    for k, v in ref.final_state().items():
        torch.testing.assert_close(run.final_state()[k], v, atol=1e-6, rtol=1e-5)
    model = worker.Net()
    run.load_into(model, run.unlearn(sample_ids=[5]))  # a complete state_dict of the plain model


def test_ddp_run_equals_one_process_on_the_global_batches(job):
    out, results = job
    assert [r["ddp"]["raised"] for r in results] == [[], []]
    assert [r["ddp"]["has_store"] for r in results] == [True, False]  # only rank 0 writes
    assert [r["ddp"]["steps"] for r in results] == [worker.STEPS] * 2
    run = amnesiac.open_run(out / "ddp")
    assert type(run) is amnesiac.Run and "module.fc1.weight" not in run.final_state()  # plain module's names
    assert sorted(p.name for p in (out / "ddp").iterdir()) == sorted(p.name for p in (out / "reference").iterdir())
    assert_same_run(run, amnesiac.open_run(out / "reference"))  # steps 3 and 4 accumulate under no_sync()


def test_ddp_run_resumes_from_a_checkpoint_on_every_rank(job):
    out, results = job
    assert [r["ddp_resume"] for r in results] == [{"raised": [], "resumed_at": 2}] * 2
    assert_same_run(amnesiac.open_run(out / "ddp_resume"), amnesiac.open_run(out / "reference"))


def test_fsdp_run_equals_one_process_on_the_global_batches(job):
    out, results = job
    assert [r["fsdp"]["raised"] for r in results] == [[], []]
    assert [r["fsdp"]["local_rows"] for r in results] == [2, 1]  # fc2's 3 rows, sharded unevenly
    assert sorted(p.name for p in (out / "fsdp").iterdir()) == ["rank-00000", "rank-00001"]
    run = amnesiac.open_run(out / "fsdp")
    assert isinstance(run, amnesiac.Run) and len(run.shards) == 2
    # each rank stored only its own rows; the replicated buffer only on rank 0
    assert run.shards[1].layout.entry("fc2.weight").shape == (1, 8)
    assert "scale" in run.shards[0].layout.names and "scale" not in run.shards[1].layout.names
    assert_same_run(run, amnesiac.open_run(out / "reference"))
    report = run.unlearn_report(sample_ids=[5])
    assert report.steps_undone.tolist() == [0] and report.total_steps == worker.STEPS


def test_a_writer_failure_is_raised_on_every_rank_at_the_same_step(job):
    out, results = job
    raised = [r["ddp_failure"]["raised"] for r in results]
    assert all(len(r) == 1 and r[0][1] == "WriterError" for r in raised), raised
    assert raised[0][0][0] == raised[1][0][0]  # the same step on both ranks: nobody is left in a collective
    assert "No space left on device" in raised[0][0][2] and "rank 0" in raised[1][0][2]
    assert [r["ddp_failure"]["close"] for r in results] == [None, None]  # close(finalize=False) returns everywhere
    run = amnesiac.open_run(out / "ddp_failure")
    assert not run.complete and run.num_steps <= 2


def test_a_sharded_run_needs_every_rank(job, tmp_path):
    import shutil
    out, _ = job
    shutil.copytree(out / "fsdp" / "rank-00000", tmp_path / "fsdp" / "rank-00000")
    with pytest.raises(amnesiac.RunNotFoundError, match="rank-00001 is missing"):
        amnesiac.open_run(tmp_path / "fsdp")
    shutil.copytree(out / "ddp", tmp_path / "fsdp" / "rank-00001")  # a store of another run
    with pytest.raises(amnesiac.RunDamagedError, match="not a shard of an FSDP run"):
        amnesiac.open_run(tmp_path / "fsdp")


def test_one_process_recorder_ignores_an_absent_process_group(tmp_path):
    from amnesiac.distributed import recorder_class
    assert recorder_class("auto") is amnesiac.Recorder and recorder_class(None) is amnesiac.Recorder
    with pytest.raises(amnesiac.RecorderError, match="process_group"):
        recorder_class("world")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_one_gpu_ddp_smoke(tmp_path):
    """DDP on one GPU under NCCL: the writer works on that GPU; the run equals the CPU reference."""
    results = torchrun(tmp_path, "ddp_cuda", ranks=1)
    assert results[0]["ddp_cuda"]["raised"] == []
    worker.reference(tmp_path / "reference")
    run, ref = amnesiac.open_run(tmp_path / "ddp_cuda"), amnesiac.open_run(tmp_path / "reference")
    for t in range(ref.num_steps):
        assert np.array_equal(np.sort(run.samples_of_step(t)), np.sort(ref.samples_of_step(t)))
    for k, v in ref.unlearn(sample_ids=[5]).items():
        torch.testing.assert_close(run.unlearn(sample_ids=[5])[k], v, atol=1e-4, rtol=1e-4)  # GPU vs CPU kernels


def test_cli_forgets_from_an_fsdp_run(job, tmp_path):
    from safetensors.torch import load_file

    from amnesiac.cli import main
    out, _ = job
    assert main(["forget", "--run", str(out / "fsdp"), "--samples", "5,17", "--out", str(tmp_path / "w.safetensors"),
                 "--json"]) == 0
    got = load_file(tmp_path / "w.safetensors")
    want = amnesiac.open_run(out / "reference").unlearn(sample_ids=[5, 17])
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5)
