"""The amnesiac side of issue 9: errors are classified by what they are, one selection type, one training setting,
configs from the package, data paths from options or AMNESIAC_DATA, small modules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import amnesiac
from amnesiac import RunDamagedError, SelectionError
from amnesiac.experiments import EXPERIMENTS
from amnesiac.experiments.common import packaged_configs, read_config, resolve_config
from amnesiac.selection import Selection
from amnesiac.setting import TrainingSetting
from deltastore import DeviceUnavailableError


def _small_run(path: Path) -> amnesiac.Run:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with amnesiac.Recorder(model, opt, path, durable=False) as rec:
        for step in range(3):
            rec.add_batch([step], labels=[step % 2])
            model(torch.ones(1, 3)).sum().backward()
            opt.step()
            opt.zero_grad()
    return amnesiac.open_run(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_unlearn_on_cuda_without_cuda_says_cuda_is_missing(tmp_path):
    run = _small_run(tmp_path / "run")
    with pytest.raises(DeviceUnavailableError, match="CUDA is not available") as info:
        run.unlearn(steps=[1], device="cuda")
    assert not isinstance(info.value, RunDamagedError)


def test_a_programming_error_is_not_reported_as_a_damaged_run(tmp_path, monkeypatch):
    run = _small_run(tmp_path / "run")

    def broken():
        raise AttributeError("'NoneType' object has no attribute 'values'")  # a bug, not damage
    monkeypatch.setattr(run.store, "metadata", broken)
    with pytest.raises(AttributeError):
        run.steps_for(sample_ids=[1])
    monkeypatch.setattr(run.store, "metadata", lambda: (_ for _ in ()).throw(KeyError("ids")))  # malformed data
    run.refresh()
    with pytest.raises(RunDamagedError, match="deltastore verify"):
        run.steps_for(sample_ids=[1])


def test_one_selection_rule_everywhere(tmp_path):
    assert Selection.of(steps=torch.tensor([2, 0])).kwargs() == {"steps": [2, 0]}
    with pytest.raises(SelectionError, match="exactly one"):
        Selection.of()
    with pytest.raises(SelectionError, match="integers"):
        Selection.of(sample_ids=[1.5])
    with pytest.raises(SelectionError, match="steps= is not a selection here"):
        Selection.of(steps=[1], kinds=("sample_ids", "classes"))
    run = _small_run(tmp_path / "run")
    assert run.unlearn_report(classes=[1]).steps_undone.tolist() == [1]
    with pytest.raises(SelectionError, match="exactly one"):
        run.steps_for(sample_ids=[1], classes=[1])


def test_training_setting_defaults_for_a_run_recorded_from_python(tmp_path):
    setting = TrainingSetting.of_run(_small_run(tmp_path / "run"))
    assert setting == TrainingSetting()
    with pytest.raises(amnesiac.AmnesiacError, match="model and data description"):
        setting.require_model("the baselines")


def test_every_experiment_has_a_packaged_config():
    assert set(EXPERIMENTS) <= set(packaged_configs())
    for name in packaged_configs():
        cfg, path = read_config(name)
        assert path is None and cfg["settings"], name
        assert not any("shared" in str(s.get("data_path", "")) for s in cfg["settings"]), "no repository layout"


def test_relative_data_paths_come_from_the_data_folder(tmp_path, monkeypatch):
    raw, _ = read_config("mnist")
    monkeypatch.delenv("AMNESIAC_DATA", raising=False)
    unresolved = resolve_config(raw, base=None, smoke=False)
    assert [s["data_path"] for s in unresolved["settings"] if s["dataset"] == "npz"] == ["mnist10k.npz"] * 2
    monkeypatch.setenv("AMNESIAC_DATA", str(tmp_path))
    resolved = resolve_config(raw, base=None, smoke=False)
    assert {s["data_path"] for s in resolved["settings"] if s["dataset"] == "npz"} == {str(tmp_path / "mnist10k.npz")}
    explicit = resolve_config(raw, base=None, smoke=False, data_dir=tmp_path / "other")
    assert {s["data_path"] for s in explicit["settings"] if s["dataset"] == "npz"} == \
        {str(tmp_path / "other" / "mnist10k.npz")}


def test_a_missing_relative_data_file_is_skipped_with_the_remedy(tmp_path, monkeypatch):
    from amnesiac.experiments import run_experiment
    monkeypatch.delenv("AMNESIAC_DATA", raising=False)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"forget_class": 3, "settings": [
        {"name": "elsewhere", "dataset": "npz", "data_path": "nowhere.npz", "keep_class": 3}],
        "methods": {"amnesiac": {}}}))
    result = run_experiment("mnist", config=config, out=tmp_path / "out", quiet=True, data_dir=tmp_path / "data")
    assert "AMNESIAC_DATA" in result["skipped"]["elsewhere"]


def test_no_module_of_amnesiac_is_over_400_lines():
    root = Path(amnesiac.__file__).resolve().parent
    long = {str(p.relative_to(root)): n for p in root.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
