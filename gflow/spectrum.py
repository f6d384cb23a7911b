"""Top Hessian eigenvalue by Lanczos on Hessian-vector products.

The Jacobian of the gradient-flow field is minus the Hessian (of ``log Loss`` on the loss
clock, of ``Loss`` on the time clock), symmetric with a real spectrum: an explicit
solver is stable while ``step * lambda_max`` stays inside its stability region, and GD
can track the flow only while ``eta * lambda_max < 2`` (docs/theory.md, "What integrating the
flow costs"). Hessian-vector products are ``jax.jvp`` of ``jax.grad``: two gradient
evaluations each, the Hessian itself is never formed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gflow.objective import Objective

__all__ = ["Eigen", "lanczos_top", "lanczos_top_many", "top_hessian_eigenvalue", "hvp_log_loss"]


class Eigen(NamedTuple):
    """``value``: the top eigenvalue; ``vector``: its unit eigenvector (flat);
    ``residual``: ``||H v - value v||``; ``matvecs``: Hessian-vector products used."""

    value: float
    vector: np.ndarray
    residual: float
    matvecs: int


def lanczos_top(
    matvec, dim: int, *, iters: int = 30, seed: int = 0, tol: float = 1e-10, v0=None
) -> Eigen:
    """Largest (algebraic) eigenvalue of the symmetric operator ``matvec`` on R^dim.

    Lanczos with full re-orthogonalisation (in float64 on the host), stopping early when
    the Ritz value's residual estimate falls below ``tol * |value|``. ``v0``: a start
    vector (a previous eigenvector, to warm-start a slowly changing operator); random if
    omitted.
    """
    many = lanczos_top_many(
        lambda v: np.asarray(matvec(v[0]))[None], dim, [v0], iters=iters, seed=seed, tol=tol
    )
    return many[0]


def lanczos_top_many(
    matvec, dim: int, v0s: list, *, iters: int = 30, seed: int = 0, tol: float = 1e-10,
    active=None,
) -> list[Eigen | None]:  # fmt: skip
    """``lanczos_top`` for K operators at once, each exactly as ``lanczos_top`` alone.

    ``matvec`` maps a (K, dim) stack of vectors to the K products (one vmapped call);
    ``v0s``: K start vectors (``None``: random); ``active``: K flags, an inactive
    operator is not iterated and gets ``None``. An operator that has stopped is still
    fed its last vector, and its products are ignored.
    """
    k_ops = len(v0s)
    active = [True] * k_ops if active is None else [bool(a) for a in active]
    k = min(iters, dim)
    runs = [_Lanczos(dim, v0, seed) if a else None for v0, a in zip(v0s, active, strict=True)]
    out: list[Eigen | None] = [None] * k_ops
    for j in range(k):
        todo = [i for i in range(k_ops) if runs[i] is not None and out[i] is None]
        if not todo:
            break
        stack = np.zeros((k_ops, dim))
        for i in todo:
            stack[i] = runs[i].q[j]
        w = np.asarray(matvec(stack), np.float64)
        for i in todo:
            out[i] = runs[i].step(w[i], j, k, tol)
    return out


class _Lanczos:
    """One operator's Lanczos recurrence: ``step`` takes the next product."""

    def __init__(self, dim: int, v0, seed: int):
        if v0 is None:
            q = np.random.default_rng(seed).standard_normal(dim)
        else:
            q = np.array(v0, np.float64)
        self.q = [q / np.linalg.norm(q)]
        self.alphas: list[float] = []
        self.betas: list[float] = []

    def step(self, w: np.ndarray, j: int, k: int, tol: float) -> Eigen | None:
        """Take ``w = A q_j``; the Ritz pair once converged (or at ``j = k - 1``)."""
        a = float(self.q[j] @ w)
        self.alphas.append(a)
        basis = np.stack(self.q)
        w = w - basis.T @ (basis @ w)  # full re-orthogonalisation
        w = w - basis.T @ (basis @ w)
        b = float(np.linalg.norm(w))
        T = np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)
        evals, evecs = np.linalg.eigh(T)
        value = float(evals[-1])
        s = evecs[:, -1]
        vec = basis.T @ s
        resid = abs(b * s[-1])  # ||H v - value v|| for the Ritz pair
        if resid <= tol * max(abs(value), 1e-300) or b == 0.0 or j == k - 1:
            return Eigen(value, vec / np.linalg.norm(vec), resid, j + 1)
        self.betas.append(b)
        self.q.append(w / b)
        return None


@jax.jit
def _hv(obj, p, v):
    unravel = ravel_pytree(p)[1]
    return ravel_pytree(jax.jvp(obj.grad_log_loss, (p,), (unravel(v),))[1])[0]


@jax.jit
def _flat_grad(obj, p):
    return ravel_pytree(obj.grad_log_loss(p))[0]


def hvp_log_loss(objective: Objective, params):
    """``v -> H v`` for the Hessian of ``log Loss`` at ``params``, on flat vectors (jitted
    once per problem shape, not per call)."""
    flat = ravel_pytree(params)[0]
    return lambda v: _hv(objective, params, jnp.asarray(v, flat.dtype)), flat.size


def top_hessian_eigenvalue(
    objective: Objective,
    params,
    *,
    of: str = "log_loss",
    iters: int = 30,
    seed: int = 0,
    tol: float = 1e-10,
) -> Eigen:
    """Top eigenvalue of the Hessian of ``log Loss`` (``of="log_loss"``, the loss clock's
    Jacobian up to sign) or of ``Loss / Loss(theta)`` (``of="loss"``: ``H_log + g g^T``,
    which times ``Loss`` is the Hessian of ``Loss``; kept unscaled since ``Loss`` may
    underflow). For GD with step ``eta`` compare ``eta * Loss * value``; with the
    loss-based step ``alpha / Loss`` that is ``alpha * value``.
    """
    if of not in ("log_loss", "loss"):
        raise ValueError(f"of must be 'log_loss' or 'loss', got {of!r}")
    hv, dim = hvp_log_loss(objective, params)
    if of == "loss":
        g = np.asarray(_flat_grad(objective, params))
        base = hv
        hv = lambda v: np.asarray(base(v)) + g * float(g @ np.asarray(v))
    return lanczos_top(hv, dim, iters=iters, seed=seed, tol=tol)
