"""Where a ReLU network's gradient flow meets its kinks (``docs/theory.md``, "What
integrating the flow costs"): the first block of an event-driven integrator.

A hidden unit ``j`` on sample ``n`` switches where its pre-activation ``z_nj(theta)``
crosses 0; there the field ``f = -grad log Loss`` jumps, because the unit's activation
slope ``s_nj`` jumps (ReLU: 1 on the active side, 0 on the other; leaky ReLU: 1 and its
slope). With every other unit's slope held (``Sequential.with_slopes``), the field is
affine in ``s_nj``, and so is the pair's normal speed ``v(s) = <grad z_nj, f(s)>``. From
the two one-sided speeds ``v+ = v(1)`` and ``v- = v(s-)``:

* **crossing**: ``v+`` and ``v-`` have one sign; the flow passes through the surface;
* **attracting**: ``v+ < 0 < v-``, both sides flow into the surface: the flow slides
  along it (Filippov) with the slope ``s*`` in ``[s-, 1]`` that makes ``v(s*) = 0``, the
  minimum-norm Clarke selection's velocity; autodiff's one-sided gradient instead
  chatters across it, and every solver with it converges at first order;
* **repelling**: ``v+ > 0 > v-``: both sides flow away (the flow is not unique there).

``kink_report`` finds the pairs near their surface and classifies them. It supports
gflow's dense networks (MLPs); a convolution's or max-pool's kinks are not covered yet.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gflow.models import LEAKY_SLOPE, Sequential
from gflow.objective import Objective

__all__ = ["KinkReport", "kink_model", "off_slope", "pattern", "field_with", "kink_report",
           "kinks_along", "sliding_field", "normal_speeds", "CROSSING", "ATTRACTING",
           "REPELLING"]  # fmt: skip

CROSSING, ATTRACTING, REPELLING, TANGENT = "crossing", "attracting", "repelling", "tangent"


def kink_model(objective: Objective, params) -> Sequential:
    """The gflow network behind ``objective`` at ``params``, checked to be one whose kinks
    are known (a dense ReLU / leaky-ReLU ``Sequential``): a ``ValueError`` otherwise."""
    model = nnx.merge(objective.graphdef, params) if not callable(objective.graphdef) else None
    if not isinstance(model, Sequential) or model.activation not in ("relu", "leaky_relu"):
        raise ValueError("kinks are known for gflow's ReLU / leaky-ReLU networks only")
    if any(op[0] != "F" for op in model.ops):
        raise ValueError("kink analysis covers dense networks (MLPs) for now")
    return model


def off_slope(model: Sequential) -> float:
    """The activation's slope below its kink: 0 (ReLU) or the leaky slope."""
    return 0.0 if model.activation == "relu" else LEAKY_SLOPE


def pattern(objective: Objective, params) -> list:
    """The activation pattern at ``params``: each hidden layer's slopes (n, units), 1
    where the pre-activation is positive, else 0 (leaky ReLU: its slope)."""
    model = kink_model(objective, params)
    return _pattern_of(model.preactivations(objective.x), off_slope(model))


def _pattern_of(zs: list, off: float) -> list:
    return [jnp.where(z > 0, 1.0, off).astype(z.dtype) for z in zs]


def _preacts(objective: Objective, params, slopes) -> list:
    found: list = []
    nnx.merge(objective.graphdef, params)._forward(objective.x, found, slopes=slopes)
    return found


def field_with(objective: Objective, params, slopes):
    """``-grad log Loss`` with the activation pattern frozen at ``slopes`` (the flow's
    direction on every clock, up to a positive factor)."""

    def log_loss(p):
        out = nnx.merge(objective.graphdef, p).with_slopes(objective.x, slopes)
        return objective.loss.log_loss(out, objective._labels(out))

    return jax.tree.map(jnp.negative, jax.grad(log_loss)(params))


class KinkReport(NamedTuple):
    """The pairs within ``tol`` of their surface, one entry each: ``layer`` (hidden layer
    index), ``sample``, ``unit``, ``z`` (the pre-activation) and ``z_rel`` (it over
    ``|h_n| |w_j|``), the one-sided normal speeds ``v_plus`` / ``v_minus``, ``kind``
    (``CROSSING`` / ``ATTRACTING`` / ``REPELLING`` / ``TANGENT``) and ``slope``, the
    sliding slope ``s*`` for an attracting pair (NaN otherwise)."""

    layer: np.ndarray
    sample: np.ndarray
    unit: np.ndarray
    z: np.ndarray
    z_rel: np.ndarray
    v_plus: np.ndarray
    v_minus: np.ndarray
    kind: np.ndarray
    slope: np.ndarray

    def counts(self) -> dict:
        kinds, n = np.unique(self.kind, return_counts=True)
        return {str(k): int(c) for k, c in zip(kinds, n, strict=True)}


def _one_sided(objective: Objective, params, slopes, layer: int, sample, unit, value):
    """The normal speed of pair (layer, sample, unit) with its slope set to ``value``."""
    pair = [(layer, sample, unit)]
    return normal_speeds(objective, params, _with_pairs(slopes, pair, [value]), pair)[0]


@functools.partial(jax.jit, static_argnames=("layer", "off"))
def _pair_speeds(objective: Objective, params, slopes, ns, js, *, layer: int, off: float):
    """``(v+, v-)`` of the pairs ``(layer, ns[i], js[i])``: one jitted kernel per layer and
    number of pairs, reused along a run (``kinks_along``)."""

    def both(n, j):
        return (_one_sided(objective, params, slopes, layer, n, j, 1.0),
                _one_sided(objective, params, slopes, layer, n, j, off))  # fmt: skip

    return jax.vmap(both)(ns, js)


def kink_report(objective: Objective, params, *, tol: float = 1e-6) -> KinkReport:
    """Classify every (sample, unit) pair whose pre-activation is within ``tol`` of 0
    relative to ``|h_n| |w_j|`` (its input's and its weights' norms), from its two
    one-sided normal speeds (module docstring)."""
    model = kink_model(objective, params)
    off = off_slope(model)
    zs = model.preactivations(objective.x)
    slopes = _pattern_of(zs, off)
    # the inputs of each hidden layer: x, then the activations below
    ins = [objective.x.reshape(objective.num_samples, -1)]
    for z, s in zip(zs[:-1], slopes[:-1], strict=True):
        ins.append(s * z)
    rows = []
    for k, z in enumerate(zs):
        w = params["layers"][k]["kernel"]  # (fan_in, units)
        scale = jnp.linalg.norm(ins[k], axis=1)[:, None] * jnp.linalg.norm(w, axis=0)[None, :]
        rel = np.asarray(jnp.abs(z) / jnp.where(scale > 0, scale, 1.0))
        near = np.argwhere(rel <= tol)
        if not near.size:
            continue
        ns, js = jnp.asarray(near[:, 0]), jnp.asarray(near[:, 1])
        vp, vm = _pair_speeds(objective, params, slopes, ns, js, layer=k, off=off)
        for (n, j), a, b in zip(near, np.asarray(vp), np.asarray(vm), strict=True):
            rows.append((k, int(n), int(j), float(z[n, j]), float(rel[n, j]), float(a), float(b)))
    if not rows:
        empty = np.zeros(0)
        return KinkReport(empty.astype(int), empty.astype(int), empty.astype(int), empty,
                          empty, empty, empty, np.zeros(0, dtype="<U10"), empty)  # fmt: skip
    layer, sample, unit, z, z_rel, vp, vm = (np.asarray(c) for c in zip(*rows, strict=True))
    kind = np.select(
        [vp * vm > 0, (vp < 0) & (vm > 0), (vp > 0) & (vm < 0)],
        [CROSSING, ATTRACTING, REPELLING],
        TANGENT,
    )
    # v is affine in the slope: v(s) = v- + (s - s-) / (1 - s-) (v+ - v-); v(s*) = 0
    with np.errstate(divide="ignore", invalid="ignore"):
        star = off + (1 - off) * vm / (vm - vp)
    slope = np.where(kind == ATTRACTING, star, np.nan)
    return KinkReport(layer, sample, unit, z, z_rel, vp, vm, kind, slope)


def _with_pairs(slopes, pairs, values):
    out = list(slopes)
    for (layer, n, j), v in zip(pairs, values, strict=True):
        out[layer] = out[layer].at[n, j].set(v)
    return out


def normal_speeds(objective: Objective, params, slopes, pairs):
    """``d z_k / d tau`` of each pair ``(layer, sample, unit)`` in ``pairs`` along the
    field with the pattern ``slopes`` (one gradient and one Jacobian-vector product)."""
    f = field_with(objective, params, slopes)

    def zs(p):
        pre = _preacts(objective, p, slopes)
        return jnp.stack([pre[layer][n, j] for layer, n, j in pairs])

    return jax.jvp(zs, (params,), (f,))[1]


def sliding_field(objective: Objective, params, slopes, pairs, *, iters: int = 2):
    """The Filippov field with the pairs ``pairs`` sliding: their slopes chosen so that
    every one's normal speed is zero, the rest of the pattern ``slopes`` held. Returns
    ``(field, sliding slopes)``. The normal speeds are affine in each slope, and jointly
    affine for pairs in one hidden layer; Newton's method on the K x K system (its
    columns from K + 1 evaluations of the speeds) is then exact in one step, and the
    second step absorbs the bilinear terms of pairs in different layers. Slopes outside
    ``[s-, 1]`` mean that a pair leaves its surface (the caller's event)."""
    pairs = [tuple(int(v) for v in p) for p in pairs]
    k = len(pairs)
    dtype = slopes[0].dtype
    s = jnp.asarray([slopes[layer][n, j] for layer, n, j in pairs], dtype)
    for _ in range(iters):
        v0 = normal_speeds(objective, params, _with_pairs(slopes, pairs, s), pairs)
        cols = []
        for m in range(k):
            shifted = s.at[m].add(1.0)
            vm = normal_speeds(objective, params, _with_pairs(slopes, pairs, shifted), pairs)
            cols.append(vm - v0)
        s = s - jnp.linalg.solve(jnp.stack(cols, axis=1), v0)
    final = _with_pairs(slopes, pairs, s)
    return field_with(objective, params, final), s


def kinks_along(objective: Objective, traj, *, tol: float = 1e-3) -> list[dict]:
    """``kink_report``'s counts at each parameter snapshot of a run (``save_params``):
    ``{"log_t", "near", "crossing", "attracting", "repelling", "tangent"}`` per save
    point, so that how many pairs slide, and when, can be read along the run."""
    if not traj.snapshots:
        raise ValueError("the run saved no parameters: run it with save_params=True")
    out = []
    for i, snap in enumerate(traj.snapshots):
        report = kink_report(objective, jax.tree.map(jnp.asarray, snap), tol=tol)
        counts = report.counts()
        row = {"log_t": float(traj["log_t"][i]), "near": int(len(report.kind))}
        row.update({k: counts.get(k, 0) for k in (CROSSING, ATTRACTING, REPELLING, TANGENT)})
        out.append(row)
    return out
