"""Every experiment in --smoke mode (seconds), the report it writes, and the command-line pieces of issue 5."""

from __future__ import annotations

import json

import pytest

from amnesiac.cli import main as amnesiac_main
from amnesiac.experiments import EXPERIMENTS, run_experiment


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_smoke(name, tmp_path):
    result = run_experiment(name, out=tmp_path, smoke=True, quiet=True)
    out = tmp_path / name
    report = (out / "report.md").read_text()
    assert result["settings"], result.get("skipped")
    assert report.startswith("# Experiment") and "| " in report and "--smoke" in report
    assert list(out.glob("*.png")), "a plot per setting"
    saved = json.loads((out / "results.json").read_text())
    assert saved["smoke"] is True and saved["settings"].keys() == result["settings"].keys()
    assert not (out / "runs").exists()  # run directories are removed unless --keep-runs
    if name == "mnist":
        rows = next(iter(result["settings"].values()))["rows"]
        assert {"original", "amnesiac", "amnesiac-finetune", "retrain", "finetune", "relabel", "neggrad"} <= set(rows)
        assert rows["amnesiac"]["metrics"]["test"]["forgotten"] == 0.0  # the class is gone
        assert rows["retrain"]["metrics"]["distance"]["weights_l2"] == 0.0
        assert "paper" in report
    if name == "fraction":
        points = next(iter(result["settings"].values()))["points"]
        assert [p["steps_undone"] for p in points] == sorted(p["steps_undone"] for p in points)
        assert "speed" not in str(points)  # a curve, no speed claim (issue 12)
    if name == "ulira":
        r = result["settings"]["digits-smoke"]
        assert r["shadow_runs"] >= 4 and set(r["attack"]) >= {"original", "amnesiac", "amnesiac-finetune",
                                                              "retrain-control", "neggrad", "relabel", "finetune"}
    if name == "seeds":
        r = result["settings"]["digits-smoke"]
        assert len(r["replicates"]) == 2 and r["replicates"][0]["ensemble_size"] == 3
        assert {"original", "retrain", "amnesiac", "amnesiac-finetune", "neggrad"} <= set(r["summary"]["table"])
        t = r["replicates"][0]["timing"]
        assert len(t["amnesiac_seconds"]) == 3 and len(t["retrain_seconds"]) == 3 and t["break_even_requests"]
        assert "auc_ci95" in r["replicates"][0]["metrics"]["amnesiac"]["mia_shadow"]


def test_missing_data_file_is_skipped_not_fatal(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"forget_class": 3, "settings": [
        {"name": "nowhere", "dataset": "npz", "data_path": str(tmp_path / "missing.npz"), "keep_class": 3}],
        "methods": {"amnesiac": {}}}))
    result = run_experiment("mnist", config=config, out=tmp_path, quiet=True)
    assert "nowhere" in result["skipped"] and not result["settings"]


def test_cli_experiment_and_bad_name(tmp_path, capsys):
    assert amnesiac_main(["experiment", "codecs", "--smoke", "--out", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experiment"] == "codecs"
    config = tmp_path / "bad.json"
    config.write_text("{not json")
    assert amnesiac_main(["experiment", "mnist", "--config", str(config)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["amnesiac", "amnesiac-finetune", "retrain", "finetune", "relabel", "neggrad"])
def test_cli_forget_methods(cli_run, method, tmp_path, capsys):
    out = tmp_path / f"{method}.safetensors"
    assert amnesiac_main(["forget", "--run", str(cli_run), "--classes", "3", "--method", method, "--out", str(out),
                          "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == method and result["seconds"] > 0 and out.is_file()
    ev = json.loads(_eval(cli_run, out, capsys))
    assert ev["method"] == method and ev["test"]["forgotten"] is not None


def _eval(run, weights, capsys, *extra):
    assert amnesiac_main(["eval", "--run", str(run), "--weights", str(weights), "--forget-classes", "3", "--json",
                          *extra]) == 0
    return capsys.readouterr().out


def test_cli_eval_metrics(cli_run, tmp_path, capsys):
    ref, am = tmp_path / "retrain.safetensors", tmp_path / "am.safetensors"
    for method, path in (("retrain", ref), ("amnesiac", am)):
        assert amnesiac_main(["forget", "--run", str(cli_run), "--classes", "3", "--method", method, "--out",
                              str(path), "--json"]) == 0
    capsys.readouterr()
    ev = json.loads(_eval(cli_run, am, capsys, "--reference", str(ref), "--shadows", "1"))
    assert {"test", "train", "forget_set", "mia_loss", "mia_shadow", "distance", "storage", "seconds"} <= set(ev)
    assert ev["forget_set"] == 0.0 and ev["test"]["forgotten"] == 0.0
    assert ev["storage"]["steps"] > 0 and ev["storage"]["delta_bytes"] > 0
    assert ev["distance"]["weights_l2"] > 0 and 0 <= ev["distance"]["test_agreement"] <= 1
    same = json.loads(_eval(cli_run, ref, capsys, "--reference", str(ref)))
    assert same["distance"]["weights_l2"] == 0.0 and same["distance"]["test_agreement"] == 1.0
