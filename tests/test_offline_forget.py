"""Offline unlearning: `amnesiac forget` on a run directory copied elsewhere, with no training code and no original."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

import amnesiac
from amnesiac.cli import main as amnesiac_main

N, BATCH, EPOCHS = 64, 16, 2


def record_run(model, run_dir, backend):
    g = torch.Generator().manual_seed(0)
    x, y, ids = torch.randn(N, 1, 8, 8, generator=g), torch.randint(0, 4, (N,), generator=g), torch.arange(500, 500 + N)
    loader = DataLoader(TensorDataset(x, y, ids), batch_size=BATCH, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with amnesiac.Recorder(model, opt, run_dir, codec="fp32", backend=backend, durable=False) as rec:
        for _ in range(EPOCHS):
            for xb, yb, ib in loader:
                rec.add_batch(ib, labels=yb)
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
                opt.step()


@pytest.mark.parametrize("backend", ["zarr", "safetensors"])
def test_forget_on_a_copied_run(tmp_path, bn_model, backend, capsys):
    original = tmp_path / "original"
    record_run(bn_model, original, backend)
    expected = amnesiac.open_run(original).unlearn_report(sample_ids=[503, 540])
    copy = tmp_path / "elsewhere" / "run"
    shutil.copytree(original, copy)
    shutil.rmtree(original)  # the copy must stand alone

    out = tmp_path / "forgot.safetensors"
    assert amnesiac_main(["forget", "--run", str(copy), "--samples", "503,540", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert "reducing" not in captured.err  # --json: no progress bar
    assert EPOCHS <= result["steps_undone"] <= 2 * EPOCHS  # each sample is seen once per epoch
    assert result["steps_undone"] == expected.steps_undone.size
    assert result["total_steps"] == EPOCHS * N // BATCH
    assert result["encoded_bytes_read"] > 0 and result["raw_fp32_bytes_read"] > 0
    assert result["seconds"] >= 0 and result["plan"] == expected.plan
    state = load_file(str(out))
    assert set(state) == set(expected.state)
    for k, v in expected.state.items():
        assert torch.allclose(state[k], v, atol=1e-6), k
    bn_model.load_state_dict(state)  # a complete state_dict for the model


def test_forget_shows_a_progress_bar_without_json(tmp_path, bn_model, capsys, monkeypatch):
    record_run(bn_model, tmp_path / "run", "zarr")
    out = tmp_path / "forgot.safetensors"
    monkeypatch.setattr("amnesiac.cli.interactive", lambda: True)  # bars are drawn on terminals only
    assert amnesiac_main(["forget", "--run", str(tmp_path / "run"), "--steps", "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "reducing" in captured.err  # tqdm's bar, on stderr
    assert "undid" in captured.out and out.is_file()
