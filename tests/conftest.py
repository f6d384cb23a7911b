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


def digits_problem(n: int, **fields):
    """The tests' digits problem as a ``gflow.problem.Problem``: sklearn's digits
    (``data="digits"``), classes 0/1, a sample of ``n`` seeded by ``seed``, unit-normalised;
    ``fields``: any other of ``Problem``'s fields (its defaults otherwise: a ReLU MLP of
    depth 2 without biases, the logistic loss, seed 0 for both the sample and the
    initialisation, float64). ``n=360``: all the digits 0/1, in their order."""
    from gflow.problem import Problem

    return Problem(data="digits", n=n, **fields)


def build_digits(n: int, *, init_seed: int | None = None, **fields):
    """``(dataset, model, objective, params0)`` of ``digits_problem(n, **fields)``
    (``Problem.build()``); ``init_seed``: the model initialised from this seed instead of
    the problem's ``seed`` (which then draws the sample only)."""
    p = digits_problem(n, **fields)
    if init_seed is None:
        return p.build()
    from gflow.objective import make_objective

    ds = p.dataset()
    model = p.make_model(ds, seed=init_seed)
    return ds, model, *make_objective(model, ds, p.loss, order=p.order)


def digits_inits(seeds, n: int, **fields) -> list:
    """The initial parameters of ``digits_problem(n, **fields)``'s model, one per seed of
    ``seeds`` (its sample drawn by the problem's ``seed``)."""
    from gflow.models import split_params

    p = digits_problem(n, **fields)
    ds = p.dataset()
    return [split_params(p.make_model(ds, seed=s))[1] for s in seeds]


def adaptive(rtol: float, atol: float, solver: str = "tsit5") -> dict:
    """``run_flow``'s arguments for ``solver`` under error control at ``rtol``, ``atol``
    all along (gflow's own ``PIDController``)."""
    import diffrax

    return dict(solver=solver, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol))


@pytest.fixture(scope="session")
def small():
    """``(objective, params0)``: 60 unit-norm digits 0/1, a width-8 ReLU MLP (L = 2),
    logistic loss."""
    return build_digits(60, width=8)[2:]


@pytest.fixture(scope="session")
def smooth():
    """The same with linear activations: homogeneous (L = 2) and smooth, so that tight
    tolerances are cheap (on ReLU networks the flow slides along kinks and tight
    tolerances never end)."""
    return build_digits(60, width=8, activation="linear")[2:]


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
    """``(dataset, (objective, params0))``: 40 unit-norm digits 0/1 (sample seed 1), a
    linear model (initialisation seed 0), the exponential loss."""
    ds, _, obj, p0 = build_digits(40, seed=1, model="linear", loss="exp", init_seed=0)
    return ds, (obj, p0)
