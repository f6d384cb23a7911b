"""Attacks: closed forms on a linear model, constraints always kept, robust accuracy."""

import jax.numpy as jnp
import numpy as np
import pytest

from gflow.models import split_params
from gflow.robustness import Attack, margins_at, minimal_eps, pgd, robust_accuracy
from tests.conftest import digits_problem


@pytest.fixture(scope="module")
def linear():
    problem = digits_problem(40, scale="none", model="linear")
    ds = problem.dataset()
    model = problem.make_model(ds, seed=3)
    graphdef, params = split_params(model)
    w = np.asarray(params["layers"][0]["kernel"]).ravel()
    return ds, graphdef, params, w


@pytest.mark.parametrize("norm,dual", [("l2", 2), ("linf", 1)])
def test_minimal_eps_of_a_linear_model_is_the_closed_form(linear, norm, dual):
    ds, graphdef, params, w = linear
    x, y = jnp.asarray(ds.x), jnp.asarray(ds.y_signed)
    m = np.asarray(margins_at(graphdef, params, x, y, True))
    ok = m > 0
    exact = m / np.linalg.norm(w, ord={2: 2, 1: 1}[dual])  # |w.x| / ||w||_dual
    att = Attack(norm=norm, steps=50, step=0.1, box=None)
    got = minimal_eps(graphdef, params, x, y, att, eps_max=2 * exact.max(), iters=16,
                      binary=True)  # fmt: skip
    np.testing.assert_allclose(got[ok], exact[ok], rtol=1e-2)
    assert np.all(got[~ok] == 0)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_never_leaves_the_ball_or_the_box(norm):
    problem = digits_problem(30, classes=(0, 1, 2), seed=1, scale="none", model="cnn", width=4,
                             depth=1, loss="ce")  # fmt: skip
    ds = problem.dataset()
    x = np.asarray(ds.x) / 16.0  # digits are 0..16: into [0, 1]
    model = problem.make_model(ds, seed=0)
    graphdef, params = split_params(model)
    eps = np.linspace(0.0, 0.5 if norm == "linf" else 3.0, 30)
    att = Attack(norm=norm, steps=20, step=0.25, restarts=2)
    xa, m = pgd(graphdef, params, x, ds.y, eps, att)
    d = np.asarray(xa) - x
    size = (
        np.abs(d).reshape(30, -1).max(1)
        if norm == "linf"
        else np.linalg.norm(d.reshape(30, -1), axis=1)
    )
    assert np.all(size <= eps * (1 + 1e-12) + 1e-15)
    assert np.asarray(xa).min() >= 0.0 and np.asarray(xa).max() <= 1.0
    clean = np.asarray(margins_at(graphdef, params, jnp.asarray(x), jnp.asarray(ds.y), False))
    assert np.all(np.asarray(m) <= clean + 1e-12)  # never worse than the clean point


def test_robust_accuracy_counts_points_whose_minimal_eps_exceeds_the_grid():
    min_eps = np.array([0.0, 0.1, 0.2, np.inf])
    acc = robust_accuracy(min_eps, [0.0, 0.05, 0.15, 0.3])
    np.testing.assert_allclose(acc, [0.75, 0.75, 0.5, 0.25])
    assert np.all(np.diff(acc) <= 0)


def test_bad_attack_settings(linear):
    ds, graphdef, params, _ = linear
    with pytest.raises(ValueError, match="norm must be one of"):
        pgd(graphdef, params, ds.x, ds.y_signed, 0.1, Attack(norm="l1"), binary=True)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        pgd(graphdef, params, ds.x, ds.y_signed, -0.1, binary=True)
