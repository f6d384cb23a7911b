"""Trajectory files: exact round trip, CSV for pandas, atomic writes."""

import jax
import numpy as np
import pandas as pd

from gflow import data as D
from gflow.dynamics import run_gd
from gflow.models import build_model
from gflow.objective import make_objective
from gflow.trajectory import CSV_COLUMNS, Trajectory, flatten_params, load


def _run(save_params=True):
    ds = D.synthetic(30, 3, seed=0)
    model = build_model("mlp", ds.input_shape, 1, width=4, bias="first")
    obj, p0 = make_objective(model, ds, "exp")
    return run_gd(obj, p0, schedule="loss-based", log_t_max=5.0, saves=5, save_params=save_params)


def test_round_trip_is_exact(tmp_path):
    tr = _run()
    tr.save(tmp_path / "run")
    back = load(tmp_path / "run")
    assert back.kind == tr.kind and back.status == tr.status and back.message == tr.message
    assert back.config == tr.config
    assert back.column_names == tr.column_names
    for k in tr.columns:
        np.testing.assert_array_equal(back[k], tr[k])
    assert len(back.snapshots) == len(tr.snapshots) == len(tr)
    for a, b in zip(
        back.snapshots + [back.final_params], tr.snapshots + [tr.final_params], strict=True
    ):
        assert jax.tree.structure(a) == jax.tree.structure(b)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(x, y)
    with np.load(tmp_path / "run" / "params_final.npz") as z:
        assert sorted(z.files) == sorted(flatten_params(tr.final_params))
        assert "layers/0/bias" in z.files


def test_csv_opens_with_pandas(tmp_path):
    tr = _run(save_params=False)
    tr.save(tmp_path)
    df = pd.read_csv(tmp_path / "trajectory.csv")
    assert tuple(df.columns[: len(CSV_COLUMNS)]) == CSV_COLUMNS
    assert len(df) == len(tr)
    np.testing.assert_array_equal(df["log_loss"].to_numpy(), tr["log_loss"])
    assert df["log_t"].iloc[0] == -np.inf and df["t"].iloc[0] == 0.0
    assert not list(tmp_path.glob(".*.tmp"))  # no temp files left


def test_load_rejects_a_folder_that_is_not_a_run(tmp_path):
    import pytest

    with pytest.raises(ValueError, match="is not a run folder"):
        Trajectory.load(tmp_path)


def test_gd_checkpoints_at_loss_marks_round_trip(small, tmp_path):
    obj, p0 = small
    marks = (-5.0, -20.0, -1e6)  # the last is never reached
    tr = run_gd(obj, p0, schedule="loss-based", log_t_max=30, saves=5, checkpoint_log_losses=marks)
    assert list(tr.checkpoints) == ["-5", "-20"]
    for label, ck in tr.checkpoints.items():
        ll = float(obj.log_loss(ck["params"]))
        assert ll <= float(label)  # at or below its mark ...
    # ... and the first such step: the step before was above (checked by re-running to it)
    before = run_gd(obj, p0, schedule="loss-based", max_steps=tr.checkpoints["-5"]["step"] - 1,
                    log_t_max=None, saves=2)  # fmt: skip
    assert before["log_loss"][-1] > -5.0
    tr.save(tmp_path / "r")
    back = Trajectory.load(tmp_path / "r")
    assert list(back.checkpoints) == ["-5", "-20"]
    for k in back.checkpoints:
        a = jax.tree.leaves(back.checkpoints[k]["params"])
        b = jax.tree.leaves(tr.checkpoints[k]["params"])
        assert len(a) == len(b) and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
        assert back.checkpoints[k]["step"] == tr.checkpoints[k]["step"]
