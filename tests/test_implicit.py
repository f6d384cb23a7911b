"""Implicit solvers (issue 31, item 4): they run under error control, with the adaptive
controller's tolerances handed to their root finder; with a fixed step, a cfl or kink
stepping they are refused before any work, in the library and on the command line."""

import numpy as np
import pytest

from gflow.dynamics import KinkStepping, run_flow
from gflow.runs import RunOptions
from gflow.runs import run as run_cli

RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture(scope="module")
def linear(linear_problem):
    """A linear model on digits 0/1, exponential loss: log Loss is convex in theta, so the
    loss clock's flow is non-expansive (its Jacobian is minus a positive semidefinite
    Hessian) and local errors add up at most linearly."""
    _, (obj, p0) = linear_problem
    return obj, p0


@pytest.fixture(scope="module")
def reference(linear):
    obj, p0 = linear
    return run_flow(obj, p0, solver="tsit5", rtol=1e-11, atol=1e-14, log_t_max=4, saves=4)


@pytest.mark.parametrize("name", ["kvaerno5", "implicit-euler"])
def test_an_implicit_solver_runs_under_error_control(linear, reference, name):
    """Each accepted step's error is held to ``atol + rtol |theta_i|`` per entry (RMS), so
    ``|theta - theta_ref| <= steps * sqrt(d) (atol + rtol max |theta|)`` on a
    non-expansive flow; the normalized margin ``q_min / rho`` (unit inputs, linear
    model) moves by at most ``2 |d theta| / rho``. The reference's own bound is 1e5
    times smaller."""
    obj, p0 = linear
    tr = run_flow(obj, p0, solver=name, rtol=RTOL, atol=ATOL, log_t_max=4, saves=4,
                  save_params=True)  # fmt: skip
    assert tr.status == "completed", tr.message
    d = sum(np.size(a) for a in _leaves(p0))
    for i, snap in enumerate(tr.snapshots):
        size = max(float(np.max(np.abs(a))) for a in _leaves(snap))
        bound = tr["solver_steps"][i] * np.sqrt(d) * (ATOL + RTOL * size) / tr["rho"][i]
        err = abs(tr["normalized_margin"][i] - reference["normalized_margin"][i])
        assert err <= 2 * bound, (i, err, bound)
    assert tr.config["solver"] == name and tr["grad_evals"][-1] > 0


def _leaves(tree):
    import jax

    return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(solver="kvaerno5", dt=0.1), "not with a fixed dt"),
        (dict(solver="implicit-euler", cfl=0.1), "not with a cfl"),
        (dict(solver="kvaerno5", stepsize_controller=KinkStepping()), "explicit solver"),
    ],
)
def test_an_implicit_solver_with_fixed_steps_is_refused(linear, kwargs, needle, monkeypatch):
    import gflow.dynamics.segments as segments

    def no_work(*_, **__):
        raise AssertionError("a segment was compiled before the refusal")

    monkeypatch.setattr(segments, "segment_fn", no_work)
    obj, p0 = linear
    with pytest.raises(ValueError, match=needle):
        run_flow(obj, p0, log_t_max=1, **kwargs)


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (dict(solver="kvaerno5", dt=0.1), "is implicit"),
        (dict(solver="implicit-euler", cfl=0.2), "is implicit"),
        (dict(solver="kvaerno5", kinks=True), "explicit adaptive solver"),
    ],
)
def test_the_command_refuses_them_before_a_folder_exists(tmp_path, options, needle):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=needle):
        run_cli(RunOptions(dynamics="flow", out=str(out), **options))
    assert not out.exists()
