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
from collections.abc import Callable

import diffrax

from gflow.checkpoint import Checkpointer
from gflow.dynamics.clock import CLOCKS, log_t_of_log1p, vector_field
from gflow.dynamics.driver import FlowSettings, drive
from gflow.dynamics.sliding import KinkStepping, check_kink_stepping, run_flow_kinks
from gflow.dynamics.solvers import (  # noqa: F401  (RK4, SOLVERS re-exported)
    DEFAULT_ACCURACY,
    RK4,
    SOLVERS,
    check_controller,
    check_tolerances,
    default_cfl,
    finite_positive,
    make_solver,
    solver_name,
)
from gflow.dynamics.stability import StabilityStepping, check_stability
from gflow.models import check_finite_params
from gflow.objective import Objective
from gflow.trajectory import Trajectory

__all__ = [
    "CLOCKS", "SOLVERS", "make_solver", "vector_field", "run_flow", "run_flow_seeds",
    "log_t_of_log1p", "StabilityStepping", "KinkStepping",
]  # fmt: skip


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
        check_stability(sc.cfl, sc.refresh, sc.drift, "stepsize_controller StabilityStepping")
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
        check_stability(cfl, refresh, drift)


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
    error_estimate: bool = True,
    accuracy: float = DEFAULT_ACCURACY,
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
    - ``error_estimate``: integrate a shadow of the run beside it, at twice its steps
      (cfl, dt) and 4 times its tolerances, and record at every save point the
      envelope of their difference: ``param_error`` (relative to rho) and
      ``margin_error`` (of the normalized margin), an estimate of the run's global error
      that sees the kinks (docs/theory.md, "The flow's own error"), and the shadow's
      evaluations (``shadow_evals``). Not for ``KinkStepping`` runs yet, nor a step-size
      controller of one's own other than a ``PIDController``.
    - ``accuracy``: the margin's error, relative to its scale, that the flow fidelity
      verdict holds the estimate to (``gflow.theory.fidelity``).
    - ``progress``: called with each recorded row.
    - ``checkpoint`` / ``resume``: as in ``run_gd``; the ODE state, clock, step size,
      Lanczos vector and counters are saved at every save point (the shadow's too).
    """
    settings = FlowSettings(
        clock=clock, solver=solver, stepsize_controller=stepsize_controller, rtol=rtol,
        atol=atol, dt=dt, cfl=cfl, warmup=warmup, refresh=refresh, drift=drift,
        log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
        log_t0=log_t0, max_steps=max_steps, input_span=input_span, save_params=save_params,
        error_estimate=error_estimate, accuracy=accuracy,
    )  # fmt: skip
    (tr,) = _dispatch(objective, [params0], [0], settings, True, config, progress,
                      checkpoint, resume)  # fmt: skip
    return tr


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
    error_estimate: bool = True,
    accuracy: float = DEFAULT_ACCURACY,
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
    settings = FlowSettings(
        clock=clock, solver=solver, stepsize_controller=stepsize_controller, rtol=rtol,
        atol=atol, dt=dt, cfl=cfl, warmup=warmup, refresh=refresh, drift=drift,
        log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
        max_steps=max_steps, input_span=input_span, save_params=save_params,
        error_estimate=error_estimate, accuracy=accuracy,
    )  # fmt: skip
    return _dispatch(objective, list(params0), list(seeds), settings, False, config, progress,
                     checkpoint, resume)  # fmt: skip


def _with_seed(progress: Callable[[dict], None], seed: int, row: dict) -> None:
    progress({**row, "seed": seed})


def _dispatch(
    objective: Objective, params0: list, seeds: list, s: FlowSettings, single: bool,
    config, progress, checkpoint, resume,
) -> list[Trajectory]:  # fmt: skip
    """Check the settings and the start, then run by the stepping the controller object
    names: ``KinkStepping`` event by event (``gflow.dynamics.sliding``, one run at a
    time), else segment by segment (``gflow.dynamics.driver``; ``StabilityStepping``:
    its settings as the flat ``cfl``, ``warmup``, ``refresh``, ``drift``)."""
    _check_steps(s.stepsize_controller, s.rtol, s.atol, s.dt, s.cfl, s.refresh, s.drift)
    for k, p in enumerate(params0):
        check_finite_params(p, "params0" if single else f"params0[{k}]")
    sc = s.stepsize_controller
    if isinstance(sc, KinkStepping):
        return _kinks(objective, params0, seeds, s, single, config, progress, checkpoint)
    if isinstance(sc, StabilityStepping):
        cfl = sc.cfl if sc.cfl is not None else default_cfl(s.solver)
        if cfl is None:
            raise ValueError(
                f"give StabilityStepping a cfl: no default for {solver_name(s.solver)!r}"
            )
        s = s._replace(stepsize_controller=None, cfl=cfl, warmup=sc.warmup,
                       refresh=sc.refresh, drift=sc.drift)  # fmt: skip
    return drive(objective, params0, seeds, s, single=single, config=config,
                 progress=progress, checkpoint=checkpoint, resume=resume)  # fmt: skip


def _kinks(objective, params0, seeds, s: FlowSettings, single, config, progress, checkpoint):
    """``KinkStepping`` runs, one after the other (a batch's rows name their seed)."""
    if s.clock != "loss" or s.dt is not None or s.cfl is not None or s.log_t0 is not None:
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
            objective, p0, stepping=s.stepsize_controller, solver=s.solver,
            log_t_max=s.log_t_max, log_loss_min=s.log_loss_min, saves=s.saves,
            log_t_min=s.log_t_min, max_steps=s.max_steps, save_params=s.save_params,
            config=cfg, progress=each,
        ))  # fmt: skip
    return out
