"""GD against gradient flow (GD is Euler's method on the flow: ``docs/theory.md``).

* ``compare(a, b)``: align two trajectories on ``log t`` (``b``'s columns interpolated
  at ``a``'s save points, monotone cubic in ``log t``, and both at the last time both
  reached) and report the differences in log loss, ``rho`` (relative), normalized and
  smoothed margin, and the relative parameter distance, the snapshots of both runs
  interpolated in ``log t``.
* ``gd_flow_gap``: GD at several constant steps against the flow at the same time ``t``,
  and the fitted order of the gap in the step (about 1: GD is a first-order method),
  with a note when GD left the flow. The reference: for a ReLU MLP the flow through its
  kinks event by event (``KinkStepping``, error ~1e-10, so that gaps of 1e-7 can be
  fitted), otherwise RK4 on the time clock.
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


def _series(tr: Trajectory) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, log t)`` of a run's save points with ``t > 0``, sorted, one per log t."""
    lt = np.asarray(tr["log_t"], np.float64)
    idx = np.nonzero(np.isfinite(lt))[0]
    idx = idx[np.argsort(lt[idx], kind="stable")]
    keep = np.concatenate([[True], np.diff(lt[idx]) > 0]) if idx.size else idx.astype(bool)
    return idx[keep], lt[idx[keep]]


def _snapshot_curve(tr: Trajectory):
    """``(log t, flat parameters)`` of a run's snapshots (t > 0, one per log t), for
    interpolation; None with fewer than two."""
    idx, lt = _series(tr)
    keep = idx < len(tr.snapshots)
    if keep.sum() < 2:
        return None
    return lt[keep], np.stack([_flat(tr.snapshots[i]) for i in idx[keep]])


def compare(
    a: Trajectory, b: Trajectory, names: tuple[str, str] = ("a", "b"), *, tol: float = 1e-9
) -> Comparison:
    """Differences ``a - b`` on ``log t``, at ``a``'s save points inside ``b``'s range
    and at the last time both reached.

    ``b`` is interpolated (monotone cubic in ``log t``) at ``a``'s save points; a point
    within ``tol * max(1, |log t|)`` of ``b``'s ends counts as inside (float jitter at the
    last save point). Runs that overshoot their last save target (GD's steps end past
    it) are compared at the earlier of the two end times, with ``a`` interpolated there
    too. ``param_distance``: ``|theta_a - theta_b| / |theta_b|`` where both saved
    parameters, each run's snapshots interpolated in ``log t`` (their save points need
    not coincide: GD's never do the flow's)."""
    ia, la = _series(a)
    ib, lb = _series(b)
    notes = []
    if lb.size < 2:
        raise ValueError("the second trajectory needs at least two save points with t > 0")
    if la.size < 1:
        raise ValueError("the first trajectory has no save point with t > 0")
    slack = tol * max(1.0, float(np.max(np.abs(lb))))
    inside = (la >= lb[0] - slack) & (la <= lb[-1] + slack)
    lt = np.clip(la[inside], lb[0], lb[-1])
    end = min(la[-1], lb[-1])
    if la.size >= 2 and end >= lb[0] and (lt.size == 0 or end > lt[-1] + slack):
        lt = np.append(lt, end)  # the last time both reached
    outside = int((~inside).sum())
    if outside:
        notes.append(f"{outside} save points of {names[0]} lie outside {names[1]}'s range")
    diffs = {}
    for col, how in COMPARED:
        vb = PchipInterpolator(lb, np.asarray(b[col], np.float64)[ib])(lt)
        va_all = np.asarray(a[col], np.float64)[ia]
        va = va_all[inside]
        if lt.size > va.size:  # the common end point
            va = np.append(va, PchipInterpolator(la, va_all)(lt[-1]) if la.size >= 2 else np.nan)
        diffs[col] = (va - vb) / np.abs(vb) if how == "rel" else va - vb
    dist = np.full(lt.size, math.nan)
    ca, cb = _snapshot_curve(a), _snapshot_curve(b)
    if ca is not None and cb is not None:
        lo, hi = max(ca[0][0], cb[0][0]) - slack, min(ca[0][-1], cb[0][-1]) + slack
        ok = (lt >= lo) & (lt <= hi)
        if ok.any():
            pts = np.clip(lt[ok], max(ca[0][0], cb[0][0]), min(ca[0][-1], cb[0][-1]))
            ta = PchipInterpolator(ca[0], ca[1], axis=0)(pts)
            tb = PchipInterpolator(cb[0], cb[1], axis=0)(pts)
            dist[ok] = np.linalg.norm(ta - tb, axis=1) / np.linalg.norm(tb, axis=1)
    return Comparison(lt, diffs, dist, names, notes)


LEFT_THE_FLOW = 0.1  # relative parameter gap past which GD no longer follows the flow


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
    reference: str = "auto",
) -> dict:
    """GD with constant steps ``lrs`` to time ``t_end`` against the flow at ``t_end``.

    Each step divides ``t_end`` into a whole number of steps (``t_end / lr`` is rounded
    and the step adjusted). The flow reference (``reference``): ``"kinks"``, the flow
    through a ReLU MLP's kinks event by event (Tsit5 at rtol 1e-11 between them, the
    save point at ``t_end`` located on the dense output); ``"rk4"``, RK4 on the time
    clock at a step of ``min(lrs) / ref_substeps`` (first order at every kink it steps
    over, so its own error is then about ``gap / ref_substeps``); ``"auto"``: kinks
    where the model has them. Returns the per-step gaps (relative parameter distance,
    log loss, smoothed margin) and their fitted orders in the step.
    """
    import diffrax

    from gflow.dynamics import KinkStepping, run_flow, run_gd
    from gflow.kinks import kink_model

    lrs = np.sort(np.asarray(lrs, float))
    if lrs.size < 2 or not lrs[0] > 0:
        raise ValueError("give at least two positive step sizes")
    if not t_end > 0:
        raise ValueError(f"t_end must be positive, got {t_end}")
    if reference not in ("auto", "kinks", "rk4"):
        raise ValueError(f"reference must be 'auto', 'kinks' or 'rk4', got {reference!r}")
    if reference == "auto":
        try:
            kink_model(objective, params0)
            reference = "kinks"
        except ValueError:
            reference = "rk4"
    log_t_end = math.log(t_end)
    if reference == "kinks":
        ref_kw = dict(solver="tsit5", rtol=1e-11, atol=1e-14)
        ref = run_flow(objective, params0, clock="loss", solver="tsit5", saves=2,
                       stepsize_controller=KinkStepping(rtol=1e-11, atol=1e-14),
                       log_t_min=log_t_end - 1.0, log_t_max=log_t_end)  # fmt: skip
    else:
        ref_kw = dict(solver="rk4", dt=float(lrs[0]) / ref_substeps)
        ref = run_flow(objective, params0, clock="time", solver="rk4", dt0=ref_kw["dt"],
                       stepsize_controller=diffrax.ConstantStepSize(), log_t_max=log_t_end,
                       saves=2)  # fmt: skip
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
    # the fitted order is the method's only while GD follows the flow: a gap of the size
    # of the parameters themselves says GD went elsewhere (past the edge of stability)
    left = [r["lr"] for r in rows if not r["param_gap"] < LEFT_THE_FLOW]
    notes = (
        [f"GD left the flow at lr {', '.join(f'{v:g}' for v in left)} (relative parameter gap"
         f" >= {LEFT_THE_FLOW:g}): the fitted orders do not measure the method's order; use "
         "smaller steps or an earlier t_end"]
        if left else []
    )  # fmt: skip
    return dict(
        t_end=t_end,
        rows=rows,
        notes=notes,
        followed_the_flow=not left,
        reference=dict(
            kind=reference,
            **ref_kw,
            log_loss=float(ref["log_loss"][-1]),
            grad_evals=int(ref["grad_evals"][-1]),
        ),  # fmt: skip
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
