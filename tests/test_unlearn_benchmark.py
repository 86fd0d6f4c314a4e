"""The unlearning benchmark's smoke mode: every part runs (generation, peers, child with peak memory, table, JSON,
plot) on a tiny run. No timings are asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "unlearn.py"


@pytest.mark.slow  # ~15 s alone on 2 cores (three processes import torch), more under load
def test_unlearn_benchmark_smoke(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    done = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GB/s fp32" in done.stdout and "disk sequential read" in done.stdout and "machine:" in done.stdout
    result = json.loads((out / "unlearn.json").read_text())
    assert (out / "unlearn.png").stat().st_size > 0
    assert result["smoke"] and result["machine"]["cores"] >= 1
    assert {(r["codec"], r["backend"]) for r in result["runs"]} == {("fp32", "zarr"), ("topk:0.01", "safetensors")}
    selections = {r["selection"] for r in result["rows"]}
    assert {"one_sample", "1%", "10%"} <= selections
    assert {r["cache"] for r in result["rows"]} >= {"cold", "warm"}
    for r in result["rows"]:
        assert r["seconds"] > 0 and r["raw_fp32_gbps"] > 0 and r["peak_extra_mib"] >= 0
    peers = result["peers"]
    assert peers["disk"]["cold_gbps"] > 0 and peers["in_memory_sum_gbps"] > 0
    assert peers["zarr_rows_gbps"] and peers["retrain"]["step_seconds"] > 0
    assert not work.exists() or not any(work.iterdir())  # generated runs are deleted
