"""The plots are written whatever is missing from the results, and the test suite leaves nothing in the temporary
directory (doctests included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from amnesiac.experiments.plots import plot_codecs, plot_fraction, plot_methods

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def test_every_plot_is_written_with_missing_values(tmp_path):
    metrics = {"test": {"forgotten": 0.0, "retained": 0.9}, "forget_set": None, "mia_shadow": {"recall": None}}
    plot_methods({"original": {"metrics": metrics}, "amnesiac": {"metrics": metrics}}, tmp_path / "m.png", "t", True)
    plot_fraction([{"fraction": 0.001, "amnesiac": 0.9}, {"fraction": 0.3, "amnesiac": 0.5}], tmp_path / "f.png", "t")
    plot_codecs({"fp32": {"amnesiac": {"test": {"forgotten": 0.0, "retained": 0.7}}, "amnesiac_finetune": {},
                          "storage": {"ratio": 0.56}}}, tmp_path / "c.png", "t")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import record
        result = json.loads((ROOT / "benchmarks" / "results" / "record.json").read_text())
        assert record.plot(result, tmp_path / "r.png")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    for name in ("m", "f", "c", "r"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == PNG


def test_the_suite_leaves_nothing_in_the_temporary_directory(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # doctests that call tempfile.mkdtemp() and a test using tmp_path
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "amnesiac/run.py",
                        "amnesiac/recorder.py", "deltastore/store.py", "tests/test_bad_input.py::test_not_a_run"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:]
    left = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*"))
    assert all(p.startswith("pytest-of-") and "/" not in p for p in left), left  # only pytest's own empty root
