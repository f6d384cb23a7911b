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
import warnings
from collections.abc import Callable

import diffrax
import equinox as eqx

from gflow.checkpoint import Checkpointer
from gflow.dynamics.clock import CLOCKS, log_t_of_log1p, vector_field
from gflow.dynamics.driver import FlowSettings, drive
from gflow.dynamics.sliding import KinkStepping, check_kink_stepping, run_flow_kinks
from gflow.dynamics.solvers import (  # noqa: F401  (RK4, SOLVERS re-exported)
    DEFAULT_ACCURACY,
    DEFAULT_TOL,
    KINK_SOLVER,
    RK4,
    SOLVERS,
    check_controller,
    check_tolerances,
    default_cfl,
    default_solver,
    finite_positive,
    make_solver,
    real_scalar,
    solver_name,
)
from gflow.dynamics.stability import ADAPTIVE_CFL, StabilityStepping, check_stability
from gflow.models import check_finite_params
from gflow.objective import Objective
from gflow.trajectory import Trajectory

__all__ = [
    "CLOCKS", "SOLVERS", "make_solver", "vector_field", "run_flow", "run_flow_seeds",
    "log_t_of_log1p", "StabilityStepping", "KinkStepping", "stepping",
]  # fmt: skip


def stepping(
    solver, *, rtol=None, atol=None, dt=None, cfl=None, warmup=None, refresh=None, drift=None
) -> tuple:
    """The ``(stepsize_controller, dt0)`` objects that a flat stepping of the old
    ``run_flow`` (and ``gflow run``'s ``--rtol / --atol / --dt / --cfl``) stands for, on
    ``solver``: a fixed step ``dt``: ``diffrax.ConstantStepSize()`` at ``dt0 = dt``; a
    ``cfl`` or another stability setting, or a solver with a default cfl
    (``solvers.default_cfl``): ``StabilityStepping`` with them (the tolerances its
    warm-up's); else ``diffrax.PIDController(rtol, atol)``. Tolerances not given: the
    defaults, ``solvers.DEFAULT_TOL``."""
    tols = dict(rtol=DEFAULT_TOL[0] if rtol is None else rtol,
                atol=DEFAULT_TOL[1] if atol is None else atol)  # fmt: skip
    # no solver named: the default one (default_solver), which has a default cfl
    with_cfl = solver is None or default_cfl(solver) is not None
    stable = {k: v for k, v in dict(cfl=cfl, warmup=warmup, refresh=refresh, drift=drift).items()
              if v is not None}  # fmt: skip
    if dt is not None:
        if not finite_positive(dt):
            raise ValueError(f"dt must be finite and positive, got dt={dt}")
        if stable or rtol is not None or atol is not None:
            raise ValueError("a fixed step dt takes no cfl, warmup, refresh, drift, rtol or atol")
        return diffrax.ConstantStepSize(), dt
    if stable or with_cfl:
        return StabilityStepping(**stable, **tols), None
    return diffrax.PIDController(**tols), None


def _object_form(controller, dt0) -> str:
    """How to write ``controller`` (and ``dt0``) in a call of ``run_flow``."""
    if isinstance(controller, diffrax.ConstantStepSize):
        return f"stepsize_controller=diffrax.ConstantStepSize(), dt0={dt0!r}"
    if isinstance(controller, diffrax.PIDController):
        return (
            f"stepsize_controller=diffrax.PIDController(rtol={controller.rtol!r}, "
            f"atol={controller.atol!r})"
        )
    given = {k: v for k, v in controller._asdict().items()
             if v != StabilityStepping._field_defaults[k]}  # fmt: skip
    fields = ", ".join(f"{k}={v!r}" for k, v in given.items())
    return f"stepsize_controller=StabilityStepping({fields})"


def _from_flat(solver, controller, dt0, flat: dict) -> tuple:
    """``(controller, dt0)`` from the flat arguments given (a ``FutureWarning`` naming
    their object form; ``stepping``), merged into a ``StabilityStepping`` given beside
    them (its warm-up tolerances; a field given twice is a ``ValueError``)."""
    given = {k: v for k, v in flat.items() if v is not None}
    if not given:
        return controller, dt0
    if "dt" in given and dt0 is not None:
        raise ValueError(f"give the fixed step once: dt0={dt0} or dt={given['dt']}, not both")
    if isinstance(controller, StabilityStepping):
        twice = [k for k in given if k not in ("rtol", "atol")]
        if twice:
            raise ValueError(
                f"give the stability stepping's {', '.join(twice)} once: in "
                f"StabilityStepping or as {', '.join(f'{k}={given[k]}' for k in twice)}, "
                "not both"
            )
        new = controller._replace(**given)
    elif controller is not None:
        raise ValueError(
            f"give the step control once: stepsize_controller={type(controller).__name__}(...) "
            f"or {', '.join(f'{k}={v}' for k, v in given.items())}, not both"
        )
    else:
        new, dt0 = stepping(solver, **given)
    warnings.warn(
        f"run_flow's {', '.join(f'{k}=' for k in given)} are stepping objects now: "
        f"{_object_form(new, dt0)}; the flat arguments go in the next release",
        FutureWarning, stacklevel=4,
    )  # fmt: skip
    return new, dt0


def _default_pid(controller) -> bool:
    """A ``PIDController`` with nothing set but its tolerances: gflow's own, whose norm
    measures the parameters in full coordinates (``segments.ThetaNorm``)."""
    if type(controller) is not diffrax.PIDController:
        return False
    plain = diffrax.PIDController(rtol=controller.rtol, atol=controller.atol)
    return bool(eqx.tree_equal(controller, plain))


def _settings(objective, solver, controller, dt0, flat: dict, **rest) -> FlowSettings:
    """The one translation of ``run_flow``'s stepping (objects, or the flat arguments of
    old) and solver (None: ``KINK_SOLVER`` under ``KinkStepping``, else
    ``default_solver``) into the driver's settings, checked before any work: a
    ``ValueError`` naming the controller and the value."""
    if dt0 is not None and not finite_positive(dt0):
        raise ValueError(f"dt0 must be finite and positive, got dt0={dt0}")
    if solver is None:
        kinks = isinstance(controller, KinkStepping)
        solver = KINK_SOLVER if kinks else default_solver(objective)
    controller, dt0 = _from_flat(solver, controller, dt0, flat)
    if controller is None:
        controller, dt0 = stepping(solver, dt=dt0)
    s = FlowSettings(solver=solver, **rest)
    if isinstance(controller, KinkStepping):
        check_kink_stepping(controller)
        return s._replace(stepsize_controller=controller, dt=dt0)  # dt0: refused there
    if isinstance(controller, StabilityStepping):
        sc = controller
        owner = "stepsize_controller StabilityStepping"
        check_stability(sc.cfl, sc.refresh, sc.drift, owner)
        check_tolerances(sc.rtol, sc.atol, owner)
        if dt0 is not None:
            raise ValueError("StabilityStepping sets its own steps: leave dt0 out")
        cfl = sc.cfl if sc.cfl is not None else default_cfl(solver)
        if cfl is None:
            raise ValueError(
                f"give StabilityStepping a cfl: no default for {solver_name(solver)!r}"
            )
        adapt = sc.cfl is None  # from the solver's default, held to the accuracy
        return s._replace(cfl=min(cfl, ADAPTIVE_CFL[1]) if adapt else cfl, warmup=sc.warmup,
                          refresh=sc.refresh, drift=sc.drift, rtol=sc.rtol, atol=sc.atol,
                          adapt=adapt)  # fmt: skip
    if not isinstance(controller, diffrax.AbstractStepSizeController):
        raise TypeError(
            "stepsize_controller must be a diffrax.AbstractStepSizeController, a "
            f"StabilityStepping or a KinkStepping, got {type(controller).__name__}"
        )
    check_controller(controller)
    if isinstance(controller, diffrax.ConstantStepSize):
        if dt0 is None:
            raise ValueError("a diffrax.ConstantStepSize needs the step: give dt0")
        return s._replace(dt=dt0)
    if dt0 is not None:
        raise ValueError(
            f"dt0 is the fixed step of a diffrax.ConstantStepSize; a "
            f"{type(controller).__name__} chooses its own steps: leave dt0 out"
        )
    if _default_pid(controller):
        return s._replace(rtol=float(controller.rtol), atol=float(controller.atol))
    return s._replace(stepsize_controller=controller)


def run_flow(
    objective: Objective,
    params0,
    *,
    clock: str = "loss",
    solver: str | diffrax.AbstractSolver | None = None,
    stepsize_controller=None,
    dt0: float | None = None,
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
    rtol: float | None = None,
    atol: float | None = None,
    dt: float | None = None,
    cfl: float | None = None,
    warmup: str | None = None,
    refresh: int | None = None,
    drift: float | None = None,
) -> Trajectory:
    """Integrate the gradient flow from ``params0`` up to ``log t = log_t_max``. With no
    solver or stepping given, the flow ``gflow run`` runs: Ralston (RKC on a smooth
    field) under ``StabilityStepping()``.

    **Arguments:**

    - ``clock``: ``"loss"``, ``"time"`` or ``"logt"`` (module docstring).
    - ``solver``: any ``diffrax.AbstractSolver`` (e.g. ``diffrax.Dopri5()``), or a name
      from ``SOLVERS`` (or ``rkcS``). None: ``gflow run``'s, Ralston, or RKC with 10
      stages where the objective's field is smooth (linear activations), Bogacki-Shampine
      under ``KinkStepping`` (``solvers.default_solver``).
    - ``stepsize_controller``: how the steps are set. None: the solver's default
      (``stepping``): ``StabilityStepping()`` for a solver with a default cfl (Ralston,
      RK4, the RKC family, ...), else ``diffrax.PIDController`` at ``solvers.DEFAULT_TOL``.

      * ``StabilityStepping(cfl, warmup, refresh, drift, rtol, atol)``: until the first
        save point below the loss threshold the adaptive ``warmup`` solver runs at
        ``rtol``, ``atol`` (the early fit is fast-changing, and a step set by the
        Jacobian alone is inaccurate there). Then ``solver`` runs without error control
        at ``h = min(cfl * edge / lambda_max, drift * |theta| / |f(theta)|)``: ``edge``
        is the solver's real stability boundary, ``lambda_max`` the top eigenvalue of
        minus the field's Jacobian (Lanczos on Jacobian-vector products, warm-started),
        and the second bound keeps each step's relative parameter change below
        ``drift``. The step is re-set every ``refresh`` steps and at every save point;
        each Jacobian-vector product counts as 2 gradient evaluations. ``cfl=None``:
        chosen at every save point from the error estimate so that it stays within
        ``accuracy`` (``gflow.dynamics.driver``'s ``_control``; a segment whose estimate
        went past it is redone at a smaller cfl), starting from the solver's default
        (Ralston's 0.14); a number: that cfl all along. The columns ``cfl``,
        ``steps_<bound>`` (what bound the steps: the warm-up's ``tolerance``,
        ``stability``, ``accuracy``, ``drift``, ``save`` points; they add up to
        ``solver_steps``) and ``redone`` say how it went.
      * ``diffrax.PIDController(rtol, atol)``: error control all along (its norm over
        the parameters, leaving out the dissipation monitor); with nothing else set,
        gflow's own, whose norm measures the parameters in full coordinates when the
        flow runs in the span of the inputs.
      * ``diffrax.ConstantStepSize()`` with ``dt0``: a fixed step in the clock's
        variable.
      * ``KinkStepping(rtol, atol, ...)``: through ReLU kinks event by event, sliding
        where the flow slides (``gflow.dynamics.sliding``; gflow's own MLPs, loss clock).
      * any other diffrax controller, as it is.
    - ``dt0``: the fixed step of a ``diffrax.ConstantStepSize`` (or of no controller).
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
      controller of one's own other than a ``PIDController``. Off, a
      ``StabilityStepping(cfl=None)`` keeps its starting cfl.
    - ``accuracy``: the margin's error, relative to its scale, that the flow fidelity
      verdict holds the estimate to (``gflow.theory.fidelity``) and the cfl is chosen
      for; in (0, 1).
    - ``progress``: called with each recorded row.
    - ``checkpoint`` / ``resume``: as in ``run_gd``; the ODE state, clock, step size,
      Lanczos vector and counters are saved at every save point (the shadow's too).
    - ``rtol``, ``atol``, ``dt``, ``cfl``, ``warmup``, ``refresh``, ``drift``: the flat
      stepping of old, for one release: forwarded as the objects ``stepping`` gives,
      with a ``FutureWarning`` that names them.
    """
    settings = _settings(
        objective, solver, stepsize_controller, dt0, dict(rtol=rtol, atol=atol, dt=dt, cfl=cfl,
        warmup=warmup, refresh=refresh, drift=drift), clock=clock, log_t_max=log_t_max,
        log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min, log_t0=log_t0,
        max_steps=max_steps, input_span=input_span, save_params=save_params,
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
    solver: str | diffrax.AbstractSolver | None = None,
    stepsize_controller=None,
    dt0: float | None = None,
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
    rtol: float | None = None,
    atol: float | None = None,
    dt: float | None = None,
    cfl: float | None = None,
    warmup: str | None = None,
    refresh: int | None = None,
    drift: float | None = None,
) -> list[Trajectory]:
    """K runs of ``run_flow`` in one vmapped integration: one initialisation per run
    (``seeds`` label them); returns their K trajectories.

    Every segment is one ``diffeqsolve`` vmapped over the runs: each run keeps its own
    clock, step size and step control (a ``lax.while_loop`` under ``vmap`` holds a
    finished run while the others go on), its own switch to stability stepping, Lanczos
    estimate (the K operators in one vmapped product per iteration), cfl, failure and
    stop. Each run thus takes the steps ``run_flow(params0[k])`` takes, up to the
    rounding of batched matrix products; on a ReLU network an adaptive solver's
    accept/reject decision at a kink can turn on that rounding, and the runs then agree
    to the solver's tolerance rather than to rounding. ``checkpoint`` / ``resume``: as
    in ``run_flow``, the whole batch's state at every save point.
    """
    if len(params0) != len(seeds) or not seeds:
        raise ValueError(f"give one seed per initialisation, got {len(seeds)} and {len(params0)}")
    settings = _settings(
        objective, solver, stepsize_controller, dt0, dict(rtol=rtol, atol=atol, dt=dt, cfl=cfl,
        warmup=warmup, refresh=refresh, drift=drift), clock=clock, log_t_max=log_t_max,
        log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min, max_steps=max_steps,
        input_span=input_span, save_params=save_params, error_estimate=error_estimate,
        accuracy=accuracy,
    )  # fmt: skip
    return _dispatch(objective, list(params0), list(seeds), settings, False, config, progress,
                     checkpoint, resume)  # fmt: skip


def _with_seed(progress: Callable[[dict], None], seed: int, row: dict) -> None:
    progress({**row, "seed": seed})


def _dispatch(
    objective: Objective, params0: list, seeds: list, s: FlowSettings, single: bool,
    config, progress, checkpoint, resume,
) -> list[Trajectory]:  # fmt: skip
    """Check the start, then run by the stepping: ``KinkStepping`` event by event
    (``gflow.dynamics.sliding``, one run at a time), else segment by segment
    (``gflow.dynamics.driver``)."""
    if not (real_scalar(s.accuracy) is not None and 0 < s.accuracy < 1):
        raise ValueError(f"accuracy must be a number in (0, 1), got accuracy={s.accuracy}")
    for k, p in enumerate(params0):
        check_finite_params(p, "params0" if single else f"params0[{k}]")
    if isinstance(s.stepsize_controller, KinkStepping):
        return _kinks(objective, params0, seeds, s, single, config, progress, checkpoint)
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
