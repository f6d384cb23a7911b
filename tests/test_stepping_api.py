"""One default, stepping as objects (issue 31): ``run_flow(objective, params0)`` runs
``gflow run``'s flow; the flat ``rtol / atol / dt / cfl / warmup / refresh / drift`` of
old warn and forward to the objects ``gflow.dynamics.stepping`` names, for one release."""

import json
import subprocess
import sys
import warnings

import diffrax
import numpy as np
import optimistix as optx
import pytest

from gflow.dynamics import StabilityStepping, run_flow, stepping
from gflow.dynamics.solvers import DEFAULT_TOL
from tests.conftest import build_digits

SHORT = dict(log_t_max=2.0, saves=4)


@pytest.fixture(scope="module")
def tiny():
    return build_digits(30, width=4, init_seed=2)[2:]


def _same(a, b):
    assert a.column_names == b.column_names and len(a) == len(b)
    for c in a.column_names:
        np.testing.assert_array_equal(a[c], b[c], err_msg=c)


def test_stepping_names_the_objects():
    """The solver's default: stability stepping for one with a default cfl, else error
    control at the default tolerances; a dt is a constant step; a cfl, a fixed one."""
    assert stepping("ralston") == (StabilityStepping(), None)
    assert stepping("rk4", cfl=0.2, rtol=1e-4) == (StabilityStepping(cfl=0.2, rtol=1e-4), None)
    pid, dt0 = stepping("tsit5", rtol=1e-7)
    assert type(pid) is diffrax.PIDController and dt0 is None
    assert (pid.rtol, pid.atol) == (1e-7, DEFAULT_TOL[1])
    ctrl, dt0 = stepping("ralston", dt=0.01)
    assert isinstance(ctrl, diffrax.ConstantStepSize) and dt0 == 0.01
    with pytest.raises(ValueError, match="fixed step dt takes no"):
        stepping("ralston", dt=0.01, cfl=0.1)


def test_the_default_is_gflow_runs_flow(tiny):
    """No stepping given: Ralston under ``StabilityStepping()`` (Tsit5 warm-up at the
    default tolerances, the cfl chosen from the estimate), as ``gflow run``."""
    obj, p0 = tiny
    tr = run_flow(obj, p0, **SHORT)
    cfg = tr.config
    assert (cfg["solver"], cfg["warmup"], cfg["cfl_control"]) == ("ralston", "tsit5", "estimate")
    assert (cfg["rtol"], cfg["atol"]) == DEFAULT_TOL and cfg["cfl"] == 0.14
    _same(tr, run_flow(obj, p0, solver="ralston", stepsize_controller=StabilityStepping(),
                       **SHORT))  # fmt: skip


def test_the_default_solver_follows_the_field(tiny):
    """No solver named: RKC with 10 stages on a smooth field (a linear model: the stability
    edge binds its steps), Ralston on a ReLU net, Bogacki-Shampine through the kinks."""
    from gflow.dynamics import KinkStepping

    linear = build_digits(30, model="linear", loss="exp", init_seed=2)[2:]
    assert linear[0].smooth is True and tiny[0].smooth is False
    assert run_flow(*linear, **SHORT).config["solver"] == "rkc10"
    assert run_flow(*tiny, **SHORT).config["solver"] == "ralston"
    kinks = run_flow(*tiny, stepsize_controller=KinkStepping(), log_t_max=0.5, saves=2)
    assert kinks.config["solver"] == "bosh3"


@pytest.mark.parametrize(
    "flat, objects",
    [
        (dict(solver="tsit5", rtol=1e-6, atol=1e-9),
         dict(solver="tsit5", stepsize_controller=diffrax.PIDController(rtol=1e-6, atol=1e-9))),
        (dict(solver="ralston", cfl=0.2, rtol=1e-5, atol=1e-8),
         dict(solver="ralston", stepsize_controller=StabilityStepping(cfl=0.2, rtol=1e-5,
                                                                      atol=1e-8))),
        (dict(solver="rk4", dt=0.05),
         dict(solver="rk4", stepsize_controller=diffrax.ConstantStepSize(), dt0=0.05)),
        (dict(solver="ralston", stepsize_controller=StabilityStepping(cfl=0.3), rtol=1e-5),
         dict(solver="ralston", stepsize_controller=StabilityStepping(cfl=0.3, rtol=1e-5))),
    ],
    ids=["rtol", "cfl", "dt", "warm-up-tolerance"],
)  # fmt: skip
def test_flat_arguments_warn_and_forward(tiny, flat, objects):
    """A flat argument gives a ``FutureWarning`` that writes out its object form, and the
    run is the object form's, to the bit."""
    obj, p0 = tiny
    with pytest.warns(FutureWarning, match="stepsize_controller="):
        a = run_flow(obj, p0, **flat, **SHORT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        b = run_flow(obj, p0, **objects, **SHORT)
    _same(a, b)


def test_a_plain_pid_controller_is_gflows_own(tiny):
    """A ``PIDController`` with nothing but its tolerances set runs gflow's own error
    control; one with a norm of its own is the user's, and named so in the config."""
    obj, p0 = tiny
    plain = run_flow(obj, p0, solver="tsit5", **SHORT,
                     stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-8))  # fmt: skip
    assert "stepsize_controller" not in plain.config and plain.config["rtol"] == 1e-5
    own = run_flow(obj, p0, solver="tsit5", **SHORT,
                   stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-8,
                                                             norm=optx.max_norm))  # fmt: skip
    assert own.config["stepsize_controller"] == "PIDController"


@pytest.mark.parametrize(
    "kw, words",
    [
        (dict(stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-8), dt0=0.1),
         "dt0 is the fixed step"),
        (dict(stepsize_controller=diffrax.ConstantStepSize()), "give dt0"),
        (dict(stepsize_controller=StabilityStepping(), dt0=0.1), "leave dt0 out"),
        (dict(dt0=0.1, dt=0.1), "fixed step once"),
        (dict(stepsize_controller=StabilityStepping(cfl=0.1), cfl=0.2), "cfl once"),
        (dict(stepsize_controller=diffrax.PIDController(rtol=1e-5, atol=1e-8), rtol=1e-6),
         "step control once"),
        (dict(stepsize_controller=StabilityStepping(rtol=-1.0)), "rtol=-1.0"),
        (dict(dt0=-0.1), "dt0=-0.1"),
        (dict(accuracy=0.0), "accuracy=0.0"),
        (dict(accuracy=-1e-3), "accuracy=-0.001"),
        (dict(accuracy=float("nan")), "accuracy=nan"),
        (dict(accuracy=1.0), "accuracy=1.0"),
        (dict(accuracy="tight"), "accuracy=tight"),
    ],
)  # fmt: skip
def test_bad_stepping_is_one_line_before_any_work(tiny, kw, words):
    obj, p0 = tiny
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        with pytest.raises(ValueError, match=words):
            run_flow(obj, p0, **kw, **SHORT)


@pytest.mark.slow
def test_the_library_defaults_equal_gflow_run_to_the_bit(tmp_path):
    """``run_flow(objective, params0, log_t_max=100)`` and ``run_gd(objective, params0,
    log_t_max=100)`` on the default problem are ``gflow run``'s two trajectories, every
    column to the bit."""
    from gflow.dynamics import run_gd
    from gflow.problem import Problem
    from gflow.trajectory import Trajectory

    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "gflow.cli", "run", "--no-plot", "--no-progress",
                    "--out", str(out)], check=True)  # fmt: skip
    _, _, obj, p0 = Problem().build()
    gd = run_gd(obj, p0, log_t_max=100)
    _same(Trajectory.load(out / "gd"), gd)
    assert gd.config["schedule"] == "loss-based"
    cli = Trajectory.load(out / "flow")
    lib = run_flow(obj, p0, log_t_max=100)
    _same(cli, lib)
    settings = ("solver", "warmup", "cfl", "cfl_control", "rtol", "atol", "accuracy", "drift")
    assert {k: lib.config[k] for k in settings} == {k: cli.config[k] for k in settings}
    assert json.loads(json.dumps(lib.config["log_t_max"])) == 100
