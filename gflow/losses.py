"""Margin-based losses kept in log space (docs/theory.md, "Numerics the theory forces on us").

Late in training the sum loss is far below the smallest float64 (the paper reaches
1e-800), so every loss here returns ``log Loss`` and never forms ``Loss`` itself.

A loss is a small immutable object with

* ``log_terms(out, y)``: per-sample ``log l_n`` from the model outputs,
* ``log_loss(out, y)``: ``log sum_n l_n``,
* ``inverse(log_loss)``: ``l^{-1}(Loss)`` computed from ``log Loss`` (for the smoothed
  margin),
* ``log_threshold``: ``log`` of the sum-loss threshold below which the theory applies.

Binary losses take a scalar output per sample and labels ``y in {-1, +1}``; the
cross-entropy takes ``C`` logits and labels in ``0..C-1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = [
    "Loss",
    "Exponential",
    "Logistic",
    "CrossEntropy",
    "get_loss",
    "LOSSES",
    "log_softplus",
    "log_expm1_exp",
    "multiclass_margins",
]

# Below this value of u, log(log1p(e^u)/e^u) = -e^u/2 + O(e^{2u}) to float64 rounding.
_SERIES_CUT = -18.0


def log_softplus(u: Array) -> Array:
    """``log(log(1 + e^u))``, finite for every finite ``u``.

    For ``u < 0`` it is written as ``u + log(log1p(e^u) / e^u)``: the first term carries
    the size, the second is a correction in ``(log log 2, 0]`` that never underflows
    (``-e^u / 2`` once ``e^u`` is below float64 resolution). Both branches are evaluated
    on safe inputs so that gradients through ``jnp.where`` stay finite.
    """
    neg = u < 0
    un = jnp.where(neg, u, -1.0)
    x = jnp.exp(un)
    tiny = un < _SERIES_CUT
    xs = jnp.where(tiny, 1.0, x)
    corr = jnp.where(tiny, -0.5 * x, jnp.log(jnp.log1p(xs) / xs))
    up = jnp.where(neg, 1.0, u)
    # softplus(u) = u + log1p(e^-u) for u >= 0, no overflow.
    pos = jnp.log(up + jnp.log1p(jnp.exp(-up)))
    return jnp.where(neg, un + corr, pos)


def log_expm1_exp(ell: Array) -> Array:
    """``log(expm1(e^ell))``, i.e. ``log(e^Loss - 1)`` from ``ell = log Loss``.

    ``-log_expm1_exp(log Loss)`` is ``l^{-1}(Loss)`` for the logistic / cross-entropy
    loss. Loss up to e: ``ell + log(expm1(L)/L)`` with ``log(expm1(L)/L) = L/2 + O(L^2)``
    for tiny L; larger Loss: ``L + log1p(-e^{-L})``, so neither branch overflows before
    ``e^ell`` does.
    """
    big = ell > 1  # Loss > e: below it the first form cancels less
    ell_s = jnp.where(big, 0.0, ell)
    small_l = jnp.exp(ell_s)
    tiny = small_l < 1e-8
    ls = jnp.where(tiny, 1.0, small_l)
    corr = jnp.where(tiny, 0.5 * small_l, jnp.log(jnp.expm1(ls) / ls))
    ell_b = jnp.where(big, ell, 2.0)
    big_l = jnp.exp(ell_b)
    return jnp.where(big, big_l + jnp.log1p(-jnp.exp(-big_l)), ell_s + corr)


def multiclass_margins(logits: Float[Array, "n c"], y: Int[Array, " n"]) -> Float[Array, " n"]:
    """``q_n = Phi_{y_n} - max_{j != y_n} Phi_j`` (docs/theory.md, "Margins")."""

    def one(z, k):
        others = jnp.where(jnp.arange(z.shape[0], dtype=k.dtype) == k, -jnp.inf, z)
        return z[k] - jnp.max(others)

    return jax.vmap(one)(logits, y)


@dataclass(frozen=True)
class Loss:
    """Base class: subclasses define ``log_terms`` and ``inverse``."""

    name: ClassVar[str] = ""
    binary: ClassVar[bool] = True
    log_threshold: ClassVar[float] = 0.0

    def log_terms(self, out: Array, y: Array) -> Float[Array, " n"]:
        raise NotImplementedError

    def log_loss(self, out: Array, y: Array) -> Float[Array, ""]:
        """``log Loss = log sum_n l_n = LSE_n(log l_n)``."""
        return jax.nn.logsumexp(self.log_terms(out, y))

    def inverse(self, log_loss: Array) -> Array:
        raise NotImplementedError

    @property
    def threshold(self) -> float:
        """The sum-loss threshold of docs/theory.md (may be huge or tiny: prefer log_threshold)."""
        return math.exp(self.log_threshold)


@dataclass(frozen=True)
class Exponential(Loss):
    """``l(q) = e^{-q}``; ``log Loss = LSE_n(-q_n)``, ``l^{-1}(Loss) = -log Loss``."""

    name: ClassVar[str] = "exp"
    log_threshold: ClassVar[float] = 0.0  # Loss < 1

    def log_terms(self, out, y):
        return -(y * out)

    def inverse(self, log_loss):
        return -log_loss


@dataclass(frozen=True)
class Logistic(Loss):
    """``l(q) = log(1 + e^{-q})``; ``log l = log_softplus(-q)``; ``l^{-1} = -log expm1``."""

    name: ClassVar[str] = "logistic"
    log_threshold: ClassVar[float] = math.log(math.log(2.0))  # Loss < log 2

    def log_terms(self, out, y):
        return log_softplus(-(y * out))

    def inverse(self, log_loss):
        return -log_expm1_exp(log_loss)


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """``l_n = log(1 + sum_{j != y_n} e^{-(Phi_y - Phi_j)})``, multi-class.

    ``log l_n = log_softplus(u_n)`` with ``u_n = LSE_{j != y_n}(Phi_j - Phi_{y_n})``.
    """

    name: ClassVar[str] = "ce"
    binary: ClassVar[bool] = False
    log_threshold: ClassVar[float] = math.log(math.log(2.0))

    def log_terms(self, out, y):
        def u_of(z, k):
            others = jnp.where(jnp.arange(z.shape[0], dtype=k.dtype) == k, -jnp.inf, z - z[k])
            return jax.nn.logsumexp(others)

        return log_softplus(jax.vmap(u_of)(out, y))

    def inverse(self, log_loss):
        return -log_expm1_exp(log_loss)


LOSSES: dict[str, type[Loss]] = {"exp": Exponential, "logistic": Logistic, "ce": CrossEntropy}


def get_loss(name: str) -> Loss:
    """The loss called ``name`` (one of ``exp``, ``logistic``, ``ce``)."""
    try:
        return LOSSES[name]()
    except KeyError:
        raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}") from None
