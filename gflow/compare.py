"""GD against gradient flow (THEORY.md, "Dynamics": GD is Euler on the flow).

* ``compare(a, b)``: align two trajectories on ``log t`` (``b``'s columns interpolated
  at ``a``'s save points, monotone cubic in ``log t``) and report the differences in
  log loss, ``rho`` (relative), normalized and smoothed margin, and the relative
  parameter distance where both runs saved parameters at the same ``log t``.
* ``gd_flow_gap``: GD at several constant steps against the flow at the same time ``t``
  (an RK4 reference on the time clock), and the fitted order of the gap in the step
  (about 1: GD is a first-order method).
* ``sharpness_along``: ``eta * lambda_max`` along a GD run from its snapshots, with
  ``lambda_max`` the top Hessian eigenvalue of ``Loss``; GD can track the flow only
  while it stays below 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from scipy.interpolate import PchipInterpolator

from gflow.objective import Objective
from gflow.spectrum import top_hessian_eigenvalue
from gflow.trajectory import Trajectory

__all__ = ["Comparison", "compare", "fit_order", "gd_flow_gap", "sharpness_along"]

# (column, how the difference is taken)
COMPARED = (
    ("log_loss", "abs"),
    ("rho", "rel"),
    ("normalized_margin", "abs"),
    ("smoothed_margin", "abs"),
)


def _flat(p) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.tree.map(jnp.asarray, p))[0], np.float64)


@dataclass
class Comparison:
    """Per aligned save point: ``log_t`` and ``diffs[column]`` (``a - b``; relative for
    ``rho``); ``param_distance``: ``|theta_a - theta_b| / |theta_b|`` (NaN where the
    runs did not both save parameters at that ``log t``)."""

    log_t: np.ndarray
    diffs: dict[str, np.ndarray]
    param_distance: np.ndarray
    names: tuple[str, str] = ("a", "b")
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = {"points": int(self.log_t.size), "names": list(self.names), "notes": self.notes}
        if self.log_t.size:
            out["log_t_range"] = [float(self.log_t[0]), float(self.log_t[-1])]
        for k, d in self.diffs.items():
            if d.size:
                out[k] = {"final": float(d[-1]), "max_abs": float(np.max(np.abs(d)))}
        pd = self.param_distance[np.isfinite(self.param_distance)]
        if pd.size:
            out["param_distance"] = {
                "final": float(self.param_distance[-1]),
                "max": float(pd.max()),
            }
        return out


def compare(a: Trajectory, b: Trajectory, names: tuple[str, str] = ("a", "b")) -> Comparison:
    """Differences ``a - b`` at ``a``'s save points inside ``b``'s ``log t`` range."""
    la, lb = np.asarray(a["log_t"]), np.asarray(b["log_t"])
    fb = np.isfinite(lb)
    notes = []
    if fb.sum() < 2:
        raise ValueError("the second trajectory needs at least two save points with t > 0")
    lbf = lb[fb]
    order = np.argsort(lbf, kind="stable")
    lbf = lbf[order]
    uniq = np.concatenate([[True], np.diff(lbf) > 0])
    lbf = lbf[uniq]
    inside = np.isfinite(la) & (la >= lbf[0]) & (la <= lbf[-1])
    if not inside.all():
        notes.append(
            f"{int((~inside).sum())} save points of {names[0]} lie outside {names[1]}'s range"
        )
    lt = la[inside]
    diffs = {}
    for col, how in COMPARED:
        vb = np.asarray(b[col])[fb][order][uniq]
        va = np.asarray(a[col])[inside]
        ib = PchipInterpolator(lbf, vb)(lt)
        diffs[col] = (va - ib) / np.abs(ib) if how == "rel" else va - ib
    dist = np.full(lt.size, math.nan)
    if a.snapshots and b.snapshots:
        idx_a = np.nonzero(inside)[0]
        for k, i in enumerate(idx_a):
            j = np.nonzero(np.abs(lb - la[i]) <= 1e-9 * max(1.0, abs(la[i])))[0]
            if j.size and i < len(a.snapshots) and j[0] < len(b.snapshots):
                ta, tb = _flat(a.snapshots[i]), _flat(b.snapshots[j[0]])
                dist[k] = np.linalg.norm(ta - tb) / np.linalg.norm(tb)
    return Comparison(lt, diffs, dist, names, notes)


def fit_order(steps, gaps) -> float:
    """Slope of ``log gap`` against ``log step`` (least squares)."""
    steps, gaps = np.asarray(steps, float), np.asarray(gaps, float)
    if steps.size < 2 or np.any(gaps <= 0):
        return math.nan
    return float(np.polyfit(np.log(steps), np.log(gaps), 1)[0])


def gd_flow_gap(
    objective: Objective,
    params0,
    lrs,
    *,
    t_end: float,
    ref_substeps: int = 16,
) -> dict:
    """GD with constant steps ``lrs`` to time ``t_end`` against the flow at ``t_end``.

    Each step divides ``t_end`` into a whole number of steps (``t_end / lr`` is rounded
    and the step adjusted). The flow reference is RK4 on the time clock at a step of
    ``min(lrs) / ref_substeps``. Returns the per-step gaps (relative parameter distance,
    log loss, smoothed margin) and their fitted orders in the step.
    """
    from gflow.dynamics import run_flow, run_gd

    lrs = np.sort(np.asarray(lrs, float))
    if lrs.size < 2 or not lrs[0] > 0:
        raise ValueError("give at least two positive step sizes")
    if not t_end > 0:
        raise ValueError(f"t_end must be positive, got {t_end}")
    log_t_end = math.log(t_end)
    ref = run_flow(
        objective,
        params0,
        clock="time",
        solver="rk4",
        dt=float(lrs[0]) / ref_substeps,
        log_t_max=log_t_end,
        saves=2,
    )
    if ref.status != "completed":
        raise RuntimeError(f"flow reference failed: {ref.message}")
    th_ref = _flat(ref.final_params)
    rows = []
    for lr in lrs:
        k = max(1, round(t_end / lr))
        eta = t_end / k
        gd = run_gd(objective, params0, schedule="constant", lr=eta, max_steps=k, saves=2)
        if int(gd["step"][-1]) != k or not np.all(np.isfinite(_flat(gd.final_params))):
            raise RuntimeError(f"GD at lr {eta:g} did not finish {k} finite steps: {gd.message}")
        th = _flat(gd.final_params)
        rows.append(
            dict(
                lr=eta,
                steps=k,
                param_gap=float(np.linalg.norm(th - th_ref) / np.linalg.norm(th_ref)),
                log_loss_gap=float(abs(gd["log_loss"][-1] - ref["log_loss"][-1])),
                margin_gap=float(abs(gd["smoothed_margin"][-1] - ref["smoothed_margin"][-1])),
            )
        )
    steps = [r["lr"] for r in rows]
    return dict(
        t_end=t_end,
        rows=rows,
        reference=dict(
            solver="rk4", dt=float(lrs[0]) / ref_substeps, log_loss=float(ref["log_loss"][-1])
        ),
        order_param=fit_order(steps, [r["param_gap"] for r in rows]),
        order_log_loss=fit_order(steps, [r["log_loss_gap"] for r in rows]),
        order_margin=fit_order(steps, [r["margin_gap"] for r in rows]),
    )


def sharpness_along(objective: Objective, traj: Trajectory, *, iters: int = 20) -> np.ndarray:
    """``eta * lambda_max(Hessian of Loss)`` at each snapshot of a GD run (NaN where the
    step is not defined, e.g. the initial point).

    ``lambda_max = Loss * lambda_max(H_log + g g^T)`` is never formed: the product is
    ``exp(log eta + log Loss) * lambda_max(H_log + g g^T)``.
    """
    if traj.kind != "gd":
        raise ValueError("sharpness_along needs a GD run")
    if not traj.snapshots:
        raise ValueError("the GD run saved no parameters: run it with save_params=True")
    log_eta = np.asarray(traj["log_lr"])
    out = np.full(len(traj.snapshots), math.nan)
    for i, snap in enumerate(traj.snapshots):
        if not np.isfinite(log_eta[i]):
            continue
        p = jax.tree.map(jnp.asarray, snap)
        lam = top_hessian_eigenvalue(objective, p, of="loss", iters=iters, tol=1e-6).value
        out[i] = math.exp(log_eta[i] + float(traj["log_loss"][i])) * lam
    return out
