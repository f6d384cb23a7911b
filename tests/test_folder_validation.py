"""A run folder is validated on read (issue 29, item 6): a hand-edited field that no run
writes is one ``gflow: error:`` line naming the file and the field, exit 2, no traceback,
the folder unchanged. What real runs do write (a ``log_t`` that starts at -inf and repeats
its last value when a run fails) still loads."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from gflow.cli import main
from gflow.problem import Problem
from gflow.trajectory import Trajectory

# tests/test_bad_input.py's SMALL: a real GD run of a few seconds
SMALL = ["run", "--data", "synthetic", "--model", "linear", "--n", "40", "--dynamics", "gd",
         "--log-t-max", "6", "--no-plot", "--no-progress", "--checkpoint-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real") / "run"
    assert main([*SMALL, "--out", str(folder)]) == 0
    (folder / "checks.json").unlink()  # what ``gflow check`` writes, when it gets so far
    return folder


@pytest.fixture
def run_copy(real_run, tmp_path):
    return shutil.copytree(real_run, tmp_path / "run")


def _files(folder) -> dict:
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".gflow-lock"
    }


def _edit_npz(folder, fn):
    path = folder / "trajectory.npz"
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    fn(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _edit_config(folder, fn):
    path = folder / "config.json"
    meta = json.loads(path.read_text())
    fn(meta)
    path.write_text(json.dumps(meta, indent=2))


def _set(key, value):
    def fn(a):
        a[key] = value(a[key])

    return fn


def _swap(v):
    v = v.copy()
    v[[3, 4]] = v[[4, 3]]
    return v


def _at(i, x):
    def fn(v):
        v = v.copy()
        v[i] = x
        return v

    return fn


# case -> (damage, what the one line must hold: the file and the field)
CASES = {
    "a column of strings": (
        lambda f: _edit_npz(f, _set("col/rho", lambda v: v.astype(str).astype("<U3"))),
        ["trajectory.npz", "column 'rho' holds strings (dtype <U3), expected numbers"]),
    "a column of bytes": (
        lambda f: _edit_npz(f, _set("col/q_min", lambda v: v.astype("S8"))),
        ["trajectory.npz", "column 'q_min' holds bytes"]),
    "a column of booleans": (
        lambda f: _edit_npz(f, _set("col/log_loss", lambda v: v > 0)),
        ["trajectory.npz", "column 'log_loss' holds booleans"]),
    "a column of objects": (
        lambda f: _edit_npz(f, _set("col/rho", lambda v: v.astype(object))),
        ["trajectory.npz", "'col/rho'"]),
    "log_t not increasing": (
        lambda f: _edit_npz(f, _set("col/log_t", _swap)),
        ["trajectory.npz", "column 'log_t' decreases at row 4"]),
    "log_t -inf past the start": (
        lambda f: _edit_npz(f, _set("col/log_t", _at(5, -np.inf))),
        ["trajectory.npz", "column 'log_t' decreases at row 5"]),
    "log_t NaN": (
        lambda f: _edit_npz(f, _set("col/log_t", _at(2, np.nan))),
        ["trajectory.npz", "column 'log_t' holds NaN at row 2"]),
    "an unknown kind": (
        lambda f: _edit_config(f, lambda m: m.update(kind="banana")),
        ["config.json", "'kind' must be one of", "'banana'"]),
    "a non-integer order": (
        lambda f: _edit_config(f, lambda m: m["config"].update(order="two")),
        ["config.json", "config 'order' must be an integer >= 1 or null, got 'two'"]),
    "a fractional order": (
        lambda f: _edit_config(f, lambda m: m["config"].update(order=1.5)),
        ["config.json", "config 'order'", "1.5"]),
    "order zero": (
        lambda f: _edit_config(f, lambda m: m["config"].update(order=0)),
        ["config.json", "config 'order'", "got 0"]),
    "a non-integer declared order": (
        lambda f: _edit_config(f, lambda m: m["config"].update(declared_order="two")),
        ["config.json", "config 'declared_order'", "'two'"]),
    "a column named twice": (
        lambda f: _edit_config(f, lambda m: m["columns"].append("rho")),
        ["config.json", "'columns' names 'rho' twice"]),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_a_doctored_field_is_one_line_naming_the_file_and_field(case, run_copy, capsys):
    damage, needles = CASES[case]
    damage(run_copy)
    before = _files(run_copy)
    rc = main(["check", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 2, (case, err)
    assert "Traceback" not in err, err
    (line,) = err.strip().splitlines()
    assert line.startswith("gflow: error:"), line
    for needle in needles:
        assert needle in line, (case, needle, line)
    assert _files(run_copy) == before, case  # no checks.json, nothing rewritten


def test_the_undoctored_folder_checks_fine(run_copy, capsys):
    rc = main(["check", str(run_copy)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "gflow: error" not in err and "Traceback" not in err
    assert (run_copy / "checks.json").is_file()


def test_what_real_runs_write_loads(run_copy, tmp_path):
    """A real GD run starts at log t = -inf (t = 0); one that fails records its last
    state twice (log t repeats); a library config may have no order, or a null one."""
    tr = Trajectory.load(run_copy)
    assert tr["log_t"][0] == -np.inf and tr["t"][0] == 0.0
    _, _, obj, p0 = Problem(data="synthetic", n=8, width=3, activation="linear",
                            loss="exp").build()  # fmt: skip
    from gflow.dynamics import run_gd

    failed = run_gd(obj, p0, schedule="constant", lr=3.0, max_steps=50, saves=50)
    assert failed.status == "failed" and failed["log_t"][-1] == failed["log_t"][-2]
    back = Trajectory.load(failed.save(tmp_path / "failed"))
    np.testing.assert_array_equal(back["log_t"], failed["log_t"])
    for order in (None, "absent"):
        _edit_config(run_copy, lambda m, o=order: m["config"].update(order=o)
                     if o is None else m["config"].pop("order"))  # fmt: skip
        assert Trajectory.load(run_copy).config.get("order") is None
