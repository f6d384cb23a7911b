"""Stability stepping's cfl chosen from the flow's error estimate (issue 31;
``gflow.dynamics.driver._control``, docs/theory.md, "The flow's own error"): the estimate
held to the run's accuracy, what bound each step counted in the trajectory."""

import numpy as np
import pytest

from gflow.dynamics import KinkStepping, StabilityStepping, run_flow
from gflow.dynamics.driver import BOUNDS
from gflow.dynamics.stability import ADAPTIVE_CFL
from gflow.theory import fidelity
from tests.conftest import build_digits

LOG_T = dict(log_t_min=0.0, log_t_max=4.0, saves=9)
# on this problem the warm-up (Tsit5 at the default tolerances) leaves an estimate of
# about 3e-4 of the margin's scale, which no cfl changes: an accuracy above it leaves
# the stable phase room, and the largest cfl (0.45) overshoots it several times
ACCURACY = 1e-3


@pytest.fixture(scope="module")
def relu():
    """40 unit-norm digits 0/1, a width-8 ReLU MLP, the logistic loss: its flow crosses
    kinks all along (as in test_error_estimate)."""
    return build_digits(40, width=8, init_seed=1)[2:]


def _relative(tr):
    return np.asarray(tr["margin_error"]) / np.abs(tr["normalized_margin"]).max()


def test_the_estimate_is_held_to_the_accuracy(relu):
    """The default stepping (cfl from the estimate) keeps the estimate within the accuracy
    at every save point and PASSes, where the largest cfl it may take, held all along,
    exceeds it (so the controller had to act); the true error, against the event-by-event
    reference, is below the estimate (its Richardson bound)."""
    obj, p0 = relu
    tr = run_flow(obj, p0, accuracy=ACCURACY, **LOG_T)
    fixed = run_flow(obj, p0, stepsize_controller=StabilityStepping(cfl=ADAPTIVE_CFL[1]),
                     accuracy=ACCURACY, **LOG_T)  # fmt: skip
    assert tr.config["cfl_control"] == "estimate" and fixed.config["cfl_control"] is None
    assert _relative(fixed).max() > ACCURACY
    assert np.all(_relative(tr) <= ACCURACY)
    assert fidelity(tr).outcome == "PASS"
    ref = run_flow(obj, p0, solver="tsit5", **LOG_T,
                   stepsize_controller=KinkStepping(rtol=1e-10, atol=1e-13))  # fmt: skip
    scale = np.abs(ref["normalized_margin"]).max()
    true = np.maximum.accumulate(np.abs(tr["normalized_margin"] - ref["normalized_margin"]))
    assert np.all(true / scale <= _relative(tr) * np.abs(tr["normalized_margin"]).max() / scale)
    # it moved: below its start where the kinks bind, and within its range
    cfl = np.asarray(tr["cfl"])
    assert np.all((cfl >= ADAPTIVE_CFL[0]) & (cfl <= ADAPTIVE_CFL[1]))
    assert len(np.unique(cfl)) > 2


def test_what_binds_each_step_adds_up(relu):
    """``steps_<bound>`` count every solver step once (warm-up steps under error control,
    stable steps by the bound that set them, the step cut at a save point), so they add
    up to ``solver_steps`` at every save point; ``redone`` counts the segments redone."""
    obj, p0 = relu
    for sc in (StabilityStepping(), StabilityStepping(cfl=0.14),
               StabilityStepping(cfl=0.9, drift=1e-3)):  # fmt: skip
        tr = run_flow(obj, p0, stepsize_controller=sc, accuracy=ACCURACY, **LOG_T)
        total = sum(np.asarray(tr[f"steps_{b}"]) for b in BOUNDS)
        np.testing.assert_array_equal(total, tr["solver_steps"])
        assert tr["steps_tolerance"][-1] > 0 and tr["steps_save"][-1] > 0
        if sc.cfl is None:
            assert tr["steps_accuracy"][-1] > 0  # the estimate held the cfl down somewhere
        else:
            assert tr["steps_accuracy"][-1] == 0 and tr["redone"][-1] == 0
            np.testing.assert_array_equal(tr["cfl"], sc.cfl)
        if sc.drift == 1e-3:  # a drift bound this tight binds every stable step
            assert tr["steps_drift"][-1] > 0 and tr["steps_stability"][-1] == 0


def test_a_segment_past_the_accuracy_is_redone(relu):
    """At an accuracy below what the largest cfl gives in one segment, the controller's
    first grown cfl overshoots somewhere; that segment is redone at a smaller cfl, and the
    estimate still stays within the accuracy past the warm-up."""
    obj, p0 = relu
    accuracy = 4e-4
    tr = run_flow(obj, p0, accuracy=accuracy, **LOG_T)
    assert tr["redone"][-1] >= 1
    stable = np.asarray(tr["steps_tolerance"]) == tr["steps_tolerance"][-1]
    warm = _relative(tr)[~stable].max() if (~stable).any() else 0.0
    assert np.all(_relative(tr)[stable] <= max(accuracy, warm))
