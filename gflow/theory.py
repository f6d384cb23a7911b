"""Verdicts on the paper's claims from a recorded trajectory (docs/theory.md, "Claims to check").

Every check works from the saved columns alone (log quantities, never ``Loss`` itself),
so it applies to GD and flow runs alike; for GD, ``t`` is the sum of the step sizes,
which is what the trajectory's ``log_t`` holds.

* ``monotonicity``: past the first save point below the loss threshold (``t0``), the
  smoothed margin must not decrease and ``rho`` must increase (Theorem 4.1).
* ``rates``: ``rho^L / log t`` and ``Loss * t * (log t)^(2 - 2/L)`` must stay within a
  constant band (Theorem 4.3); reported as the band's width (max / min) over the last
  decade of ``log t`` reached, with the fitted exponents of ``rho`` and
  ``1 / (Loss t)`` against ``log t`` (``1/L`` and ``2 - 2/L`` in the limit).

* ``fidelity``: how far a run is from the exact gradient flow, from the invariant
  monitors recorded at every save point (``gflow.invariants``). A flow run passes when
  its balance drifts (and, on a smooth model, its dissipation defect) stay within the
  accuracy it asked for (``fidelity_tolerance``) at every save point; a GD run's drift is
  a measurement of the discrete dynamics' distance from the flow, never a failure.

A ``Verdict`` has ``passed`` (``True``, ``False``, or ``None`` when the run does not
reach the regime the claim is about), a one-line ``summary`` and JSON-able ``details``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from gflow.losses import Loss, get_loss
from gflow.trajectory import Trajectory

__all__ = [
    "Verdict",
    "threshold_index",
    "monotonicity",
    "rates",
    "check_trajectory",
    "fidelity",
    "fidelity_tolerance",
    "kkt_along",
    "check_run",
    "checks_json",
]


@dataclass
class Verdict:
    """One claim's verdict on one run."""

    name: str
    passed: bool | None
    summary: str
    details: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        mark = {True: "PASS", False: "FAIL", None: "n/a "}[self.passed]
        return f"[{mark}] {self.name}: {self.summary}"


def threshold_index(traj: Trajectory, log_threshold: float) -> int | None:
    """Index of the first save point whose log loss is below ``log_threshold`` (t0)."""
    below = np.nonzero(np.asarray(traj["log_loss"]) < log_threshold)[0]
    return int(below[0]) if below.size else None


def _drops(values: np.ndarray, log_t: np.ndarray, rtol: float, increasing_strictly: bool):
    """Decreases of ``values`` beyond ``rtol`` relative (or any non-increase if strict)."""
    d = np.diff(values)
    scale = np.maximum(np.abs(values[:-1]), np.finfo(np.float64).tiny)
    if increasing_strictly:
        bad = d <= -rtol * scale if rtol > 0 else d <= 0
    else:
        bad = d < -rtol * scale
    rel = -d / scale
    out = {"violations": int(bad.sum()), "checked": int(d.size)}
    if bad.any():
        i = int(np.argmax(np.where(bad, rel, -np.inf)))
        out.update(largest_relative_drop=float(rel[i]), at_log_t=float(log_t[i + 1]))
    return out


def monotonicity(
    traj: Trajectory,
    log_threshold: float,
    *,
    rtol: float = 1e-9,
    from_start: bool = False,
) -> list[Verdict]:
    """Smoothed margin non-decreasing and ``rho`` increasing past ``t0`` (Theorem 4.1).

    A decrease counts when it exceeds ``rtol`` relative to the value (solver noise), a
    ``rho`` step counts when ``rho`` does not grow by more than ``-rtol`` relative.
    ``from_start`` checks from the first save point instead, where the theory does not
    apply (to see it fail before the threshold).
    """
    i0 = 0 if from_start else threshold_index(traj, log_threshold)
    where = "from the start" if from_start else "past the loss threshold"
    if i0 is None:
        msg = "never below the loss threshold: the claim does not apply"
        return [Verdict("margin monotone", None, msg), Verdict("rho increasing", None, msg)]
    lt = np.asarray(traj["log_t"])[i0:]
    start = {"t0_index": i0, "t0_log_t": float(lt[0]), "rtol": rtol, "from_start": from_start}
    out = []
    for name, col, strict in (
        ("margin monotone", "smoothed_margin", False),
        ("rho increasing", "rho", True),
    ):
        v = np.asarray(traj[col])[i0:]
        bad = _nonfinite(v, lt, col)
        if bad is not None:
            out.append(Verdict(name, False, bad, {**start, "nonfinite": True}))
            continue
        if v.size < 2:
            out.append(Verdict(name, None, "fewer than two save points to compare", start))
            continue
        det = {**start, **_drops(v, lt, rtol, strict)}
        if det["violations"]:
            s = (
                f"{det['violations']} of {det['checked']} steps {where} go down; largest "
                f"relative drop {det['largest_relative_drop']:.3g} at log t = "
                f"{det['at_log_t']:.4g}"
            )
        else:
            s = f"{det['checked']} steps {where} (log t >= {lt[0]:.4g}), none goes down"
        out.append(Verdict(name, det["violations"] == 0, s, det))
    return out


def _nonfinite(values: np.ndarray, log_t: np.ndarray, col: str) -> str | None:
    """A FAIL's reason when ``values`` holds NaN or infinity, else None: a claim about
    values that are not there cannot pass."""
    bad = ~np.isfinite(values)
    if not bad.any():
        return None
    i = int(np.argmax(bad))
    return (
        f"{int(bad.sum())} of {values.size} save points have a non-finite {col} (the first "
        f"at log t = {log_t[i]:.4g}): the run broke down there"
    )


def _fit_slope(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(x, y, 1)[0]) if x.size >= 2 and np.ptp(x) > 0 else math.nan


def rates(
    traj: Trajectory,
    order: int,
    log_threshold: float,
    *,
    band: float = 3.0,
    decades: float = 1.0,
) -> list[Verdict]:
    """Theorem 4.3's rates: the two ratios' band over the last ``decades`` of log t.

    The window is the save points past ``t0`` with ``log t`` in
    ``[log_t_end / 10**decades, log_t_end]`` and ``log t > 1``; the claim passes when
    both ratios stay within a factor ``band``. Fitted exponents (``log rho`` and
    ``-log(Loss t)`` against ``log log t``) are reported over the same window.
    """
    L = int(order)
    i0 = threshold_index(traj, log_threshold)
    if i0 is None:
        msg = "never below the loss threshold: the claim does not apply"
        return [Verdict("rates", None, msg)]
    lt = np.asarray(traj["log_t"])[i0:]
    ll = np.asarray(traj["log_loss"])[i0:]
    for col in ("log_loss", "rho"):
        bad = _nonfinite(np.asarray(traj[col])[i0:], lt, col)
        if bad is not None:
            return [Verdict("rates", False, bad, {"nonfinite": True})]
    lr = np.log(np.asarray(traj["rho"])[i0:])
    end = float(lt[-1]) if lt.size else -math.inf
    keep = (lt > 1) & (lt >= end / 10**decades) & np.isfinite(lt)
    if keep.sum() < 3:
        return [
            Verdict(
                "rates",
                None,
                f"fewer than 3 save points past t0 with log t in [{end / 10**decades:.3g}, "
                f"{end:.3g}] and log t > 1: run longer or save more often",
            )
        ]
    lt, ll, lr = lt[keep], ll[keep], lr[keep]
    llt = np.log(lt)
    log_r1 = L * lr - llt  # log(rho^L / log t)
    log_r2 = ll + lt + (2 - 2 / L) * llt  # log(Loss t (log t)^(2 - 2/L))
    w1, w2 = float(np.exp(np.ptp(log_r1))), float(np.exp(np.ptp(log_r2)))
    det = {
        "window_log_t": [float(lt[0]), float(lt[-1])],
        "points": int(lt.size),
        "rho_L_over_log_t": [float(np.exp(log_r1.min())), float(np.exp(log_r1.max()))],
        "loss_t_logt_power": [float(np.exp(log_r2.min())), float(np.exp(log_r2.max()))],
        "band_rho": w1,
        "band_loss": w2,
        "band": band,
        "exponent_rho": _fit_slope(llt, lr),
        "exponent_rho_theory": 1 / L,
        "exponent_inverse_loss_t": _fit_slope(llt, -(ll + lt)),
        "exponent_inverse_loss_t_theory": 2 - 2 / L,
    }
    ok = w1 <= band and w2 <= band
    s = (
        f"over log t in [{lt[0]:.4g}, {lt[-1]:.4g}] ({lt.size} points): rho^L / log t varies "
        f"{w1:.3g}x, Loss t (log t)^(2-2/L) {w2:.3g}x (band {band:g}x); exponents: rho "
        f"{det['exponent_rho']:.3g} (1/L = {1 / L:.3g}), 1/(Loss t) "
        f"{det['exponent_inverse_loss_t']:.3g} (2-2/L = {2 - 2 / L:.3g})"
    )
    return [Verdict("rates", ok, s, det)]


def fidelity_tolerance(traj: Trajectory) -> float | None:
    """The largest invariant error a flow run may show: ``rtol + 2 eps N``.

    ``rtol`` is the relative accuracy the run asked for (its error-controlled solver's;
    stability and fixed steps are held to the same ``rtol``). The monitors are relative
    errors of invariants scaled by ``rho^2`` (``|Q_j| <= rho^2``), so a run accurate to
    ``rtol`` relative keeps them within ``rtol``. ``2 eps N``: rounding the parameters to
    the model's dtype at each of ``N`` steps moves ``sum_j |Q_j|`` by at most
    ``2 eps rho^2`` per step (each parameter is in at most two units).
    """
    cfg = traj.config
    eps = float(np.finfo(np.dtype(cfg.get("dtype", "float64"))).eps)
    steps = float(traj["solver_steps"][-1]) if "solver_steps" in traj.columns else 0.0
    if cfg.get("rtol") is None:  # a step-size controller of one's own without an rtol
        return None
    return float(cfg["rtol"]) + 2 * eps * steps


def _worst(traj: Trajectory, col: str) -> tuple[float, float]:
    """``(max over save points, log t where)`` of a monitor column (NaN if empty)."""
    v = np.asarray(traj[col], np.float64)
    if not np.isfinite(v).any():
        return math.nan, math.nan
    i = int(np.nanargmax(v))
    return float(v[i]), float(traj["log_t"][i])


def fidelity(traj: Trajectory) -> Verdict:
    """The run's distance from the exact gradient flow, read off the invariant monitors
    at every save point (module docstring)."""
    if "balance_drift" not in traj.columns:
        return Verdict("flow fidelity", None, "no invariant monitors in this run folder")
    cfg = traj.config
    det = {}
    for col in ("balance_drift", "layer_balance_drift", "dissipation_defect"):
        worst, where = _worst(traj, col)
        det[col] = {"max": worst, "at_log_t": where}
    det["empty"] = cfg.get("invariants", {})
    col = "balance_drift" if math.isfinite(det["balance_drift"]["max"]) else "layer_balance_drift"
    b, d = det[col]["max"], det["dissipation_defect"]["max"]
    shown = (
        f"{col.replace('_', ' ')} {b:.2g} (worst at log t = {det[col]['at_log_t']:.4g}), "
        f"dissipation defect {d:.2g}"
    )
    if traj.kind != "flow":
        return Verdict(
            "flow fidelity", None,
            f"GD is not the flow; its distance from it: {shown} (a measurement, not a failure)",
            det,
        )  # fmt: skip
    smooth = cfg.get("smooth")
    judged = [c for c in ("balance_drift", "layer_balance_drift") if math.isfinite(det[c]["max"])]
    if smooth:
        judged.append("dissipation_defect")
    if not judged:
        why = "; ".join(sorted(set(det["empty"].values()))) or "no exact invariant is known"
        return Verdict("flow fidelity", None, f"not measurable: {why}", det)
    tol = fidelity_tolerance(traj)
    det["tolerance"] = tol
    if tol is None:
        return Verdict(
            "flow fidelity", None,
            f"the run asked for no accuracy (its step-size controller has no rtol): {shown}",
            det,
        )  # fmt: skip
    bad = [c for c in judged if not det[c]["max"] <= tol]
    note = ""
    if smooth is False:
        note = (
            "; the dissipation defect is not judged on a ReLU field: it also counts the "
            "sliding along kinks (autodiff's one-sided gradients overstate ||grad||^2 there) "
            "and does not fall with the step"
        )
    if bad:
        worst = max(bad, key=lambda c: det[c]["max"])
        s = (
            f"{worst.replace('_', ' ')} {det[worst]['max']:.2g} at log t = "
            f"{det[worst]['at_log_t']:.4g} exceeds the run's tolerance {tol:.2g} (rtol): the "
            f"integration is not faithful there (try a smaller --cfl, --dt or --rtol); "
            f"{shown}{note}"
        )
        return Verdict("flow fidelity", False, s, det)
    s = f"every save point within tolerance {tol:.2g} (rtol): {shown}{note}"
    return Verdict("flow fidelity", True, s, det)


def check_trajectory(
    traj: Trajectory,
    *,
    loss: Loss | str | None = None,
    order: int | None = None,
    rtol: float = 1e-9,
    band: float = 3.0,
) -> list[Verdict]:
    """Monotonicity and rates on one run; ``loss`` (a ``Loss``, or a name) and ``order``
    default to its config (a loss of one's own by the threshold recorded there).

    A run of a model that is not homogeneous gets the same checks (with its depth as
    ``L``), and a note saying the theory does not cover it.
    """
    cfg = traj.config
    order = order or cfg.get("order")
    if order is None:
        raise ValueError("the run's config names no order: pass order=")
    if isinstance(loss, Loss):
        log_threshold = loss.log_threshold
    elif loss is None and cfg.get("log_threshold") is not None:  # a loss of one's own
        log_threshold = float(cfg["log_threshold"])
    elif loss or cfg.get("loss"):
        log_threshold = get_loss(loss or cfg["loss"]).log_threshold
    else:
        raise ValueError("the run's config names no loss: pass loss=")
    out = monotonicity(traj, log_threshold, rtol=rtol) + rates(
        traj, order, log_threshold, band=band
    )
    out.append(fidelity(traj))
    if cfg.get("homogeneous") is False:
        out.append(
            Verdict(
                "homogeneity",
                False,
                "the model is not homogeneous (biases in every layer): the theorems do not "
                "apply, and the verdicts above test them outside their scope",
            )
        )
    return out


def kkt_along(traj: Trajectory, objective) -> list[dict]:
    """The KKT residual at each parameter snapshot of a run (at its final parameters if it
    saved none), skipping points where the data are not yet separated.

    A run through the kinks event by event (``--kinks``) records its sliding pairs'
    slopes at every save point: where any slide, ``eps_rel`` / ``eps`` / ``delta`` are
    taken with those Clarke multipliers (the flow's own element of the subdifferential,
    ``gflow.kkt``) and autodiff's one-sided values are kept as ``eps_rel_one_sided`` and
    ``delta_one_sided``; ``sliding`` counts the pairs."""
    from gflow.kkt import clarke_pattern, kkt_residual

    points = list(enumerate(traj.snapshots))
    if not points and traj.final_params is not None:
        points = [(len(traj) - 1, traj.final_params)]
    at_saves = traj.config.get("sliding_pattern") or []
    if len(at_saves) != len(traj):
        at_saves = []  # not a kink run, or a run cut short: autodiff's element only
    gap = None if objective.num_samples <= 2000 else 1.0
    out = []
    for i, p in points:
        try:
            r = kkt_residual(objective, p, gap=gap)
        except ValueError:
            continue  # not separated yet
        row = dict(log_t=float(traj["log_t"][i]), eps_rel=r.eps_rel, eps=r.eps, delta=r.delta)
        sliding = at_saves[i] if at_saves else {}
        if sliding.get("pairs"):
            c = kkt_residual(objective, p, gap=gap, slopes=clarke_pattern(objective, p, sliding))
            row.update(eps_rel_one_sided=r.eps_rel, delta_one_sided=r.delta, eps_rel=c.eps_rel,
                       eps=c.eps, delta=c.delta, sliding=len(sliding["pairs"]))  # fmt: skip
        out.append(row)
    return out


def check_run(traj: Trajectory, objective=None, *, kkt: bool = True) -> list[Verdict]:
    """``check_trajectory`` plus, for a homogeneous ``objective``, the KKT residual along
    the run's saved parameters: it must fall from the first to the last (Theorem 4.4)."""
    verdicts = check_trajectory(traj, loss=None if objective is None else objective.loss)
    if not (kkt and objective is not None and objective.homogeneous):
        return verdicts
    ks = kkt_along(traj, objective)
    if len(ks) >= 2:
        early, late = ks[0]["eps_rel"], ks[-1]["eps_rel"]
        verdicts.append(
            Verdict(
                "KKT eps falling",
                late < early,
                f"relative eps {early:.3g} at log t = {ks[0]['log_t']:.4g} -> {late:.3g} "
                f"at log t = {ks[-1]['log_t']:.4g} ({len(ks)} snapshots)",
                dict(points=ks),
            )
        )
    elif ks:
        verdicts.append(
            Verdict(
                "KKT eps falling",
                None,
                f"relative eps {ks[0]['eps_rel']:.3g}, delta {ks[0]['delta']:.3g} at the end "
                "(save parameters, --save-params, to see it fall)",
                dict(points=ks),
            )
        )
    return verdicts


def checks_json(verdicts: list[Verdict]) -> str:
    """The ``checks.json`` of a run folder."""
    return json.dumps({"verdicts": [v.to_dict() for v in verdicts]}, indent=2) + "\n"
