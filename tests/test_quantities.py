"""Quantities: bounds of docs/theory.md, scale invariance, brute force, one compile per shape."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gflow import data, objective
from gflow.models import build_model
from gflow.objective import make_objective
from gflow.quantities import SUPPORT_DECADES, support_counts
from tests.conftest import build_digits, rel_err


def _problem(seed, loss="exp", name="mlp", n=40, depth=3, bias="none"):
    ds = data.synthetic(n, 5, seed=seed)
    model = build_model(name, ds.input_shape, 1, width=6, depth=depth, seed=seed, bias=bias)
    return make_objective(model, ds, loss)


@pytest.mark.parametrize("seed", range(6))
def test_exponential_smoothed_margin_bounds(seed):
    # gamma_bar - log(N)/rho^L <= gamma_tilde <= gamma_bar (docs/theory.md, smoothed margin)
    obj, p = _problem(seed, depth=1 + seed % 3)
    p = jax.tree.map(lambda a: a * (1 + seed), p)  # larger norms, sharper LSE
    qs = objective.quantities(obj, p)
    L = obj.order
    gap = np.log(obj.num_samples) / float(qs.rho) ** L
    assert float(qs.normalized_margin) - gap <= float(qs.smoothed_margin) * (1 + 1e-12) + 1e-15
    assert float(qs.smoothed_margin) <= float(qs.normalized_margin) + 1e-15


def test_quantities_against_numpy(rng):
    obj, p = _problem(0, loss="logistic", bias="first")
    qs = objective.quantities(obj, p)
    q = np.asarray(objective.margins(obj, p))
    theta = np.concatenate([np.asarray(a).ravel() for a in jax.tree.leaves(p)])
    rho = np.linalg.norm(theta)
    L = 3
    assert obj.order == L
    norms = [
        np.sqrt(sum(np.sum(np.asarray(a) ** 2) for a in jax.tree.leaves(p["layers"][i])))
        for i in range(L)
    ]
    loss_sum = np.sum(np.log1p(np.exp(-q)))
    assert rel_err(qs.q_min, q.min()) == 0
    assert rel_err(qs.rho, rho) < 1e-14
    assert rel_err(qs.normalized_margin, q.min() / rho**L) < 1e-13
    assert rel_err(qs.layerwise_margin, q.min() / np.prod(norms)) < 1e-13
    assert rel_err(qs.log_loss, np.log(loss_sum)) < 1e-13
    assert rel_err(qs.log_loss_mean, np.log(loss_sum / q.size)) < 1e-13
    assert rel_err(qs.smoothed_margin, -np.log(np.expm1(loss_sum)) / rho**L) < 1e-12
    assert float(qs.accuracy) == np.mean(q > 0)


def test_normalized_margins_are_scale_invariant():
    obj, p = _problem(1, loss="exp", depth=3)
    a = objective.quantities(obj, p)
    b = objective.quantities(obj, jax.tree.map(lambda v: 3.7 * v, p))
    assert rel_err(b.normalized_margin, a.normalized_margin) < 1e-13
    assert rel_err(b.layerwise_margin, a.layerwise_margin) < 1e-13
    assert rel_err(b.q_min, 3.7**3 * a.q_min) < 1e-13


def test_support_counts_brute_force(rng):
    q = rng.uniform(0, 30, 200)
    got = np.asarray(support_counts(jnp.asarray(q)))
    want = [np.sum(q <= q.min() + np.log(10.0**k)) for k in SUPPORT_DECADES]
    assert got.tolist() == want


def test_multiclass_objective_and_loss_checks():
    # 60 digits 1/4/7 (not normalised), a width-8 ReLU MLP with 3 outputs, cross-entropy
    ds, model, obj, p = build_digits(60, classes=(1, 4, 7), scale="none", width=8, loss="ce")
    out = np.asarray(obj.outputs(p))
    y = ds.y
    q = [out[n, y[n]] - max(out[n, j] for j in range(3) if j != y[n]) for n in range(60)]
    assert rel_err(objective.margins(obj, p), q) < 1e-14
    with pytest.raises(ValueError, match="loss 'exp' is binary"):
        make_objective(model, ds, "exp")
    with pytest.raises(ValueError, match="needs 3 outputs"):
        make_objective(build_model("mlp", ds.input_shape, 2), ds, "ce")
    with pytest.raises(ValueError, match="expects inputs of shape"):
        make_objective(build_model("mlp", (10,), 3), ds, "ce")


def test_gradient_of_log_loss_matches_finite_differences():
    obj, p = _problem(2, loss="logistic", depth=2)
    g = objective.grad_log_loss(obj, p)
    d = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(0).standard_normal(a.shape)), p)
    h = 1e-6
    f = lambda s: float(objective.log_loss(obj, jax.tree.map(lambda a, b: a + s * b, p, d)))
    fd = (f(h) - f(-h)) / (2 * h)
    dot = float(optax.tree.vdot(g, d))
    assert abs(dot - fd) <= 1e-7 * abs(fd)


def test_each_jitted_quantity_compiles_once_per_shape():
    fns = [
        objective.log_loss,
        objective.grad_log_loss,
        objective.margins,
        objective.quantities,
        objective.value_and_grad,
    ]
    obj, p = _problem(3, n=30)
    before = [f._cache_size() for f in fns]
    for scale in (1.0, 2.0, 3.0):
        for f in fns:
            jax.block_until_ready(f(obj, jax.tree.map(lambda a, s=scale: s * a, p)))
    mid = [f._cache_size() for f in fns]
    assert [m - b for m, b in zip(mid, before, strict=True)] == [1] * len(fns)
    obj2, p2 = _problem(4, n=31)  # new number of samples: one more compile each
    for f in fns:
        f(obj2, p2)
    assert [f._cache_size() - m for f, m in zip(fns, mid, strict=True)] == [1] * len(fns)


def test_float32_objective():
    ds = data.synthetic(30, 4, seed=0)
    model = build_model("mlp", ds.input_shape, 1, width=5, dtype=jnp.float32)
    obj, p = make_objective(model, ds, "logistic")
    qs = objective.quantities(obj, p)
    assert obj.x.dtype == jnp.float32 and qs.log_loss.dtype == jnp.float64
    assert np.isfinite(float(qs.smoothed_margin))
    # float32 network, recorded in float64: the loss of the float32 outputs, exactly
    out = np.asarray(obj.outputs(p), np.float64)
    y = np.asarray(ds.y_signed, np.float64)
    ref = np.log(np.sum(np.log1p(np.exp(-y * out))))
    assert float(qs.log_loss) == pytest.approx(ref, rel=1e-14)
    # the training loss and gradient stay in float32
    assert obj.log_loss(p).dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(obj.grad_log_loss(p)))
