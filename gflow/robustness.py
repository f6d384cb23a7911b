"""Adversarial robustness of a trained model (docs/theory.md, "The paper's experiments").

Attacks minimise the classification margin ``m(x) = Phi_y(x) - max_{j != y} Phi_j(x)``
(``y * Phi(x)`` for a single-output binary model); a point is broken once ``m < 0``.

* ``pgd(...)``: projected gradient descent on ``m`` inside the ``eps``-ball (``"linf"``:
  signed-gradient steps; ``"l2"``: normalised-gradient steps) intersected with the pixel
  box, from a random start, with restarts; ``eps`` may differ per sample. The iterate
  with the lowest margin is kept. Projection onto the ball, then clipping to the box,
  keeps both constraints (clipping only moves a coordinate towards the clean point,
  which is inside the box).
* ``minimal_eps(...)``: per-sample smallest ``eps`` at which the attack succeeds, by
  bisection (0 for misclassified points, ``inf`` if even ``eps_max`` fails).
* ``robust_accuracy(min_eps, grid)``: the fraction of points whose minimal ``eps``
  exceeds each ``eps`` of the grid.

Everything is batched and jitted; points are processed in chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gflow.models import apply

__all__ = ["Attack", "margins_at", "pgd", "minimal_eps", "robust_accuracy"]

NORMS = ("linf", "l2")


class Attack(NamedTuple):
    """PGD settings: ``norm`` ("linf" or "l2"), ``steps``, ``step`` (a fraction of
    ``eps``), ``restarts``, ``box`` (pixel range, or None for no box), ``seed``."""

    norm: str = "linf"
    steps: int = 100
    step: float = 0.1
    restarts: int = 1
    box: tuple[float, float] | None = (0.0, 1.0)
    seed: int = 0


DEFAULT_ATTACK = Attack()


def margins_at(graphdef, params, x, y, binary: bool):
    """Per-sample classification margins of the model at inputs ``x``."""
    out = apply(graphdef, params, x)
    if binary:
        return jnp.asarray(y, out.dtype) * jnp.reshape(out, (-1,))
    others = jnp.where(jax.nn.one_hot(y, out.shape[-1], dtype=bool), -jnp.inf, out)
    return jnp.take_along_axis(out, y[:, None], axis=1)[:, 0] - jnp.max(others, axis=1)


def _per_sample(v, x):
    return jnp.reshape(v, (-1,) + (1,) * (x.ndim - 1))


def _project(x_adv, x0, eps, norm, box):
    d = x_adv - x0
    e = _per_sample(eps, x0)
    if norm == "linf":
        d = jnp.clip(d, -e, e)
    else:
        n = jnp.sqrt(jnp.sum(d**2, axis=tuple(range(1, d.ndim)), keepdims=True))
        d = d * jnp.minimum(1.0, e / jnp.maximum(n, 1e-30))
    x = x0 + d
    return x if box is None else jnp.clip(x, box[0], box[1])


def _random_start(key, x0, eps, norm):
    e = _per_sample(eps, x0)
    if norm == "linf":
        return x0 + jax.random.uniform(key, x0.shape, x0.dtype, -1.0, 1.0) * e
    u = jax.random.normal(key, x0.shape, x0.dtype)
    u = u / jnp.sqrt(jnp.sum(u**2, axis=tuple(range(1, u.ndim)), keepdims=True))
    r = jax.random.uniform(jax.random.fold_in(key, 1), (x0.shape[0],), x0.dtype)
    return x0 + u * _per_sample(r ** (1.0 / x0[0].size), x0) * e


def _pgd_batch(graphdef, params, x0, y, eps, key, attack: Attack, binary: bool):
    norm, box = attack.norm, attack.box
    alpha = _per_sample(attack.step * eps, x0)

    def margin_sum(x):
        return jnp.sum(margins_at(graphdef, params, x, y, binary))

    grad = jax.grad(margin_sum)

    def one_restart(carry, k):
        best_x, best_m = carry
        x = _project(_random_start(k, x0, eps, norm), x0, eps, norm, box)

        def body(_, state):
            x, bx, bm = state
            g = grad(x)
            if norm == "linf":
                x = x - alpha * jnp.sign(g)
            else:
                gn = jnp.sqrt(jnp.sum(g**2, axis=tuple(range(1, g.ndim)), keepdims=True))
                x = x - alpha * g / jnp.maximum(gn, 1e-30)
            x = _project(x, x0, eps, norm, box)
            m = margins_at(graphdef, params, x, y, binary)
            better = m < bm
            bx = jnp.where(_per_sample(better, x0), x, bx)
            return x, bx, jnp.minimum(m, bm)

        m0 = margins_at(graphdef, params, x, y, binary)
        better = m0 < best_m
        bx = jnp.where(_per_sample(better, x0), x, best_x)
        bm = jnp.minimum(m0, best_m)
        _, bx, bm = jax.lax.fori_loop(0, attack.steps, body, (x, bx, bm))
        return (bx, bm), None

    m_clean = margins_at(graphdef, params, x0, y, binary)
    keys = jax.random.split(key, attack.restarts)
    (bx, bm), _ = jax.lax.scan(one_restart, (x0, m_clean), keys)
    return bx, bm


_pgd_jit = jax.jit(_pgd_batch, static_argnames=("graphdef", "attack", "binary"))


def pgd(
    graphdef,
    params,
    x,
    y,
    eps,
    attack: Attack = DEFAULT_ATTACK,
    *,
    binary: bool = False,
    chunk: int = 512,
):
    """``(x_adv, margin)``: the PGD attack on every point (``eps``: scalar or per point)."""
    if attack.norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {attack.norm!r}")
    if attack.steps < 1 or attack.restarts < 1 or not attack.step > 0:
        raise ValueError(f"steps, restarts and step must be positive, got {attack}")
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    eps = jnp.broadcast_to(jnp.asarray(eps, x.dtype), (x.shape[0],))
    if bool(jnp.any(eps < 0)):
        raise ValueError("eps must be >= 0")
    key = jax.random.key(attack.seed)
    xs, ms = [], []
    for s in range(0, x.shape[0], chunk):
        sl = slice(s, s + chunk)
        xa, m = _pgd_jit(graphdef, params, x[sl], y[sl], eps[sl], jax.random.fold_in(key, s),
                         attack=attack, binary=binary)  # fmt: skip
        xs.append(xa)
        ms.append(m)
    return jnp.concatenate(xs), jnp.concatenate(ms)


def minimal_eps(
    graphdef,
    params,
    x,
    y,
    attack: Attack = DEFAULT_ATTACK,
    *,
    eps_max: float,
    iters: int = 12,
    binary: bool = False,
    chunk: int = 512,
) -> np.ndarray:
    """Per point, the smallest ``eps`` at which ``attack`` breaks it, by bisection on
    ``[0, eps_max]`` to ``eps_max / 2^iters``: the upper end of the final bracket (a
    successful ``eps``). 0 for points already misclassified; ``inf`` where ``eps_max``
    fails."""
    x = jnp.asarray(x)
    n = x.shape[0]
    m0 = np.asarray(margins_at(graphdef, params, x, jnp.asarray(y), binary))
    _, m_hi = pgd(graphdef, params, x, y, eps_max, attack, binary=binary, chunk=chunk)
    lo = np.zeros(n)
    hi = np.full(n, float(eps_max))
    broken_at_max = np.asarray(m_hi) < 0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        _, m = pgd(graphdef, params, x, y, mid, attack, binary=binary, chunk=chunk)
        ok = np.asarray(m) < 0
        hi = np.where(ok, mid, hi)
        lo = np.where(ok, lo, mid)
    out = np.where(broken_at_max, hi, math.inf)
    return np.where(m0 < 0, 0.0, out)


def robust_accuracy(min_eps: np.ndarray, grid) -> np.ndarray:
    """Accuracy against each ``eps`` of ``grid``: the fraction with ``min_eps > eps``
    (misclassified points have ``min_eps = 0`` and never count)."""
    min_eps = np.asarray(min_eps)
    return np.array([float(np.mean(min_eps > e)) for e in np.asarray(grid, float)])


def saved_points(trajectory) -> dict:
    """The parameters a run kept, by label: every snapshot (``log t ...``), every
    loss-mark checkpoint (``loss mark ...``) and the final parameters (``end``)."""
    tr = trajectory
    points = {f"log t {tr['log_t'][i]:.4g}": s for i, s in enumerate(tr.snapshots)}
    points.update({f"loss mark {k}": v["params"] for k, v in tr.checkpoints.items()})
    if tr.final_params is not None:
        points["end"] = tr.final_params
    return points


def attack_run(trajectory, objective, attack: Attack, *, n: int, eps_max: float,
               report: Callable[[str, np.ndarray, np.ndarray], None] | None = None) -> dict:
    """``gflow attack`` on one run: for each of its ``saved_points``, the minimal eps of
    the first ``n`` training samples (``minimal_eps``) and the robust accuracy on a grid
    of 21 eps in ``[0, eps_max]``; ``report(label, min_eps, accuracy)`` after each. The
    result is what ``robustness.json`` holds. ``ValueError`` when it kept no parameters."""
    points = saved_points(trajectory)
    if not points:
        raise ValueError("the run saved no parameters")
    n = min(n, objective.num_samples)
    x, y = jnp.asarray(objective.x[:n]), jnp.asarray(objective.y[:n])
    grid = np.linspace(0.0, eps_max, 21)
    out = {"norm": attack.norm, "n": n, "eps_max": eps_max, "grid": grid.tolist()}
    for label, params in points.items():
        p = jax.tree.map(jnp.asarray, params)
        me = minimal_eps(objective.graphdef, p, x, y, attack, eps_max=eps_max,
                         binary=objective.loss.binary)  # fmt: skip
        acc = robust_accuracy(me, grid)
        out[label] = dict(min_eps=me.tolist(), robust_accuracy=acc.tolist())
        if report is not None:
            report(label, me, acc)
    return out
