"""The quantities the paper's theorems name (docs/theory.md, "Objects"), as pure jittable functions.

Each takes arrays (margins, log loss, parameter pytrees) and returns arrays, so they
compose under ``jax.jit`` and ``jax.vmap`` (over samples inside, over seeds outside).
``compute`` gathers all of them into one ``Quantities`` record; ``Objective.quantities``
is its jitted form for a parameter pytree.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from gflow.losses import Loss

__all__ = [
    "SUPPORT_DECADES",
    "Quantities",
    "sq_norm",
    "rho",
    "log_rho",
    "normalized_margin",
    "layerwise_margin",
    "smoothed_margin",
    "support_counts",
    "compute",
]

# Support sizes: samples with q_n <= q_min + log(10^k), k = 1..7 (as the paper's code logs).
SUPPORT_DECADES = tuple(range(1, 8))


def sq_norm(tree) -> Float[Array, ""]:
    """``||v||^2`` of a pytree of arrays taken as one vector."""
    return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(tree))


def rho(params) -> Float[Array, ""]:
    """``rho = ||theta||_2`` over all parameters as one vector."""
    return jnp.sqrt(sq_norm(params))


def log_rho(params) -> Float[Array, ""]:
    """``log rho``."""
    return jnp.log(rho(params))


def normalized_margin(q_min: Array, rho_: Array, order: int) -> Array:
    """``gamma_bar = q_min / rho^L`` (docs/theory.md, "Normalized margin")."""
    return q_min * jnp.exp(-order * jnp.log(rho_))


def layerwise_margin(q_min: Array, norms: Float[Array, " k"]) -> Array:
    """``q_min / prod_i ||W_i||_F``: the multi-homogeneous form of the paper's MNIST figure."""
    return q_min * jnp.exp(-jnp.sum(jnp.log(norms)))


def smoothed_margin(loss: Loss, log_loss: Array, rho_: Array, order: int) -> Array:
    """``gamma_tilde = l^{-1}(Loss) / rho^L``, from ``log Loss`` (Theorem 4.1's quantity)."""
    return loss.inverse(log_loss) * jnp.exp(-order * jnp.log(rho_))


def support_counts(q: Float[Array, " n"], decades=SUPPORT_DECADES) -> Array:
    """Number of samples with ``q_n <= q_min + log(10^k)`` for each ``k`` in ``decades``."""
    gaps = jnp.asarray([k * math.log(10.0) for k in decades], q.dtype)
    return jnp.sum(q[None, :] <= jnp.min(q) + gaps[:, None], axis=1)


class Quantities(NamedTuple):
    """Everything recorded at a save point. Scalars, except ``support`` (one per decade)."""

    log_loss: Array  # log of the sum loss
    log_loss_mean: Array  # log of the mean loss
    q_min: Array
    rho: Array
    normalized_margin: Array  # q_min / rho^L
    layerwise_margin: Array  # q_min / prod ||W_i||
    smoothed_margin: Array  # l^{-1}(Loss) / rho^L
    accuracy: Array  # fraction of samples with q_n > 0
    support: Array  # counts for SUPPORT_DECADES
    # per-unit balances, one array per hidden layer (gflow.invariants), or None when the
    # model's units are not known; set by Objective.quantities
    balances: Any = None
    # 1 - cos(theta, -grad Loss), set by Objective.quantities (Ji & Telgarsky's alignment)
    alignment_gap: Any = None


def compute(
    loss: Loss, q: Float[Array, " n"], log_loss: Array, params, order: int, norms
) -> Quantities:
    """All quantities from the margins ``q``, ``log Loss``, the parameters and the order L.

    Norms are taken in ``q``'s precision (float64 for a float32 model's float64 loss)."""
    q_min = jnp.min(q)
    r = rho(jax.tree.map(lambda a: a.astype(q.dtype), params))
    norms = norms.astype(q.dtype)
    return Quantities(
        log_loss=log_loss,
        log_loss_mean=log_loss - jnp.log(q.shape[0]),
        q_min=q_min,
        rho=r,
        normalized_margin=normalized_margin(q_min, r, order),
        layerwise_margin=layerwise_margin(q_min, norms),
        smoothed_margin=smoothed_margin(loss, log_loss, r, order),
        accuracy=jnp.mean((q > 0).astype(q.dtype)),
        support=support_counts(q),
    )
