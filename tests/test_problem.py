"""``gflow.problem.Problem``: the CLI's problem as a library value, same defaults."""

import json

import jax
import numpy as np
import pytest

from gflow.cli import build_parser, main
from gflow.problem import RUN_DEFAULTS, Problem


def test_the_command_line_takes_its_defaults_from_problem():
    args = build_parser().parse_args(["run"])
    for name, value in RUN_DEFAULTS.items():
        assert getattr(args, name) == value, name
    assert Problem().n == args.n == 300


def test_a_gflow_run_folder_rebuilds_the_same_problem(tmp_path):
    out = tmp_path / "run"
    argv = ["run", "--data", "digits", "--classes", "3,8", "--n", "40", "--model", "linear",
            "--loss", "exp", "--seed", "5", "--dynamics", "gd", "--steps", "3", "--no-plot",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    cfg = json.loads((out / "config.json").read_text())["config"]
    p = Problem.from_config(cfg)
    assert p == Problem(data="digits", classes=(3, 8), n=40, model="linear", loss="exp", seed=5)
    ds, _, obj, p0 = p.build()
    saved = np.load(out / "trajectory.npz")
    # the rebuilt objective at the rebuilt initial parameters gives the run's first row
    from gflow.objective import log_loss

    assert float(log_loss(obj, p0)) == pytest.approx(saved["col/log_loss"][0], rel=1e-14)
    assert len(ds) == 40


def test_problem_values_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        Problem(dtype="float16")
    with pytest.raises(ValueError, match="n must be"):
        Problem(n=0)
    assert Problem.from_config({"model": "mlp"}) is None  # not a gflow run's config


def test_devices_auto_takes_the_most_that_divide_n():
    _, _, obj, _ = Problem(data="synthetic", model="linear", n=40, devices="auto").build()
    assert obj.num_samples == 40 and jax.device_count() >= 1
