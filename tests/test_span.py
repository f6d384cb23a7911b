"""The flow of a dense first layer in the span of the inputs (gflow.dynamics.span): the
same flow in fewer coordinates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gflow import data as D
from gflow.dynamics import run_flow, run_flow_seeds
from gflow.dynamics.span import input_span
from gflow.models import build_model, split_params
from gflow.objective import make_objective
from tests.conftest import build_digits

EPS = float(np.finfo(np.float64).eps)
DT = 0.05  # a fixed step on the loss clock, inside Ralston's stability edge here


@pytest.fixture(scope="module")
def few():
    """20 unit-norm digits 0/1 (64 pixels, so rank <= 20 <= 64 / 2), a width-6 ReLU MLP."""
    ds, _, obj, p0 = build_digits(20, width=6)
    return ds, obj, p0


def test_the_projected_network_has_the_same_outputs_and_gradient_norm(few):
    ds, obj, p0 = few
    span = input_span(obj, [p0])
    assert span is not None and span.rank <= 20 and span.basis.shape == (64, span.rank)
    np.testing.assert_allclose(span.basis.T @ span.basis, np.eye(span.rank), atol=64 * EPS)
    b0 = span.restrict(p0)
    out, out_r = obj.outputs(p0), span.objective.outputs(b0)
    # X K_perp = 0 up to rounding. Each output comes through three products of sums of at
    # most d = 64 terms (X V, V^T K and X K) and the width-6 output sum: at most
    # (3 * 64 + 6) eps < 64 * 8 eps relative (gamma_m = m eps per m-term sum), here and below
    scale = float(jnp.max(jnp.abs(out)))
    assert float(jnp.max(jnp.abs(out - out_r))) <= 64 * 8 * EPS * scale
    g, g_r = obj.grad_log_loss(p0), span.objective.grad_log_loss(b0)
    sq = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g))
    sq_r = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(g_r))
    assert abs(sq - sq_r) <= 64 * 8 * EPS * sq  # orthonormal V: the same |grad|
    # the lift gives back K(0) (to rounding) and |theta|^2 = |theta_r|^2 + |K_perp|^2
    lifted = span.lift_many(jax.tree.map(lambda a: a[None], b0))
    for a, b in zip(jax.tree.leaves(lifted), jax.tree.leaves(p0), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=0, atol=64 * 8 * EPS * float(jnp.max(jnp.abs(b))))
    sq_theta = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(p0))
    sq_theta_r = sum(float(jnp.sum(a**2)) for a in jax.tree.leaves(b0)) + span.sq_fixed[0]
    assert abs(sq_theta - sq_theta_r) <= 64 * 8 * EPS * sq_theta


def test_at_fixed_steps_the_reduced_flow_is_the_full_flow_to_rounding(few):
    """Runge-Kutta steps commute with an orthogonal change of variables: at the same fixed
    steps every save point agrees to rounding. Bound: each step's two computations differ
    by the rounding of sums of at most d = 64 terms (64 eps relative), over N steps
    without growth: N 64 eps. (Stability stepping's steps come from a Lanczos estimate to
    1e-3, which starts from a random vector of the state's size: the same to that
    tolerance, not to rounding.)"""
    _, obj, p0 = few
    kw = dict(solver="ralston", dt=DT, log_t_max=8.0, saves=16)
    full = run_flow(obj, p0, input_span=False, **kw)
    red = run_flow(obj, p0, **kw)
    assert full.config["input_span"] is None and red.config["input_span"] == 20
    assert full.status == red.status == "completed"
    np.testing.assert_array_equal(full["solver_steps"], red["solver_steps"])
    bound = float(full["solver_steps"][-1]) * 64 * EPS
    for c in full.column_names:
        a, b = np.asarray(full[c], float), np.asarray(red[c], float)
        ok = np.isfinite(a)
        np.testing.assert_array_equal(ok, np.isfinite(b))
        if c.endswith("drift") or c == "dissipation_defect":  # already relative to rho^2, Loss
            assert np.max(np.abs(a[ok] - b[ok]), initial=0) <= bound, c
        elif ok.any():
            scale = np.max(np.abs(a[ok]))
            assert np.max(np.abs(a[ok] - b[ok])) <= bound * scale, c
    for a, b in zip(
        jax.tree.leaves(full.final_params), jax.tree.leaves(red.final_params), strict=True
    ):  # fmt: skip
        assert a.shape == b.shape  # the lifted parameters, full size
        assert np.max(np.abs(a - b)) <= bound * np.max(np.abs(a))


def test_stability_stepping_keeps_its_accuracy(few):
    """Adaptive steps measure the error in the reduced coordinates (its RMS over the full
    state's entries), and the stable steps' Lanczos starts from another random vector: a
    different step sequence at the same tolerance. Both runs keep their invariants within
    the fidelity verdict's tolerance (their error estimates may leave it undecided), and
    they agree to what their drift says each is off."""
    from gflow.theory import fidelity

    _, obj, p0 = few
    kw = dict(solver="ralston", cfl=0.14, rtol=3e-5, atol=3e-8, log_t_max=8.0, saves=16)
    full = run_flow(obj, p0, input_span=False, **kw)
    red = run_flow(obj, p0, **kw)
    assert red.config["input_span"] == 20
    for v in (fidelity(full), fidelity(red)):  # the invariants' part passes, and no FAIL
        assert v.passed is not False, v
        assert v.details["balance_drift"]["max"] <= v.details["tolerance"], v
    gap = np.max(np.abs(np.asarray(full["normalized_margin"]) - red["normalized_margin"]))
    # Not a derived bound: no a priori bound holds for a flow that chatters across kinks.
    # The factor 100 is the margin error / drift ratio flow_accuracy measures on the default
    # problem (7.0e-5 / 7.1e-7); here the gap is about 8 times below it
    drift = np.nanmax(full["balance_drift"]) + np.nanmax(red["balance_drift"])
    scale = np.max(np.abs(full["normalized_margin"]))
    assert gap <= 100 * max(drift, kw["rtol"]) * scale


def test_which_runs_are_reduced(few):
    ds, obj, p0 = few
    assert input_span(obj, [p0], when=False) is None
    # digits 0/1 (360 samples) span more than half of the 64 pixels: auto leaves them
    _, _, obj_m, p_m = build_digits(360, width=6)  # all of them, in their order
    auto, forced = input_span(obj_m, [p_m]), input_span(obj_m, [p_m], when=True)
    assert auto is None
    assert forced is None or forced.rank < 64  # True: whenever the rank is below d
    # a CNN's first layer is a convolution: never
    img = D.Dataset(x=np.asarray(ds.x).reshape(-1, 8, 8, 1), y=ds.y, name="img", num_classes=2)
    cnn = build_model("cnn", img.input_shape, 1, width=2)
    obj_c, p_c = make_objective(cnn, img, "logistic")
    assert input_span(obj_c, [p_c], when=True) is None
    # a model of one's own (a pure function): never
    w = split_params(build_model("mlp", ds.input_shape, 1, width=6))[1]

    def apply_fn(params, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["layers"][0]["kernel"])
        return h @ params["layers"][1]["kernel"]

    obj_f, _ = make_objective(apply_fn, ds, "logistic", order=2, params=w)
    assert input_span(obj_f, [w], when=True) is None


def test_a_batch_is_reduced_run_by_run(few):
    """Each run of a batch keeps its own fixed part: the reduced batch is the full one to
    rounding (the bound of the fixed-step test)."""
    ds, obj, _ = few
    inits = [split_params(build_model("mlp", ds.input_shape, 1, width=6, seed=s))[1]
             for s in (1, 2)]  # fmt: skip
    kw = dict(solver="ralston", dt=DT, log_t_max=5.0, saves=5, seeds=[1, 2])
    full = run_flow_seeds(obj, inits, input_span=False, **kw)
    red = run_flow_seeds(obj, inits, **kw)
    for a, b in zip(full, red, strict=True):
        assert a.config["input_span"] is None and b.config["input_span"] == 20
        np.testing.assert_array_equal(a["solver_steps"], b["solver_steps"])
        bound = float(a["solver_steps"][-1]) * 64 * EPS
        for c in ("rho", "q_min", "log_loss", "normalized_margin"):
            scale = np.max(np.abs(a[c]))
            assert np.max(np.abs(np.asarray(a[c]) - b[c])) <= bound * scale, c
    assert not np.array_equal(red[0]["rho"], red[1]["rho"])  # two runs, not one twice
