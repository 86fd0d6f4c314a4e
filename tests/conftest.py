from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

# 10,000 real MNIST digits (arrays images, labels). Found in $AMNESIAC_DATA, else in the team's shared folder next to
# the repository (../shared/data); a fresh clone has neither and the tests that need it say so when they skip.
DATA_ENV = "AMNESIAC_DATA"
MNIST10K_NAME = "mnist10k.npz"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def find_mnist10k() -> tuple[Path | None, str]:
    """The mnist10k.npz file, or None and where it was looked for."""
    places = ([Path(os.environ[DATA_ENV]).expanduser()] if os.environ.get(DATA_ENV) else []) + [SHARED_DATA]
    for folder in places:
        if (folder / MNIST10K_NAME).is_file():
            return folder / MNIST10K_NAME, ""
    looked = " or ".join(str(p / MNIST10K_NAME) for p in places)
    return None, (f"{MNIST10K_NAME} (10,000 real MNIST digits) is not in {looked}; set {DATA_ENV} to the folder "
                  "that holds it to run this test")

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
def mnist10k() -> Path:
    """The path of mnist10k.npz; the test skips, saying where it looked and how to supply it, when it is absent."""
    path, why = find_mnist10k()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="session")
def cli_run(tmp_path_factory):
    """One small run recorded through the command line (digits, MLP, 10 threes kept), shared read-only by the CLI
    tests of several modules."""
    from amnesiac.cli import main as amnesiac_main
    run = tmp_path_factory.mktemp("cli") / "run"
    assert amnesiac_main(["train", "--dataset", "digits", "--model", "mlp", "--run", str(run), "--epochs", "3",
                          "--keep-class", "3", "--keep-count", "10", "--json"]) == 0
    return run
