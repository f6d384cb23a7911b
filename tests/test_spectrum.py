"""Top Hessian eigenvalue: Lanczos on HVPs against the dense Hessian."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gflow import data as D
from gflow.models import build_model
from gflow.objective import make_objective
from gflow.spectrum import lanczos_top, top_hessian_eigenvalue


def test_lanczos_on_a_known_matrix(rng):
    a = rng.standard_normal((40, 40))
    m = (a + a.T) / 2
    e = lanczos_top(lambda v: m @ v, 40, iters=40)
    assert abs(e.value - np.linalg.eigvalsh(m)[-1]) < 1e-10
    assert np.linalg.norm(m @ e.vector - e.value * e.vector) < 1e-8


@pytest.mark.parametrize("activation", ["relu", "linear"])
@pytest.mark.parametrize("of", ["log_loss", "loss"])
def test_top_eigenvalue_matches_dense_hessian(activation, of):
    ds = D.synthetic(30, 3, seed=0)
    model = build_model("mlp", ds.input_shape, 1, width=5, activation=activation)
    obj, p = make_objective(model, ds, "logistic")
    flat, unravel = ravel_pytree(p)
    f = lambda v: obj.log_loss(unravel(v))
    h = np.asarray(jax.hessian(f)(flat))
    if of == "loss":
        g = np.asarray(jax.grad(f)(flat))
        h = h + np.outer(g, g)  # Hessian of Loss divided by Loss
    want = np.linalg.eigvalsh(h)[-1]
    got = top_hessian_eigenvalue(obj, p, of=of, iters=flat.size)
    assert abs(got.value - want) <= 1e-9 * abs(want)
    assert got.matvecs <= flat.size


def test_bad_argument():
    ds = D.synthetic(10, 2, seed=0)
    obj, p = make_objective(build_model("linear", ds.input_shape, 1), ds, "exp")
    with pytest.raises(ValueError, match="of must be"):
        top_hessian_eigenvalue(obj, p, of="hessian")
