"""GD's sharpness along every step (``run_gd(sharpness_every=...)``) and the GD theorem's
step condition judged from it (``theory.gd_scope``, S5's necessary part)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gflow.checkpoint import Checkpointer
from gflow.dynamics import run_gd, run_gd_seeds
from gflow.dynamics.gd import SHARPNESS_VECTORS, top_ritz
from gflow.problem import Problem
from gflow.theory import check_run, gd_scope, step_ratio, threshold_index

EPS = np.finfo(np.float64).eps
COLUMNS = (
    "sharpness", "step_sharpness", "step_sharpness_max", "step_condition_max", "sharpness_steps",
)  # fmt: skip


@pytest.fixture(scope="module")
def tiny():
    """A two-layer linear net (C^2, 2-homogeneous) of width 3 on 8 separable points in the
    plane, exponential loss: 9 parameters, so that the Hessian can be formed densely."""
    _, _, obj, p0 = Problem(data="synthetic", n=8, width=3, activation="linear",
                            loss="exp").build()  # fmt: skip
    assert obj.smooth is True and obj.homogeneous
    return obj, p0


def _dense(obj, params) -> np.ndarray:
    """``Hess Loss / Loss = Hess log Loss + g g^T`` at ``params``, formed densely."""
    flat, unravel = ravel_pytree(jax.tree.map(jnp.asarray, params))
    f = lambda v: obj.log_loss(unravel(v))  # noqa: E731
    g = np.asarray(jax.grad(f)(flat))
    return np.asarray(jax.hessian(f)(flat)) + np.outer(g, g)


def _slack(a: np.ndarray) -> float:
    """How far a computed Rayleigh quotient of ``a`` may exceed ``lambda_max`` by rounding:
    each product ``A q`` (an autodiff graph a few operations deep per entry), each dot
    product over ``dim`` entries and the small eigensolver add ``O(dim eps ||A||)``
    (Higham, Accuracy and Stability, section 3.1); 50 covers those constants."""
    return 50 * a.shape[0] * EPS * float(np.linalg.norm(a, 2))


# ---------------------------------------------------------------- the estimator


def test_top_ritz_is_a_lower_bound_and_finds_the_algebraic_top(rng):
    """On a symmetric matrix whose negative eigenvalue is the largest in magnitude, every
    Ritz value is at most ``lambda_max`` (a Rayleigh quotient), restarts converge to the
    algebraic top, not to ``-10``, and a start on an eigenvector (an invariant subspace)
    gives that eigenvalue, not a NaN."""
    q, _ = np.linalg.qr(rng.standard_normal((12, 12)))
    evals = np.array([-10.0, 3.0, 2.5] + list(np.linspace(-1, 1, 9)))
    a = (q * evals) @ q.T
    matvec = jax.jit(lambda v: jnp.asarray(a) @ v)
    v = jnp.asarray(rng.standard_normal(12))
    seen = []
    for _ in range(60):
        lam, v = top_ritz(matvec, v, SHARPNESS_VECTORS)
        seen.append(float(lam))
        assert abs(float(jnp.linalg.norm(v)) - 1) < 1e-14
    assert max(seen) <= 3.0 + _slack(a)
    assert abs(seen[-1] - 3.0) < 1e-10
    lam, vec = top_ritz(matvec, jnp.asarray(q[:, 1]), SHARPNESS_VECTORS)
    assert abs(float(lam) - 3.0) < 1e-12 and np.all(np.isfinite(np.asarray(vec)))


def test_sharpness_along_gd_is_a_lower_bound_and_converges(tiny):
    """At every save point the recorded sharpness is at most the dense ``eigvalsh``'s top
    eigenvalue of ``Hess Loss / Loss`` (up to rounding), and within 1e-9 of it (relative)
    at the initial point (10 restarts) and after the first steps (each step's Krylov
    space starts from the last Ritz vector). ``step_sharpness`` is ``eta Loss`` times it."""
    obj, p0 = tiny
    lr = 0.03
    tr = run_gd(obj, p0, schedule="constant", lr=lr, max_steps=200, saves=8, save_params=True)
    assert tr.status == "completed" and all(c in tr.columns for c in COLUMNS)
    assert tr.config["sharpness_every"] == 1
    for i, snap in enumerate(tr.snapshots):
        a = _dense(obj, snap)
        top = np.linalg.eigvalsh(a)[-1]
        est = tr["sharpness"][i]
        assert est <= top + _slack(a), (i, est, top)
        if i == 0 or tr["step"][i] >= 20:
            assert abs(est - top) <= 1e-9 * top, (i, est, top)
        want = math.exp(math.log(lr) + tr["log_loss"][i]) * est
        np.testing.assert_allclose(tr["step_sharpness"][i], want, rtol=1e-12)
    # every accepted step entered the maxima; none before the first step
    np.testing.assert_array_equal(tr["sharpness_steps"], tr["step"])
    assert np.isnan(tr["step_sharpness_max"][0]) and np.isnan(tr["step_condition_max"][0])
    assert np.all(tr["step_sharpness_max"][1:] > 0)


def test_the_estimate_leaves_the_run_unchanged_and_its_stride(tiny):
    """The sharpness is an instrument: with it every step, every 4th, or never, GD takes
    the same steps. With a stride it is estimated at every 4th step's parameters and at
    the save points; with 0 there are no sharpness columns (the verdict falls back to
    the snapshots); ``run_gd_seeds`` under a stride equals its runs alone."""
    obj, p0 = tiny
    kw = dict(schedule="constant", lr=0.03, max_steps=60, saves=6)
    every = run_gd(obj, p0, **kw)
    fourth = run_gd(obj, p0, **kw, sharpness_every=4)
    off = run_gd(obj, p0, **kw, sharpness_every=0)
    for tr in (fourth, off):
        np.testing.assert_allclose(tr["log_loss"], every["log_loss"], rtol=1e-12)
        np.testing.assert_allclose(tr["rho"], every["rho"], rtol=1e-12)
    assert off.config["sharpness_every"] == 0 and not any(c in off.columns for c in COLUMNS)
    assert fourth.config["sharpness_every"] == 4
    steps, seen = fourth["step"], fourth["sharpness_steps"]
    # the steps from parameters at a multiple of 4 (step 0 included), or at a save point
    want = [len({s for s in range(int(n)) if s % 4 == 0} | {int(v) for v in steps if v < n})
            for n in steps]  # fmt: skip
    np.testing.assert_array_equal(seen, want)
    assert np.all(np.isfinite(fourth["sharpness"]))  # estimated at every save point
    np.testing.assert_allclose(fourth["sharpness"], every["sharpness"], rtol=1e-6)
    # the maxima over fewer steps are at most those over all of them (same Ritz values)
    assert np.all(fourth["step_sharpness_max"][1:] <= every["step_sharpness_max"][1:] * (1 + 1e-9))
    inits = [p0, jax.tree.map(lambda a: 1.1 * a, p0)]
    together = run_gd_seeds(obj, inits, seeds=[0, 1], **kw, log_t_max=None, sharpness_every=3)
    for p, s, tr in zip(inits, [0, 1], together, strict=True):
        alone = run_gd(obj, p, seed=s, **kw, sharpness_every=3)
        for c in COLUMNS + ("log_loss",):
            np.testing.assert_allclose(tr[c], alone[c], rtol=1e-12, err_msg=c)


@pytest.mark.parametrize("schedule", ["constant", "loss-based"])
def test_a_run_with_a_stride_resumes_exactly(tiny, tmp_path, schedule):
    """A stride's estimates at the save points and the maxima started afresh there are in
    the checkpointed state: cut at a save point and resumed, the run equals the whole
    (constant steps estimate in the step's gradient pass, loss-based ones before it)."""
    obj, p0 = tiny
    kw = dict(schedule=schedule, lr=0.03, max_steps=80, saves=8, sharpness_every=3)
    whole = run_gd(obj, p0, **kw)

    class Crash(Exception):
        pass

    rows = []

    def crash(row):
        if "q_min" in row:
            rows.append(row)
            if len(rows) > 4:
                raise Crash

    with pytest.raises(Crash):
        run_gd(obj, p0, **kw, checkpoint=Checkpointer(tmp_path), progress=crash)
    resumed = run_gd(obj, p0, **kw, checkpoint=Checkpointer(tmp_path), resume=True)
    assert resumed.column_names == whole.column_names
    for c in whole.column_names:
        np.testing.assert_array_equal(resumed[c], whole[c], err_msg=c)


def test_sharpness_every_is_checked_and_sgd_records_nan(tiny):
    obj, p0 = tiny
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="sharpness_every must be an integer >= 0"):
            run_gd(obj, p0, max_steps=2, sharpness_every=bad)
    sgd = run_gd(obj, p0, schedule="constant", lr=0.01, batch_size=4, max_steps=4, saves=2)
    assert all(np.isnan(sgd[c]).all() for c in COLUMNS)
    assert sgd.config["sharpness_every"] == 0


# ---------------------------------------------------------------- the verdict's scope


def _from_converged_start(obj, p0):
    """Parameters past the loss threshold (Loss ~ e^-5), and there the dense
    ``Loss * lambda_max(Hess Loss / Loss)`` (= ``lambda_max(Hess Loss)``)."""
    pre = run_gd(obj, p0, schedule="constant", lr=0.03, max_steps=3000, saves=2,
                 sharpness_every=0)  # fmt: skip
    start = jax.tree.map(jnp.asarray, pre.final_params)
    lam = float(np.linalg.eigvalsh(_dense(obj, start))[-1]) * math.exp(obj.log_loss(start))
    assert obj.log_loss(start) < -3
    return start, lam


def test_a_stable_step_above_mu_is_outside_and_a_small_one_is_not(tiny):
    """From a point past the threshold (t0 = the initial point, mu(Loss(t0)) = 1/2), a
    constant step with ``eta lambda_max = 1`` there is stable (below 2 at every step) but
    twice ``mu``: the GD theorem does not cover it, by S5 (its dense ``eigvalsh`` agrees).
    A step 20 times smaller stays below ``mu`` at every step: in scope."""
    obj, p0 = tiny
    start, lam = _from_converged_start(obj, p0)
    kw = dict(schedule="constant", max_steps=400, saves=10, save_params=True)
    big = run_gd(obj, start, lr=1.0 / lam, **kw)
    assert big.status == "completed" and threshold_index(big, 0.0) == 0
    assert np.nanmax(big["step_sharpness_max"]) < 2  # stable: not the stability bound
    why = gd_scope(big)
    assert len(why) == 1 and "times mu(Loss)" in why[0] and "S5" in why[0], why
    assert "400 of 400 steps past t0 seen, every step" in why[0]
    ratio = float(why[0].split("reached ")[1].split(" times")[0])
    assert 1.9 < ratio <= 2.0 + 1e-6  # eta lambda_max / mu at the first step: 1 / (1/2)
    # the dense Hessian at the start: eta lambda_max(Hess Loss) = 1 > mu(Loss(t0)) = 1/2
    a = _dense(obj, big.snapshots[0])
    dense = math.exp(math.log(1.0 / lam) + big["log_loss"][0]) * np.linalg.eigvalsh(a)[-1]
    assert abs(dense - 1.0) < 1e-9
    verdicts = {v.name: v for v in check_run(big, obj)}
    assert verdicts["margin monotone"].outcome == "OUTSIDE"
    assert "times mu(Loss)" in verdicts["margin monotone"].outside
    small = run_gd(obj, start, lr=0.05 / lam, **kw)
    assert 0 < np.nanmax(small["step_sharpness_max"]) < 0.06
    assert gd_scope(small) == []
    assert all(v.outcome != "OUTSIDE" for v in check_run(small, obj))


def test_a_diverged_run_is_checked_without_a_traceback(tiny):
    """Constant lr 1 diverges in three steps (log Loss ~ 1e110): its checks are n/a, with
    the sharpness columns and without them (the snapshot fallback, whose ``eta Loss``
    overflowed float64 before it was formed in log space)."""
    obj, p0 = tiny
    for every in (1, 0):
        tr = run_gd(obj, p0, schedule="constant", lr=1.0, max_steps=50, saves=5,
                    sharpness_every=every)  # fmt: skip
        assert tr.status == "failed" and tr["log_loss"][-1] > 1e3
        verdicts = check_run(tr, obj)
        assert all(v.outcome != "FAIL" for v in verdicts)
        if every == 0:
            assert tr["log_lr"][-1] + tr["log_loss"][-1] > 710  # math.exp would overflow
            assert step_ratio(tr, obj) == math.inf
            assert any("> 2 measured" in w for w in gd_scope(tr, math.inf))


# ---------------------------------------------------------------- the plot


def test_the_plot_shows_the_step_sharpness_of_gd_only(tiny, monkeypatch, tmp_path):
    import gflow.plots as P

    obj, p0 = tiny
    titles = []

    def keep(fig, path, dpi=90):
        titles.append([ax.get_title() for ax in fig.axes if ax.axison])
        return P.plt.close(fig)

    monkeypatch.setattr(P, "save_figure", keep)
    gd = run_gd(obj, p0, schedule="constant", lr=0.03, max_steps=20, saves=4)
    off = run_gd(obj, p0, schedule="constant", lr=0.03, max_steps=20, saves=4, sharpness_every=0)
    P.plot_trajectories({"gd": gd}, tmp_path / "a.png")
    P.plot_trajectories({"gd": off}, tmp_path / "b.png")
    P.plot_seed_bands({"gd": [gd, gd]}, tmp_path / "c.png")
    with_panel = [any("lambda_{max}" in t for t in ts) for ts in titles]
    assert with_panel == [True, False, True]
    assert len(titles[0]) == 7 and len(titles[1]) == 6
