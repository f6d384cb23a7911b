"""The kernels of kink stepping (``gflow.dynamics.sliding``, which drives them): a
dense ReLU network's field with its activation pattern frozen and its sliding pairs'
slopes solved for (the Filippov velocity), and the jitted pieces that step it under
diffrax's error control, locate crossings, exits and save points on a step's dense
output, and classify a crossing."""

from __future__ import annotations

import functools
from collections.abc import Callable
from enum import IntEnum
from typing import Any, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from flax import nnx
from jax.flatten_util import ravel_pytree

from gflow.objective import Objective
from gflow.quantities import sq_norm

__all__ = [
    "Net", "Kernels", "Stop", "Advance", "kernels", "forward", "relative", "slack",
    "newton_iters", "one_sample", "field", "theta_norm",
]  # fmt: skip


class Net(NamedTuple):
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


def forward(obj: Objective, theta, x, slopes, net: Net):
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


def relative(z, scale):
    """``z / (|h_n| |w_j|)``, a pair's pre-activation relative to its scale."""
    return z / jnp.where(scale > 0, scale, 1.0)


def slack(s, off):
    """How far sliding slopes ``s`` are inside ``[off, 1]`` (negative: outside)."""
    return jnp.minimum(s - off, 1.0 - s)


def newton_iters(net: Net) -> int:
    """Newton steps for the sliding slopes: the field is affine in them with one hidden
    layer (one solve is exact), not deeper."""
    return 1 if len(net.widths) == 1 else 3


def _log_loss(obj: Objective, out):
    return obj.loss.log_loss(out, obj._labels(out))


def one_sample(obj, theta, x1, row, net):
    """One sample's ``(output, z (U,))`` with its pattern row ``row`` (U,)."""
    out, z, _ = forward(obj, theta, x1[None], row[None], net)
    return out[0], z[0]


def field(obj: Objective, theta, slopes, idx, net: Net, iters: int):
    """``(f, s, log Loss)``: ``f = -grad log Loss`` with the pattern ``slopes`` (n, U)
    frozen except the sliding pairs ``idx`` (flat ``n * U`` indices, -1 padding), whose
    slopes ``s`` make their normal speeds zero."""
    n, u = net.n, net.units
    k = idx.shape[0]

    def full(s_all):
        out, back = jax.vjp(lambda th: forward(obj, th, obj.x, s_all, net)[0], theta)
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
            return jax.grad(lambda th: jnp.sum(o1 * one_sample(obj, th, x1, row, net)[0]))(theta)

        def tangent(row, x1, o1, j):
            e = jnp.zeros_like(row).at[j].set(1.0)
            return ravel_pytree(jax.jvp(lambda r: sample_grad(r, x1, o1), (row,), (e,))[1])[0]

        def z_grad(row, x1, j):
            return ravel_pytree(
                jax.grad(lambda th: one_sample(obj, th, x1, row, net)[1][j])(theta)
            )[0]

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


class Kernels(NamedTuple):
    """The jitted pieces of kink stepping for one number of sliding slots."""

    advance: Callable
    locate_first_layer: Callable
    locate_crossings: Callable
    locate_exit: Callable
    locate_save: Callable
    classify: Callable
    probe: Callable
    interpolate: Callable


class Stop(IntEnum):
    """Why ``Kernels.advance`` returned."""

    BUDGET = 0  # its step budget ran out before any event
    EVENT = 1  # an accepted step ended past a kink or the save point
    FAILED = 2  # the solver failed or the state is not finite
    EXIT = 3  # an event, and a sliding slope out of [s-, 1] among them


class Advance(NamedTuple):
    """``Kernels.advance``'s outputs: the last accepted step ``[a, b]`` (states ``ya``,
    ``yb``: theta, z, D), its dense output, the controller's next step, the steps taken
    and accepted, the ``Stop`` code and the mask (n * U,) of the non-sliding pairs past
    ``-thr`` at ``b``."""

    a: jax.Array
    ya: tuple
    b: jax.Array
    yb: tuple
    dense: Any
    h_next: jax.Array
    steps: jax.Array
    accepted: jax.Array
    stop: jax.Array
    past: jax.Array


class _Pieces(NamedTuple):
    """What the kernels of one ``(net, k, solver)`` share: the smooth field with ``k``
    sliding slots as a diffrax term, and the solver."""

    net: Net
    k: int
    solver: Any
    term: diffrax.ODETerm
    iters: int

    def signed(self, slopes, z, scale):
        sigma = jnp.where(slopes > 0.5 * (1.0 + self.net.off), 1.0, -1.0)
        return sigma * relative(z, scale)

    def sliding_mask(self, idx):
        size = self.net.n * self.net.units
        flat = jnp.zeros(size, bool)
        return flat.at[jnp.where(idx >= 0, idx, size)].set(True, mode="drop")

    def crossed(self, obj, y, slopes, idx, thr):
        _, z, scale = forward(obj, y[0], obj.x, slopes, self.net)
        rel = self.signed(slopes, z, scale).reshape(-1)
        return (~self.sliding_mask(idx)) & (rel < -thr.reshape(-1))

    def exit_margin(self, obj, y, slopes, idx):
        _, s, _ = field(obj, y[0], slopes, idx, self.net, self.iters)
        return jnp.min(jnp.where(idx >= 0, slack(s, self.net.off), jnp.inf)), s

    def interp(self, a, b, dense, tau):
        return self.solver.interpolation_cls(t0=a, t1=b, **dense).evaluate(tau)


def _pieces(net: Net, k: int, solver) -> _Pieces:
    iters = newton_iters(net)

    def vf(tau, y, args):
        # y = (theta, z = log(1 + t), D, r): r's rate is the sliding slopes, so that a
        # FSAL solver's stored first stage hands them over at every step's end for free
        obj, slopes, idx = args
        f, s, ell = field(obj, y[0], slopes, idx, net, iters)
        return f, jnp.exp(-ell - y[1]), sq_norm(f), s

    return _Pieces(net, k, solver, diffrax.ODETerm(vf), iters)


class _Carry(NamedTuple):
    """``advance``'s loop state."""

    tau: jax.Array
    tnext: jax.Array
    y: tuple
    sstate: object
    cstate: object
    steps: jax.Array
    accepted: jax.Array
    stop: jax.Array  # a Stop code
    a: jax.Array
    ya: tuple
    dense: object
    mask: jax.Array  # the pairs past -thr at the last accepted step's end


def _advance_kernel(pc: _Pieces, controller) -> Callable:
    solver, term, k, off = pc.solver, pc.term, pc.k, pc.net.off
    error_order = solver.error_order(term)

    @eqx.filter_jit
    def advance(obj, slopes, idx, thr, y0, tau0, h0, z_target, budget, f0=None) -> Advance:
        """Steps from ``(tau0, y0)`` until an accepted step ends past a kink, an exit or
        the save point (``z >= z_target``), or ``budget`` steps (``Advance``). ``f0``: the
        field at ``y0`` if known (a FSAL solver then starts without evaluating it)."""
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

        def cond(c):
            return (c.stop == int(Stop.BUDGET)) & (c.steps < budget)

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
            mask = pc.crossed(obj, y1, slopes, idx, thr)
            event = mask.any() | (y1[1] >= z_target)
            if k:
                if fsal:
                    s1 = sstate[1][3]  # the field's sliding slopes at y1 (FSAL)
                    gap = jnp.min(jnp.where(idx >= 0, slack(s1, off), jnp.inf))
                else:
                    gap = pc.exit_margin(obj, y1, slopes, idx)[0]
                event = event | (gap < 0)
            event = keep & event
            stop = jnp.where(
                ~(ok & finite),
                int(Stop.FAILED),
                jnp.where(event, int(Stop.EVENT), int(Stop.BUDGET)),
            )
            if k:
                stop = jnp.where((stop == int(Stop.EVENT)) & (gap < 0), int(Stop.EXIT), stop)

            def pick(new, old):
                return jax.tree.map(lambda a, b: jnp.where(keep, a, b), new, old)

            return _Carry(
                tau=jnp.where(keep, tprev, c.tau), tnext=tnext, y=pick(y1, c.y),
                sstate=pick(sstate, c.sstate), cstate=cstate, steps=c.steps + 1,
                accepted=c.accepted + keep.astype(int), stop=stop,
                a=jnp.where(keep, c.tau, c.a), ya=pick(c.y, c.ya),
                dense=jax.tree.map(lambda a, b: jnp.where(keep, a, b), dense, c.dense),
                mask=jnp.where(keep, mask, c.mask),
            )  # fmt: skip

        c0 = _Carry(tau0, tnext, y0, sstate, cstate, jnp.zeros((), int), jnp.zeros((), int),
                    jnp.zeros((), int), tau0, y0, dense0,
                    jnp.zeros(pc.net.n * pc.net.units, bool))  # fmt: skip
        c = jax.lax.while_loop(cond, body, c0)
        return Advance(c.a, c.ya[:3], c.tau, c.y[:3], c.dense, c.tnext - c.tau, c.steps,
                       c.accepted, c.stop, c.mask)  # fmt: skip

    return advance


def _bisect(fn, a, b, iters=64):
    """The first ``tau`` in ``[a, b]`` with ``fn <= 0`` (``fn(a) > 0 >= fn(b)``): the
    bracket's upper end after ``iters`` halvings (so ``fn <= 0`` there)."""

    def body(_, ab):
        lo, hi = ab
        mid = 0.5 * (lo + hi)
        below = fn(mid) <= 0
        return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

    return jax.lax.fori_loop(0, iters, body, (a, b))[1]


def _illinois(fn, a, b, fa, fb, max_iters=60):
    """As ``_bisect``, by the Illinois variant of regula falsi (superlinear: each
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


def _first_layer(obj, dense, net: Net):
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


def _locate_kernels(pc: _Pieces) -> tuple:
    """``(locate_first_layer, locate_crossings, locate_exit, locate_save)``."""
    net, solver = pc.net, pc.solver
    w0 = net.widths[0]

    @eqx.filter_jit
    def locate_first_layer(obj, slopes, thr, idx, a, b, dense, grid=32, iters=64):
        """``(tau, hit)``: when the first non-sliding first-layer pair reaches ``-thr``
        (signed, relative) in ``[a, b]``, and which pairs have by then (n, w0); ``b`` and
        none if no pair does. A grid of ``grid`` points brackets the first crossing, also
        one that dips in and out within the step; bisection on the pre-activations'
        interpolant (no forward pass) locates it."""
        dz = _first_layer(obj, dense, net)
        theta_b = pc.interp(a, b, dense, b)[0]
        x = obj.x.reshape(net.n, -1)
        scale = (jnp.linalg.norm(x, axis=1)[:, None]
                 * jnp.linalg.norm(theta_b["layers"][0]["kernel"], axis=0)[None, :])  # fmt: skip
        free = ~pc.sliding_mask(idx).reshape(net.n, net.units)[:, :w0]
        t0 = thr[:, :w0]

        def g(tau):
            z = solver.interpolation_cls(t0=a, t1=b, **dz).evaluate(tau)
            return jnp.where(free, pc.signed(slopes[:, :w0], z, scale) + t0, jnp.inf)

        nodes = a + (b - a) * jnp.arange(1, grid + 1, dtype=a.dtype) / grid
        low = jax.vmap(lambda tau: jnp.min(g(tau)))(nodes)
        k = jnp.argmax(low <= 0)  # the first node past a kink
        found = low[k] <= 0
        lo = jnp.where(k > 0, nodes[jnp.maximum(k - 1, 0)], a)
        hi = nodes[k]
        tau = _bisect(lambda t: jnp.min(g(t)), lo, hi, iters)
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
                theta = pc.interp(a, b, dense, tau)[0]
                out, z, scale = forward(obj, theta, x1[None], row[None], net)
                return pc.signed(row[None], z, scale)[0, j] + t

            return jnp.where(p >= 0, _bisect(g, a, b), b)

        return jax.vmap(one)(cand)

    @eqx.filter_jit
    def locate_exit(obj, slopes, idx, a, b, dense, fa, fb):
        """When the first sliding slope leaves ``[s-, 1]`` (``fa``, ``fb``: the margin
        ``min(s - s-, 1 - s)`` at ``a`` and ``b``); and the field evaluations spent."""
        return _illinois(
            lambda tau: pc.exit_margin(obj, pc.interp(a, b, dense, tau), slopes, idx)[0],
            a, b, fa, fb,
        )  # fmt: skip

    @eqx.filter_jit
    def locate_save(a, b, dense, z_target):
        return _bisect(lambda tau: z_target - pc.interp(a, b, dense, tau)[1], a, b)

    return locate_first_layer, locate_crossings, locate_exit, locate_save


def _point_kernels(pc: _Pieces) -> tuple:
    """``(classify, probe, interpolate)``."""
    net, k = pc.net, pc.k

    @eqx.filter_jit
    def classify(obj, y, slopes, idx, p):
        """The normal speed of pair ``p`` (flat index) with the pattern ``slopes``, and
        the whole field there (the next step's first stage if nothing else changes)."""
        i, j = p // net.units, p % net.units
        f = pc.term.vf(None, (*y, jnp.zeros((k,), y[1].dtype)), (obj, slopes, idx))

        def z_of(th):
            return one_sample(obj, th, obj.x[i], slopes[i], net)[1][j]

        return jax.jvp(z_of, (y[0],), (f[0],))[1], f

    @eqx.filter_jit
    def probe(obj, theta, slopes, idx):
        """``(s, z / (|h_n| |w_j|) (n * U,))``: the sliding slopes and where every pair is
        (a field evaluation only while something slides)."""
        s = field(obj, theta, slopes, idx, net, pc.iters)[1] if k else jnp.zeros((0,), slopes.dtype)
        _, z, scale = forward(obj, theta, obj.x, slopes, net)
        return s, relative(z, scale).reshape(-1)

    return classify, probe, eqx.filter_jit(pc.interp)


@functools.cache
def kernels(net: Net, k: int, solver, controller, dtype: str) -> Kernels:
    """The jitted pieces for ``k`` sliding slots (0 when nothing slides); ``dtype`` keys
    the cache."""
    pc = _pieces(net, k, solver)
    return Kernels(_advance_kernel(pc, controller), *_locate_kernels(pc), *_point_kernels(pc))


def theta_norm(y):
    """The error norm, on theta and z only: the dissipation integral D is a monitor, and
    r only carries the sliding slopes (``kernels``)."""
    return optx.rms_norm(y[:2])
