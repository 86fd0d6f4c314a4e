"""Ctrl-C during `amnesiac train` and `--resume`: an interrupted and resumed training records the same run as an
uninterrupted one (the session's `cli_run`, recorded with the same options)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import amnesiac
from amnesiac.cli import main as amnesiac_main
from deltastore.cli import main as deltastore_main

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = ["--dataset", "digits", "--model", "mlp", "--epochs", "3", "--keep-class", "3", "--keep-count", "10"]


def ledger(run) -> list[list[int]]:
    return [run.samples_of_step(step).tolist() for step in range(run.num_steps)]


def committed_steps(run_dir: Path) -> int:
    try:
        return amnesiac.open_run(run_dir).num_steps
    except amnesiac.AmnesiacError:  # not created yet
        return 0


def test_sigint_stops_after_a_step_and_resume_matches_an_uninterrupted_run(cli_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["train", *OPTIONS, "--run", str(run_dir), "--checkpoint-every", "7", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "amnesiac.cli", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while committed_steps(run_dir) < 1 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # freeze it, so that Ctrl-C surely lands mid-training however fast the machine is
    proc.send_signal(signal.SIGSTOP)
    seen = committed_steps(run_dir)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    line = stderr.strip()
    assert "Traceback" not in stderr and len(line.splitlines()) == 1, stderr
    stopped = amnesiac.open_run(run_dir)
    total = amnesiac.open_run(cli_run).num_steps
    assert not stopped.complete and 1 <= seen <= stopped.num_steps < total
    assert f"interrupted: {stopped.num_steps} of {total} steps are committed" in line
    assert line.endswith(" ".join(["amnesiac", *argv, "--resume"])), line
    assert (run_dir / "checkpoint.safetensors").is_file()

    # text output of forget and eval says the run is incomplete
    sample = int(stopped.samples_of_step(0)[0])
    assert amnesiac_main(["forget", "--run", str(run_dir), "--samples", str(sample), "--out",
                          str(tmp_path / "f.safetensors")]) == 0
    assert "is an incomplete run" in capsys.readouterr().out

    # resume in this process, exactly as the line says
    assert amnesiac_main([*argv, "--resume"]) == 0
    resumed, whole = amnesiac.open_run(run_dir), amnesiac.open_run(cli_run)
    assert resumed.complete and resumed.num_steps == whole.num_steps
    assert ledger(resumed) == ledger(whole)
    for name, value in whole.final_state().items():
        torch.testing.assert_close(resumed.final_state()[name], value, rtol=1e-5, atol=1e-6)
    assert np.array_equal(resumed.steps_for(classes=[3]), whole.steps_for(classes=[3]))
    assert deltastore_main(["verify", str(run_dir)]) == 0
    assert not (run_dir / "checkpoint.safetensors").exists()  # a complete run has nothing to resume


def test_resume_refuses_what_cannot_be_continued(cli_run, tmp_path, capsys):
    assert amnesiac_main(["train", *OPTIONS, "--run", str(cli_run), "--resume"]) == 2
    assert "is complete" in capsys.readouterr().err
    assert amnesiac_main(["train", *OPTIONS, "--run", str(tmp_path / "none"), "--resume"]) == 2
    assert "holds no run; leave out --resume" in capsys.readouterr().err
    assert amnesiac_main(["train", *OPTIONS, "--run", str(cli_run)]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_a_killed_training_resumes_from_its_last_periodic_checkpoint(cli_run, tmp_path):
    """SIGKILL (no chance to checkpoint): --resume cuts the run back to the last --checkpoint-every checkpoint, trains
    the lost steps again, and ends with the uninterrupted run's steps and ledger."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    argv = ["train", *OPTIONS, "--run", str(run_dir), "--checkpoint-every", "5", "--json"]
    proc = subprocess.Popen([sys.executable, "-m", "amnesiac.cli", *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while committed_steps(run_dir) < 12 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=60)
    killed_at = committed_steps(run_dir)
    total = amnesiac.open_run(cli_run).num_steps
    assert 12 <= killed_at < total and not amnesiac.open_run(run_dir).complete
    assert amnesiac_main([*argv, "--resume"]) == 0
    resumed, whole = amnesiac.open_run(run_dir), amnesiac.open_run(cli_run)
    assert resumed.complete and ledger(resumed) == ledger(whole)
    assert deltastore_main(["verify", str(run_dir)]) == 0
