"""Hostile input and faults, table-driven (issue 15).

``CASES`` is the table: for each case the command, the exit code, a needle that the one
line it prints must hold, and what must be true afterwards ("nothing lost"):

- ``no folder``: the run folder was never created (bad options die at parse time);
- ``unchanged``: every file of an existing folder is byte for byte what it was;
- ``resumable``: ``--resume`` completes the run from what was kept;
- ``repaired``, ``both files``, ``says so``: the case's own aftermath, checked there.

Every CLI case prints at most one ``gflow: error:`` / ``gflow: warning:`` line on stderr
and never a traceback. ``_lib_cases`` (a ``ValueError`` naming the value, nothing
written) and ``FOLDER_CASES`` (a damaged run folder read by ``gflow check``: one line
naming the file, the folder unchanged) complete the table. Elsewhere, because they need
processes of their own: two and four runs started at once (test_concurrency.py), Ctrl-C
and SIGKILL (test_kill_resume.py), a multi-host run whose peers never come
(test_multihost.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

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
from gflow.trajectory import Trajectory

# checkpoints at every save point (--checkpoint-every 0): the cases stop runs early
RUN = ["run", "--no-progress", "--no-plot", "--dynamics", "gd", "--steps", "5",
       "--checkpoint-every", "0"]  # fmt: skip
SMALL = [
    "run",
    "--data",
    "synthetic",
    "--model",
    "linear",
    "--n",
    "40",
    "--dynamics",
    "gd",
    "--log-t-max",
    "6",
    "--no-plot",
    "--no-progress",
    "--checkpoint-every",
    "0",
]  # fmt: skip (below threshold at 4.3)


class Case(NamedTuple):
    name: str
    argv: list | Callable[[Any], list]  # after ``run`` (``RUN``), or a whole command line
    needle: str | None  # in the one line printed (None: nothing is printed on stderr)
    rc: int = 2
    after: str = "no folder"
    fsize: int | None = None  # run in a process whose files may hold at most this many bytes


def _npz(path, x, y, **extra):
    np.savez(path, x=x, y=y, **extra)
    return f"npz:{path}"


def _two_class(n=20, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), np.arange(n) % 2


def _small_run(folder, *extra):
    assert main([*SMALL, "--out", str(folder), *extra]) == 0
    return folder


def _in_a_small_disk(argv, fsize):
    """``gflow argv`` in a process whose writes fail past ``fsize`` bytes a file (EFBIG,
    as a full disk fails them with ENOSPC: the same path through orbax and numpy)."""

    start = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({fsize}, {fsize})); "
        "os.execv(sys.executable, [sys.executable, '-m', 'gflow', *sys.argv[1:]])"
    )
    p = subprocess.run([sys.executable, "-c", start, *argv], capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    return p.returncode, p.stdout, p.stderr


def _nan_margins(tmp):
    # the flow of a linear model: inside Theorem 4.1's scope, so a broken margin is an
    # in-scope FAIL (the loss-based GD's steps exceed mu(Loss): outside the GD theorem)
    folder = _small_run(tmp / "nanrun", "--loss", "exp", "--dynamics", "flow")
    tr = Trajectory.load(folder)
    cols = dict(tr.columns)
    cols["smoothed_margin"] = cols["smoothed_margin"].copy()
    cols["smoothed_margin"][-3:] = np.nan
    Trajectory(tr.kind, cols, config=tr.config, status=tr.status, message=tr.message).save(folder)
    return ["check", "--no-kkt", str(folder)]


_HOLDERS: list = []  # descriptors of the locks held by _busy (closed with the process)


def _busy(tmp):
    """A folder another run holds: its lock file flock-ed (here by this process, through
    a descriptor of its own, which conflicts like another process's would)."""
    import fcntl

    folder = tmp / "busy"
    folder.mkdir()
    fd = os.open(folder / ".gflow-lock", os.O_CREAT | os.O_RDWR, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getpid()).encode())
    _HOLDERS.append(fd)
    return ["--out", str(folder)]


def _damaged_checkpoint(tmp):
    folder = tmp / "half"
    # 4 kB a file: the first checkpoint fits (its rows carry every column), a later fails
    rc, _, err = _in_a_small_disk([*SMALL, "--out", str(folder)], 4000)
    assert rc == 2 and "could not write checkpoint" in err, err
    (step,) = [p for p in (folder / "checkpoint").iterdir() if p.name.isdigit()]
    (step / "meta" / "metadata").unlink()
    return ["run", "--resume", str(folder), "--no-plot", "--no-progress"]


def _compare(tmp):
    a, b = _small_run(tmp / "a"), _small_run(tmp / "b", "--seed", "1")
    return ["compare", str(a), str(b), "--out", str(tmp / "s.json")]


def _checks_lost(tmp):
    folder = _small_run(tmp / "lost")
    (folder / "checks.json").unlink()
    (folder / "trajectory.csv").unlink()
    return ["run", "--resume", str(folder), "--no-plot", "--no-progress"]


def _planted_lock(tmp):
    """A run folder whose lock file is a symbolic link to a file of the user's."""
    folder = _small_run(tmp / "linked")
    (tmp / "victim").write_text("keep me\n")
    (folder / ".gflow-lock").unlink(missing_ok=True)
    (folder / ".gflow-lock").symlink_to(tmp / "victim")
    return ["run", "--resume", str(folder), "--no-plot", "--no-progress"]


class _Plant:
    """Unpickled, it creates ``path`` (code of the pickle's choosing ran)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _planted_pickle(tmp):
    """A library run folder whose objective.pkl would create ``tmp/marker`` if loaded."""
    import pickle

    x, y = _two_class()
    ds = D.Dataset(x, y, 2, "ok")
    w = {"w": jnp.asarray(np.ones(x.shape[1]) / 4)}
    obj, p0 = make_objective(lambda p, v: v @ p["w"], ds, "exp", order=1, params=w)
    folder = run_gd(obj, p0, schedule="loss-based", log_t_max=2.0, saves=3).save(tmp / "sent")
    (folder / "objective.pkl").write_bytes(pickle.dumps(_Plant(tmp / "marker")))
    return folder


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
    rows = [
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
            "--log-t-max, --steps cannot change them",
        ),
        ("seed-negative", ["--seed", "-1"], "got -1"),
        ("depth-huge", ["--depth", "100"], "1..64, got 100"),
        ("cfl-nan", ["--cfl", "nan"], "got nan"),
        ("dt-inf", ["--dt", "inf"], "got inf"),
        ("rtol-one", ["--rtol", "1"], "(0, 1), got 1"),
        ("steps-zero", ["--steps", "0"], "got 0"),
        ("devices-beyond", ["--devices", "1000"], "got 1000"),
        ("classes-repeated", ["--classes", "0,0"], "repeated class"),
        ("class-absent", ["--classes", "0,99"], "class 99"),
        ("batch-beyond-n", ["--schedule", "constant", "--batch-size", "100000"], "got 100000"),
        ("kinks-with-cfl", ["--dynamics", "flow", "--kinks", "--cfl", "0.1"], "leave --dt, --cfl"),
        ("kinks-fixed-step", ["--dynamics", "flow", "--kinks", "--solver", "rk4"], "adaptive"),
        # issue 29: options that would be dropped, blank cache folders
        ("kinks-with-gd", ["--kinks"], "--kinks applies to the flow; --dynamics gd runs no flow"),
        ("kink-fallback-without-kinks", ["--dynamics", "flow", "--kink-fallback", "5"],
         "--kink-fallback applies under --kinks only"),
        ("input-span-on-full-rank", ["--dynamics", "flow", "--data", "synthetic", "--n", "40",
                                     "--input-span", "on"], "--input-span on cannot apply"),
        ("lr-under-loss-based", ["--lr", "0.1"], "--lr applies to --schedule constant"),
        ("compilation-cache-empty", ["--compilation-cache", ""], "cache folder is blank"),
        ("compilation-cache-blank", ["--compilation-cache", "   "], "is blank"),
    ]
    return [Case(*row) for row in rows] + [
        # faults: a folder in use, damaged or half-written runs, wrong verdicts, a full disk
        Case("out-in-use", _busy, "in use by another gflow run", after="unchanged"),
        Case("lock-planted-as-a-link", _planted_lock, "symbolic link", after="link untouched"),
        Case("check-planted-pickle", lambda t: ["check", str(_planted_pickle(t))],
             "holds the model as code", rc=0, after="no code ran"),
        Case("attack-planted-pickle", lambda t: ["attack", str(_planted_pickle(t))],
             "--trust-code", after="no code ran"),
        Case("diverged-gd", ["--data", "digits", "--n", "60", "--width", "8", "--schedule",
                             "constant", "--lr", "50", "--loss", "exp", "--steps", "100000",
                             "--log-t-max", "8"], "never fell below the loss threshold", rc=1,
             after="checked"),
        Case("resume-damaged-checkpoint", _damaged_checkpoint, "is damaged", after="unchanged"),
        Case("check-nan-margins", _nan_margins, None, rc=1, after="fails with the reason"),
        Case("compare-out-json", _compare, None, rc=0, after="both files"),
        Case("resume-after-checks-lost", _checks_lost, None, rc=0, after="repaired"),
        Case(
            "non-separable",
            [
                "--data",
                "synthetic-nonsep",
                "--model",
                "linear",
                "--n",
                "60",
                "--steps",
                "100000",
                "--log-t-max",
                "4",
            ],
            "never fell below the loss threshold",
            rc=0,
            after="says so",
        ),  # fmt: skip
        Case(
            "disk-full",
            [*SMALL, "--dynamics", "both"],
            "could not write checkpoint",
            after="resumable",
            fsize=3000,
        ),
    ]


N_CASES = 68


def test_the_table_has_sixty_cases_with_the_library_and_folder_ones(tmp_path):
    assert len(_cases(tmp_path)) == N_CASES
    assert N_CASES + N_LIB + len(FOLDER_CASES) >= 60


def _files(folder) -> dict:
    return {
        p.relative_to(folder): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".gflow-lock"
    }


@pytest.mark.parametrize("case", range(N_CASES))
def test_hostile_case(case, tmp_path, capsys):
    name, argv, needle, want_rc, after, fsize = _cases(tmp_path)[case]
    if callable(argv):
        argv = argv(tmp_path)
        capsys.readouterr()
    out = tmp_path / "run"
    if argv[0] not in ("run", "check", "compare", "attack"):
        argv = [*RUN, *argv]
    if argv[0] == "run" and "--out" not in argv and "--resume" not in argv:
        argv = [*argv, "--out", str(out)]
    where = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--out", "--resume")),
                 argv[-1])  # fmt: skip
    before = _files(tmp_path / where) if os.path.isdir(tmp_path / where) else None
    if fsize is not None:
        rc, stdout, err = _in_a_small_disk(argv, fsize)
    else:
        try:
            rc = main(argv)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
        stdout, err = capsys.readouterr()
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("gflow: ")]
    assert rc == want_rc, (name, err[-2000:])
    assert "Traceback" not in err, (name, err[-2000:])
    if needle is None:
        assert not any(ln.startswith(("gflow: error", "gflow: warning")) for ln in lines), err
    else:
        (line,) = [ln for ln in lines if ln.startswith(("gflow: error", "gflow: warning"))]
        assert needle in line, (name, needle, line)
    # nothing lost
    if after == "no folder":
        assert not out.exists(), name
    elif after == "unchanged":
        assert _files(tmp_path / where) == before, name
    elif after == "resumable":
        assert f"gflow run --resume {where}" in line
        assert main(["run", "--resume", where, "--no-plot", "--no-progress"]) == 0
        ref = tmp_path / "uninterrupted"
        assert main([*argv[: argv.index("--out")], "--out", str(ref)]) == 0
        for kind in ("gd", "flow"):  # resumed bit for bit
            a, b = np.load(out / kind / "trajectory.npz"), np.load(ref / kind / "trajectory.npz")
            assert sorted(a.files) == sorted(b.files)
            for k in a.files:
                np.testing.assert_array_equal(a[k], b[k], err_msg=f"{kind} {k}")
            assert not (out / kind / "checkpoint").exists()
    elif after == "fails with the reason":
        assert "FAIL" in stdout and "non-finite smoothed_margin" in stdout, stdout
    elif after == "both files":
        assert (tmp_path / "s.json.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((tmp_path / "s.json.json").read_text())["points"] > 0
    elif after == "repaired":
        assert "already completed" in stdout
        assert (tmp_path / where / "checks.json").is_file()
        assert (tmp_path / where / "trajectory.csv").is_file()
    elif after == "link untouched":
        assert (tmp_path / "victim").read_text() == "keep me\n"
        assert (tmp_path / "linked" / ".gflow-lock").is_symlink()
    elif after == "no code ran":
        assert not (tmp_path / "marker").exists()
        assert (tmp_path / "sent" / "checks.json").is_file() == (argv[0] == "check")
    elif after == "checked":  # failed cleanly at its first non-finite step, and checked
        assert json.loads((out / "run.json").read_text())["lr"] == 50
        assert "non-finite loss" in stdout and (out / "checks.json").is_file()
    elif after == "says so":
        assert "NEVER" in stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["gd"]["threshold_log_t"] is None
    else:
        raise AssertionError(f"unknown aftermath {after!r}")


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


N_LIB = 12


@pytest.mark.parametrize("case", range(N_LIB))
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
    # issue 29 item 6: hand-edited folders that used to get through
    "a column of strings": (lambda f: _edit_column(f, "rho", lambda v: v.astype(str)),
                            "column 'rho' holds strings"),
    "a decreasing log_t": (lambda f: _edit_column(f, "log_t", lambda v: v[::-1].copy()),
                           "column 'log_t' decreases"),
    "kind banana": (lambda f: _edit_config(f / "config.json", lambda m: m.update(kind="banana")),
                    "'kind' must be one of"),
    "order two": (lambda f: _edit_config(f / "config.json",
                                         lambda m: m["config"].update(order="two")),
                  "config 'order' must be an integer"),
    "a column listed twice": (
        lambda f: _edit_config(f / "config.json", lambda m: m["columns"].append("rho")),
        "names 'rho' twice"),
}  # fmt: skip


def _edit_column(folder, name, fn):
    """Rewrite one column of ``trajectory.npz`` by hand."""
    with np.load(folder / "trajectory.npz") as z:
        arrays = {k: z[k] for k in z.files}
    arrays[f"col/{name}"] = fn(arrays[f"col/{name}"])
    np.savez(folder / "trajectory.npz", **arrays)


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
