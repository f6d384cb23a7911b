"""Event-driven flow through ReLU kinks (``gflow.dynamics.sliding``).

A crossing against a closed form: one sample ``x = e1`` (label +1, exponential loss, so
``-grad log Loss = grad q``) and two leaky-ReLU units. Unit 1 (``z1 = a1 = 1``) stays
active: ``z1 = a1 = e^tau``. Unit 2 (``z2 = 1, a2 = -2``) moves as ``z2' = a2, a2' = z2``
while active: ``z2 = cosh tau - 2 sinh tau``, zero at ``tanh tau* = 1/2``; past it the
leaky slope ``s`` scales both speeds: ``z2 = a2* sinh(s u), a2 = a2* cosh(s u)``,
``u = tau - tau*``. ``t(tau)`` is ``int e^q d tau``, integrated by scipy. Unit 1's own
weight gives ``tau = log w1`` at every save point.
"""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from scipy import integrate

from gflow import data as D
from gflow import make_objective, run_flow
from gflow.dynamics.sliding import KinkStepping, run_flow_kinks
from gflow.models import LEAKY_SLOPE, build_model

TAU_STAR = math.atanh(0.5)
A2_STAR = -2 * math.cosh(TAU_STAR) + math.sinh(TAU_STAR)


def closed(tau: float):
    """``(a1, z2, a2, q)`` at ``tau``."""
    a1 = math.exp(tau)
    if tau <= TAU_STAR:
        z2, a2, s = math.cosh(tau) - 2 * math.sinh(tau), -2 * math.cosh(tau) + math.sinh(tau), 1.0
    else:
        u = LEAKY_SLOPE * (tau - TAU_STAR)
        z2, a2, s = A2_STAR * math.sinh(u), A2_STAR * math.cosh(u), LEAKY_SLOPE
    return a1, z2, a2, a1 * a1 + a2 * s * z2


def log_t_of(tau: float) -> float:
    q = closed(tau)[3]
    val, _ = integrate.quad(lambda v: math.exp(closed(v)[3] - q), 0.0, tau,
                            points=[TAU_STAR] if tau > TAU_STAR else None,
                            epsabs=0, epsrel=1e-13, limit=200)  # fmt: skip
    return q + math.log(val)


@pytest.fixture(scope="module")
def two_units():
    model = build_model("mlp", (2,), 1, width=2, activation="leaky_relu", seed=0)
    obj, p = make_objective(model, (np.eye(2), np.array([1, 0])), "exp", order=2)
    obj = eqx.tree_at(lambda o: (o.x, o.y), obj, (obj.x[:1], obj.y[:1]))  # one sample
    p = jax.tree.map(np.asarray, p)
    p["layers"][0]["kernel"] = np.array([[1.0, 1.0], [0.0, 0.0]])
    p["layers"][1]["kernel"] = np.array([[1.0], [-2.0]])
    return obj, jax.tree.map(jnp.asarray, p)


def _errors(tr):
    """Per save point after t = 0: ``(tau, max |theta - closed form|, |log t - log t(tau)|)``."""
    out = []
    for lt, snap in zip(tr["log_t"][1:], tr.snapshots[1:], strict=True):
        w = np.asarray(snap["layers"][0]["kernel"])
        a = np.asarray(snap["layers"][1]["kernel"])
        tau = math.log(w[0, 0])
        a1, z2, a2, _ = closed(tau)
        out.append((tau, max(abs(a[0, 0] - a1), abs(w[0, 1] - z2), abs(a[1, 0] - a2)),
                    abs(lt - log_t_of(tau))))  # fmt: skip
    return out


def test_a_crossing_where_the_closed_form_says(two_units):
    obj, p = two_units
    rtol, atol = 1e-10, 1e-13
    tr = run_flow_kinks(obj, p, stepping=KinkStepping(rtol=rtol, atol=atol), log_t_min=-2,
                        log_t_max=6, saves=8, save_params=True)  # fmt: skip
    assert tr.status == "completed"
    assert tr["crossings"][-1] == tr["events"][-1] == 1
    assert tr["slide_entries"][-1] == 0
    errs = _errors(tr)
    assert errs[0][0] < TAU_STAR < errs[-1][0]  # save points on both sides of the switch
    # PID control keeps each step's local error below rtol |y| + atol (|y| <= e^1.1 < 3.1);
    # over tau <= 1.1 the flow's growth is at most e^1.1 < 3.1: global <= steps * that
    steps = tr["solver_steps"][-1]
    bound = steps * (rtol * 3.1 + atol) * 3.1
    for tau, e_theta, e_log_t in errs:
        assert e_theta <= bound, (tau, e_theta, bound)
        # log t = log(e^z - 1): z's error over 1 - e^-z (z >= log(1 + e^-2)), plus quad's
        assert e_log_t <= bound / (1 - 1 / (1 + math.exp(-2))) + 1e-12, (tau, e_log_t)


def test_fixed_steps_keep_fifth_order_through_a_crossing(two_units):
    """Tsit5 with the switch located: error ~ dt^5 (fitted slope >= 3 asked); the same
    steps without event location jump with the field: error ~ dt (slope <= 1.5)."""
    obj, p = two_units
    dts = [0.2, 0.1, 0.05]
    ours, plain = [], []
    for dt in dts:
        tr = run_flow_kinks(obj, p, stepping=KinkStepping(dt=dt), log_t_min=4, log_t_max=6,
                            saves=2, save_params=True)  # fmt: skip
        assert tr["crossings"][-1] == 1
        ours.append(max(e for _, e, _ in _errors(tr)))
        tr = run_flow(obj, p, solver="tsit5", dt=dt, log_t_min=4, log_t_max=6, saves=2,
                      save_params=True)  # fmt: skip
        plain.append(max(e for _, e, _ in _errors(tr)))
    slope = np.polyfit(np.log(dts), np.log(ours), 1)[0]
    assert slope >= 3, (ours, slope)
    assert max(plain) > 1e3 * max(ours), (plain, ours)


@pytest.fixture(scope="module")
def digits():
    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 60, seed=0), "unit")
    return make_objective(build_model("mlp", ds.input_shape, 1, width=8, seed=3), ds,
                          "logistic")  # fmt: skip


def test_bad_stepping_is_refused(digits):
    obj, p = digits
    for bad, needle in [
        (KinkStepping(rtol=2.0), "rtol"),
        (KinkStepping(margin=0.1), "margin"),
        (KinkStepping(dt=-1.0), "dt"),
        (KinkStepping(fallback=0.0), "fallback"),
        (KinkStepping(window=0), "window"),
    ]:
        with pytest.raises(ValueError, match=needle):
            run_flow_kinks(obj, p, stepping=bad, log_t_max=0.0, log_t_min=-1.0, saves=1)
    with pytest.raises(ValueError, match="error estimate"):
        run_flow_kinks(obj, p, solver="rk4", log_t_max=0.0, log_t_min=-1.0, saves=1)


def test_run_flow_takes_kink_stepping_as_its_controller(two_units):
    obj, p = two_units
    from gflow import KinkStepping as Exported

    a = run_flow(obj, p, solver="tsit5", stepsize_controller=Exported(rtol=1e-9, atol=1e-12),
                 log_t_min=0, log_t_max=3, saves=3)  # fmt: skip
    b = run_flow_kinks(obj, p, stepping=KinkStepping(rtol=1e-9, atol=1e-12), log_t_min=0,
                       log_t_max=3, saves=3)  # fmt: skip
    np.testing.assert_array_equal(a["normalized_margin"], b["normalized_margin"])
    assert a.config["stepping"] == "kinks" and a.config["kink_pairs"]["ever_switched"] == 1
    with pytest.raises(ValueError, match="loss clock"):
        run_flow(obj, p, stepsize_controller=KinkStepping(), clock="time", log_t_max=1.0)



def test_a_handover_continues_the_run_in_the_default_suite(two_units):
    """The fallback's path, fast: with ``window=1`` and a ratio no event stepping meets,
    the run hands over at its one crossing and the segment driver (``driver.drive``,
    from a ``Handover``) takes it to the horizon: every save point there, counters going
    on from the kink part, the dissipation integral never decreasing, and the crossing
    kept in the kink counters. (A renamed setting of the handover's driver call fails
    here, not only in the slow suite.)"""
    from gflow.dynamics.clock import log_t_grid

    obj, p = two_units
    rows = []
    tr = run_flow_kinks(obj, p, stepping=KinkStepping(rtol=1e-9, atol=1e-12, fallback=1e-12,
                                                      window=1),
                        log_t_min=0, log_t_max=3, saves=4, progress=rows.append)  # fmt: skip
    assert tr.status == "completed", tr.message
    fb = tr.config["handover"]
    assert "then stability stepping" in tr.message and fb["solver"] == "ralston"
    assert fb["log_t"] < 3 and len(tr.config["event_cost"]) == 1
    # the save points after t = 0, the handed-over ones located by the save event
    # (bisection in tau to about 1e-13 relative; d log t / d tau is O(1) here)
    np.testing.assert_allclose(tr["log_t"][1:], log_t_grid(0, 3, 4), rtol=0, atol=1e-10)
    after = tr["log_t"] > fb["log_t"]
    assert after.sum() >= 1
    assert np.all(tr["crossings"][after] == 1) and np.all(tr["events"][after] == 1)
    assert np.all(np.diff(tr["grad_evals"]) > 0) and np.all(np.diff(tr["step"]) >= 0)
    assert np.all(np.diff(tr["dissipation"]) >= 0), tr["dissipation"]
    assert len(rows) == len(tr) and rows[-1]["grad_evals"] == tr["grad_evals"][-1]
    assert len(tr.config["sliding_pattern"]) == len(tr)


MARGIN = 1e-12


@pytest.fixture(scope="module")
def sliding_run(digits):
    """Sample 16 / unit 7 of this problem slides from log t ~ 6.7 to 20 (``test_kinks``)."""
    obj, p = digits
    return run_flow_kinks(obj, p, solver="bosh3", log_t_min=7, log_t_max=9, saves=2,
                          save_params=True,
                          stepping=KinkStepping(rtol=1e-8, atol=1e-11, margin=MARGIN))  # fmt: skip


def test_a_sliding_pair_stays_on_its_surface_to_rounding(sliding_run):
    """A first-layer pre-activation is linear in theta and every stage of the sliding field
    has its rate zero up to the K x K solve's rounding, so a sliding pair keeps the
    ``|z| / (|h| |w|)`` it entered with (``margin``, the crossing registers just past the
    surface) plus a few ulps per step; a chattering solver leaves it at its tolerance."""
    tr, margin = sliding_run, MARGIN
    assert tr.status == "completed"
    assert np.all(tr["sliding"][1:] >= 1) and tr["slide_entries"][-1] >= 1
    assert tr.config["kink_pairs"]["left_past"] == 0  # every switch made in its own step
    eps = np.finfo(np.float64).eps
    bound = 2 * margin + 16 * eps * tr["solver_steps"]
    assert np.all(tr["sliding_offset"][1:] <= bound[1:]), (tr["sliding_offset"], bound)
    # the exact invariants, reference-free: drift within the controller's tolerance
    # times the steps taken (each step's local error <= rtol |y|)
    assert np.nanmax(tr["balance_drift"]) <= 1e-8 * tr["solver_steps"][-1]


def test_seeds_run_one_after_the_other_and_their_rows_name_the_seed(two_units):
    from gflow import run_flow_seeds

    obj, p = two_units
    rows = []
    trs = run_flow_seeds(obj, [p, p], seeds=[3, 4], stepsize_controller=KinkStepping(),
                         log_t_min=0, log_t_max=1, saves=1, progress=rows.append)  # fmt: skip
    assert [tr.config["seed"] for tr in trs] == [3, 4]
    assert {r["seed"] for r in rows} == {3, 4}
    np.testing.assert_array_equal(trs[0]["normalized_margin"], trs[1]["normalized_margin"])


def test_an_exit_at_an_end_of_the_slope_interval_is_taken_once(digits):
    """With save points at log t = -2 and -1 this problem has an exit located at a slack
    of exactly zero at log t ~ -1.5: the pair must leave there and the flow go on (kept
    as sliding, it was found exiting at the same tau again and again: a livelock that
    spent any step budget)."""
    obj, p = digits
    tr = run_flow_kinks(obj, p, stepping=KinkStepping(rtol=1e-8, atol=1e-11), log_t_min=-2,
                        log_t_max=-1, saves=2, max_steps=2000)  # fmt: skip
    assert tr.status == "completed", tr.message
    assert tr["slide_exits"][-1] >= 4
    assert tr.config["kink_pairs"]["left_past"] == 0


def _worst_param_error(tr, ref) -> float:
    """The largest ``|theta - theta_ref| / |theta_ref|`` over the save points after t = 0."""
    flat = [[np.concatenate([np.ravel(a) for a in jax.tree.leaves(s)]) for s in t.snapshots[1:]]
            for t in (tr, ref)]  # fmt: skip
    return max(float(np.linalg.norm(a - b) / np.linalg.norm(b)) for a, b in zip(*flat, strict=True))


@pytest.mark.slow  # about 40 s: seven fixed-step runs to log t = 3
def test_order_through_crossings_and_sliding(digits):
    """Digits 0/1, 60 samples, width 8, to log t = 3: 283 switches, 251 crossings and 21
    sliding entries. Tsit5 at fixed steps dt with every switch located converges at high
    order: the fitted slope of the worst error over the save points against dt is >= 3
    (the issue's bar; Tsit5 is fifth order), where every chattering scheme has slope 1.
    The reference is dt_min / 4; its own error, against dt_min / 8, must be below 1/30
    of the smallest error fitted, which biases the fitted slope by < log(1 + 1/30) / log 2
    ~ 0.05."""
    obj, p = digits

    def run(dt):
        return run_flow_kinks(obj, p, stepping=KinkStepping(dt=dt), log_t_min=-2, log_t_max=3,
                              saves=6, save_params=True)  # fmt: skip

    dts = [0.1, 0.05, 0.025]
    runs = [run(dt) for dt in dts]
    ref, finer = run(dts[-1] / 4), run(dts[-1] / 8)
    for tr in [*runs, ref, finer]:  # one event sequence at every step size
        assert tr.status == "completed"
        for key in ("events", "crossings", "slide_entries", "slide_exits"):
            assert tr[key][-1] == ref[key][-1], key
    assert ref["crossings"][-1] >= 100 and ref["slide_entries"][-1] >= 5
    errs = [_worst_param_error(tr, ref) for tr in runs]
    assert _worst_param_error(ref, finer) <= min(errs) / 30, (errs, _worst_param_error(ref, finer))
    slope = np.polyfit(np.log(dts), np.log(errs), 1)[0]
    assert slope >= 3, (errs, slope)


def _nnls_eps(obj, params, slopes) -> tuple[float, float]:
    """The KKT residual of a one-hidden-layer net written out by hand: ``grad q_n`` with
    the pattern ``slopes`` (n, width) is ``y_n (x_n (a * s_n)^T, s_n * z_n)``; eps is
    scipy's NNLS on those rows directly (no Gram matrix). Returns ``(eps, |theta_s|)``."""
    q = np.asarray(obj.margins(params))
    c = q.min() ** -0.5  # order 2
    w = np.asarray(params["layers"][0]["kernel"]) * c
    a = np.asarray(params["layers"][1]["kernel"])[:, 0] * c
    x, y = np.asarray(obj.x).reshape(q.size, -1), np.asarray(obj.y, np.float64)
    z = x @ w
    rows = np.array([np.concatenate([y[n] * np.outer(x[n], a * slopes[n]).ravel(),
                                     y[n] * slopes[n] * z[n]]) for n in range(q.size)])  # fmt: skip
    theta = np.concatenate([w.ravel(), a])
    return scipy.optimize.nnls(rows.T, theta, maxiter=10_000)[1], float(np.linalg.norm(theta))


def test_kkt_with_the_sliding_pairs_clarke_multipliers(sliding_run, digits):
    """Along a kink run the KKT residual takes the sliding pair's slope as its Clarke
    multiplier. Against the residual written out by hand and solved by NNLS on the
    gradient rows (``_nnls_eps``): kkt.py's Gram matrix squares the rows' condition
    number, so its eps keeps at least half of float64's digits: |diff| <= sqrt(eps) |theta_s|.
    The flow's element and autodiff's must differ by more than that (else this test could
    not tell them apart)."""
    from gflow.kinks import pattern
    from gflow.kkt import clarke_pattern, kkt_residual
    from gflow.theory import kkt_along

    obj, _ = digits
    tr = sliding_run
    at_end = tr.config["sliding_pattern"][-1]
    assert at_end["pairs"] == [[0, 16, 7]] and 0 < at_end["slopes"][0] < 1
    p = tr.snapshots[-1]
    clarke = clarke_pattern(obj, p, at_end)
    one_sided = [np.asarray(a) for a in pattern(obj, p)]
    assert one_sided[0][16, 7] in (0.0, 1.0) and clarke[0][16, 7] == at_end["slopes"][0]
    tol = math.sqrt(np.finfo(np.float64).eps)
    eps = {}
    for name, slopes, kw in [("clarke", clarke, dict(slopes=clarke)), ("one", one_sided, {})]:
        r = kkt_residual(obj, p, gap=None, **kw)
        ref, norm = _nnls_eps(obj, p, slopes[0])
        assert abs(r.eps - ref) <= tol * norm, (name, r.eps, ref)
        eps[name] = r.eps
    assert abs(eps["clarke"] - eps["one"]) > 10 * tol * norm, eps
    rows = kkt_along(tr, obj)
    assert rows[-1]["sliding"] == 1 and rows[-1]["eps"] == eps["clarke"]
    assert rows[-1]["eps_rel_one_sided"] * rows[-1]["eps"] / rows[-1]["eps_rel"] == pytest.approx(
        eps["one"], rel=1e-12
    )


def test_gflow_run_kinks_takes_its_own_default_tolerances():
    """``--kinks`` without ``--rtol`` / ``--atol`` runs at 1e-9 / 1e-12 (where it meets the
    flow's accuracy bar with the fewest evaluations, benchmarks/RESULTS.md); plain flows
    keep 3e-5 / 3e-8; a tolerance given is kept."""
    from gflow.runs import RunOptions, _validate

    for opts, want in [
        (RunOptions(dynamics="flow", kinks=True), (1e-9, 1e-12)),
        (RunOptions(dynamics="flow"), (3e-5, 3e-8)),
        (RunOptions(dynamics="flow", kinks=True, rtol=1e-6), (1e-6, 1e-12)),
    ]:
        _validate(opts)
        assert (opts.rtol, opts.atol) == want
        assert opts.solver is None  # the library's default: bosh3 under kinks, else ralston


def test_gflow_run_kink_fallback_reaches_the_stepping():
    from gflow.cli import build_parser
    from gflow.runs import RunOptions, driver_args

    def stepping(options):
        return driver_args(options, "flow")["stepsize_controller"]

    for text, want in [("250", 250.0), ("inf", None)]:
        ns = build_parser().parse_args(["run", "--kinks", "--kink-fallback", text])
        assert stepping(RunOptions.from_namespace(ns)).fallback == want
    assert stepping(RunOptions(kinks=True)).fallback == KinkStepping().fallback == 100.0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--kinks", "--kink-fallback", "-1"])


@pytest.mark.slow  # about 27 s: a kink run handing over, then stability stepping
def test_a_fallback_goes_on_by_stability_stepping_and_says_so(digits):
    """A fallback ratio no event stepping meets hands over at the first cost check; the
    run then has every save point, its counters go on from the handover, and its
    monitors are still relative to the run's start: the dissipation integral never
    decreases (its rate is |f|^2), and the balance drift is the one computed afresh
    from the start and the end."""
    from gflow.dynamics.clock import log_t_grid
    from gflow.invariants import balance_structure, unit_balances

    obj, p = digits
    rows = []
    tr = run_flow_kinks(obj, p, stepping=KinkStepping(rtol=1e-8, atol=1e-11, fallback=1e-12,
                                                      window=64),
                        log_t_min=-4, log_t_max=3, saves=7, save_params=True,
                        progress=rows.append)  # fmt: skip
    assert tr.status == "completed", tr.message
    fb = tr.config["handover"]
    assert "then stability stepping" in tr.message and fb["solver"] == "ralston"
    assert len(tr.config["event_cost"]) == 1 and tr.config["event_cost"][0][1] > 0
    # every save point, the last ones located by run_flow's save event (bisection in tau
    # to about 1e-12 here; d log t / d tau is O(1) on this problem)
    np.testing.assert_allclose(tr["log_t"][1:], log_t_grid(-4, 3, 7), rtol=0, atol=1e-10)
    after = tr["log_t"] > fb["log_t"]
    assert after.sum() >= 1 and (~after).sum() >= 2
    assert np.all(np.diff(tr["grad_evals"]) > 0) and np.all(np.diff(tr["step"]) >= 0)
    assert np.all(tr["events"][after] == 64)  # the kink counters stop at the handover
    assert np.all(tr["crossings"][after] == tr["crossings"][after][0])
    assert np.all(np.diff(tr["dissipation"][1:]) >= 0), tr["dissipation"]
    structure, _ = balance_structure(obj.graphdef, p)
    b0, b1 = unit_balances(structure, p), unit_balances(structure, tr.final_params)
    pairs = [(np.asarray(a), np.asarray(b)) for a, b in zip(b1, b0, strict=True)]
    drift = sum(float(np.abs(a - b).sum()) for a, b in pairs) / tr["rho"][-1] ** 2
    # the same differences, each entry computed elsewhere: rounding of the balances only
    # (a few ulps of |b|); a monitor reset at the handover would miss the kink part's drift
    size = sum(float(np.abs(a).sum() + np.abs(b).sum()) for a, b in pairs) / tr["rho"][-1] ** 2
    assert abs(tr["balance_drift"][-1] - drift) <= 8 * np.finfo(np.float64).eps * size
    assert rows[-1]["grad_evals"] == tr["grad_evals"][-1] and len(rows) == len(tr)
    assert len(tr.config["sliding_pattern"]) == len(tr)
