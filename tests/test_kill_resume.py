"""A `gflow run` killed with SIGKILL and resumed gives the uninterrupted run's files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ARGS = ["run", "--no-plot", "--no-progress", "--n", "100", "--width", "10", "--log-t-max", "30",
        "--saves", "40", "--checkpoint-every", "0"]  # fmt: skip


def _gflow(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "gflow", *args], **kw)


def _wait_for_checkpoint(folder: Path, proc, min_index: int, timeout=240.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        ck = folder / "checkpoint"
        done = [int(p.name) for p in ck.glob("*") if p.name.isdigit()] if ck.is_dir() else []
        if done and max(done) >= min_index:
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before it could be killed (exit {proc.returncode})")
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared")


def _resume(folder: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gflow", "run", "--resume", str(folder), "--no-progress",
         "--no-plot"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def _arrays(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _same_run(a: Path, b: Path):
    for name in ("trajectory.npz", "params_final.npz"):
        x, y = _arrays(a / name), _arrays(b / name)
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_allclose(x[k], y[k], rtol=1e-12, atol=0, err_msg=f"{name}:{k}")
    assert (a / "trajectory.csv").read_text() == (b / "trajectory.csv").read_text()
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca["status"] == cb["status"] == "completed"
    assert not (a / "checkpoint").exists()


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["gd", "flow"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(victim, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = _gflow(*ARGS, "--out", str(whole), env=env, stdout=subprocess.DEVNULL)
    assert ref.wait(timeout=600) == 0
    p = _gflow(*ARGS, "--out", str(cut), env=env, stdout=subprocess.DEVNULL,
               stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for_checkpoint(cut / victim, p, min_index=6)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (cut / victim / "config.json").exists()  # it really was cut mid-way
    r = _resume(cut, env)
    assert r.returncode == 0, r.stderr
    assert f"{victim}: resuming from the checkpoint" in r.stdout
    if victim == "flow":
        assert "gd: already completed" in r.stdout
    for kind in ("gd", "flow"):
        _same_run(cut / kind, whole / kind)


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["gd", "flow"])
def test_sigint_stops_saves_exits_130_and_resumes_to_the_uninterrupted_run(victim, tmp_path):
    """Ctrl-C stops at the next save-point-safe place, keeps what was reached and a
    checkpoint, starts nothing more, says how to go on and exits 130; the resumed run
    equals the uninterrupted one."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = _gflow(*ARGS, "--out", str(whole), env=env, stdout=subprocess.DEVNULL)
    assert ref.wait(timeout=600) == 0
    p = _gflow(*ARGS, "--out", str(cut), env=env, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_checkpoint(cut / victim, p, min_index=6)
    os.kill(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert f"gflow run --resume {cut}" in err
    stopped = json.loads((cut / victim / "config.json").read_text())
    assert stopped["status"] == "stopped" and stopped["message"].startswith("interrupted")
    if victim == "gd":
        assert not (cut / "flow").exists()  # nothing else started
    r = _resume(cut, env)
    assert r.returncode == 0, r.stderr
    for kind in ("gd", "flow"):
        _same_run(cut / kind, whole / kind)


@pytest.mark.slow
def test_sigint_of_a_seeds_run_exits_130_and_resumes_to_the_uninterrupted_runs(tmp_path):
    """The same for --seeds: the vmapped flow of 3 seeds stopped by Ctrl-C, then resumed,
    ends with every seed's uninterrupted files."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    args = [*ARGS, "--seeds", "3"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = _gflow(*args, "--out", str(whole), env=env, stdout=subprocess.DEVNULL)
    assert ref.wait(timeout=600) == 0
    p = _gflow(*args, "--out", str(cut), env=env, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True)  # fmt: skip
    _wait_for_checkpoint(cut / "flow", p, min_index=6)
    os.kill(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 130, err[-2000:]
    assert "Traceback" not in err and f"gflow run --resume {cut}" in err
    r = _resume(cut, env)
    assert r.returncode == 0, r.stderr
    for kind in ("gd", "flow"):
        for seed in (0, 1, 2):
            _same_run(cut / kind / f"seed-{seed}", whole / kind / f"seed-{seed}")
