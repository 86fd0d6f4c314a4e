"""deltastore plan: the JSON keys, relations that must hold between the estimates, the shipped figures against the
benchmark results they were copied from, and calibration from a real run."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import amnesiac
from deltastore.cli import main
from deltastore.plan import calibration, plan

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"raw_fp32_bytes", "bytes_on_disk", "write_bytes_per_step", "forget_one_sample_seconds", "stored_steps",
        "writer_seconds_per_stored_step", "steps_undone_per_sample", "figures", "sources"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``deltastore plan ARGS`` in this process (the command line's own entry point; one test runs it for real)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["plan", *args])
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def test_the_command_runs():
    out = subprocess.run([sys.executable, "-m", "deltastore.cli", "plan", "--params", "1000", "--steps", "10",
                          "--codec", "bf16"], capture_output=True, text=True)
    assert out.returncode == 0 and "10 steps of 1,000 floats, codec bf16: 10 steps stored" in out.stdout


def test_json_keys_and_sanity():
    out = _cli("--model", "resnet18", "--steps", "7813", "--epochs", "10", "--codec", "fp16", "--json")
    assert out.returncode == 0, out.stderr
    full = json.loads(out.stdout)
    assert KEYS <= set(full)
    assert full["raw_fp32_bytes"] == 7813 * full["params"] * 4
    deltas = full["bytes_on_disk"] - 2 * full["params"] * 4            # minus S_0 and S_T (no ledger: no batch size)
    assert deltas == pytest.approx(full["raw_fp32_bytes"] * full["figures"]["ratio"], rel=1e-6)
    assert full["write_bytes_per_step"] * full["steps"] == pytest.approx(deltas, rel=1e-6)
    sel = json.loads(_cli("--model", "resnet18", "--steps", "7813", "--epochs", "10", "--codec", "fp16",
                          "--deletable-fraction", "0.01", "--batch-size", "64", "--json").stdout)
    iso = json.loads(_cli("--model", "resnet18", "--steps", "7813", "--epochs", "10", "--codec", "fp16",
                          "--deletable-fraction", "0.01", "--batch-size", "64", "--isolate", "--json").stdout)
    # selective recording keeps fewer steps, the isolating sampler far fewer: 1 - 0.99**64 = 47% against ~1%
    assert iso["stored_steps"] < sel["stored_steps"] < full["stored_steps"]
    assert sel["stored_steps"] == pytest.approx(7813 * (1 - 0.99 ** 64), abs=1)
    assert iso["stored_steps"] == 10 * 8 and iso["bytes_on_disk"] < 5e9  # issue 13's target for this training
    assert iso["forget_one_sample_seconds"] == full["forget_one_sample_seconds"] > 0
    bigger = plan(params=full["params"], steps=2 * 7813, codec="fp16", epochs=20)
    assert bigger["bytes_on_disk"] > full["bytes_on_disk"] and bigger["forget_one_sample_seconds"] > \
        full["forget_one_sample_seconds"]
    lossless = plan(params=full["params"], steps=7813, codec="fp32", epochs=10)
    assert lossless["bytes_on_disk"] > full["bytes_on_disk"]


@pytest.mark.parametrize("args, message", [
    (["--params", "10", "--steps", "5", "--codec", "nope"], "no measured ratio for codec 'nope'"),
    (["--params", "10", "--steps", "5", "--codec", "fp16", "--isolate"], "--isolate needs --deletable-fraction"),
    (["--params", "10", "--steps", "5", "--codec", "fp16", "--deletable-fraction", "0.1"], "--batch-size"),
    (["--params", "10", "--steps", "5", "--codec", "fp16", "--deletable-fraction", "2", "--isolate"], "between 0"),
])
def test_bad_plans_exit_2_with_one_line(args, message):
    out = _cli(*args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_shipped_figures_match_their_sources():
    table = calibration()
    result = json.loads((ROOT / "benchmarks" / "results" / "record.json").read_text())["workloads"]["resnet18-cifar"]
    for codec, measured in result["throughput"].items():
        assert table["ratio"][codec] == pytest.approx(
            measured["stored_bytes_per_step"] / result["raw_fp32_bytes_per_step"], abs=1e-4)
        assert table["writer_input_fp32_MBps"][codec] == pytest.approx(measured["input_fp32_MBps"], abs=0.1)
    torchvision = pytest.importorskip("torchvision")
    for name, count in table["models"].items():
        if name == "source":
            continue
        state = getattr(torchvision.models, name)().state_dict()
        assert count == sum(v.numel() for v in state.values() if v.is_floating_point())


def test_calibrate_from_a_run(tmp_path):
    model = torch.nn.Linear(64, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, tmp_path / "run", codec="fp16", durable=False) as rec:
        for step in range(4):
            rec.add_batch([step])
            model(torch.randn(8, 64)).sum().backward()
            opt.step()
            opt.zero_grad()
    info = amnesiac.open_run(tmp_path / "run").store.info()
    out = _cli("--params", "1000", "--steps", "100", "--codec", "fp16", "--calibrate", str(tmp_path / "run"), "--json")
    p = json.loads(out.stdout)
    assert p["figures"]["ratio"] == pytest.approx(info["ratio"]) and "measured on" in p["sources"]["ratio"]
    assert p["figures"]["reduce_GBps_fp32"] > 0
    wrong = _cli("--params", "1000", "--steps", "100", "--codec", "fp32", "--calibrate", str(tmp_path / "run"))
    assert wrong.returncode == 2 and "recorded with codec fp16" in wrong.stderr
