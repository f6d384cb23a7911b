"""The flow's own error estimate (issue 31; docs/theory.md, "The flow's own error"): a
shadow run at twice the steps beside every flow run, the envelope of their difference
recorded at every save point, judged by the flow fidelity verdict.

The shadow's error is 2 to 4 times the run's (first order where steps straddle kinks,
second on the smooth pieces), so their difference is 1 to 3 times the run's error: the
estimate bounds it from above, which the invariants cannot (they are blind to the
kinks' errors: docs/theory.md)."""

import dataclasses

import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gflow.dynamics import KinkStepping, run_flow
from gflow.theory import ESTIMATE_BAND, fidelity
from tests.conftest import build_digits

LOG_T = dict(log_t_min=0.0, log_t_max=4.0, saves=9)


@pytest.fixture(scope="module")
def relu():
    """40 unit-norm digits 0/1, a width-8 ReLU MLP, the logistic loss: its flow crosses
    kinks all along."""
    return build_digits(40, width=8, init_seed=1)[2:]


@pytest.fixture(scope="module")
def reference(relu):
    """Through the kinks event by event at rtol 1e-10: its own error is far below the
    runs' (its balance drift is checked below)."""
    obj, p0 = relu
    ref = run_flow(obj, p0, solver="tsit5", save_params=True,
                   stepsize_controller=KinkStepping(rtol=1e-10, atol=1e-13), **LOG_T)  # fmt: skip
    assert ref.status == "completed" and np.nanmax(ref["balance_drift"]) < 1e-9
    return ref


def _envelope(v):
    return np.maximum.accumulate(np.asarray(v, np.float64))


def _true_errors(tr, ref):
    scale = np.abs(ref["normalized_margin"]).max()
    margin = np.abs(tr["normalized_margin"] - ref["normalized_margin"]) / scale
    pairs = zip(tr.snapshots, ref.snapshots, ref["rho"], strict=True)
    params = [np.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]) / rho for a, b, rho in pairs]
    return _envelope(margin), _envelope(params), scale


@pytest.mark.parametrize("cfl", [0.14, 0.07])
def test_the_estimate_bounds_the_error_from_above(relu, reference, cfl):
    """At every save point the estimate's envelope is at least the true error's (against
    the event-by-event reference) and at most ``ESTIMATE_BAND`` times it, for the
    normalized margin and for the parameters."""
    obj, p0 = relu
    tr = run_flow(obj, p0, solver="ralston", cfl=cfl, rtol=3e-5, atol=3e-8, save_params=True,
                  **LOG_T)  # fmt: skip
    margin, params, scale = _true_errors(tr, reference)
    est_margin = np.asarray(tr["margin_error"]) / scale
    est_params = np.asarray(tr["param_error"])
    assert np.all(np.diff(est_margin) >= 0) and np.all(np.diff(est_params) >= 0)
    floor = 1e3 * np.finfo(np.float64).eps  # rounding of a difference of O(1) quantities
    for est, true in ((est_margin, margin), (est_params, params)):
        seen = true > floor
        assert seen[1:].all()  # the runs are off the flow from the first save point on
        assert np.all(est[seen] >= true[seen]), (est, true)
        assert np.all(est[seen] <= ESTIMATE_BAND * true[seen]), (est, true)
    assert tr["shadow_evals"][-1] > 0


def test_a_coarse_run_fails_and_a_fine_one_passes(relu):
    """The verdict on the estimate: a run at the stability edge's 0.9 whose invariants
    stay within their tolerance (rtol 1e-3: they see the error only through the balances,
    which kinks do not move) FAILs on its estimate, far past the accuracy; the same run
    at cfl 0.02 PASSes. The accuracy is twice the fine run's estimate, so that both
    verdicts are decided."""
    obj, p0 = relu
    fine = run_flow(obj, p0, solver="ralston", cfl=0.02, rtol=1e-7, atol=1e-10, **LOG_T)
    scale = np.abs(fine["normalized_margin"]).max()
    accuracy = 2 * fine["margin_error"].max() / scale
    fine = run_flow(obj, p0, solver="ralston", cfl=0.02, rtol=1e-7, atol=1e-10,
                    accuracy=accuracy, **LOG_T)  # fmt: skip
    assert fidelity(fine).passed is True, fidelity(fine)
    # where the shadow failed (NaN from there on) the rest is unseen: not a PASS
    cols = dict(fine.columns, margin_error=np.where(np.arange(len(fine)) >= len(fine) - 2,
                                                    np.nan, fine["margin_error"]))  # fmt: skip
    blind = fidelity(dataclasses.replace(fine, columns=cols))
    assert blind.passed is None and blind.decide and "shadow run failed" in blind.summary
    coarse = run_flow(obj, p0, solver="ralston", cfl=0.9, rtol=1e-3, atol=1e-6,
                      accuracy=accuracy, **LOG_T)  # fmt: skip
    v = fidelity(coarse)
    assert v.passed is False and "times the accuracy" in v.summary, v
    assert np.nanmax(coarse["balance_drift"]) <= 1e-3  # the invariants alone would pass
    assert coarse["margin_error"].max() / scale > ESTIMATE_BAND * accuracy


def test_no_estimate_when_asked_for_none(relu):
    obj, p0 = relu
    tr = run_flow(obj, p0, solver="ralston", cfl=0.14, log_t_max=1.0, saves=2,
                  error_estimate=False)  # fmt: skip
    assert "margin_error" not in tr.column_names and tr.config["accuracy"] is None
