"""Outcomes of the verdicts (gflow.verdict): every outcome of rates, direction, alignment
and fidelity shown on trajectories built to give it, the follow-up columns recorded on
every run against closed forms, and one exit-code rule for ``gflow run`` and ``gflow
check``."""

import json
import math

import numpy as np
import pytest

from gflow.losses import get_loss
from gflow.theory import alignment, direction, fidelity, rates
from gflow.trajectory import Trajectory
from gflow.verdict import FAIL, INCONCLUSIVE, NA, OUTSIDE, PASS, Verdict, failed, outside


def _flow(log_t, *, L=2, c_loss=0.5, shift_rho=0.0, shift_loss=0.0, gap=None, step=None,
          **config):  # fmt: skip
    """A flow trajectory on the rates of Theorem 4.3 (exponential loss) with the exponents
    of rho^L and 1/(Loss T) shifted by ``shift_rho`` / ``shift_loss``, a settling margin,
    and optional ``alignment_gap`` / ``direction_step`` columns."""
    lt = np.asarray(log_t, float)
    x = np.log(lt)
    log_loss = math.log(c_loss) - lt - (2 - 2 / L + shift_loss) * x
    sm = 0.1 * (1 - 0.5 / lt)  # a smoothed margin settling to its limit (Theorem 4.1)
    # rho^L = l^{-1}(Loss) / gamma_tilde, times (log T)^shift_rho
    rho = (np.asarray(get_loss("exp").inverse(log_loss)) / sm * lt**shift_rho) ** (1 / L)
    n = lt.size
    cols = dict(step=np.arange(n, dtype=float), t=np.exp(np.minimum(lt, 700.0)), log_t=lt,
                log_loss=log_loss, rho=rho, q_min=np.ones(n), normalized_margin=sm,
                smoothed_margin=sm)  # fmt: skip
    if gap is not None:
        cols["alignment_gap"] = np.asarray(gap, float)
    if step is not None:
        cols["direction_step"] = np.asarray(step, float)
    return Trajectory("flow", cols, config={"order": L, "loss": "exp", **config})


# ------------------------------------------------------------------------- rates


@pytest.mark.parametrize("L", [1, 2, 3])
def test_rates_pass_within_the_band_and_fail_outside_it(L):
    """Exact rates over log t = 10..1000 PASS; either exponent off by 0.25 FAILs (its
    interval lies wholly outside theory +- 0.125 at half-width <= 0.25)."""
    lt = np.geomspace(10, 1000, 40)
    gap = 0.3 / lt  # an aligning run: 1 - cos falls
    assert rates(_flow(lt, L=L, gap=gap), L, 0.0)[0].outcome == PASS
    for shift in (dict(shift_rho=0.25), dict(shift_rho=-0.25), dict(shift_loss=0.25),
                  dict(shift_loss=-0.25)):  # fmt: skip
        v = rates(_flow(lt, L=L, gap=gap, **shift), L, 0.0)[0]
        assert v.outcome == FAIL, (shift, v)


def test_rates_inconclusive_on_a_short_window_names_a_horizon():
    """Under a decade of log T, or intervals wider than the resolution: INCONCLUSIVE,
    never FAIL, and the verdict says to which log t a run would have to go."""
    lt = np.geomspace(2, 12, 20)
    v = rates(_flow(lt, shift_rho=0.25, gap=0.3 / lt), 2, 0.0)[0]
    assert v.outcome == INCONCLUSIVE and v.passed is None
    assert "log t of about" in v.decide and v.details["horizon_log_T"] > 12
    rng = np.random.default_rng(0)
    lt = np.geomspace(3, 300, 20)
    noisy = _flow(lt, gap=0.3 / lt)
    noisy.columns["rho"] = noisy["rho"] * np.exp(0.3 * rng.standard_normal(lt.size))
    v = rates(noisy, 2, 0.0)[0]
    assert v.outcome == INCONCLUSIVE and "cannot tell" in v.summary


# ---------------------------------------------------------- direction, alignment


def test_direction_outcomes_from_the_recorded_column():
    lt = np.geomspace(2, 400, 40)
    dlt = np.diff(lt, prepend=np.nan)
    settling = 0.05 * lt ** -2.0 * dlt  # increments per unit log t ~ (log t)^-2
    assert direction(_flow(lt, step=settling), 0.0).outcome == PASS
    rotation = 0.01 * dlt  # a constant rate per unit log t: never Cauchy
    v = direction(_flow(lt, step=rotation), 0.0)
    assert v.outcome == FAIL and abs(v.details["exponent"]) < 0.05
    slow = 0.05 * lt**-0.4 * dlt  # what true flows show early on: neither
    assert direction(_flow(lt, step=slow), 0.0).outcome == INCONCLUSIVE
    short = np.geomspace(2, 6, 40)  # a rotation over half a decade: not resolved
    v = direction(_flow(short, step=0.01 * np.diff(short, prepend=np.nan)), 0.0)
    assert v.outcome == INCONCLUSIVE and v.decide
    assert direction(_flow(lt[:5], step=settling[:5]), 0.0).outcome == NA
    none = direction(_flow(lt), 0.0)  # no column, no snapshots: says so
    assert none.outcome == NA and "direction_step" in none.summary


def test_alignment_outcomes_from_the_recorded_column():
    lt = np.geomspace(2, 400, 40)
    assert alignment(_flow(lt, gap=0.4 * lt**-0.6), None, 0.0).outcome == PASS
    v = alignment(_flow(lt, gap=0.01 * lt**0.5), None, 0.0)
    assert v.outcome == FAIL and v.details["exponent"] == pytest.approx(0.5, abs=1e-9)
    assert alignment(_flow(lt, gap=np.full(lt.size, 0.1)), None, 0.0).outcome == INCONCLUSIVE
    assert alignment(_flow(lt, gap=np.zeros(lt.size)), None, 0.0).outcome == PASS


def test_follow_up_columns_against_closed_forms(smooth):
    """``alignment_gap`` is 1 - cos(theta, -grad Loss) and ``direction_step`` the chord
    between save points' directions, both on every flow and GD run without snapshots."""
    from jax.flatten_util import ravel_pytree

    from gflow.dynamics import run_flow, run_gd

    obj, p0 = smooth
    flow = run_flow(obj, p0, log_t_max=6, saves=6, save_params=True)
    gd = run_gd(obj, p0, schedule="loss-based", log_t_max=6, saves=6)
    eps = np.finfo(np.float64).eps
    for tr in (flow, gd):
        assert np.all(np.isfinite(tr["alignment_gap"]))
        assert math.isnan(tr["direction_step"][0]) and np.all(tr["direction_step"][1:] > 0)
    units = [np.asarray(ravel_pytree(p)[0]) for p in flow.snapshots]
    units = [u / np.linalg.norm(u) for u in units]
    chords = [np.linalg.norm(b - a) for a, b in zip(units[:-1], units[1:], strict=True)]
    # two unit vectors each within a few ulps: the chord to 16 eps
    assert np.max(np.abs(np.array(chords) - flow["direction_step"][1:])) <= 16 * eps
    for p, gap in zip(flow.snapshots, flow["alignment_gap"], strict=True):
        th = np.asarray(ravel_pytree(p)[0])
        g = np.asarray(ravel_pytree(obj.grad_log_loss(p))[0])
        cos = -th @ g / np.linalg.norm(th) / np.linalg.norm(g)
        # 1 - cos in float64 loses |cos| eps to cancellation; the column does not
        assert gap == pytest.approx(1 - cos, abs=8 * eps)


# ---------------------------------------------------------------------- fidelity


def _monitored(drift, *, smooth=False, layer=None, reasons=None):
    lt = np.geomspace(1, 30, len(drift))
    tr = _flow(lt, rtol=1e-6, smooth=smooth, dtype="float64")
    tr.columns.update(balance_drift=np.asarray(drift, float),
                      layer_balance_drift=np.asarray(drift if layer is None else layer, float),
                      dissipation_defect=np.full(lt.size, 0.5),
                      solver_steps=np.arange(lt.size, dtype=float))  # fmt: skip
    tr.config["invariants"] = dict(reasons or {})
    return tr


def test_fidelity_outcomes_and_no_pass_over_nan():
    assert fidelity(_monitored([0, 1e-8, 2e-7, 3e-7])).outcome == PASS
    assert fidelity(_monitored([0, 1e-8, 2e-5, 3e-7])).outcome == FAIL
    broke = fidelity(_monitored([0, 1e-8, math.nan, 3e-7]))  # the run broke down there
    assert broke.outcome == FAIL and "not finite" in broke.summary
    why = "the model has no hidden units (one layer): there is no balance invariant"
    one = _monitored([math.nan] * 4, smooth=True,
                     reasons={"balance_drift": why, "layer_balance_drift": why})  # fmt: skip
    v = fidelity(one)  # only the dissipation defect (0.5 > rtol) is judged: named, no NaN
    assert v.outcome == FAIL and "nan" not in v.summary and "no hidden units" in v.summary
    relu = fidelity(_monitored([math.nan] * 4, reasons={"balance_drift": why,
                                                        "layer_balance_drift": why}))  # fmt: skip
    assert relu.outcome == NA and "nan" not in relu.summary and "no hidden units" in relu.summary


# --------------------------------------------------------------- outcomes, exits


def test_outcomes_round_trip_and_outside_keeps_the_observed_outcome():
    v = Verdict("rates", None, "s", {"a": 1}, decide="run longer")
    assert v.outcome == INCONCLUSIVE and v.mark == "inconclusive" and not v.failed
    assert Verdict.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    o = outside(Verdict("rates", False, "s"), "ReLU")
    assert o.outcome == OUTSIDE and o.details["observed"] == FAIL and not failed([o])
    assert failed([Verdict("x", True, ""), Verdict("y", False, "")])


def test_run_and_check_agree_on_the_exit_code(tmp_path, capsys):
    """The same folder gives the same exit code: 0 for a run whose verdicts hold, 1 from
    ``gflow check`` once a planted drop makes an in-scope verdict FAIL."""
    from gflow.cli import main

    out = tmp_path / "r"
    args = ["run", "--data", "digits", "--n", "60", "--width", "8", "--dynamics", "flow",
            "--log-t-max", "20", "--saves", "20", "--no-progress", "--no-plot"]  # fmt: skip
    assert main(args + ["--out", str(out)]) == 0
    assert main(["check", str(out), "--no-kkt"]) == 0
    tr = Trajectory.load(out)
    sm = tr["smoothed_margin"].copy()
    # a planted drop of 1e-6: within what the run's accuracy (rtol 3e-5) can produce,
    # so no evidence either way (INCONCLUSIVE, exit 0)
    sm[-5] = sm[-6] * (1 - 1e-6)
    tr.columns["smoothed_margin"] = sm
    tr.save(out, objective=False)
    assert main(["check", str(out), "--no-kkt"]) == 0
    assert "[INCONCLUSIVE] margin monotone" in capsys.readouterr().out
    sm[-5] = sm[-6] * (1 - 1e-3)  # beyond it (at most 2 L rtol (1 + 1/cos) ~ 3e-4): FAIL
    tr.columns["smoothed_margin"] = sm
    tr.save(out, objective=False)
    assert main(["check", str(out), "--no-kkt"]) == 1
    text = capsys.readouterr().out
    assert "[FAIL] margin monotone" in text
    saved = json.loads((out / "checks.json").read_text())["verdicts"]
    assert {v["name"]: v["outcome"] for v in saved}["margin monotone"] == FAIL


def test_diverged_gd_is_checked_without_a_traceback(tmp_path):
    """A constant step that diverges: the run fails cleanly, its checks are written."""
    from gflow.cli import main

    out = tmp_path / "d"
    rc = main(["run", "--data", "digits", "--n", "60", "--width", "8", "--dynamics", "gd",
               "--schedule", "constant", "--lr", "50", "--loss", "exp", "--log-t-max", "8",
               "--no-progress", "--no-plot", "--out", str(out)])  # fmt: skip
    assert rc == 1
    assert (out / "checks.json").is_file()
    assert main(["check", str(out), "--no-kkt"]) == 1  # the run failed: the same code



def test_monotone_drops_within_the_runs_accuracy_are_inconclusive():
    """A flow's drop no larger than 2 L accuracy (1 + 1/cos) (what its accuracy can
    produce between two save points) is no evidence: INCONCLUSIVE; beyond it: FAIL; with
    no accuracy given (GD: exact to rounding), any drop beyond 1e-9 FAILs."""
    from gflow.theory import monotonicity

    lt = np.geomspace(2, 200, 30)
    tr = _flow(lt, gap=np.full(lt.size, 0.0))
    sm = 0.1 - 0.05 / lt  # rising to its limit
    sm[10] = sm[9] * (1 - 1e-5)  # allowance at cos = 1, L = 2, accuracy 3e-5: 2.4e-4
    tr.columns["smoothed_margin"] = sm
    v = monotonicity(tr, 0.0, accuracy=3e-5)[0]
    assert v.outcome == INCONCLUSIVE and v.details["within_accuracy"] == 1, v
    assert monotonicity(tr, 0.0)[0].outcome == FAIL
    sm[10] = sm[9] * (1 - 3e-4)
    v = monotonicity(tr, 0.0, accuracy=3e-5)[0]
    assert v.outcome == FAIL and v.details["largest_relative_drop"] == pytest.approx(3e-4)


def test_rates_do_not_pass_a_slow_rho_hidden_in_a_growing_margin():
    """rho^L off by (log T)^-0.25 with the smoothed margin kept consistent (u / rho^L,
    then growing as (log T)^0.25 without bound): l^{-1}(Loss) is untouched, so only the
    margin's failure to settle, or its term in the loss's rate, shows it; the verdict
    must not PASS."""
    lt = np.geomspace(10, 1000, 40)
    tr = _flow(lt, shift_rho=-0.25, gap=0.3 / lt)
    u = np.asarray(get_loss("exp").inverse(tr["log_loss"]))
    tr.columns["smoothed_margin"] = u / tr["rho"] ** 2
    v = rates(tr, 2, 0.0)[0]
    assert v.outcome != PASS, v


def test_kkt_falling_outcomes():
    """The relative KKT eps at the saved parameters: falling as a power of log t PASSes,
    rising resolved over a decade FAILs, a flat one is INCONCLUSIVE, two or three points
    are INCONCLUSIVE (no trend), one point is n/a."""
    from gflow.theory import kkt_falling

    lt = np.geomspace(2, 400, 30)
    tr = _flow(lt)

    def pts(eps):
        return [dict(log_t=float(t), eps_rel=float(e), delta=0.1) for t, e in zip(lt, eps,
                                                                                   strict=True)]

    assert kkt_falling(pts(0.5 * lt**-0.5), tr, 0.0).outcome == PASS
    assert kkt_falling(pts(0.01 * lt**0.5), tr, 0.0).outcome == FAIL
    assert kkt_falling(pts(np.full(lt.size, 0.2)), tr, 0.0).outcome == INCONCLUSIVE
    assert kkt_falling(pts(0.5 * lt**-0.5)[:3], tr, 0.0).outcome == INCONCLUSIVE
    assert kkt_falling(pts(0.5 * lt**-0.5)[-1:], tr, 0.0).outcome == NA
