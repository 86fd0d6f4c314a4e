"""The seeds experiment (controls, retraining ensemble, intervals, equivalence) and its fair timing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amnesiac.experiments.seeds import mean_ci, summarise
from amnesiac.experiments.timing import drop_page_cache
from amnesiac.idx import FASHION_MNIST_DIR


def test_mean_ci_is_a_t_interval():
    d = mean_ci([1.0, 2.0, 3.0, float("nan")])
    assert d["n"] == 3 and d["mean"] == 2.0
    assert d["ci95"] == pytest.approx([2 - 4.303 / np.sqrt(3), 2 + 4.303 / np.sqrt(3)], rel=1e-3)
    assert mean_ci([5.0])["ci95"] is None and mean_ci([])["mean"] is None


def _rep(offset: float, spread: float) -> dict:
    metrics = {m: {"test": {"retained": 0.9 + d, "forgotten": 0.0}, "forget_set": 0.0,
                   "mia_loss": {"auc": 0.5}, "bands": {"forget": 0.6, "retained": 0.6, "held_out": 0.6}}
               for m, d in (("retrain", 0.0), ("far", 0.2), ("near", offset))}
    return {"metrics": metrics, "ensemble_spread": {"retained": spread},
            "timing": {k: 1.0 for k in ("amnesiac_median", "retrain_median", "speedup_median",
                                        "recording_overhead_seconds", "break_even_requests")},
            "steps_undone": 1, "total_steps": 10}


def test_equivalence_verdicts_use_the_ensemble_spread():
    s = summarise([_rep(0.001, 0.02), _rep(-0.002, 0.03), _rep(0.0, 0.025)])
    assert s["verdicts"]["near"]["retained"]["equivalent"] is True
    assert s["verdicts"]["far"]["retained"]["equivalent"] is False
    assert s["margins"]["retained"] == pytest.approx(0.025)


def test_drop_page_cache_counts_files(tmp_path):
    (tmp_path / "a").write_bytes(b"1" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"2" * 10)
    assert drop_page_cache(tmp_path) == 2 and drop_page_cache(tmp_path / "a") == 1


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_seeds_fashion_mnist_smoke(tmp_path):
    from amnesiac.cli import main
    assert main(["experiment", "seeds", "--config", "seeds_fashion_mnist", "--smoke", "--out",
                 str(tmp_path), "--json"]) == 0
    r = json.loads((tmp_path / "seeds" / "results.json").read_text())
    assert "fashion-mnist-smoke" in r["settings"], r["skipped"]
