"""``gflow.kkt``: the (eps, delta)-KKT residual, its Gram matrix and its non-negative
quadratic program, against brute force, an independent SVM and per-example gradients."""

import itertools

import jax
import numpy as np
import pytest

from gflow.kkt import gram_matrix, kkt_residual, nonneg_quadratic
from tests.conftest import build_digits, svm


def _brute_force(K, c):
    """min lam^T K lam - 2 c^T lam over lam >= 0 by enumerating supports."""
    best, arg = 0.0, np.zeros_like(c)
    for k in range(1, len(c) + 1):
        for S in itertools.combinations(range(len(c)), k):
            S = list(S)
            lam_S = np.linalg.lstsq(K[np.ix_(S, S)], c[S], rcond=None)[0]
            if np.all(lam_S >= -1e-12):
                lam = np.zeros_like(c)
                lam[S] = np.maximum(lam_S, 0)
                f = lam @ K @ lam - 2 * c @ lam
                if f < best - 1e-12:
                    best, arg = f, lam
    return best, arg


@pytest.mark.parametrize("rank", [3, 7])
def test_nonneg_quadratic_matches_brute_force_and_its_own_optimality(rng, rank):
    n = 7
    J = rng.standard_normal((n, rank))
    K = J @ J.T
    c = J @ rng.standard_normal(rank)  # in K's range, like L q = J theta_s
    lam, gap = nonneg_quadratic(K, c)
    best, lam_bf = _brute_force(K, c)
    assert lam.min() >= 0 and gap < 1e-10
    f = lam @ K @ lam - 2 * c @ lam
    assert f == pytest.approx(best, rel=1e-9, abs=1e-12)
    if rank == n:  # strictly convex: the minimiser is unique
        np.testing.assert_allclose(lam, lam_bf, atol=1e-9)


def test_kkt_residual_is_zero_at_the_svm_solution_and_not_elsewhere(linear_problem):
    ds, (obj, p0) = linear_problem
    X, y = np.asarray(ds.x).reshape(len(ds), -1), ds.y_signed
    w = svm(X, y)  # by SLSQP on the primal (independent of the NNLS path)
    params = jax.tree.map(lambda a: a, p0)
    params["layers"][0]["kernel"] = np.asarray(w[:, None] * 3.0)  # any positive scale
    at_svm = kkt_residual(obj, params, gap=None)
    assert at_svm.eps_rel < 1e-6 and abs(at_svm.delta) < 1e-6 and at_svm.kkt_gap < 1e-9
    assert at_svm.q_min == pytest.approx(3.0, rel=1e-6)
    # the initial direction is no KKT point
    off = kkt_residual(obj, p0, gap=None) if obj.margins(p0).min() > 0 else None
    if off is not None:
        assert off.eps_rel > 1e-2


def test_gram_matrix_blockwise_equals_whole(linear_problem):
    ds, (obj, p0) = linear_problem
    K1 = gram_matrix(obj, p0)
    K2 = gram_matrix(obj, p0, chunk=7, max_bytes=1)
    np.testing.assert_allclose(K2, K1, rtol=0, atol=1e-13 * np.abs(K1).max())
    X, y = np.asarray(ds.x).reshape(len(ds), -1), ds.y_signed
    np.testing.assert_allclose(K1, (y[:, None] * X) @ (y[:, None] * X).T, atol=1e-12)


def test_kkt_refuses_non_separated_data(linear_problem):
    _, (obj, p0) = linear_problem
    flipped = jax.tree.map(lambda a: -a, p0)
    bad = p0 if obj.margins(p0).min() <= 0 else flipped
    with pytest.raises(ValueError, match="not separated"):
        kkt_residual(obj, bad)


@pytest.mark.parametrize(
    "name, kw, classes, loss",
    [
        ("mlp", dict(width=7, depth=3, bias="first"), (0, 1), "logistic"),
        ("cnn", dict(width=3, depth=2, bias="all"), (0, 1, 2), "ce"),
        ("paper-cnn", dict(bias="first"), (0, 1, 2), "ce"),
    ],
)
def test_layerwise_gram_equals_per_example_gradients(name, kw, classes, loss):
    _, _, obj, p = build_digits(30, classes=classes, seed=1, model=name, loss=loss,
                                init_seed=0, **kw)  # fmt: skip
    idx = np.arange(0, 30, 2)  # 15 samples in chunks of 4: the last chunk is padded
    K_rows = gram_matrix(obj, p, idx, method="rows")
    K_layers = gram_matrix(obj, p, idx, method="layers", chunk=4)
    np.testing.assert_allclose(K_layers, K_rows, rtol=0, atol=1e-12 * np.abs(K_rows).max())
    assert np.abs(K_rows).max() > 0


def test_kkt_pareto_points_are_optimal_and_trade_eps_for_delta():
    """``kkt_pareto``: weight 0 is ``kkt_residual``'s point; each row's multipliers
    satisfy the optimality conditions of their bound-constrained quadratic, computed
    here from the Gram matrix (``K lam - c >= 0``, ``lam (K lam - c) = 0``; L-BFGS-B
    stops with the objective flat to ftol = 1e-15, leaving a gradient of about
    sqrt(ftol) = 3e-8 of |c|: 1e-6 allows 30x); along growing weights eps does not fall
    and delta does not rise (a scalarised Pareto front); the per-term delta_max never
    exceeds the sum (every term lam_n (q_n - 1) >= 0 once q_min(theta_s) = 1)."""
    from gflow.dynamics import run_flow
    from gflow.kkt import kkt_pareto, scaled_params

    _, _, obj, p0 = build_digits(40, width=6)
    p = run_flow(obj, p0, log_t_max=10, saves=2).final_params
    r = kkt_residual(obj, p)
    rows = kkt_pareto(obj, p, weights=(0.0, 0.03, 0.3, 3.0))
    assert rows[0]["delta"] == pytest.approx(r.delta, rel=1e-9)
    assert rows[0]["delta_max"] == pytest.approx(r.delta_max, rel=1e-9)
    assert 0 <= r.delta_max <= r.delta
    theta_s, q_s, _ = scaled_params(obj, p)
    norm2 = sum(float(np.sum(np.asarray(a) ** 2)) for a in jax.tree.leaves(theta_s))
    for row in rows:
        act = row["active"]
        K = gram_matrix(obj, theta_s, act)
        c = obj.order * q_s[act] - 0.5 * row["weight"] * norm2 * (q_s[act] - 1)
        g = K @ row["lam"] - c
        scale = np.abs(c).max()
        assert row["lam"].min() >= 0 and g.min() >= -1e-6 * scale
        assert np.abs(row["lam"] * g).max() <= 1e-6 * scale * max(row["lam"].max(), 1.0)
        assert 0 <= row["delta_max"] <= row["delta"] + 1e-12
    eps = [row["eps"] for row in rows]
    delta = [row["delta"] for row in rows]
    assert np.all(np.diff(eps) >= -1e-9 * eps[0]) and np.all(np.diff(delta) <= 1e-9 * delta[0])
    assert delta[-1] < 0.5 * delta[0]  # the trade-off is there to be had
