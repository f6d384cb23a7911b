"""``gflow.kinks``: one-sided fields at ReLU kinks, and sliding seen independently.

On digits 0/1 (60 samples, width 8) the flow has a pair, sample 16 / unit 7, that stays
on its surface from log t ~ 6 to 20 (``kink_report`` at every save point). The
classification is checked against what the flow's own field does there: explicit Euler
on autodiff's gradient chatters across an attracting surface and passes a crossing one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gflow import run_flow
from gflow.kinks import (
    ATTRACTING,
    CROSSING,
    field_with,
    kink_model,
    kink_report,
    normal_speeds,
    pattern,
)
from gflow.objective import grad_log_loss
from tests.conftest import build_digits


@pytest.fixture(scope="module")
def relu_seed3():
    """``(objective, params0)``: 60 unit-norm digits 0/1, a width-8 ReLU MLP initialised
    from seed 3, the logistic loss."""
    return build_digits(60, width=8, init_seed=3)[2:]


@pytest.fixture(scope="module")
def flow_run(relu_seed3):
    obj, p0 = relu_seed3
    tr = run_flow(obj, p0, solver="ralston", cfl=0.14, rtol=3e-5, atol=3e-8, log_t_max=9.0,
                  log_t_min=8.0, saves=2, save_params=True)  # fmt: skip
    return obj, p0, tr


@pytest.fixture(scope="module")
def sliding(flow_run):
    obj, p0, tr = flow_run
    return obj, p0, jax.tree.map(jnp.asarray, tr.snapshots[-1])


def test_kinks_along_a_run_count_what_kink_report_finds(flow_run):
    from gflow.kinks import kinks_along

    obj, _, tr = flow_run
    rows = kinks_along(obj, tr, tol=1e-3)
    assert [r["log_t"] for r in rows] == list(tr["log_t"][: len(tr.snapshots)])
    last = kink_report(obj, jax.tree.map(jnp.asarray, tr.snapshots[-1]), tol=1e-3)
    assert rows[-1]["attracting"] == int(np.sum(last.kind == ATTRACTING)) >= 1
    assert rows[-1]["near"] == sum(rows[-1][k] for k in
                                   ("crossing", "attracting", "repelling", "tangent"))  # fmt: skip


def test_the_frozen_pattern_is_the_network_and_its_field(sliding):
    obj, p0, _ = sliding
    from flax import nnx

    model = nnx.merge(obj.graphdef, p0)
    np.testing.assert_array_equal(model.with_slopes(obj.x, pattern(obj, p0)), model(obj.x))
    f, g = field_with(obj, p0, pattern(obj, p0)), grad_log_loss(obj, p0)
    # the same sums over the N samples in another order (ReLU's derivative against a
    # multiplication by the slope): N eps of the largest entry
    eps, n = np.finfo(np.float64).eps, obj.num_samples
    for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(a, -b, rtol=0, atol=n * eps * float(jnp.abs(b).max()))


def _euler_z(obj, params, n, j, h, steps):
    """The pre-activation of pair (n, j) along explicit Euler on autodiff's field."""
    zs = []
    for _ in range(steps):
        g = grad_log_loss(obj, params)
        params = jax.tree.map(lambda a, b: a - h * b, params, g)
        zs.append(float(kink_model(obj, params).preactivations(obj.x)[0][n, j]))
    return np.asarray(zs)


def test_an_attracting_pair_is_one_the_flow_chatters_across(sliding):
    obj, _, p = sliding
    tol = 1e-3
    r = kink_report(obj, p, tol=tol)
    att = np.flatnonzero(r.kind == ATTRACTING)
    assert att.size >= 1, r.counts()
    i = int(att[0])
    n, j = int(r.sample[i]), int(r.unit[i])
    assert r.v_plus[i] < 0 < r.v_minus[i] and 0 < r.slope[i] < 1
    # the sliding slope zeroes the normal speed; v is affine in the slope on the surface,
    # and off it (|z| <= tol of its scale) by O(z_rel) relative
    slopes = pattern(obj, p)
    slopes[0] = slopes[0].at[n, j].set(float(r.slope[i]))
    v_star = float(normal_speeds(obj, p, slopes, [(0, n, j)])[0])
    assert abs(v_star) <= tol * (abs(r.v_plus[i]) + abs(r.v_minus[i]))
    # Euler on autodiff's one-sided gradient, steps moving z by 1e-4 of its scale:
    # it chatters across the surface at nearly every step and stays within a step of it
    w = p["layers"][0]["kernel"]
    scale = float(jnp.linalg.norm(obj.x[n]) * jnp.linalg.norm(w[:, j]))
    h = 1e-4 * scale / max(abs(r.v_plus[i]), abs(r.v_minus[i]))
    z = _euler_z(obj, p, n, j, h, 100)
    assert np.sum(np.diff(np.sign(z)) != 0) >= 50
    assert np.abs(z).max() <= 4e-4 * scale


def test_a_crossing_pair_is_passed_once(relu_seed3):
    """Early in training (log t ~ 0) sample 21 / unit 6 is near its surface and both
    sides move it the same way: Euler passes it and does not come back."""
    obj, p0 = relu_seed3
    r = kink_report(obj, p0, tol=1e-3)
    assert set(r.kind) == {CROSSING}, r.counts()
    i = int(np.argmin(r.z_rel))
    n, j = int(r.sample[i]), int(r.unit[i])
    w = p0["layers"][0]["kernel"]
    scale = float(jnp.linalg.norm(obj.x[n]) * jnp.linalg.norm(w[:, j]))
    speed = max(abs(r.v_plus[i]), abs(r.v_minus[i]))
    h = 2 * abs(r.z[i]) / speed / 20  # reaches the surface in about 20 steps
    z = _euler_z(obj, p0, n, j, h, 60)
    assert np.sum(np.diff(np.sign(np.concatenate([[r.z[i]], z]))) != 0) == 1, z
    assert abs(z[-1]) > 1e-6 * scale  # and moved on, away from the surface


def test_the_sliding_field_keeps_the_flow_on_the_surface_to_rounding(sliding):
    """Put the sliding pair exactly on its surface (``w_j`` moved along ``x_n``), then
    integrate the Filippov field (its slope from ``sliding_field``) by RK4: its
    pre-activation stays zero to rounding while the weights move by about 1%. Autodiff's
    field at the same step leaves the surface at once (the chattering test above)."""
    from gflow.kinks import sliding_field

    obj, _, p = sliding
    r = kink_report(obj, p, tol=1e-3)
    i = int(np.flatnonzero(r.kind == ATTRACTING)[0])
    n, j = int(r.sample[i]), int(r.unit[i])
    x = obj.x[n].reshape(-1)
    w = p["layers"][0]["kernel"]
    w = w.at[:, j].add(-(x @ w[:, j]) * x / (x @ x))
    p = {"layers": {**p["layers"], 0: {**p["layers"][0], "kernel": w}}}
    scale = float(jnp.linalg.norm(x) * jnp.linalg.norm(w[:, j]))
    slopes, pairs = pattern(obj, p), [(0, n, j)]
    f, s = sliding_field(obj, p, slopes, pairs)
    assert 0 < float(s[0]) < 1
    assert abs(float(s[0]) - r.slope[i]) < 0.05  # near the report's slope (made off the surface)
    v = normal_speeds(obj, p, [slopes[0].at[n, j].set(s[0])], pairs)
    assert abs(float(v[0])) <= 64 * np.finfo(np.float64).eps * abs(r.v_plus[i])

    def field(th):
        return sliding_field(obj, th, slopes, pairs)[0]

    def add(a, b, c):
        return jax.tree.map(lambda u, v: u + c * v, a, b)

    h = 1e-4 * scale / max(abs(r.v_plus[i]), abs(r.v_minus[i]))
    th, zs = p, []
    for _ in range(20):
        k1 = field(th)
        k2 = field(add(th, k1, h / 2))
        k3 = field(add(th, k2, h / 2))
        k4 = field(add(th, k3, h))
        th = jax.tree.map(lambda a, b, c, d, e: a + h / 6 * (b + 2 * c + 2 * d + e),
                          th, k1, k2, k3, k4)  # fmt: skip
        zs.append(float(x @ th["layers"][0]["kernel"][:, j]))
    moved = float(jnp.linalg.norm(th["layers"][0]["kernel"] - w) / jnp.linalg.norm(w))
    assert moved > 1e-3
    # rounding: 20 steps, each a few ulps of the dot product's scale
    assert np.abs(zs).max() <= 20 * 16 * np.finfo(np.float64).eps * scale
