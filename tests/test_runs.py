"""``gflow.runs``: one translation of ``RunOptions`` into the drivers' arguments, used
by single and ``--seeds`` runs alike (issue 30: the two had drifted apart, so that
``--seeds K --save-params`` kept no snapshots and the seeds' GD dropped
``--log-loss-min``)."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from gflow.cli import main
from gflow.dynamics import run_flow, run_flow_seeds, run_gd, run_gd_seeds
from gflow.runs import RunOptions, driver_args
from gflow.trajectory import Trajectory

# a value away from the default for every option a driver reads
MOVED = dict(log_t_max=7.0, log_loss_min=-3.0, saves=9, log_t_min=0.5, save_params=True,
             schedule="constant", lr=0.02, alpha0=0.3, loss_ub=2.0, batch_size=7, steps=11,
             sharpness_every=3, clock="time", solver="tsit5", rtol=1e-4, atol=1e-7,
             dt=0.01, cfl=0.2, input_span="off", kinks=True, kink_fallback=7.0)  # fmt: skip


@pytest.mark.parametrize("kind", ["gd", "flow"])
def test_every_driver_option_reaches_single_and_seeds_runs(kind):
    """Every option of ``MOVED`` changes the translation (so it reaches the driver), and
    every argument of the translation is one that both the single and the batched driver
    take."""
    base = RunOptions()
    got = driver_args(base, kind)
    single, many = (run_gd, run_gd_seeds) if kind == "gd" else (run_flow, run_flow_seeds)
    for fn in (single, many):
        params = inspect.signature(fn).parameters
        assert set(got) <= set(params), (fn.__name__, set(got) - set(params))
    fields = {f.name for f in dataclasses.fields(RunOptions)}
    reached = []
    for name, value in MOVED.items():
        assert name in fields, name
        moved = dataclasses.replace(base, **{name: value})
        if driver_args(moved, kind) != got:
            reached.append(name)
    common = ["log_t_max", "log_loss_min", "saves", "log_t_min", "save_params", "steps"]
    own = (["schedule", "lr", "alpha0", "loss_ub", "batch_size", "sharpness_every"]
           if kind == "gd" else
           ["clock", "solver", "rtol", "atol", "dt", "cfl", "input_span", "kinks",
            "kink_fallback"])  # fmt: skip
    missing = sorted(set(common + own) - set(reached))
    # --kink-fallback is read under --kinks only
    assert missing in ([], ["kink_fallback"]), missing
    kinked = dataclasses.replace(base, kinks=True)
    assert kind == "gd" or driver_args(dataclasses.replace(kinked, kink_fallback=7.0), kind) \
        != driver_args(kinked, kind)


def test_seeds_keep_snapshots_and_stop_at_the_loss_target(tmp_path):
    """``--seeds 2 --save-params`` keeps each seed's snapshots, as a single run does, and
    ``--log-loss-min`` stops each seed's GD."""
    out = tmp_path / "runs"
    argv = ["run", "--data", "synthetic", "--model", "linear", "--n", "40", "--dynamics",
            "gd", "--log-t-max", "6", "--saves", "6", "--no-plot", "--no-progress",
            "--seeds", "2", "--save-params", "--log-loss-min", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) in (0, 1)
    for seed in (0, 1):
        tr = Trajectory.load(out / "gd" / f"seed-{seed}")
        assert len(tr.snapshots) == len(tr) > 1
        assert tr["log_loss"][-1] <= 0.0 and np.all(tr["log_loss"][:-1] > 0.0)
        assert "target" in tr.message, tr.message
