"""The added ODE solvers: RKC's tableau, order, stability and error estimate; stiffness-set
steps in run_flow."""

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gflow.dynamics import run_flow
from gflow.dynamics.solvers import make_solver, rkc_tableau, stability_edge
from gflow.spectrum import top_hessian_eigenvalue
from tests.conftest import adaptive, rel_err


@pytest.mark.parametrize("s", [2, 3, 5, 10, 20, 50])
def test_rkc_tableau_order_conditions_and_bounded_weights(s):
    A, c, beta = rkc_tableau(s)
    b = A[s, :s]
    assert b.sum() == pytest.approx(1, abs=1e-12)
    assert b @ c[:s] == pytest.approx(0.5, abs=1e-12)
    assert np.abs(A).max() < 3  # no cancellation between huge weights
    # stability boundary ~ 0.65 s^2 (Verwer's (2/3)(s^2 - 1)(1 - 2 eps / 15), eps = 2/13)
    assert beta == pytest.approx((2 / 3) * (s**2 - 1) * (1 - 4 / 195), rel=0.02)


@pytest.mark.parametrize("s", [3, 10])
def test_rkc_stability_polynomial_bounded_on_the_interval_and_not_beyond(s):
    A, _, beta = rkc_tableau(s)
    Ai, b = A[:s, :s], A[s, :s]
    R = lambda z: 1 + z * b @ np.linalg.solve(np.eye(s) - z * Ai, np.ones(s))
    inside = np.linspace(-beta, 0, 400)
    assert max(abs(R(z)) for z in inside) <= 1 + 1e-9
    # beta is (close to) the edge: |R| exceeds 1 within 25% beyond it
    beyond = np.linspace(-1.25 * beta, -beta, 400)
    assert max(abs(R(z)) for z in beyond) > 1.01


@pytest.mark.parametrize("name", ["rkc3", "rkc10"])
def test_rkc_converges_at_order_2(name):
    # dy/dt = -t y, y(0) = 1: y(t) = exp(-t^2 / 2), smooth, known.
    term = diffrax.ODETerm(lambda t, y, args: -t * y)
    hs = np.array([1 / 4, 1 / 8, 1 / 16, 1 / 32, 1 / 64])
    errs = []
    for h in hs:
        sol = diffrax.diffeqsolve(term, make_solver(name), 0.0, 2.0, h, jnp.asarray(1.0))
        errs.append(abs(float(sol.ys[-1]) - np.exp(-2.0)))
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    assert abs(slope - 2) < 0.2, slope


def test_rkc_is_stable_on_a_stiff_linear_system_where_rk4_is_not():
    # y' = -diag(lam) y with lam up to 1000, step 0.05: h * lam_max = 50
    lam = jnp.asarray(np.geomspace(1, 1000, 20))
    term = diffrax.ODETerm(lambda t, y, args: -lam * y)
    y0 = jnp.ones(20)
    h = 0.05
    assert stability_edge("rkc10") > h * 1000 > stability_edge("rk4")
    ok = diffrax.diffeqsolve(term, make_solver("rkc10"), 0.0, 2.0, h, y0).ys[-1]
    bad = diffrax.diffeqsolve(term, make_solver("rk4"), 0.0, 2.0, h, y0, throw=False).ys[-1]
    assert float(jnp.max(jnp.abs(ok))) < 1.0
    assert not float(jnp.max(jnp.abs(bad))) < 1.0
    # and the slow mode (lam = 1) is right to second order at this step
    assert float(ok[0]) == pytest.approx(np.exp(-2.0), rel=5e-3)


def test_rkc_error_estimate_tracks_the_local_error():
    term = diffrax.ODETerm(lambda t, y, args: -t * y)
    solver = make_solver("rkc5")
    ratios = []
    for h in (0.1, 0.05):
        state = solver.init(term, 1.0, 1.0 + h, jnp.asarray(1.0), None)
        y1, err, *_ = solver.step(term, 1.0, 1.0 + h, jnp.asarray(1.0), None, state, False)
        exact = np.exp(-((1 + h) ** 2 - 1) / 2)
        ratios.append(abs(float(err)) / abs(float(y1) - exact))
    # an asymptotically correct estimate: within a factor 3 of the true local error
    assert all(1 / 3 < r < 3 for r in ratios), ratios


def test_rkc_names():
    assert stability_edge("rkc7") == pytest.approx(rkc_tableau(7)[2])
    with pytest.raises(ValueError, match="2..200"):
        make_solver("rkc1")
    with pytest.raises(ValueError, match="no stability edge"):
        stability_edge("tsit5")


def _flat(p):
    return np.concatenate([np.ravel(v) for v in jax.tree.leaves(p)])


def _rel(a, b):
    a, b = _flat(a), _flat(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_stability_stepping_follows_a_tight_reference_on_a_smooth_flow(smooth):
    obj, p0 = smooth
    kw = dict(clock="loss", log_t_max=20.0, saves=6)
    ref = run_flow(obj, p0, **adaptive(1e-10, 1e-13), **kw)
    assert ref.status == "completed", ref.message
    errs = {}
    for solver, cfl in (("rkc10", 0.4), ("rkc10", 0.1), ("rk4", 0.4)):
        tr = run_flow(obj, p0, solver=solver, cfl=cfl, rtol=1e-6, atol=1e-9, **kw)
        assert tr.status == "completed", tr.message
        assert tr.config["cfl"] == cfl and tr.config["warmup"] == "tsit5"
        errs[solver, cfl] = _rel(tr.final_params, ref.final_params)
        assert rel_err(tr["smoothed_margin"], ref["smoothed_margin"]) < 1e-4
    assert max(errs.values()) < 1e-3, errs
    assert errs["rkc10", 0.1] < errs["rkc10", 0.4], errs  # a smaller step is more accurate


def test_stability_stepping_on_a_relu_network_matches_small_fixed_steps(small):
    obj, p0 = small
    kw = dict(clock="loss", log_t_max=20.0, saves=11)
    lam = top_hessian_eigenvalue(obj, p0, iters=20).value
    tr = run_flow(obj, p0, solver="rkc10", cfl=0.5, rtol=1e-4, atol=1e-7, **kw)
    assert tr.status == "completed", tr.message
    # reference: RK4 at a fixed step well inside its stability region all the way
    lam_end = top_hessian_eigenvalue(obj, tr.final_params, iters=20).value
    ref = run_flow(obj, p0, solver="rk4", dt=0.1 / max(lam, lam_end), **kw)
    assert _rel(tr.final_params, ref.final_params) < 1e-2
    assert rel_err(tr["smoothed_margin"], ref["smoothed_margin"]) < 1e-3
    # the theory's claims still hold on the run: margin up, norm up past the threshold
    past = np.nonzero(tr["log_loss"] < obj.loss.log_threshold)[0][0]
    assert np.all(np.diff(tr["smoothed_margin"][past:]) > 0)
    assert np.all(np.diff(tr["rho"][past:]) > 0)


def test_stability_stepping_bad_arguments(small):
    obj, p0 = small
    with pytest.raises(ValueError, match="fixed step dt takes no cfl"):
        run_flow(obj, p0, solver="rk4", dt=0.1, cfl=0.5)
    with pytest.raises(ValueError, match=r"cfl must be in \(0, 1\]"):
        run_flow(obj, p0, solver="rkc5", cfl=1.5)
    with pytest.raises(ValueError, match="no stability edge known for solver 'tsit5'"):
        run_flow(obj, p0, solver="tsit5", cfl=0.5)
    with pytest.raises(ValueError, match="warmup solver 'euler' has no error estimate"):
        run_flow(obj, p0, solver="rkc5", cfl=0.5, warmup="euler")


def test_flow_continues_from_log_t0(smooth):
    obj, p0 = smooth
    kw = dict(clock="loss", **adaptive(1e-9, 1e-12))
    whole = run_flow(obj, p0, log_t_max=6.0, saves=4, **kw)
    half = run_flow(obj, p0, log_t_max=2.0, saves=2, **kw)
    rest = run_flow(obj, half.final_params, log_t0=2.0, log_t_max=6.0, saves=4, **kw)
    assert rest["log_t"][0] == 2.0 and rest["log_t"][-1] == pytest.approx(6.0)
    a, b = _flat(rest.final_params), _flat(whole.final_params)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-6
