"""The flow's segment driver (docs/theory.md, "Dynamics"): K runs (K = 1 for
``run_flow``) integrated in one vmapped program, save point by save point, each segment
one ``diffeqsolve`` of ``gflow.dynamics.segments``: error-controlled or fixed steps, or
an error-controlled warm-up and then stability stepping (``gflow.dynamics.stability``).

The runs' state between segments is one ``Runs`` object; the settings one
``FlowSettings``; the fixed context of a call (what the settings give, the recorders,
the stiffness programs) one ``_Setup``. A run that goes on from another (a kink run's
fallback, ``gflow.dynamics.sliding``) is started with a ``Handover``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gflow import timing
from gflow.checkpoint import Checkpointer, pack, recorders_state, restore_recorders, unpack
from gflow.dynamics import segments
from gflow.dynamics.clock import (
    CLOCKS,
    log1p_of_log_t,
    log_t_grid,
    log_t_of,
    one_blas_thread,
    quantities_many,
    start,
    target_clock,
)
from gflow.dynamics.solvers import (
    DEFAULT_ACCURACY,
    DEFAULT_TOL,
    is_fixed_step,
    make_solver,
    solver_name,
    stability_edge,
)
from gflow.dynamics.span import input_span as input_span_of
from gflow.dynamics.span import span_from_arrays
from gflow.dynamics.stability import (
    ADAPTIVE_CFL,
    LANCZOS,
    layout,
    stable_step,
    vmapped_stiffness,
)
from gflow.objective import Objective
from gflow.spectrum import lanczos_top_many
from gflow.trajectory import Trajectory, TrajectoryRecorder

__all__ = ["FlowSettings", "Handover", "Runs", "drive", "ESTIMATE_COLUMNS", "shadow_settings"]


class FlowSettings(NamedTuple):
    """A segment-driven flow run's settings (``run_flow``'s arguments of that name;
    ``cfl`` set: stability stepping after an error-controlled ``warmup``)."""

    clock: str = "loss"
    solver: Any = "tsit5"
    stepsize_controller: diffrax.AbstractStepSizeController | None = None
    rtol: float = DEFAULT_TOL[0]
    atol: float = DEFAULT_TOL[1]
    dt: float | None = None
    cfl: float | None = None
    warmup: str | None = "tsit5"
    refresh: int = 48
    drift: float = 0.05
    log_t_max: float = 10.0
    log_loss_min: float | None = None
    saves: int = 50
    log_t_min: float = 0.0
    log_t0: float | None = None
    max_steps: int = 1_000_000
    input_span: bool | None = None
    save_params: bool = False
    error_estimate: bool = True
    accuracy: float = DEFAULT_ACCURACY
    # stability stepping's cfl held to ``accuracy`` by the error estimate (``_control``),
    # from ``cfl`` within ``ADAPTIVE_CFL``; False: ``cfl`` all along
    adapt: bool = False


class Handover(NamedTuple):
    """A run this one continues from ``log_t0``: its invariant monitor and dissipation
    integral go on from that run's start, and the start itself, not a save point, is not
    recorded."""

    monitor: Any
    dissipation: float


class _Plan(NamedTuple):
    """A flow run's validated settings and what follows from them."""

    settings: dict  # the trajectory config's entries
    first: tuple  # (segment, evals) before stability stepping (all along without cfl)
    stable: tuple | None  # (segment, evals) of stability stepping
    edge: float | None  # the solver's stability edge (cfl only)
    targets: list  # save points in log t
    z0: float  # log(1 + t) at the start
    tols: tuple | None = None  # (rtol, atol) the first segments take (segments.tolerances)


def _check_plan(s: FlowSettings, solver, name: str) -> None:
    """The settings' consistency: a ``ValueError`` naming the bad one."""
    if s.clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {s.clock!r}")
    if not (math.isfinite(s.log_t_min) and math.isfinite(s.log_t_max)):
        raise ValueError(
            f"log_t_min and log_t_max must be finite, got {s.log_t_min} and {s.log_t_max}"
        )
    if s.log_loss_min is not None and math.isnan(s.log_loss_min):
        raise ValueError("log_loss_min must be a number or None, got nan")
    if not s.log_t_max > s.log_t_min:
        raise ValueError(f"log_t_max must exceed log_t_min = {s.log_t_min}, got {s.log_t_max}")
    if s.log_t0 is not None and not s.log_t0 < s.log_t_max:
        raise ValueError(f"log_t0 = {s.log_t0} must be below log_t_max = {s.log_t_max}")
    if s.max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {s.max_steps}")
    if s.dt is not None and s.cfl is not None:
        raise ValueError("give a fixed step dt or a stability fraction cfl, not both")
    if s.stepsize_controller is not None and (s.dt is not None or s.cfl is not None):
        raise ValueError("give a stepsize_controller, or a fixed step dt, or a cfl: one of them")
    if s.dt is None and s.cfl is None and s.stepsize_controller is None and is_fixed_step(solver):
        raise ValueError(f"solver {name!r} has no error estimate: step it by stability "
                         "(StabilityStepping) or at a fixed dt0")  # fmt: skip
    ctrl = s.stepsize_controller
    fixed = s.dt is not None or s.cfl is not None
    if isinstance(solver, diffrax.AbstractImplicitSolver) and (
        fixed or (ctrl is not None and not isinstance(ctrl, diffrax.PIDController))
    ):
        how = type(ctrl).__name__
        if fixed:
            how = "a fixed dt" if s.dt is not None else "a cfl"
        raise ValueError(
            f"solver {name!r} is implicit: it runs under error control (rtol / atol, or a "
            f"diffrax.PIDController), not with {how}"
        )
    if s.cfl is not None and s.warmup is not None and is_fixed_step(s.warmup):
        raise ValueError(f"warmup solver {solver_name(s.warmup)!r} has no error estimate")


def _adapts(s: FlowSettings) -> bool:
    """Is the cfl held to the accuracy (stability stepping with an error estimate)?"""
    return s.adapt and s.cfl is not None and s.error_estimate


def _plan(s: FlowSettings, dtype, share: float = 1.0) -> _Plan:
    """Check the settings (a ``ValueError`` naming the bad one) and set up."""
    name = solver_name(s.solver)  # validates a name
    solver = make_solver(s.solver)
    _check_plan(s, solver, name)
    edge = stability_edge(solver) if s.cfl is not None else None
    all_steps = int(min(s.max_steps, 2**31 - 1))
    stable = None
    dtype = np.dtype(dtype).name
    tols = None
    if s.cfl is None:
        ctrl = segments.make_controller(
            s.stepsize_controller, s.dt is not None, s.rtol, s.atol, share
        )
        first = segments.kept(s.clock, solver, ctrl, all_steps, dtype)
        tols = segments.tolerances(ctrl, solver)
    else:
        first = None
        if s.warmup is not None:
            ctrl = segments.make_controller(None, False, s.rtol, s.atol, share)
            warm_solver = make_solver(s.warmup)
            first = segments.kept(s.clock, warm_solver, ctrl, all_steps, dtype)
            tols = segments.tolerances(ctrl, warm_solver)
        stable = segments.kept(s.clock, solver, diffrax.ConstantStepSize(), int(s.refresh), dtype)
    settings = dict(
        dynamics="flow", clock=s.clock, solver=name, rtol=s.rtol, atol=s.atol, dt=s.dt,
        cfl=s.cfl,
        warmup=solver_name(s.warmup) if (s.cfl is not None and s.warmup is not None) else None,
        refresh=s.refresh, drift=s.drift, log_t_max=s.log_t_max, log_loss_min=s.log_loss_min,
        saves=s.saves, log_t_min=s.log_t_min, log_t0=s.log_t0, max_steps=s.max_steps,
        error_estimate=s.error_estimate, accuracy=s.accuracy if s.error_estimate else None,
        cfl_control="estimate" if _adapts(s) else None,
    )  # fmt: skip
    if s.stepsize_controller is not None:
        settings["stepsize_controller"] = type(s.stepsize_controller).__name__
        # the accuracy asked for is the controller's (the fidelity verdict reads rtol)
        for key in ("rtol", "atol"):
            value = getattr(s.stepsize_controller, key, None)
            settings[key] = float(value) if isinstance(value, int | float) else None
    targets = [float(x) for x in log_t_grid(s.log_t_min, s.log_t_max, s.saves)]
    if s.log_t0 is not None:
        targets = [x for x in targets if x > s.log_t0]
    z0 = 0.0 if s.log_t0 is None else log1p_of_log_t(s.log_t0)
    return _Plan(settings, first, stable, edge, targets, z0, tols)


@dataclass
class Runs:
    """The K runs' state between segments (what a checkpoint holds)."""

    y: tuple  # the ODE states, stacked (leading axis: the run)
    c: np.ndarray  # clock values (float64)
    dt0: list  # each run's next first step (None: the controller chooses)
    stabilised: np.ndarray  # past the warm-up: stability stepping
    alive: np.ndarray
    status: list
    message: list
    totals: list  # per run: steps, accepted, rejected, grad_evals
    done: int = 0  # save points reached
    warm: list | None = None  # per run: the Lanczos vector of the last stable step
    cfl: np.ndarray | None = None  # per run: stability stepping's cfl now
    gap: np.ndarray | None = None  # per run: the controller's recent peak (_control)
    bound: list | None = None  # per run: what bounds its stable step now (_set_stable_steps)

    def meta(self) -> dict:
        """The checkpoint's metadata (the arrays go apart: ``y``, ``warm``)."""
        return dict(
            c=[float(v) for v in self.c], stabilised=[bool(v) for v in self.stabilised],
            alive=[bool(v) for v in self.alive],
            dt0=[None if h is None else float(h) for h in self.dt0],
            status=self.status, message=self.message, totals=self.totals, done=self.done,
            cfl=None if self.cfl is None else [float(v) for v in self.cfl],
            gap=None if self.gap is None else [float(v) for v in self.gap],
        )  # fmt: skip

    def restore(self, arrays: dict, meta: dict, prefix: str = "") -> None:
        """Back to a checkpoint's state (``meta()``'s, and the arrays under ``prefix``)."""
        self.y = unpack(f"{prefix}y/", self.y, arrays)
        self.c = np.array(meta["c"], np.float64)
        self.stabilised, self.alive = np.array(meta["stabilised"]), np.array(meta["alive"])
        self.dt0, self.status, self.message = meta["dt0"], meta["status"], meta["message"]
        self.totals, self.done = meta["totals"], meta["done"]
        for key in ("cfl", "gap"):
            if meta.get(key) is not None:
                setattr(self, key, np.array(meta[key], np.float64))
        if self.warm is not None:
            self.warm = [arrays.get(f"{prefix}warm{i}") for i in range(len(self.warm))]


class _Setup(NamedTuple):
    """What stays fixed over a call of ``drive``."""

    objective: Objective
    field: Objective  # what the ODE's field reads (in the span of the inputs, or the same)
    span: Any  # gflow.dynamics.span's reduction, or None
    settings: FlowSettings
    plan: _Plan
    seeds: list
    single: bool
    recs: list
    progress: Callable | None
    stiffness: tuple | None  # (jac_many, drift_many, dim, sq_fixed) under stability stepping
    shadow: Any = None  # the _Shadow whose runs estimate these runs' error, or None

    def full(self, params):
        return params if self.span is None else self.span.lift_many(params)


# the error estimates a flow run records at every save point (``_estimates``): relative
# errors, differences of two runs' states
ESTIMATE_COLUMNS = ("param_error", "margin_error")
SHADOW_STEP = 2.0  # the shadow's steps (cfl, dt) over the run's
# the shadow's tolerances over the run's: an adaptive run's error grows as tol^(4/5) on a
# smooth field (fifth order) to tol^1 where steps are cut at kinks, and as tol^0.71 was
# measured through a ReLU net's kinks (tests/test_error_estimate.py); 4 times the
# tolerances at least doubles the error at any of these
SHADOW_TOL = 4.0


class _Shadow(NamedTuple):
    """The same runs at ``SHADOW_STEP`` times the steps (or a fraction of them), whose
    difference from the runs estimates the runs' error (``_estimates``)."""

    su: _Setup
    runs: Runs
    weight: float  # the estimate is weight * |run - shadow|


def shadow_settings(s: FlowSettings) -> tuple[FlowSettings, float] | None:
    """The settings of the shadow of a run with settings ``s``, and the weight of the
    difference: ``SHADOW_STEP`` times its step (cfl, dt) and ``SHADOW_TOL`` times its
    tolerances, so that its error is 2 to 4 times the run's (first order at kinks,
    second on a smooth field; an adaptive run's 2.7 to 4 times) and ``|run - shadow|``
    is 1 to 3 times the run's error (weight 1). Past a cfl of 1 / ``SHADOW_STEP`` the
    shadow steps finer instead, its error a quarter to a half of the run's: weight 2, for
    1 to 1.5 times. None: no estimate (a step-size controller of the user's other than a
    ``PIDController``)."""
    ctrl = s.stepsize_controller
    if ctrl is not None and not isinstance(ctrl, diffrax.PIDController):
        return None
    m, tol, weight = SHADOW_STEP, SHADOW_TOL, 1.0
    if s.cfl is not None and s.cfl * m > 1:
        m, tol, weight = 1 / SHADOW_STEP, 1 / SHADOW_TOL, 2.0
    if ctrl is not None:
        ctrl = eqx.tree_at(lambda c: (c.rtol, c.atol), ctrl, (ctrl.rtol * tol, ctrl.atol * tol))
    shadow = s._replace(
        stepsize_controller=ctrl, rtol=s.rtol * tol, atol=s.atol * tol,
        dt=None if s.dt is None else s.dt * m, cfl=None if s.cfl is None else s.cfl * m,
    )  # fmt: skip
    return shadow, weight


def _estimates(su: _Setup, shadow: _Shadow, got: tuple, i: int, log_t: float) -> dict:
    """Run ``i``'s error estimates at a save point from ``got`` (``_record``'s host copies
    of the runs' and the shadow's quantities, states and parameters), each the largest
    since the start (an envelope: a difference between two runs passes through zero
    where the error need not): ``param_error``, weight times ``|theta - theta_shadow| /
    rho``; ``margin_error``, weight times ``|gamma_bar - gamma_bar_shadow|``; NaN from
    where the shadow failed or is not at the same time on. ``shadow_evals``: its
    gradient evaluations."""
    q, _, theta, q_s, y_s, theta_s = got
    s, runs_s = su.settings, shadow.runs
    out = dict(param_error=math.nan, margin_error=math.nan,
               shadow_evals=float(runs_s.totals[i]["grad_evals"]))  # fmt: skip
    there = log_t_of(s.clock, _lane(y_s, i), float(runs_s.c[i]))
    at_save = not math.isfinite(log_t) or abs(there - log_t) <= 1e-9 * (1 + abs(log_t))
    if runs_s.status[i] == "failed" or not at_save:
        return out
    diff = ravel_pytree(_lane(theta, i))[0] - ravel_pytree(_lane(theta_s, i))[0]
    rho = float(_lane(q, i).rho)
    margins = float(_lane(q, i).normalized_margin), float(_lane(q_s, i).normalized_margin)
    now = dict(param_error=shadow.weight * float(np.linalg.norm(diff)) / rho,
               margin_error=shadow.weight * abs(margins[0] - margins[1]))  # fmt: skip
    before = su.recs[i].rows[-1] if su.recs[i].rows else {}
    for key, value in now.items():
        last = before.get(key, 0.0)
        out[key] = math.nan if math.isnan(last) else max(last, value)
    return out


def _lane(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def _observe(su: _Setup, runs: Runs) -> tuple:
    """Host copies of the runs' quantities, states and parameters, and the shadow's."""
    theta = su.full(runs.y[0])
    got = (quantities_many(su.objective, theta), runs.y, theta)
    if su.shadow is not None:
        theta_s = su.full(su.shadow.runs.y[0])
        got += (quantities_many(su.objective, theta_s), su.shadow.runs.y, theta_s)
    return jax.device_get(got)


# what bounds a stability-stepping run's steps, counted in its columns ``steps_<bound>``
# (they add up to ``solver_steps``): the warm-up's error control, the stability edge at
# the largest cfl, the cfl the error estimate holds below it (``_control``), the drift
# bound, the save points (a step cut short there)
BOUNDS = ("tolerance", "stability", "accuracy", "drift", "save")


def _step_columns(runs: Runs, i: int) -> dict:
    """Run ``i``'s stability-stepping columns: its cfl now, what bound its steps, and how
    many segments the controller redid (``_control``)."""
    totals = runs.totals[i]
    out = {f"steps_{b}": float(totals.get(f"steps_{b}", 0)) for b in BOUNDS}
    out.update(cfl=float(runs.cfl[i]), redone=float(totals.get("redone", 0)))
    return out


def _record(su: _Setup, runs: Runs, which, log_t=None, got=None) -> list[dict]:
    """Record the runs ``which`` at the state reached (at ``log_t`` if given), with the
    error estimate from ``su.shadow`` (``_estimates``); ``got``: ``_observe``'s, if
    already taken there."""
    shadow = su.shadow
    got = _observe(su, runs) if got is None else got
    q, host_y, host_theta = got[:3]
    rows = []
    for i in which:
        totals = runs.totals[i]
        at = (
            log_t_of(su.settings.clock, _lane(host_y, i), float(runs.c[i]))
            if log_t is None
            else log_t
        )
        extra = {} if shadow is None else _estimates(su, shadow, got, i, at)
        if runs.cfl is not None:
            extra.update(_step_columns(runs, i))
        row = su.recs[i].add(
            totals["accepted"], at, _lane(q, i), _lane(host_theta, i),
            dissipation=float(host_y[-1][i]), grad_evals=float(totals["grad_evals"]),
            solver_steps=float(totals["steps"]), rejected=float(totals["rejected"]), **extra,
        )  # fmt: skip
        if su.progress is not None and not su.single:
            su.progress({**row, "seed": int(su.seeds[i])})
        rows.append(row)
    return rows


def _set_stable_steps(su: _Setup, runs: Runs, todo: np.ndarray) -> None:
    """The ``cfl`` step of each run in ``todo`` (``run_flow``'s docstring)."""
    jac_many, drift_many, dim, sq_fixed = su.stiffness
    dtype, s = su.objective.dtype, su.settings
    c_ = jnp.asarray(runs.c, dtype)
    y = runs.y
    eigs = lanczos_top_many(
        lambda v: jac_many(su.field, c_, y, jnp.asarray(v, dtype)), dim, runs.warm,
        active=todo, **LANCZOS,
    )  # fmt: skip
    ratios = np.asarray(drift_many(su.field, c_, y, sq_fixed))
    for i in np.flatnonzero(todo):
        runs.warm[i] = eigs[i].vector
        runs.totals[i]["grad_evals"] += 2 * eigs[i].matvecs + 1
        cfl = float(runs.cfl[i])
        runs.dt0[i] = stable_step(eigs[i].value, float(ratios[i]), cfl, su.plan.edge, s.drift)
        if runs.dt0[i] < stable_step(eigs[i].value, math.inf, cfl, su.plan.edge, s.drift):
            runs.bound[i] = "drift"
        elif _adapts(s) and cfl < ADAPTIVE_CFL[1]:
            runs.bound[i] = "accuracy"  # the controller holds the cfl below its largest
        else:
            runs.bound[i] = "stability"


def _segments(su: _Setup, runs: Runs, target: float, stable: bool, only=None) -> None:
    """Every live run of this phase (warm-up or error-controlled; or ``stable``), or those
    of them in the mask ``only``, to the save point ``target``, segment by segment; a
    run that fails is recorded at its last finite state and ends."""
    s, dtype = su.settings, su.objective.dtype
    k_runs = len(su.seeds)
    z_target, c1_all = target_clock(s.clock, target)
    todo = runs.alive & (runs.stabilised == stable)
    if only is not None:
        todo &= only
    while todo.any():
        segment, evals = su.plan.stable if stable else su.plan.first
        if stable:
            with timing.phase("flow: stable step"):
                _set_stable_steps(su, runs, todo)
        c = runs.c
        # a run not in `todo` gets a zero-length segment: it stays where it is
        far = c + segments.LOSS_SPAN if s.clock == "loss" else np.full(k_runs, c1_all)
        c1 = np.where(todo, far, c)
        # NaN: the controller chooses the first step (segments._DtFromArgs)
        h0 = jnp.asarray([math.nan if runs.dt0[i] is None else runs.dt0[i] if todo[i] else 1.0
                          for i in range(k_runs)], dtype)  # fmt: skip
        with timing.phase("flow: stepping, stable" if stable else "flow: stepping"):
            tols = None if stable or su.plan.tols is None else jnp.asarray(su.plan.tols, dtype)
            out = segment(
                su.field, runs.y, jnp.asarray(c, dtype), jnp.asarray(c1, dtype), h0,
                jnp.asarray(z_target, dtype), tols,
            )  # fmt: skip
            y_new, c_new, result = out[0], out[1], out[2]
            ok = np.asarray(segments.segment_ok(result, stable))
            reached = np.asarray(segments.reached(s.clock, result))
            c_new, n_steps, n_acc, finite = jax.device_get(
                (c_new, out[3], out[4], segments.all_finite(y_new))
            )
        runs.y = segments.select_runs(todo & finite, y_new, runs.y)
        failed = []
        for i in np.flatnonzero(todo):
            totals = runs.totals[i]
            segments.count_steps(totals, int(n_steps[i]), int(n_acc[i]), evals)
            if runs.cfl is not None:  # what bound the steps (BOUNDS)
                save = int(stable and bool(reached[i]) and n_steps[i] > 0)
                key = runs.bound[i] if stable else "tolerance"
                totals[f"steps_{key}"] = totals.get(f"steps_{key}", 0) + int(n_steps[i]) - save
                totals["steps_save"] = totals.get("steps_save", 0) + save
            if not (ok[i] and finite[i]):
                runs.status[i] = "failed"
                runs.message[i] = segments.failure_message(
                    s.solver, target, _lane(result, i), bool(ok[i]), totals["steps"]
                )
                if finite[i]:
                    c[i] = c_new[i]
                    failed.append(i)
                runs.alive[i] = todo[i] = False
                continue
            if s.dt is None and not stable and n_acc[i] > 0:
                runs.dt0[i] = (float(c_new[i]) - c[i]) / int(n_acc[i])
            c[i] = c_new[i]
            if reached[i] or totals["steps"] >= s.max_steps:
                todo[i] = False
        if failed and su.recs is not None:
            _record(su, runs, failed)  # keep what was reached: its last finite state


def _advance(su: _Setup, runs: Runs, target: float) -> tuple:
    """The runs and their shadow to the save point ``target``, the segments of runs whose
    cfl the controller cut redone (``_control``); ``_observe``'s copies there."""
    shadow = su.shadow
    adapt = shadow is not None and _adapts(su.settings)
    kept = (_Kept.of(runs), _Kept.of(shadow.runs)) if adapt else None
    only = None
    for _ in range(1 + REDO_MAX):
        for stable in (False, True):  # warm-up / error-controlled runs, then stabilised
            _segments(su, runs, target, stable, only)
        if shadow is not None:
            with timing.phase("flow: error estimate"):
                for stable in (False, True):
                    _segments(shadow.su, shadow.runs, target, stable, only)
        got = _observe(su, runs)
        if not adapt:
            return got
        only = _control(su, runs, got, kept[0].stabilised)
        if not only.any():
            return got
        kept[0].back(runs, only)
        kept[1].back(shadow.runs, only)
    return got


# the most times a save point's segment is redone at a smaller cfl (``_control``)
REDO_MAX = 3


class _Kept(NamedTuple):
    """Runs' state at a save point, to go back to (``_advance``)."""

    y: tuple
    c: np.ndarray
    dt0: list
    warm: list
    stabilised: np.ndarray

    @classmethod
    def of(cls, runs: Runs) -> _Kept:
        return cls(runs.y, runs.c.copy(), list(runs.dt0), list(runs.warm),
                   runs.stabilised.copy())  # fmt: skip

    def back(self, runs: Runs, which: np.ndarray) -> None:
        """The runs ``which`` back here (their evaluations stay counted)."""
        runs.y = segments.select_runs(which, self.y, runs.y)
        for i in np.flatnonzero(which):
            runs.c[i], runs.dt0[i], runs.warm[i] = self.c[i], self.dt0[i], self.warm[i]


def _control(su: _Setup, runs: Runs, got: tuple, stable: np.ndarray) -> np.ndarray:
    """Stability stepping's cfl from the error estimate (docs/theory.md, "The flow's own
    error"). Per run stepped stably to this save point, with its shadow there: the
    difference ``|gamma_bar - gamma_bar_shadow|`` relative to the margin's scale so far
    (``now``). Through kinks it does not add up from segment to segment but wanders at
    a level in proportion to the cfl (measured on the default problem: rising and
    falling by a factor 10 between save points at one cfl), so the controller tracks its
    recent peak (``runs.gap``: the largest ``now``, fading by ``PEAK_FADE`` a segment,
    rescaled with the cfl) and sets the next cfl to bring that peak to ``PEAK_AIM``
    times the accuracy, growing by at most ``PEAK_GROW`` and falling by at most 2 a
    segment, within ``ADAPTIVE_CFL``. Where ``now``
    exceeds the accuracy, the segment is redone at the cfl cut to fit (the mask
    returned). The shadow's cfl follows."""
    q, _, _, q_s, y_s, _ = got
    s, shadow = su.settings, su.shadow
    lo, hi = ADAPTIVE_CFL
    aim = PEAK_AIM * s.accuracy
    redo = np.zeros(len(su.seeds), bool)
    ratio = shadow.su.settings.cfl / s.cfl
    for i in np.flatnonzero(runs.alive & stable & shadow.runs.alive):
        at = log_t_of(s.clock, _lane(runs.y, i), float(runs.c[i]))
        there = log_t_of(s.clock, _lane(y_s, i), float(shadow.runs.c[i]))
        if abs(there - at) > 1e-9 * (1 + abs(at)):
            continue  # not at the same save point (a run stopped by its step budget)
        margin = float(q.normalized_margin[i])
        scale = max([abs(margin)] + [abs(r["normalized_margin"]) for r in su.recs[i].rows])
        now = shadow.weight * abs(margin - float(q_s.normalized_margin[i])) / scale
        if not (scale > 0 and math.isfinite(now)):
            continue
        cfl = float(runs.cfl[i])
        peak = max(now, PEAK_FADE * float(runs.gap[i]))
        if now > s.accuracy and cfl > lo:
            new = max(lo, cfl * min(0.5, aim / now))
            runs.totals[i]["redone"] = runs.totals[i].get("redone", 0) + 1
            redo[i] = True
        else:
            new = min(hi, max(lo, cfl * min(PEAK_GROW, max(0.5, aim / max(peak, 1e-300)))))
        runs.gap[i] = peak * new / cfl
        runs.cfl[i], shadow.runs.cfl[i] = new, ratio * new
    return redo


# the controller's aim for the estimate's recent peak, as a fraction of the accuracy, and
# the fraction of that peak kept from one segment to the next (``_control``): measured on
# the default problem to log t = 100 against a fade of 0.7 and growth by up to 2 a
# segment, which redid 9 segments and took 14,315 evaluations (10,506 here, 3 redone)
PEAK_AIM = 0.5
PEAK_FADE = 0.9
PEAK_GROW = 1.25  # the most the cfl grows in a segment (it falls by up to 2)


def _stop_reason(row, log_t, steps, max_steps, log_loss_min) -> tuple[str, str] | None:
    """``(status, message)`` when a run ends at this save point (before its horizon)."""
    if steps >= max_steps:
        return "stopped", f"step budget max_steps = {max_steps} spent at log t = {log_t:.6g}"
    if log_loss_min is not None and row["log_loss"] <= log_loss_min:
        return "completed", f"log loss {row['log_loss']:.6g} <= target {log_loss_min:g}"
    return None


def _at_save_point(su: _Setup, runs: Runs, got=None) -> None:
    """Record the live runs at the save point reached (``got``: ``_observe``'s, if taken);
    switch to stability stepping below the loss threshold; end the runs whose stop
    condition holds."""
    s = su.settings
    live = np.flatnonzero(runs.alive)
    with timing.phase("flow: save points"):
        rows = _record(su, runs, live, got=got)
    for i, row in zip(live, rows, strict=True):
        if s.cfl is not None and row["log_loss"] < su.objective.loss.log_threshold:
            runs.stabilised[i] = True
        stop = _stop_reason(row, row["log_t"], runs.totals[i]["steps"], s.max_steps,
                            s.log_loss_min)  # fmt: skip
        if stop is not None:
            runs.status[i], runs.message[i] = stop
            runs.alive[i] = False
    runs.done += 1
    if su.shadow is not None:  # the shadow switches and stops where its run does
        shade = su.shadow.runs
        shade.stabilised[:] = runs.stabilised
        shade.alive &= runs.alive
        shade.done = runs.done


def _save_checkpoint(su: _Setup, runs: Runs, checkpoint: Checkpointer | None) -> None:
    if checkpoint is None or not checkpoint.due():
        return
    arrays, metas = recorders_state(su.recs)
    arrays.update(pack("y/", runs.y))
    if su.span is not None:
        arrays.update(su.span.arrays())
    if runs.warm is not None:
        arrays.update({f"warm{i}": np.asarray(w) for i, w in enumerate(runs.warm) if w is not None})
    meta = dict(recorders=metas, **runs.meta())
    if su.shadow is not None:
        shade = su.shadow.runs
        arrays.update(pack("shadow/y/", shade.y))
        if shade.warm is not None:
            arrays.update({f"shadow/warm{i}": np.asarray(w) for i, w in enumerate(shade.warm)
                           if w is not None})  # fmt: skip
        meta["shadow"] = shade.meta()
    checkpoint.save(runs.done + 1, arrays, meta)


def _recorders(objective, params0, seeds, single, s: FlowSettings, plan, span, config, progress):
    recs = []
    for seed in seeds:
        cfg = {**objective.describe(), **(config or {}), **plan.settings}
        cfg["input_span"] = None if span is None else span.rank
        if not single:
            cfg.update(seed=int(seed), seeds=[int(v) for v in seeds])
        recs.append(
            TrajectoryRecorder(
                "flow", cfg, s.save_params, progress if single else None,
                objective.invariant_reasons(params0[0]),
            )
        )  # fmt: skip
    return recs


def _start_runs(su: _Setup, starts0: list, handover: Handover | None) -> Runs:
    s, dtype, k_runs = su.settings, su.objective.dtype, len(su.seeds)
    first = [start(s.clock, p, su.plan.z0, dtype) for p in starts0]
    y = jax.tree.map(lambda *a: jnp.stack(a), *[st[0] for st in first])
    if handover is not None:
        for rec in su.recs or ():  # a shadow has no recorders
            rec.monitor = handover.monitor
        y = (*y[:-1], y[-1] + jnp.asarray(handover.dissipation, dtype))
    return Runs(
        y=y,
        c=np.array([st[1] for st in first], np.float64),
        dt0=[s.dt] * k_runs,
        stabilised=np.full(k_runs, s.cfl is not None and s.warmup is None),
        alive=np.ones(k_runs, bool),
        status=["completed"] * k_runs,
        message=[f"reached log t = {s.log_t_max:.6g}"] * k_runs,
        totals=[{"steps": 0, "accepted": 0, "rejected": 0, "grad_evals": 0} for _ in su.seeds],
        warm=[None] * k_runs if s.cfl is not None else None,
        cfl=np.full(k_runs, s.cfl, np.float64) if s.cfl is not None else None,
        gap=np.zeros(k_runs),
        bound=["stability"] * k_runs,
    )


def _vmapped(plan: _Plan) -> _Plan:
    """``plan`` with its segments over a batch of runs (``segments.vmapped``)."""
    return plan._replace(
        first=segments.vmapped(plan.first) if plan.first is not None else None,
        stable=segments.vmapped(plan.stable) if plan.stable is not None else None,
    )


def _make_shadow(su: _Setup, starts0: list, share: float, handover) -> _Shadow | None:
    """The shadow of ``su``'s runs from the same start (``shadow_settings``)."""
    got = shadow_settings(su.settings)
    if got is None:
        return None
    s, weight = got
    plan = _vmapped(_plan(s, su.objective.dtype, share))
    shadow_su = su._replace(settings=s, plan=plan, recs=None, progress=None)
    return _Shadow(shadow_su, _start_runs(shadow_su, starts0, handover), weight)


def drive(
    objective: Objective, params0: list, seeds: list, settings: FlowSettings, *,
    single: bool, config: dict | None = None, progress: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None, resume: bool = False,
    handover: Handover | None = None,
) -> list[Trajectory]:  # fmt: skip
    """K runs (K = 1: ``single``, ``run_flow``) in one vmapped integration
    (``run_flow_seeds``' docstring), one trajectory each. The settings are checked here
    for consistency; their values (``run_flow``'s checks) and ``params0`` before."""
    s = settings
    got = checkpoint.restore() if (checkpoint is not None and resume) else None
    # the state's parameters: in the span of the inputs (the checkpoint's choice on resume)
    span = (
        input_span_of(objective, params0, s.input_span)
        if got is None
        else span_from_arrays(objective, params0, got[0])
    )
    share = 1.0 if span is None else span.share(s.clock)
    plan = _vmapped(_plan(s, objective.dtype, share))
    starts0 = params0 if span is None else [span.restrict(p) for p in params0]
    stiffness = None
    if s.cfl is not None:
        jac_many, drift_many = vmapped_stiffness(s.clock, layout(starts0[0]))
        dim = ravel_pytree(starts0[0])[0].size
        sq_fixed = np.zeros(len(seeds)) if span is None else span.sq_fixed
        stiffness = (jac_many, drift_many, dim, jnp.asarray(sq_fixed, objective.dtype))
    su = _Setup(
        objective=objective, field=objective if span is None else span.objective, span=span,
        settings=s, plan=plan, seeds=seeds, single=single,
        recs=_recorders(objective, params0, seeds, single, s, plan, span, config, progress),
        progress=progress, stiffness=stiffness,
    )  # fmt: skip
    runs = _start_runs(su, starts0, handover)
    if s.error_estimate and (got is None or "shadow" in got[1]):
        su = su._replace(shadow=_make_shadow(su, starts0, share, handover))
    if got is None:
        if handover is None:
            _record(su, runs, range(len(seeds)), -math.inf if s.log_t0 is None else s.log_t0)
    else:
        arrays, meta = got
        restore_recorders(su.recs, arrays, meta["recorders"])
        runs.restore(arrays, meta)
        if su.shadow is not None:
            su.shadow.runs.restore(arrays, meta["shadow"], "shadow/")
    blas = one_blas_thread()
    try:
        for target in plan.targets[runs.done :]:
            if not runs.alive.any():
                break
            _at_save_point(su, runs, _advance(su, runs, target))
            with timing.phase("flow: checkpoints"):
                _save_checkpoint(su, runs, checkpoint)
    except KeyboardInterrupt:
        for i in np.flatnonzero(runs.alive):
            runs.status[i], runs.message[i] = "stopped", "interrupted"
    finally:
        blas.restore_original_limits()
    finals = jax.device_get(su.full(runs.y[0]))
    return [
        su.recs[i].finish(_lane(finals, i), runs.status[i], runs.message[i], objective)
        for i in range(len(seeds))
    ]
