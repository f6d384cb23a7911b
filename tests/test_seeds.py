"""K seeds in one vmapped GD run equal K separate runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gflow import data as D
from gflow.dynamics import run_gd, run_gd_seeds
from gflow.models import build_model, split_params
from gflow.objective import make_objective


@pytest.fixture(scope="module")
def problem():
    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 60, seed=0), "unit")
    inits = [split_params(build_model("mlp", ds.input_shape, 1, width=8, seed=s))[1]
             for s in (3, 4, 5)]  # fmt: skip
    obj, _ = make_objective(build_model("mlp", ds.input_shape, 1, width=8), ds, "logistic")
    return obj, inits


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
