"""The local-optimality verdict (``gflow.optimality.local_optimum``) on known answers: a
linear net at its global optimum never FAILs, whatever the rotation of its inner factor
or the rescaling of its units; a ReLU net at a KKT point with a dead unit FAILs; the
search's power on planted better points is reported and gates PASS; without the two
extrapolated bounds no verdict FAILs.

Two small problems, each compiled once (the search's kernel compiles once per shape)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gflow.kkt import kkt_residual
from gflow.models import build_model
from gflow.objective import make_objective
from gflow.optimality import LOCAL_SCOPE, balanced, local_optimum, local_optimum_at
from gflow.trajectory import Trajectory
from gflow.verdict import FAIL, INCONCLUSIVE, NA, OUTSIDE, PASS

WIDTH = 3  # hidden units of the linear net: >= 2, so its maximizers form a continuum


@pytest.fixture(scope="module")
def svm():
    """Data whose hard-margin SVM is known in closed form: a random unit ``w``, two
    supports ``y x = w +- 0.7 z`` (``z`` a unit vector orthogonal to ``w``, so ``w`` is
    their average and the only unit vector with margin 1 on both), every other sample at
    margin >= 1.5 along ``w``. So ``w`` is the SVM direction and ``gamma_svm = 1``; a
    depth-2 linear net's largest normalized margin is ``gamma_svm / 2`` (``|theta|^2 >=
    2 |W_1 w_2|``), reached by ``W_1 = w b^T / sqrt 2``, ``w_2 = b / sqrt 2`` for every
    unit ``b``."""
    rng = np.random.default_rng(0)
    d, n = 5, 12
    Q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    w, z = Q[:, 0], Q[:, 1]
    perp = np.eye(d) - np.outer(w, w)
    rest = (1.5 + rng.random((n - 2, 1))) * w + 0.8 * rng.standard_normal((n - 2, d)) @ perp
    yx = np.concatenate([[w + 0.7 * z, w - 0.7 * z], rest])
    y = np.where(np.arange(n) % 2 == 0, 1, -1)
    model = build_model("mlp", (d,), 1, width=WIDTH, depth=2, activation="linear", seed=0)
    obj, _ = make_objective(model, (y[:, None] * yx, y), "exp")
    assert obj.family == "linear" and obj.order == 2
    return obj, w


def _linear_optimum(w, b):
    """The max-margin point of the depth-2 linear net with inner factor ``b`` (unit)."""
    W1, w2 = np.outer(w, b) / math.sqrt(2), b[:, None] / math.sqrt(2)
    return {"layers": {0: {"kernel": jnp.asarray(W1)}, 1: {"kernel": jnp.asarray(w2)}}}


def _rotation(seed: int, m: int = WIDTH) -> np.ndarray:
    Q, R = np.linalg.qr(np.random.default_rng(seed).standard_normal((m, m)))
    return Q * np.sign(np.diag(R))


def _gamma(obj, p) -> float:
    """The normalized margin of a depth-2 net (L = 2)."""
    return float(np.min(np.asarray(obj.margins(p), np.float64))) / _sq(p)


def _sq(p) -> float:
    return sum(float(np.sum(np.square(np.asarray(v["kernel"])))) for v in p["layers"].values())


def _run(params, s_T: float, n: int = 12) -> Trajectory:
    """A hand-built flow record ending at ``params`` with last smoothed margin ``s_T``."""
    lt = np.geomspace(10.0, 1000.0, n)
    cols = dict(step=np.arange(n, dtype=float), t=np.exp(np.minimum(lt, 700.0)), log_t=lt,
                log_loss=-lt, rho=np.sqrt(lt), q_min=lt, normalized_margin=np.full(n, s_T),
                smoothed_margin=s_T * (1 - 1 / lt) / (1 - 1 / lt[-1]))  # fmt: skip
    return Trajectory("flow", cols, config={"order": 2, "loss": "exp"}, snapshots=[params])


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_a_linear_net_at_its_global_optimum_never_fails_under_inner_rotations(svm, seed):
    """Known answer (a): the max-margin point ``W_1 = g b^T`` with ``b`` rotated by a random
    orthogonal matrix (a point of the continuum of maximizers) is in scope and PASSes:
    the search, which can slide along the continuum, finds no margin above the limit's
    (equal margins are never "better"), and finds the planted better points (power
    reported). Also with a remaining path that puts the search radius at 0.1."""
    obj, w = svm
    O = _rotation(seed)
    p = _linear_optimum(w, O @ np.eye(WIDTH)[0])
    g = _gamma(obj, p)
    assert g == pytest.approx(0.5, rel=1e-13)
    R = 1e-3 if seed != 4 else 0.04
    v = local_optimum(_run(p, g * (1 - 1e-4)), obj, R, 2e-4 * g)
    assert v.outcome == PASS and v.outside is None, v
    det = v.details
    assert det["best_gamma"] <= 0.5 * (1 + 1e-12)  # nothing above the optimum, ever
    assert det["power"] >= 0.9 and det["radius"] >= 2 * R
    assert det["resolution"] == pytest.approx(det["threshold"] * 1.001 / (g * (1 - 1e-4)) - 1)


def test_a_rescaled_twin_of_the_optimum_is_not_better_than_the_limit(svm):
    """Per-unit rescaling (``w_in a``, ``w_out / a``) keeps every margin and raises the
    norm: from the unbalanced twin the search climbs back to the balanced optimum, a
    larger normalized margin than the twin's and than the run's extrapolated bound. It is
    the same function, and the limit (balanced, as a KKT point is) has it: the verdict
    counts the balanced twin's margin in the limit's upper bound and does not FAIL."""
    obj, w = svm
    p = _linear_optimum(w, _rotation(5) @ np.eye(WIDTH)[0])
    a = np.array([3.0, 0.5, 1.7])
    twin = {"layers": {0: {"kernel": p["layers"][0]["kernel"] * a},
                       1: {"kernel": p["layers"][1]["kernel"] / a[:, None]}}}  # fmt: skip
    np.testing.assert_allclose(obj.margins(twin), obj.margins(p), rtol=1e-13)
    g_twin = _gamma(obj, twin)
    assert g_twin < 0.45
    bal = balanced(twin)
    assert _gamma(obj, bal) == pytest.approx(0.5, rel=1e-12)
    v = local_optimum(_run(twin, g_twin * (1 - 1e-4)), obj, 1e-3, 0.0)
    assert v.outcome != FAIL, v
    assert v.details["upper"] == pytest.approx(0.5, rel=1e-12)


def test_a_direction_off_the_optimum_fails_when_its_run_claims_to_have_converged(svm):
    """The built-to-fail case: the optimum pushed 0.02 off, in a record whose bounds claim
    the limit is within 0.001 of it and its margin no higher than there. The search finds
    the optimum's larger margin within the stated ball: the core FAILs, with the witness's
    margin above the stated upper bound; in scope (a linear net, whose every KKT point is
    a global optimum) that says the record's extrapolations are wrong, so the scoped
    verdict is INCONCLUSIVE, never FAIL."""
    obj, w = svm
    p = _linear_optimum(w, np.eye(WIDTH)[0])
    flat = np.concatenate([np.ravel(p["layers"][0]["kernel"]), np.ravel(p["layers"][1]["kernel"])])
    z = np.random.default_rng(7).standard_normal(flat.size)
    z -= (z @ flat) * flat
    off = flat + 0.02 * z / np.linalg.norm(z)
    d = w.size * WIDTH
    q = {"layers": {0: {"kernel": jnp.asarray(off[:d].reshape(w.size, WIDTH))},
                    1: {"kernel": jnp.asarray(off[d:].reshape(WIDTH, 1))}}}  # fmt: skip
    g = _gamma(obj, q)
    assert g < 0.5 * (1 - 1e-3)
    v = local_optimum(_run(q, g), obj, 1e-3, 0.0)
    assert v.outcome == INCONCLUSIVE and "global optimum" in v.summary, v
    core = local_optimum_at(q, obj, smoothed_margin=g, remaining_path=1e-3, margin_to_come=0.0,
                            plants=0)  # fmt: skip
    assert core.outcome == FAIL, core
    det = core.details
    assert det["best_gamma"] > det["upper"] * (1 + det["rtol"])
    assert det["fail_radius"] <= det["radius"] + 1e-3
    assert det["best_gamma"] <= 0.5 * (1 + 1e-12)


@pytest.fixture(scope="module")
def dead_unit():
    """A depth-2 ReLU net (3 hidden units, bias-free) at a KKT point of the margin problem
    with a dead unit, after Vardi, Shamir & Srebro (2022, arXiv:2110.02732), the section
    on depth-2 ReLU networks: a KKT point where a hidden neuron is zero, and reviving it
    raises the margin, so the KKT point is not a local optimum (the same mechanism as their
    diagonal networks' dead coordinate). Here: positives at +-75 degrees around e_1,
    a negative at -e_1; unit 1 (``w = a e_1``, ``v = a``) serves both positives, unit 2
    (``w = -e_1``, ``v = -1``) the negative, unit 3 is zero. Normalized margin ``c / (2 (1
    + c))``, ``c = cos 75``, about 0.1028; one unit per positive would give 1/6, and it
    is reached locally: unit 3 revived along one positive (a second-order gain) while unit
    1 turns towards the other (first order)."""
    c, s = math.cos(math.radians(75)), math.sin(math.radians(75))
    x = np.array([[c, s], [c, -s], [-1.0, 0.0]])
    y = np.array([1, 1, -1])
    model = build_model("mlp", (2,), 1, width=3, depth=2, activation="relu", seed=0)
    obj, _ = make_objective(model, (x, y), "exp")
    a = 1 / math.sqrt(c)  # margins 1 on all three samples
    W = np.array([[a, -1.0, 0.0], [0.0, 0.0, 0.0]])
    v = np.array([[a], [-1.0], [0.0]])
    p = {"layers": {0: {"kernel": jnp.asarray(W)}, 1: {"kernel": jnp.asarray(v)}}}
    return obj, p, x, y, c / (2 * (1 + c))


def _relu_gamma(p, x, y) -> float:
    """The normalized margin by an independent forward pass (numpy)."""
    W, v = (np.asarray(p["layers"][i]["kernel"], np.float64) for i in (0, 1))
    q = y * (np.maximum(x @ W, 0) @ v)[:, 0]
    return float(q.min()) / (np.sum(W**2) + np.sum(v**2))


def test_the_dead_unit_kkt_point_fails_observed_outside_the_scope(dead_unit):
    """Known answer (b): the point is a KKT point (residual 0) and the unscoped verdict
    FAILs, with a witness whose margin, recomputed by an independent forward pass, is
    above the KKT point's; at radius 0.003 as at 0.01 (the gain is of second order, so
    there is one at every radius). The scoped verdict says OUTSIDE (ReLU nets are not
    covered by a theorem) with the observed FAIL kept."""
    obj, p, x, y, g_star = dead_unit
    assert _relu_gamma(p, x, y) == pytest.approx(g_star, rel=1e-14)
    assert kkt_residual(obj, p).eps_rel < 1e-12
    for r in (0.01, 0.003):
        v = local_optimum_at(p, obj, smoothed_margin=g_star * (1 - 1e-6), remaining_path=1e-3,
                             margin_to_come=1e-6 * g_star, radii=(r,))  # fmt: skip
        assert v.outcome == FAIL, v
        det = v.details
        assert det["best_gamma"] > g_star * (1 + 1e-7)
        assert det["best_distance"] <= r * (1 + 1e-9) and det["fail_radius"] <= r + 1e-3
    v = local_optimum(_run(p, g_star * (1 - 1e-6)), obj, 1e-3, 1e-6 * g_star)
    assert v.outcome == OUTSIDE and v.outside == LOCAL_SCOPE
    assert v.details["observed"] == FAIL and "NOT a local optimum" in v.summary
    assert v.details["plants"] == 0  # outside the scope no power is bought: no PASS either


def test_the_power_is_measured_on_planted_points_and_gates_pass(svm):
    """(c) Every verdict that searched reports its power: the fraction of ``plants`` better
    points planted at known distances (spread over ``[r / 8, r]``, ``r`` the search
    radius, which holds the claim's ball of radius ``r - R`` around the limit) that the
    same search finds. A search too weak to find them (one start, two steps)
    cannot PASS: INCONCLUSIVE, saying what would decide it; nor can one with no plants."""
    obj, w = svm
    p = _linear_optimum(w, _rotation(6) @ np.eye(WIDTH)[0])
    g = _gamma(obj, p)
    tr, R = _run(p, g * (1 - 1e-4)), 0.02
    v = local_optimum(tr, obj, R, 2e-4 * g)
    det = v.details
    assert v.outcome == PASS, v
    assert det["plants"] == 20 and len(det["plant_found"]) == 20
    assert det["found"] == sum(det["plant_found"]) and det["power"] == det["found"] / 20
    r = det["radius"]
    assert min(det["plant_distances"]) == pytest.approx(r / 8)
    assert max(det["plant_distances"]) == pytest.approx(r)
    assert det["pass_radius"] == pytest.approx(r - R)
    json.dumps(v.to_dict())  # checks.json can hold it
    assert all(h > 0 for h in det["plant_heights"]) and f"power {det['power']:.2f}" in v.summary
    weak = local_optimum(tr, obj, R, 2e-4 * g, starts=1, steps=2)
    assert weak.outcome == INCONCLUSIVE and weak.details["power"] < 0.9, weak
    assert "stronger search" in weak.decide
    none = local_optimum(tr, obj, R, 2e-4 * g, starts=1, steps=2, plants=0)
    assert none.outcome == INCONCLUSIVE and math.isnan(none.details["power"]), none


@pytest.mark.parametrize("R, to_come", [(None, None), (1e-3, None), (None, 1e-6)])
def test_without_both_bounds_no_verdict_fails(dead_unit, svm, R, to_come):
    """(d) Without the limit's distance or an upper bound of its margin, a better point
    found near the last direction cannot be shown better than the limit: the dead-unit
    point, which FAILs with both bounds, is INCONCLUSIVE, and says what would decide it.
    The linear optimum with a remaining path and no rise to come still PASSes (the lower
    bound of the limit's margin is proved, not extrapolated); without the path it is
    INCONCLUSIVE (the limit is not located)."""
    obj, p, _, _, g_star = dead_unit
    tc = None if to_come is None else to_come * g_star
    v = local_optimum_at(p, obj, smoothed_margin=g_star * (1 - 1e-6), remaining_path=R,
                         margin_to_come=tc)  # fmt: skip
    assert v.outcome == INCONCLUSIVE and v.decide, v
    assert v.details["best_gamma"] > g_star  # it saw the better point, and did not FAIL
    lin, w = svm
    q = _linear_optimum(w, np.eye(WIDTH)[0])
    g = _gamma(lin, q)
    u = local_optimum(_run(q, g * (1 - 1e-4)), lin, R, None if to_come is None else 2e-4 * g)
    assert u.outcome == (PASS if R is not None else INCONCLUSIVE), u


def test_not_applicable_before_the_threshold_and_inconclusive_while_the_direction_moves(svm):
    """n/a with no positive smoothed margin (the run never got past t0) or no parameters;
    INCONCLUSIVE when the direction may still move more than half the largest radius
    (the limit is not located; no search is run)."""
    obj, w = svm
    p = _linear_optimum(w, np.eye(WIDTH)[0])
    assert local_optimum(_run(p, -0.1), obj, 1e-3, 0.0).outcome == NA
    bare = _run(p, 0.4)
    bare.snapshots = []
    assert local_optimum(bare, obj, 1e-3, 0.0).outcome == NA
    v = local_optimum(_run(p, 0.4), obj, 0.2, 0.0)
    assert v.outcome == INCONCLUSIVE and "longer run" in v.decide and "power" not in v.details
    with pytest.raises(ValueError, match="radii"):
        local_optimum(_run(p, 0.4), obj, 1e-3, 0.0, radii=(0.0,))


def test_the_search_compiles_once_per_shape(svm):
    """The search's kernel takes the objective, the point, the plants and the schedules as
    arguments: a new point or new bounds of the same shapes reuse its compiled program."""
    import gflow.optimality as opt

    obj, w = svm
    size = opt._climb._cache_size
    kw = dict(smoothed_margin=0.49, remaining_path=1e-3, margin_to_come=1e-3)
    local_optimum_at(_linear_optimum(w, _rotation(8)[:, 0]), obj, **kw)
    before = size()
    local_optimum_at(_linear_optimum(w, _rotation(9)[:, 0]), obj, **{**kw, "remaining_path": 0.01})
    assert size() == before


def test_balanced_keeps_every_margin_and_balances_every_unit():
    """``balanced`` on a depth-3 ReLU net with a first-layer bias: the same margins (the
    same function), a smaller norm, and every hidden unit's incoming and outgoing squared
    norms equal (the balance a KKT point has); None for a model it does not know."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 4)), np.where(rng.random(10) > 0.5, 1, -1)
    model = build_model("mlp", (4,), 1, width=5, depth=3, activation="relu", bias="first")
    obj, p = make_objective(model, (x, y), "exp")
    b = balanced(p)
    np.testing.assert_allclose(obj.margins(b), obj.margins(p), rtol=1e-12, atol=1e-14)
    sq = [sum(float(np.sum(np.square(a))) for a in jax.tree.leaves(t)) for t in (p, b)]
    assert sq[1] < sq[0]
    for l in (0, 1):
        k_in, k_out = (np.asarray(b["layers"][i]["kernel"]) for i in (l, l + 1))
        n_in = np.sum(k_in**2, axis=0) + (np.asarray(b["layers"][0]["bias"]) ** 2 if l == 0 else 0)
        np.testing.assert_allclose(n_in, np.sum(k_out**2, axis=1), rtol=1e-10)
    assert balanced({"u": np.ones(3), "v": np.ones(3)}) is None
