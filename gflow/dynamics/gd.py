"""Discrete dynamics on optax: full-batch GD and mini-batch SGD (docs/theory.md, "Dynamics").

Schedules:

* ``constant``: ``theta <- theta - h grad Loss``; the step is formed as
  ``h * e^{log Loss} * grad log Loss`` so the gradient never overflows (it underflows to
  zero with the loss, which is what float64 GD does).
* ``loss-based`` (the paper's): ``eta_k = alpha_k / Loss(theta_k)``, so the update is
  ``alpha_k * grad log Loss`` and never under- or overflows; ``alpha_0 = 0.1``; after an
  epoch whose loss did not go up (``<=``, as the official code accepts)
  ``alpha <- alpha * 2^(1/5)``; after one whose loss went up
  or became non-finite ``alpha <- alpha / 2^(1/10)`` and the epoch is rolled back; the run
  stops once ``alpha < 1e-50``.

The matched clock is ``t = sum of step sizes``, kept as ``log t`` (``logaddexp``) so it
never overflows. Steps run inside a jitted ``lax.while_loop`` between save points, which
are spaced evenly in ``log t`` (plus the initial point and the first step). An epoch is
one step for full-batch GD and ``N // batch_size`` steps for SGD (the remainder of the
seeded permutation is dropped); SGD uses the unbiased estimate ``(N/B) grad(batch sum
loss)`` of the sum-loss gradient and, for the loss-based schedule, the loss at the start
of the epoch as the paper's "frame".

Full-batch GD also estimates the sharpness ``lambda_max(Hessian of Loss)`` along the run
(``sharpness_every``): each estimate is the top Ritz value of ``Hess Loss / Loss = Hess(log
Loss) + g g^T`` (``g = grad log Loss``, finite when ``Loss`` underflows) on a Krylov space of
``SHARPNESS_VECTORS`` Hessian-vector products started from the previous estimate's Ritz
vector, computed as a Rayleigh quotient ``y^T A y / y^T y``: a lower bound of
``lambda_max`` whether or not it has converged. The first product shares its pass with the
step's gradient (``jax.jvp`` of ``value_and_grad``), except under the loss-based schedule,
whose rolled-back epochs (about 2 in 3) would waste it: there the estimate is made before
the step, once per parameters. The record gets ``sharpness``,
``step_sharpness = eta lambda_max(Hess Loss)`` (what edge-of-stability plots show against
2) and, over the steps since the previous save point, ``step_sharpness_max`` and
``step_condition_max = max eta_t lambda_t log(1/L_t)``, from which ``gflow.theory.gd_scope``
judges the GD theorem's step condition (S5) at every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from gflow.checkpoint import (
    Checkpointer,
    pack,
    recorders_state,
    restore_recorders,
    unpack,
)
from gflow.dynamics.clock import log_t_grid, one_blas_thread, quantities_many
from gflow.models import check_finite_params
from gflow.objective import Objective
from gflow.quantities import sq_norm
from gflow.trajectory import Trajectory, TrajectoryRecorder

__all__ = [
    "SCHEDULES",
    "GDState",
    "run_gd",
    "run_gd_seeds",
    "LossBased",
    "UP",
    "DOWN",
    "ALPHA_MIN",
    "SHARPNESS_VECTORS",
    "top_ritz",
]

SCHEDULES = ("constant", "loss-based")
UP = 2.0 ** (1 / 5)
DOWN = 2.0 ** (1 / 10)
ALPHA_MIN = 1e-50
RUNNING, STOP_ALPHA, STOP_NONFINITE = 0, 1, 2
SHARPNESS_VECTORS = 3  # Hessian-vector products per sharpness estimate (a Krylov space)
SHARPNESS_START_ROUNDS = 10  # restarts of that estimate at the initial parameters


class GDState(NamedTuple):
    params: Any
    opt_state: Any
    log_loss: jax.Array  # full-batch log Loss at params
    grad: Any  # full-batch grad log Loss at params (full-batch GD only)
    log_t: jax.Array
    step: jax.Array
    alpha: jax.Array  # lr for constant, alpha for loss-based
    log_eta: jax.Array  # log of the last accepted step size
    key: jax.Array
    grad_evals: jax.Array  # full-gradient equivalents
    rejected: jax.Array  # epochs rolled back
    stop: jax.Array  # RUNNING / STOP_ALPHA / STOP_NONFINITE
    # sum of d tau * ||grad log Loss||^2 over the accepted steps (d tau = eta * Loss): the
    # Euler sum of the flow's dissipation integral (gflow.invariants; full batch only)
    dissipation: jax.Array
    # the sharpness (full batch, sharpness_every > 0; else NaN / -inf / 0 and no vector):
    sharpness: jax.Array  # Rayleigh quotient of Hess Loss / Loss at params (NaN: not there)
    sharp_vec: jax.Array  # (d,) its unit vector, the next estimate's start ((1,) if none)
    step_sharpness_max: jax.Array  # max eta_t lambda_t over the steps since the last save
    step_condition_max: jax.Array  # max eta_t lambda_t log(1/L_t) over the same steps
    sharpness_steps: jax.Array  # steps whose eta_t lambda_t entered those maxima


SHARPNESS_COLUMNS = (
    "sharpness", "step_sharpness", "step_sharpness_max", "step_condition_max", "sharpness_steps",
)  # fmt: skip


def _eta_lambda(log_eta: float, log_loss: float, lam: float) -> float:
    """``eta lambda_max(Hess Loss) = eta Loss lam`` (``lam`` of ``Hess Loss / Loss``) on
    the host, in log space: ``eta Loss`` alone over- or underflows where the product does
    not; ``inf`` past float64's range, NaN where a factor is not defined."""
    log_eta, log_loss, lam = float(log_eta), float(log_loss), float(lam)
    if math.isnan(lam) or math.isnan(log_eta + log_loss):
        return math.nan
    if lam == 0.0 or log_eta + log_loss == -math.inf:
        return 0.0
    x = log_eta + log_loss + math.log(abs(lam))
    try:
        return math.copysign(math.exp(x), lam)
    except OverflowError:
        return math.copysign(math.inf, lam)


def _or_nan(v) -> float:
    """A running maximum as recorded: NaN when no step entered it (still ``-inf``)."""
    v = float(v)
    return math.nan if v == -math.inf else v


def _finite_tree(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)]))


def _tree_select(pred, a, b):
    return jax.tree.map(lambda u, v: jnp.where(pred, u, v), a, b)


def _runs_select(pred, a, b):
    """``_tree_select`` per run: ``pred`` of shape (K,), leaves with a leading K axis."""
    return jax.tree.map(
        lambda u, v: jnp.where(pred.reshape(pred.shape + (1,) * (u.ndim - 1)), u, v), a, b
    )


def top_ritz(matvec, v0, vectors: int, first=None):
    """The top Ritz pair of a symmetric operator on the Krylov space ``span{v0, A v0, ...,
    A^(vectors-1) v0}`` (Lanczos with full re-orthogonalisation, jittable): ``(value,
    vector)``, the vector of unit norm.

    ``value`` is formed as the Rayleigh quotient ``y^T (A y) / y^T y`` of the returned
    vector ``y``, with ``A y`` the same combination of the products as ``y`` is of the
    basis: a lower bound of ``lambda_max(A)`` (up to rounding) however far from converged,
    and the algebraic top, not the largest in magnitude. ``first``: ``A v0 / |v0|`` when
    already computed. A breakdown (an invariant subspace) leaves the later vectors out.
    """
    q = v0 / jnp.linalg.norm(v0)
    qs, ws = [q], []
    for j in range(vectors):
        w = first if (j == 0 and first is not None) else matvec(qs[j])
        ws.append(w)
        if j + 1 == vectors:
            break
        r = w
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            r = r - sum((u @ r) * u for u in qs)
        b = jnp.linalg.norm(r)
        ok = b > 1e-10 * jnp.linalg.norm(w)
        qs.append(jnp.where(ok, r / jnp.where(ok, b, 1.0), jnp.zeros_like(r)))
    Q, W = jnp.stack(qs), jnp.stack(ws)  # (m, d)
    T = Q @ W.T
    T = 0.5 * (T + T.T)
    # a left-out (zero) vector gets a diagonal entry below T[0, 0] <= the top: never chosen
    valid = jnp.sum(Q * Q, axis=1) > 0.5
    low = T[0, 0] - 1.0 - jnp.abs(T[0, 0])
    T = jnp.where(valid[:, None] & valid[None, :], T, 0.0) + jnp.diag(jnp.where(valid, 0.0, low))
    s = jnp.linalg.eigh(T)[1][:, -1]
    y, Ay = s @ Q, s @ W
    yy = y @ y
    return (y @ Ay) / yy, y / jnp.sqrt(yy)


def _sharpness_matvec(obj: Objective, params, g_flat):
    """``v -> (Hess log Loss + g g^T) v = (Hess Loss / Loss) v`` on flat vectors: the
    Hessian of ``Loss`` over ``Loss``, which stays finite when ``Loss`` underflows."""
    unravel = ravel_pytree(params)[1]

    def matvec(v):
        hv = jax.jvp(obj.grad_log_loss, (params,), (unravel(v),))[1]
        return ravel_pytree(hv)[0] + g_flat * (g_flat @ v)

    return matvec


def _sharpness_at(obj: Objective, params, g, v0, rounds: int = 1):
    """``(lambda, vector)`` at ``params`` (``g``: ``grad log Loss`` there): ``rounds``
    restarts of ``top_ritz`` from ``v0``, each from the previous Ritz vector."""
    mv = _sharpness_matvec(obj, params, ravel_pytree(g)[0])

    def one(_, carry):
        return top_ritz(mv, carry[1], SHARPNESS_VECTORS)

    lam, vec = top_ritz(mv, v0, SHARPNESS_VECTORS)
    return jax.lax.fori_loop(1, rounds, one, (lam, vec)) if rounds > 1 else (lam, vec)


def _refreshed(obj: Objective, s: GDState, which) -> GDState:
    """``s`` with its sharpness estimated at its parameters where ``which``."""
    lam, vec = _sharpness_at(obj, s.params, s.grad, s.sharp_vec)
    return s._replace(sharpness=jnp.where(which, lam.astype(s.sharpness.dtype), s.sharpness),
                      sharp_vec=jnp.where(which, vec, s.sharp_vec))  # fmt: skip


def _step_and_sharpness(obj: Objective, params, v0):
    """``(log Loss, grad log Loss, lambda, vector)`` at ``params``: the step's gradient and
    the first Hessian-vector product in one forward-over-reverse pass."""
    flat, unravel = ravel_pytree(params)
    q = v0 / jnp.linalg.norm(v0)
    (ell, g), (_, hq) = jax.jvp(obj.value_and_grad, (params,), (unravel(q.astype(flat.dtype)),))
    g_flat = ravel_pytree(g)[0]
    mv = _sharpness_matvec(obj, params, g_flat)
    first = ravel_pytree(hq)[0] + g_flat * (g_flat @ q)
    lam, vec = top_ritz(mv, q, SHARPNESS_VECTORS, first=first)
    return ell, g, lam, vec


def _log_eta_lambda(log_eta, ell, lam):
    """``(log |eta Loss lam|, sign)``: ``eta lambda_max(Hess Loss)`` with ``lam`` the
    sharpness of ``Hess Loss / Loss``, kept in log space (``eta Loss`` alone over- or
    underflows where the product does not)."""
    return log_eta + ell + jnp.log(jnp.abs(lam)), jnp.sign(lam)


def _step_condition(s: GDState, log_eta):
    """The sharpness maxima of ``s`` after a step of size ``e^log_eta`` from its
    parameters, counted when its sharpness was estimated there: ``eta lambda`` and ``eta
    lambda log(1/L)``. Where ``L >= 1`` the latter is ``+inf`` when ``lambda > 0`` (there
    ``mu(L) = log(1/L(t0)) / (2 log(1/L))`` is not positive, below any positive step) and
    ``-inf`` otherwise (a lower bound ``<= 0`` says nothing)."""
    lam, ell = s.sharpness, s.log_loss
    log_x, sign = _log_eta_lambda(log_eta, ell, lam)
    x = sign * jnp.exp(log_x)
    u = -ell
    c = sign * jnp.exp(log_x + jnp.log(jnp.where(u > 0, u, 1.0)))
    # where L >= 1 a lambda <= 0 (a lower bound) tells nothing: -inf, never a violation
    c = jnp.where(u > 0, c, jnp.where(lam > 0, jnp.inf, -jnp.inf))
    seen = ~jnp.isnan(x) & ~jnp.isnan(c)
    return (
        jnp.where(seen, jnp.maximum(s.step_sharpness_max, x), s.step_sharpness_max),
        jnp.where(seen, jnp.maximum(s.step_condition_max, c), s.step_condition_max),
        s.sharpness_steps + seen.astype(s.sharpness_steps.dtype),
    )


class _Stepper(NamedTuple):
    """How a run's epochs step (``_make_epoch``); fixed for the run.

    **Fields:**

    - ``opt``: the optax transformation that applies the steps: the user's, or ``sgd``
      with its learning rate injected at each step.
    - ``custom``: whether ``opt`` is the user's (``schedule == "optax"``).
    - ``gradient``: what a user's ``opt`` is fed, the gradient of the sum loss
      (``"loss"``) or of its log (``"log_loss"``).
    - ``loss_based``: the loss-based schedule (accept / roll-back by the loss).
    - ``batch_size``: ``None`` for full-batch GD, else SGD's mini-batch size.
    - ``n``: the number of samples.
    - ``log_ub``: ``log loss_ub`` (``inf``: no bound).
    - ``sharpness``: whether full-batch steps keep the sharpness maxima.
    """

    opt: Any
    custom: bool
    gradient: str
    loss_based: bool
    batch_size: int | None
    n: int
    log_ub: float
    sharpness: bool


class _Proposal(NamedTuple):
    """An epoch's steps from a state before they are accepted or rolled back
    (``_full_batch`` / ``_mini_batch``, judged by ``_epoch``).

    **Fields:**

    - ``sharpness`` / ``sharp_vec``: the sharpness estimate at the new parameters (NaN:
      none there) and its vector.
    - ``maxima``: the new ``(step_sharpness_max, step_condition_max, sharpness_steps)``;
      ``None``: the state's, unchanged.
    - ``params`` / ``opt_state``: after the steps.
    - ``log_loss`` / ``grad``: the full-batch ``log Loss`` (and its gradient, full batch
      only) at the new parameters.
    - ``finite``: whether the epoch may be accepted (finite loss and gradient; for
      loss-based SGD also no batch past ``loss_ub``).
    - ``log_eta``: the log of the last step's size.
    - ``steps``: the steps taken (1, or ``N // batch_size``).
    - ``log_t``: the clock after the steps.
    - ``dissipation``: the dissipation sum after the steps.
    """

    sharpness: jax.Array
    sharp_vec: jax.Array
    maxima: tuple | None
    params: Any
    opt_state: Any
    log_loss: jax.Array
    grad: Any
    finite: jax.Array
    log_eta: jax.Array
    steps: int
    log_t: jax.Array
    dissipation: jax.Array


def _make_epoch(
    schedule: str, batch_size: int | None, n: int, optimizer=None, gradient: str = "loss",
    loss_ub: float | None = None, sharpness: bool = False,
):  # fmt: skip
    """One epoch: ``epoch(objective, state, due)`` -> state, with accept / roll-back.
    ``optimizer``: a user's optax transformation (``schedule == "optax"``), fed the
    gradient of the sum loss (``gradient="loss"``) or of its log (``"log_loss"``).
    ``loss_ub``: loss-based SGD rolls the epoch back as soon as a mini-batch's mean loss
    exceeds ``loss_ub`` times the frame's (the data's mean loss at the epoch's start), as
    the official code does (its ``loss_ub``, 600 on MNIST). ``sharpness``: full-batch GD
    keeps the sharpness maxima over its steps; ``due`` (None: never) says whether to
    estimate the sharpness at the new parameters. Returns ``(opt, epoch)``."""
    custom = optimizer is not None
    opt = optimizer if custom else optax.inject_hyperparams(optax.sgd)(learning_rate=1.0)
    stepper = _Stepper(
        opt=opt, custom=custom, gradient=gradient, loss_based=schedule == "loss-based",
        batch_size=batch_size, n=n, log_ub=math.inf if loss_ub is None else math.log(loss_ub),
        sharpness=sharpness,
    )  # fmt: skip
    return opt, functools.partial(_epoch, stepper)


def _apply_update(st: _Stepper, params, opt_state, direction, lr):
    """``(params, opt_state, updates)`` after one step of ``st.opt`` along ``direction``
    (learning rate ``lr`` unless the optimizer is the user's)."""
    if not st.custom:
        hyper = {**opt_state.hyperparams, "learning_rate": lr}
        opt_state = opt_state._replace(hyperparams=hyper)
    updates, opt_state = st.opt.update(direction, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, updates


def _arc_log_eta(updates, log_grad_norm):
    """The step on the flow's clock: ``|d theta| / |grad Loss|`` (``d theta / dt = -grad
    Loss`` on the flow); for plain GD it is the learning rate."""
    return 0.5 * jnp.log(sq_norm(updates)) - log_grad_norm


def _full_batch(st: _Stepper, obj: Objective, s: GDState, due) -> _Proposal:
    """One full-batch GD step from ``s`` (``due``: as in ``_make_epoch``)."""
    ell, g = s.log_loss, s.grad
    if st.custom:
        direction = g if st.gradient == "log_loss" else jax.tree.map(lambda v: jnp.exp(ell) * v, g)
        params, opt_state, updates = _apply_update(st, s.params, s.opt_state, direction, s.alpha)
        log_eta = _arc_log_eta(updates, ell + 0.5 * jnp.log(sq_norm(g)))
    elif st.loss_based:
        # eta = alpha / Loss: the update alpha * grad log Loss never over/underflows.
        direction, log_eta = g, jnp.log(s.alpha) - ell
    else:
        direction, log_eta = jax.tree.map(lambda v: jnp.exp(ell) * v, g), jnp.log(s.alpha)
    if not st.custom:
        params, opt_state, _ = _apply_update(st, s.params, s.opt_state, direction, s.alpha)
    if due is None:
        ell_new, g_new = obj.value_and_grad(params)
        lam, vec = jnp.full((), jnp.nan, ell.dtype), s.sharp_vec
    else:
        ell_new, g_new, lam, vec = _step_and_sharpness(obj, params, s.sharp_vec)
        lam, vec = jnp.where(due, lam.astype(ell.dtype), jnp.nan), jnp.where(due, vec, s.sharp_vec)
    sq = sq_norm(g)
    dissipated = s.dissipation + jnp.exp(log_eta + ell) * sq  # d tau = eta * Loss
    maxima = _step_condition(s, log_eta) if st.sharpness else None
    log_t = jnp.logaddexp(s.log_t, log_eta)
    # a NaN clock (an optimizer's step of 0 / 0 on the flow's clock) fails the step as a
    # non-finite loss does: otherwise the run would neither move nor end
    finite = jnp.isfinite(ell_new) & _finite_tree(g_new) & ~jnp.isnan(log_t)
    return _Proposal(
        sharpness=lam, sharp_vec=vec, maxima=maxima, params=params, opt_state=opt_state,
        log_loss=ell_new, grad=g_new, finite=finite, log_eta=log_eta, steps=1, log_t=log_t,
        dissipation=dissipated,
    )  # fmt: skip


def _mini_batch(st: _Stepper, obj: Objective, s: GDState, due) -> _Proposal:
    """One SGD epoch from ``s``: ``N // batch_size`` steps over a seeded permutation
    (``due``: unused, SGD keeps no sharpness)."""
    b, n = st.batch_size, st.n
    nb = n // b
    key, sub = jax.random.split(s.key)
    batches = jax.random.permutation(sub, n)[: nb * b].reshape(nb, b)
    frame = s.log_loss
    log_scale = math.log(n / b)  # (N/B) * batch sum loss estimates the sum loss

    def one(carry, idx):
        params, opt_state, log_t, over = carry
        sub_obj = eqx.tree_at(lambda o: (o.x, o.y), obj, (obj.x[idx], obj.y[idx]))
        ell_b, g_b = sub_obj.value_and_grad(params)
        # the batch's mean loss over the frame's (the data's mean at the epoch's start)
        over = over | (log_scale + ell_b - frame > st.log_ub)
        if st.loss_based:
            w, log_eta = jnp.exp(log_scale + ell_b - frame), jnp.log(s.alpha) - frame
        else:
            w, log_eta = jnp.exp(log_scale + ell_b), jnp.log(s.alpha)
        if st.custom:
            log_w = log_scale + ell_b
            w = jnp.exp(log_w) if st.gradient == "loss" else jnp.ones((), ell_b.dtype)
        direction = jax.tree.map(lambda v: w * v, g_b)
        params, opt_state, updates = _apply_update(st, params, opt_state, direction, s.alpha)
        if st.custom:
            log_eta = _arc_log_eta(updates, log_w + 0.5 * jnp.log(sq_norm(g_b)))
        return (params, opt_state, jnp.logaddexp(log_t, log_eta), over), log_eta

    (params, opt_state, log_t, over), log_etas = jax.lax.scan(
        one, (s.params, s.opt_state, s.log_t, jnp.zeros((), bool)), batches
    )
    ell_new = obj.log_loss(params)
    # a batch past loss_ub fails the epoch as a non-finite one does (official code)
    finite = (jnp.isfinite(ell_new) & _finite_tree(params) & ~(st.loss_based & over)
              & ~jnp.isnan(log_t))  # fmt: skip
    return _Proposal(
        sharpness=s.sharpness, sharp_vec=s.sharp_vec, maxima=None, params=params,
        opt_state=opt_state, log_loss=ell_new, grad=s.grad, finite=finite,
        log_eta=log_etas[-1], steps=nb, log_t=log_t, dissipation=s.dissipation,
    )  # fmt: skip


def _epoch(st: _Stepper, obj: Objective, s: GDState, due=None) -> GDState:
    """One epoch from ``s`` (``_full_batch`` or ``_mini_batch``), accepted or rolled back
    by the schedule; the key moves on either way."""
    body = _full_batch if st.batch_size is None else _mini_batch
    p = body(st, obj, s, due)
    maxima = p.maxima
    if maxima is None:
        maxima = (s.step_sharpness_max, s.step_condition_max, s.sharpness_steps)
    if st.loss_based:
        # the official code's LossBasedLRv1 accepts an epoch whose loss ratio is <= 1
        accept = p.finite & (p.log_loss <= s.log_loss)
        alpha = jnp.where(accept, s.alpha * UP, s.alpha / DOWN)
        stop = jnp.where(alpha < ALPHA_MIN, STOP_ALPHA, RUNNING)
    else:
        accept = p.finite
        alpha = s.alpha
        stop = jnp.where(p.finite, RUNNING, STOP_NONFINITE)
    moved = GDState(
        p.params, p.opt_state, p.log_loss, p.grad, p.log_t, s.step + p.steps, alpha,
        p.log_eta, s.key, s.grad_evals + 1, s.rejected, stop, p.dissipation, p.sharpness,
        p.sharp_vec, *maxima,
    )  # fmt: skip
    stayed = s._replace(
        alpha=alpha, grad_evals=s.grad_evals + 1, rejected=s.rejected + 1, stop=stop
    )
    new = _tree_select(accept, moved, stayed)
    key, _ = jax.random.split(s.key)
    return new._replace(key=key)


def _initial_state(
    objective: Objective, opt, params, seed, batch_size, alpha, sharpness: bool
) -> GDState:
    """The loop's first state; ``sharpness``: estimate it at ``params`` (from a fixed
    random start, ``SHARPNESS_START_ROUNDS`` restarts), else none is kept."""
    dtype = objective.dtype
    ell, g = objective.value_and_grad(params)
    flat = ravel_pytree(params)[0]
    if sharpness:
        v0 = jax.random.normal(jax.random.key(0), flat.shape, flat.dtype)
        lam, vec = _sharpness_at(objective, params, g, v0, SHARPNESS_START_ROUNDS)
        lam = lam.astype(ell.dtype)
    else:
        # (one entry, not none: orbax's checkpoints refuse empty arrays)
        lam, vec = jnp.full((), jnp.nan, ell.dtype), jnp.zeros((1,), flat.dtype)
    return GDState(
        params=params,
        opt_state=opt.init(params),
        log_loss=ell,
        grad=g if batch_size is None else jax.tree.map(jnp.zeros_like, params),
        log_t=jnp.asarray(-jnp.inf, dtype),
        step=jnp.asarray(0),
        alpha=jnp.asarray(alpha, dtype),
        log_eta=jnp.asarray(-jnp.inf, dtype),
        key=jax.random.key(seed),
        grad_evals=jnp.asarray(1),
        rejected=jnp.asarray(0),
        stop=jnp.asarray(RUNNING),
        dissipation=jnp.zeros((), dtype),
        sharpness=lam,
        sharp_vec=vec,
        step_sharpness_max=jnp.full((), -jnp.inf, ell.dtype),
        step_condition_max=jnp.full((), -jnp.inf, ell.dtype),
        sharpness_steps=jnp.asarray(0),
    )


class LossBased(NamedTuple):
    """The paper's loss-based schedule as an ``optimizer`` for ``run_gd``: steps
    ``eta = alpha / Loss`` with ``alpha`` from ``alpha0``, raised by 2^(1/5) after an epoch
    that did not raise the loss, lowered by 2^(1/10) and the epoch rolled back otherwise;
    with SGD, also as soon as a mini-batch's mean loss exceeds ``loss_ub`` times the
    frame's (the official code's, 600 on MNIST; ``None``: no such bound). (Not an optax
    transformation: its roll-back needs the loss after the step.)"""

    alpha0: float = 0.1
    loss_ub: float | None = None


def _resolve(optimizer, gradient, schedule, lr, alpha0):
    """``(optimizer, schedule, lr, alpha0)`` from ``run_gd``'s ways of giving the steps:
    with no schedule, the paper's loss-based one (``gflow run``'s GD), or the constant
    one where an ``lr`` is given (0.01 where none is)."""
    if schedule is None:
        schedule = "loss-based" if lr is None else "constant"
    if lr is None:
        lr = 0.01
    if callable(lr):  # an optax schedule
        optimizer, lr = optax.sgd(lr), None
    if isinstance(optimizer, LossBased):
        schedule, alpha0, optimizer = "loss-based", float(optimizer.alpha0), None
    if optimizer is not None:
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "optimizer must be an optax.GradientTransformation or LossBased, got "
                f"{type(optimizer).__name__}"
            )
        if gradient not in ("loss", "log_loss"):
            raise ValueError(f"gradient must be 'loss' or 'log_loss', got {gradient!r}")
        schedule, lr = "optax", None
    return optimizer, schedule, lr, alpha0


def _check_schedule(schedule: str, lr: float, alpha0: float, batch_size, n: int):
    """Validate the step options; returns the batch size (None for full batch)."""
    if schedule not in SCHEDULES + ("optax",):
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "optax":
        lr = 1.0  # the optimizer holds its own
    if not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive number, got {lr}")
    if not 0 < alpha0 < math.inf:
        raise ValueError(f"alpha0 must be finite and positive, got {alpha0}")
    if batch_size is not None and not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in 1..{n}, got {batch_size}")
    return None if batch_size == n else batch_size


def _reasons(objective: Objective, params, batch_size) -> dict:
    """Why a monitor column of a GD run stays empty (``TrajectoryRecorder``)."""
    out = objective.invariant_reasons(params)
    if batch_size is not None:
        out["dissipation_defect"] = (
            "mini-batch steps: the dissipation identity is one of the full-batch gradient"
        )
    return out


def _nonfinite_message(step: int, lr) -> str:
    if lr is None:
        return f"non-finite loss, gradient or clock at step {step} with the given optax optimizer"
    return (
        f"non-finite loss, gradient or clock at step {step} with constant lr {lr:g}; "
        "try --schedule loss-based or a smaller --lr"
    )


def run_gd(
    objective: Objective,
    params0,
    *,
    optimizer: optax.GradientTransformation | LossBased | None = None,
    gradient: str = "loss",
    schedule: str | None = None,
    lr: float | Callable | None = None,
    alpha0: float = 0.1,
    loss_ub: float | None = None,
    batch_size: int | None = None,
    log_t_max: float | None = None,
    max_steps: int = 100_000,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    seed: int = 0,
    save_params: bool = False,
    chunk: int = 5_000,
    checkpoint_log_losses=(),
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
    resume: bool = False,
    sharpness_every: int = 1,
) -> Trajectory:
    """Train by GD / SGD; returns the ``Trajectory`` on the matched clock ``t = sum eta``.

    **Arguments:**

    - ``optimizer``: any ``optax.GradientTransformation`` (``optax.sgd(0.1,
      momentum=0.9)``, ``optax.adam(...)``, schedules included), fed the gradient of the
      sum loss (``gradient="loss"``) or of its log (``gradient="log_loss"``, for a
      scale-free optimizer late in training, when the loss underflows). Its clock is
      ``t = sum |d theta| / |grad Loss|``, the flow's time for the same path length,
      which for plain GD is ``sum lr``. ``LossBased(alpha0)``: the paper's schedule.
      None: ``schedule``.
    - ``schedule``: ``"constant"`` (step ``lr``; an optax schedule as ``lr`` is
      ``optimizer=optax.sgd(lr)``) or ``"loss-based"`` (``alpha0 / Loss``, with
      roll-back). None (the default): ``"constant"`` where ``lr`` is given, else
      ``"loss-based"``, ``gflow run``'s GD (``run_gd(objective, params0,
      log_t_max=100)`` is its trajectory on the default problem).
    - ``lr``: the constant schedule's step (None: 0.01).
    - ``batch_size``: ``None`` for full-batch GD, else mini-batch SGD.
    - ``loss_ub``: loss-based SGD rolls an epoch back as soon as a mini-batch's mean loss
      exceeds ``loss_ub`` times the data's mean loss at the epoch's start (the official
      code's ``loss_ub``, 600 on MNIST); ``None``: only a rise of the epoch's loss does.
    - ``log_t_max`` / ``max_steps`` / ``log_loss_min``: stop at whichever comes first;
      ``log_t_max=None`` (the default) sets no limit on the clock: the run goes to
      ``max_steps`` (or ``log_loss_min``, or a stop), with its save points by steps.
    - ``saves``: save points evenly spaced in log t on ``[log_t_min, log_t_max]`` (by
      steps, on ``[1, max_steps]``, when ``log_t_max`` is None), plus the initial point
      and the first step.
    - ``save_params``: keep a parameter snapshot at each save point.
    - ``checkpoint_log_losses``: log-loss marks; the parameters of the first step (for
      SGD: epoch) whose log loss falls to each mark are kept as the trajectory's
      checkpoint ``f"{mark:.6g}"`` (the paper's checkpoints at Loss < 1e-10, ...).
    - ``progress``: called with the latest row after each chunk and save point.
    - ``checkpoint``: a ``gflow.checkpoint.Checkpointer``; the whole loop state is saved
      there at every save point (also the last good state of a run stopped by a
      non-finite loss). With ``resume=True`` the run continues from the latest one,
      reproducing the uninterrupted run exactly.
    - ``sharpness_every``: full-batch GD estimates ``lambda_max(Hess Loss)`` at the
      parameters of every ``sharpness_every``-th step and at every save point (and every
      ``chunk`` steps), ``SHARPNESS_VECTORS`` Hessian-vector products each, warm-started
      from the last estimate (0: never, and no sharpness columns). Its columns: ``sharpness``
      (``lambda_max(Hess Loss) / Loss``, of ``Hess log Loss + g g^T``, a Rayleigh quotient
      hence a lower bound), ``step_sharpness`` (``eta lambda_max(Hess Loss)`` for the
      step from the save point: ``lr``, or ``alpha / Loss``; an optax optimizer's last
      step), over the steps since the previous save point whose parameters were
      estimated ``step_sharpness_max`` (``max eta_t lambda_t``) and ``step_condition_max``
      (``max eta_t lambda_t log(1/L_t)``, ``+inf`` at a ``L_t >= 1``), and
      ``sharpness_steps``, how many steps entered those maxima. SGD: NaN columns.
    """
    (tr,) = _drive(
        objective, [params0], [seed], single=True, optimizer=optimizer, gradient=gradient,
        schedule=schedule, lr=lr, alpha0=alpha0, loss_ub=loss_ub, batch_size=batch_size,
        log_t_max=log_t_max, max_steps=max_steps, log_loss_min=log_loss_min, saves=saves,
        log_t_min=log_t_min, save_params=save_params, chunk=chunk,
        checkpoint_log_losses=checkpoint_log_losses, config=config, progress=progress,
        checkpoint=checkpoint, resume=resume, sharpness_every=sharpness_every,
    )  # fmt: skip
    return tr


def run_gd_seeds(
    objective: Objective,
    params0: list,
    *,
    seeds: list[int],
    optimizer: optax.GradientTransformation | LossBased | None = None,
    gradient: str = "loss",
    schedule: str | None = None,
    lr: float | Callable | None = None,
    alpha0: float = 0.1,
    loss_ub: float | None = None,
    batch_size: int | None = None,
    log_t_max: float | None = None,
    max_steps: int = 100_000,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    save_params: bool = False,
    chunk: int = 5_000,
    checkpoint_log_losses=(),
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
    checkpoint: Checkpointer | None = None,
    resume: bool = False,
    sharpness_every: int = 1,
) -> list[Trajectory]:
    """K runs of ``run_gd`` in one jitted, vmapped loop: one initialisation and one seed
    (SGD's shuffling) per run; returns their K trajectories.

    Each run follows exactly the steps its own ``run_gd(params0[k], seed=seeds[k])``
    takes: ``run_gd`` is this driver with K = 1, and each argument has ``run_gd``'s
    default (``log_t_max=None``: no limit on the clock, save points by steps up to
    ``max_steps``). Every run stops at its own save points and loss marks, and
    ``lax.while_loop`` under ``vmap`` holds a finished run while the others go on.
    ``checkpoint`` / ``resume``: as in ``run_gd``, the whole batch's state whenever a run
    reaches a save point. ``sharpness_every``: as in ``run_gd``; with a stride, the runs
    share the steps that skip it only when none of them is due (its estimate is then
    computed for all, and kept by the runs due).
    """
    if len(params0) != len(seeds) or not seeds:
        raise ValueError(f"give one seed per initialisation, got {len(seeds)} and {len(params0)}")
    return _drive(
        objective, list(params0), list(seeds), single=False, optimizer=optimizer,
        gradient=gradient, schedule=schedule, lr=lr, alpha0=alpha0, loss_ub=loss_ub,
        batch_size=batch_size,
        log_t_max=log_t_max, max_steps=max_steps, log_loss_min=log_loss_min, saves=saves,
        log_t_min=log_t_min, save_params=save_params, chunk=chunk,
        checkpoint_log_losses=checkpoint_log_losses, config=config, progress=progress,
        checkpoint=checkpoint, resume=resume, sharpness_every=sharpness_every,
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A GD driver's settings, checked and resolved (``_plan``); fixed for the run.

    **Fields:**

    - ``objective``: the ``Objective`` trained.
    - ``seeds``: one per run, for SGD's shuffling (K runs).
    - ``single``: ``run_gd`` (K = 1; ``progress`` also gets a row after each chunk)
      rather than ``run_gd_seeds`` (``progress`` gets the recorded rows, with their seed).
    - ``optimizer``: the user's optax transformation, or ``None``.
    - ``gradient``: what ``optimizer`` is fed (``"loss"`` or ``"log_loss"``).
    - ``schedule`` / ``lr`` / ``alpha0`` / ``loss_ub``: the steps, resolved (``schedule``
      is ``"optax"`` for a user's optimizer, whose ``lr`` is then ``None``).
    - ``batch_size``: ``None`` for full-batch GD (also for a batch of all samples), else
      SGD's.
    - ``log_t_max`` / ``max_steps`` / ``log_loss_min`` / ``saves`` / ``log_t_min`` /
      ``chunk``: as in ``run_gd``.
    - ``every``: the sharpness stride (0: off; always 0 for SGD).
    - ``progress``: as in ``run_gd``.
    - ``step_marks``: the save points by steps when ``log_t_max`` is ``None``, else
      ``None`` (the save points are then in ``log t``).
    """

    objective: Objective
    seeds: list
    single: bool
    optimizer: Any
    gradient: str
    schedule: str
    lr: Any
    alpha0: float
    loss_ub: float | None
    batch_size: int | None
    log_t_max: float | None
    max_steps: int
    log_loss_min: float | None
    saves: int
    log_t_min: float
    chunk: int
    every: int
    progress: Callable[[dict], None] | None
    step_marks: np.ndarray | None


@dataclasses.dataclass
class _Loop:
    """The driver's loop between two calls of its jitted ``advance``; a checkpoint keeps
    all of it (``state`` and the recorders as arrays, the rest as its metadata).

    **Fields:**

    - ``state``: the runs' ``GDState``, stacked (a leading axis of K).
    - ``recs``: one ``TrajectoryRecorder`` per run.
    - ``targets``: per run, its save points in ``log t`` still ahead (none when the save
      points are by steps).
    - ``status`` / ``message``: per run, what its trajectory will say.
    - ``finished``: per run, whether it has stopped.
    - ``first``: whether the next call takes the first step (after which every run is
      recorded).
    - ``pending``: per run, the log-loss marks it has not reached yet, highest first.
    """

    state: GDState
    recs: list[TrajectoryRecorder]
    targets: list[list[float]]
    status: list[str]
    message: list[str]
    finished: list[bool]
    first: bool
    pending: list[list[float]]


class _Saved(NamedTuple):
    """A save point's values on the host, one entry per run (``_record``): the
    quantities ``q`` and the ``GDState`` fields of the same names."""

    q: Any
    step: np.ndarray
    log_t: np.ndarray
    log_eta: np.ndarray
    alpha: np.ndarray
    grad_evals: np.ndarray
    rejected: np.ndarray
    dissipation: np.ndarray
    log_loss: np.ndarray
    sharpness: np.ndarray
    step_sharpness_max: np.ndarray
    step_condition_max: np.ndarray
    sharpness_steps: np.ndarray


def _drive(
    objective: Objective, params0: list, seeds: list, *, single: bool, optimizer, gradient,
    schedule, lr, alpha0, loss_ub, batch_size, log_t_max, max_steps, log_loss_min, saves,
    log_t_min, save_params, chunk, checkpoint_log_losses, config, progress, checkpoint, resume,
    sharpness_every,
) -> list[Trajectory]:  # fmt: skip
    """The one GD driver: K runs (K = 1 for ``run_gd``) in one jitted, vmapped loop, each
    stopping at its own save points, loss marks and limits (``lax.while_loop`` under
    ``vmap`` holds a finished run while the others go on)."""
    plan = _plan(
        objective, params0, seeds, single=single, optimizer=optimizer, gradient=gradient,
        schedule=schedule, lr=lr, alpha0=alpha0, loss_ub=loss_ub, batch_size=batch_size,
        log_t_max=log_t_max, max_steps=max_steps, log_loss_min=log_loss_min, saves=saves,
        log_t_min=log_t_min, chunk=chunk, progress=progress, sharpness_every=sharpness_every,
    )  # fmt: skip
    k, every = len(seeds), plan.every
    opt, epoch = _make_epoch(plan.schedule, plan.batch_size, objective.num_samples,
                             plan.optimizer, gradient, plan.loss_ub, every > 0)  # fmt: skip
    # where the sharpness is estimated: at the new parameters, in the step's gradient pass,
    # unless epochs roll back (loss-based: about 2 in 3 do once alpha has settled), where it
    # is estimated before the step instead, once per parameters however many epochs retry
    advance = _make_advance(epoch, every, before=plan.schedule == "loss-based")
    alpha_init = {"loss-based": plan.alpha0, "optax": 1.0}.get(plan.schedule, plan.lr)
    state = _initial_states(objective, opt, params0, seeds, plan.batch_size, alpha_init, every > 0)
    recs = _recorders(plan, params0[0], config, save_params)
    loop = _start(plan, state, recs, checkpoint if resume else None, checkpoint_log_losses)
    blas = one_blas_thread()
    try:
        while not all(loop.finished):
            _round(plan, loop, advance, checkpoint)
    except KeyboardInterrupt:
        for i in range(k):
            if not loop.finished[i]:
                loop.status[i] = "stopped"
                loop.message[i] = f"interrupted at step {int(loop.state.step[i])}"
    finally:
        blas.restore_original_limits()
    finals = jax.device_get(loop.state.params)
    return [
        loop.recs[i].finish(
            jax.tree.map(lambda a, i=i: a[i], finals), loop.status[i], loop.message[i], objective
        )
        for i in range(k)
    ]


def _plan(
    objective: Objective, params0: list, seeds: list, *, single: bool, optimizer, gradient,
    schedule, lr, alpha0, loss_ub, batch_size, log_t_max, max_steps, log_loss_min, saves,
    log_t_min, chunk, progress, sharpness_every,
) -> _Plan:  # fmt: skip
    """``_drive``'s arguments checked, in this order (the first wrong one is reported),
    and resolved."""
    for k, p in enumerate(params0):
        check_finite_params(p, "params0" if single else f"params0[{k}]")
    n = objective.num_samples
    if isinstance(optimizer, LossBased) and optimizer.loss_ub is not None:
        loss_ub = optimizer.loss_ub
    optimizer, schedule, lr, alpha0 = _resolve(optimizer, gradient, schedule, lr, alpha0)
    if loss_ub is not None and not loss_ub > 1:
        raise ValueError(f"loss_ub must exceed 1 (a ratio to the frame's loss), got {loss_ub}")
    batch_size = _check_schedule(schedule, lr, alpha0, batch_size, n)
    if not math.isfinite(log_t_min) or (log_t_max is not None and not math.isfinite(log_t_max)):
        raise ValueError(f"log_t_min and log_t_max must be finite, got {log_t_min} and {log_t_max}")
    if log_loss_min is not None and math.isnan(log_loss_min):
        raise ValueError("log_loss_min must be a number or None, got nan")
    if log_t_max is not None and log_t_max <= log_t_min:
        raise ValueError(f"log_t_max must exceed log_t_min = {log_t_min}, got {log_t_max}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    every = sharpness_every
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 0:
        raise ValueError(f"sharpness_every must be an integer >= 0 (0: off), got {every!r}")
    every = int(every) if batch_size is None else 0  # SGD: outside S5 anyway
    step_marks = None
    if log_t_max is None:
        step_marks = np.unique(np.linspace(1, max_steps, max(saves, 2)).astype(int))
    return _Plan(
        objective=objective, seeds=seeds, single=single, optimizer=optimizer,
        gradient=gradient, schedule=schedule, lr=lr, alpha0=alpha0, loss_ub=loss_ub,
        batch_size=batch_size, log_t_max=log_t_max, max_steps=max_steps,
        log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min, chunk=chunk,
        every=every, progress=progress, step_marks=step_marks,
    )  # fmt: skip


def _refreshed_runs(obj: Objective, states: GDState, which) -> GDState:
    """The sharpness at the parameters of the runs ``which``."""
    return jax.vmap(lambda s, w: _refreshed(obj, s, w))(states, which)


def _going(s: GDState, target, limits, floors):
    """The runs still to step in this call: short of ``target`` (log t), of their step
    limit and of their loss floor, and not stopped."""
    running = (s.stop == RUNNING) & (s.log_loss > floors)
    return (s.log_t < target) & (s.step < limits) & running


def _epochs(epoch, every: int, before: bool, obj: Objective, s: GDState, act) -> GDState:
    """One epoch of the runs ``act`` (the others held), the sharpness estimated as the
    stride ``every`` says: at the new parameters of the steps due, or (``before``) at a
    due step's parameters before it."""

    def plain(s):
        return jax.vmap(lambda s: epoch(obj, s))(s)

    def estimating(s, due):
        return jax.vmap(lambda s, d: epoch(obj, s, d))(s, due)

    if every == 0:
        new = plain(s)
    elif before:  # the runs at a k-th step's parameters, not estimated there yet
        need = act & (s.step % every == 0) & jnp.isnan(s.sharpness)
        s_need = jax.lax.cond(jnp.any(need), _refreshed_runs, lambda _, s, n: s, obj, s, need)
        new = plain(s_need)
    elif every == 1:
        new = estimating(s, act)
    else:
        due = act & ((s.step + 1) % every == 0)
        new = jax.lax.cond(jnp.any(due), estimating, lambda s, _: plain(s), s, due)
    return _runs_select(act, new, s)


def _advance(
    epoch, every: int, before: bool, obj: Objective, states: GDState, target, limits, floors
) -> GDState:
    """The runs' epochs until each stops short of ``target``, its step limit or its loss
    floor (``_going``); then a save point's sharpness is at its parameters, estimated
    here if not yet. vmap's own lowering of a while loop, written out so that a sharpness
    stride can skip its products when no run is due (a cond under vmap would compute
    both)."""

    def body(s):
        return _epochs(epoch, every, before, obj, s, _going(s, target, limits, floors))

    def any_going(s):
        return jnp.any(_going(s, target, limits, floors))

    states = jax.lax.while_loop(any_going, body, states)
    if every == 0:
        return states
    stale = jnp.isnan(states.sharpness)
    return jax.lax.cond(jnp.any(stale), _refreshed_runs, lambda _, s, n: s, obj, states, stale)


def _make_advance(epoch, every: int, before: bool):
    """The driver's jitted ``advance(obj, states, target, limits, floors)`` (``_advance``)
    for ``epoch`` and the sharpness stride ``every``."""

    @jax.jit
    def advance(obj, states: GDState, target, limits, floors):
        return _advance(epoch, every, before, obj, states, target, limits, floors)

    return advance


def _initial_states(
    objective: Objective, opt, params0: list, seeds: list, batch_size, alpha, sharpness: bool
) -> GDState:
    """The runs' first states (``_initial_state``), stacked, in one jitted, vmapped call."""

    def init(obj, p, seed):  # the objective as an argument: a multi-host one cannot be a constant
        return _initial_state(obj, opt, p, seed, batch_size, alpha, sharpness)

    stacked = jax.tree.map(lambda *a: jnp.stack(a), *params0)
    return jax.jit(jax.vmap(init, in_axes=(None, 0, 0)))(objective, stacked, jnp.asarray(seeds))


def _recorders(plan: _Plan, params0, config: dict | None, save_params: bool) -> list:
    """One ``TrajectoryRecorder`` per run, its config the run's settings (``params0``:
    one initialisation, for the reasons of the empty monitor columns)."""
    recs = []
    for s in plan.seeds:
        cfg = {**plan.objective.describe(), **(config or {})}
        cfg.update(
            dynamics="gd" if plan.batch_size is None else "sgd", schedule=plan.schedule,
            lr=plan.lr, alpha0=plan.alpha0, batch_size=plan.batch_size, loss_ub=plan.loss_ub,
            **({"gradient": plan.gradient} if plan.schedule == "optax" else {}),
            log_t_max=plan.log_t_max, max_steps=plan.max_steps, log_loss_min=plan.log_loss_min,
            saves=plan.saves, log_t_min=plan.log_t_min, seed=int(s),
            **({} if plan.single else {"seeds": [int(v) for v in plan.seeds]}),
            sharpness_every=plan.every, sharpness_vectors=SHARPNESS_VECTORS if plan.every else 0,
        )  # fmt: skip
        recs.append(TrajectoryRecorder(
            "gd", cfg, save_params, plan.progress if plan.single else None,
            _reasons(plan.objective, params0, plan.batch_size),
        ))  # fmt: skip
    return recs


def _start(plan: _Plan, state: GDState, recs: list, checkpoint, checkpoint_log_losses) -> _Loop:
    """The loop at its start: as ``checkpoint`` (resumed; ``None``: none) left it when it
    holds one, else from ``state`` with the initial point recorded."""
    k = len(plan.seeds)
    marks = sorted((float(v) for v in checkpoint_log_losses), reverse=True)
    grid = []
    if plan.log_t_max is not None:
        grid = [float(v) for v in log_t_grid(plan.log_t_min, plan.log_t_max, plan.saves)]
    loop = _Loop(
        state=state, recs=recs, targets=[list(grid) for _ in range(k)],
        status=["completed"] * k, message=[""] * k, finished=[False] * k, first=True,
        pending=[list(marks) for _ in range(k)],
    )  # fmt: skip
    got = checkpoint.restore() if checkpoint is not None else None
    if got is None:
        _record(plan, loop, range(k))
    else:
        arrays, meta = got
        restore_recorders(recs, arrays, meta["recorders"])
        loop.state = unpack("state/", state, arrays)
        loop.targets, loop.status, loop.message = meta["targets"], meta["status"], meta["message"]
        loop.finished, loop.first, loop.pending = meta["finished"], meta["first"], meta["pending"]
    return loop


def _save_checkpoint(checkpoint: Checkpointer | None, loop: _Loop) -> None:
    """The whole loop into ``checkpoint`` when one is due there."""
    if checkpoint is not None and checkpoint.due():
        arrays, metas = recorders_state(loop.recs)
        arrays.update(pack("state/", loop.state))
        meta = dict(recorders=metas, targets=loop.targets, status=loop.status,
                    message=loop.message, finished=[bool(v) for v in loop.finished],
                    first=bool(loop.first), pending=loop.pending)  # fmt: skip
        checkpoint.save(sum(len(r.rows) for r in loop.recs), arrays, meta)


def _call_args(plan: _Plan, loop: _Loop):
    """``(target, limits, floors)`` of the next call of ``advance``: the first step, else
    the earliest unfinished run's next save point in ``log t`` (or each run's next step
    mark), at most ``chunk`` steps on; and each run's next loss mark."""
    k = len(plan.seeds)
    steps = np.asarray(loop.state.step)
    if loop.first:
        target, limits = np.inf, np.ones(k, np.int64)
    elif plan.step_marks is None:
        target = min(loop.targets[i][0] for i in range(k) if not loop.finished[i])
        limits = np.minimum(plan.max_steps, steps + plan.chunk)
    else:
        target = np.inf
        limits = np.array([
            min(int(nxt[0]) if nxt.size else plan.max_steps, int(st) + plan.chunk)
            for st in steps for nxt in [plan.step_marks[plan.step_marks > st]]
        ])  # fmt: skip
    floors = np.array([p[0] if p else -np.inf for p in loop.pending])
    return target, limits, floors


def _round(plan: _Plan, loop: _Loop, advance, checkpoint: Checkpointer | None) -> None:
    """One call of ``advance`` (``_call_args``), then each unfinished run settled
    (``_settle``); the runs at a save point or stopped recorded, and the loop
    checkpointed."""
    target, limits, floors = _call_args(plan, loop)
    dtype = plan.objective.dtype
    loop.state = advance(plan.objective, loop.state, jnp.asarray(target, dtype),
                         jnp.asarray(limits), jnp.asarray(floors, dtype))  # fmt: skip
    s = loop.state
    log_t, step, stop, log_loss = jax.device_get((s.log_t, s.step, s.stop, s.log_loss))
    hits = []
    for i in range(len(plan.seeds)):
        if loop.finished[i]:
            continue
        if _settle(plan, loop, i, log_t[i], step[i], stop[i], log_loss[i]):
            hits.append(i)
    loop.first = False
    if hits:
        _record(plan, loop, hits)
        _save_checkpoint(checkpoint, loop)


def _settle(plan: _Plan, loop: _Loop, i: int, log_t, step, stop, log_loss) -> bool:
    """Run ``i`` after a call that left it at ``log_t``, ``step``, ``stop``, ``log_loss``:
    keeps the parameters at the loss marks it reached, passes the save points it reached
    and says why it stopped, if it did; returns whether to record it now (a save point
    or its end)."""
    targets, pending = loop.targets[i], loop.pending[i]
    # its own next save point (the call stops every run at the earliest one)
    hit = loop.first or bool(targets and log_t >= targets[0])
    hit = hit or (plan.step_marks is not None and step in plan.step_marks)
    done_t = plan.log_t_max is not None and log_t >= plan.log_t_max
    done_loss = plan.log_loss_min is not None and float(log_loss) <= plan.log_loss_min
    while pending and float(log_loss) <= pending[0]:
        # the first step (epoch, for SGD) whose log loss is at or below a mark
        label = f"{pending.pop(0):.6g}"
        params_i = jax.tree.map(lambda a: a[i], loop.state.params)
        loop.recs[i].checkpoint(label, params_i, step=int(step), log_t=float(log_t))
    done = done_t or done_loss or step >= plan.max_steps or stop != RUNNING
    if hit or done:
        while targets and targets[0] <= log_t:
            targets.pop(0)
    elif plan.progress is not None and plan.single:
        plan.progress({"step": int(step), "log_t": float(log_t), "log_loss": float(log_loss)})
    if stop == STOP_ALPHA:
        loop.status[i] = "stopped"
        loop.message[i] = (
            f"alpha fell below {ALPHA_MIN:g} at step {step}: no step decreases the loss"
        )
    elif stop == STOP_NONFINITE:
        loop.status[i] = "failed"
        loop.message[i] = _nonfinite_message(int(step) + 1, plan.lr)
    elif done_t:
        loop.message[i] = f"reached log t = {log_t:.6g}"
    elif done_loss:
        loop.message[i] = f"log loss {float(log_loss):.6g} <= target {plan.log_loss_min:g}"
    elif done:
        loop.message[i] = f"reached max steps {plan.max_steps}"
    loop.finished[i] = bool(done)
    return hit or done


def _record(plan: _Plan, loop: _Loop, which) -> None:
    """Record the runs ``which`` (``advance`` left their sharpness at their parameters)
    and start their sharpness maxima afresh."""
    state = loop.state
    q = quantities_many(plan.objective, state.params)
    h = _Saved(*jax.device_get((q, state.step, state.log_t, state.log_eta, state.alpha,
                                state.grad_evals, state.rejected, state.dissipation,
                                state.log_loss, state.sharpness, state.step_sharpness_max,
                                state.step_condition_max, state.sharpness_steps)))  # fmt: skip
    params = jax.device_get(state.params)  # the direction's step at every save point
    for i in which:
        row = loop.recs[i].add(
            int(h.step[i]), float(h.log_t[i]), jax.tree.map(lambda a, i=i: a[i], h.q),
            jax.tree.map(lambda a, i=i: a[i], params),
            dissipation=None if plan.batch_size is not None else float(h.dissipation[i]),
            log_lr=float(h.log_eta[i]), alpha=float(h.alpha[i]),
            grad_evals=float(h.grad_evals[i]), rejected=float(h.rejected[i]),
            **_sharpness_columns(plan, h, i),
        )  # fmt: skip
        if plan.progress is not None and not plan.single:
            plan.progress({**row, "seed": int(plan.seeds[i])})
    if plan.every:
        mask = np.zeros(len(plan.seeds), bool)
        mask[list(which)] = True
        fresh = jnp.asarray(mask)
        lowest = jnp.full((), -jnp.inf, state.step_sharpness_max.dtype)
        loop.state = state._replace(
            step_sharpness_max=jnp.where(fresh, lowest, state.step_sharpness_max),
            step_condition_max=jnp.where(fresh, lowest, state.step_condition_max),
        )


def _sharpness_columns(plan: _Plan, h: _Saved, i: int) -> dict:
    """Run ``i``'s sharpness columns at a save point: none when the sharpness is off for
    full-batch GD, NaN for SGD."""
    if plan.every:
        # the step from here: lr, alpha / Loss, or an optax optimizer's last one
        ell, lam = h.log_loss[i], h.sharpness[i]
        nxt = {"constant": math.log(h.alpha[i]), "loss-based": math.log(h.alpha[i]) - ell}
        return dict(
            sharpness=float(lam),
            step_sharpness=_eta_lambda(nxt.get(plan.schedule, h.log_eta[i]), ell, lam),
            step_sharpness_max=_or_nan(h.step_sharpness_max[i]),
            step_condition_max=_or_nan(h.step_condition_max[i]),
            sharpness_steps=float(h.sharpness_steps[i]),
        )  # fmt: skip
    if plan.batch_size is not None:
        return dict.fromkeys(SHARPNESS_COLUMNS, math.nan)
    return {}
