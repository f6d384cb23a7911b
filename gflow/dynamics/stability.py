"""Stability stepping (docs/theory.md, "What integrating the flow costs"): past the
loss threshold, steps at a fraction ``cfl`` of the solver's stability edge over the
field's top eigenvalue (Lanczos on Jacobian-vector products), bounded by a relative
parameter drift; the settings object ``StabilityStepping`` and the pieces that set the
step."""

from __future__ import annotations

import functools
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gflow.dynamics.clock import vector_field
from gflow.dynamics.segments import gflow_program
from gflow.dynamics.solvers import DEFAULT_TOL, finite_positive, positive_int, real_scalar

__all__ = [
    "StabilityStepping", "check_stability", "stiffness_fns", "vmapped_stiffness", "LANCZOS",
    "stable_step", "layout", "ADAPTIVE_CFL",
]  # fmt: skip

LANCZOS = dict(iters=12, tol=1e-3)  # the cfl step's eigenvalue: 3 digits are enough
# the range the error estimate holds an adaptive cfl in (gflow.dynamics.driver._control):
# at most 0.45, so that its shadow, at twice the cfl, stays within the stability edge
# with a margin for Lanczos' estimate of the top eigenvalue (from below)
ADAPTIVE_CFL = (1 / 64, 0.45)


class StabilityStepping(NamedTuple):
    """gflow's stability stepping as a ``stepsize_controller`` for ``run_flow``: the
    adaptive ``warmup`` solver at ``rtol``, ``atol`` until the loss threshold, then the
    solver's steps at ``cfl`` of its stability edge over the field's top eigenvalue,
    bounded by ``drift`` relative parameter change, re-set every ``refresh`` steps.
    ``cfl=None`` (``gflow run``'s default): from the solver's default
    (``solvers.default_cfl``, e.g. 0.14 for Ralston), then chosen at every save point
    from the flow's error estimate to hold it to the run's accuracy, within
    ``ADAPTIVE_CFL``; a number: that cfl all along. ``warmup=None``: stability stepping
    from the start."""

    cfl: float | None = None
    warmup: str | None = "tsit5"
    refresh: int = 48
    drift: float = 0.05
    rtol: float = DEFAULT_TOL[0]
    atol: float = DEFAULT_TOL[1]


def check_stability(cfl, refresh, drift, owner: str | None = None) -> None:
    """Stability stepping's settings (``run_flow``'s or a ``StabilityStepping``'s): a
    ``ValueError`` naming ``owner`` and the value. ``cfl`` None: the solver's default."""
    where = f"{owner}: " if owner else ""
    if cfl is not None and not 0 < (real_scalar(cfl) or 0.0) <= 1:
        raise ValueError(f"{where}cfl must be in (0, 1], got cfl={cfl}")
    if not positive_int(refresh):
        raise ValueError(f"{where}refresh must be an integer >= 1, got refresh={refresh!r}")
    if not finite_positive(drift):
        raise ValueError(f"{where}drift must be finite and positive, got drift={drift}")


@functools.cache
def stiffness_fns(clock: str):
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


def stable_step(eigenvalue: float, drift_ratio: float, cfl: float, edge: float, drift: float):
    """``min(cfl * edge / lambda_max, drift * |theta| / |f(theta)|)``."""
    return min(cfl * edge / max(eigenvalue, 1e-300), drift * drift_ratio)


@functools.cache
def vmapped_stiffness(clock: str, layout: tuple):
    """Batched ``(jac_matvec, drift_dt)`` of ``stiffness_fns`` on flat vectors, for
    parameter pytrees of ``layout`` (``layout``): cached on it, so that later runs of the
    same model compile nothing, and their traced programs kept (``gflow.cache.Traced``)."""
    jac_matvec, drift_dt = stiffness_fns(clock)
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
               out_tree=_one_array, trusted=gflow_program),
        Traced(jax.vmap(drift_dt.__wrapped__, in_axes=(None, 0, 0, 0)), static=static + "|drift",
               out_tree=_one_array, trusted=gflow_program),
    )  # fmt: skip


def _one_array(*_):
    return jax.tree.structure(0)


def layout(params) -> tuple:
    """A hashable description of a parameter pytree: structure, shapes, dtypes."""
    leaves, treedef = jax.tree.flatten(params)
    return treedef, tuple((tuple(np.shape(a)), np.dtype(a.dtype).name) for a in leaves)
