"""Gradient flow on diffrax (docs/theory.md, "Dynamics").

Three clocks for one path ``d theta / dt = -grad Loss``:

* ``time``: the ODE in ``t`` itself, ``f = -e^{log Loss} grad log Loss``. Plain, but a
  long horizon needs ``t = e^100``.
* ``loss``: ``d tau = Loss dt``: ``d theta / d tau = -grad log Loss`` with
  ``z = log(1 + t)`` carried as an extra state, ``dz / d tau = e^{-log Loss - z}``; save
  points in ``log t`` are found as events on ``z`` (root-found, exact to the solver).
  Carrying ``log(1 + t)`` rather than ``log t`` keeps ``t = 0`` finite.
* ``logt``: ``s = log(1 + t)`` as the independent variable:
  ``d theta / ds = -e^{log Loss + s} grad log Loss``. Late in training
  ``log Loss + s ~ -(2 - 2/L) log s`` (Theorem 4.3), so the field is well scaled at
  every horizon.

Integration runs segment by segment between save points spaced evenly in ``log t``
(plus ``t = 0``): one jitted ``diffeqsolve`` per segment, compiled once, with the
quantities computed at each save point and no parameters stored unless asked. A solver
failure ends the run with the partial trajectory and a message.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jax.flatten_util import ravel_pytree

from gflow import timing
from gflow.checkpoint import (
    Checkpointer,
    pack,
    recorders_state,
    restore_recorders,
    unpack,
)
from gflow.dynamics.gd import (
    log1p_of_log_t,
    log_t_grid,
    log_t_of_log1p,
    one_blas_thread,
    quantities_many,
)
from gflow.dynamics.sliding import KinkStepping, check_kink_stepping, run_flow_kinks
from gflow.dynamics.solvers import (  # noqa: F401  (RK4, SOLVERS re-exported)
    RK4,
    SOLVERS,
    check_controller,
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
from gflow.dynamics.span import input_span as input_span_of
from gflow.dynamics.span import span_from_arrays
from gflow.models import check_finite_params
from gflow.objective import Objective
from gflow.quantities import sq_norm
from gflow.spectrum import lanczos_top_many
from gflow.trajectory import Trajectory, TrajectoryRecorder

__all__ = [
    "CLOCKS", "SOLVERS", "make_solver", "vector_field", "run_flow", "run_flow_seeds",
    "log_t_of_log1p", "StabilityStepping", "KinkStepping",
]  # fmt: skip

CLOCKS = ("loss", "time", "logt")


def vector_field(clock: str) -> Callable:
    """The ODE right-hand side ``f(clock_value, y, objective)`` for ``clock``.

    The state is ``y = (theta, D)`` (``(theta, z, D)`` on the loss clock) with ``D`` the
    dissipation integral ``int ||grad log Loss||^2 d tau`` of ``gflow.invariants``: it
    comes with the gradient for free, and ``log Loss + D`` is constant along the flow."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")

    def f(c, y, obj: Objective):
        theta = y[0]
        ell, g = obj.value_and_grad(theta)
        sq = sq_norm(g)
        if clock == "loss":
            # dt/dtau = 1/Loss and z = log(1 + t): dz/dtau = e^{-ell - z} (1 + t = e^z).
            return jax.tree.map(jnp.negative, g), jnp.exp(-ell - y[1]), sq
        # time: dtheta/dt = -Loss grad log Loss; logt: dt/ds = 1 + t = e^s, and
        # e^{ell + s} stays O(1) late in training. In both, d tau / dc = `rate`.
        rate = jnp.exp(ell) if clock == "time" else jnp.exp(ell + c)
        return jax.tree.map(lambda v: -rate * v, g), rate * sq

    return f


class StabilityStepping(NamedTuple):
    """gflow's stability stepping as a ``stepsize_controller`` for ``run_flow``: the
    adaptive ``warmup`` solver until the loss threshold, then the solver's steps at
    ``cfl`` of its stability edge over the field's top eigenvalue, bounded by ``drift``
    relative parameter change, re-set every ``refresh`` steps (``run_flow``'s ``cfl``).
    ``cfl=None``: the solver's default (``solvers.default_cfl``, e.g. 0.14 for Ralston)."""

    cfl: float | None = None
    warmup: str | None = "tsit5"
    refresh: int = 48
    drift: float = 0.05


class _ThetaNorm(eqx.Module):
    """The step-size controller's error norm, an RMS: the dissipation integral D (the
    state's last entry) is a monitor, left out so that carrying it does not change theta's
    steps. ``share``: the fraction of the full state's entries the state carries (a flow
    in the span of the inputs, ``gflow.dynamics.span``, leaves out entries that never
    move); the RMS is taken over all of them, as without the reduction."""

    share: float = eqx.field(static=True, default=1.0)

    def __call__(self, y):
        rms = optx.rms_norm(y[:-1])
        return rms if self.share == 1.0 else rms * math.sqrt(self.share)


def _controller(
    stepsize_controller, fixed: bool, rtol: float, atol: float, share: float = 1.0
):  # fmt: skip
    """The step-size controller of a segment: the user's (a PID controller's norm made
    to leave out D), else a constant step, else a PID controller at ``rtol``, ``atol``
    (``_ThetaNorm(share)``)."""
    if fixed:
        return diffrax.ConstantStepSize()
    if stepsize_controller is None:
        return diffrax.PIDController(rtol=rtol, atol=atol, norm=_ThetaNorm(share))
    if not isinstance(stepsize_controller, diffrax.AbstractStepSizeController):
        raise TypeError(
            "stepsize_controller must be a diffrax.AbstractStepSizeController, got "
            f"{type(stepsize_controller).__name__}"
        )
    if isinstance(stepsize_controller, diffrax.PIDController):
        norm = stepsize_controller.norm
        return eqx.tree_at(lambda c: c.norm, stepsize_controller, _Without(norm))
    return stepsize_controller


class _Without(eqx.Module):
    """A user's norm applied to the state without its last entry (D)."""

    norm: Callable = eqx.field(static=True)

    def __call__(self, y):
        return self.norm(y[:-1])


class _DtFromArgs(diffrax.AbstractStepSizeController):
    """``inner`` with its first step taken from ``args[2]`` rather than ``dt0``: with a
    traced ``dt0`` diffrax adds a run-time sign check (an ``equinox.error_if``, a host
    callback), and a program with a host callback is never written to JAX's persistent
    compilation cache. Integration forwards only, so the sign needs no check."""

    inner: diffrax.AbstractStepSizeController

    def wrap(self, direction):
        return _DtFromArgs(self.inner.wrap(direction))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        h = args[2]
        if h is None or isinstance(self.inner, diffrax.ConstantStepSize):
            return self.inner.init(terms, t0, t1, y0, h, args, func, error_order)
        # NaN: let the controller choose (as dt0=None would): one program for the first
        # segment and the later ones, which go on with the step reached
        return jax.lax.cond(
            jnp.isnan(h),
            lambda: self.inner.init(terms, t0, t1, y0, None, args, func, error_order),
            lambda: self.inner.init(terms, t0, t1, y0, h, args, func, error_order),
        )

    def adapt_step_size(self, *args, **kwargs):
        return self.inner.adapt_step_size(*args, **kwargs)


def _segment_fn(clock: str, solver, controller, steps: int, dtype: str = "float64"):
    """``(segment, evals)``: one jitted ``diffeqsolve`` from ``c0`` towards ``c1`` (or the
    loss clock's save event), cached so that later runs of the same kind compile nothing
    (solvers and controllers are compared by value); ``evals(n_steps)`` counts its
    gradient evaluations. ``dtype``: the state's, which sets how finely the save event
    can be located."""
    try:
        return _segment_cached(clock, solver, controller, steps, dtype)
    except TypeError:  # a solver or controller holding arrays: not hashable, not cached
        return _segment_cached.__wrapped__(clock, solver, controller, steps, dtype)


@functools.cache
def _segment_cached(clock: str, the_solver, controller, steps: int, dtype: str):
    field = vector_field(clock)
    fixed = isinstance(controller, diffrax.ConstantStepSize)
    # args = (objective, z target of the loss clock's save event, first step) for every
    # clock
    term = diffrax.ODETerm(lambda c, y, args: field(c, y, args[0]))
    per_step, per_start = evals_per_step(the_solver)
    event = None
    if clock == "loss":

        def event_fn(t, y, args, **kwargs):
            # relative: z = log(1 + t) is ~ 1000 at the longest horizons, where an absolute
            # 1e-13 is below its float64 spacing and no root finder could reach it
            value = (y[1] - args[1]) / (1 + jnp.abs(args[1]))
            # diffrax's untriggered branch is a Python 0.0 (float64 under x64): match it
            return value.astype(jnp.result_type(float))

        # bisection on the step's dense output: always converges (Newton can stall on a
        # long step's interpolant, seen at log t ~ 360). z rises with tau, so the sign is
        # known (flip=False): no bracket check, which under vmap would also run on, and
        # fail for, the runs whose step had no event.
        # 1e-13 in float64; 64 ulp in float32 (7.6e-6): z moves about that much over a
        # float32 step of tau, finer would not converge
        tol = 1e-13 if dtype == "float64" else 64 * float(np.finfo(dtype).eps)
        event = diffrax.Event(event_fn, root_finder=optx.Bisection(rtol=tol, atol=tol, flip=False))

    @eqx.filter_jit
    def segment(obj, y0, c0, c1, dt0, z_target):
        sol = diffrax.diffeqsolve(
            term,
            the_solver,
            c0,
            c1,
            None,  # the first step is in args (_DtFromArgs)
            y0,
            (obj, z_target, dt0),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=_DtFromArgs(controller),
            event=event,
            max_steps=steps,
            throw=False,
        )
        y1 = jax.tree.map(lambda a: a[-1], sol.ys)
        st = sol.stats
        return y1, sol.ts[-1], sol.result, st["num_steps"], st["num_accepted_steps"]

    def evals(n_steps: int) -> int:
        # an adaptive solve also spends 2 evaluations choosing its first step
        return n_steps * per_step + per_start + (0 if fixed else 2)

    return segment, evals


@functools.cache
def _stiffness_fns(clock: str):
    """Jitted ``(jac_matvec, drift_dt)`` for stability stepping on ``clock``:
    ``v -> -J v`` (J: the field's Jacobian in theta, v a parameter pytree) and
    ``|theta| / |f(theta)|``, with ``|theta|^2`` counting ``sq_fixed`` more."""
    field = vector_field(clock)

    def velocity(obj, c, y, theta):
        return field(c, (theta, *y[1:]), obj)[0]

    @eqx.filter_jit
    def jac_matvec(obj, c, y, v):
        _, jv = jax.jvp(lambda th: velocity(obj, c, y, th), (y[0],), (v,))
        return jax.tree.map(jnp.negative, jv)

    @eqx.filter_jit
    def drift_dt(obj, c, y, sq_fixed):
        # sq_fixed: |theta|^2 of parameters the state leaves out (gflow.dynamics.span)
        theta = ravel_pytree(y[0])[0]
        f = ravel_pytree(velocity(obj, c, y, y[0]))[0]
        return jnp.sqrt(jnp.sum(theta**2) + sq_fixed) / jnp.linalg.norm(f)

    return jac_matvec, drift_dt


_LANCZOS = dict(iters=12, tol=1e-3)  # the cfl step's eigenvalue: 3 digits are enough
_LOSS_SPAN = 1e6  # the loss clock integrates this far in tau; the save event stops it first


def _check_stability(cfl, refresh, drift, owner: str | None = None) -> None:
    """Stability stepping's settings (``run_flow``'s or a ``StabilityStepping``'s): a
    ``ValueError`` naming ``owner`` and the value. ``cfl`` None: the solver's default."""
    where = f"{owner}: " if owner else ""
    if cfl is not None and not 0 < (real_scalar(cfl) or 0.0) <= 1:
        raise ValueError(f"{where}cfl must be in (0, 1], got cfl={cfl}")
    if not positive_int(refresh):
        raise ValueError(f"{where}refresh must be an integer >= 1, got refresh={refresh!r}")
    if not finite_positive(drift):
        raise ValueError(f"{where}drift must be finite and positive, got drift={drift}")


def _check_steps(stepsize_controller, rtol, atol, dt, cfl, refresh, drift) -> None:
    """``run_flow``'s step control, checked before any work (a ``ValueError`` naming the
    controller and the value): the flat ``rtol`` / ``atol`` / ``dt`` / ``cfl``, and a
    ``stepsize_controller``: gflow's ``StabilityStepping`` / ``KinkStepping`` (plain
    tuples, so checked here rather than when made), or diffrax's (``check_controller``:
    a ``PIDController(rtol=-1)`` would otherwise accept every step, a NaN one reject
    every step until ``max_steps``)."""
    sc = stepsize_controller
    if isinstance(sc, StabilityStepping):
        if cfl is not None:
            raise ValueError(
                f"give the stability fraction once: StabilityStepping(cfl={sc.cfl}) or "
                f"cfl={cfl}, not both"
            )
        _check_stability(sc.cfl, sc.refresh, sc.drift, "stepsize_controller StabilityStepping")
    elif isinstance(sc, KinkStepping):
        check_kink_stepping(sc)
    elif sc is not None:
        if not isinstance(sc, diffrax.AbstractStepSizeController):
            raise TypeError(
                "stepsize_controller must be a diffrax.AbstractStepSizeController, a "
                f"StabilityStepping or a KinkStepping, got {type(sc).__name__}"
            )
        check_controller(sc)
    check_tolerances(rtol, atol)
    if dt is not None and not finite_positive(dt):
        raise ValueError(f"dt must be finite and positive, got dt={dt}")
    if cfl is not None:
        _check_stability(cfl, refresh, drift)


class _Plan(NamedTuple):
    """A flow run's validated settings and what follows from them."""

    settings: dict  # the trajectory config's entries
    first: tuple  # (segment, evals) before stability stepping (all along without cfl)
    stable: tuple | None  # (segment, evals) of stability stepping
    edge: float | None  # the solver's stability edge (cfl only)
    targets: list  # save points in log t
    z0: float  # log(1 + t) at the start


def _plan(
    *, clock, solver, stepsize_controller, rtol, atol, dt, cfl, warmup, refresh, drift,
    log_t_max, log_loss_min, saves, log_t_min, log_t0, max_steps, dtype, share=1.0,
) -> _Plan:  # fmt: skip
    """Check ``run_flow``'s arguments (a ``ValueError`` naming the bad one) and set up."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    name = solver_name(solver)  # validates a name
    solver = make_solver(solver)
    if not (math.isfinite(log_t_min) and math.isfinite(log_t_max)):
        raise ValueError(f"log_t_min and log_t_max must be finite, got {log_t_min} and {log_t_max}")
    if log_loss_min is not None and math.isnan(log_loss_min):
        raise ValueError("log_loss_min must be a number or None, got nan")
    if not log_t_max > log_t_min:
        raise ValueError(f"log_t_max must exceed log_t_min = {log_t_min}, got {log_t_max}")
    if log_t0 is not None and not log_t0 < log_t_max:
        raise ValueError(f"log_t0 = {log_t0} must be below log_t_max = {log_t_max}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if dt is not None and cfl is not None:
        raise ValueError("give a fixed step dt or a stability fraction cfl, not both")
    if stepsize_controller is not None and (dt is not None or cfl is not None):
        raise ValueError("give a stepsize_controller, or a fixed step dt, or a cfl: one of them")
    if dt is None and cfl is None and stepsize_controller is None and is_fixed_step(solver):
        raise ValueError(f"solver {name!r} has no error estimate: give a fixed step dt or a cfl")
    edge = None
    if cfl is not None:
        if warmup is not None and is_fixed_step(warmup):
            raise ValueError(f"warmup solver {solver_name(warmup)!r} has no error estimate")
        edge = stability_edge(solver)

    all_steps = int(min(max_steps, 2**31 - 1))
    stable = None
    dtype = np.dtype(dtype).name
    if cfl is None:
        ctrl = _controller(stepsize_controller, dt is not None, rtol, atol, share)
        first = _kept(clock, solver, ctrl, all_steps, dtype)
    else:
        first = (
            None
            if warmup is None
            else _kept(
                clock,
                make_solver(warmup),
                _controller(None, False, rtol, atol, share),
                all_steps,
                dtype,
            )  # fmt: skip
        )
        stable = _kept(clock, solver, diffrax.ConstantStepSize(), int(refresh), dtype)
    settings = dict(
        dynamics="flow", clock=clock, solver=name, rtol=rtol, atol=atol, dt=dt, cfl=cfl,
        warmup=solver_name(warmup) if (cfl is not None and warmup is not None) else None,
 refresh=refresh, drift=drift,
        log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
        log_t0=log_t0, max_steps=max_steps,
    )  # fmt: skip
    if stepsize_controller is not None:
        settings["stepsize_controller"] = type(stepsize_controller).__name__
        # the accuracy asked for is the controller's (the fidelity verdict reads rtol)
        for key in ("rtol", "atol"):
            value = getattr(stepsize_controller, key, None)
            settings[key] = float(value) if isinstance(value, int | float) else None
    targets = [float(x) for x in log_t_grid(log_t_min, log_t_max, saves)]
    if log_t0 is not None:
        targets = [x for x in targets if x > log_t0]
    z0 = 0.0 if log_t0 is None else log1p_of_log_t(log_t0)
    return _Plan(settings, first, stable, edge, targets, z0)


def _start(clock: str, params0, z0: float, dtype):
    """The ODE state ``(theta, [z,] D = 0)`` and clock value at ``log(1 + t) = z0``."""
    d0 = jnp.zeros((), dtype)
    if clock == "loss":
        return (params0, jnp.asarray(z0, dtype), d0), 0.0  # tau: its origin is arbitrary
    return (params0, d0), {"time": math.expm1(z0), "logt": z0}[clock]


def _target_clock(clock: str, target: float) -> tuple[float, float | None]:
    """``(log(1 + t), clock value)`` at the save point ``log t = target`` (the loss
    clock's value is not known in advance: ``None``)."""
    z_target = log1p_of_log_t(float(target))
    if clock == "time":
        c1 = math.exp(float(target))
        if not math.isfinite(c1):
            raise ValueError(
                f"clock 'time' cannot reach log t = {target:g}: use clock 'loss' or 'logt'"
            )
        return z_target, c1
    return z_target, (z_target if clock == "logt" else None)


def _log_t(clock: str, y, c: float) -> float:
    """``log t`` of the state ``y`` at clock value ``c``."""
    if clock == "time":
        return math.log(c) if c > 0 else -math.inf
    return log_t_of_log1p(float(y[1]) if clock == "loss" else c)


def _reached(clock: str, result):
    """Did a segment reach its save point (elementwise for a batch)? On the loss clock the
    save event stopped it; on the others it ran to its end. (Not a comparison of clock
    values: a float32 clock rounds the end point, and a comparison with the float64
    target would then never hold.)"""
    if clock == "loss":
        return result == diffrax.RESULTS.event_occurred
    return result == diffrax.RESULTS.successful


def _select(mask: np.ndarray, new, old):
    """Per run of a batch: ``new`` where ``mask``, else ``old``."""
    return jax.tree.map(
        lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
    )


def _segment_ok(result, stabilised: bool):
    """A segment's diffrax result is a success (elementwise for a batch)."""
    return (
        (result == diffrax.RESULTS.successful)
        | (result == diffrax.RESULTS.event_occurred)
        # stability stepping stops every `refresh` steps to re-set the step
        | ((result == diffrax.RESULTS.max_steps_reached) & stabilised)
    )


def _failure(solver: str, target: float, result, ok: bool, steps: int) -> str:
    why = diffrax.RESULTS[result] if not ok else "non-finite state"
    return f"solver {solver} failed before log t = {target:.6g} ({why}) after {steps} steps"


def _count(totals: dict, n_steps: int, n_acc: int, evals) -> None:
    totals["steps"] += n_steps
    totals["accepted"] += n_acc
    totals["rejected"] += n_steps - n_acc
    totals["grad_evals"] += evals(n_steps)


def _stable_step(eigenvalue: float, drift_ratio: float, cfl: float, edge: float, drift: float):
    """``min(cfl * edge / lambda_max, drift * |theta| / |f(theta)|)``."""
    return min(cfl * edge / max(eigenvalue, 1e-300), drift * drift_ratio)


def _stop_reason(row, log_t, steps, max_steps, log_loss_min) -> tuple[str, str] | None:
    """``(status, message)`` when a run ends at this save point (before its horizon)."""
    if steps >= max_steps:
        return "stopped", f"step budget max_steps = {max_steps} spent at log t = {log_t:.6g}"
    if log_loss_min is not None and row["log_loss"] <= log_loss_min:
        return "completed", f"log loss {row['log_loss']:.6g} <= target {log_loss_min:g}"
    return None


def run_flow(
    objective: Objective,
    params0,
    *,
    clock: str = "loss",
    solver: str | diffrax.AbstractSolver = "tsit5",
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    dt: float | None = None,
    cfl: float | None = None,
    warmup: str = "tsit5",
    refresh: int = 48,
    drift: float = 0.05,
    log_t_max: float = 10.0,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    log_t0: float | None = None,
    max_steps: int = 1_000_000,
    input_span: bool | None = None,
    save_params: bool = False,
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
    resume: bool = False,
) -> Trajectory:
    """Integrate the gradient flow from ``params0`` up to ``log t = log_t_max``.

    **Arguments:**

    - ``clock``: ``"loss"``, ``"time"`` or ``"logt"`` (module docstring).
    - ``solver``: any ``diffrax.AbstractSolver`` (e.g. ``diffrax.Dopri5()``), or a name
      from ``SOLVERS`` (or ``rkcS``); adaptive (PID controller with ``rtol``, ``atol``)
      unless ``stepsize_controller``, ``dt`` or ``cfl`` is given.
    - ``stepsize_controller``: any diffrax step-size controller (a ``PIDController``'s
      norm is applied to the parameters, leaving out the dissipation monitor), or
      ``StabilityStepping(cfl, warmup, refresh, drift)``: ``cfl`` below, as an object;
      or ``KinkStepping(rtol, atol, ...)``: through ReLU kinks event by event, sliding
      where the flow slides (``gflow.dynamics.sliding``; gflow's own MLPs, loss clock).
    - ``dt``: a fixed step in the clock's variable.
    - ``cfl``: stability stepping. Until the first save point below the loss threshold
      the adaptive ``warmup`` solver runs at ``rtol``, ``atol`` (the early fit is
      fast-changing, and a step set by the Jacobian alone is inaccurate there). Then
      ``solver`` runs without error control at
      ``h = min(cfl * edge / lambda_max, drift * |theta| / |f(theta)|)``: ``edge`` is the
      solver's real stability boundary, ``lambda_max`` the top eigenvalue of minus the
      field's Jacobian (Lanczos on Jacobian-vector products, warm-started), and the
      second bound keeps each step's relative parameter change below ``drift``. The
      step is re-set every ``refresh`` steps and at every save point; each
      Jacobian-vector product counts as 2 gradient evaluations. ``gflow run`` uses
      ``ralston`` at 0.14 (``solvers.default_cfl``: chosen from measured accuracy); the
      RKC solvers (``rkcS``) have stable steps growing as S^2 for S evaluations.
      ``warmup=None`` steps by stability from the start (measured inaccurate on the
      default problem: ``benchmarks/RESULTS.md``).
    - ``log_loss_min``: stop at the first save point whose log loss is at or below it.
    - ``saves``: save points evenly spaced in log t on ``[log_t_min, log_t_max]``,
      plus ``t = 0``.
    - ``log_t0``: start at ``t = e^log_t0`` rather than ``t = 0`` (continuing a run);
      save points at or before it are skipped.
    - ``max_steps``: budget of solver steps over the whole run.
    - ``input_span``: integrate a dense first layer in the span of the inputs
      (``gflow.dynamics.span``: the same flow in fewer coordinates, exact up to rounding
      at fixed steps). None: on gflow's MLPs when there are at most half as many samples as
      inputs and the data's rank is at most half the input size (the default problem's
      300 images of 784 pixels); True: whenever the rank is below it; False: never.
      The config's ``input_span`` is the rank used, or None.
    - ``progress``: called with each recorded row.
    - ``checkpoint`` / ``resume``: as in ``run_gd``; the ODE state, clock, step size,
      Lanczos vector and counters are saved at every save point.
    """
    (tr,) = _drive(
        objective, [params0], [0], single=True, clock=clock, solver=solver,
        stepsize_controller=stepsize_controller, rtol=rtol, atol=atol, dt=dt, cfl=cfl,
        warmup=warmup, refresh=refresh, drift=drift, log_t_max=log_t_max,
        log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min, log_t0=log_t0,
        max_steps=max_steps, input_span=input_span, save_params=save_params, config=config,
        progress=progress, checkpoint=checkpoint, resume=resume,
    )  # fmt: skip
    return tr


def _kept(clock: str, solver, controller, steps: int, dtype: str) -> tuple:
    """``(segment, evals, static)``: ``_segment_fn``'s, and the text that (with its
    arguments) determines its program, for keeping it traced (``gflow.cache.Traced``);
    None for a solver or controller of the user's own, whose code the key cannot hold."""
    static = None
    ours = isinstance(controller, diffrax.ConstantStepSize) or (
        type(controller) is diffrax.PIDController and isinstance(controller.norm, _ThetaNorm)
    )
    if ours and type(solver).__module__.split(".")[0] in ("diffrax", "gflow"):
        static = f"flow segment|{clock}|{solver!r}|{controller!r}|{steps}|{dtype}|vmapped"
    return (*_segment_fn(clock, solver, controller, steps, dtype), static)


def _ours(obj: Objective, *_) -> bool:
    """Whether an objective's program is determined by gflow's code and its static fields:
    a model gflow built (every node of its graph a gflow or Flax class) and a gflow loss,
    on one device."""
    from flax import nnx

    if not isinstance(obj.graphdef, nnx.graphlib.GraphDef):
        return False
    if jax.process_count() > 1 or len(obj.x.sharding.device_set) > 1:
        return False  # a sharded program: traced where it runs
    if type(obj.loss).__module__ != "gflow.losses":
        return False
    for node in obj.graphdef.nodes:
        kind = getattr(node, "type", None)
        if not isinstance(kind, type) or kind.__module__.split(".")[0] not in ("gflow", "flax"):
            return False
    return True


def _segment_out(obj, y, *_):
    """The structure of a segment's outputs: ``(y1, c1, result, steps, accepted)``."""
    return jax.tree.structure((y, 0, diffrax.RESULTS.successful, 0, 0))


@functools.cache
def _vmapped(segment_evals_static: tuple):
    """The segment of ``_kept`` over a batch of runs: state, clock, end, first step
    batched (axis 0); objective and save target shared. Its traced program is kept on
    disk (``gflow.cache.Traced``) where ``static`` says what determines it."""
    from gflow.cache import Traced

    segment, evals, static = segment_evals_static
    batched = jax.vmap(segment.__wrapped__, in_axes=(None, 0, 0, 0, 0, None))
    if static is None:
        return eqx.filter_jit(batched), evals
    return Traced(batched, static=static, out_tree=_segment_out, trusted=_ours), evals


@functools.cache
def _vmapped_stiffness(clock: str, layout: tuple):
    """Batched ``(jac_matvec, drift_dt)`` of ``_stiffness_fns`` on flat vectors, for
    parameter pytrees of ``layout`` (``_layout``): cached on it, so that later runs of the
    same model compile nothing, and their traced programs kept (``gflow.cache.Traced``)."""
    jac_matvec, drift_dt = _stiffness_fns(clock)
    treedef, leaves = layout
    unravel = ravel_pytree(
        jax.tree.unflatten(treedef, [np.zeros(shape, dtype) for shape, dtype in leaves])
    )[1]

    def matvec(obj, c, y, v):
        return ravel_pytree(jac_matvec.__wrapped__(obj, c, y, unravel(v)))[0]

    from gflow.cache import Traced

    static = f"stiffness|{clock}|{layout!r}|vmapped"
    return (
        Traced(jax.vmap(matvec, in_axes=(None, 0, 0, 0)), static=static + "|jac",
               out_tree=_one_array, trusted=_ours),
        Traced(jax.vmap(drift_dt.__wrapped__, in_axes=(None, 0, 0, 0)), static=static + "|drift",
               out_tree=_one_array, trusted=_ours),
    )  # fmt: skip


def _one_array(*_):
    return jax.tree.structure(0)


def _layout(params) -> tuple:
    """A hashable description of a parameter pytree: structure, shapes, dtypes."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(np.shape(a)), np.dtype(a.dtype).name) for a in leaves)


@eqx.filter_jit
def _all_finite(y):
    """Per run of a batch: every entry of its state is finite."""
    leaves = [jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1) for a in jax.tree.leaves(y)]
    return functools.reduce(jnp.logical_and, leaves)


def run_flow_seeds(
    objective: Objective,
    params0: list,
    *,
    seeds: list[int],
    clock: str = "loss",
    solver: str | diffrax.AbstractSolver = "tsit5",
    stepsize_controller: diffrax.AbstractStepSizeController | None = None,
    rtol: float = 1e-6,
    atol: float = 1e-9,
    dt: float | None = None,
    cfl: float | None = None,
    warmup: str = "tsit5",
    refresh: int = 48,
    drift: float = 0.05,
    log_t_max: float = 10.0,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    max_steps: int = 1_000_000,
    input_span: bool | None = None,
    save_params: bool = False,
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
    resume: bool = False,
) -> list[Trajectory]:
    """K runs of ``run_flow`` in one vmapped integration: one initialisation per run
    (``seeds`` label them); returns their K trajectories.

    Every segment is one ``diffeqsolve`` vmapped over the runs: each run keeps its own
    clock, step size and step control (a ``lax.while_loop`` under ``vmap`` holds a
    finished run while the others go on), its own switch to stability stepping, Lanczos
    estimate (the K operators in one vmapped product per iteration), failure and stop.
    Each run thus takes the steps ``run_flow(params0[k])`` takes, up to the rounding of
    batched matrix products; on a ReLU network an adaptive solver's accept/reject
    decision at a kink can turn on that rounding, and the runs then agree to the
    solver's tolerance rather than to rounding. ``checkpoint`` / ``resume``: as in
    ``run_flow``, the whole batch's state at every save point.
    """
    if len(params0) != len(seeds) or not seeds:
        raise ValueError(f"give one seed per initialisation, got {len(seeds)} and {len(params0)}")
    return _drive(
        objective, list(params0), list(seeds), single=False, clock=clock, solver=solver,
        stepsize_controller=stepsize_controller, rtol=rtol, atol=atol, dt=dt, cfl=cfl,
        warmup=warmup, refresh=refresh, drift=drift, log_t_max=log_t_max,
        log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min, log_t0=None,
        max_steps=max_steps, input_span=input_span, save_params=save_params, config=config,
        progress=progress, checkpoint=checkpoint, resume=resume,
    )  # fmt: skip


def _with_seed(progress: Callable[[dict], None], seed: int, row: dict) -> None:
    progress({**row, "seed": seed})


def _drive(
    objective: Objective, params0: list, seeds: list, *, single: bool, clock, solver,
    stepsize_controller, rtol, atol, dt, cfl, warmup, refresh, drift, log_t_max,
    log_loss_min, saves, log_t_min, log_t0, max_steps, save_params, config, progress,
    checkpoint, resume, input_span=None, handed=None,
) -> list[Trajectory]:  # fmt: skip
    """The one flow driver: K runs (K = 1 for ``run_flow``) in one vmapped integration
    (``run_flow_seeds``' docstring). ``handed``: ``(monitor, dissipation)`` of a run this
    one continues from ``log_t0`` (a kink run's fallback, ``gflow.dynamics.sliding``): its
    invariant monitors and dissipation integral go on from that run's start, and the
    start itself, not a save point, is not recorded."""
    _check_steps(stepsize_controller, rtol, atol, dt, cfl, refresh, drift)
    if handed is None:  # a handed-over run's start is the state a checked run reached
        for k, p in enumerate(params0):
            check_finite_params(p, "params0" if single else f"params0[{k}]")
    if isinstance(stepsize_controller, KinkStepping):
        if clock != "loss" or dt is not None or cfl is not None or log_t0 is not None:
            raise ValueError(
                "KinkStepping integrates on the loss clock from t = 0, with its own steps: "
                "leave clock, dt, cfl and log_t0 at their defaults"
            )
        if checkpoint is not None:
            raise ValueError("KinkStepping runs are not checkpointed yet: run without one")
        out = []
        for p0, seed in zip(params0, seeds, strict=True):
            cfg, each = dict(config or {}), progress
            if not single:  # a batch's rows name their seed, as the vmapped driver's do
                cfg.update(seed=int(seed), seeds=[int(v) for v in seeds])
                if progress is not None:
                    each = functools.partial(_with_seed, progress, int(seed))
            out.append(run_flow_kinks(
                objective, p0, stepping=stepsize_controller, solver=solver,
                log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves,
                log_t_min=log_t_min, max_steps=max_steps, save_params=save_params,
                config=cfg, progress=each,
            ))  # fmt: skip
        return out
    if isinstance(stepsize_controller, StabilityStepping):
        st, stepsize_controller = stepsize_controller, None
        cfl = st.cfl if st.cfl is not None else default_cfl(solver)
        if cfl is None:
            raise ValueError(
                f"give StabilityStepping a cfl: no default for {solver_name(solver)!r}"
            )
        warmup, refresh, drift = st.warmup, st.refresh, st.drift
    got = checkpoint.restore() if (checkpoint is not None and resume) else None
    # the state's parameters: in the span of the inputs (the checkpoint's choice on resume)
    span = (
        input_span_of(objective, params0, input_span)
        if got is None
        else span_from_arrays(objective, params0, got[0])
    )
    plan = _plan(
        clock=clock, solver=solver, stepsize_controller=stepsize_controller, rtol=rtol,
        atol=atol, dt=dt, cfl=cfl, warmup=warmup, refresh=refresh, drift=drift,
        log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
        log_t0=log_t0, max_steps=max_steps, dtype=objective.dtype,
        share=1.0 if span is None else span.share(clock),
    )  # fmt: skip
    k_runs, dtype = len(seeds), objective.dtype
    first = _vmapped(plan.first) if plan.first is not None else None
    stable = _vmapped(plan.stable) if plan.stable is not None else None
    field = objective if span is None else span.objective  # what the ODE's field reads
    starts0 = params0 if span is None else [span.restrict(p) for p in params0]

    def lane(tree, i):
        return jax.tree.map(lambda a: a[i], tree)

    recs = []
    for s in seeds:
        cfg = {**objective.describe(), **(config or {}), **plan.settings}
        cfg["input_span"] = None if span is None else span.rank
        if not single:
            cfg.update(seed=int(s), seeds=[int(v) for v in seeds])
        recs.append(
            TrajectoryRecorder(
                "flow", cfg, save_params, progress if single else None,
                objective.invariant_reasons(params0[0]),
            )
        )  # fmt: skip
    totals = [{"steps": 0, "accepted": 0, "rejected": 0, "grad_evals": 0} for _ in seeds]

    starts = [_start(clock, p, plan.z0, dtype) for p in starts0]
    y = jax.tree.map(lambda *a: jnp.stack(a), *[st[0] for st in starts])
    if handed is not None:
        for rec in recs:
            rec.monitor = handed[0]
        y = (*y[:-1], y[-1] + jnp.asarray(handed[1], dtype))
    c = np.array([st[1] for st in starts], np.float64)
    dt0: list[float | None] = [dt] * k_runs
    stabilised = np.full(k_runs, cfl is not None and warmup is None)
    alive = np.ones(k_runs, bool)
    status = ["completed"] * k_runs
    message = [f"reached log t = {log_t_max:.6g}"] * k_runs

    def full(params):
        return params if span is None else span.lift_many(params)

    def record(which, log_t=None) -> list[dict]:
        theta = full(y[0])
        q, host_y, host_theta = jax.device_get((quantities_many(objective, theta), y, theta))
        rows = []
        for i in which:
            at = _log_t(clock, lane(host_y, i), float(c[i])) if log_t is None else log_t
            row = recs[i].add(
                totals[i]["accepted"], at,
                lane(q, i), lane(host_theta, i),
                dissipation=float(host_y[-1][i]), grad_evals=float(totals[i]["grad_evals"]),
                solver_steps=float(totals[i]["steps"]), rejected=float(totals[i]["rejected"]),
            )  # fmt: skip
            if progress is not None and not single:
                progress({**row, "seed": int(seeds[i])})
            rows.append(row)
        return rows

    if cfl is not None:
        jac_many, drift_many = _vmapped_stiffness(clock, _layout(starts0[0]))
        dim = ravel_pytree(starts0[0])[0].size
        sq_fixed = jnp.asarray(np.zeros(k_runs) if span is None else span.sq_fixed, dtype)
        warm: list = [None] * k_runs

    def set_stable_steps(todo: np.ndarray) -> None:
        """The ``cfl`` step of each run in ``todo`` (``run_flow``'s ``stable_dt``)."""
        c_ = jnp.asarray(c, dtype)
        eigs = lanczos_top_many(
            lambda v: jac_many(field, c_, y, jnp.asarray(v, dtype)), dim, warm,
            active=todo, **_LANCZOS,
        )  # fmt: skip
        ratios = np.asarray(drift_many(field, c_, y, sq_fixed))
        for i in np.flatnonzero(todo):
            warm[i] = eigs[i].vector
            totals[i]["grad_evals"] += 2 * eigs[i].matvecs + 1
            dt0[i] = _stable_step(eigs[i].value, float(ratios[i]), cfl, plan.edge, drift)

    done = 0  # save points reached
    if got is None:
        if handed is None:
            record(range(k_runs), -math.inf if log_t0 is None else log_t0)
    else:
        arrays, meta = got
        restore_recorders(recs, arrays, meta["recorders"])
        y = unpack("y/", y, arrays)
        c = np.array(meta["c"], np.float64)
        stabilised, alive = np.array(meta["stabilised"]), np.array(meta["alive"])
        dt0, status, message, totals = meta["dt0"], meta["status"], meta["message"], meta["totals"]
        done = meta["done"]
        if cfl is not None:
            warm = [arrays.get(f"warm{i}") for i in range(k_runs)]

    def save_checkpoint():
        if checkpoint is None or not checkpoint.due():
            return
        arrays, metas = recorders_state(recs)
        arrays.update(pack("y/", y))
        if span is not None:
            arrays.update(span.arrays())
        if cfl is not None:
            arrays.update({f"warm{i}": np.asarray(w) for i, w in enumerate(warm) if w is not None})
        meta = dict(
            recorders=metas, c=[float(v) for v in c], stabilised=[bool(v) for v in stabilised],
            alive=[bool(v) for v in alive], dt0=[None if h is None else float(h) for h in dt0],
            status=status, message=message, totals=totals, done=done,
        )  # fmt: skip
        checkpoint.save(done + 1, arrays, meta)

    log_threshold = objective.loss.log_threshold
    blas = one_blas_thread()
    try:
        for target in plan.targets[done:]:
            if not alive.any():
                break
            z_target, c1_all = _target_clock(clock, target)
            for phase in (False, True):  # warm-up / error-controlled runs, then stabilised
                todo = alive & (stabilised == phase)
                while todo.any():
                    segment, evals = stable if phase else first
                    if phase:
                        with timing.phase("flow: stable step"):
                            set_stable_steps(todo)
                    # a run not in `todo` gets a zero-length segment: it stays where it is
                    far = c + _LOSS_SPAN if clock == "loss" else np.full(k_runs, c1_all)
                    c1 = np.where(todo, far, c)
                    # NaN: the controller chooses the first step (_DtFromArgs)
                    h0 = jnp.asarray([math.nan if dt0[i] is None else dt0[i] if todo[i] else 1.0
                                      for i in range(k_runs)], dtype)  # fmt: skip
                    with timing.phase("flow: stepping, stable" if phase else "flow: stepping"):
                        out = segment(
                            field, y, jnp.asarray(c, dtype), jnp.asarray(c1, dtype), h0,
                            jnp.asarray(z_target, dtype),
                        )  # fmt: skip
                        y_new, c_new, result = out[0], out[1], out[2]
                        ok = np.asarray(_segment_ok(result, phase))
                        reached = np.asarray(_reached(clock, result))
                        c_new, n_steps, n_acc, finite = jax.device_get(
                            (c_new, out[3], out[4], _all_finite(y_new))
                        )
                    y = _select(todo & finite, y_new, y)
                    failed = []
                    for i in np.flatnonzero(todo):
                        _count(totals[i], int(n_steps[i]), int(n_acc[i]), evals)
                        if not (ok[i] and finite[i]):
                            status[i] = "failed"
                            message[i] = _failure(
                                solver, target, lane(result, i), bool(ok[i]), totals[i]["steps"]
                            )
                            if finite[i]:
                                c[i] = c_new[i]
                                failed.append(i)
                            alive[i] = todo[i] = False
                            continue
                        if dt is None and not phase and n_acc[i] > 0:
                            dt0[i] = (float(c_new[i]) - c[i]) / int(n_acc[i])
                        c[i] = c_new[i]
                        if reached[i] or totals[i]["steps"] >= max_steps:
                            todo[i] = False
                    if failed:
                        record(failed)  # keep what was reached: its last finite state
            live = np.flatnonzero(alive)
            with timing.phase("flow: save points"):
                rows = record(live)
            for i, row in zip(live, rows, strict=True):
                if cfl is not None and row["log_loss"] < log_threshold:
                    stabilised[i] = True
                stop = _stop_reason(row, row["log_t"], totals[i]["steps"], max_steps, log_loss_min)
                if stop is not None:
                    status[i], message[i] = stop
                    alive[i] = False
            done += 1
            with timing.phase("flow: checkpoints"):
                save_checkpoint()
    except KeyboardInterrupt:
        for i in np.flatnonzero(alive):
            status[i], message[i] = "stopped", "interrupted"
    finally:
        blas.restore_original_limits()
    finals = jax.device_get(full(y[0]))
    return [
        recs[i].finish(lane(finals, i), status[i], message[i], objective) for i in range(k_runs)
    ]
