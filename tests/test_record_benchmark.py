"""The recording benchmark's smoke mode runs end to end and writes a JSON report with sane values.

No timing is asserted: the figures depend on the machine. What is checked is that every variant ran, that the
byte counts follow from the codecs, and that the report says which machine produced it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks" / "record.py"


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("record_benchmark", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark()


@pytest.fixture(scope="module")
def report(tmp_path_factory, bench):
    """One smoke run in a fresh interpreter (as a user runs it); in-process variants keep it to seconds."""
    out = tmp_path_factory.mktemp("record")
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--no-fork", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "targets:" in proc.stdout and "machine:" in proc.stdout
    return out, json.loads((out / "record.json").read_text()), bench


def test_forked_children_return_results_and_report_failures(bench):
    assert bench.in_child(True, _pair, 2, "x") == {"value": 2, "name": "x"}
    assert bench.in_child(False, _pair, 3, "y") == {"value": 3, "name": "y"}
    with pytest.raises(RuntimeError, match="failed"):
        bench.in_child(True, _fail)


def _pair(value, name):
    return {"value": value, "name": name}


def _fail():
    raise ValueError("this child fails on purpose")


def test_smoke_run_writes_json_and_plot(report):
    out, result, _ = report
    assert result["benchmark"] == "record" and result["smoke"] is True
    assert set(result["workloads"]) == {"mlp-mnist", "resnet18-cifar"}
    assert (out / "record.png").stat().st_size > 0
    assert not any(p.name.startswith("record-") for p in out.iterdir()), "the scratch directory must be removed"


def test_report_names_the_machine_and_measures_the_disk(report):
    _, result, _ = report
    m = result["machine"]
    assert m["cpu"] and m["usable_cores"] >= 1 and m["torch_threads"] >= 1 and m["filesystem"]
    assert len(result["disk"]["raw_write_MBps"]) == 2 and all(v > 0 for v in result["disk"]["raw_write_MBps"])
    assert result["disk"]["raw_MBps"] == max(result["disk"]["raw_write_MBps"])


def test_every_codec_and_variant_has_sane_figures(report):
    _, result, bench = report
    mlp = result["workloads"]["mlp-mnist"]
    assert {(r["codec"], r["variant"]) for r in mlp["results"]} == {
        (c, v) for c in bench.CODECS for v in bench.VARIANTS}
    raw = mlp["raw_fp32_bytes_per_step"]
    assert raw == mlp["elements"] * 4 > 0
    for r in mlp["results"] + result["workloads"]["resnet18-cifar"]["results"]:
        assert r["steps_timed"] >= 1 and r["step_s_all"] and len(r["step_s_all"]) % r["steps_timed"] == 0
        assert r["runs"] == (2 if r["variant"] == "none" else 1)  # two baselines bracket every codec's variants
        assert r["step_s"] > 0 and r["effective_step_s"] >= r["step_s"] and r["overhead"] > 0
        assert r["peak_mib"] >= 0
        if r["variant"] == "none":
            assert r["disk_bytes_per_step"] == 0 and r["memory_bytes_per_step"] == 0
        elif r["variant"] == "list":
            assert r["disk_bytes_per_step"] == 0 and r["memory_bytes_per_step"] > 0
        else:
            assert r["disk_bytes_per_step"] > 0
        if r["variant"].startswith("recorder"):
            assert r["writer"]["steps_written"] == r["writer"]["steps_submitted"] > 0
    # uncompressed peers store what the codec says: fp32 about raw size, fp16 about half
    by = {(r["codec"], r["variant"]): r for r in mlp["results"]}
    assert 0.95 < by[("fp32", "safetensors")]["disk_bytes_per_step"] / raw < 1.1
    assert 0.45 < by[("fp16", "safetensors")]["disk_bytes_per_step"] / raw < 0.55
    assert by[("topk:0.01", "safetensors")]["disk_bytes_per_step"] / raw < 0.05


def test_disk_ratios_come_from_real_deltas_and_follow_the_codecs(report):
    _, result, _ = report
    disk = result["workloads"]["mlp-mnist"]["disk_ratio"]
    assert set(disk) == {"fp32", "fp16", "bf16", "topk:0.01"}
    for codec, d in disk.items():
        assert d["steps"] == 8 and 0 < d["ratio"] < 1.05 and d["target"] is not None
        assert d["bytes_per_step"] == pytest.approx(d["ratio"] * d["raw_fp32_bytes_per_step"])
    assert disk["topk:0.01"]["ratio"] < disk["bf16"]["ratio"] < disk["fp32"]["ratio"]
    assert disk["fp16"]["ratio"] < disk["fp32"]["ratio"]
    assert disk["fp32"]["codec_error"] == 0.0 and disk["fp16"]["codec_error"] > 0


def test_compressor_study_and_throughput_and_targets_are_reported(report):
    _, result, _ = report
    study = result["workloads"]["mlp-mnist"]["compressor_study"]
    assert {r["stream"] for r in study} == {"fp32", "fp16", "bf16"}
    assert {r["shuffle"] for r in study} == {"shuffle", "bitshuffle"}
    assert all(0 < r["ratio_raw_fp32"] < 1.1 and r["MBps"] > 0 for r in study)
    tp = result["workloads"]["resnet18-cifar"]["throughput"]["fp16"]
    assert tp["steps"] == 2 and tp["stored_MBps"] > 0 and tp["fraction_of_raw_disk"] > 0
    names = [t["name"] for t in result["targets"]]
    assert any("overhead" in n for n in names) and sum("disk ratio" in n for n in names) == 4
    assert all(isinstance(t["met"], bool) for t in result["targets"])
