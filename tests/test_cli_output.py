"""What the command line says: help for every option, a warning when a forget undoes most of a run, short
representations, progress that leaves no clutter, and a demo that cleans up after itself."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import amnesiac
from amnesiac.cli import build_parser
from amnesiac.cli import main as amnesiac_main

ROOT = Path(__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("name", sorted(subcommands(build_parser())))
def test_every_option_says_what_it_does_and_its_default(name):
    sub = subcommands(build_parser())[name]
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        what = action.option_strings or [action.dest]
        assert action.help and len(action.help) > 10, f"amnesiac {name} {what}: no help"
        says_default = ("default" in action.help or "required" in action.help or action.required
                        or not action.option_strings)
        assert says_default, f"amnesiac {name} {what}: the help does not give the default: {action.help!r}"


def test_forgetting_most_of_a_run_warns_and_names_the_plan_in_words(cli_run, tmp_path, capsys):
    # every batch holds a sample of class 0, so forgetting it undoes every step
    assert amnesiac_main(["forget", "--run", str(cli_run), "--classes", "0", "--out",
                          str(tmp_path / "a.safetensors")]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "100% of the run's steps" in warning[0]
    assert "--finetune-epochs" in warning[0] and "--method retrain" in warning[0] and "--keep-class" in warning[0]
    assert "(the initial weights: no step was kept)" in captured.out and "start-plus-others" not in captured.out
    assert "incomplete" not in captured.out
    # few steps: no warning, the other plan in words
    assert amnesiac_main(["forget", "--run", str(cli_run), "--classes", "3", "--out",
                          str(tmp_path / "b.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "warning" not in captured.err and "subtracted the" in captured.out


def test_run_and_report_print_as_short_summaries(cli_run):
    run = amnesiac.open_run(cli_run)
    text = repr(run)
    assert text.startswith(f"<Run {cli_run}: {run.num_steps} steps, codec fp32, complete, ") and "on disk>" in text
    report = run.unlearn_report(classes=[3])
    text = repr(report)
    assert text.startswith(f"<UnlearnReport: undid {report.steps_undone.size} of {run.num_steps} steps")
    assert "tensor(" not in text and len(text) < 200


def test_no_progress_clutter_in_logs_and_a_training_summary(tmp_path):
    """Output to a file (not a terminal): no bars and no empty "reducing: 0block"; train leaves one summary line."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def amnesiac_cli(*argv):
        return subprocess.run([sys.executable, "-m", "amnesiac.cli", *argv], env=env, capture_output=True,
                              text=True, timeout=300, cwd=tmp_path)

    r = amnesiac_cli("train", "--dataset", "synthetic", "--size", "300", "--model", "mlp", "--run", "run",
                     "--epochs", "2")
    assert r.returncode == 0, r.stderr
    summary = r.stderr.splitlines()[-1]
    assert summary.startswith("trained 8 steps in ") and "steps/s); 2 epochs done; mean loss" in summary
    assert "|" not in r.stderr and "\r" not in r.stderr
    r = amnesiac_cli("forget", "--run", "run", "--steps", "0-7", "--out", "f.safetensors")
    assert r.returncode == 0 and r.stderr.startswith("warning: this undid 100%"), r.stderr
    assert "block" not in r.stderr and "\r" not in r.stderr


def test_demo_says_what_it_does_and_removes_its_run(tmp_path, capsys, monkeypatch):
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert amnesiac_main(["demo", "--epochs", "2"]) == 0
    captured = capsys.readouterr()
    assert [line[:4] for line in captured.err.splitlines() if line[:1].isdigit()] == ["1/4 ", "2/4 ", "3/4 ", "4/4 "]
    assert "(removed; --keep DIR keeps it)" in captured.out
    assert not any(tmp_path.iterdir())
    assert amnesiac_main(["demo", "--keep", "6"]) == 2  # a count where a directory is meant
    assert "--keep-count 6" in capsys.readouterr().err
