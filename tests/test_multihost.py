"""Two processes on localhost (jax.distributed, CPU collectives): their sharded gradient
equals the single-process one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gflow.dynamics.driver import ESTIMATE_COLUMNS
from gflow.invariants import MONITOR_COLUMNS

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_shard_the_gradient_like_one():
    from tests.scripts.problems import multihost_problem

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.scripts.multihost", str(port), str(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    obj, params = multihost_problem()
    ell, g = obj.value_and_grad(params)
    ref = np.asarray(ravel_pytree(g)[0])
    for o in outs:
        np.testing.assert_allclose(o["log_loss"], float(ell), rtol=1e-12)
        got = np.asarray(o["grad"])
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * np.abs(ref).max())


# --input-span off: a sharded run integrates every parameter (the inputs' span is not taken
# across devices), and the one-host run is to take the same steps
RUN = ["run", "--dynamics", "both", "--n", "64", "--width", "8", "--log-t-max", "6", "--saves",
       "5", "--no-plot", "--no-progress", "--input-span", "off"]  # fmt: skip


def _arrays(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_gflow_run_on_two_hosts_writes_the_single_host_run(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    port = _free_port()
    two, one = tmp_path / "two", tmp_path / "one"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gflow",
                *RUN,
                "--out",
                str(two),
                "--coordinator",
                f"localhost:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    r = subprocess.run([sys.executable, "-m", "gflow", *RUN, "--out", str(one)], env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    for kind in ("gd", "flow"):
        cfg = json.loads((two / kind / "config.json").read_text())["config"]
        assert cfg["num_processes"] == 2 and cfg["num_devices"] == 2
        for name in ("trajectory.npz", "params_final.npz"):
            a, b = _arrays(two / kind / name), _arrays(one / kind / name)
            for k in a:
                # The flow's save times are event roots: run_flow accepts any point with
                # z >= z_target (1 - 1e-12), so log t agrees to that event tolerance
                # (a few 1e-12, absolute) and t = e^(log t) to as much relatively.
                rtol, atol = {"col/log_t": (0, 1e-11), "col/t": (1e-11, 0)}.get(k, (1e-12, 0))
                if not k.startswith("col/"):  # parameters: relative to the array's scale
                    rtol, atol = 0, 1e-12 * np.abs(b[k]).max()
                if k[4:] in MONITOR_COLUMNS + ESTIMATE_COLUMNS:  # relative errors near 0:
                    # compared absolutely
                    rtol, atol = 0, 1e-12
                if k == "col/dissipation":  # moves with log Loss at a save event
                    rtol, atol = 0, 1e-12 * np.abs(b["col/log_loss"]).max()
                if k == "col/cfl":  # the controller's answer to the estimate: it scales as
                    # 1 / (a difference of two margins, each equal to 1e-12 absolutely), so
                    # its rounding is that of the difference, relative (1.3e-10 measured);
                    # the same decisions are all that "the same run" needs of it: the cfl
                    # moves by factors of 1.25 to 2, so 1e-6 relative tells them apart
                    rtol, atol = 1e-6, 0
                np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{kind} {k}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray folders


def _alone(out, process_id: int, timeout: int) -> tuple[int, str]:
    """One process of a 2-process run with nobody else there: ``(exit code, its one
    error line)``, after checking that it printed no traceback and left no folder."""
    p = subprocess.run(
        [sys.executable, "-m", "gflow", "run", "--data", "synthetic", "--model", "linear",
         "--n", "40", "--dynamics", "gd", "--no-plot", "--no-progress", "--out", str(out),
         "--coordinator", f"127.0.0.1:{_free_port()}", "--num-processes", "2",
         "--process-id", str(process_id), "--coordinator-timeout", str(timeout)],
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert "Traceback" not in p.stderr and "Check failure" not in p.stderr, p.stderr[-2000:]
    assert not out.exists()
    errors = [line for line in p.stderr.splitlines() if line.startswith("gflow: error:")]
    assert len(errors) == 1, p.stderr[-2000:]
    return p.returncode, errors[0]


def test_an_unreachable_coordinator_is_one_line_after_the_timeout(tmp_path):
    """Process 1 with no process 0 listening: a one-line error once --coordinator-timeout
    has passed (XLA itself would abort the process with a C++ stack trace, after waiting
    minutes), exit 2, no run folder."""
    rc, error = _alone(tmp_path / "run", process_id=1, timeout=2)
    assert rc == 2 and "not reachable within 2 s" in error


def test_process_0_whose_peers_never_join_is_one_line_after_the_timeout(tmp_path):
    """Process 0 of 2 alone: its port is free, so it listens, and nobody comes. A one-line
    error once --coordinator-timeout has passed and exit 2 (XLA would abort the process
    with a C++ stack trace after its own timeout), no run folder."""
    rc, error = _alone(tmp_path / "run", process_id=0, timeout=3)
    assert rc == 2 and "did not start within 3 s" in error
