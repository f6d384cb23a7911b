"""Test configuration: float64 on (gflow turns it on at import), strict dtype promotion."""

import os

import jax
import numpy as np
import pytest

# Traced programs are not kept in the test suite (its tests below turn it back on): almost
# every test has programs of its own shapes, and exporting each one cost the cold suite
# about 40% more time while no later run reads it back (tests/test_startup.py)
os.environ.setdefault("GFLOW_TRACED", "off")

import gflow  # noqa: F401  (enables float64)

jax.config.update("jax_numpy_dtype_promotion", "strict")


def rel_err(a, b) -> float:
    """Relative error of a against reference b, in the max norm."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def small():
    """60 unit-norm digits 0/1, a width-8 ReLU MLP (L = 2), logistic loss."""
    from gflow import data as D
    from gflow.models import build_model
    from gflow.objective import make_objective

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 60, seed=0), "unit")
    model = build_model("mlp", ds.input_shape, 1, width=8)
    return make_objective(model, ds, "logistic")


@pytest.fixture(scope="session")
def smooth():
    """The same with linear activations: homogeneous (L = 2) and smooth, so that tight
    tolerances are cheap (on ReLU networks the flow slides along kinks and tight
    tolerances never end)."""
    from gflow import data as D
    from gflow.models import build_model
    from gflow.objective import make_objective

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 60, seed=0), "unit")
    model = build_model("mlp", ds.input_shape, 1, width=8, activation="linear")
    return make_objective(model, ds, "logistic")


def svm(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The hard-margin SVM without intercept by SLSQP on the primal, written here
    independently of gflow.known (the code under test uses that one)."""
    import scipy.optimize

    res = scipy.optimize.minimize(
        lambda v: 0.5 * v @ v, np.zeros(X.shape[1]), jac=lambda v: v, method="SLSQP",
        constraints=[{"type": "ineq", "fun": lambda v: y * (X @ v) - 1,
                      "jac": lambda v: y[:, None] * X}], options=dict(ftol=1e-14, maxiter=500),
    )  # fmt: skip
    assert res.success, res.message
    return res.x


@pytest.fixture(scope="session")
def linear_problem():
    """40 unit-norm digits 0/1 (subset seed 1), a linear model, the exponential loss."""
    from gflow import data as D
    from gflow.models import build_model
    from gflow.objective import make_objective

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 40, seed=1), "unit")
    model = build_model("linear", ds.input_shape, 1, seed=0)
    return ds, make_objective(model, ds, "exp")
