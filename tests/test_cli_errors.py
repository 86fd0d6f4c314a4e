"""Careless input on the command line: exit status 2, one line on stderr naming the remedy, never a traceback, and
nothing written. Every case runs the real command in a subprocess (the cases of one test run side by side)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_all(cases: dict[str, list[str]], cwd: Path) -> dict[str, subprocess.CompletedProcess]:
    """Run every command line of ``cases`` at once (each one starts Python and torch: seconds apiece)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = {name: subprocess.Popen([sys.executable, *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name, argv in cases.items()}
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return out


def assert_refused(results: dict, expected: dict[str, str]) -> None:
    for name, needle in expected.items():
        r = results[name]
        lines = r.stderr.splitlines()
        assert r.returncode == 2, f"{name}: exit {r.returncode}, stderr {r.stderr!r}"
        assert "Traceback" not in r.stderr and len(lines) == 1, f"{name}: {r.stderr!r}"
        assert needle in lines[0], f"{name}: {lines[0]!r} lacks {needle!r}"


AMNESIAC = ["-m", "amnesiac.cli"]


def test_forget_refuses_careless_sample_selections(cli_run, tmp_path):
    out = tmp_path / "x.safetensors"
    base = [*AMNESIAC, "forget", "--run", str(cli_run), "--out", str(out)]
    results = run_all({"missing file": [*base, "--samples", "@missing-file"],
                       "huge range": [*base, "--samples", "0-99999999999"],
                       "reversed range": [*base, "--samples", "5-1"],
                       "empty": [*base, "--samples", ""]}, tmp_path)
    assert_refused(results, {"missing file": "no such file", "huge range": "goes beyond the largest sample id",
                             "reversed range": "write it as 1-5", "empty": "is empty; give ids like 1,2,5-9"})
    assert not out.exists()


def test_forget_refuses_devices_it_cannot_use(cli_run, tmp_path):
    out = tmp_path / "x.safetensors"
    base = [*AMNESIAC, "forget", "--run", str(cli_run), "--classes", "3", "--out", str(out)]
    cases = {"not a device": [*base, "--device", "gpu"],
             "baseline on cuda": [*base, "--method", "retrain", "--device", "cuda"]}
    results = run_all(cases, tmp_path)
    # without CUDA the device is refused; with it, the baseline (which trains on the CPU) refuses --device
    assert_refused(results, {"not a device": "is not a device name; use cpu, cuda or cuda:N",
                             "baseline on cuda": "--device cpu" if not torch.cuda.is_available()
                             else "leave out --device"})
    assert not out.exists()


def test_eval_refuses_weights_that_are_missing_or_not_safetensors(cli_run, tmp_path):
    (tmp_path / "notes.safetensors").write_text("these are not weights\n")
    base = [*AMNESIAC, "eval", "--run", str(cli_run)]
    results = run_all({"missing": [*base, "--weights", str(tmp_path / "missing.safetensors")],
                       "not safetensors": [*base, "--weights", str(tmp_path / "notes.safetensors")]}, tmp_path)
    assert_refused(results, {"missing": "no such file; give a .safetensors file written by `amnesiac forget",
                             "not safetensors": "is not a safetensors file"})


def test_train_refuses_impossible_epochs_and_classes(tmp_path):
    base = [*AMNESIAC, "train", "--dataset", "digits", "--model", "mlp"]
    results = run_all({"negative epochs": [*base, "--run", "a", "--epochs", "-3"],
                       "no epochs": [*base, "--run", "b", "--epochs", "0"],
                       "no such class": [*base, "--run", "c", "--keep-class", "42"],
                       "too many kept": [*base, "--run", "d", "--keep-class", "3", "--keep-count", "100000"]},
                      tmp_path)
    assert_refused(results, {"negative epochs": "--epochs: must be a positive integer, got -3",
                             "no epochs": "--epochs: must be a positive integer, got 0",
                             "no such class": "digits has classes 0 to 9",
                             "too many kept": "give at most"})
    assert not any(tmp_path.iterdir())  # no run directory was started


def test_benchmarks_refuse_unknown_workloads_and_codecs(tmp_path):
    record, unlearn = str(ROOT / "benchmarks" / "record.py"), str(ROOT / "benchmarks" / "unlearn.py")
    results = run_all({"workload": [record, "--out", "out", "--workloads", "mlp-imagenet"],
                       "codec": [record, "--out", "out", "--codecs", "fp8"],
                       "model": [unlearn, "--out", "out", "--models", "resnet99"],
                       "unlearn codec": [unlearn, "--out", "out", "--codecs", "int4"]}, tmp_path)
    assert_refused(results, {"workload": "unknown name 'mlp-imagenet'; choose from mlp-mnist",
                             "codec": "unknown codec 'fp8'", "model": "choose from resnet18, resnet50",
                             "unlearn codec": "unknown codec 'int4'"})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, needle", [
    (["forget", "--classes", "3"], "the following arguments are required: --run"),
    (["train", "--dataset", "imagenet", "--model", "mlp", "--run", "r"], "invalid choice: 'imagenet'"),
])
def test_argument_errors_are_one_line(argv, needle, capsys):
    from amnesiac.cli import main
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and needle in err and "--help" in err
