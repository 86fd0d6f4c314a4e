"""Small recorded runs shared by the deletion-request and retention tests (loaded by file path: the tests run in
pytest's importlib mode)."""

from __future__ import annotations

from pathlib import Path

import torch

import amnesiac
from deltastore import DeltaStore

STEPS, BATCH = 14, 4


def record(path: Path, *, codec="fp32", backend="zarr", steps=STEPS, seed=0):
    """A small BatchNorm net, SGD with momentum; step t trains on ids 100*t .. 100*t+3, plus id 7 at t = 2, 9."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with amnesiac.Recorder(model, opt, path, codec=codec, backend=backend, durable=False) as rec:
        for t in range(steps):
            ids = [100 * t + i for i in range(BATCH)] + ([7] if t in (2, 9) else [])
            rec.epoch = t // 5
            rec.add_batch(ids, labels=[i % 3 for i in ids])
            g = torch.Generator().manual_seed(t)
            x, y = torch.randn(len(ids), 5, generator=g), torch.tensor([i % 3 for i in ids])
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
    return model


def flat(state):
    return torch.cat([v.float().reshape(-1) for k, v in sorted(state.items()) if v.is_floating_point()])


def step_files(path: Path) -> list[Path]:
    """Every step data file of the committed generation (both backends)."""
    store = DeltaStore.open(path)
    return [p for p in (store.data_dir / "deltas").rglob("*") if p.is_file() and p.name != "zarr.json"]
