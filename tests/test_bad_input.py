"""Bad input, table-driven: each case is a one-line error that names the value.

Through the CLI: exit code 2, one line on stderr, no traceback, no run folder left.
Through the library: a ``ValueError`` (``DataError`` is one) with the same kind of message.
"""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gflow import data as D
from gflow.cli import main
from gflow.dynamics import run_flow, run_gd
from gflow.dynamics.solvers import make_solver
from gflow.losses import get_loss
from gflow.models import build_model
from gflow.objective import make_objective


def _npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)
    return f"npz:{path}"


def _two_class(n=20, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), np.arange(n) % 2


def _cases(tmp):
    x, y = _two_class()
    nan_x = x.copy()
    nan_x[3, 2] = np.nan
    inf_x = x.copy()
    inf_x[5, 0] = np.inf
    bad_y = y.copy()
    bad_y[4] = 7
    (tmp / "garbage.npz").write_bytes(b"this is not a zip file")
    (tmp / "a_file").write_text("x")
    (tmp / "bad.toml").write_text("frobnicate = 3\n")
    (tmp / "notarun").mkdir()
    (tmp / "arun").mkdir()
    (tmp / "arun" / "run.json").write_text("{}")
    (tmp / "badrun").mkdir()
    (tmp / "badrun" / "run.json").write_text('{"seed": "abc"}')
    return [
        ("nan-pixels", ["--data", _npz(tmp / "nan.npz", nan_x, y)], "NaN"),
        ("inf-pixels", ["--data", _npz(tmp / "inf.npz", inf_x, y)], "inf"),
        ("label-range", ["--data", _npz(tmp / "lab.npz", x, bad_y, num_classes=2)], "label 7"),
        ("one-class", ["--data", _npz(tmp / "one.npz", x, 0 * y, num_classes=2)], "one class"),
        ("empty", ["--data", _npz(tmp / "empty.npz", x[:0], y[:0], num_classes=2)], "empty"),
        ("wrong-order", ["--order", "3"], "declared homogeneity order 3"),
        ("float16", ["--dtype", "float16"], "float16"),
        ("negative-lr", ["--lr", "-0.5"], "-0.5"),
        ("zero-lr", ["--lr", "0"], "got 0"),
        ("zero-samples", ["--n", "0"], "got 0"),
        ("missing-folder", ["--data", f"mnist-idx:{tmp}/nowhere"], "nowhere"),
        ("missing-file", ["--data", f"npz:{tmp}/absent.npz"], "absent.npz"),
        ("corrupt-file", ["--data", f"npz:{tmp}/garbage.npz"], "garbage.npz"),
        ("unknown-data", ["--data", "imagenet"], "imagenet"),
        ("unknown-model", ["--model", "resnet"], "resnet"),
        ("unknown-loss", ["--loss", "hinge"], "hinge"),
        ("unknown-solver", ["--solver", "magic"], "magic"),
        ("unknown-config-key", ["--config", str(tmp / "bad.toml")], "frobnicate"),
        ("out-is-a-file", ["--out", str(tmp / "a_file")], "a_file"),
        ("out-under-a-file", ["--out", str(tmp / "a_file" / "run")], "Not a directory"),
        ("resume-run-json-types", ["--resume", str(tmp / "badrun")], "'seed' is 'abc'"),
        (
            "coordinator-malformed",
            ["--coordinator", "nohost", "--num-processes", "2", "--process-id", "0"],
            "expected HOST:PORT",
        ),
        ("binary-loss-many-classes", ["--classes", "all", "--loss", "exp"], "'exp'"),
        ("log-t-range", ["--log-t-max", "1", "--log-t-min", "2"], "--log-t-max"),
        ("resume-not-a-run", ["--resume", str(tmp / "notarun")], "notarun"),
        ("resume-missing", ["--resume", str(tmp / "gone")], "gone"),
        # non-finite and out-of-range values (each used to hang, fill the disk, or be
        # ignored)
        ("log-t-min-nan", ["--log-t-min", "nan"], "finite number, got nan"),
        ("log-t-min-minus-inf", ["--log-t-min=-inf"], "finite number, got -inf"),
        ("log-loss-min-nan", ["--log-loss-min", "nan"], "finite number, got nan"),
        ("seeds-million", ["--seeds", "1000000"], "1..1024, got 1000000"),
        ("saves-ten-million", ["--saves", "10000000"], "got 10000000"),
        ("seed-float", ["--seed", "1e23"], "'1e23'"),
        ("seed-huge", ["--seed", str(10**30)], str(10**30)),
        ("width-float", ["--width", "2e9"], "'2e9'"),
        ("width-huge", ["--width", "2000000000"], "got 2000000000"),
        ("abbreviated-flag", ["--ste", "9"], "--ste"),
        (
            "n-beyond-the-data",
            ["--data", "digits", "--classes", "0,1", "--n", "1000000"],
            "has only 360 samples",
        ),
        ("complex-pixels", ["--data", _npz(tmp / "cplx.npz", x + 1j, y)], "complex"),
        (
            "resume-with-new-horizon",
            ["--resume", str(tmp / "arun"), "--log-t-max", "50"],
            "--log-t-max, --out, --steps cannot change them",
        ),
    ]


N_CASES = 39


def test_the_table_has_at_least_fifteen_cases(tmp_path):
    assert len(_cases(tmp_path)) == N_CASES >= 15


@pytest.mark.parametrize("case", range(N_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_no_folder(case, tmp_path, capsys):
    name, argv, needle = _cases(tmp_path)[case]
    out = tmp_path / "run"
    if "--out" not in argv:
        argv = argv + ["--out", str(out)]
    try:
        rc = main(["run", "--no-progress", "--no-plot", "--dynamics", "gd", "--steps", "5", *argv])
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, (name, err)
    assert err.startswith("gflow: error:") and "\n" not in err, (name, err)
    assert needle in err, (name, needle, err)
    assert "Traceback" not in err
    assert not out.exists(), name


def test_cli_bad_input_from_a_real_process(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run(
        [sys.executable, "-m", "gflow", "run", "--lr", "-1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "-1" in p.stderr
    assert "Traceback" not in p.stderr and not out.exists()


def _lib_cases(tmp):
    x, y = _two_class()
    ds = D.Dataset(x, y, 2, "ok")
    nan_x = x.copy()
    nan_x[0, 0] = np.nan
    mlp = build_model("mlp", ds.input_shape, 1, width=4)
    return [
        (lambda: D.Dataset(nan_x, y, 2, "nan"), "NaN"),
        (lambda: D.Dataset(x, y + 5, 2, "range"), "label 6"),
        (lambda: D.Dataset(x[:0], y[:0], 2, "empty"), "empty"),
        (lambda: build_model("mlp", (6,), 1, dtype=jnp.float16), "float16"),
        (lambda: build_model("transformer", (6,), 1), "transformer"),
        (lambda: get_loss("hinge"), "hinge"),
        (lambda: make_solver("magic"), "magic"),
        (lambda: make_objective(mlp, ds, "logistic", order=5), "order 5"),
        (lambda: D.load(f"npz:{tmp}/none.npz"), "none.npz"),
        (lambda: D.keep_classes(ds, (0,)), "[0]"),
        (lambda: run_flow(*make_objective(mlp, ds, "logistic"), log_t_min=-np.inf), "finite"),
        (lambda: run_gd(*make_objective(mlp, ds, "logistic"), log_loss_min=np.nan), "nan"),
    ]


@pytest.mark.parametrize("case", range(12))
def test_library_bad_input_raises_value_error_naming_it(case, tmp_path):
    fn, needle = _lib_cases(tmp_path)[case]
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert needle in msg and "\n" not in msg, msg


def test_declared_order_is_accepted_when_right():
    x, y = _two_class()
    ds = D.Dataset(x, y, 2, "ok")
    for name, L in (("mlp", 2), ("linear", 1)):
        model = build_model(name, ds.input_shape, 1, width=4, depth=2)
        obj, _ = make_objective(model, ds, "logistic", order=L)
        assert obj.order == L and obj.homogeneous
    allbias = build_model("mlp", ds.input_shape, 1, width=4, bias="all")
    with pytest.raises(ValueError, match="not homogeneous"):
        make_objective(allbias, ds, "logistic", order=2)


def _run_folder(tmp_path):
    x, y = _two_class()
    ds = D.Dataset(x, y, 2, "ok")
    obj, p0 = make_objective(build_model("mlp", ds.input_shape, 1, width=4), ds, "logistic")
    return run_gd(obj, p0, schedule="loss-based", log_t_max=2.0, saves=3).save(tmp_path / "run")


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _no_rows(folder):
    from gflow.trajectory import Trajectory

    tr = Trajectory.load(folder)
    Trajectory(tr.kind, {k: v[:0] for k, v in tr.columns.items()}, config=tr.config).save(folder)


def _edit_config(path, fn):
    import json

    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta))


FOLDER_CASES = {
    "truncated trajectory.npz": (lambda f: _truncate(f / "trajectory.npz"), "trajectory.npz"),
    "truncated params_final.npz": (lambda f: _truncate(f / "params_final.npz"),
                                   "params_final.npz"),
    "no trajectory.npz": (lambda f: (f / "trajectory.npz").unlink(), "trajectory.npz"),
    "config.json not JSON": (lambda f: (f / "config.json").write_text("{oops"), "config.json"),
    "config.json without columns": (
        lambda f: _edit_config(f / "config.json", lambda m: m.pop("columns")), "'columns'"),
    "config.json columns of a wrong type": (
        lambda f: _edit_config(f / "config.json", lambda m: m.update(columns="log_t")),
        "'columns' must be a list"),
    "config.json a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "JSON object"),
    "a trajectory of no rows": (lambda f: _no_rows(f), "holds no save point"),
    "a column missing from the npz": (
        lambda f: _edit_config(f / "config.json", lambda m: m["columns"].append("extra")),
        "'extra'"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_a_damaged_run_folder_is_one_line_naming_the_file(case, tmp_path, capsys):
    folder = _run_folder(tmp_path)
    damage, needle = FOLDER_CASES[case]
    damage(folder)
    rc = main(["check", str(folder)])
    err = capsys.readouterr().err.strip()
    assert rc == 2, (case, err)
    assert err.startswith("gflow: error:") and "\n" not in err and "Traceback" not in err
    assert needle in err, (case, err)
