"""Is a KKT point of the margin problem a local optimum? Searches for better directions.

Lyu & Li prove that the flow's direction converges to a KKT point of

    min |theta|^2 / 2  s.t.  q_n(theta) >= 1,

a first-order condition only: Vardi, Shamir & Srebro (2022, "On margin maximization in
linear and ReLU networks") show that for depth-2 ReLU and diagonal linear networks the
point may not even be a local optimum, and prove that for fully-connected linear
networks it is a global one.

* ``local_optimum``: the verdict on a run (``gflow.verdict.LOCAL_OPTIMUM``), sound in
  both directions: FAIL only on a found point of strictly larger normalized margin than
  the limit's, in a ball of stated radius around the limit; PASS only as "no point
  better by more than a stated resolution within a stated radius of the limit, by a
  search of measured power". ``local_optimum_at`` is its core on one parameter point,
  without the scope.
* ``planted_search``: the search itself, and its power, measured on better points
  planted at known distances.
* ``margin_search``: the older search (the largest normalized margin in balls around a
  direction, no verdict), kept for experiments.

All searches are projected ascents on the unit sphere (or in balls around a direction)
on a soft-min of the normalized margins ``gamma_n(v) = q_n(v) / |v|^L``, scale-free; the
hard ``gamma = min_n gamma_n`` of every iterate is read and the best kept, so a gain
reported is a point that has it: a search can miss a better point, never invent one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gflow.objective import margins as _margins
from gflow.verdict import LOCAL_OPTIMUM, NA, Verdict, inconclusive, outside

__all__ = [
    "LOCAL_SCOPE",
    "local_optimum",
    "local_optimum_at",
    "planted_search",
    "balanced",
    "margin_search",
]

LOCAL_SCOPE = (
    "a KKT point of the margin problem is proved a (global) optimum only for "
    "fully-connected linear networks (Vardi, Shamir & Srebro 2022); for ReLU and "
    "diagonal networks it need not be a local one"
)

RADII = (0.01, 0.03, 0.1, 0.3)
# the search's starts: chord distances from u, as fractions of the radius, taken in turn
# (small ones matter: a better point at distance d is reached from starts within about
# d / 2 of u on its side; measured on a linear net's flow, 5 fractions and 16 starts found
# 95-100% of the planted points where 3 fractions and 8 starts found 60-80%)
_START_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
# Adam's step per coordinate: radius / (_LR_DIVISOR sqrt(P)) at first, falling
# geometrically by _LR_DECADES decades to the last step (a constant step zig-zags across
# the ridges of a min of margins at its own scale)
_LR_DIVISOR, _LR_DECADES = 20, 1.0


def local_optimum(
    traj,
    objective,
    remaining_path: float | None,
    margin_to_come: float | None,
    *,
    plants: int | None = None,
    **kwargs,
) -> Verdict:
    """Is the flow's limit a local optimum of the margin problem (Vardi, Shamir & Srebro
    2022)? The verdict of ``local_optimum_at`` at the run's last direction, within its
    scope.

    **Arguments:**

    - ``traj``: the run's ``Trajectory``. The limit is sought near its last direction
      ``u_T``: its last snapshot, or its final parameters when it saved none. Its last
      ``smoothed_margin`` is the lower bound of the limit's margin (a lower bound
      whichever save point it is: it only rises).
    - ``objective``: the run's ``Objective``.
    - ``remaining_path``: ``R``, a bound on the distance from ``u_T`` to the limit, or
      ``None``. It is an *extrapolation*, not a proof: ``gflow.theory.remaining_path``
      integrates the direction's fitted increments per unit ``log t``, ``c (log t)^a``,
      from the last save point on, with ``a`` at its interval's slow end. It must be
      measured from ``u_T`` (the last save point is the last snapshot when the run
      saved one at every save point).
    - ``margin_to_come``: the smoothed margin's rise still to come, or ``None``, an
      extrapolation the same way (``gflow.theory.reaches_maximum``'s ``to_come``: its
      increments between save points fitted as a power of ``log t`` and integrated on).
    - ``plants``: the planted points that measure the search's power; ``None``: 20 in
      scope, 0 outside it (an observed verdict claims nothing, and the plants multiply
      the search's cost by ``plants + 1``: outside the scope it can be FAIL or
      INCONCLUSIVE, never PASS).
    - ``**kwargs``: passed to ``local_optimum_at`` (radii, starts, steps, gain, ...).

    **Returns:** a ``Verdict`` named ``LOCAL_OPTIMUM``; outside the theory (observed
    only) unless the model is a fully-connected linear network (``objective.family ==
    "linear"``, ``LOCAL_SCOPE``); n/a when the run saved no parameters or never got
    past the loss threshold (no positive smoothed margin)."""
    params = traj.snapshots[-1] if traj.snapshots else traj.final_params
    if params is None:
        return Verdict(LOCAL_OPTIMUM, None, "the run saved no parameters (--save-params)")
    in_scope = objective.family == "linear"
    if plants is None:
        plants = 20 if in_scope else 0
    n = len(traj)
    s_T = float(traj["smoothed_margin"][-1]) if n else math.nan
    log_t = float(traj["log_t"][-1]) if n else None
    v = local_optimum_at(params, objective, smoothed_margin=s_T,
                         remaining_path=remaining_path, margin_to_come=margin_to_come,
                         log_t=log_t, plants=plants, **kwargs)  # fmt: skip
    if v.outcome == NA:
        return v
    if in_scope and v.failed:
        # Every KKT point of a fully-connected linear net is a global optimum (Vardi,
        # Shamir & Srebro), so a point above the limit's bound says that the bound's
        # extrapolations (R, the rise still to come) do not hold yet, not that the
        # theory fails: calibrated, a depth-2 linear flow to log t = 30 showed one
        return inconclusive(
            LOCAL_OPTIMUM,
            f"{v.summary}; but every KKT point of a fully-connected linear network is a "
            "global optimum, so the extrapolated bounds do not hold yet",
            "a longer run (the direction's remaining path and the margin's rise to come "
            "are extrapolated from the fitted window)", v.details,
        )  # fmt: skip
    return v if in_scope else outside(v, LOCAL_SCOPE)


def local_optimum_at(
    params,
    objective,
    *,
    smoothed_margin: float,
    remaining_path: float | None,
    margin_to_come: float | None,
    log_t: float | None = None,
    radii=RADII,
    starts: int = 16,
    steps: int = 300,
    plants: int = 20,
    gain: float = 1e-3,
    width: float = 1.0,
    power_level: float = 0.9,
    rtol: float | None = None,
    seed: int = 0,
) -> Verdict:
    """The local-optimality verdict at ``params`` (the last direction ``u_T``), without
    the scope (``local_optimum`` adds it).

    **The limit.** ``u*`` is the direction the flow converges to; ``|u_T - u*| <= R =
    remaining_path`` (an extrapolation, see ``local_optimum``). Its normalized margin
    ``gamma*`` is bracketed by

    - below: ``s_T = smoothed_margin``, the last smoothed margin: it rises monotonically
      to ``gamma*`` (Theorem 4.1), so ``gamma* >= s_T`` is proved (past t0);
    - above: ``upper = max(s_T + margin_to_come, gamma(u_T), gamma(balanced(u_T)))``.
      The first term is the extrapolated bound (``gamma* <= s_T + to_come``); the other
      two are not bounds of ``gamma*`` but only raise ``upper``, so that neither the
      last direction itself nor its rescaled twin (``balanced``) is ever "better" than
      the limit. ``None`` when ``margin_to_come`` is.

    **The search** (``planted_search``): the cap of chord radius ``r`` around ``u_T`` on
    the unit sphere, ``r`` the smallest of ``radii`` with ``r >= 2R``, is searched for a
    point of margin above ``tau = upper`` (or, without it, ``max(gamma(u_T),
    gamma(balanced(u_T)))``) times ``1 + rtol`` (``rtol``: a rounding allowance, 1024
    eps of the parameters' dtype, so that a margin equal to the limit's never counts).

    - FAIL: a point ``p`` found with ``gamma(p) > upper (1 + rtol)``, both bounds
      given. Then ``gamma(p) > gamma*`` and ``|p - u*| <= |p - u_T| + R``: the limit
      is not a maximum of the normalized margin within that radius (stated), as far as
      the two extrapolations hold.
    - PASS: no point above ``tau (1 + rtol)`` found, ``R`` given, and the same search
      finds at least ``power_level`` of ``plants`` better points planted in the
      landscape (below). The claim: no point within ``r - R`` of the limit has a
      margin above ``tau (1 + gain) <= gamma* (1 + h)``, ``h = tau (1 + gain) / s_T -
      1`` (the resolution, reported), at the measured power.
    - INCONCLUSIVE: ``R`` is ``None`` or above half the largest radius (the limit is not
      located: run longer), a point above ``tau`` found without an upper bound (no
      ``margin_to_come``: the point may be the flow's own remaining progress), or the
      power is below ``power_level`` (a weak search: more starts or steps).
    - n/a: no positive smoothed margin (the run is not past t0) or no positive margin at
      ``u_T``.

    **The plants** measure the power: each adds to every ``gamma_n`` a bump ``A (1 -
    |v - c|^2 / w^2)^2`` (zero beyond ``w``) centred at a point ``c`` of the sphere at a
    known chord distance ``d`` from ``u_T`` (``d`` spread evenly over ``[r / 8, r]``: a
    point within ``r - R`` of the limit lies within ``r`` of ``u_T``; random
    directions), of width ``w = width * d`` and height ``A`` such that the peak exceeds
    the planted landscape's own ``tau`` (``max(tau, its margin at u_T)``) by the factor
    ``1 + gain``. The power is the fraction of plants for which the search finds a point
    above the planted ``tau`` times ``1 + rtol`` (the rule the true landscape is judged
    by): the rate at which the verdict would not PASS a twin of the run with that better
    point. With the default ``width = 1`` the bump's support reaches ``u_T`` and rises
    from it at second order (as a dead unit's revival does) while the margin falls at
    first order: ``u_T`` stays a maximum along the way, the plant is a *separate*
    better point within ``r``, exactly what the PASS claim excludes, and the hard case
    for a local search (in high dimension few random starts land in its basin). With
    ``width > 1`` ``u_T`` lies on the bump's flank, not a local maximum of the planted
    landscape: any ascent finds that, so such plants measure little (a flow's limit, a
    KKT point, has no such first-order ascent).

    **Symmetries.** The normalized margin is invariant under unit permutations and, for
    linear networks, inner rotations (``W_1 -> W_1 O``, ``W_2 -> O^T W_2``): their
    orbits hold points of equal margin (a continuum for linear nets of width >= 2),
    which are never "better", since "better" means above ``tau (1 + rtol)`` and ``tau >=
    gamma(u_T)``. Per-unit rescaling between layers (``w_in a``, ``w_out / a``: bias-free
    ReLU, leaky and linear units) keeps every ``q_n`` but changes ``|theta|``; the
    balanced point of an orbit (``balanced``) has its largest normalized margin, and the
    limit is balanced (a KKT point is), so ``tau >= gamma(balanced(u_T))``: a search
    that only balances ``u_T`` finds nothing "better" either. Distances are raw chords
    on the unit sphere, an upper bound of the distance between symmetry classes (the
    infimum over the orbits), so a FAIL's stated ball is honest in the quotient too. For
    the margin-preserving symmetries "no better point within ``r``" is the same claim in
    raw and quotient distance (a better point's orbit meets the raw ball whenever it
    meets the quotient one); a PASS is stated in raw distance.

    **Arguments:** ``params`` (a parameter pytree, any scale), ``objective``,
    ``smoothed_margin`` (``s_T``), ``remaining_path``, ``margin_to_come`` (see
    ``local_optimum``), ``log_t`` (reported), ``radii`` (candidate search radii, chord
    on the unit sphere, in (0, 1]), ``starts`` / ``steps`` (the search's), ``plants``
    (``K``), ``gain``, ``width``, ``power_level``, ``rtol`` (``None``: 1024 eps), ``seed``.
    """
    name = LOCAL_OPTIMUM
    radii = tuple(float(r) for r in radii)
    if not radii or min(radii) <= 0 or max(radii) > 1:
        raise ValueError(f"radii must lie in (0, 1], got {radii}")
    if not 0 < power_level <= 1:
        raise ValueError(f"power_level must lie in (0, 1], got {power_level}")
    if not gain > 0 or not width > 0:
        raise ValueError(f"gain and width must be > 0, got {gain}, {width}")
    for what, val in (("remaining_path", remaining_path), ("margin_to_come", margin_to_come)):
        if val is not None and not (math.isfinite(val) and val >= 0):
            raise ValueError(f"{what} must be None or finite and >= 0, got {val}")
    s_T = float(smoothed_margin)
    where = "" if log_t is None else f" at log t = {log_t:.4g}"
    det = dict(log_t=log_t, smoothed_margin=s_T, remaining_path=remaining_path,
               margin_to_come=margin_to_come)  # fmt: skip
    if not (math.isfinite(s_T) and s_T > 0):
        return Verdict(name, None, f"no positive smoothed margin{where} (the run is not "
                       "past the loss threshold): the claim does not apply", det)  # fmt: skip
    dtype = jax.tree.leaves(params)[0].dtype
    rtol = 1024 * float(np.finfo(dtype).eps) if rtol is None else float(rtol)
    g_T = _gamma(objective, params)
    if not g_T > 0:
        return Verdict(name, None, f"normalized margin {g_T:.3g} at the last direction: "
                       "the data are not separated", det)  # fmt: skip
    if sum(int(np.size(a)) for a in jax.tree.leaves(params)) < 2:
        return Verdict(name, None, "a single parameter: there is no neighbourhood to search",
                       det)  # fmt: skip
    bal = balanced(params)
    g_bal = _gamma(objective, bal) if bal is not None else None
    floor = max(g_T, g_bal if g_bal is not None else -math.inf)
    upper = None if margin_to_come is None else max(s_T + margin_to_come, floor)
    tau = floor if upper is None else upper
    det.update(gamma_last=g_T, gamma_balanced=g_bal, upper=upper, threshold=tau, rtol=rtol)
    R = remaining_path
    if R is not None and 2 * R > max(radii):
        s = (f"the direction may still move {R:.3g}{where} (more than half the largest "
             f"radius {max(radii):g})")  # fmt: skip
        decide = "a longer run (the direction's remaining path below half a radius)"
        return inconclusive(name, s, decide, det)
    r = min(radii) if R is None else min(x for x in radii if x >= 2 * R)
    found = planted_search(objective, params, radius=r, threshold=tau, plants=plants,
                           gain=gain, width=width, starts=starts, steps=steps, rtol=rtol,
                           seed=seed)  # fmt: skip
    best, dist = found["best_gamma"], found["best_distance"]
    power = found["power"]
    det.update({k: v for k, v in found.items() if k != "best_params"})
    det.update(radius=r)
    better = best > tau * (1 + rtol)
    ds = found["plant_distances"]
    pw = (f"power {power:.2f} ({found['found']} of {plants} planted points {gain:g} above "
          f"the threshold at distances {min(ds, default=0):.3g}-{max(ds, default=0):.3g}, "
          f"width {width:g} x distance)")  # fmt: skip
    if better and upper is not None and R is not None:
        ball = dist + R
        det["fail_radius"] = ball
        s = (f"NOT a local optimum: a point of normalized margin {best:.8g} lies within "
             f"{ball:.3g} of the limit (at {dist:.3g} from the last direction{where}, which "
             f"the limit is within {R:.3g} of), above the limit's {upper:.8g} at most "
             f"(relative gain {best / upper - 1:.3g}; both bounds extrapolated)")  # fmt: skip
        return Verdict(name, False, s, det)
    if better:
        lacks = ("the limit's distance (no remaining path)" if R is None
                 else "an upper bound of the limit's margin (no rise to come)")  # fmt: skip
        s = (f"a point of normalized margin {best:.8g} at {dist:.3g} from the last direction"
             f"{where}, above its {tau:.8g} (relative {best / tau - 1:.3g}); without "
             f"{lacks} it is not shown better than the limit")  # fmt: skip
        decide = ("a bounded remaining path and rise of the smoothed margin (a longer run, "
                  "more save points)")  # fmt: skip
        return inconclusive(name, s, decide, det)
    res = tau * (1 + gain) / s_T - 1
    det["resolution"] = res
    if R is None:
        s = (f"no point above {tau:.8g} within {r:.3g} of the last direction{where} ({pw}); "
             "the limit's distance from it is not bounded")  # fmt: skip
        return inconclusive(name, s, "a bounded remaining path of the direction (a longer "
                            "run, more save points)", det)  # fmt: skip
    if not power >= power_level:  # (no plants: no power, NaN)
        s = (f"no point above {tau:.8g} found within {r:.3g} of the last direction{where}, "
             f"but the search is weak: {pw}, below {power_level:g}")  # fmt: skip
        return inconclusive(name, s, f"a stronger search (more starts than {starts}, more "
                            f"steps than {steps})", det)  # fmt: skip
    det["pass_radius"] = r - R
    s = (f"no point within {r - R:.3g} of the limit has a normalized margin above "
         f"{tau * (1 + gain):.8g} (the limit's is >= {s_T:.8g}: a local optimum to "
         f"{res:.3g} relative), by a search of {pw}; the direction{where} can still move "
         f"{R:.3g}")  # fmt: skip
    return Verdict(name, True, s, det)


def planted_search(
    objective,
    params,
    *,
    radius: float,
    threshold: float,
    plant_radius: float | None = None,
    plants: int = 20,
    gain: float = 1e-3,
    width: float = 1.0,
    starts: int = 16,
    steps: int = 300,
    rtol: float = 0.0,
    seed: int = 0,
) -> dict:
    """Search the cap ``|v - u| <= radius`` of the unit sphere around ``u = params /
    |params|`` for a normalized margin above ``threshold (1 + rtol)``, and measure the
    search's power on ``plants`` better points planted at known distances.

    The search: ``starts`` chains, one from ``u`` and the others from random points of
    the sphere at chord distances ``radius / 32``, ``/ 16``, ``/ 8``, ``/ 4``, ``/ 2``
    (in turn), each ``steps`` Adam steps (per coordinate ``radius / (20 sqrt(P))`` at
    first, falling geometrically to a tenth of it; P the number of parameters) on a
    soft-min of the normalized margins whose temperature falls from 1e-2 to 1e-6 of
    ``gamma(u)`` (to below the second-order gains of a revived unit at small radii),
    retracted to the sphere and projected onto the cap after each step; the hard margin
    of every iterate is read and the best kept.

    A plant (``local_optimum_at`` describes it): a bump of height set so that its peak
    is a factor ``1 + gain`` above the planted landscape's threshold, ``max(threshold,
    its margin at u)``, centred at chord distance ``d`` from ``u`` (``d`` spread evenly
    over ``[plant_radius / 8, plant_radius]``, default ``radius``), of width ``width *
    d``. It is found when the same search, on the planted landscape, reaches a point
    above the planted threshold times ``1 + rtol``. All landscapes (the true one, then
    the plants) run through one compiled kernel per shape.

    **Returns:** a dict with ``gamma0`` (``gamma(u)``), ``best_gamma`` (the best margin
    found in the true landscape, re-evaluated outside the kernel), ``best_distance``
    (its chord from ``u``), ``best_params`` (that point, unit norm, as a pytree),
    ``power`` (fraction of plants found), ``found`` (their number), ``plants``,
    ``plant_distances``, ``plant_heights``, ``plant_found`` (per plant), ``starts``,
    ``steps``, ``gain``, ``width``."""
    radius = float(radius)
    if not 0 < radius <= 1:
        raise ValueError(f"radius must lie in (0, 1], got {radius}")
    if starts < 1 or steps < 1 or plants < 0:
        raise ValueError(f"starts and steps must be >= 1, plants >= 0; got {starts}, {steps}, "
                         f"{plants}")  # fmt: skip
    r_p = radius if plant_radius is None else float(plant_radius)
    if not 0 < r_p <= radius:
        raise ValueError(f"plant_radius must lie in (0, radius], got {plant_radius}")
    template = jax.tree.map(jnp.asarray, params)
    flat, unravel = ravel_pytree(template)
    u = flat / jnp.linalg.norm(flat)
    dt = u.dtype
    P = u.size
    if P < 2:
        raise ValueError(f"params must have at least 2 entries to search around, got {P}")
    g0 = _gamma(objective, unravel(u))
    if not g0 > 0:
        raise ValueError(f"the data are not separated at params (normalized margin {g0:.3g})")
    rng = np.random.default_rng(seed)
    u_np = np.asarray(u, np.float64)

    def on_sphere(d, z):  # the point at chord d from u in the tangent direction of z
        z = z - (z @ u_np) * u_np
        z = z / np.linalg.norm(z)
        a = 2 * np.arcsin(min(d, 2.0) / 2)
        return np.cos(a) * u_np + np.sin(a) * z

    fr = _START_FRACTIONS
    v0 = [u_np] + [on_sphere(radius * fr[k % len(fr)], rng.standard_normal(P))
                   for k in range(starts - 1)]  # fmt: skip
    dists = np.linspace(r_p / 8, r_p, plants) if plants else np.zeros(0)
    centres = [on_sphere(d, rng.standard_normal(P)) for d in dists]
    # the planted heights: the peak at c, gamma(c) + A, is (1 + gain) times the planted
    # threshold max(threshold, gamma(u) + A phi0), phi0 = the bump's value at u
    phi0 = max(0.0, 1 - 1 / width**2) ** 2
    if phi0 * (1 + gain) >= 1:
        raise ValueError(f"width {width} too large for gain {gain}: the bump lifts u itself")
    heights = []
    for c in centres:
        g_c = _gamma(objective, unravel(jnp.asarray(c, dt)))
        a1 = threshold * (1 + gain) - g_c
        a2 = (g0 * (1 + gain) - g_c) / (1 - phi0 * (1 + gain))
        heights.append(max(a1, a2))
    heights = np.asarray(heights, np.float64)
    tau_plant = np.maximum(threshold, g0 + heights * phi0)
    # landscape 0 is the true one (height 0, any width)
    C = jnp.asarray(np.stack([u_np, *centres]), dt)
    W = jnp.asarray(np.concatenate([[1.0], width * dists]), dt)
    A = jnp.asarray(np.concatenate([[0.0], heights]), dt)
    temps = jnp.asarray(g0 * np.logspace(-2, -6, steps), dt)
    lrs = radius / (_LR_DIVISOR * math.sqrt(P)) * np.logspace(0, -_LR_DECADES, steps)
    V0, lrs = jnp.asarray(np.stack(v0), dt), jnp.asarray(lrs, dt)
    best, best_v = _climb(objective, template, u, V0, jnp.asarray(radius, dt), C, W, A, lrs, temps)
    best = np.asarray(best, np.float64)
    hit = best[1:] > tau_plant * (1 + rtol)
    v_best = np.asarray(best_v[0], np.float64)
    g_best = _gamma(objective, unravel(jnp.asarray(v_best, dt)))
    if g_best < g0:  # (the start at u is always a candidate)
        g_best, v_best = g0, u_np
    return dict(
        gamma0=g0,
        best_gamma=g_best,
        best_distance=float(np.linalg.norm(v_best - u_np)),
        best_params=unravel(jnp.asarray(v_best, dt)),
        power=float(hit.mean()) if plants else math.nan,
        found=int(hit.sum()),
        plants=plants,
        plant_distances=[float(d) for d in dists],
        plant_heights=[float(h) for h in heights],
        plant_found=[bool(h) for h in hit],
        starts=starts,
        steps=steps,
        gain=gain,
        width=width,
    )


def _gamma(objective, params) -> float:
    """The hard normalized margin ``min_n q_n / |theta|^L`` (float64 on the host)."""
    q = np.asarray(_margins(objective, params), np.float64)
    n2 = sum(float(np.sum(np.square(np.asarray(a, np.float64)))) for a in jax.tree.leaves(params))
    return float(np.min(q)) / n2 ** (objective.order / 2)


def _climb_impl(objective, template, u, v0, r, centres, widths, heights, lrs, temps):
    """For each landscape ``k`` (the normalized margins plus a bump of height
    ``heights[k]``, width ``widths[k]`` at ``centres[k]``), projected Adam ascent from
    each start in ``v0`` (S, P) within the cap ``|v - u| <= r`` of the unit sphere:
    ``(best hard margin (K,), its point (K, P))`` over all starts and iterates; ``lrs``
    and ``temps``: the step size and soft-min temperature of each step."""
    _, unravel = ravel_pytree(template)
    L = objective.order
    cos_a = 1 - r**2 / 2  # chord r on the unit sphere <-> cos of the angle
    sin_a = jnp.sqrt(jnp.maximum(1 - cos_a**2, 0.0))
    tiny = jnp.finfo(u.dtype).tiny
    b1, b2 = 0.9, 0.999  # Adam's defaults (written out: optax's counter is an int32,
    # which strict dtype promotion refuses to mix with float64)

    def cap(v):
        v = v / jnp.linalg.norm(v)
        c = v @ u
        t = v - c * u
        proj = cos_a * u + sin_a * t / jnp.maximum(jnp.linalg.norm(t), tiny)
        return jnp.where(c < cos_a, proj, v)

    def landscape(centre, w, height):
        def gammas(v):
            g = objective.margins(unravel(v)) / jnp.linalg.norm(v) ** L
            s2 = jnp.sum(jnp.square(v / jnp.linalg.norm(v) - centre)) / w**2
            return g + height * jnp.square(jnp.maximum(1 - s2, 0.0))

        def chain(v):
            def soft(v, t):  # -t log sum exp(-gamma_n / t): a smooth min over samples
                return -t * jax.nn.logsumexp(-gammas(v) / t)

            def step(carry, kt):
                v, m, s, best, best_v = carry
                k, t, lr = kt
                grad = jax.grad(soft)(v, t)
                m = b1 * m + (1 - b1) * grad
                s = b2 * s + (1 - b2) * grad**2
                mh, sh = m / (1 - b1**k), s / (1 - b2**k)
                v = cap(v + lr * mh / (jnp.sqrt(sh) + 1e-12 * jnp.sqrt(jnp.max(sh)) + tiny))
                g = jnp.min(gammas(v))
                better = g > best
                return (v, m, s, jnp.where(better, g, best), jnp.where(better, v, best_v)), None

            zero = jnp.zeros_like(v)
            carry = (v, zero, zero, jnp.min(gammas(v)), v)
            ks = jnp.arange(1, temps.size + 1, dtype=temps.dtype)
            (*_, best, best_v), _ = jax.lax.scan(step, carry, (ks, temps, lrs))
            return best, best_v

        bests, vs = jax.vmap(chain)(v0)
        k = jnp.argmax(bests)
        return bests[k], vs[k]

    return jax.lax.map(lambda a: landscape(*a), (centres, widths, heights))


_climb = jax.jit(_climb_impl)


def balanced(params):
    """The rescaled twin of a gflow MLP's parameters with the smallest norm: each hidden
    unit's incoming weights (and first-layer bias) times ``a``, its outgoing weights
    over ``a`` (the same function for ReLU, leaky ReLU and linear units), ``a`` chosen
    by alternating exact per-unit updates (``a^2 = |out| / |in|``; exact in one sweep
    for one hidden layer, 100 sweeps otherwise). A unit whose incoming or outgoing
    weights are all zero is zeroed. ``None`` unless ``params`` is ``{"layers": {i:
    {"kernel": (m_i, m_{i+1}) array}}}`` with a bias on the first layer at most."""
    layers = params.get("layers") if isinstance(params, dict) else None
    if not isinstance(layers, dict | list) or len(layers) < 2:
        return None
    keys = sorted(layers) if isinstance(layers, dict) else range(len(layers))
    ks, bias = [], None
    for i, key in enumerate(keys):
        lay = layers[key]
        if not isinstance(lay, dict) or "kernel" not in lay or set(lay) - {"kernel", "bias"}:
            return None
        k = np.asarray(lay["kernel"], np.float64)
        if k.ndim != 2 or (ks and ks[-1].shape[1] != k.shape[0]):
            return None
        if "bias" in lay and lay["bias"] is not None:
            if i:
                return None
            bias = np.asarray(lay["bias"], np.float64).copy()
        ks.append(k.copy())
    sweeps = 1 if len(ks) == 2 else 100
    for _ in range(sweeps):
        for l in range(len(ks) - 1):
            n_in = np.sum(ks[l] ** 2, axis=0) + (bias**2 if (l == 0 and bias is not None) else 0)
            n_out = np.sum(ks[l + 1] ** 2, axis=1)
            dead = (n_in == 0) | (n_out == 0)
            a = np.where(dead, 0.0, (n_out / np.where(dead, 1.0, n_in)) ** 0.25)
            ks[l] = ks[l] * a
            if l == 0 and bias is not None:
                bias = bias * a
            ks[l + 1] = ks[l + 1] * np.where(dead, 0.0, 1 / np.where(dead, 1.0, a))[:, None]
    dtype = jax.tree.leaves(params)[0].dtype
    out = {}
    for i, key in enumerate(keys):
        lay = {"kernel": jnp.asarray(ks[i], dtype)}
        if i == 0 and bias is not None:
            lay["bias"] = jnp.asarray(bias, dtype)
        out[key] = lay
    return {"layers": out if isinstance(layers, dict) else [out[k] for k in keys]}


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
    and ``moved`` (the best point's distance from ``u``). No verdict: the ball is in the
    ambient space, not on the sphere, and "the best point's distance" says nothing about
    optimality by itself (``local_optimum`` gives the verdict)."""
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
