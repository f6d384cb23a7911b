"""Runs started together never share a run folder (issue 15, item 1)."""

import json
import subprocess
import sys

import numpy as np

from gflow.trajectory import Trajectory

RUN = ["run", "--data", "synthetic", "--model", "linear", "--n", "40", "--dynamics", "gd",
       "--log-t-max", "5", "--no-plot", "--no-progress"]  # fmt: skip


def _start(args, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "gflow", *args], cwd=cwd, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def test_four_runs_started_at_once_get_four_folders(tmp_path):
    procs = [_start([*RUN, "--seed", str(s)], tmp_path) for s in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [o[1][-2000:] for o in outs]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 4, folders
    seen = set()
    for f in folders:
        options = json.loads((f / "run.json").read_text())
        tr = Trajectory.load(f)
        assert tr.config["seed"] == options["seed"]  # its results are its own
        seen.add(options["seed"])
        assert not (f / ".gflow-lock").exists()  # released at the end
    assert seen == {0, 1, 2, 3}
    finals = [np.asarray(Trajectory.load(f)["normalized_margin"][-1]) for f in folders]
    assert len(set(float(v) for v in finals)) == 4


def test_two_runs_naming_one_folder_one_refused(tmp_path):
    out = tmp_path / "same"
    procs = [_start([*RUN, "--seed", str(s), "--out", str(out)], tmp_path) for s in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    loser = next(o for p, o in zip(procs, outs, strict=True) if p.returncode == 2)
    err = loser[1].strip().splitlines()
    assert len(err) == 1 and err[0].startswith("gflow: error: ")
    assert "in use by another gflow run" in err[0] or "is not empty" in err[0]
    winner = next(p for p in procs if p.returncode == 0)
    seed = int(winner.args[winner.args.index("--seed") + 1])
    assert json.loads((out / "run.json").read_text())["seed"] == seed
    assert Trajectory.load(out).config["seed"] == seed


def test_a_lock_planted_as_a_symlink_is_refused_and_its_target_untouched(tmp_path):
    """A run folder whose lock file is a symbolic link (to a file of the user's): the
    run is refused with one line naming it, and the file it points to is not written
    (it was truncated and given the process id before, issue 29 item 2)."""
    import pytest

    from gflow.runs import claim, release

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "run"
    out.mkdir()
    (out / ".gflow-lock").symlink_to(victim)
    with pytest.raises(ValueError, match="symbolic link"):
        claim(out, unique=False, resume=True)
    release()
    assert victim.read_text() == "keep me\n"
    assert (out / ".gflow-lock").is_symlink()
