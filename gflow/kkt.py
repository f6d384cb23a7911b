"""The (eps, delta)-KKT residual of docs/theory.md item 4.

For ``theta_s = theta / q_min(theta)^(1/L)`` (so ``q_min(theta_s) = 1``) find
``lambda >= 0`` minimising ``|theta_s - sum_n lambda_n grad q_n(theta_s)|``; then

    eps   = |theta_s - sum_n lambda_n grad q_n(theta_s)|
    delta = sum_n lambda_n (q_n(theta_s) - 1).

With ``K = J J^T`` the Gram matrix of the margin gradients and Euler's identity
``<grad q_n, theta_s> = L q_n``, the squared residual is
``|theta_s|^2 - 2 L lambda.q + lambda^T K lambda``: a non-negative least-squares problem.
It is solved by SciPy's Lawson-Hanson ``nnls`` on a square root of ``K`` (from its
eigendecomposition; ``L q`` lies in ``K``'s range, since ``L q = J theta_s``), and the
result's optimality conditions are checked and returned. ``eps`` itself is then
recomputed from the residual *vector* ``theta_s - J^T lambda`` (one gradient), not from
the quadratic form, so it keeps its digits when it is small.

At a kink ``grad q_n`` is a set (Clarke's): autodiff picks one element (a ReLU's slope 0
at z = 0). ``slopes`` picks another: the activation pattern of a ReLU network frozen at
the given slopes (``gflow.kinks.pattern``'s layout), e.g. with the sliding pairs of an
event-driven flow at their sliding slopes in ``[s-, 1]`` (``clarke_pattern``): the
element of the subdifferential that the flow's own velocity is made of.

Only near-active samples (``q_n(theta_s) <= 1 + gap``) enter unless ``gap=None``. The
per-example gradients are built by ``vmap`` in chunks of ``chunk`` samples; when the
whole ``J`` would exceed ``max_bytes`` the Gram matrix is built block by block instead.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.flatten_util import ravel_pytree

from gflow.distributed import local
from gflow.objective import Objective

__all__ = ["KKT", "kkt_residual", "kkt_pareto", "gram_matrix", "nonneg_quadratic",
           "scaled_params", "clarke_pattern"]  # fmt: skip


class KKT(NamedTuple):
    """``eps``, ``eps_rel = eps / |theta_s|``, ``delta``; ``lam`` (multipliers of the
    ``active`` samples), ``q_min`` of ``theta``, ``norm_s = |theta_s|``, and the NNLS
    optimality check: ``kkt_gap`` (largest violation of ``K lam - L q >= 0`` and of
    complementarity, relative to ``|L q|``). ``delta`` bounds the sum ``sum_n lam_n (q_n
    - 1)``; ``delta_max`` is ``max_n lam_n (q_n - 1)``, the per-term convention (the
    paper's definition C.6 may be either: both are reported, the sum bounds the max)."""

    eps: float
    eps_rel: float
    delta: float
    lam: np.ndarray
    active: np.ndarray
    q_min: float
    norm_s: float
    kkt_gap: float
    delta_max: float = math.nan


def scaled_params(objective: Objective, params):
    """``(theta_s, q_s)``: params scaled to ``q_min = 1`` and the scaled margins."""
    q = np.asarray(objective.margins(params), np.float64)
    q_min = float(q.min())
    if not q_min > 0:
        raise ValueError(
            f"q_min = {q_min:.3g} <= 0: the data are not separated, theta_s is undefined"
        )
    c = q_min ** (-1.0 / objective.order)
    return jax.tree.map(lambda a: a * jnp.asarray(c, a.dtype), params), q / q_min, q_min


def _margin_one(obj: Objective, params, x, y):
    one = eqx.tree_at(lambda o: (o.x, o.y), obj, (x[None], y[None]))
    return one.margins(params)[0]


@jax.jit
def _rows(obj: Objective, params, xb, yb):
    """Per-example margin gradients, flattened: one row per sample of the batch."""
    g = jax.grad(_margin_one, argnums=1)
    return jax.vmap(lambda x, y: ravel_pytree(g(obj, params, x, y))[0])(xb, yb)


@jax.jit
def _rows_with(obj: Objective, params, xb, yb, sb):
    """As ``_rows``, with each sample's activation pattern frozen at its rows of ``sb``."""

    def one(p, x, y, s):
        out = nnx.merge(obj.graphdef, p).with_slopes(x[None], [a[None] for a in s])
        return eqx.tree_at(lambda o: o.y, obj, y[None]).margins_of(out)[0]

    g = jax.grad(one)
    return jax.vmap(lambda x, y, s: ravel_pytree(g(params, x, y, s))[0])(xb, yb, sb)


def _grad_rows(objective: Objective, params, idx: np.ndarray, chunk: int, dim: int,
               slopes=None):  # fmt: skip
    """Rows ``grad q_n`` (flattened) for the samples ``idx``, ``chunk`` at a time;
    ``slopes``: with the activation pattern frozen there (module docstring)."""
    out = np.empty((idx.size, dim), np.float64)
    for s in range(0, idx.size, chunk):
        b = idx[s : s + chunk]
        xb, yb = objective.x[b], objective.y[b]
        rows = (
            _rows(objective, params, xb, yb)
            if slopes is None
            else _rows_with(objective, params, xb, yb, [a[b] for a in slopes])
        )
        out[s : s + b.size] = np.asarray(rows)
    return out


@jax.jit
def _layer_parts(obj: Objective, params, xb, yb):
    """Per layer of a ``Sequential``: its inputs ``A`` (b, rows, fan_in) and the errors
    ``D`` (b, rows, fan_out) of the margins there, so ``grad_W q_n = A_n^T D_n``."""
    model = nnx.merge(obj.graphdef, params)
    b = xb.shape[0]
    shapes = [a.shape for a in jax.eval_shape(model.preactivations, xb)]
    zeros = [jnp.zeros(s, obj.dtype) for s in shapes + [(b, model.num_outputs)]]
    one = eqx.tree_at(lambda o: o.y, obj, yb)

    def total(offsets):
        out, ins = model.layer_io(xb, offsets)
        return one.margins_of(out).sum(), ins

    errs, ins = jax.grad(total, has_aux=True)(zeros)
    errs = [e.reshape(b, -1, e.shape[-1]) for e in errs]
    pairs = list(zip(ins, errs, strict=True))
    dense = [(a[:, 0], e[:, 0]) for a, e in pairs if a.shape[1] == 1]
    explicit = [jnp.einsum("bpk,bpc->bkc", a, e).reshape(b, -1) for a, e in pairs if a.shape[1] > 1]
    biases = [
        e.sum(1) for layer, e in zip(model.layers, errs, strict=True) if layer.bias is not None
    ]
    rows = explicit + biases
    return dense, (jnp.concatenate(rows, axis=1) if rows else jnp.zeros((b, 0), obj.dtype))


def _layerwise_bytes(objective: Objective, params, n: int) -> int | None:
    """Memory the layer-wise Gram holds for ``n`` samples, or None if it does not apply."""
    from gflow.models import Sequential

    try:
        model = nnx.merge(objective.graphdef, params)
    except Exception:  # noqa: BLE001 - a graph this module does not know
        return None
    if not isinstance(model, Sequential):
        return None
    x = jax.ShapeDtypeStruct((1, *objective.x.shape[1:]), objective.x.dtype)
    dense, rows = jax.eval_shape(_layer_parts, objective, params, x, objective.y[:1])
    per = rows.shape[1] + sum(a.shape[1] + e.shape[1] for a, e in dense)
    return 8 * n * per


def _gram_layerwise(objective: Objective, params, idx: np.ndarray, chunk: int) -> np.ndarray:
    """``K`` from per-layer factors: a dense layer adds ``(A A^T) * (D D^T)``
    (``<h_n d_n^T, h_m d_m^T> = (h_n . h_m)(d_n . d_m)``, never forming the per-example
    gradients); convolutions and biases add ``E E^T`` of their explicit gradients."""
    pad = (-idx.size) % chunk if idx.size > chunk else 0
    full = np.concatenate([idx, np.repeat(idx[-1:], pad)])
    size = min(chunk, full.size)
    parts = []
    for s in range(0, full.size, size):
        b = full[s : s + size]
        part = _layer_parts(objective, params, objective.x[b], objective.y[b])
        parts.append(jax.device_get(part))
    n = idx.size
    dense, rows = zip(*parts, strict=True)
    E = np.concatenate([np.asarray(r, np.float64) for r in rows])[:n]
    K = E @ E.T
    for layer in range(len(dense[0])):
        A = np.concatenate([np.asarray(d[layer][0], np.float64) for d in dense])[:n]
        D = np.concatenate([np.asarray(d[layer][1], np.float64) for d in dense])[:n]
        K += (A @ A.T) * (D @ D.T)
    return K


def gram_matrix(
    objective: Objective,
    params,
    idx: np.ndarray | None = None,
    *,
    chunk: int = 64,
    max_bytes: int = 1 << 30,
    method: str = "auto",
    slopes=None,
) -> np.ndarray:
    """``K_nm = <grad q_n, grad q_m>`` at ``params`` over the samples ``idx`` (all if None).

    ``method="layers"`` (the default for gflow's own models when it fits in
    ``max_bytes``) builds ``K`` layer by layer from each layer's inputs and errors:
    for a dense layer ``K_l = (A A^T) * (D D^T)``, so the per-example gradients of the
    large dense layers are never formed (the paper CNN's 1,000-sample Gram takes
    seconds, not minutes). ``method="rows"`` forms the per-example gradients by
    ``vmap``: all of ``idx`` at once when they fit in ``max_bytes``, otherwise block by
    block, recomputing the gradients of one block per block row (memory: two blocks
    of ``chunk`` rows). ``slopes``: gradients with the activation pattern frozen there
    (module docstring; by rows).
    """
    if method not in ("auto", "layers", "rows"):
        raise ValueError(f"method must be 'auto', 'layers' or 'rows', got {method!r}")
    idx = np.arange(objective.num_samples) if idx is None else np.asarray(idx)
    if idx.size == 0:
        return np.zeros((0, 0))
    if slopes is not None:
        method = "rows"
    if method != "rows":
        need = _layerwise_bytes(objective, params, idx.size)
        if need is not None and (method == "layers" or need <= max_bytes):
            return _gram_layerwise(objective, params, idx, chunk)
        if method == "layers":
            raise ValueError("method='layers' needs a gflow Sequential model")
    dim = ravel_pytree(params)[0].size
    if idx.size * dim * 8 <= max_bytes:
        J = _grad_rows(objective, params, idx, chunk, dim, slopes)
        return J @ J.T
    K = np.empty((idx.size, idx.size))
    blocks = [idx[s : s + chunk] for s in range(0, idx.size, chunk)]
    starts = np.cumsum([0] + [b.size for b in blocks])
    for i, bi in enumerate(blocks):
        Ji = _grad_rows(objective, params, bi, chunk, dim, slopes)
        for j in range(i, len(blocks)):
            Jj = Ji if j == i else _grad_rows(objective, params, blocks[j], chunk, dim, slopes)
            blk = Ji @ Jj.T
            K[starts[i] : starts[i + 1], starts[j] : starts[j + 1]] = blk
            K[starts[j] : starts[j + 1], starts[i] : starts[i + 1]] = blk.T
    return K


def nonneg_quadratic(K: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, float]:
    """``argmin_{lam >= 0} lam^T K lam - 2 c^T lam`` for PSD ``K`` and ``c`` in its range.

    Returns ``(lam, gap)``: ``gap`` is the largest violation of the problem's own
    optimality conditions (``K lam - c >= 0``, ``lam_n (K lam - c)_n = 0``), relative to
    ``max(|c|)``.
    """
    K = 0.5 * (K + K.T)
    w, U = np.linalg.eigh(K)
    keep = w > max(w.max(), 0.0) * K.shape[0] * np.finfo(np.float64).eps
    if not keep.any():
        return np.zeros_like(c), 0.0
    r = np.sqrt(w[keep])
    A = r[:, None] * U[:, keep].T  # A^T A = K (on its range)
    b = (U[:, keep].T @ c) / r  # A^T b = c for c in range(K)
    import scipy.optimize  # on first use: its 0.2 s import is not paid by `import gflow`

    lam, _ = scipy.optimize.nnls(A, b, maxiter=50 * K.shape[0])
    g = K @ lam - c
    scale = max(float(np.abs(c).max()), np.finfo(np.float64).tiny)
    gap = max(
        float(np.max(-g, initial=0.0)),
        float(np.max(np.abs(lam * g), initial=0.0)) / max(float(lam.max(initial=0.0)), 1.0),
    )
    return lam, gap / scale


def _problem(objective: Objective, params, gap, chunk: int, max_bytes: int, slopes=None):
    """What both KKT computations start from: ``(objective gathered onto this process,
    theta_s, q(theta_s), q_min(theta), the near-active samples, their Gram matrix)``."""
    if not objective.homogeneous:
        raise ValueError("the KKT residual needs a homogeneous model (theta_s is undefined)")
    objective = local(objective)  # multi-host: gather the samples onto this process
    theta_s, q_s, q_min = scaled_params(objective, jax.tree.map(jnp.asarray, params))
    active = np.nonzero(q_s <= 1 + gap)[0] if gap is not None else np.arange(q_s.size)
    K = gram_matrix(objective, theta_s, active, chunk=chunk, max_bytes=max_bytes, slopes=slopes)
    return objective, theta_s, q_s, q_min, active, K


def kkt_residual(
    objective: Objective,
    params,
    *,
    gap: float | None = 1.0,
    chunk: int = 64,
    max_bytes: int = 1 << 30,
    slopes=None,
) -> KKT:
    """The (eps, delta)-KKT residual at ``params`` (module docstring).

    ``gap``: samples with ``q_n(theta_s) <= 1 + gap`` enter (all if ``None``); samples
    left out get ``lam = 0``, which is optimal for them only if their margin is large,
    so a small ``gap`` can only overstate eps. ``slopes``: the margins' gradients with
    the activation pattern frozen there, a Clarke element other than autodiff's
    (module docstring; ``clarke_pattern``). The margins themselves are the network's.
    """
    if slopes is not None:
        slopes = [jnp.asarray(a, objective.dtype) for a in slopes]
    objective, theta_s, q_s, q_min, active, K = _problem(
        objective, params, gap, chunk, max_bytes, slopes
    )
    L = objective.order
    lam, opt_gap = nonneg_quadratic(K, L * q_s[active])
    full = np.zeros(q_s.size)
    full[active] = lam
    flat = np.asarray(ravel_pytree(theta_s)[0])
    lam_full = jnp.asarray(full, flat.dtype)
    r = np.asarray(
        _residual(objective, theta_s, lam_full)
        if slopes is None
        else _residual_with(objective, theta_s, lam_full, slopes)
    )
    eps = float(np.linalg.norm(r))
    norm_s = float(np.linalg.norm(flat))
    terms = lam * (q_s[active] - 1.0)
    delta = float(np.sum(terms))
    return KKT(eps, eps / norm_s, delta, lam, active, q_min, norm_s, opt_gap,
               float(terms.max(initial=0.0)))  # fmt: skip


def kkt_pareto(
    objective: Objective,
    params,
    *,
    weights=(0.0, 0.01, 0.1, 1.0, 10.0),
    gap: float | None = 1.0,
    chunk: int = 64,
    max_bytes: int = 1 << 30,
) -> list[dict]:
    """The (eps, delta) trade-off at ``params``: ``kkt_residual``'s multipliers minimise
    eps alone; here ``lam >= 0`` minimises ``eps^2 + w |theta_s|^2 delta`` for each weight
    ``w`` (``weights``; 0 is ``kkt_residual``'s point), so that delta falls as eps is
    allowed to grow: each row is a Pareto point ``(eps, eps_rel, delta, delta_max)`` with
    its ``w``, multipliers ``lam`` and the ``active`` samples they belong to. ``delta =
    sum_n lam_n (q_n - 1)`` (a bound on every term) and ``delta_max = max_n lam_n (q_n -
    1)`` (the per-term convention) are both reported. Solved as a
    bound-constrained quadratic (L-BFGS-B) on the near-active samples' Gram matrix; eps
    from the quadratic form (``kkt_residual`` recomputes it from the residual vector)."""
    objective, theta_s, q_s, _, active, K = _problem(objective, params, gap, chunk, max_bytes)
    K = 0.5 * (K + K.T)
    L = objective.order
    q = q_s[active]
    norm2 = float(np.sum(np.asarray(ravel_pytree(theta_s)[0]) ** 2))
    slack = q - 1.0
    lam0, _ = nonneg_quadratic(K, L * q)
    import scipy.optimize

    rows = []
    for w in weights:
        c = L * q - 0.5 * w * norm2 * slack  # minimise lam K lam - 2 c.lam (+ |theta_s|^2)
        if w == 0:
            lam = lam0
        else:
            res = scipy.optimize.minimize(
                lambda v, c=c: (float(v @ K @ v - 2 * c @ v), 2 * (K @ v - c)), lam0, jac=True,
                method="L-BFGS-B", bounds=[(0, None)] * q.size,
                options=dict(maxiter=20 * q.size + 200, ftol=1e-15, gtol=1e-12),
            )  # fmt: skip
            lam = res.x
        eps2 = max(norm2 - 2 * L * float(lam @ q) + float(lam @ K @ lam), 0.0)
        terms = lam * slack
        rows.append(dict(weight=float(w), eps=math.sqrt(eps2),
                         eps_rel=math.sqrt(eps2 / norm2), delta=float(terms.sum()),
                         delta_max=float(terms.max(initial=0.0)), lam=lam,
                         active=active))  # fmt: skip
    return rows


@jax.jit
def _residual(obj: Objective, theta_s, lam):
    """``theta_s - sum_n lam_n grad q_n(theta_s)`` = ``theta_s - grad (lam . q)``, flat."""
    g = jax.grad(lambda p: jnp.dot(lam, obj.margins(p)))(theta_s)
    return ravel_pytree(theta_s)[0] - ravel_pytree(g)[0]


@jax.jit
def _residual_with(obj: Objective, theta_s, lam, slopes):
    """``_residual`` with the activation pattern frozen at ``slopes``."""

    def q(p):
        return obj.margins_of(nnx.merge(obj.graphdef, p).with_slopes(obj.x, slopes))

    g = jax.grad(lambda p: jnp.dot(lam, q(p)))(theta_s)
    return ravel_pytree(theta_s)[0] - ravel_pytree(g)[0]


def clarke_pattern(objective: Objective, params, sliding: dict) -> list:
    """The activation pattern at ``params`` (``gflow.kinks.pattern``) with the sliding
    pairs at their sliding slopes: ``sliding`` holds ``pairs`` ([layer, sample, unit]
    each) and ``slopes``, as an event-driven flow records them at every save point
    (``Trajectory.config["sliding_pattern"]``)."""
    from gflow.kinks import pattern

    out = [np.array(a) for a in pattern(objective, params)]
    for (layer, n, j), v in zip(sliding.get("pairs", []), sliding.get("slopes", []), strict=True):
        out[int(layer)][int(n), int(j)] = v
    return out
