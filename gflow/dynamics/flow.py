"""Gradient flow on diffrax (THEORY.md, "Dynamics").

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

import math
from collections.abc import Callable
from typing import ClassVar

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from gflow.dynamics.gd import log_t_grid
from gflow.objective import Objective, quantities
from gflow.trajectory import Trajectory, TrajectoryRecorder

__all__ = ["CLOCKS", "SOLVERS", "make_solver", "vector_field", "run_flow", "log_t_of_log1p"]

CLOCKS = ("loss", "time", "logt")


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge-Kutta method, fixed step only (no error estimate).

    The baseline of public gradient-flow codes (fixed RK4 at a step of 1 / sharpness).
    """

    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        b_error=np.zeros(4),
        a_lower=(np.array([0.5]), np.array([0.0, 0.5]), np.array([0.0, 0.0, 1.0])),
    )
    interpolation_cls: ClassVar[Callable] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    def order(self, terms):
        return 4


SOLVERS = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "bosh3": diffrax.Bosh3,
    "heun": diffrax.Heun,
    "midpoint": diffrax.Midpoint,
    "ralston": diffrax.Ralston,
    "euler": diffrax.Euler,
    "rk4": RK4,
    "kvaerno5": diffrax.Kvaerno5,
    "implicit-euler": diffrax.ImplicitEuler,
}
IMPLICIT = ("kvaerno5", "implicit-euler")
FIXED_STEP = ("euler", "rk4")


def make_solver(name: str) -> diffrax.AbstractSolver:
    """A diffrax solver by name (one of ``SOLVERS``)."""
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}") from None


def _evals_per_step(solver) -> tuple[int, int]:
    """(gradient evaluations per step, extra evaluations at a segment's start)."""
    tab = getattr(solver, "tableau", None)
    if isinstance(solver, diffrax.Euler):
        return 1, 0
    if tab is None:
        return 0, 0  # implicit: not counted
    if tab.fsal:
        return tab.num_stages - 1, 1
    return tab.num_stages, 0


def vector_field(clock: str) -> Callable:
    """The ODE right-hand side ``f(clock_value, y, objective)`` for ``clock``."""
    if clock == "time":

        def f(t, theta, obj: Objective):
            ell, g = obj.value_and_grad(theta)
            return jax.tree.map(lambda v: -jnp.exp(ell) * v, g)

    elif clock == "logt":

        def f(s, theta, obj: Objective):
            ell, g = obj.value_and_grad(theta)
            # dt/ds = 1 + t = e^s; e^{ell + s} stays O(1) late in training.
            return jax.tree.map(lambda v: -jnp.exp(ell + s) * v, g)

    elif clock == "loss":

        def f(tau, y, obj: Objective):
            theta, z = y
            ell, g = obj.value_and_grad(theta)
            # dt/dtau = 1/Loss and z = log(1 + t): dz/dtau = e^{-ell - z} (1 + t = e^z).
            return jax.tree.map(jnp.negative, g), jnp.exp(-ell - z)

    else:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    return f


def log_t_of_log1p(z: float) -> float:
    """``log t`` from ``z = log(1 + t)``: ``z + log(-expm1(-z))``, exact for every z."""
    if z <= 0:
        return -math.inf
    return z + math.log(-math.expm1(-z))


def _log1p_of_log_t(log_t: float) -> float:
    """``log(1 + t)`` from ``log t`` without overflow."""
    return float(np.logaddexp(0.0, log_t))


def run_flow(
    objective: Objective,
    params0,
    *,
    clock: str = "loss",
    solver: str = "tsit5",
    rtol: float = 1e-6,
    atol: float = 1e-9,
    dt: float | None = None,
    log_t_max: float = 10.0,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    max_steps: int = 1_000_000,
    save_params: bool = False,
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Trajectory:
    """Integrate the gradient flow from ``params0`` up to ``log t = log_t_max``.

    **Arguments:**

    - ``clock``: ``"loss"``, ``"time"`` or ``"logt"`` (module docstring).
    - ``solver``: a name from ``SOLVERS``; adaptive (PID controller with ``rtol``,
      ``atol``) unless ``dt`` is given, which fixes the step in the clock's variable.
    - ``log_loss_min``: stop at the first save point whose log loss is at or below it.
    - ``saves``: save points evenly spaced in log t on ``[log_t_min, log_t_max]``,
      plus ``t = 0``.
    - ``max_steps``: budget of solver steps over the whole run.
    - ``progress``: called with each recorded row.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    the_solver = make_solver(solver)
    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be positive, got rtol={rtol}, atol={atol}")
    if dt is not None and not dt > 0:
        raise ValueError(f"dt must be positive, got {dt}")
    if not log_t_max > log_t_min:
        raise ValueError(f"log_t_max must exceed log_t_min = {log_t_min}, got {log_t_max}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if dt is None and solver in FIXED_STEP:
        raise ValueError(f"solver {solver!r} has no error estimate: give a fixed step dt")

    dtype = objective.dtype
    field = vector_field(clock)
    # args = (objective, z target of the loss clock's save event) for every clock
    term = diffrax.ODETerm(lambda c, y, args: field(c, y, args[0]))
    if dt is None:
        controller = diffrax.PIDController(rtol=rtol, atol=atol)
    else:
        controller = diffrax.ConstantStepSize()
    per_step, per_start = _evals_per_step(the_solver)
    seg_steps = int(min(max_steps, 2**31 - 1))

    def event_fn(t, y, args, **kwargs):
        obj, z_target = args
        return y[1] - z_target

    if clock == "loss":
        import optimistix as optx

        event = diffrax.Event(event_fn, root_finder=optx.Newton(rtol=1e-12, atol=1e-12))
    else:
        event = None

    @eqx.filter_jit
    def segment(obj, y0, c0, c1, dt0, z_target):
        sol = diffrax.diffeqsolve(
            term,
            the_solver,
            c0,
            c1,
            dt0,
            y0,
            (obj, z_target),
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=controller,
            event=event,
            max_steps=seg_steps,
            throw=False,
        )
        y1 = jax.tree.map(lambda a: a[-1], sol.ys)
        return (
            y1,
            sol.ts[-1],
            sol.result,
            sol.stats["num_steps"],
            sol.stats["num_accepted_steps"],
            sol.stats["num_rejected_steps"],
        )

    cfg = dict(config or {})
    cfg.update(
        dynamics="flow",
        clock=clock,
        solver=solver,
        rtol=rtol,
        atol=atol,
        dt=dt,
        log_t_max=log_t_max,
        log_loss_min=log_loss_min,
        saves=saves,
        log_t_min=log_t_min,
        max_steps=max_steps,
    )
    rec = TrajectoryRecorder("flow", cfg, save_params, progress)

    totals = {"steps": 0, "accepted": 0, "rejected": 0, "grad_evals": 0}

    def theta_of(y):
        return y[0] if clock == "loss" else y

    def record(y, log_t):
        theta = theta_of(y)
        return rec.add(
            totals["accepted"],
            log_t,
            quantities(objective, theta),
            theta,
            grad_evals=float(totals["grad_evals"]),
            solver_steps=float(totals["steps"]),
            rejected=float(totals["rejected"]),
        )

    def _log_t(y, c):
        if clock == "time":
            return math.log(c) if c > 0 else -math.inf
        return log_t_of_log1p(float(y[1]) if clock == "loss" else c)

    if clock == "loss":
        y = (params0, jnp.asarray(0.0, dtype))
        c = 0.0  # tau
    else:
        y = params0
        c = 0.0  # t or s
    row = record(y, -math.inf)
    targets = log_t_grid(log_t_min, log_t_max, saves)
    dt0 = dt
    status, message = "completed", f"reached log t = {log_t_max:.6g}"
    try:
        for target in targets:
            z_target = _log1p_of_log_t(float(target))
            if clock == "time":
                c1 = math.exp(float(target))
                if not math.isfinite(c1):
                    raise ValueError(
                        f"clock 'time' cannot reach log t = {target:g}: use clock 'loss' or 'logt'"
                    )
            elif clock == "logt":
                c1 = z_target
            while True:
                if clock == "loss":
                    # tau to the event is unknown: integrate over a long span, the event stops it.
                    c1 = c + 1e6
                y_new, c_new, result, n_steps, n_acc, n_rej = segment(
                    objective,
                    y,
                    jnp.asarray(c, dtype),
                    jnp.asarray(c1, dtype),
                    None if dt0 is None else jnp.asarray(dt0, dtype),
                    jnp.asarray(z_target, dtype),
                )
                n_steps, n_acc, n_rej = int(n_steps), int(n_acc), int(n_rej)
                totals["steps"] += n_steps
                totals["accepted"] += n_acc
                totals["rejected"] += n_rej
                totals["grad_evals"] += n_steps * per_step + per_start + (2 if dt0 is None else 0)
                ok = (result == diffrax.RESULTS.successful) | (
                    result == diffrax.RESULTS.event_occurred
                )
                if not bool(ok):
                    status = "failed"
                    message = (
                        f"solver {solver} failed before log t = {target:.6g} "
                        f"({diffrax.RESULTS[result]}) after {totals['steps']} steps"
                    )
                    # keep what was reached: the last finite state becomes the last row
                    if np.all([np.all(np.isfinite(a)) for a in jax.tree.leaves(y_new)]):
                        y, c = y_new, float(c_new)
                        record(y, _log_t(y, c))
                    break
                if dt is None and n_acc > 0:
                    dt0 = (float(c_new) - c) / n_acc
                y, c = y_new, float(c_new)
                z_now = float(y[1]) if clock == "loss" else (c if clock == "logt" else None)
                reached = (clock == "time" and c >= c1) or (
                    clock != "time" and z_now >= z_target * (1 - 1e-12)
                )
                if reached or totals["steps"] >= max_steps:
                    break
            if status == "failed":
                break
            log_t = _log_t(y, c)
            row = record(y, log_t)
            if totals["steps"] >= max_steps:
                status, message = (
                    "stopped",
                    f"step budget max_steps = {max_steps} spent at log t = {log_t:.6g}",
                )
                break
            if log_loss_min is not None and row["log_loss"] <= log_loss_min:
                message = f"log loss {row['log_loss']:.6g} <= target {log_loss_min:g}"
                break
    except KeyboardInterrupt:
        status, message = "stopped", "interrupted"
    return rec.finish(theta_of(y), status, message)
