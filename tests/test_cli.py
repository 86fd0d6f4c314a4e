"""Every command of both command lines, end to end, on small real runs."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from amnesiac.cli import main as amnesiac_main
from amnesiac.cli import parse_ints
from deltastore.cli import main as deltastore_main


def run_json(main, argv, capsys):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_train_info_verify(cli_run, capsys):
    info = run_json(deltastore_main, ["info", str(cli_run), "--json"], capsys)
    assert info["steps"] > 0 and info["codec"] == "fp32" and info["status"] == "complete"
    assert {"bytes_on_disk", "raw_fp32_bytes", "ratio"} <= set(info)
    report = run_json(deltastore_main, ["verify", str(cli_run), "--json"], capsys)
    assert report["ok"] and report["steps_checked"] == info["steps"]
    assert deltastore_main(["info", str(cli_run)]) == 0
    assert "ratio" in capsys.readouterr().out


def test_forget_and_eval(cli_run, tmp_path, capsys):
    out = tmp_path / "forgot.safetensors"
    result = run_json(amnesiac_main, ["forget", "--run", str(cli_run), "--classes", "3", "--out", str(out),
                                      "--finetune-epochs", "1", "--json"], capsys)
    assert 0 < result["steps_undone"] < result["total_steps"] and out.is_file()
    assert len(load_file(out)) == 6  # the MLP's three linear layers
    ev = run_json(amnesiac_main, ["eval", "--run", str(cli_run), "--weights", str(out), "--forget-classes", "3",
                                  "--json"], capsys)
    assert ev["test"]["retained"] > 0.6
    # the same file again needs --overwrite; nothing is written
    assert amnesiac_main(["forget", "--run", str(cli_run), "--samples", "1", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_forget_errors_exit_2_with_a_remedy(cli_run, tmp_path, capsys):
    assert amnesiac_main(["forget", "--run", str(tmp_path), "--classes", "3", "--out",
                          str(tmp_path / "x.safetensors")]) == 2
    assert "not a delta store or run directory" in capsys.readouterr().err
    assert amnesiac_main(["forget", "--run", str(cli_run), "--samples", "999999", "--out",
                          str(tmp_path / "x.safetensors")]) == 2
    assert "never appear" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    assert deltastore_main(["info", str(tmp_path)]) == 2


def test_demo_json(tmp_path, capsys):
    result = run_json(amnesiac_main, ["demo", "--run", str(tmp_path / "demo"), "--epochs", "4", "--json"], capsys)
    rows = result["rows"]
    assert rows["amnesiac"]["forgotten"] <= rows["trained"]["forgotten"]
    assert result["steps_undone"] < result["total_steps"]


def test_parse_ints(tmp_path):
    assert parse_ints("1,2,5-7") == [1, 2, 5, 6, 7]
    (tmp_path / "ids.txt").write_text("4 5\n9")
    assert parse_ints(f"@{tmp_path / 'ids.txt'}") == [4, 5, 9]


def test_cli_refuses_options_it_would_ignore(cli_run, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert amnesiac_main(["forget", "--run", str(cli_run), "--classes", "3", "--method", "retrain",
                          "--finetune-epochs", "2", "--out", out]) == 2
    assert "--epochs" in capsys.readouterr().err
    assert amnesiac_main(["eval", "--run", str(cli_run), "--forget-classes", "3", "--forget-samples", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert amnesiac_main(["eval", "--run", str(cli_run), "--shadows", "1"]) == 2
    assert "forget set" in capsys.readouterr().err


def test_eval_text_output_survives_undefined_metrics(cli_run, capsys):
    """A forget set of one sample: AUCs and such can be undefined; the text output says n/a instead of crashing."""
    from amnesiac import open_run
    sample = int(open_run(cli_run).sample_ids()[0])
    assert amnesiac_main(["eval", "--run", str(cli_run), "--forget-samples", str(sample), "--shadows", "1"]) == 0
    text = capsys.readouterr().out
    assert "forget set: accuracy" in text and "shadow models' accuracy" in text
    from amnesiac.cli import _f, _p
    assert _f(None) == "n/a" and _p(None) == "n/a" and _f(0.12345) == "0.123"
