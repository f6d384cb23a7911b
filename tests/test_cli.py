"""The gflow command: the demo runs on real data, bad values exit 2 with one line."""

import subprocess
import sys

import pytest

from gflow.cli import main


def test_demo_on_digits(capsys):
    rc = main(
        [
            "demo",
            "--data",
            "digits",
            "--model",
            "cnn",
            "--width",
            "3",
            "--n",
            "50",
            "--bias",
            "first",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "homogeneity of order 3: holds" in out
    assert "log Loss (sum)" in out and "smoothed margin" in out


def test_demo_reports_broken_homogeneity(capsys):
    rc = main(
        [
            "demo",
            "--data",
            "synthetic",
            "--model",
            "mlp",
            "--width",
            "4",
            "--depth",
            "3",
            "--bias",
            "all",
        ]
    )
    assert rc == 0
    assert "BROKEN" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["demo", "--data", "nope"], "unknown data source 'nope'"),
        (["demo", "--classes", "0,42", "--data", "digits"], "class 42 is not present"),
        (["demo", "--n", "-3"], "expected a positive integer, got -3"),
        (["demo", "--model", "resnet"], "invalid choice: 'resnet'"),
        (
            ["demo", "--loss", "exp", "--classes", "0,1,2", "--data", "digits"],
            "loss 'exp' is binary",
        ),
        (["demo", "--data", "mnist-idx:/nonexistent"], "does not exist"),
    ],
)
def test_bad_values_exit_2_with_one_line(argv, needle, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert "Traceback" not in err
    assert len([l for l in err.splitlines() if l.startswith("gflow: error")]) == 1


def test_module_entry_point_help():
    r = subprocess.run(
        [sys.executable, "-m", "gflow", "demo", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0
    for opt in (
        "--data",
        "--classes",
        "--n",
        "--model",
        "--width",
        "--depth",
        "--bias",
        "--loss",
        "--dtype",
    ):
        assert opt in r.stdout
