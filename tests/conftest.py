from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST10K = SHARED_DATA / "mnist10k.npz"

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip cleanly without a GPU (``pytest -m cuda`` selects them where there is one)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


class SmallBNNet(nn.Module):
    """Conv + BatchNorm + Linear: floating buffers (running stats) and an integer one (num_batches_tracked)."""

    def __init__(self, classes: int = 4):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture
def bn_model():
    torch.manual_seed(0)
    return SmallBNNet()


@pytest.fixture
def mnist10k():
    if not MNIST10K.is_file():
        pytest.skip(f"{MNIST10K} is not present")
    return MNIST10K


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """One small run recorded through the command line (digits, MLP, 10 threes kept), shared read-only by the CLI
    tests of several modules."""
    from amnesiac.cli import main as amnesiac_main
    run = tmp_path_factory.mktemp("cli") / "run"
    assert amnesiac_main(["train", "--dataset", "digits", "--model", "mlp", "--run", str(run), "--epochs", "3",
                          "--keep-class", "3", "--keep-count", "10", "--json"]) == 0
    return run
