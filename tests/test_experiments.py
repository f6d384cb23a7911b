"""The paper's experiment scripts run end to end on tiny inputs the tests write."""

import json
import sys
from pathlib import Path

import pytest

from tests.test_data import make_cifar_dir

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


@pytest.fixture
def experiments_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXPERIMENTS))


@pytest.mark.slow  # VGG-16 compiles for about a minute on 2 cores
def test_paper_cifar_on_a_tiny_generated_cifar_set(tmp_path, experiments_on_path):
    (tmp_path / "cifar").mkdir()
    make_cifar_dir(tmp_path / "cifar", n=12)
    import paper_cifar

    summary = paper_cifar.main(
        [
            "--data",
            f"cifar10:{tmp_path / 'cifar'}",
            "--train",
            "40",
            "--test",
            "12",
            "--epochs",
            "2",
            "--width",
            "0.0625",
            "--batch",
            "20",
            "--out",
            str(tmp_path / "run"),
        ]
    )
    assert set(summary["runs"]) == {"constant", "loss-based"}
    for run in summary["runs"].values():
        assert run["epochs"] == 2 and run["status"] == "completed"
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["runs"]["loss-based"]["epochs"] == 2
    assert (tmp_path / "run" / "constant" / "trajectory.csv").is_file()
    del sys.modules["paper_cifar"]
