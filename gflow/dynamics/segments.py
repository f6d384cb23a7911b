"""The flow's segments (docs/theory.md, "Dynamics"): one jitted ``diffeqsolve`` from a
save point towards the next, compiled once per clock, solver, controller and step budget
and kept (cached in the process; its traced program on disk, ``gflow.cache.Traced``),
vmapped over a batch of runs; and what a driver reads from a segment's result."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from diffrax._root_finder import use_stepsize_tol

from gflow.dynamics.clock import vector_field
from gflow.dynamics.solvers import evals_per_step
from gflow.objective import Objective

__all__ = [
    "LOSS_SPAN", "ThetaNorm", "make_controller", "segment_fn", "kept", "tolerances", "vmapped",
    "gflow_program", "all_finite", "select_runs", "segment_ok", "reached",
    "failure_message", "count_steps",
]  # fmt: skip

LOSS_SPAN = 1e6  # the loss clock integrates this far in tau; the save event stops it first


class ThetaNorm(eqx.Module):
    """The step-size controller's error norm, an RMS: the dissipation integral D (the
    state's last entry) is a monitor, left out so that carrying it does not change theta's
    steps. ``share``: the fraction of the full state's entries the state carries (a flow
    in the span of the inputs, ``gflow.dynamics.span``, leaves out entries that never
    move); the RMS is taken over all of them, as without the reduction."""

    share: float = eqx.field(static=True, default=1.0)

    def __call__(self, y):
        rms = optx.rms_norm(y[:-1])
        return rms if self.share == 1.0 else rms * math.sqrt(self.share)


def make_controller(
    stepsize_controller, fixed: bool, rtol: float, atol: float, share: float = 1.0
):  # fmt: skip
    """The step-size controller of a segment: the user's (a PID controller's norm made
    to leave out D), else a constant step, else a PID controller at ``rtol``, ``atol``
    (``ThetaNorm(share)``)."""
    if fixed:
        return diffrax.ConstantStepSize()
    if stepsize_controller is None:
        return diffrax.PIDController(rtol=rtol, atol=atol, norm=ThetaNorm(share))
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
    compilation cache. Integration forwards only, so the sign needs no check. A
    ``PIDController`` takes its ``rtol``, ``atol`` from ``args[3]`` where given: one
    program for a run and its error estimate's shadow (``tolerances``)."""

    inner: diffrax.AbstractStepSizeController

    def wrap(self, direction):
        return _DtFromArgs(self.inner.wrap(direction))

    def _at(self, args):
        tols = args[3]
        if tols is None or not isinstance(self.inner, diffrax.PIDController):
            return self.inner
        return eqx.tree_at(lambda c: (c.rtol, c.atol), self.inner, tuple(tols))

    def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
        h, inner = args[2], self._at(args)
        if h is None or isinstance(inner, diffrax.ConstantStepSize):
            return inner.init(terms, t0, t1, y0, h, args, func, error_order)
        # NaN: let the controller choose (as dt0=None would): one program for the first
        # segment and the later ones, which go on with the step reached
        return jax.lax.cond(
            jnp.isnan(h),
            lambda: inner.init(terms, t0, t1, y0, None, args, func, error_order),
            lambda: inner.init(terms, t0, t1, y0, h, args, func, error_order),
        )

    def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order, state):
        return self._at(args).adapt_step_size(
            t0, t1, y0, y1_candidate, args, y_error, error_order, state
        )


def tolerances(controller, solver) -> tuple[float, float] | None:
    """``(rtol, atol)`` of gflow's own ``PIDController`` with an explicit solver, which a
    segment then takes as arguments (``kept`` compiles it with placeholders): None for
    any other controller, whose values stay in its program."""
    if _shared(controller, solver):
        return float(controller.rtol), float(controller.atol)
    return None


def _shared(controller, solver) -> bool:
    return (
        type(controller) is diffrax.PIDController
        and isinstance(controller.norm, ThetaNorm)
        and not isinstance(solver, diffrax.AbstractImplicitSolver)
    )


def _with_controller_tols(solver, controller):
    """An implicit solver's root finder given the adaptive controller's ``rtol``, ``atol``
    and norm where it asks for them (diffrax's ``use_stepsize_tol``, its default), as
    ``diffeqsolve`` would do itself had the controller not been wrapped
    (``_DtFromArgs``)."""
    if not isinstance(solver, diffrax.AbstractImplicitSolver):
        return solver
    if not isinstance(controller, diffrax.PIDController):
        return solver  # refused before any work (driver._check_plan)
    finder = solver.root_finder
    wanted = [a for a in ("rtol", "atol", "norm") if getattr(finder, a) is use_stepsize_tol]
    return eqx.tree_at(
        lambda s: tuple(getattr(s.root_finder, a) for a in wanted),
        solver,
        tuple(getattr(controller, a) for a in wanted),
        is_leaf=lambda x: x is use_stepsize_tol,
    )


def segment_fn(clock: str, solver, controller, steps: int, dtype: str = "float64"):
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
    the_solver = _with_controller_tols(the_solver, controller)
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
    def segment(obj, y0, c0, c1, dt0, z_target, tols=None):
        sol = diffrax.diffeqsolve(
            term,
            the_solver,
            c0,
            c1,
            None,  # the first step (and the tolerances) are in args (_DtFromArgs)
            y0,
            (obj, z_target, dt0, tols),
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


def reached(clock: str, result):
    """Did a segment reach its save point (elementwise for a batch)? On the loss clock the
    save event stopped it; on the others it ran to its end. (Not a comparison of clock
    values: a float32 clock rounds the end point, and a comparison with the float64
    target would then never hold.)"""
    if clock == "loss":
        return result == diffrax.RESULTS.event_occurred
    return result == diffrax.RESULTS.successful


def select_runs(mask: np.ndarray, new, old):
    """Per run of a batch: ``new`` where ``mask``, else ``old``."""
    return jax.tree.map(
        lambda a, b: jnp.where(mask.reshape((-1,) + (1,) * (a.ndim - 1)), a, b), new, old
    )


def segment_ok(result, stabilised: bool):
    """A segment's diffrax result is a success (elementwise for a batch)."""
    return (
        (result == diffrax.RESULTS.successful)
        | (result == diffrax.RESULTS.event_occurred)
        # stability stepping stops every `refresh` steps to re-set the step
        | ((result == diffrax.RESULTS.max_steps_reached) & stabilised)
    )


def failure_message(solver: str, target: float, result, ok: bool, steps: int) -> str:
    why = diffrax.RESULTS[result] if not ok else "non-finite state"
    return f"solver {solver} failed before log t = {target:.6g} ({why}) after {steps} steps"


def count_steps(totals: dict, n_steps: int, n_acc: int, evals) -> None:
    totals["steps"] += n_steps
    totals["accepted"] += n_acc
    totals["rejected"] += n_steps - n_acc
    totals["grad_evals"] += evals(n_steps)


def kept(clock: str, solver, controller, steps: int, dtype: str) -> tuple:
    """``(segment, evals, static)``: ``segment_fn``'s, and the text that (with its
    arguments) determines its program, for keeping it traced (``gflow.cache.Traced``);
    None for a solver or controller of the user's own, whose code the key cannot hold.
    gflow's own ``PIDController`` is compiled with placeholder tolerances, the call's
    ``tols`` (``tolerances``) in their place: a run and its shadow share one program."""
    static = None
    ours = isinstance(controller, diffrax.ConstantStepSize) or (
        type(controller) is diffrax.PIDController and isinstance(controller.norm, ThetaNorm)
    )
    if _shared(controller, solver):
        controller = eqx.tree_at(lambda c: (c.rtol, c.atol), controller, (1.0, 1.0))
    if ours and type(solver).__module__.split(".")[0] in ("diffrax", "gflow"):
        static = f"flow segment|{clock}|{solver!r}|{controller!r}|{steps}|{dtype}|vmapped"
    return (*segment_fn(clock, solver, controller, steps, dtype), static)


def gflow_program(obj: Objective, *_) -> bool:
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
def vmapped(segment_evals_static: tuple):
    """The segment of ``kept`` over a batch of runs: state, clock, end, first step
    batched (axis 0); objective and save target shared. Its traced program is kept on
    disk (``gflow.cache.Traced``) where ``static`` says what determines it."""
    from gflow.cache import Traced

    segment, evals, static = segment_evals_static
    batched = jax.vmap(segment.__wrapped__, in_axes=(None, 0, 0, 0, 0, None, None))
    if static is None:
        return eqx.filter_jit(batched), evals
    return Traced(batched, static=static, out_tree=_segment_out, trusted=gflow_program), evals


@eqx.filter_jit
def all_finite(y):
    """Per run of a batch: every entry of its state is finite."""
    leaves = [jnp.all(jnp.isfinite(a).reshape(a.shape[0], -1), axis=1) for a in jax.tree.leaves(y)]
    return functools.reduce(jnp.logical_and, leaves)
