"""``gflow.compare``: two runs aligned on log t, against known differences and runs whose
parameters move exactly as the interpolation assumes."""

import math

import numpy as np
import pytest

from gflow.compare import compare, fit_order
from gflow.trajectory import Trajectory


def test_compare_recovers_a_known_difference():
    lt = np.linspace(0, 10, 41)

    def tr(shift):
        cols = dict(
            step=np.arange(41.0), t=np.exp(lt), log_t=lt, log_loss=-lt + shift,
            rho=1 + lt, q_min=lt, normalized_margin=0.1 + 0 * lt, smoothed_margin=np.sin(lt) / 10,
        )  # fmt: skip
        return Trajectory("flow", cols)

    a, b = tr(0.25), tr(0.0)
    a.columns = {k: v[::4] for k, v in a.columns.items()}  # coarser save points
    c = compare(a, b)
    np.testing.assert_allclose(c.diffs["log_loss"], 0.25, atol=1e-12)
    assert np.max(np.abs(c.diffs["smoothed_margin"])) < 1e-12  # same curve, at a's points
    assert np.max(np.abs(c.diffs["rho"])) < 1e-12


def test_fit_order():
    h = np.array([0.1, 0.05, 0.025])
    assert fit_order(h, 3 * h**2) == pytest.approx(2.0)
    assert math.isnan(fit_order(h, [1.0, 0.0, 1.0]))


def _linear_run(lt, theta0, slope, kind="flow"):
    """A run whose parameters move linearly in log t (monotone cubic interpolation
    reproduces them exactly) and whose columns are smooth in log t."""
    cols = dict(
        step=np.arange(lt.size, dtype=float), t=np.exp(lt), log_t=lt, log_loss=-lt,
        rho=1 + lt, q_min=lt, normalized_margin=0.1 + 0 * lt, smoothed_margin=0.1 - 0.01 * lt,
    )  # fmt: skip
    snaps = [{"w": theta0 + slope * v} for v in lt]
    return Trajectory(kind, cols, snapshots=snaps)


def test_compare_keeps_the_last_point_and_the_common_end_and_interpolates_parameters():
    """GD's save points overshoot the flow's (log t 10.13 for a target of 10) and never
    coincide with them; the final point is off by float jitter. The comparison still
    reaches the last time both ran, and gets parameter distances at every point."""
    theta0, slope = np.array([1.0, -2.0, 0.5]), np.array([0.3, 0.1, -0.2])
    flow = _linear_run(np.linspace(1, 10, 10), theta0, slope)
    gd_lt = np.linspace(1, 10, 10) + 0.13
    gd_lt[-1] = 10.0 + 1e-12  # jitter at the end
    gd_lt[-2] = 9.0 + 0.13
    gd = _linear_run(gd_lt, theta0 + 1e-3, slope, kind="gd")  # a known offset
    c = compare(gd, flow, names=("gd", "flow"))
    assert c.log_t[-1] == pytest.approx(10.0, abs=1e-9)  # the last time both reached
    assert c.log_t.size == 10  # 0.13 past 1 .. 9.13 (9 points) and the end
    # the offset, exactly: |1e-3 (1, 1, 1)| / |theta_flow(log t)|
    want = np.sqrt(3) * 1e-3 / np.linalg.norm(theta0 + np.outer(c.log_t, slope), axis=1)
    np.testing.assert_allclose(c.param_distance, want, rtol=1e-9)
    overshoot = _linear_run(np.append(np.linspace(1, 9, 9) + 0.13, 10.2), theta0, slope, "gd")
    c2 = compare(overshoot, flow)
    assert c2.log_t[-1] == pytest.approx(10.0)  # compared at the flow's end, not at 9.13
    assert any("outside" in n for n in c2.notes)
