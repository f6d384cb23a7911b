"""Gradient flow through ReLU kinks, event by event (``docs/theory.md``, "What
integrating the flow costs"; ``gflow.kinks`` has the vocabulary).

Between kinks a ReLU network's field is smooth: with the activation pattern frozen
(each hidden (sample, unit) pair's slope held at 1 or 0, leaky ReLU: its slope) the
network is polynomial in its weights. ``KinkStepping`` integrates that smooth field with
a diffrax Runge-Kutta solver under diffrax's PID error control, and ends a step where a
pair's pre-activation crosses zero:

* **switch location**: after every accepted step each pair's signed pre-activation
  ``sigma z / (|h_n| |w_j|)`` is checked at the step's end; for the pairs past
  ``-margin`` the first crossing is root-found by bisection on the step's dense output
  (first layer: on the pre-activations' own interpolant; deeper: single-sample forward
  passes; no gradient) and the step is cut there;
* **classification**: the crossing pair's normal speed on the far side decides. If the
  far side carries it on, the pattern flips (a transversal crossing). If the far side
  pushes it back, both sides flow into the surface: the pair **slides**;
* **sliding**: a sliding pair's slope is not frozen but solved for, at every field
  evaluation, so that its normal speed is zero (the Filippov / minimum-norm Clarke
  velocity). Several sliding pairs make a K x K linear system; its columns come from
  single-sample Jacobian-vector products (a pair's slope only changes its own sample's
  gradient), never from a dense Jacobian. With one hidden layer the field is affine in
  the slopes and one solve is exact; deeper, a few Newton steps;
* **exit**: a sliding pair leaves its surface when its slope leaves ``[s-, 1]``; checked
  after every accepted step while anything slides (a FSAL solver's stored stage carries
  the slopes), located by Illinois regula falsi on the dense output, and the pair
  rejoins the side it leaves to.

* **fallback**: where switches come too thick for events to pay, the run goes on by
  ``gflow run``'s stability stepping (Ralston at cfl 0.14) and says so. Every
  ``window`` events the window's gradient evaluations per unit tau are compared with
  that stepping's at the state reached (below the loss threshold: its cfl step from
  one Lanczos; above: a probe of its error-controlled warm-up); past ``fallback``
  (default 100) times it, the stepping takes over from that state, continuing the
  run's invariant monitors, counters and save points. Measured: at most 34 on the
  default problem, 480 to 650 on the wide one (``benchmarks/RESULTS.md``).

Invariants stay monitors: nothing is projected. Counters go into the trajectory:
``crossings``, ``slide_entries``, ``slide_exits``, ``sliding`` (pairs sliding now),
``sliding_span`` (the log t spent with at least one pair sliding), ``sliding_offset``
(the largest ``|z| / (|h_n| |w_j|)`` over sliding pairs: how well the surface is kept),
``events`` and ``grad_evals`` (full-batch gradients; the per-pair work is counted in
``pair_evals``, single-sample gradient-equivalents). ``config["sliding_pattern"]`` holds,
for every save point, the sliding pairs (``[layer, sample, unit]``) and their slopes: the
Clarke element of the margins' gradients that the flow is made of (``gflow.kkt``).

Dense networks (MLPs) of gflow's own, ReLU or leaky ReLU, on the loss clock.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from flax import nnx
from jax.flatten_util import ravel_pytree

from gflow.dynamics.gd import log1p_of_log_t, log_t_grid, log_t_of_log1p, quantities_many
from gflow.dynamics.solvers import (
    DEFAULT_TOL,
    check_tolerances,
    default_cfl,
    evals_per_step,
    finite_positive,
    is_fixed_step,
    make_solver,
    positive_int,
    real_scalar,
    solver_name,
    stability_edge,
)
from gflow.kinks import _model, _off_slope
from gflow.models import check_finite_params
from gflow.objective import Objective
from gflow.quantities import sq_norm
from gflow.spectrum import lanczos_top
from gflow.trajectory import Trajectory, TrajectoryRecorder

__all__ = ["KinkStepping", "run_flow_kinks"]


FALLBACK = 100.0  # measured crossover: benchmarks/RESULTS.md, "Event cost"
_STABLE = "ralston"  # the fallback: gflow run's default stepping
_PROBE = 8  # warm-up steps that measure the fallback's cost above the loss threshold


class KinkStepping(NamedTuple):
    """Event-driven stepping through ReLU kinks, as a ``stepsize_controller`` for
    ``run_flow`` (module docstring): ``solver`` (set in ``run_flow``) with diffrax's PID
    control at ``rtol`` / ``atol`` on the smooth pieces; a crossing registers when a
    pair is ``margin`` (relative to ``|h_n| |w_j|``) past its surface; at most
    ``max_sliding`` pairs slide at once. ``dt``: steps of a fixed length in the loss
    clock's tau instead (cut at every event), for order studies. ``fallback``: every
    ``window`` events the window's gradient evaluations per unit tau are compared with
    stability stepping's at the state reached (``gflow run``'s default: Ralston at cfl
    0.14 of ``lambda_max``, one Lanczos); past ``fallback`` times it, the run goes on by
    stability stepping and says so (``config["handover"]``, the message; module
    docstring). ``None``: never; nor with a fixed ``dt``."""

    rtol: float = 1e-8
    atol: float = 1e-12
    margin: float = 1e-12
    max_sliding: int = 256
    dt: float | None = None
    fallback: float | None = FALLBACK
    window: int = 256


_BUCKETS = (0, 4, 16, 64, 256, 1024)
_MAX_STALLED = 64  # simultaneous switches are handled in one event: more is a livelock


class _Net(NamedTuple):
    """A dense network's kink geometry: hidden widths, samples, the off slope."""

    widths: tuple
    n: int
    off: float

    @property
    def units(self) -> int:
        return int(sum(self.widths))


def _split(s, widths):
    out, i = [], 0
    for w in widths:
        out.append(s[..., i : i + w])
        i += w
    return out


def _forward(obj: Objective, theta, x, slopes, net: _Net):
    """``(outputs, z (n, U), scale (n, U))`` with the pattern ``slopes`` (n, U) frozen;
    ``scale`` is ``|h_n| |w_j|``, the input's and the unit's weights' norms."""
    model = nnx.merge(obj.graphdef, theta)
    zs, ins = [], []
    out = model._forward(x, zs, None, ins, slopes=_split(slopes, net.widths))
    hidden = len(net.widths)
    scale = [
        jnp.linalg.norm(ins[k][:, 0, :], axis=1)[:, None]
        * jnp.linalg.norm(theta["layers"][k]["kernel"], axis=0)[None, :]
        for k in range(hidden)
    ]
    return out, jnp.concatenate(zs, axis=1), jnp.concatenate(scale, axis=1)


def _relative(z, scale):
    """``z / (|h_n| |w_j|)``, a pair's pre-activation relative to its scale."""
    return z / jnp.where(scale > 0, scale, 1.0)


def _slack(s, off):
    """How far sliding slopes ``s`` are inside ``[off, 1]`` (negative: outside)."""
    return jnp.minimum(s - off, 1.0 - s)


def _newton_iters(net: _Net) -> int:
    """Newton steps for the sliding slopes: the field is affine in them with one hidden
    layer (one solve is exact), not deeper."""
    return 1 if len(net.widths) == 1 else 3


def _log_loss(obj: Objective, out):
    return obj.loss.log_loss(out, obj._labels(out))


def _one(obj, theta, x1, row, net):
    """One sample's ``(output, z (U,))`` with its pattern row ``row`` (U,)."""
    out, z, _ = _forward(obj, theta, x1[None], row[None], net)
    return out[0], z[0]


def _field(obj: Objective, theta, slopes, idx, net: _Net, iters: int):
    """``(f, s, log Loss)``: ``f = -grad log Loss`` with the pattern ``slopes`` (n, U)
    frozen except the sliding pairs ``idx`` (flat ``n * U`` indices, -1 padding), whose
    slopes ``s`` make their normal speeds zero."""
    n, u = net.n, net.units
    k = idx.shape[0]

    def full(s_all):
        out, back = jax.vjp(lambda th: _forward(obj, th, obj.x, s_all, net)[0], theta)
        ell, omega = jax.value_and_grad(lambda o: _log_loss(obj, o))(out)
        return ell, omega, jax.tree.map(jnp.negative, back(omega)[0])

    if k == 0:
        ell, _, f = full(slopes)
        return f, jnp.zeros((0,), slopes.dtype), ell
    valid = idx >= 0
    safe = jnp.where(valid, idx, 0)
    rows_of, units_of = safe // u, safe % u
    xs = obj.x[rows_of]
    unravel = ravel_pytree(theta)[1]

    def place(s):
        return slopes.reshape(-1).at[jnp.where(valid, idx, n * u)].set(s, mode="drop").reshape(n, u)

    s = jnp.full((k,), 0.5 * (1.0 + net.off), slopes.dtype)
    for _ in range(iters):
        s_all = place(s)
        ell, omega, f0 = full(s_all)
        rows, om = s_all[rows_of], omega[rows_of]

        def sample_grad(row, x1, o1):
            return jax.grad(lambda th: jnp.sum(o1 * _one(obj, th, x1, row, net)[0]))(theta)

        def tangent(row, x1, o1, j):
            e = jnp.zeros_like(row).at[j].set(1.0)
            return ravel_pytree(jax.jvp(lambda r: sample_grad(r, x1, o1), (row,), (e,))[1])[0]

        def z_grad(row, x1, j):
            return ravel_pytree(jax.grad(lambda th: _one(obj, th, x1, row, net)[1][j])(theta))[0]

        t = jax.vmap(tangent)(rows, xs, om, units_of)  # d grad / d s_m = t_m: df = -t ds
        gz = jax.vmap(z_grad)(rows, xs, units_of)
        f0_flat = ravel_pytree(f0)[0]
        v0 = jnp.where(valid, gz @ f0_flat, 0.0)
        jac = -(gz @ t.T)
        both = valid[:, None] & valid[None, :]
        jac = jnp.where(both, jac, jnp.eye(k, dtype=jac.dtype))
        ds = -jnp.linalg.solve(jac, v0)
        ds = jnp.where(valid, ds, 0.0)
        s = s + ds
        f_flat = f0_flat - ds @ t
    return unravel(f_flat), s, ell


class _Kernels(NamedTuple):
    advance: Callable
    locate_first_layer: Callable
    locate_crossings: Callable
    locate_exit: Callable
    locate_save: Callable
    classify: Callable
    probe: Callable
    interpolate: Callable


@functools.cache
def _kernels(net: _Net, k: int, solver, controller, dtype: str) -> _Kernels:
    """The jitted pieces for ``k`` sliding slots (0 when nothing slides)."""
    iters = _newton_iters(net)
    off = net.off

    def vf(tau, y, args):
        # y = (theta, z = log(1 + t), D, r): r's rate is the sliding slopes, so that a
        # FSAL solver's stored first stage hands them over at every step's end for free
        obj, slopes, idx = args
        f, s, ell = _field(obj, y[0], slopes, idx, net, iters)
        return f, jnp.exp(-ell - y[1]), sq_norm(f), s

    term = diffrax.ODETerm(vf)
    error_order = solver.error_order(term)

    def signed(slopes, z, scale):
        sigma = jnp.where(slopes > 0.5 * (1.0 + off), 1.0, -1.0)
        return sigma * _relative(z, scale)

    def sliding_mask(idx):
        flat = jnp.zeros(net.n * net.units, bool)
        return flat.at[jnp.where(idx >= 0, idx, net.n * net.units)].set(True, mode="drop")

    def crossed(obj, y, slopes, idx, thr):
        _, z, scale = _forward(obj, y[0], obj.x, slopes, net)
        rel = signed(slopes, z, scale).reshape(-1)
        return (~sliding_mask(idx)) & (rel < -thr.reshape(-1))

    def exit_margin(obj, y, slopes, idx):
        _, s, _ = _field(obj, y[0], slopes, idx, net, iters)
        return jnp.min(jnp.where(idx >= 0, _slack(s, off), jnp.inf)), s

    @eqx.filter_jit
    def advance(obj, slopes, idx, thr, y0, tau0, h0, z_target, budget, f0=None):
        """Steps from ``(tau0, y0)`` until an accepted step ends past a kink, an exit or
        the save point (``z >= z_target``), or ``budget`` steps. Returns the last step's
        start and end, its dense output, the controller's next step and counts. ``f0``:
        the field at ``y0`` if known (a FSAL solver then starts without evaluating it). The
        last return is the mask (n * U,) of the non-sliding pairs past ``-thr`` at the end."""
        args = (obj, slopes, idx)
        y0 = (*y0, jnp.zeros((k,), y0[0]["layers"][0]["kernel"].dtype))
        tnext, cstate = controller.init(term, tau0, tau0 + h0, y0, h0, args, solver.func,
                                        error_order)  # fmt: skip
        sstate = solver.init(term, tau0, tnext, y0, args)
        fsal = isinstance(sstate, tuple)
        if fsal and f0 is not None:
            sstate = (jnp.asarray(False), f0)
        shapes = jax.eval_shape(lambda: solver.step(term, tau0, tnext, y0, args, sstate, False))
        dense0 = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes[2])

        class C(NamedTuple):
            tau: jax.Array
            tnext: jax.Array
            y: tuple
            sstate: object
            cstate: object
            steps: jax.Array
            accepted: jax.Array
            stop: jax.Array  # 0 go on, 1 event, 2 failed, 3 event with an exit
            a: jax.Array
            ya: tuple
            dense: object
            mask: jax.Array  # the pairs past -thr at the last accepted step's end

        def cond(c):
            return (c.stop == 0) & (c.steps < budget)

        def body(c):
            y1, err, dense, sstate, res = solver.step(term, c.tau, c.tnext, c.y, args, c.sstate,
                                                      False)  # fmt: skip
            err = jax.tree.map(lambda e: jnp.where(jnp.isnan(e), jnp.inf, e), err)
            keep, tprev, tnext, _, cstate, cres = controller.adapt_step_size(
                c.tau, c.tnext, c.y, y1, args, err, error_order, c.cstate
            )
            keep = jnp.asarray(keep)
            finite = functools.reduce(
                jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(y1)]
            )
            ok = (res == diffrax.RESULTS.successful) & (cres == diffrax.RESULTS.successful)
            mask = crossed(obj, y1, slopes, idx, thr)
            event = mask.any() | (y1[1] >= z_target)
            if k:
                if fsal:
                    s1 = sstate[1][3]  # the field's sliding slopes at y1 (FSAL)
                    gap = jnp.min(jnp.where(idx >= 0, _slack(s1, off), jnp.inf))
                else:
                    gap = exit_margin(obj, y1, slopes, idx)[0]
                event = event | (gap < 0)
            event = keep & event
            stop = jnp.where(~(ok & finite), 2, jnp.where(event, 1, 0))
            if k:  # 3: an event, and a sliding slope out of [s-, 1] among them
                stop = jnp.where((stop == 1) & (gap < 0), 3, stop)

            def pick(new, old):
                return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)

            return C(
                tau=jnp.where(keep, tprev, c.tau), tnext=tnext, y=pick(y1, c.y),
                sstate=pick(sstate, c.sstate), cstate=cstate, steps=c.steps + 1,
                accepted=c.accepted + keep.astype(int), stop=stop,
                a=jnp.where(keep, c.tau, c.a), ya=pick(c.y, c.ya),
                dense=jax.tree.map(lambda a, b: jnp.where(keep, a, b), dense, c.dense),
                mask=jnp.where(keep, mask, c.mask),
            )  # fmt: skip

        c0 = C(tau0, tnext, y0, sstate, cstate, jnp.zeros((), int), jnp.zeros((), int),
               jnp.zeros((), int), tau0, y0, dense0,
               jnp.zeros(net.n * net.units, bool))  # fmt: skip
        c = jax.lax.while_loop(cond, body, c0)
        return (c.a, c.ya[:3], c.tau, c.y[:3], c.dense, c.tnext - c.tau, c.steps, c.accepted,
                c.stop, c.mask)  # fmt: skip

    def interp(a, b, dense, tau):
        return solver.interpolation_cls(t0=a, t1=b, **dense).evaluate(tau)

    def bisect(fn, a, b, iters=64):
        """The first ``tau`` in ``[a, b]`` with ``fn <= 0`` (``fn(a) > 0 >= fn(b)``): the
        bracket's upper end after ``iters`` halvings (so ``fn <= 0`` there)."""

        def body(_, ab):
            lo, hi = ab
            mid = 0.5 * (lo + hi)
            below = fn(mid) <= 0
            return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

        return jax.lax.fori_loop(0, iters, body, (a, b))[1]

    def illinois(fn, a, b, fa, fb, max_iters=60):
        """As ``bisect``, by the Illinois variant of regula falsi (superlinear: each
        evaluation of ``fn`` is a field evaluation here). Returns the bracket's upper end
        and the number of evaluations."""
        eps = jnp.finfo(jnp.result_type(a)).eps

        def cond(c):
            lo, hi, _, _, _, n = c
            return (hi - lo > 4 * eps * jnp.maximum(jnp.abs(hi), jnp.abs(lo))) & (n < max_iters)

        def body(c):
            lo, hi, flo, fhi, side, n = c
            x = hi - fhi * (hi - lo) / (fhi - flo)
            x = jnp.where((x > lo) & (x < hi), x, 0.5 * (lo + hi))
            fx = fn(x)
            below = fx <= 0
            # Illinois: halve the value kept at the end that stays twice in a row
            flo2 = jnp.where(below & (side == 1), 0.5 * flo, flo)
            fhi2 = jnp.where(~below & (side == -1), 0.5 * fhi, fhi)
            return (jnp.where(below, lo, x), jnp.where(below, x, hi),
                    jnp.where(below, flo2, fx), jnp.where(below, fx, fhi2),
                    jnp.where(below, 1, -1), n + 1)  # fmt: skip

        c = jax.lax.while_loop(cond, body, (a, b, fa, fb, jnp.zeros((), int), jnp.zeros((), int)))
        return c[1], c[5]

    w0 = net.widths[0]

    def first_layer(obj, dense):
        """The step's dense output mapped to the first hidden layer's pre-activations
        (n, w0): z = x W1 is linear in theta, and every diffrax interpolation is linear in
        its data, so this is z's own interpolant, exactly."""
        x = obj.x.reshape(net.n, -1)

        def lin(v):
            kernel = v[0]["layers"][0]["kernel"]
            if kernel.ndim == 2:
                return x @ kernel
            return jnp.einsum("nd,sdw->snw", x, kernel)

        return {key: lin(v) for key, v in dense.items()}

    @eqx.filter_jit
    def locate_first_layer(obj, slopes, thr, idx, a, b, dense, grid=32, iters=64):
        """``(tau, hit)``: when the first non-sliding first-layer pair reaches ``-thr``
        (signed, relative) in ``[a, b]``, and which pairs have by then (n, w0); ``b`` and
        none if no pair does. A grid of ``grid`` points brackets the first crossing, also
        one that dips in and out within the step; bisection on the pre-activations'
        interpolant (no forward pass) locates it."""
        dz = first_layer(obj, dense)
        theta_b = interp(a, b, dense, b)[0]
        x = obj.x.reshape(net.n, -1)
        scale = (jnp.linalg.norm(x, axis=1)[:, None]
                 * jnp.linalg.norm(theta_b["layers"][0]["kernel"], axis=0)[None, :])  # fmt: skip
        free = ~sliding_mask(idx).reshape(net.n, net.units)[:, :w0]
        t0 = thr[:, :w0]

        def g(tau):
            z = solver.interpolation_cls(t0=a, t1=b, **dz).evaluate(tau)
            return jnp.where(free, signed(slopes[:, :w0], z, scale) + t0, jnp.inf)

        nodes = a + (b - a) * jnp.arange(1, grid + 1, dtype=a.dtype) / grid
        low = jax.vmap(lambda tau: jnp.min(g(tau)))(nodes)
        k = jnp.argmax(low <= 0)  # the first node past a kink
        found = low[k] <= 0
        lo = jnp.where(k > 0, nodes[jnp.maximum(k - 1, 0)], a)
        hi = nodes[k]
        tau = bisect(lambda t: jnp.min(g(t)), lo, hi, iters)
        tau = jnp.where(found, tau, b)
        # the bisection leaves tau at the root to rounding, where g re-evaluated outside
        # its loop may read +1 ulp: the first pair to cross is a hit all the same (else
        # the step was taken as it was and its switches made one step late)
        gt = g(tau)
        return tau, found & (gt <= jnp.maximum(jnp.min(gt), 0.0))

    @eqx.filter_jit
    def locate_crossings(obj, slopes, thr, a, b, dense, cand):
        """For each candidate flat pair index in ``cand`` (-1 padding): when its signed,
        relative pre-activation reaches ``-thr`` on the dense output (``b`` if never)."""

        def one(p):
            safe = jnp.maximum(p, 0)
            i, j = safe // net.units, safe % net.units
            row, x1, t = slopes[i], obj.x[i], thr.reshape(-1)[safe]

            def g(tau):
                theta = interp(a, b, dense, tau)[0]
                out, z, scale = _forward(obj, theta, x1[None], row[None], net)
                return signed(row[None], z, scale)[0, j] + t

            return jnp.where(p >= 0, bisect(g, a, b), b)

        return jax.vmap(one)(cand)

    @eqx.filter_jit
    def locate_exit(obj, slopes, idx, a, b, dense, fa, fb):
        """When the first sliding slope leaves ``[s-, 1]`` (``fa``, ``fb``: the margin
        ``min(s - s-, 1 - s)`` at ``a`` and ``b``); and the field evaluations spent."""
        return illinois(lambda tau: exit_margin(obj, interp(a, b, dense, tau), slopes, idx)[0],
                        a, b, fa, fb)  # fmt: skip

    @eqx.filter_jit
    def locate_save(a, b, dense, z_target):
        return bisect(lambda tau: z_target - interp(a, b, dense, tau)[1], a, b)

    @eqx.filter_jit
    def classify(obj, y, slopes, idx, p):
        """The normal speed of pair ``p`` (flat index) with the pattern ``slopes``, and
        the whole field there (the next step's first stage if nothing else changes)."""
        i, j = p // net.units, p % net.units
        field = vf(None, (*y, jnp.zeros((k,), y[1].dtype)), (obj, slopes, idx))

        def z_of(th):
            return _one(obj, th, obj.x[i], slopes[i], net)[1][j]

        return jax.jvp(z_of, (y[0],), (field[0],))[1], field

    @eqx.filter_jit
    def probe(obj, theta, slopes, idx):
        """``(s, z / (|h_n| |w_j|) (n * U,))``: the sliding slopes and where every pair is
        (a field evaluation only while something slides)."""
        s = _field(obj, theta, slopes, idx, net, iters)[1] if k else jnp.zeros((0,), slopes.dtype)
        _, z, scale = _forward(obj, theta, obj.x, slopes, net)
        return s, _relative(z, scale).reshape(-1)

    interpolate = eqx.filter_jit(interp)
    return _Kernels(advance, locate_first_layer, locate_crossings, locate_exit, locate_save,
                    classify, probe, interpolate)  # fmt: skip


def _layer_pair(p: int, net: _Net) -> list:
    """A flat pair index (sample * units + unit over all hidden layers) as ``[layer,
    sample, unit in that layer]``."""
    i, j = divmod(int(p), net.units)
    for layer, w in enumerate(net.widths):
        if j < w:
            return [layer, i, j]
        j -= w
    raise ValueError(f"pair {p} is past the network's {net.units} units")


def _bucket(k: int, cap: int) -> int:
    for b in _BUCKETS:
        if b >= k:
            return min(b, max(cap, k))
    return k


def _pad(values, size: int) -> jax.Array:
    out = np.full(size, -1, np.int64)
    out[: len(values)] = sorted(values)
    return jnp.asarray(out)


def check_kink_stepping(stepping) -> None:
    """A ``KinkStepping``'s settings, checked before any work: a ``ValueError`` naming
    the setting and its value (tolerances as ``solvers.check_tolerances``)."""
    if not isinstance(stepping, KinkStepping):
        raise TypeError(f"stepping must be a KinkStepping, got {type(stepping).__name__}")
    check_tolerances(stepping.rtol, stepping.atol, "KinkStepping")
    margin, dt = real_scalar(stepping.margin), stepping.dt
    if margin is None or not 0 < margin < 1e-3:
        raise ValueError(f"KinkStepping: margin must be in (0, 1e-3), got {stepping.margin}")
    if dt is not None and not finite_positive(dt):
        raise ValueError(f"KinkStepping: dt must be finite and positive, got dt={dt}")
    fallback = stepping.fallback
    if fallback is not None and not (real_scalar(fallback) or 0.0) > 0:
        raise ValueError(f"KinkStepping: fallback must be positive or None, got {fallback}")
    for key in ("window", "max_sliding"):
        v = getattr(stepping, key)
        if not positive_int(v):
            raise ValueError(f"KinkStepping: {key} must be a positive int, got {v!r}")


def run_flow_kinks(
    objective: Objective,
    params0,
    *,
    stepping: KinkStepping | None = None,
    solver: str | diffrax.AbstractSolver = "tsit5",
    log_t_max: float = 10.0,
    log_loss_min: float | None = None,
    saves: int = 50,
    log_t_min: float = 0.0,
    max_steps: int = 1_000_000,
    save_params: bool = False,
    config: dict | None = None,
    progress: Callable[[dict], None] | None = None,
) -> Trajectory:
    """The gradient flow from ``params0`` to ``log t = log_t_max`` on the loss clock,
    event by event through the kinks (module docstring); save points as ``run_flow``'s."""
    stepping = KinkStepping() if stepping is None else stepping
    check_kink_stepping(stepping)
    check_finite_params(params0)
    model = _model(objective, params0)
    name = solver_name(solver)
    the_solver = make_solver(solver)
    if is_fixed_step(the_solver) or not hasattr(the_solver, "interpolation_cls"):
        raise ValueError(f"KinkStepping needs a solver with an error estimate, got {name!r}")
    if not (math.isfinite(log_t_min) and log_t_max > log_t_min):
        raise ValueError(f"need finite log_t_min < log_t_max, got {log_t_min}, {log_t_max}")
    dtype = objective.dtype
    zs = model.preactivations(objective.x)
    net = _Net(tuple(int(z.shape[1]) for z in zs), objective.num_samples, _off_slope(model))
    controller = (
        diffrax.ConstantStepSize()
        if stepping.dt is not None
        else diffrax.PIDController(rtol=stepping.rtol, atol=stepping.atol, norm=_theta_norm)
    )
    per_step, per_start = evals_per_step(the_solver)
    eta = float(stepping.margin)

    settings = dict(
        dynamics="flow", clock="loss", solver=name, stepping="kinks", rtol=stepping.rtol,
        atol=stepping.atol, margin=eta, max_sliding=stepping.max_sliding, dt=stepping.dt,
        fallback=stepping.fallback, window=stepping.window, cfl=None,
        log_t_max=log_t_max, log_loss_min=log_loss_min, saves=saves, log_t_min=log_t_min,
        log_t0=None, max_steps=max_steps,
    )  # fmt: skip
    cfg = {**objective.describe(), **(config or {}), **settings}
    rec = TrajectoryRecorder("flow", cfg, save_params, progress,
                             objective.invariant_reasons(params0))  # fmt: skip

    slopes = np.concatenate([np.where(np.asarray(z) > 0, 1.0, net.off) for z in zs], axis=1)
    slopes = slopes.astype(np.dtype(dtype))
    thr = np.full(slopes.shape, eta, slopes.dtype)
    sliding: set[int] = set()
    y = (params0, jnp.zeros((), dtype), jnp.zeros((), dtype))
    tau, h = 0.0, None
    count = dict(steps=0, accepted=0, rejected=0, grad_evals=0, pair_evals=0, crossings=0,
                 slide_entries=0, slide_exits=0, events=0)  # fmt: skip
    span = 0.0
    status, message = "completed", f"reached log t = {log_t_max:.6g}"
    log_t_now = -math.inf

    def kern():
        return _kernels(net, _bucket(len(sliding), stepping.max_sliding), the_solver,
                        controller, np.dtype(dtype).name)  # fmt: skip

    def slots():
        return _pad(sliding, _bucket(len(sliding), stepping.max_sliding))

    def field_cost(calls: int) -> None:
        count["grad_evals"] += calls * (_newton_iters(net) if sliding else 1)
        count["pair_evals"] += calls * 3 * len(sliding) * _newton_iters(net)

    def record(log_t: float):
        offset = 0.0  # how far the sliding pairs are from their surfaces
        members = sorted(sliding)
        s_now = []
        if sliding:
            s_all, rel = jax.device_get(ks_probe(y[0]))
            offset = float(np.max(np.abs(rel[members])))
            s_now = [float(v) for v in s_all[: len(members)]]
        # the Clarke element the flow is made of, for the KKT residual (gflow.kkt)
        pattern_at_saves.append(dict(pairs=[_layer_pair(p, net) for p in members], slopes=s_now))
        q = jax.device_get(quantities_many(objective, jax.tree.map(lambda a: a[None], y[0])))
        q = jax.tree.map(lambda a: a[0], q)
        return rec.add(
            count["accepted"], log_t, q, jax.device_get(y[0]),
            dissipation=float(y[2]), solver_steps=float(count["steps"]),
            rejected=float(count["rejected"]), sliding=float(len(sliding)),
            sliding_span=span, sliding_offset=offset,
            **{key: float(count[key]) for key in ("grad_evals", "pair_evals", "crossings",
                                                  "slide_entries", "slide_exits", "events")},
        )  # fmt: skip

    def ks_probe(theta):
        field_cost(1)
        return kern().probe(objective, theta, jnp.asarray(slopes), slots())

    costs: list = []  # [log t, cost ratio] at every check: config["event_cost"]
    window = dict(events=0, evals=0, tau=0.0)
    warm = None

    def cost_ratio() -> float:
        """The last window's gradient evaluations per unit tau over the fallback's at the
        state reached (its evaluations counted in ``grad_evals``). Below the loss
        threshold the fallback steps at ``cfl`` of the stability edge over
        ``lambda_max`` (one Lanczos, amortised over ``refresh`` steps as it is there);
        above it, its error-controlled warm-up runs: ``_PROBE`` of its steps measure it."""
        from gflow.dynamics.flow import (
            _LANCZOS,
            _LOSS_SPAN,
            StabilityStepping,
            _controller,
            _segment_fn,
            _stable_step,
            _stiffness_fns,
        )

        nonlocal warm
        kink_rate = (count["grad_evals"] - window["evals"]) / (tau - window["tau"])
        st = StabilityStepping()
        if float(objective.log_loss(y[0])) >= objective.loss.log_threshold:
            ctrl = _controller(None, False, *DEFAULT_TOL)
            seg, evals = _segment_fn("loss", make_solver(st.warmup), ctrl, _PROBE, dtype)
            t0 = jnp.asarray(tau, dtype)
            out = seg(objective, y, t0, t0 + _LOSS_SPAN, None, y[1] + 1e3)
            spent = evals(int(out[3]))
            count["grad_evals"] += spent
            return kink_rate / (spent / (float(out[1]) - tau))
        jac_matvec, drift_dt = _stiffness_fns("loss")
        flat, unravel = ravel_pytree(y[0])

        def matvec(v):
            return ravel_pytree(jac_matvec(objective, 0.0, y, unravel(jnp.asarray(v, dtype))))[0]

        eig = lanczos_top(matvec, flat.size, v0=warm, **_LANCZOS)
        warm = eig.vector
        lanczos = 2 * eig.matvecs + 1
        h = _stable_step(eig.value, float(drift_dt(objective, 0.0, y, 0.0)), default_cfl(_STABLE),
                         stability_edge(_STABLE), st.drift)  # fmt: skip
        count["grad_evals"] += lanczos
        return kink_rate / ((evals_per_step(make_solver(_STABLE))[0] + lanczos / st.refresh) / h)

    def settle(theta) -> None:
        """Drop sliding pairs whose slope is outside [off, 1] at ``theta``, to the side
        their slope points to, until the rest slide consistently."""
        while sliding:
            s, rel = jax.device_get(ks_probe(theta))
            members = sorted(sliding)
            # out at a slack <= 0, as the exit location has it (a slope exactly at an
            # end of [s-, 1] kept here would be found exiting again at once, forever)
            out = [(p, v) for p, v in zip(members, s[: len(members)], strict=False)
                   if _slack(v, net.off) <= 0]  # fmt: skip
            if not out:
                return
            for p, v in out:
                sliding.discard(p)
                i, j = divmod(p, net.units)
                side = 1.0 if v >= 1.0 else -1.0
                slopes[i, j] = 1.0 if side > 0 else net.off
                # it sits at |z| ~ margin: registers a crossing only once clear of that
                thr[i, j] = 2 * eta + max(0.0, -side * float(rel[p]))
                count["slide_exits"] += 1

    targets = [float(v) for v in log_t_grid(log_t_min, log_t_max, saves)]
    crossed_pairs = np.zeros(net.n * net.units, np.int64)
    f0 = None
    pattern_at_saves: list = []
    stalled = 0  # events in a row at the step's start: a guard against a livelock
    handoff = None
    left_past = 0  # pairs past their surface at a step's end, not switched there

    def go_on(log_t: float, ratio: float):
        """Stability stepping from ``y`` at ``log t`` on (``_drive``, continuing this
        run's monitors and dissipation): its rows join this run's, counters added."""
        from gflow.dynamics.flow import StabilityStepping, _drive

        st = StabilityStepping()
        # below the loss threshold, stability stepping at once; above, its warm-up first
        below = float(objective.log_loss(y[0])) < objective.loss.log_threshold
        warmup = None if below else st.warmup
        fixed = dict(crossings=count["crossings"], slide_entries=count["slide_entries"],
                     slide_exits=count["slide_exits"], events=count["events"],
                     pair_evals=count["pair_evals"], sliding=math.nan,
                     sliding_span=span, sliding_offset=math.nan)  # fmt: skip
        shift = dict(step=count["accepted"], grad_evals=count["grad_evals"],
                     solver_steps=count["steps"], rejected=count["rejected"])  # fmt: skip

        def joined(row: dict) -> dict:
            return {**row, **{k: row[k] + v for k, v in shift.items()}, **fixed}

        each = None if progress is None else (lambda row: progress(joined(row)))
        (tr,) = _drive(
            objective, [y[0]], [0], single=True, clock="loss", solver=_STABLE,
            stepsize_controller=None, rtol=DEFAULT_TOL[0], atol=DEFAULT_TOL[1], dt=None,
            cfl=default_cfl(_STABLE), warmup=warmup,
            refresh=st.refresh, drift=st.drift, log_t_max=log_t_max, log_loss_min=log_loss_min,
            saves=saves, log_t_min=log_t_min, log_t0=log_t,
            max_steps=max(1, max_steps - count["steps"]),
            save_params=save_params, config=None, progress=each, checkpoint=None, resume=False,
            handed=(rec.monitor, float(y[2])),
        )  # fmt: skip
        names = tr.column_names
        for i in range(len(tr)):
            rec.rows.append(joined({k: float(tr[k][i]) for k in names}))
            pattern_at_saves.append(dict(pairs=[], slopes=[]))
        rec.snapshots.extend(tr.snapshots)
        rec.config["handover"] = dict(
            log_t=log_t, cost_ratio=ratio, solver=_STABLE, cfl=default_cfl(_STABLE),
            warmup=warmup, rtol=DEFAULT_TOL[0], atol=DEFAULT_TOL[1],
        )  # fmt: skip
        note = (f"event by event to log t = {log_t:.6g}, then stability stepping ({_STABLE}, "
                f"cfl {default_cfl(_STABLE)}): events cost {ratio:.3g}x its evaluations per "
                f"unit tau, over the fallback {stepping.fallback:g}")  # fmt: skip
        return tr.final_params, tr.status, f"{tr.message}; {note}"

    record(-math.inf)
    try:
        for target in targets:
            z_target = log1p_of_log_t(target)
            while True:
                ks = kern()
                idx = slots()
                h0 = stepping.dt or (h if h is not None else 1e-3)
                budget = max_steps - count["steps"]
                if budget <= 0:
                    status, message = "stopped", f"step budget max_steps = {max_steps} spent"
                    break
                out = ks.advance(objective, jnp.asarray(slopes), idx, jnp.asarray(thr), y,
                                 jnp.asarray(tau, dtype), jnp.asarray(h0, dtype),
                                 jnp.asarray(z_target, dtype), jnp.asarray(min(budget, 200_000)),
                                 f0)  # fmt: skip
                a, ya, b, yb, dense, h_next, n_steps, n_acc, stop, past = out
                n_steps, n_acc, stop = int(n_steps), int(n_acc), int(stop)
                exiting = stop == 3
                stop = 1 if exiting else stop
                count["steps"] += n_steps
                count["accepted"] += n_acc
                count["rejected"] += n_steps - n_acc
                # a FSAL solver hands the exit check its slopes; others evaluate them
                field_cost(n_steps * per_step + (per_start if f0 is None else 0)
                           + (n_acc if sliding and not per_start else 0))  # fmt: skip
                f0 = None
                was_sliding = bool(sliding)
                if stop == 2:
                    status = "failed"
                    message = (f"solver {name} failed before log t = {target:.6g} after "
                               f"{count['steps']} steps")  # fmt: skip
                    y = ya
                    raise _Stop
                if stop == 0:  # budget: go on from where it got
                    y, tau, h = yb, float(b), float(h_next)
                    continue
                # an event in the step [a, b]: find the first one
                cands = [int(p) for p in np.flatnonzero(jax.device_get(past))]
                when = {}
                w0 = net.widths[0]
                first = [p for p in cands if p % net.units < w0]
                deeper = [p for p in cands if p % net.units >= w0]
                crossing: list = []
                if first:
                    t1, hit = jax.device_get(
                        ks.locate_first_layer(
                            objective, jnp.asarray(slopes), jnp.asarray(thr), idx, a, b, dense
                        )
                    )
                    hits = [int(i) * net.units + int(j) for i, j in np.argwhere(hit)]
                    if hits:
                        when["cross"], crossing = float(t1), hits
                if deeper:
                    pad = _pad(deeper, _bucket(len(deeper), 1 << 30))
                    roots = np.asarray(
                        ks.locate_crossings(
                            objective, jnp.asarray(slopes), jnp.asarray(thr), a, b, dense, pad
                        )
                    )
                    t2 = float(np.min(roots[: len(deeper)]))
                    if t2 < when.get("cross", np.inf):
                        when["cross"] = t2
                        crossing = [p for p, r in zip(deeper, roots, strict=False) if r <= t2]
                if exiting:
                    s_b = jax.device_get(ks_probe(yb[0]))[0][: len(sliding)]
                    fb = float(np.min(_slack(s_b, net.off)))
                    exiting = fb < 0  # the FSAL stage's slopes and these agree to rounding
                if exiting:
                    s_a = jax.device_get(ks_probe(ya[0]))[0][: len(sliding)]
                    fa = float(np.min(_slack(s_a, net.off)))
                    if fa <= 0:  # already out at the step's start (settled at every switch)
                        when["exit"] = float(a)
                    else:
                        t_exit, spent = ks.locate_exit(objective, jnp.asarray(slopes), idx, a, b,
                                                       dense, jnp.asarray(fa, dtype),
                                                       jnp.asarray(fb, dtype))  # fmt: skip
                        when["exit"] = float(t_exit)
                        field_cost(int(spent))
                if float(yb[1]) >= z_target:
                    when["save"] = float(ks.locate_save(a, b, dense, jnp.asarray(z_target, dtype)))
                if not when:  # a pair at -margin to rounding: the step is taken as is
                    left_past += len(cands)
                    y, tau, h = yb, float(b), float(h_next)
                    continue
                kind = min(when, key=when.get)
                t_event = when[kind]
                stalled = stalled + 1 if kind != "save" and t_event <= float(a) else 0
                if stalled > _MAX_STALLED:
                    status = "failed"
                    message = (f"{stalled} events in a row at tau = {t_event!r} without a step "
                               f"forward ({kind}; sliding pairs {sorted(sliding)})")  # fmt: skip
                    y = ya
                    raise _Stop
                y = ks.interpolate(a, b, dense, jnp.asarray(t_event, dtype))[:3]
                tau = t_event
                h = float(h_next) if h_next > 0 else h
                lt_e = log_t_of_log1p(float(y[1]))
                if was_sliding and math.isfinite(log_t_now):
                    span += lt_e - log_t_now
                log_t_now = lt_e
                count["events"] += kind != "save"
                if kind == "save":
                    break
                entered = False
                if kind == "cross":
                    for p in crossing:
                        i, j = divmod(p, net.units)
                        old = slopes[i, j]
                        slopes[i, j] = net.off if old == 1.0 else 1.0
                        side = 1.0 if slopes[i, j] == 1.0 else -1.0
                        v, field = ks.classify(objective, y, jnp.asarray(slopes), slots(),
                                               jnp.asarray(p))  # fmt: skip
                        field_cost(1)
                        crossed_pairs[p] += 1
                        if side * float(v) >= 0:
                            count["crossings"] += 1
                            f0 = field
                        else:
                            entered = True
                            sliding.add(p)
                            count["slide_entries"] += 1
                            if len(sliding) > stepping.max_sliding:
                                status = "failed"
                                message = (f"more than max_sliding = {stepping.max_sliding} "
                                           f"pairs slide at log t = {lt_e:.6g}")  # fmt: skip
                                raise _Stop
                if f0 is not None and sliding:
                    # a switch moves the sliding slopes too: one may now leave (seen in
                    # the classification's field, free)
                    if float(np.min(_slack(np.asarray(f0[3])[: len(sliding)], net.off))) < 0:
                        entered = True
                if entered or kind == "exit":
                    f0 = None  # the sliding set changes: the field is evaluated afresh
                    settle(y[0])
                due = count["events"] - window["events"] >= stepping.window and tau > window["tau"]
                if stepping.fallback is not None and stepping.dt is None and due:
                    ratio = cost_ratio()
                    costs.append([lt_e, ratio])
                    window.update(events=count["events"], evals=count["grad_evals"], tau=tau)
                    if ratio > stepping.fallback:
                        raise _Fallback(lt_e, ratio)
            if status != "completed":
                break
            row = record(target)
            if log_loss_min is not None and row["log_loss"] <= log_loss_min:
                message = f"log loss {row['log_loss']:.6g} <= target {log_loss_min:g}"
                break
    except _Stop:
        record(log_t_of_log1p(float(y[1])))
    except _Fallback as fb:
        handoff = fb.args
    except KeyboardInterrupt:
        status, message = "stopped", "interrupted"
    rec.config["event_cost"] = costs
    final = jax.device_get(y[0])
    if handoff is not None:
        final, status, message = go_on(*handoff)
    rec.config["sliding_pattern"] = pattern_at_saves
    rec.config["kink_pairs"] = {
        "pairs": int(net.n * net.units),
        "ever_switched": int(np.sum(crossed_pairs > 0)),
        "most_switches": int(crossed_pairs.max(initial=0)),
        "sliding_at_end": len(sliding),
        # a step's end past -margin whose dense output did not cross (rounding between
        # the two): switched at the next step's start, one step late. Each is a
        # first-order error; 0 is the rule (a bisection's root read back +1 ulp once
        # made 110 on the default problem)
        "left_past": left_past,
    }
    return rec.finish(final, status, message, objective)


class _Stop(Exception):
    pass


class _Fallback(Exception):
    """Event handling costs more than ``KinkStepping.fallback`` times stability stepping:
    ``(log t, cost ratio)``."""


def _theta_norm(y):
    """The error norm, on theta and z only: the dissipation integral D is a monitor, and
    r only carries the sliding slopes (``_kernels``)."""
    return optx.rms_norm(y[:2])
