"""Losses in log space: against naive float64 formulas, a 60-digit reference, FD gradients."""

import math

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gflow.losses import (
    CrossEntropy,
    Exponential,
    Logistic,
    get_loss,
    log_expm1_exp,
    log_softplus,
    multiclass_margins,
)
from tests.conftest import rel_err

mpmath.mp.dps = 60

BINARY = [Exponential(), Logistic()]
Q_RANGE = st.floats(-1e5, 1e5, allow_nan=False)


def mp_log_term(name, q):
    q = mpmath.mpf(q)
    if name == "exp":
        return -q
    return mpmath.log(mpmath.log1p(mpmath.exp(-q)))


def mp_log_loss(name, qs):
    return mpmath.log(mpmath.fsum(mpmath.exp(mp_log_term(name, q)) for q in qs))


@pytest.mark.parametrize("loss", BINARY, ids=lambda l: l.name)
def test_log_loss_equals_naive_formula_where_representable(loss, rng):
    q = rng.uniform(-30, 30, size=50)
    naive = {"exp": np.exp(-q), "logistic": np.log1p(np.exp(-q))}[loss.name]
    got = loss.log_loss(jnp.asarray(q), jnp.ones(50))
    assert abs(float(got) - math.log(naive.sum())) <= 1e-12 * abs(math.log(naive.sum())) + 1e-15


@pytest.mark.parametrize("loss", BINARY, ids=lambda l: l.name)
@pytest.mark.parametrize(
    "q",
    [-1e5, -700.0, -40.0, -1.0, -1e-9, 0.0, 1e-9, 0.5, 17.0, 18.5, 40.0, 745.5, 800.0, 1e4, 1e5],
)
def test_log_term_matches_high_precision_reference(loss, q):
    got = float(loss.log_terms(jnp.asarray([q]), jnp.ones(1))[0])
    want = float(mp_log_term(loss.name, q))
    assert math.isfinite(got)
    assert abs(got - want) <= 4e-16 * max(1.0, abs(want))


@pytest.mark.parametrize("loss", BINARY, ids=lambda l: l.name)
def test_log_loss_of_mixed_extreme_margins_matches_reference(loss, rng):
    q = np.concatenate([rng.uniform(-1e5, 1e5, 20), rng.uniform(700, 900, 5), [1e5, -1e5]])
    got = float(loss.log_loss(jnp.asarray(q), jnp.ones(q.size)))
    want = float(mp_log_loss(loss.name, q))
    assert abs(got - want) <= 1e-14 * max(1.0, abs(want))
    # All margins large: the loss is ~1e-350000, far below float64, yet log Loss is exact.
    q = rng.uniform(8e4, 1e5, 10)
    got = float(loss.log_loss(jnp.asarray(q), jnp.ones(10)))
    assert abs(got - float(mp_log_loss(loss.name, q))) <= 1e-15 * 1e5


@pytest.mark.parametrize("loss", BINARY, ids=lambda l: l.name)
@settings(max_examples=200, deadline=None)
@given(a=Q_RANGE, b=Q_RANGE)
def test_log_term_finite_and_monotone(loss, a, b):
    lo, hi = min(a, b), max(a, b)
    t = loss.log_terms(jnp.asarray([lo, hi]), jnp.ones(2))
    g = jax.grad(lambda q: loss.log_loss(q, jnp.ones(2)))(jnp.asarray([lo, hi]))
    assert np.all(np.isfinite(t)) and np.all(np.isfinite(g))
    # l is decreasing in q, up to the rounding of log(log(1 + e^-q)): a few ulps (q = 0
    # against q = 1e-16 rounds the wrong way by one)
    assert t[0] >= t[1] - 4 * np.finfo(np.float64).eps * abs(t[1])
    assert np.all(g <= 0)


@pytest.mark.parametrize("loss", [Exponential(), Logistic(), CrossEntropy()], ids=lambda l: l.name)
def test_gradient_matches_finite_differences(loss, rng):
    if loss.binary:
        out = jnp.asarray(rng.uniform(-5, 5, 7))
        y = jnp.asarray(rng.choice([-1.0, 1.0], 7))
    else:
        out = jnp.asarray(rng.normal(size=(7, 4)) * 3)
        y = jnp.asarray(rng.integers(0, 4, 7), jnp.int32)
    f = lambda o: loss.log_loss(o, y)
    g = np.asarray(jax.grad(f)(out))
    h = 1e-6
    fd = np.zeros_like(g)
    flat = np.asarray(out).ravel()
    for i in range(flat.size):
        e = np.zeros_like(flat)
        e[i] = h
        fd.ravel()[i] = (
            f(jnp.asarray((flat + e).reshape(out.shape)))
            - f(jnp.asarray((flat - e).reshape(out.shape)))
        ) / (2 * h)
    assert rel_err(g, fd) < 1e-8


def test_cross_entropy_with_two_classes_is_logistic(rng):
    z = rng.normal(size=(30, 2)) * 50
    y = rng.integers(0, 2, 30)
    ce = CrossEntropy().log_terms(jnp.asarray(z), jnp.asarray(y, jnp.int32))
    s = np.where(y == 1, 1.0, -1.0)
    lg = Logistic().log_terms(jnp.asarray(z[:, 1] - z[:, 0]), jnp.asarray(s))
    assert rel_err(ce, lg) < 1e-14


def test_cross_entropy_matches_reference_for_extreme_logits():
    z = np.array([[0.0, 1e4, -1e4], [3e4, 0.0, -5.0], [1.0, 2.0, 3.0], [-800.0, 0.0, -900.0]])
    y = np.array([1, 0, 2, 1])
    got = np.asarray(CrossEntropy().log_terms(jnp.asarray(z), jnp.asarray(y, jnp.int32)))
    for n in range(4):
        s = mpmath.fsum(mpmath.exp(mpmath.mpf(z[n, j] - z[n, y[n]])) for j in range(3) if j != y[n])
        want = float(mpmath.log(mpmath.log1p(s)))
        assert abs(got[n] - want) <= 4e-16 * max(1.0, abs(want))


@pytest.mark.parametrize("ell", [-1e5, -745.0, -40.0, -18.5, -1e-3, 0.0, 1e-3, 0.5, 3.0, 6.5])
def test_log_expm1_exp_matches_reference(ell):
    want = float(mpmath.log(mpmath.expm1(mpmath.exp(mpmath.mpf(ell)))))
    got = float(log_expm1_exp(jnp.asarray(ell)))
    assert abs(got - want) <= 4e-16 * max(1.0, abs(want))


@pytest.mark.parametrize("loss", [Exponential(), Logistic()], ids=lambda l: l.name)
@settings(max_examples=100, deadline=None)
@given(q=st.floats(-20.0, 1e5))
def test_inverse_undoes_the_loss(loss, q):
    # One sample: l^{-1}(l(q)) = q.
    ll = loss.log_loss(jnp.asarray([q]), jnp.ones(1))
    assert abs(float(loss.inverse(ll)) - q) <= 1e-13 * max(1.0, abs(q))


def test_log_softplus_gradient_finite_everywhere():
    u = jnp.asarray([-1e5, -800.0, -18.0, 0.0, 18.0, 800.0, 1e5])
    g = jax.vmap(jax.grad(log_softplus))(u)
    assert np.all(np.isfinite(g))
    want = [
        float(mpmath.diff(lambda v: mpmath.log(mpmath.log1p(mpmath.exp(v))), mpmath.mpf(x)))
        for x in (-18.0, 0.0, 18.0)
    ]
    assert rel_err(g[2:5], want) < 1e-14


def test_thresholds():
    assert Exponential().threshold == 1.0
    assert Logistic().threshold == pytest.approx(math.log(2), rel=1e-15)
    assert CrossEntropy().threshold == pytest.approx(math.log(2), rel=1e-15)


def test_multiclass_margins_brute_force(rng):
    z = rng.normal(size=(20, 5))
    y = rng.integers(0, 5, 20)
    want = [z[n, y[n]] - max(z[n, j] for j in range(5) if j != y[n]) for n in range(20)]
    got = multiclass_margins(jnp.asarray(z), jnp.asarray(y, jnp.int32))
    assert rel_err(got, want) < 1e-15


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        get_loss("hinge")
