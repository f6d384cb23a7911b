"""Calibration of the verdicts (issue 28): true gradient flows, and doctored twins of them.

Integrates ``ROWS``' gradient flows (``Problem(...).build()`` then ``run_flow`` with
``gflow run``'s default stepping: adaptive Tsit5 at rtol 3e-5 to the loss threshold, then
Ralston at 0.14 of its stability edge; 50 save points), spanning widths 10-200, depths
1-4, ReLU / leaky ReLU / linear activations, bias none / first, a small CNN, the
exponential, logistic and cross-entropy losses, mnist5k / digits / synthetic data, unit
and raw scaling, and horizons log t 30, 100 and 1,000. Each trajectory is saved (run
folders under ``benchmarks/.cache/verdicts-runs/``, ignored by git), so that ``--reuse``
re-reads them and only re-runs the checks.

On each true flow ``gflow.theory.check_run`` gives every verdict's outcome. A row counts
as a *true flow* only when its ``flow fidelity`` verdict passes (the others are reported
apart). From each true flow, *doctored twins* are built from its columns (``twins``),
each made to break one verdict, and checked (``check_run(..., kkt=False)``: the
column-based verdicts):

* rates: ``rho^L`` times ``(log T)^(+-0.25)``, and separately ``Loss`` times ``(log
  T)^(-+0.25)``, from the first save point of the fitted window on, with the smoothed
  margin recomputed as ``l^{-1}(Loss) / rho^L``. What the ``rho`` twin tests: the
  verdict fits ``L log rho + log gamma_tilde = log l^{-1}(Loss)`` (the identity that
  frees the fit from the margin's climb), so a consistent ``rho`` twin leaves the
  ``rho^L`` fit unchanged and moves the loss fit (which subtracts ``(2/L) log
  gamma_tilde``) by ``0.5 / L``: it is caught there for ``L <= 2``, and by ``margin
  monotone`` (the margin then falls) for any ``L``. The informational twin that leaves
  the margin column as recorded (columns that contradict each other) moves the ``rho^L``
  fit itself by 0.25;
* margin monotone / rho increasing: one drop of 1e-6 (issue 28's) and one of 1e-3
  (relative) at a save point past t0, later points lowered by the same factor;
* direction converges: ``direction_step`` replaced by a constant rate per unit log t
  (the median observed one): a rotation;
* alignment: ``1 - cos(theta, -grad Loss)`` made to grow as ``(log t)^0.25`` (the
  true flow's fitted trend replaced, its scatter kept); informational: ``(log t)^0.5``,
  and the gap times ``(log t / log t_w)^0.5`` (which may leave it falling);
* flow fidelity: one save point's judged invariant monitor at twice the tolerance;
* local optimum (fully-connected linear networks only, at the final parameters): the
  better points ``gflow.optimality.planted_search`` plants at known distances;
* GD's step condition (S5): two GD runs of a smooth model with a constant step from
  t0, one above S5's necessary bound ``mu(L)`` and one well below it, against an
  independent Lanczos measurement at the saved parameters.

Per verdict it reports the in-scope FAILs on the true flows (each one a bug of the
verdict), their PASS / INCONCLUSIVE / n/a / OUTSIDE counts, and on the twins built
against it the FAIL rate where the twin's verdict is in scope (not OUTSIDE / n/a), where
the true flow's verdict PASSed, and where the twin's verdict decided (PASS or FAIL), with
the twins' PASS and INCONCLUSIVE counts; then the same per kind of twin. The library
files' hashes go into the results: other sessions edit the verdicts.

    python benchmarks/verdicts.py              # integrate and check (5 min on an idle 2-core CPU)
    python benchmarks/verdicts.py --reuse      # re-read the saved runs, re-run the checks
    python benchmarks/verdicts.py --only default,linear-digits-1000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np
from common import RESULTS, machine, write_result  # same folder

from gflow import theory
from gflow.dynamics import run_flow, run_gd
from gflow.dynamics.solvers import DEFAULT_TOL, default_cfl
from gflow.losses import get_loss
from gflow.problem import Problem
from gflow.trajectory import Trajectory
from gflow.verdict import (
    ALIGNMENT,
    DIRECTION,
    FAIL,
    FIDELITY,
    INCONCLUSIVE,
    LOCAL_OPTIMUM,
    MONOTONE,
    NA,
    OUTSIDE,
    PASS,
    RATES,
    RHO_INCREASING,
)  # fmt: skip

jax.config.update("jax_enable_x64", True)

RUNS = Path(__file__).parent / ".cache" / "verdicts-runs"
SOLVER = "ralston"  # gflow run's default stepping (gflow.runs._validate)
FLOW = dict(solver=SOLVER, cfl=default_cfl(SOLVER), rtol=DEFAULT_TOL[0], atol=DEFAULT_TOL[1],
            clock="loss", saves=50)  # fmt: skip

# (name, Problem fields, log t max): n <= 300, small widths mostly, a few wide
ROWS = [
    ("default", {}, 100),
    ("linear-digits-1000", dict(model="linear", data="digits", classes=(0, 1), loss="exp"), 1000),
    ("default-30", {}, 30),
    ("mnist-w10-exp", dict(width=10, loss="exp"), 100),
    ("mnist-w200", dict(width=200), 30),
    ("mnist-d3-w20", dict(width=20, depth=3), 100),
    ("mnist-d4-w10-exp", dict(width=10, depth=4, loss="exp"), 100),
    ("mnist-leaky-w20", dict(width=20, activation="leaky_relu"), 100),
    ("mnist-deeplinear-w20-exp", dict(width=20, activation="linear", loss="exp"), 100),
    ("mnist-bias-w20", dict(width=20, bias="first"), 100),
    ("mnist-ce3-w20", dict(width=20, loss="ce", classes=(0, 1, 2)), 100),
    ("mnist-raw-w20-exp", dict(width=20, loss="exp", scale="none", n=200), 30),
    (
        "mnist-ce3-leaky-w50",
        dict(width=50, loss="ce", classes=(0, 1, 2), activation="leaky_relu"),
        30,
    ),
    ("mnist-w10-1000", dict(width=10, n=100), 1000),
    ("digits-w10-1000", dict(data="digits", width=10), 1000),
    (
        "digits-d3-leaky-w50-exp-raw",
        dict(data="digits", width=50, depth=3, activation="leaky_relu", loss="exp", scale="none"),
        100,
    ),
    (
        "digits-ce3-w20-raw",
        dict(data="digits", width=20, loss="ce", classes=(0, 1, 2), scale="none"),
        100,
    ),
    ("digits-linear", dict(data="digits", model="linear"), 100),
    ("digits-d4-deeplinear-w10", dict(data="digits", width=10, depth=4, activation="linear"), 100),
    ("digits-bias-w100-exp", dict(data="digits", width=100, bias="first", loss="exp"), 30),
    ("digits-cnn1-w4", dict(data="digits", model="cnn", width=4, depth=1, n=100), 30),
    (
        "digits-cnn2-w4-exp",
        dict(data="digits", model="cnn", width=4, depth=2, loss="exp", n=100),
        100,
    ),
    ("digits-d3-w20-30", dict(data="digits", width=20, depth=3), 30),
    ("mnist-d4-w10-30", dict(width=10, depth=4), 30),
    ("synth-w10-exp-1000", dict(data="synthetic", width=10, loss="exp", n=100), 1000),
    (
        "synth-leaky-w10-raw",
        dict(data="synthetic", width=10, activation="leaky_relu", scale="none", n=100),
        100,
    ),
    ("synth-d3-w50", dict(data="synthetic", width=50, depth=3, n=100), 100),
    (
        "synth-linear-exp-raw-1000",
        dict(data="synthetic", model="linear", loss="exp", scale="none", n=100),
        1000,
    ),
    (
        "synth-d4-leaky-w20-exp",
        dict(data="synthetic", width=20, depth=4, activation="leaky_relu", loss="exp", n=100),
        30,
    ),
    ("synth-w200", dict(data="synthetic", width=200, n=100), 100),
    ("synth-w20-1000", dict(data="synthetic", width=20, n=100), 1000),
    ("synth-deeplinear-w10-30", dict(data="synthetic", width=10, activation="linear", n=100), 30),
    ("synth-d3-w20-30", dict(data="synthetic", width=20, depth=3, n=100), 30),
    (
        "digits-leaky-w10-exp",
        dict(data="digits", width=10, activation="leaky_relu", loss="exp"),
        100,
    ),
    ("mnist-linear-ce3", dict(model="linear", loss="ce", classes=(0, 1, 2)), 100),
    # rows ending in "-snap" save their parameters at every save point, for the verdicts
    # that need them (KKT eps falling, local optimality)
    ("digits-w10-snap", dict(data="digits", width=10, n=100), 100),
    ("digits-linear-snap", dict(data="digits", model="linear", loss="exp", n=100), 300),
    ("mnist-w10-exp-snap", dict(width=10, loss="exp", n=100), 100),
    # symmetric data for Lyu et al. (2021)'s two-layer leaky-ReLU theorem
    ("synth-sym-leaky-w10-exp", dict(data="synthetic-sym", width=10, activation="leaky_relu",
                                     loss="exp", n=100), 300),  # fmt: skip
]
MUST = ("default", "linear-digits-1000")  # the rows whose rates issue 28 wants decided

DROPS = (1e-6, 1e-3)  # the planted drops of the margin / of rho (relative)
EXPONENT = 0.25  # the rates' doctoring, in the exponent of log T (the verdict's resolution)
GROWTH = 0.25  # the alignment twin's net exponent of 1 - cos against log t


# ---------------------------------------------------------------------------- true flows
def problem_config(pb: Problem) -> dict:
    """The problem's fields for the run's config (``Problem.from_config`` reads them back);
    ``order`` goes in as ``declared_order`` (an ``order`` key would override the model's)."""
    cfg = {k: v for k, v in dataclasses.asdict(pb).items() if k not in ("order", "devices")}
    cfg["classes"] = list(cfg["classes"]) if isinstance(cfg["classes"], tuple) else cfg["classes"]
    cfg["declared_order"] = pb.order
    return cfg


def integrate(name: str, fields: dict, log_t_max: float, folder: Path):
    """One true flow, saved to ``folder``; ``(trajectory, objective, wall seconds)``."""
    pb = Problem(**fields)
    _, _, obj, p0 = pb.build()
    t = time.perf_counter()
    cfg = {**problem_config(pb), "calibration_row": name}
    tr = run_flow(obj, p0, log_t_max=log_t_max, config=cfg, save_params=name.endswith("-snap"),
                  **FLOW)  # fmt: skip
    wall = time.perf_counter() - t
    tr.config["wall_seconds"] = wall
    tr.save(folder, objective=False)
    return tr, obj, wall


def reload(folder: Path):
    """A saved true flow and its rebuilt objective; ``(trajectory, objective, wall s)``."""
    tr = Trajectory.load(folder)
    pb = Problem.from_config(tr.config)
    return tr, pb.build()[2], float(tr.config.get("wall_seconds", math.nan))


def outcomes(verdicts) -> dict:
    return {v.name: v.outcome for v in verdicts}


# ---------------------------------------------------------------------------- twins
def _copy(tr: Trajectory, cols: dict | None = None) -> Trajectory:
    columns = {k: np.array(v, np.float64, copy=True) for k, v in tr.columns.items()}
    columns.update(cols or {})
    return Trajectory(tr.kind, columns, config=json.loads(json.dumps(tr.config)),
                      final_params=tr.final_params)  # fmt: skip


def _i0(tr: Trajectory) -> int | None:
    return theory.threshold_index(tr, get_loss(tr.config["loss"]).log_threshold)


def _loglog_past(tr: Trajectory, i0: int) -> np.ndarray:
    """``s = log(log t / log t_w)`` from ``t_w``, the first save point of the verdicts'
    window (at or past t0, with log t > 1), and 0 before it: over the window it is ``log
    log T`` minus a constant, so a factor ``e^{c s}`` moves a fitted exponent by exactly
    ``c`` and leaves the window's first point as recorded."""
    lt = np.asarray(tr["log_t"], np.float64)
    idx = np.arange(lt.size)
    win = idx[(idx >= i0) & (lt > 1) & np.isfinite(lt)]
    s = np.zeros(lt.shape)
    if win.size:
        base = float(lt[win[0]])
        past = (idx >= win[0]) & np.isfinite(lt)
        s[past] = np.log(lt[past] / base)
    return s


def twin_rho(tr, i0, sign, margin_consistent=True):
    """``rho^L`` times ``(log T)^(sign 0.25)`` past t0; the smoothed and normalized margins
    recomputed from it (``l^{-1}(Loss) / rho^L``), unless ``margin_consistent`` is False
    (the recorded margin kept: columns that contradict each other)."""
    L = int(tr.config["order"])
    f = np.exp(sign * EXPONENT * _loglog_past(tr, i0))  # rho^L's factor
    cols = {"rho": tr["rho"] * f ** (1 / L)}
    if margin_consistent:
        cols["smoothed_margin"] = tr["smoothed_margin"] / f
        cols["normalized_margin"] = tr["normalized_margin"] / f
    return _copy(tr, cols)


def twin_loss(tr, i0, sign):
    """``Loss`` times ``(log T)^(-sign 0.25)`` past t0 (``1/(Loss T)``'s exponent moved by
    ``sign 0.25``); the smoothed margin recomputed as ``l^{-1}(Loss) / rho^L``."""
    loss = get_loss(tr.config["loss"])
    ll = tr["log_loss"] - sign * EXPONENT * _loglog_past(tr, i0)
    inv_old = np.asarray(loss.inverse(np.asarray(tr["log_loss"])), np.float64)
    inv_new = np.asarray(loss.inverse(ll), np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(inv_old == inv_new, 1.0, inv_new / inv_old)
    return _copy(tr, {"log_loss": ll, "log_loss_mean": tr["log_loss_mean"] + (ll - tr["log_loss"]),
                      "smoothed_margin": tr["smoothed_margin"] * ratio})  # fmt: skip


def _mid(tr, i0) -> int:
    """A save point in the middle of those past t0 (and past the first one)."""
    return i0 + max(1, (len(tr) - i0) // 2)


def twin_margin_drop(tr, i0, drop):
    """At one save point past t0 the smoothed margin is set ``drop`` (relative) below the
    previous one, and every later point lowered by the same factor: one decrease, the
    rest of the path's increments kept. (Lowering the later points by ``1 - drop`` alone
    would hide the drop wherever the margin rose by more than ``drop`` between the two
    save points, which it does early on.)"""
    k = _mid(tr, i0)
    sm = np.array(tr["smoothed_margin"], np.float64)
    f = sm[k - 1] * (1 - drop) / sm[k]
    sm[k:] *= f
    return _copy(tr, {"smoothed_margin": sm}), k


def twin_rho_drop(tr, i0, drop):
    """At one save point past t0 ``rho`` is set ``drop`` below the previous one, every
    later point lowered by the same factor; the margins recomputed (they rise there)."""
    k = _mid(tr, i0)
    L = int(tr.config["order"])
    rho = np.array(tr["rho"], np.float64)
    f = rho[k - 1] * (1 - drop) / rho[k]
    rho[k:] *= f
    sm = np.array(tr["smoothed_margin"], np.float64)
    nm = np.array(tr["normalized_margin"], np.float64)
    sm[k:] /= f**L
    nm[k:] /= f**L
    return _copy(tr, {"rho": rho, "smoothed_margin": sm, "normalized_margin": nm}), k


def twin_rotation(tr, i0):
    """The direction turning at a constant rate per unit log t (a rotation: an infinite
    path): ``direction_step = c diff(log t)``, ``c`` the median of the true flow's
    increments per unit log t past t0 (log t > 1)."""
    lt = np.asarray(tr["log_t"], np.float64)
    step = np.array(tr["direction_step"], np.float64)
    prev = np.concatenate([[np.nan], lt[:-1]])
    with np.errstate(invalid="ignore"):
        rate = step / (lt - prev)
    win = (np.arange(lt.size) > i0) & (prev > 1) & np.isfinite(rate) & (rate > 0)
    if not win.any():
        return None, "no positive direction step past t0"
    c = float(np.median(rate[win]))
    new = np.where(np.isfinite(step) & np.isfinite(lt - prev), c * (lt - prev), step)
    return _copy(tr, {"direction_step": new}), c


def twin_misalign(tr, i0, true_verdict, fixed: float | None = None, growth: float = GROWTH):
    """``1 - cos(theta, -grad Loss)`` made to grow: times ``(log t / log t_w)^e`` past t0
    (``_loglog_past``), capped at 2 (its largest value), with ``e = growth - a`` (``a``:
    the true flow's fitted exponent), so that the twin's gap grows as ``(log t)^growth``
    with the true flow's scatter about its trend; or ``e = fixed`` (a fixed factor, which
    may leave the gap falling)."""
    a = true_verdict.details.get("exponent") if true_verdict is not None else None
    if fixed is None and a is None:
        return None, f"no fitted exponent on the true flow ({true_verdict.outcome})"
    e = fixed if fixed is not None else growth - float(a)
    gap = np.array(tr["alignment_gap"], np.float64)
    gap = np.minimum(gap * np.exp(e * _loglog_past(tr, i0)), 2.0)
    return _copy(tr, {"alignment_gap": gap}), e


def twin_unfaithful(tr, i0):
    """One save point past t0 with a judged invariant monitor at twice the run's
    tolerance (``theory.fidelity_tolerance``)."""
    tol = theory.fidelity_tolerance(tr)
    if tol is None:
        return None, "the run has no tolerance"
    judged = ["balance_drift", "layer_balance_drift"]
    if tr.config.get("smooth"):
        judged.append("dissipation_defect")
    col = next((c for c in judged if c in tr.columns and np.isfinite(tr[c]).all()), None)
    if col is None:
        return None, "no judged monitor recorded"
    k = _mid(tr, i0)
    v = np.array(tr[col], np.float64)
    v[k] = 2 * tol
    return _copy(tr, {col: v}), col


def twins(tr: Trajectory, true: dict) -> list[dict]:
    """The doctored twins of one true flow: ``{"twin", "target", "traj" | "skipped",
    "note"}``."""
    i0 = _i0(tr)
    if i0 is None:
        return []
    out = []

    def add(twin, target, built, note="", informational=False):
        traj, extra = built if isinstance(built, tuple) else (built, "")
        row = dict(twin=twin, target=target, informational=informational,
                   note=note if traj is not None else str(extra))  # fmt: skip
        if traj is None:
            row["skipped"] = True
        else:
            row["traj"] = traj
            if extra != "" and not note:
                row["note"] = str(extra)
        out.append(row)

    for sign, tag in ((1, "+"), (-1, "-")):
        add(
            f"rates: rho^L x (log T)^{tag}0.25",
            RATES,
            twin_rho(tr, i0, sign),
            "smoothed margin recomputed",
        )
        add(
            f"rates: Loss exponent {tag}0.25",
            RATES,
            twin_loss(tr, i0, sign),
            "smoothed margin recomputed",
        )
    for sign, tag in ((1, "+"), (-1, "-")):
        add(
            f"rates: rho^L x (log T)^{tag}0.25, margin column left as recorded",
            RATES,
            twin_rho(tr, i0, sign, margin_consistent=False),
            "inconsistent columns",
            informational=True,
        )
    for drop in DROPS:
        add(f"margin monotone: a drop of {drop:g}", MONOTONE, twin_margin_drop(tr, i0, drop))
    for drop in DROPS:
        add(f"rho increasing: a drop of {drop:g}", RHO_INCREASING, twin_rho_drop(tr, i0, drop))
    add("direction: constant rate per unit log t", DIRECTION, twin_rotation(tr, i0))
    add(
        f"alignment: 1 - cos grows as (log t)^{GROWTH:g}",
        ALIGNMENT,
        twin_misalign(tr, i0, true.get(ALIGNMENT)),
    )
    add(
        f"alignment: 1 - cos grows as (log t)^{2 * GROWTH:g}",
        ALIGNMENT,
        twin_misalign(tr, i0, true.get(ALIGNMENT), growth=2 * GROWTH),
        informational=True,
    )
    add(
        "alignment: 1 - cos x (log t / log t_w)^0.5",
        ALIGNMENT,
        twin_misalign(tr, i0, true.get(ALIGNMENT), fixed=0.5),
        informational=True,
    )
    add("flow fidelity: a monitor at 2x the tolerance", FIDELITY, twin_unfaithful(tr, i0))
    return out


# ---------------------------------------------------------------------------- GD twins
GD_PROBLEM = dict(data="digits", model="mlp", activation="linear", width=10, depth=2,
                  loss="exp", n=100)  # fmt: skip


def gd_twins(log_t_max: float = 6.0) -> list[dict]:
    """GD with a constant step on a smooth model (deep linear, exp loss, full batch: in
    the GD theorem's scope but for S5), started at ``t0``: from the parameters of a probe
    run (small constant step) at its first save point below the loss threshold, with
    steps ``k / lambda``, ``lambda = lambda_max(Hess Loss)`` there, for ``k`` in (1.5, 0.02):
    at the first step ``eta lambda / mu(L) = 2 k``, above S5's necessary bound for
    ``k = 1.5`` (and below the stability edge 2), well below it for 0.02. Each run's
    ratio ``eta lambda_max / mu(L_t)`` is measured independently at its saved parameters
    past t0 (Lanczos, 60 iterations, on ``Hess Loss / Loss``) and set against
    ``gd_scope``'s judgement (from the run's own sharpness columns)."""
    from gflow.spectrum import top_hessian_eigenvalue

    pb = Problem(**GD_PROBLEM)
    _, _, obj, p0 = pb.build()
    lt_thr = obj.loss.log_threshold
    probe = run_gd(obj, p0, schedule="constant", lr=1e-3, log_t_max=4.0, saves=20,
                   save_params=True)  # fmt: skip
    i0 = theory.threshold_index(probe, lt_thr)
    if i0 is None:
        return [dict(twin="GD step", skipped=True, note="probe never below the threshold")]
    start = probe.snapshots[i0]
    lam = top_hessian_eigenvalue(obj, start, of="loss", iters=60).value
    lam *= math.exp(float(probe["log_loss"][i0]))  # lambda_max(Hess Loss) there
    out = []
    for k in (1.5, 0.02):
        lr = k / lam
        t = time.perf_counter()
        tr = run_gd(obj, start, schedule="constant", lr=lr, log_t_max=log_t_max, saves=30,
                    save_params=True, config=problem_config(pb))  # fmt: skip
        wall = time.perf_counter() - t
        j0 = theory.threshold_index(tr, lt_thr)
        worst, where = -math.inf, None
        if j0 is not None:
            u0 = -float(tr["log_loss"][j0])
            for i in range(j0, len(tr)):
                ll = float(tr["log_loss"][i])
                if not math.isfinite(ll) or ll >= 0:
                    continue
                v = top_hessian_eigenvalue(obj, tr.snapshots[i], of="loss", iters=60).value
                r = lr * v * math.exp(ll) / (u0 / (2 * -ll))  # eta lambda_max / mu(L_t)
                if r > worst:
                    worst, where = r, float(tr["log_t"][i])
        why = theory.gd_scope(tr)
        s5 = [w for w in why if "mu(Loss)" in w or "S5" in w]
        vs = theory.check_run(tr, obj, kkt=False)
        step_v = [v for v in vs if v.name == "GD step condition"]
        out.append(dict(
            twin=f"GD constant step {k:g} / lambda_max(t0), from t0", lr=lr, wall_s=wall,
            status=tr.status, message=tr.message, steps=int(tr["step"][-1]),
            threshold_index=j0, measured_max_ratio=worst, measured_at_log_t=where,
            above_mu=bool(worst > 1), judged_outside_s5=bool(s5), scope=why,
            outcomes=outcomes(vs),
            gd_step_verdict=step_v[0].to_dict() if step_v else None,
            agrees=bool(s5) == bool(worst > 1) if math.isfinite(worst) else None,
        ))  # fmt: skip
        print(
            f"  GD lr {lr:.3g} ({k:g}/lambda): measured max eta lambda / mu = {worst:.3g}; "
            f"gd_scope S5 outside: {bool(s5)} ({wall:.1f} s, {tr.status})",
            flush=True,
        )
        for w in why:
            print(f"    {w}", flush=True)
    return out


def local_optimum(tr: Trajectory, obj, direction_verdict) -> dict | None:
    """The local-optimality verdict on a true flow in its scope (a fully-connected linear
    network), at the run's final parameters, with the power of its search measured on
    better points planted at known distances (``gflow.optimality.planted_search``, 20
    plants in scope): the plants are this verdict's doctored twins. ``None`` outside the
    scope (not run: an observed verdict plants nothing) or when the library has no such
    hook (then the verdict is "not calibrated yet")."""
    import gflow.optimality as opt

    if obj.family != "linear" or not hasattr(opt, "planted_search"):
        return None
    t = time.perf_counter()
    try:
        v = theory.local_optimality(tr, obj, direction_verdict)
    except Exception as e:  # another engineer's work in progress: report, do not stop
        return dict(outcome=None, error=f"{type(e).__name__}: {e}")
    det = v.details
    return dict(outcome=v.outcome, summary=str(v), wall_s=time.perf_counter() - t,
                plants=det.get("plants"), found=det.get("found"), power=det.get("power"),
                radius=det.get("radius"), remaining_path=det.get("remaining_path"))  # fmt: skip


def local_optimum_hook() -> str:
    """What this script can say about the local-optimality verdict's calibration."""
    import gflow.optimality as opt

    if hasattr(opt, "planted_search"):
        return (
            "run on the true flows in its scope (fully-connected linear networks) at "
            "their final parameters; its doctored twins are the 20 better points "
            "planted at known distances by gflow.optimality.planted_search, of which "
            "the fraction found is the search's power (Vardi et al.'s dead-coordinate "
            "network, the issue's known FAIL, is not among these rows)"
        )
    return (
        "not calibrated yet: gflow.optimality has no planted-better-point test "
        f"(its public names: {', '.join(getattr(opt, '__all__', []))})"
    )


# ---------------------------------------------------------------------------- the table
def table(rows: list[dict], twin_rows: list[dict]) -> list[dict]:
    """Per verdict: outcomes on the true flows, and on the twins built against it."""
    names = []
    for r in rows:
        for n in r["outcomes"]:
            if n not in names:
                names.append(n)
    true = [r for r in rows if r["true_flow"]]
    out = []
    for n in names:
        got = [r["outcomes"].get(n) for r in true]
        counts = {o: got.count(o) for o in (PASS, FAIL, INCONCLUSIVE, NA, OUTSIDE)}
        fails = [dict(row=r["name"], summary=r["summaries"][n]) for r in true
                 if r["outcomes"].get(n) == FAIL]  # fmt: skip
        mine = [t for t in twin_rows if t["target"] == n and not t.get("skipped")
                and not t["informational"]]  # fmt: skip
        tw = [t["outcome"] for t in mine]
        scope = [t for t in mine if t["outcome"] not in (OUTSIDE, NA)]
        claimed = [t for t in scope if t["parent_outcome"] == PASS]
        decided = [t for t in scope if t["outcome"] in (PASS, FAIL)]
        planted = None
        if n == LOCAL_OPTIMUM:
            lo = [r["local_optimum"] for r in true if r.get("local_optimum", {}).get("plants")]
            planted = dict(rows=len(lo), plants=sum(x["plants"] for x in lo),
                           found=sum(x["found"] for x in lo))  # fmt: skip
        out.append(dict(
            verdict=n, true_flows=len(true), planted=planted,
            **{f"true_{k}": v for k, v in counts.items()},
            true_fails=fails, twins=len(mine),
            twins_in_scope=len(scope), twin_fails_in_scope=sum(t["outcome"] == FAIL for t in scope),
            twins_claimed=len(claimed),
            twin_fails_claimed=sum(t["outcome"] == FAIL for t in claimed),
            twins_decided=len(decided),
            twin_fails_decided=sum(t["outcome"] == FAIL for t in decided),
            twin_pass=tw.count(PASS), twin_inconclusive=tw.count(INCONCLUSIVE),
            twin_na_outside=tw.count(NA) + tw.count(OUTSIDE),
            twins_skipped=sum(1 for t in twin_rows if t["target"] == n and t.get("skipped")),
        ))  # fmt: skip
    return out


def _rate(k: int, n: int) -> str:
    return f"{k}/{n} ({100 * k / n:.0f}%)" if n else "no twin"


def markdown(summary: list[dict]) -> str:
    head = ["verdict", "true flows: in-scope FAIL", "PASS", "INCONCLUSIVE", "n/a",
            "OUTSIDE", "twins: FAIL / in scope", "FAIL / where the true flow PASSed",
            "FAIL / decided", "twins PASS", "twins INCONCLUSIVE",
            "twins n/a or OUTSIDE"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for s in summary:
        twin_cells = [_rate(s["twin_fails_in_scope"], s["twins_in_scope"]),
                      _rate(s["twin_fails_claimed"], s["twins_claimed"]),
                      _rate(s["twin_fails_decided"], s["twins_decided"]), str(s["twin_pass"]),
                      str(s["twin_inconclusive"]), str(s["twin_na_outside"])]  # fmt: skip
        if s.get("planted"):
            p = s["planted"]
            found = _rate(p["found"], p["plants"])
            twin_cells = [f"planted better points found: {found} ({p['rows']} runs)",
                          "", "", "", "", ""]  # fmt: skip
        lines.append("| " + " | ".join([
            s["verdict"], f"**{s['true_FAIL']}**", str(s["true_PASS"]),
            str(s["true_INCONCLUSIVE"]), str(s["true_n/a"]), str(s["true_OUTSIDE"]),
            *twin_cells,
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def twins_markdown(twin_rows: list[dict]) -> str:
    """One line per kind of twin, over the true flows it was built from."""
    kinds = []
    for t in twin_rows:
        if t["twin"] not in kinds:
            kinds.append(t["twin"])
    head = ["twin", "verdict", "built", "FAIL", "PASS", "INCONCLUSIVE", "n/a or OUTSIDE",
            "FAIL / where the true flow PASSed", "counted"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for k in kinds:
        mine = [t for t in twin_rows if t["twin"] == k and not t.get("skipped")]
        got = [t["outcome"] for t in mine]
        claimed = [t for t in mine if t["parent_outcome"] == PASS
                   and t["outcome"] not in (NA, OUTSIDE)]  # fmt: skip
        info = any(t["informational"] for t in twin_rows if t["twin"] == k)
        lines.append("| " + " | ".join([
            k, mine[0]["target"] if mine else "", str(len(mine)), str(got.count(FAIL)),
            str(got.count(PASS)), str(got.count(INCONCLUSIVE)),
            str(got.count(NA) + got.count(OUTSIDE)),
            _rate(sum(t["outcome"] == FAIL for t in claimed), len(claimed)),
            "no (informational)" if info else "yes",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def gd_markdown(gd: list[dict]) -> str:
    """The S5 step-condition twins: what an independent Lanczos at the saved parameters
    measured, against what ``gd_scope`` (and a GD step verdict, if any) said."""
    head = ["GD run", "steps", "measured max eta lambda_max / mu(L)", "S5 outside (gd_scope)",
            "agrees", "GD step condition", "margin monotone", "rates"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for g in gd:
        if g.get("skipped"):
            lines.append(f"| {g['twin']} | not built: {g.get('note')} |" + " |" * 6)
            continue
        step = g["gd_step_verdict"]["outcome"] if g.get("gd_step_verdict") else "no such verdict"
        lines.append("| " + " | ".join([
            f"{g['twin']} (lr {g['lr']:.3g})", f"{g['steps']:,}",
            f"{g['measured_max_ratio']:.3g} (at log t = {g['measured_at_log_t']:.3g})",
            "yes" if g["judged_outside_s5"] else "no", str(g["agrees"]), step,
            g["outcomes"].get(MONOTONE, ""), g["outcomes"].get(RATES, ""),
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def sources() -> dict:
    """SHA-256 (first 12 hex digits) of the library files the verdicts come from: other
    sessions edit them, and the table holds for these versions only."""
    import hashlib

    import gflow

    root = Path(gflow.__file__).parent
    names = ("theory.py", "verdict.py", "optimality.py", "invariants.py", "dynamics/gd.py")
    return {n: hashlib.sha256((root / n).read_bytes()).hexdigest()[:12] for n in names
            if (root / n).is_file()}  # fmt: skip


def rows_markdown(rows: list[dict], names: list[str]) -> str:
    short = {MONOTONE: "monotone", RHO_INCREASING: "rho", RATES: "rates", FIDELITY: "fidelity",
             DIRECTION: "direction", ALIGNMENT: "alignment"}  # fmt: skip
    head = ["row", "problem", "log t", "L", "wall (s)"] + [short.get(n, n) for n in names]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for r in rows:
        pb = ", ".join(f"{k}={v}" for k, v in r["fields"].items()) or "Problem() defaults"
        cells = [r["name"] + ("" if r["true_flow"] else " (not a true flow)"), pb,
                 f"{r['log_t_max']:g}", str(r["order"]), f"{r['wall_s']:.1f}"]  # fmt: skip
        cells += [r["outcomes"].get(n, "") for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="re-read the saved run folders (integrating only missing ones)",
    )
    ap.add_argument("--only", default=None, help="comma-separated row names")
    ap.add_argument("--no-gd", action="store_true", help="skip the GD step-condition twins")
    ap.add_argument("--runs", default=str(RUNS), help="where the run folders go")
    args = ap.parse_args()
    print(machine(), flush=True)
    only = None if args.only is None else set(args.only.split(","))
    runs = Path(args.runs)
    start = time.perf_counter()
    rows, twin_rows = [], []
    for name, fields, log_t_max in ROWS:
        if only is not None and name not in only:
            continue
        folder = runs / name
        t = time.perf_counter()
        if args.reuse and (folder / "config.json").is_file():
            tr, obj, wall = reload(folder)
            how = "reused"
        else:
            tr, obj, wall = integrate(name, fields, log_t_max, folder)
            how = "integrated"
        t_check = time.perf_counter()
        vs = theory.check_run(tr, obj)
        check_s = time.perf_counter() - t_check
        by = {v.name: v for v in vs}
        fid = by.get(FIDELITY)
        true_flow = fid is not None and fid.outcome == PASS
        row = dict(name=name, fields={k: list(v) if isinstance(v, tuple) else v
                                      for k, v in fields.items()},
                   log_t_max=log_t_max, order=int(tr.config["order"]), status=tr.status,
                   wall_s=wall, check_s=check_s, true_flow=true_flow,
                   threshold_log_t=(None if _i0(tr) is None else float(tr["log_t"][_i0(tr)])),
                   outcomes=outcomes(vs), summaries={v.name: str(v) for v in vs})  # fmt: skip
        rows.append(row)
        flag = (
            ""
            if true_flow
            else "  [NOT A TRUE FLOW: fidelity " + row["outcomes"].get(FIDELITY, "missing") + "]"
        )
        print(f"{name}: {how} ({wall:.1f} s, checks {check_s:.1f} s, total "
              f"{time.perf_counter() - t:.1f} s){flag}", flush=True)  # fmt: skip
        for v in vs:
            if v.outcome == FAIL or v.name == RATES:
                print(f"    {v}", flush=True)
        if not true_flow:
            continue
        lo = local_optimum(tr, obj, by.get(DIRECTION))
        if lo is not None:
            row["local_optimum"] = lo
            if lo["outcome"] is not None:
                row["outcomes"][LOCAL_OPTIMUM] = lo["outcome"]
                row["summaries"][LOCAL_OPTIMUM] = lo["summary"]
            print(f"    {lo.get('summary') or lo.get('error')}", flush=True)
        for tw in twins(tr, by):
            rec = {k: v for k, v in tw.items() if k != "traj"}
            rec.update(parent=name, parent_outcome=by[tw["target"]].outcome
                       if tw["target"] in by else None)  # fmt: skip
            if not tw.get("skipped"):
                tvs = {v.name: v for v in theory.check_run(tw["traj"], obj, kkt=False)}
                v = tvs.get(tw["target"])
                det = {} if v is None else v.details
                hws = [det.get(k, {}).get("half_width") for k in ("exponent_rho", "exponent_loss")]
                hws = [h for h in hws if h is not None] or [det.get("half_width")]
                rec.update(half_width=None if hws[0] is None else float(max(hws)))
                rec.update(
                    outcome=None if v is None else v.outcome,
                    summary=None if v is None else str(v),
                    others={n: w.outcome for n, w in tvs.items() if w.outcome == FAIL},
                )
            twin_rows.append(rec)
    gd = [] if args.no_gd else gd_twins()
    local = local_optimum_hook()
    summary = table(rows, twin_rows)
    true = [r for r in rows if r["true_flow"]]
    rates_inc = sum(r["outcomes"].get(RATES) == INCONCLUSIVE for r in true)
    must = {r["name"]: r["outcomes"].get(RATES) for r in rows if r["name"] in MUST}
    names = [s["verdict"] for s in summary]
    md = "\n\n".join([
        markdown(summary),
        twins_markdown(twin_rows),
        f"Rates INCONCLUSIVE on {rates_inc} of {len(true)} true flows; on the rows issue 28 "
        "names: " + ", ".join(f"{k} {v}" for k, v in must.items()) + ".",
        rows_markdown(rows, names),
        *([gd_markdown(gd)] if gd else []),
        f"Local optimum: {local}.",
    ])  # fmt: skip
    total = time.perf_counter() - start
    print("\n" + md, flush=True)
    for s in summary:
        for f in s["true_fails"]:
            print(f"TRUE-FLOW FAIL ({f['row']}): {f['summary']}")
    weak = [t for t in twin_rows if not t.get("skipped") and not t["informational"]
            and t["outcome"] != FAIL]  # fmt: skip
    print(f"\ntwins not failed by their verdict: {len(weak)}")
    for t in weak:
        print(f"  {t['parent']} / {t['twin']}: {t['summary']}")
    for g in gd:
        print(
            f"GD twin: {g['twin']}: measured max ratio {g.get('measured_max_ratio')}, "
            f"outside for S5: {g.get('judged_outside_s5')}"
        )
    print(f"local optimum: {local}")
    print(f"\ntotal {total:.0f} s", flush=True)
    if only is None:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "verdicts.md").write_text(md + "\n")
        rec = dict(args=vars(args), flow=FLOW, total_s=total, summary=summary, rows=rows,
                   twins=twin_rows, gd=gd, local_optimum=local, rates_inconclusive=rates_inc,
                   true_flows=len(true), must_rows_rates=must, sources=sources())  # fmt: skip
        print(f"-> {write_result('verdicts', rec)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
