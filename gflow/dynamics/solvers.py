"""ODE solvers for the gradient flow: diffrax's, fixed-step RK4, and Runge-Kutta-Chebyshev.

The flow of a ReLU network is only piecewise smooth and slides along the switching
surfaces (``benchmarks/RESULTS.md``), so every Runge-Kutta method converges at first
order on it, whatever its classical order. What a method then buys per gradient
evaluation is the size of a *stable* step: RK4 is stable for ``h * lambda_max <= 2.79``
at 4 evaluations a step; the s-stage RKC method for ``h * lambda_max <= 0.65 s^2`` at s
evaluations, because the field's Jacobian is minus a Hessian, with a real spectrum.

``rkcS`` (any S from 2 to 200, e.g. ``rkc5``, ``rkc10``) is the second-order RKC method of
Sommeijer, Shampine and Verwer (1997), damping 2/13, written as an explicit Butcher
tableau so that diffrax's ``diffeqsolve``, ``SaveAt`` and events work unchanged.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from typing import ClassVar

import diffrax
import numpy as np

__all__ = [
    "RK4",
    "SOLVERS",
    "FIXED_STEP",
    "IMPLICIT",
    "make_solver",
    "solver_name",
    "is_fixed_step",
    "stability_edge",
    "rkc_tableau",
    "evals_per_step",
    "default_cfl",
    "DEFAULT_TOL",
    "DEFAULT_ACCURACY",
    "DEFAULT_SOLVER",
    "default_solver",
    "check_tolerances",
    "check_controller",
]


class RK4(diffrax.AbstractERK):
    """The classical 4th-order Runge-Kutta method, fixed step only (no error estimate).

    The baseline of public gradient-flow codes (fixed RK4 at a step of 1 / sharpness).
    """

    # F(y1) as a fifth, first-same-as-last stage: free on the next step, and it makes the
    # dense output (cubic Hermite from F(y0), F(y1)) right, which the loss clock's
    # save-point events root-find on.
    tableau: ClassVar[diffrax.ButcherTableau] = diffrax.ButcherTableau(
        c=np.array([0.5, 0.5, 1.0, 1.0]),
        b_sol=np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6, 0.0]),
        b_error=np.zeros(5),
        a_lower=(
            np.array([0.5]),
            np.array([0.0, 0.5]),
            np.array([0.0, 0.0, 1.0]),
            np.array([1 / 6, 1 / 3, 1 / 3, 1 / 6]),
        ),
    )
    interpolation_cls: ClassVar[Callable] = diffrax.ThirdOrderHermitePolynomialInterpolation.from_k

    stability_edge: ClassVar[float] = 2.785293563

    def order(self, terms):
        return 4


def rkc_tableau(stages: int, damping: float = 2 / 13) -> tuple[np.ndarray, np.ndarray, float]:
    """The s-stage second-order RKC method as ``(A, c, beta)``.

    ``A[j, k]``: weight of ``h F(Y_k)`` in ``Y_j - y0`` for ``j = 1..s`` (row ``s`` is the
    solution's weights), ``c``: the row sums, ``beta``: the stability boundary (the method is
    stable for real ``h * lambda`` in ``[-beta, 0]``). The Chebyshev recurrence of
    Sommeijer, Shampine & Verwer (1997) is unrolled into Butcher form; the weights stay
    bounded (about 2 in magnitude) for every ``s``.
    """
    s = int(stages)
    if s < 2:
        raise ValueError(f"RKC needs at least 2 stages, got {s}")
    w0 = 1 + damping / s**2
    T, dT, d2T = np.zeros(s + 1), np.zeros(s + 1), np.zeros(s + 1)
    T[0], T[1], dT[1] = 1.0, w0, 1.0
    for j in range(2, s + 1):
        T[j] = 2 * w0 * T[j - 1] - T[j - 2]
        dT[j] = 2 * T[j - 1] + 2 * w0 * dT[j - 1] - dT[j - 2]
        d2T[j] = 4 * dT[j - 1] + 2 * w0 * d2T[j - 1] - d2T[j - 2]
    w1 = dT[s] / d2T[s]
    b = np.zeros(s + 1)
    b[2:] = d2T[2:] / dT[2:] ** 2
    b[0] = b[1] = b[2]
    A = np.zeros((s + 1, s + 1))
    A[1, 0] = b[1] * w1
    for j in range(2, s + 1):
        mu = 2 * b[j] * w0 / b[j - 1]
        nu = -b[j] / b[j - 2]
        mu_t = 2 * b[j] * w1 / b[j - 1]
        gamma_t = -(1 - b[j - 1] * T[j - 1]) * mu_t
        A[j] = mu * A[j - 1] + nu * A[j - 2]
        A[j, j - 1] += mu_t
        A[j, 0] += gamma_t
    beta = (w0 + 1) * d2T[s] / dT[s]
    return A, A.sum(axis=1), float(beta)


@functools.cache
def _rkc_base() -> type:
    class RKCBase(diffrax.AbstractERK):
        """The Runge-Kutta-Chebyshev family (``rkcS``)."""

    return RKCBase


@functools.cache
def _rkc_class(stages: int) -> type:
    A, c, beta = rkc_tableau(stages)
    s = stages
    # s RKC stages, then F(y1) as an (s+1)-th, first-same-as-last stage: free on the next
    # step, and it gives RKC's error estimate 0.8 (y0 - y1) + 0.4 h (F(y0) + F(y1)).
    b_sol = np.append(A[s, :s], 0.0)
    b_err = -0.8 * b_sol
    b_err[0] += 0.4
    b_err[s] += 0.4
    tab = diffrax.ButcherTableau(
        c=np.append(c[1:s], 1.0),
        b_sol=b_sol,
        b_error=b_err,
        a_lower=tuple(A[j, :j] for j in range(1, s)) + (A[s, :s],),
    )

    class RKC(_rkc_base()):
        __doc__ = f"""{s}-stage second-order Runge-Kutta-Chebyshev with its embedded error
        estimate, stable for ``h * lambda_max <= {beta:.4g}`` on a real negative spectrum."""
        tableau: ClassVar[diffrax.ButcherTableau] = tab
        stability_edge: ClassVar[float] = beta
        stages: ClassVar[int] = s
        interpolation_cls: ClassVar[Callable] = (
            diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
        )

        def order(self, terms):
            return 2

        def error_order(self, terms):
            return 3  # the estimate is the O(h^3) local error of a 2nd-order step

    RKC.__name__ = RKC.__qualname__ = f"RKC{s}"
    return RKC


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
    "rkc5": _rkc_class(5),
    "rkc10": _rkc_class(10),
    "rkc20": _rkc_class(20),
    "kvaerno5": diffrax.Kvaerno5,
    "implicit-euler": diffrax.ImplicitEuler,
}
IMPLICIT = ("kvaerno5", "implicit-euler")
FIXED_STEP = ("euler", "rk4")
_RKC = re.compile(r"rkc(\d+)")

# real stability boundary: stable for h * lambda_max <= edge when the Jacobian's
# spectrum is real and non-positive (minus a Hessian)
_EDGES = {"euler": 2.0, "heun": 2.0, "midpoint": 2.0, "ralston": 2.0, "rk4": 2.785293563}


def _rkc_stages(name: str) -> int | None:
    m = _RKC.fullmatch(name)
    if m is None:
        return None
    s = int(m.group(1))
    if not 2 <= s <= 200:
        raise ValueError(f"RKC stages must be in 2..200, got {name!r}")
    return s


def make_solver(name) -> diffrax.AbstractSolver:
    """A solver by name: one of ``SOLVERS``, or ``rkcS`` for any S in 2..200. A
    ``diffrax.AbstractSolver`` instance is returned as it is."""
    if isinstance(name, diffrax.AbstractSolver):
        return name
    if not isinstance(name, str):
        raise TypeError(
            f"solver must be a name or a diffrax.AbstractSolver, got {type(name).__name__}"
        )
    s = _rkc_stages(name)
    if s is not None:
        return _rkc_class(s)()
    try:
        return SOLVERS[name]()
    except KeyError:
        raise ValueError(
            f"unknown solver {name!r}; expected one of {sorted(SOLVERS)} or rkcS (S = 2..200)"
        ) from None


def solver_name(solver) -> str:
    """The name a run's config records: the shorthand of one of ``SOLVERS`` (or ``rkcS``),
    else the solver's class name."""
    if isinstance(solver, str):
        make_solver(solver)
        return solver
    solver = make_solver(solver)
    stages = getattr(type(solver), "stages", None)
    if isinstance(solver, _rkc_base()) and stages:
        return f"rkc{stages}"
    for name, cls in SOLVERS.items():
        if type(solver) is cls:
            return name
    return type(solver).__name__


def is_fixed_step(solver) -> bool:
    """Whether the solver (a name or an instance) has no error estimate, so needs a fixed
    ``dt`` or a ``cfl``: Euler, or a Runge-Kutta tableau whose error weights are zero."""
    if isinstance(solver, str) and solver in FIXED_STEP:
        return True
    solver = make_solver(solver)
    if isinstance(solver, diffrax.Euler):
        return True
    tab = getattr(solver, "tableau", None)
    return tab is not None and not np.any(np.asarray(tab.b_error))


def stability_edge(solver) -> float:
    """Largest stable ``h * lambda_max`` on a real non-positive spectrum, for a name or an
    instance: a solver class's ``stability_edge`` attribute, else the known table."""
    edge = getattr(type(make_solver(solver)), "stability_edge", None)
    if edge is not None:
        return float(edge)
    name = solver_name(solver)
    try:
        return _EDGES[name]
    except KeyError:
        raise ValueError(
            f"no stability edge known for solver {name!r}; use one of {sorted(_EDGES)} or "
            "rkcS, or give the solver class a stability_edge attribute"
        ) from None


# gflow run's flow tolerances (rtol, atol): its adaptive solver's, and the warm-up's of
# stability stepping before the loss threshold
DEFAULT_TOL = (3e-5, 3e-8)
# the flow's default solvers (``default_solver``): Ralston where kinks bind the step (there
# every method is first order, so per evaluation the two-stage method's short steps win),
# RKC with 10 stages on a smooth field, where the stability edge binds (its stable step
# grows as S^2 for S evaluations): on a linear model to log t = 1000 it takes 10,472
# evaluations against Ralston's 68,696, for the same error; on the default ReLU problem
# 4,994 against 3,634, and its estimate past the accuracy (benchmarks/RESULTS.md, "The
# cfl chosen from the estimate"). Through the kinks event by event: Bogacki-Shampine.
DEFAULT_SOLVER, SMOOTH_SOLVER, KINK_SOLVER = "ralston", "rkc10", "bosh3"


def default_solver(objective) -> str:
    """The flow's solver for ``objective`` when none is named: ``SMOOTH_SOLVER`` where
    its field is known to be smooth (``Objective.smooth``: linear activations), else
    ``DEFAULT_SOLVER``."""
    return SMOOTH_SOLVER if getattr(objective, "smooth", None) is True else DEFAULT_SOLVER
# the flow's error, relative to the normalized margin's scale, that the fidelity verdict
# holds a run's error estimate to (gflow.theory.fidelity): on the default problem to log
# t = 30, gflow run's stepping is within 7e-5 of the references at every save point and
# its estimate, at most 1.4e-4, 1 to 2.3 times its error (benchmarks/RESULTS.md)
DEFAULT_ACCURACY = 2e-4


def real_scalar(v) -> float | None:
    """A real scalar's value; None for anything else (a bool, several entries, text)."""
    if isinstance(v, bool):
        return None
    try:
        a = np.asarray(v)
    except Exception:  # not array-like: not a number
        return None
    if a.shape != () or a.dtype.kind not in "iuf":
        return None
    return float(a)


def finite_positive(v) -> bool:
    """Whether ``v`` is a real scalar in (0, inf)."""
    r = real_scalar(v)
    return r is not None and 0 < r < math.inf


def positive_int(v) -> bool:
    """Whether ``v`` is an integer >= 1 (a bool is not)."""
    return not isinstance(v, bool) and isinstance(v, int | np.integer) and v >= 1


def check_tolerances(rtol, atol, owner: str | None = None) -> None:
    """Step control's tolerances, a ``ValueError`` naming ``owner`` and the value unless
    ``rtol`` is a finite number in (0, 1) and ``atol`` a finite number >= 0. ``atol = 0``
    is pure relative control, which diffrax allows and which is well defined here (the
    parameters are never all zero); ``rtol`` must be positive because gflow reads it as
    the accuracy the run asked for (``theory``'s invariant tolerance ``rtol + 2 eps N``),
    and below 1 to ask for any accuracy at all."""
    where = f"{owner}: " if owner else ""
    r = real_scalar(rtol)
    if r is None or not 0 < r < 1:
        raise ValueError(f"{where}rtol must be a finite number in (0, 1), got rtol={rtol}")
    a = real_scalar(atol)
    if a is None or not 0 <= a < math.inf:
        raise ValueError(f"{where}atol must be a finite number >= 0, got atol={atol}")


def check_controller(controller) -> None:
    """A diffrax step-size controller's settings, checked before any work (a
    ``ValueError`` naming the controller and the value): a ``PIDController``'s
    tolerances (``check_tolerances``) and ``dtmin`` / ``dtmax`` (positive, or None); a
    ``ClipStepSizeController``'s inner controller's. Other controllers pass as they are."""
    if isinstance(controller, diffrax.ClipStepSizeController):
        check_controller(controller.controller)
        return
    if not isinstance(controller, diffrax.PIDController):
        return
    owner = f"stepsize_controller {type(controller).__name__}"
    check_tolerances(controller.rtol, controller.atol, owner)
    for key in ("dtmin", "dtmax"):
        value = getattr(controller, key)
        if value is not None and not (real_scalar(value) or 0.0) > 0:
            raise ValueError(f"{owner}: {key} must be positive or None, got {key}={value}")


def default_cfl(solver) -> float | None:
    """The stability fraction ``gflow run`` (and ``run_flow``'s ``StabilityStepping()``)
    starts ``solver`` at when given no ``--dt`` or ``--cfl``, to choose it from there by the
    error estimate (within ``stability.ADAPTIVE_CFL``); ``None`` for error-controlled
    solvers. Chosen from measured accuracy on the default
    problem (``benchmarks/flow_accuracy.py``, every save point to log t = 30 against
    three references): the two-stage methods (``ralston``, ``midpoint``, ``heun``) at
    0.14 and RK4 at 0.2 keep the normalized margin within 1e-4 of its scale. On a ReLU
    network the switching surfaces make every method first order, so the error falls
    with the step, not with the order: per gradient evaluation, a two-stage method's
    steps are half as long as RK4's and its balance drift half as large. RKC: 0.5
    (weakly damped near its edge); Euler: 0.9 (GD-like, not accurate)."""
    name = solver_name(solver)
    if _rkc_stages(name) is not None:
        return 0.5
    if name in ("ralston", "midpoint", "heun"):
        return 0.14
    return {"rk4": 0.2, "euler": 0.9}.get(name)


def evals_per_step(solver) -> tuple[int, int]:
    """(gradient evaluations per step, extra evaluations at a segment's start). An
    implicit solver's count is its stages': the Newton iterations and the Jacobian its
    root finder forms (one Jacobian-vector product per parameter) are not counted."""
    tab = getattr(solver, "tableau", None)
    if isinstance(solver, diffrax.Euler | diffrax.ImplicitEuler):
        return 1, 0
    if tab is None:
        return 0, 0  # implicit: not counted
    if tab.fsal:
        return tab.num_stages - 1, 1
    return tab.num_stages, 0
