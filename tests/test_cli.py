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


RUN_FAST = [
    "run",
    "--data",
    "synthetic",
    "--model",
    "mlp",
    "--width",
    "4",
    "--scale",
    "none",
    "--log-t-max",
    "4",
    "--saves",
    "4",
    "--no-progress",
    # a fast, coarse flow judged at its own coarse accuracy (the fidelity verdict passes,
    # so the run exits 0): the unscaled synthetic data's balance drift reaches about
    # 1.3e-4 at rtol 1e-5, and at rtol 1e-3 the error estimate is 6% of the margin's
    # scale; the folders and the command are under test here, not the accuracy
    "--rtol",
    "1e-3",
    "--accuracy",
    "0.1",
]


def test_run_writes_both_run_folders_and_plot(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(RUN_FAST + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "smoothed margin" in text and "normalized margin" in text
    for kind in ("gd", "flow"):
        for f in ("config.json", "trajectory.npz", "trajectory.csv", "params_final.npz"):
            assert (out / kind / f).is_file()
    assert (out / "plots.png").stat().st_size > 1000


def test_run_config_file_and_override(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        'dynamics = "gd"\nlr = 0.2\nschedule = "constant"\nlog-t-max = 2.0\nclasses = [0, 1]\n'
    )
    out = tmp_path / "r"
    assert main(RUN_FAST + ["--config", str(cfg), "--lr", "0.1", "--out", str(out)]) == 0
    import json

    meta = json.loads((out / "config.json").read_text())
    assert meta["config"]["lr"] == 0.1 and meta["config"]["schedule"] == "constant"
    assert meta["config"]["log_t_max"] == 4.0  # the flag in RUN_FAST overrides the file's 2.0
    assert meta["config"]["dynamics"] == "gd" and meta["kind"] == "gd"


def test_run_help_documents_every_option():
    r = subprocess.run(
        [sys.executable, "-m", "gflow", "run", "--help"],
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
        "--activation",
        "--loss",
        "--dynamics",
        "--lr",
        "--schedule",
        "--batch-size",
        "--clock",
        "--solver",
        "--rtol",
        "--atol",
        "--log-t-max",
        "--steps",
        "--saves",
        "--seed",
        "--dtype",
        "--out",
        "--config",
    ):
        assert opt in r.stdout, opt


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--lr", "-0.1"], "expected a positive number, got -0.1"),
        (["--solver", "rk45"], "unknown solver 'rk45'"),
        (["--solver", "tsit5", "--cfl", "0.5"], "no stability edge known for solver 'tsit5'"),
        (["--cfl", "1.5"], "expected a number in (0, 1]"),
        (["--dt", "0.1", "--cfl", "0.5"], "give --dt or --cfl, not both"),
        (["--log-t-max", "0"], "expected a positive number, got 0"),
        (["--log-t-max", "-5"], "expected a positive number, got -5"),
        (["--clock", "wall"], "invalid choice: 'wall'"),
    ],
)
def test_run_bad_values_exit_2_and_leave_no_folder(tmp_path, capsys, extra, needle):
    out = tmp_path / "r"
    try:
        rc = main(RUN_FAST + extra + ["--out", str(out)])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("learning_rate = 0.1\n")
    out = tmp_path / "r"
    assert main(RUN_FAST + ["--config", str(cfg), "--out", str(out)]) == 2
    assert "unknown config key 'learning_rate'" in capsys.readouterr().err
    assert not out.exists()
