"""K seeds in one vmapped GD or flow run equal K separate runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gflow.dynamics import run_flow, run_flow_seeds, run_gd, run_gd_seeds
from gflow.dynamics.driver import ESTIMATE_COLUMNS
from gflow.invariants import MONITOR_COLUMNS
from tests.conftest import adaptive, digits_inits


@pytest.fixture(scope="module")
def problem(small):
    """``small``'s objective and three initialisations of its model (seeds 3, 4, 5)."""
    return small[0], digits_inits((3, 4, 5), 60, width=8)


@pytest.mark.parametrize(
    "kw",
    [
        dict(schedule="loss-based", log_t_max=20.0, saves=8),
        dict(schedule="constant", lr=0.5, log_t_max=4.0, saves=6),
        dict(schedule="loss-based", batch_size=20, log_t_max=8.0, saves=5),
    ],
    ids=["loss-based", "constant", "sgd"],
)
def test_vmapped_seeds_equal_separate_runs(problem, kw):
    obj, inits = problem
    seeds = [3, 4, 5]
    together = run_gd_seeds(obj, inits, seeds=seeds, **kw)
    assert len(together) == 3
    for p0, s, tr in zip(inits, seeds, together, strict=True):
        alone = run_gd(obj, p0, seed=s, **kw)
        assert tr.status == alone.status and tr.message == alone.message
        assert len(tr) == len(alone) and tr.config["seed"] == s
        for c in alone.column_names:
            if c == "t":  # e^(log t): log t's rounding times log t; log t itself is compared
                continue
            if c == "dissipation_defect":  # |Delta log Loss + D| / |Delta log Loss|: its
                continue  # two terms, log_loss and dissipation, are compared to rtol
            np.testing.assert_allclose(tr[c], alone[c], rtol=1e-12, atol=1e-300, err_msg=c)
        for a, b in zip(jax.tree.leaves(tr.final_params), jax.tree.leaves(alone.final_params),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max())
    # different seeds: different runs
    assert together[0]["log_loss"][-1] != together[1]["log_loss"][-1]


def test_seeds_need_one_init_each(problem):
    obj, inits = problem
    with pytest.raises(ValueError, match="one seed per initialisation"):
        run_gd_seeds(obj, inits, seeds=[1, 2])


@pytest.fixture(scope="module")
def smooth_problem(smooth):
    """Linear activations: a smooth flow, on which adaptive steps are cheap (``smooth``'s
    objective, its model's initialisations from seeds 3, 4, 5)."""
    return smooth[0], digits_inits((3, 4, 5), 60, width=8, activation="linear")


def _same_runs(together, alone, rtol):
    """Same steps, evaluations, status and rows; values to ``rtol``."""
    for tr, one in zip(together, alone, strict=True):
        assert (tr.status, tr.message) == (one.status, one.message)
        assert len(tr) == len(one)
        for c in ("step", "solver_steps", "grad_evals", "rejected"):
            np.testing.assert_array_equal(tr[c], one[c], err_msg=c)
        for c in one.column_names:
            if c == "t":  # e^(log t): log t's rounding times log t; log t itself is compared
                continue
            if c == "dissipation_defect":  # |Delta log Loss + D| / |Delta log Loss|: its
                continue  # two terms, log_loss and dissipation, are compared to rtol
            # log t and log Loss cross 0: an absolute floor of rtol on the log columns; the
            # invariant monitors are relative errors near 0 (of rho^2-scaled invariants, of
            # the log-loss change), and so are the error estimates (differences of two runs'
            # states), so rtol is their absolute floor too
            near_zero = MONITOR_COLUMNS + ESTIMATE_COLUMNS
            atol = rtol if c.startswith("log_") or c in near_zero else 1e-300
            if c == "dissipation":  # moved with log Loss by the event's location: dD = -d log Loss
                atol = rtol * np.abs(one["log_loss"]).max()
            np.testing.assert_allclose(tr[c], one[c], rtol=rtol, atol=atol, err_msg=c)
        for a, b in zip(jax.tree.leaves(tr.final_params), jax.tree.leaves(one.final_params),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(a, b, rtol=0, atol=rtol * np.abs(b).max())


# Fixed steps, or adaptive ones on a smooth network: no decision turns on rounding,
# and the runs agree to rounding. On the loss
# clock, save points are events that bisection locates to 1e-13 relative in
# z = log(1 + t): a batched product's last-bit difference can move one bisection
# step, so log t and the quantities there agree to ~1e-12 (measured <= 2.1e-11 on log
# Loss at t = 1, where it falls ~ 200 per unit of log(1 + t)).
FLOW_CASES = {
    "rk4-dt-logt": ("relu", dict(clock="logt", solver="rk4", dt=0.01, log_t_max=4.0, saves=4),
                    1e-12),
    "tsit5-time": ("linear", dict(clock="time", solver="tsit5", log_t_max=4.0, saves=4), 1e-12),
    # Tsit5 warm-up, then RK4 at 0.9 of its stability edge, on ReLU: the adaptive warm-up
    # crosses kinks, where the field jumps, so a rounding difference between batch sizes
    # (run_flow is this driver with K = 1) is not bounded by rounding times a smooth
    # growth; the bound is the solver's tolerance, rtol = 1e-4. The same step and
    # evaluation counts (compared exactly) show that each run took its own steps.
    "rk4-cfl-loss": ("relu", dict(clock="loss", solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7,
                                  log_t_max=8.0, saves=4), 1e-4),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FLOW_CASES))
def test_vmapped_flow_seeds_equal_separate_runs(problem, smooth_problem, case):
    act, kw, rtol = FLOW_CASES[case]
    obj, inits = problem if act == "relu" else smooth_problem
    seen = []
    together = run_flow_seeds(obj, inits, seeds=[3, 4, 5], progress=seen.append, **kw)
    alone = [run_flow(obj, p0, **kw) for p0 in inits]
    _same_runs(together, alone, rtol)
    assert [tr.config["seed"] for tr in together] == [3, 4, 5]
    assert len(seen) == sum(len(tr) for tr in together)
    assert {r["seed"] for r in seen} == {3, 4, 5}
    assert together[0]["log_loss"][-1] != together[1]["log_loss"][-1]


def test_vmapped_flow_seeds_stop_each_on_its_own(smooth_problem):
    """A step budget ends each run at its own save point while the others go on."""
    obj, inits = smooth_problem
    kw = dict(clock="loss", **adaptive(1e-6, 1e-9), log_t_max=10.0, saves=10, max_steps=60)
    together = run_flow_seeds(obj, inits, seeds=[3, 4, 5], **kw)
    alone = [run_flow(obj, p0, **kw) for p0 in inits]
    _same_runs(together, alone, 1e-10)
    assert len({len(tr) for tr in together}) > 1  # three different stops
    assert {tr.status for tr in together} == {"stopped"}


def test_vmapped_flow_seed_failure_keeps_the_others(problem):
    """One run failing (a fixed step far past stability from a small init: its save-point
    event cannot be located) fails alone, with its last finite row kept; the other
    completes."""
    obj, inits = problem
    small = jax.tree.map(lambda a: 0.3 * a, inits[0])
    kw = dict(clock="loss", solver="rk4", dt=200.0, log_t_max=6.0, saves=3)
    together = run_flow_seeds(obj, [small, inits[1]], seeds=[1, 2], **kw)
    alone = [run_flow(obj, p0, **kw) for p0 in (small, inits[1])]
    assert [tr.status for tr in together] == ["failed", "completed"]
    _same_runs(together, alone, 1e-12)


@pytest.mark.slow  # about 40 s: the library's seeds tests stay in the default run
def test_gflow_run_seeds_writes_a_folder_per_seed_and_bands(tmp_path, capsys):
    import json

    from gflow.cli import main
    from gflow.trajectory import Trajectory

    out = tmp_path / "run"
    argv = ["run", "--seeds", "3", "--seed", "7", "--n", "60", "--width", "8", "--log-t-max",
            "5", "--saves", "4", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gd normalized_margin" in printed and "mean" in printed
    summary = json.loads((out / "summary.json").read_text())
    for kind in ("gd", "flow"):
        assert [r["seed"] for r in summary[kind]] == [7, 8, 9]
        runs = [Trajectory.load(out / kind / f"seed-{s}") for s in (7, 8, 9)]
        assert [tr.config["seed"] for tr in runs] == [7, 8, 9]
        assert all((out / kind / f"seed-{s}" / "checks.json").is_file() for s in (7, 8, 9))
        assert len({float(tr["log_loss"][0]) for tr in runs}) == 3  # three initialisations
    assert (out / "plots.png").stat().st_size > 10_000
    assert not (out / "gd" / "checkpoint").exists()  # cleared once every run completed


@pytest.mark.slow
def test_gflow_run_seeds_resumes_after_a_crash(tmp_path, capsys):
    """Killed part-way through the flow, ``--resume`` ends with the same files."""
    import gflow.dynamics
    from gflow.cli import main

    out = tmp_path / "run"
    argv = ["run", "--dynamics", "flow", "--seeds", "3", "--seed", "7", "--n", "60",
            "--width", "8", "--log-t-max", "5", "--saves", "4", "--no-progress",
            "--checkpoint-every", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0

    class Crash(Exception):
        pass

    real = gflow.dynamics.run_flow_seeds

    def crashing(*args, progress, **kwargs):
        seen = []

        def report(row):
            seen.append(row)
            if len(seen) > 7:  # mid-way through the third save point's rows
                raise Crash
            progress(row)

        return real(*args, progress=report, **kwargs)

    again = tmp_path / "again"
    argv[-1] = str(again)
    gflow.dynamics.run_flow_seeds = crashing
    try:
        with pytest.raises(Crash):
            main(argv)
    finally:
        gflow.dynamics.run_flow_seeds = real
    assert (again / "flow" / "checkpoint").is_dir()
    capsys.readouterr()
    assert main(["run", "--resume", str(again), "--no-progress"]) == 0
    assert "flow: resuming from the checkpoint" in capsys.readouterr().out
    for s in (7, 8, 9):
        name = f"flow/seed-{s}/trajectory.csv"
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
    assert not (again / "flow" / "checkpoint").exists()
