"""Is a KKT point of the margin problem a local optimum? A search for better directions.

Lyu & Li prove that the flow's direction converges to a KKT point of

    min |theta|^2 / 2  s.t.  q_n(theta) >= 1,

a first-order condition only: Vardi, Shamir & Srebro (2022, "On margin maximization in
linear and ReLU networks") show that for depth-2 ReLU and diagonal linear networks the
point may not even be a local optimum, and prove that for fully-connected linear
networks it is a global one.

``margin_search`` searches the ball of radius ``r`` around a unit direction ``u`` for a
larger normalized margin ``gamma(v) = min_n q_n(v) / |v|^L`` (scale-free): projected
Adam ascent (written out here) on a soft-min of the normalized margins, from ``u`` itself
and from random starts in the ball, all radii and starts in one vmapped, jitted scan.
The hard ``gamma`` of every iterate is read and the best kept, so a gain reported is a
point that has it; a search can miss a better point, never invent one.
``gflow.theory.local_optimality`` turns it into a verdict: where in the ball the best
point lies, against how far the flow's direction can still move.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

__all__ = ["margin_search"]


def margin_search(
    objective,
    params,
    *,
    radii=(0.03, 0.1, 0.3),
    starts: int = 8,
    steps: int = 400,
    seed: int = 0,
) -> dict:
    """The largest normalized margin found in each ball ``|v - u| <= r`` (``r`` in
    ``radii``, relative: ``u = theta / |theta|``), from ``starts`` starts per radius (``u``
    itself, then Gaussian ones at distance ``r / 2``) and ``steps`` projected Adam steps
    (step ``r / 40``, a soft-min whose temperature falls from 1e-2 to 1e-4 of
    ``gamma(u)``). Returns ``gamma0`` and, per radius, ``gain`` (relative to ``gamma0``)
    and ``moved`` (the best point's distance from ``u``)."""
    radii = tuple(float(r) for r in radii)
    if not radii or min(radii) <= 0 or max(radii) >= 1:
        raise ValueError(f"radii must lie in (0, 1), got {radii}")
    if starts < 1 or steps < 1:
        raise ValueError(f"starts and steps must be >= 1, got {starts}, {steps}")
    flat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    u = flat / jnp.linalg.norm(flat)
    L = objective.order

    def gamma_all(v):
        return objective.margins(unravel(v)) / jnp.linalg.norm(v) ** L

    g0 = float(jnp.min(gamma_all(u)))
    if not g0 > 0:
        raise ValueError(f"the data are not separated (normalized margin {g0:.3g})")
    key = jax.random.key(seed)
    noise = jax.random.normal(key, (len(radii), starts, u.size), u.dtype)
    noise = noise.at[:, 0].set(0.0)
    noise = noise / jnp.maximum(jnp.linalg.norm(noise, axis=-1, keepdims=True), 1e-300)
    rs = jnp.asarray(radii, u.dtype)[:, None]
    h0 = (noise * (rs / 2)[..., None]).reshape(-1, u.size)
    r_each = jnp.repeat(rs[:, 0], starts)
    tau = g0 * jnp.logspace(-2, -4, steps, dtype=u.dtype)
    best = _search(gamma_all, u, h0, r_each, tau)
    gains, moved = (np.asarray(a).reshape(len(radii), starts) for a in best)
    out = []
    for i, r in enumerate(radii):
        k = int(np.argmax(gains[i]))
        out.append(dict(radius=r, gain=float(gains[i, k]) / g0 - 1.0, moved=float(moved[i, k])))
    return dict(gamma0=g0, radii=out, starts=starts, steps=steps)


def _search(gamma_all, u, h0, r_each, tau):
    """Projected Adam ascent from each ``u + h0[k]`` inside its ball: ``(best hard gamma,
    its distance from u)`` per start."""

    b1, b2 = 0.9, 0.999  # Adam's defaults (written out: optax's counter is an int32,
    # which strict dtype promotion refuses to mix with float64)

    def one(h, r):
        lr = r / 40

        def soft(h, t):
            g = gamma_all(u + h)
            return -t * jax.nn.logsumexp(-g / t)

        def step(carry, kt):
            h, m, v, best, where = carry
            k, t = kt
            grad = jax.grad(soft)(h, t)
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad**2
            mh, vh = m / (1 - b1**k), v / (1 - b2**k)
            h = h + lr * mh / (jnp.sqrt(vh) + 1e-12 * jnp.sqrt(jnp.max(vh)) + 1e-300)
            h = h * jnp.minimum(1.0, r / jnp.maximum(jnp.linalg.norm(h), 1e-300))
            g = jnp.min(gamma_all(u + h))
            better = g > best
            best = jnp.where(better, g, best)
            where = jnp.where(better, jnp.linalg.norm(h), where)
            return (h, m, v, best, where), None

        zero = jnp.zeros_like(h)
        carry = (h, zero, zero, jnp.min(gamma_all(u + h)), jnp.linalg.norm(h))
        ks = jnp.arange(1, tau.size + 1, dtype=tau.dtype)
        (*_, best, where), _ = jax.lax.scan(step, carry, (ks, tau))
        return best, where

    return jax.jit(jax.vmap(one))(h0, r_each)
