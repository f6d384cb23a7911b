"""Gradient flow through ReLU kinks, event by event (``docs/theory.md``, "What
integrating the flow costs"; ``gflow.kinks`` has the vocabulary).

Between kinks a ReLU network's field is smooth: with the activation pattern frozen
(each hidden (sample, unit) pair's slope held at 1 or 0, leaky ReLU: its slope) the
network is polynomial in its weights. ``KinkStepping`` integrates that smooth field with
a diffrax Runge-Kutta solver under diffrax's PID error control, and ends a step where a
pair's pre-activation crosses zero:

* **switch location**: after every accepted step each pair's signed pre-activation
  ``sigma z / (|h_n| |w_j|)`` is checked at the step's end; for the pairs past
  ``-margin`` the first crossing is root-found by bisection on the step's dense output
  (first layer: on the pre-activations' own interpolant; deeper: single-sample forward
  passes; no gradient) and the step is cut there;
* **classification**: the crossing pair's normal speed on the far side decides. If the
  far side carries it on, the pattern flips (a transversal crossing). If the far side
  pushes it back, both sides flow into the surface: the pair **slides**;
* **sliding**: a sliding pair's slope is not frozen but solved for, at every field
  evaluation, so that its normal speed is zero (the Filippov / minimum-norm Clarke
  velocity). Several sliding pairs make a K x K linear system; its columns come from
  single-sample Jacobian-vector products (a pair's slope only changes its own sample's
  gradient), never from a dense Jacobian. With one hidden layer the field is affine in
  the slopes and one solve is exact; deeper, a few Newton steps;
* **exit**: a sliding pair leaves its surface when its slope leaves ``[s-, 1]``; checked
  after every accepted step while anything slides (a FSAL solver's stored stage carries
  the slopes), located by Illinois regula falsi on the dense output, and the pair
  rejoins the side it leaves to.

* **fallback**: where switches come too thick for events to pay, the run goes on by
  ``gflow run``'s stability stepping (Ralston at cfl 0.14) and says so. Every
  ``window`` events the window's gradient evaluations per unit tau are compared with
  that stepping's at the state reached (below the loss threshold: its cfl step from
  one Lanczos; above: a probe of its error-controlled warm-up); past ``fallback``
  (default 100) times it, the stepping takes over from that state, continuing the
  run's invariant monitors, counters and save points. Measured: at most 34 on the
  default problem, 480 to 650 on the wide one (``benchmarks/RESULTS.md``).

Invariants stay monitors: nothing is projected. Counters go into the trajectory:
``crossings``, ``slide_entries``, ``slide_exits``, ``sliding`` (pairs sliding now),
``sliding_span`` (the log t spent with at least one pair sliding), ``sliding_offset``
(the largest ``|z| / (|h_n| |w_j|)`` over sliding pairs: how well the surface is kept),
``events`` and ``grad_evals`` (full-batch gradients; the per-pair work is counted in
``pair_evals``, single-sample gradient-equivalents). ``config["sliding_pattern"]`` holds,
for every save point, the sliding pairs (``[layer, sample, unit]``) and their slopes: the
Clarke element of the margins' gradients that the flow is made of (``gflow.kkt``).

Dense networks (MLPs) of gflow's own, ReLU or leaky ReLU, on the loss clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gflow.dynamics.clock import log1p_of_log_t, log_t_grid, log_t_of_log1p, quantities_many
from gflow.dynamics.driver import FlowSettings, Handover, drive
from gflow.dynamics.segments import LOSS_SPAN, make_controller, segment_fn
from gflow.dynamics.sliding_kernels import (
    Advance,
    Kernels,
    Net,
    Stop,
    kernels,
    newton_iters,
    slack,
    theta_norm,
)
from gflow.dynamics.solvers import (
    DEFAULT_TOL,
    check_tolerances,
    default_cfl,
    evals_per_step,
    finite_positive,
    is_fixed_step,
    make_solver,
    positive_int,
    real_scalar,
    solver_name,
    stability_edge,
)
from gflow.dynamics.stability import LANCZOS, StabilityStepping, stable_step, stiffness_fns
from gflow.kinks import kink_model, off_slope
from gflow.models import check_finite_params
from gflow.objective import Objective
from gflow.spectrum import lanczos_top
from gflow.trajectory import Trajectory, TrajectoryRecorder

__all__ = ["KinkStepping", "run_flow_kinks"]


FALLBACK = 100.0  # measured crossover: benchmarks/RESULTS.md, "Event cost"
_STABLE = "ralston"  # the fallback: gflow run's default stepping
_PROBE = 8  # warm-up steps that measure the fallback's cost above the loss threshold


class KinkStepping(NamedTuple):
    """Event-driven stepping through ReLU kinks, as a ``stepsize_controller`` for
    ``run_flow`` (module docstring): ``solver`` (set in ``run_flow``) with diffrax's PID
    control at ``rtol`` / ``atol`` on the smooth pieces; a crossing registers when a
    pair is ``margin`` (relative to ``|h_n| |w_j|``) past its surface; at most
    ``max_sliding`` pairs slide at once. ``dt``: steps of a fixed length in the loss
    clock's tau instead (cut at every event), for order studies. ``fallback``: every
    ``window`` events the window's gradient evaluations per unit tau are compared with
    stability stepping's at the state reached (``gflow run``'s default: Ralston at cfl
    0.14 of ``lambda_max``, one Lanczos); past ``fallback`` times it, the run goes on by
    stability stepping and says so (``config["handover"]``, the message; module
    docstring). ``None``: never; nor with a fixed ``dt``."""

    rtol: float = 1e-8
    atol: float = 1e-12
    margin: float = 1e-12
    max_sliding: int = 256
    dt: float | None = None
    fallback: float | None = FALLBACK
    window: int = 256


_BUCKETS = (0, 4, 16, 64, 256, 1024)
_MAX_STALLED = 64  # simultaneous switches are handled in one event: more is a livelock


def _layer_pair(p: int, net: Net) -> list:
    """A flat pair index (sample * units + unit over all hidden layers) as ``[layer,
    sample, unit in that layer]``."""
    i, j = divmod(int(p), net.units)
    for layer, w in enumerate(net.widths):
        if j < w:
            return [layer, i, j]
        j -= w
    raise ValueError(f"pair {p} is past the network's {net.units} units")


def _bucket(k: int, cap: int) -> int:
    for b in _BUCKETS:
        if b >= k:
            return min(b, max(cap, k))
    return k


def _pad(values, size: int) -> jax.Array:
    out = np.full(size, -1, np.int64)
    out[: len(values)] = sorted(values)
    return jnp.asarray(out)


def check_kink_stepping(stepping) -> None:
    """A ``KinkStepping``'s settings, checked before any work: a ``ValueError`` naming
    the setting and its value (tolerances as ``solvers.check_tolerances``)."""
    if not isinstance(stepping, KinkStepping):
        raise TypeError(f"stepping must be a KinkStepping, got {type(stepping).__name__}")
    check_tolerances(stepping.rtol, stepping.atol, "KinkStepping")
    margin, dt = real_scalar(stepping.margin), stepping.dt
    if margin is None or not 0 < margin < 1e-3:
        raise ValueError(f"KinkStepping: margin must be in (0, 1e-3), got {stepping.margin}")
    if dt is not None and not finite_positive(dt):
        raise ValueError(f"KinkStepping: dt must be finite and positive, got dt={dt}")
    fallback = stepping.fallback
    if fallback is not None and not (real_scalar(fallback) or 0.0) > 0:
        raise ValueError(f"KinkStepping: fallback must be positive or None, got {fallback}")
    for key in ("window", "max_sliding"):
        v = getattr(stepping, key)
        if not positive_int(v):
            raise ValueError(f"KinkStepping: {key} must be a positive int, got {v!r}")


class _End(Enum):
    """How stepping towards a save point ended."""

    SAVE = "save point reached"
    STOPPED = "step budget spent"  # status and message set
    FAILED = "failed"  # status and message set; the state is the last one reached
    HANDOVER = "handover"  # events cost too much: stability stepping goes on


@dataclass
class _KinkRun:
    """One kink run: its fixed context (first block) and its state between events."""

    objective: Objective
    stepping: KinkStepping
    net: Net
    solver: Any  # the diffrax solver
    name: str  # its name
    controller: Any
    rec: TrajectoryRecorder
    slopes: np.ndarray  # the activation pattern (n, U): each pair's slope
    thr: np.ndarray  # how far past its surface a pair registers a crossing (n, U)
    y: tuple  # (theta, z = log(1 + t), D)
    sliding: set = field(default_factory=set)  # flat indices of the sliding pairs
    tau: float = 0.0  # the loss clock
    h: float | None = None  # the controller's next step
    f0: Any = None  # the field at y where known (a FSAL solver's first stage)
    count: dict = field(default_factory=lambda: dict.fromkeys(_COUNTS, 0))
    span: float = 0.0  # log t spent with a pair sliding
    log_t_now: float = -math.inf  # log t at the last event
    status: str = "completed"
    message: str = ""
    stalled: int = 0  # events in a row at a step's start: a guard against a livelock
    left_past: int = 0  # pairs past their surface at a step's end, not switched there
    crossed_pairs: np.ndarray | None = None  # switches per pair
    patterns: list = field(default_factory=list)  # the sliding pattern at every save point
    costs: list = field(default_factory=list)  # [log t, cost ratio] at every check
    window: dict = field(default_factory=lambda: dict(events=0, evals=0, tau=0.0))
    warm: Any = None  # the fallback's Lanczos vector
    handoff: tuple | None = None  # (log t, cost ratio) of a handover

    @property
    def dtype(self):
        return self.objective.dtype

    def kern(self) -> Kernels:
        k = _bucket(len(self.sliding), self.stepping.max_sliding)
        return kernels(self.net, k, self.solver, self.controller, np.dtype(self.dtype).name)

    def slots(self) -> jax.Array:
        return _pad(self.sliding, _bucket(len(self.sliding), self.stepping.max_sliding))

    def field_cost(self, calls: int) -> None:
        iters = newton_iters(self.net)
        self.count["grad_evals"] += calls * (iters if self.sliding else 1)
        self.count["pair_evals"] += calls * 3 * len(self.sliding) * iters

    def probe(self, theta):
        """The sliding slopes and every pair's relative pre-activation at ``theta``."""
        self.field_cost(1)
        return self.kern().probe(self.objective, theta, jnp.asarray(self.slopes), self.slots())

    def record(self, log_t: float) -> dict:
        """A row at the state reached, at ``log_t``; the sliding pattern with it."""
        offset = 0.0  # how far the sliding pairs are from their surfaces
        members = sorted(self.sliding)
        s_now = []
        if self.sliding:
            s_all, rel = jax.device_get(self.probe(self.y[0]))
            offset = float(np.max(np.abs(rel[members])))
            s_now = [float(v) for v in s_all[: len(members)]]
        # the Clarke element the flow is made of, for the KKT residual (gflow.kkt)
        pairs = [_layer_pair(p, self.net) for p in members]
        self.patterns.append(dict(pairs=pairs, slopes=s_now))
        batch = jax.tree.map(lambda a: a[None], self.y[0])
        q = jax.tree.map(lambda a: a[0], jax.device_get(quantities_many(self.objective, batch)))
        c = self.count
        return self.rec.add(
            c["accepted"], log_t, q, jax.device_get(self.y[0]),
            dissipation=float(self.y[2]), solver_steps=float(c["steps"]),
            rejected=float(c["rejected"]), sliding=float(len(self.sliding)),
            sliding_span=self.span, sliding_offset=offset,
            **{key: float(c[key]) for key in _EVENT_COUNTS},
        )  # fmt: skip

    def fail(self, message: str, y) -> _End:
        self.status, self.message, self.y = "failed", message, y
        return _End.FAILED

    def settle(self, theta) -> None:
        """Drop sliding pairs whose slope is outside [off, 1] at ``theta``, to the side
        their slope points to, until the rest slide consistently (a slide exit)."""
        off, eta = self.net.off, float(self.stepping.margin)
        while self.sliding:
            s, rel = jax.device_get(self.probe(theta))
            members = sorted(self.sliding)
            # out at a slack <= 0, as the exit location has it (a slope exactly at an
            # end of [s-, 1] kept here would be found exiting again at once, forever)
            out = [(p, v) for p, v in zip(members, s[: len(members)], strict=False)
                   if slack(v, off) <= 0]  # fmt: skip
            if not out:
                return
            for p, v in out:
                self.sliding.discard(p)
                i, j = divmod(p, self.net.units)
                side = 1.0 if v >= 1.0 else -1.0
                self.slopes[i, j] = 1.0 if side > 0 else off
                # it sits at |z| ~ margin: registers a crossing only once clear of that
                self.thr[i, j] = 2 * eta + max(0.0, -side * float(rel[p]))
                self.count["slide_exits"] += 1


_COUNTS = ("steps", "accepted", "rejected", "grad_evals", "pair_evals", "crossings",
           "slide_entries", "slide_exits", "events")  # fmt: skip
_EVENT_COUNTS = ("grad_evals", "pair_evals", "crossings", "slide_entries", "slide_exits",
                 "events")  # fmt: skip


def _cost_ratio(run: _KinkRun) -> float:
    """The last window's gradient evaluations per unit tau over the fallback's at the
    state reached (its evaluations counted in ``grad_evals``). Below the loss threshold
    the fallback steps at ``cfl`` of the stability edge over ``lambda_max`` (one
    Lanczos, amortised over ``refresh`` steps as it is there); above it, its
    error-controlled warm-up runs: ``_PROBE`` of its steps measure it."""
    obj, y, tau, dtype, count = run.objective, run.y, run.tau, run.dtype, run.count
    kink_rate = (count["grad_evals"] - run.window["evals"]) / (tau - run.window["tau"])
    st = StabilityStepping()
    if float(obj.log_loss(y[0])) >= obj.loss.log_threshold:
        ctrl = make_controller(None, False, *DEFAULT_TOL)
        seg, evals = segment_fn("loss", make_solver(st.warmup), ctrl, _PROBE, dtype)
        t0 = jnp.asarray(tau, dtype)
        out = seg(obj, y, t0, t0 + LOSS_SPAN, None, y[1] + 1e3)
        spent = evals(int(out[3]))
        count["grad_evals"] += spent
        return kink_rate / (spent / (float(out[1]) - tau))
    jac_matvec, drift_dt = stiffness_fns("loss")
    flat, unravel = ravel_pytree(y[0])

    def matvec(v):
        return ravel_pytree(jac_matvec(obj, 0.0, y, unravel(jnp.asarray(v, dtype))))[0]

    eig = lanczos_top(matvec, flat.size, v0=run.warm, **LANCZOS)
    run.warm = eig.vector
    lanczos = 2 * eig.matvecs + 1
    h = stable_step(eig.value, float(drift_dt(obj, 0.0, y, 0.0)), default_cfl(_STABLE),
                    stability_edge(_STABLE), st.drift)  # fmt: skip
    count["grad_evals"] += lanczos
    return kink_rate / ((evals_per_step(make_solver(_STABLE))[0] + lanczos / st.refresh) / h)


def _advance(run: _KinkRun, ks: Kernels, idx, z_target: float, budget: int) -> Advance:
    """Steps until an event, the save point or the budget (``Kernels.advance``), counted;
    the outputs' counts and stop code as Python ints."""
    dtype = run.dtype
    h0 = run.stepping.dt or (run.h if run.h is not None else 1e-3)
    out = ks.advance(run.objective, jnp.asarray(run.slopes), idx, jnp.asarray(run.thr), run.y,
                     jnp.asarray(run.tau, dtype), jnp.asarray(h0, dtype),
                     jnp.asarray(z_target, dtype), jnp.asarray(min(budget, 200_000)),
                     run.f0)  # fmt: skip
    out = out._replace(steps=int(out.steps), accepted=int(out.accepted), stop=int(out.stop))
    count = run.count
    count["steps"] += out.steps
    count["accepted"] += out.accepted
    count["rejected"] += out.steps - out.accepted
    # a FSAL solver hands the exit check its slopes; others evaluate them
    per_step, per_start = evals_per_step(run.solver)
    run.field_cost(out.steps * per_step + (per_start if run.f0 is None else 0)
                   + (out.accepted if run.sliding and not per_start else 0))  # fmt: skip
    run.f0 = None
    return out


def _locate(run: _KinkRun, ks: Kernels, idx, out: Advance, z_target: float) -> tuple:
    """``(when, crossing, candidates)``: the first time in the step ``[a, b]`` of each
    event kind that happens in it (``"cross"``, ``"exit"``, ``"save"``), the pairs that
    cross first, and the pairs past their surface at ``b``."""
    net, obj, dtype = run.net, run.objective, run.dtype
    a, b, dense = out.a, out.b, out.dense
    cands = [int(p) for p in np.flatnonzero(jax.device_get(out.past))]
    when: dict = {}
    w0 = net.widths[0]
    first = [p for p in cands if p % net.units < w0]
    deeper = [p for p in cands if p % net.units >= w0]
    crossing: list = []
    slopes, thr = jnp.asarray(run.slopes), jnp.asarray(run.thr)
    if first:
        t1, hit = jax.device_get(ks.locate_first_layer(obj, slopes, thr, idx, a, b, dense))
        hits = [int(i) * net.units + int(j) for i, j in np.argwhere(hit)]
        if hits:
            when["cross"], crossing = float(t1), hits
    if deeper:
        pad = _pad(deeper, _bucket(len(deeper), 1 << 30))
        roots = np.asarray(ks.locate_crossings(obj, slopes, thr, a, b, dense, pad))
        t2 = float(np.min(roots[: len(deeper)]))
        if t2 < when.get("cross", np.inf):
            when["cross"] = t2
            crossing = [p for p, r in zip(deeper, roots, strict=False) if r <= t2]
    exiting = out.stop == Stop.EXIT
    if exiting:
        s_b = jax.device_get(run.probe(out.yb[0]))[0][: len(run.sliding)]
        fb = float(np.min(slack(s_b, net.off)))
        exiting = fb < 0  # the FSAL stage's slopes and these agree to rounding
    if exiting:
        s_a = jax.device_get(run.probe(out.ya[0]))[0][: len(run.sliding)]
        fa = float(np.min(slack(s_a, net.off)))
        if fa <= 0:  # already out at the step's start (settled at every switch)
            when["exit"] = float(a)
        else:
            fa_, fb_ = jnp.asarray(fa, dtype), jnp.asarray(fb, dtype)
            t_exit, spent = ks.locate_exit(obj, slopes, idx, a, b, dense, fa_, fb_)
            when["exit"] = float(t_exit)
            run.field_cost(int(spent))
    if float(out.yb[1]) >= z_target:
        when["save"] = float(ks.locate_save(a, b, dense, jnp.asarray(z_target, dtype)))
    return when, crossing, cands


def _cross(run: _KinkRun, ks: Kernels, crossing: list, log_t: float) -> bool | _End:
    """Switch the pattern of the pairs ``crossing`` at the state reached; each goes on
    through (a transversal crossing) or slides. Whether the sliding set grew, or
    ``_End.FAILED`` past ``max_sliding``."""
    entered = False
    net = run.net
    for p in crossing:
        i, j = divmod(p, net.units)
        old = run.slopes[i, j]
        run.slopes[i, j] = net.off if old == 1.0 else 1.0
        side = 1.0 if run.slopes[i, j] == 1.0 else -1.0
        v, f = ks.classify(run.objective, run.y, jnp.asarray(run.slopes), run.slots(),
                           jnp.asarray(p))  # fmt: skip
        run.field_cost(1)
        run.crossed_pairs[p] += 1
        if side * float(v) >= 0:
            run.count["crossings"] += 1
            run.f0 = f
        else:
            entered = True
            run.sliding.add(p)
            run.count["slide_entries"] += 1
            if len(run.sliding) > run.stepping.max_sliding:
                m = run.stepping.max_sliding
                return run.fail(f"more than max_sliding = {m} pairs slide at log t = {log_t:.6g}",
                                run.y)  # fmt: skip
    return entered


def _fallback_due(run: _KinkRun, log_t: float) -> bool:
    """Every ``window`` events: do events cost more than ``fallback`` times stability
    stepping? (the ratio kept in ``costs``; a handover's in ``handoff``)."""
    st = run.stepping
    due = run.count["events"] - run.window["events"] >= st.window and run.tau > run.window["tau"]
    if st.fallback is None or st.dt is not None or not due:
        return False
    ratio = _cost_ratio(run)
    run.costs.append([log_t, ratio])
    run.window.update(events=run.count["events"], evals=run.count["grad_evals"], tau=run.tau)
    if ratio > st.fallback:
        run.handoff = (log_t, ratio)
        return True
    return False


def _to_save_point(run: _KinkRun, target: float, max_steps: int) -> _End:
    """Event by event to the save point ``log t = target``."""
    z_target = log1p_of_log_t(target)
    while True:
        ks, idx = run.kern(), run.slots()
        budget = max_steps - run.count["steps"]
        if budget <= 0:
            run.status, run.message = "stopped", f"step budget max_steps = {max_steps} spent"
            return _End.STOPPED
        out = _advance(run, ks, idx, z_target, budget)
        was_sliding = bool(run.sliding)
        if out.stop == Stop.FAILED:
            steps = run.count["steps"]
            return run.fail(f"solver {run.name} failed before log t = {target:.6g} after "
                            f"{steps} steps", out.ya)  # fmt: skip
        if out.stop == Stop.BUDGET:  # go on from where it got
            run.y, run.tau, run.h = out.yb, float(out.b), float(out.h_next)
            continue
        # an event in the step [a, b]: find the first one
        when, crossing, cands = _locate(run, ks, idx, out, z_target)
        if not when:  # a pair at -margin to rounding: the step is taken as is
            run.left_past += len(cands)
            run.y, run.tau, run.h = out.yb, float(out.b), float(out.h_next)
            continue
        kind = min(when, key=when.get)
        t_event = when[kind]
        run.stalled = run.stalled + 1 if kind != "save" and t_event <= float(out.a) else 0
        if run.stalled > _MAX_STALLED:
            return run.fail(f"{run.stalled} events in a row at tau = {t_event!r} without a "
                            f"step forward ({kind}; sliding pairs {sorted(run.sliding)})",
                            out.ya)  # fmt: skip
        run.y = ks.interpolate(out.a, out.b, out.dense, jnp.asarray(t_event, run.dtype))[:3]
        run.tau = t_event
        run.h = float(out.h_next) if out.h_next > 0 else run.h
        lt_e = log_t_of_log1p(float(run.y[1]))
        if was_sliding and math.isfinite(run.log_t_now):
            run.span += lt_e - run.log_t_now
        run.log_t_now = lt_e
        run.count["events"] += kind != "save"
        if kind == "save":
            return _End.SAVE
        entered = _cross(run, ks, crossing, lt_e) if kind == "cross" else False
        if entered is _End.FAILED:
            return entered
        if run.f0 is not None and run.sliding:
            # a switch moves the sliding slopes too: one may now leave (seen in the
            # classification's field, free)
            if float(np.min(slack(np.asarray(run.f0[3])[: len(run.sliding)], run.net.off))) < 0:
                entered = True
        if entered or kind == "exit":
            run.f0 = None  # the sliding set changes: the field is evaluated afresh
            run.settle(run.y[0])
        if _fallback_due(run, lt_e):
            return _End.HANDOVER


def _handover(run: _KinkRun, log_t: float, ratio: float, s: FlowSettings, progress) -> tuple:
    """Stability stepping from the state reached at ``log t`` on (``driver.drive``,
    continuing this run's monitors and dissipation): its rows join this run's, counters
    added. ``s``: the run's horizon, save points and step budget."""
    st, count = StabilityStepping(), run.count
    # below the loss threshold, stability stepping at once; above, its warm-up first
    below = float(run.objective.log_loss(run.y[0])) < run.objective.loss.log_threshold
    warmup = None if below else st.warmup
    fixed = dict(crossings=count["crossings"], slide_entries=count["slide_entries"],
                 slide_exits=count["slide_exits"], events=count["events"],
                 pair_evals=count["pair_evals"], sliding=math.nan,
                 sliding_span=run.span, sliding_offset=math.nan)  # fmt: skip
    shift = dict(step=count["accepted"], grad_evals=count["grad_evals"],
                 solver_steps=count["steps"], rejected=count["rejected"])  # fmt: skip

    def joined(row: dict) -> dict:
        return {**row, **{k: row[k] + v for k, v in shift.items()}, **fixed}

    each = None if progress is None else (lambda row: progress(joined(row)))
    settings = s._replace(
        solver=_STABLE, rtol=DEFAULT_TOL[0], atol=DEFAULT_TOL[1], cfl=default_cfl(_STABLE),
        warmup=warmup, refresh=st.refresh, drift=st.drift, log_t0=log_t,
        max_steps=max(1, s.max_steps - count["steps"]), error_estimate=False,
    )  # fmt: skip
    (tr,) = drive(run.objective, [run.y[0]], [0], settings, single=True, progress=each,
                  handover=Handover(run.rec.monitor, float(run.y[2])))  # fmt: skip
    for i in range(len(tr)):
        run.rec.rows.append(joined({k: float(tr[k][i]) for k in tr.column_names}))
        run.patterns.append(dict(pairs=[], slopes=[]))
    run.rec.snapshots.extend(tr.snapshots)
    run.rec.config["handover"] = dict(
        log_t=log_t, cost_ratio=ratio, solver=_STABLE, cfl=default_cfl(_STABLE),
        warmup=warmup, rtol=DEFAULT_TOL[0], atol=DEFAULT_TOL[1],
    )  # fmt: skip
    note = (f"event by event to log t = {log_t:.6g}, then stability stepping ({_STABLE}, "
            f"cfl {default_cfl(_STABLE)}): events cost {ratio:.3g}x its evaluations per "
            f"unit tau, over the fallback {run.stepping.fallback:g}")  # fmt: skip
    return tr.final_params, tr.status, f"{tr.message}; {note}"


def run_flow_kinks(
    objective: Objective,
    params0,
    *,
    stepping: KinkStepping | None = None,
    solver: str | diffrax.AbstractSolver = "tsit5",
    log_t_max: float = 10.0,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    max_steps: int = 1_000_000,
    save_params: bool = False,
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Trajectory:
    """The gradient flow from ``params0`` to ``log t = log_t_max`` on the loss clock,
    event by event through the kinks (module docstring); save points as ``run_flow``'s."""
    stepping = KinkStepping() if stepping is None else stepping
    run = _start(objective, params0, stepping, solver, log_t_max, log_loss_min, saves,
                 log_t_min, max_steps, save_params, config, progress)  # fmt: skip
    run.record(-math.inf)
    try:
        for target in [float(v) for v in log_t_grid(log_t_min, log_t_max, saves)]:
            end = _to_save_point(run, target, max_steps)
            if end is _End.FAILED:
                run.record(log_t_of_log1p(float(run.y[1])))
            if end is not _End.SAVE:
                break
            row = run.record(target)
            if log_loss_min is not None and row["log_loss"] <= log_loss_min:
                run.message = f"log loss {row['log_loss']:.6g} <= target {log_loss_min:g}"
                break
    except KeyboardInterrupt:
        run.status, run.message = "stopped", "interrupted"
    run.rec.config["event_cost"] = run.costs
    final, status, message = jax.device_get(run.y[0]), run.status, run.message
    if run.handoff is not None:
        horizon = FlowSettings(
            log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
            max_steps=max_steps, save_params=save_params,
        )  # fmt: skip
        final, status, message = _handover(run, *run.handoff, horizon, progress)
    run.rec.config["sliding_pattern"] = run.patterns
    run.rec.config["kink_pairs"] = {
        "pairs": int(run.net.n * run.net.units),
        "ever_switched": int(np.sum(run.crossed_pairs > 0)),
        "most_switches": int(run.crossed_pairs.max(initial=0)),
        "sliding_at_end": len(run.sliding),
        # a step's end past -margin whose dense output did not cross (rounding between
        # the two): switched at the next step's start, one step late. Each is a
        # first-order error; 0 is the rule (a bisection's root read back +1 ulp once
        # made 110 on the default problem)
        "left_past": run.left_past,
    }
    return run.rec.finish(final, status, message, objective)


def _start(objective, params0, stepping, solver, log_t_max, log_loss_min, saves, log_t_min,
           max_steps, save_params, config, progress) -> _KinkRun:  # fmt: skip
    """Check the arguments (a ``ValueError`` naming the bad one) and set up the run."""
    check_kink_stepping(stepping)
    check_finite_params(params0)
    name = solver_name(solver)
    the_solver = make_solver(solver)
    if isinstance(the_solver, diffrax.AbstractImplicitSolver):
        raise ValueError(f"KinkStepping steps with an explicit solver, got the implicit {name!r}")
    if is_fixed_step(the_solver) or not hasattr(the_solver, "interpolation_cls"):
        raise ValueError(f"KinkStepping needs a solver with an error estimate, got {name!r}")
    model = kink_model(objective, params0)
    if not (math.isfinite(log_t_min) and log_t_max > log_t_min):
        raise ValueError(f"need finite log_t_min < log_t_max, got {log_t_min}, {log_t_max}")
    dtype = objective.dtype
    zs = model.preactivations(objective.x)
    net = Net(tuple(int(z.shape[1]) for z in zs), objective.num_samples, off_slope(model))
    controller = (
        diffrax.ConstantStepSize()
        if stepping.dt is not None
        else diffrax.PIDController(rtol=stepping.rtol, atol=stepping.atol, norm=theta_norm)
    )
    eta = float(stepping.margin)
    settings = dict(
        dynamics="flow", clock="loss", solver=name, stepping="kinks", rtol=stepping.rtol,
        atol=stepping.atol, margin=eta, max_sliding=stepping.max_sliding, dt=stepping.dt,
        fallback=stepping.fallback, window=stepping.window, cfl=None,
        log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
        log_t0=None, max_steps=max_steps,
    )  # fmt: skip
    cfg = {**objective.describe(), **(config or {}), **settings}
    rec = TrajectoryRecorder("flow", cfg, save_params, progress,
                             objective.invariant_reasons(params0))  # fmt: skip
    slopes = np.concatenate([np.where(np.asarray(z) > 0, 1.0, net.off) for z in zs], axis=1)
    slopes = slopes.astype(np.dtype(dtype))
    return _KinkRun(
        objective=objective, stepping=stepping, net=net, solver=the_solver, name=name,
        controller=controller, rec=rec, slopes=slopes,
        thr=np.full(slopes.shape, eta, slopes.dtype),
        y=(params0, jnp.zeros((), dtype), jnp.zeros((), dtype)),
        message=f"reached log t = {log_t_max:.6g}",
        crossed_pairs=np.zeros(net.n * net.units, np.int64),
    )  # fmt: skip
