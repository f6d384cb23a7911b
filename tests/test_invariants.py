"""Exact invariants of the gradient flow as monitors (gflow.invariants), and the flow
fidelity verdict that reads them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gflow.dynamics import run_flow, run_gd
from gflow.invariants import MONITOR_COLUMNS, Structure, balance_structure, unit_balances
from gflow.models import build_model
from gflow.objective import make_objective
from gflow.theory import fidelity, fidelity_tolerance
from gflow.verdict import INCONCLUSIVE, PASS
from tests.conftest import adaptive, digits_problem

EPS = float(np.finfo(np.float64).eps)


@pytest.fixture(scope="module")
def digits_dataset():
    """A ``Dataset``: 24 unit-norm digits 0/1 (the models are built on it below)."""
    return digits_problem(24).dataset()


def _cnn(ds, activation="relu", bias="none", outputs=1):
    model = build_model("cnn", (8, 8, 1), outputs, width=3, depth=2, bias=bias,
                        activation=activation)  # fmt: skip
    return make_objective(model, ds, "logistic" if outputs == 1 else "ce")


def _dense(ds, activation="relu", bias="none", depth=3):
    model = build_model("mlp", ds.input_shape, 1, width=6, depth=depth, bias=bias,
                        activation=activation)  # fmt: skip
    return make_objective(model, ds, "logistic")


def _along_field(obj, params, structure, balances=unit_balances):
    """For each hidden unit: <grad Q_j, grad log Loss> and ||grad Q_j|| ||grad log Loss||
    (the first is 0 exactly when Q_j is conserved by every gradient flow)."""
    g = ravel_pytree(jax.grad(obj.log_loss)(params))[0]
    flat, unravel = ravel_pytree(params)
    jac = jax.jacrev(lambda v: jnp.concatenate(balances(structure, unravel(v))))(flat)
    # jac: (units, P), tiny models only
    return np.asarray(jac @ g), np.asarray(jnp.linalg.norm(jac, axis=1) * jnp.linalg.norm(g))


CASES = {
    "dense relu": lambda ds: _dense(ds),
    "dense leaky, first-layer bias": lambda ds: _dense(ds, "leaky_relu", "first"),
    "dense relu, bias everywhere": lambda ds: _dense(ds, bias="all"),
    "cnn relu, max-pool": lambda ds: _cnn(ds),
    "cnn leaky, max-pool, bias everywhere": lambda ds: _cnn(ds, "leaky_relu", "all"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_unit_balance_is_conserved_by_the_field(digits_dataset, case):
    """d Q_j / dt = -<grad Q_j, grad Loss> = 0 for every hidden unit, to rounding: the
    field is autodiff's gradient, one Clarke selection, for which the identity is exact.
    Bound: the product's rounding, a few ulps of ||grad Q_j|| ||grad log Loss|| per term
    summed over P parameters (8 P eps)."""
    obj, p0 = CASES[case](digits_dataset)
    structure, why = balance_structure(obj.graphdef, p0)
    assert structure is not None, why
    p = jax.tree.map(lambda a: a * 1.7, p0)  # away from the initial scale
    dot, scale = _along_field(obj, p, structure)
    n_params = ravel_pytree(p)[0].size
    assert np.all(np.abs(dot) <= 8 * n_params * EPS * scale), np.max(np.abs(dot) / scale)


def _channel_major(structure, params):
    """A wrong unit map: the flattened channels' outgoing rows read as contiguous blocks
    (channel-major) instead of every C-th row."""
    l, m, _, c = structure.pairs[-1]
    good = unit_balances(Structure(structure.pairs[:-1]), params)
    sq_in = jnp.sum(jnp.square(params["layers"][l]["kernel"]), axis=(0, 1, 2))
    sq_out = jnp.sum(jnp.square(params["layers"][m]["kernel"]), axis=1).reshape(c, -1).sum(1)
    return good + [sq_in - sq_out]


def test_a_wrong_unit_map_is_not_conserved(digits_dataset):
    """The check above has power: reading a flattened channel's outgoing weights as
    contiguous blocks (channel-major) instead of every C-th row breaks it by O(1)."""
    obj, p0 = _cnn(digits_dataset)
    structure, _ = balance_structure(obj.graphdef, p0)
    assert [kind for _, _, kind, _ in structure.pairs] == ["conv", "flatten"]
    dot, scale = _along_field(obj, p0, structure)
    assert np.all(np.abs(dot) <= 8 * ravel_pytree(p0)[0].size * EPS * scale)

    dot, scale = _along_field(obj, p0, structure, _channel_major)
    bad = np.abs(dot) / scale
    assert bad.max() > 1e-3


def test_tight_integration_keeps_the_balance_to_its_tolerance(digits_dataset):
    """A tight adaptive integration keeps every balance: each accepted step's error is at
    most rtol |y| + atol per entry (the controller's norm), which moves sum_j |Q_j| by at
    most 4 rho ||error|| (each parameter in at most two units), so the drift is at most
    4 N (rtol + sqrt(P) atol / rho_min) over N steps. Linear activations: a ReLU
    field's kinks make tight tolerances never end (docs/theory.md), and so do max-pooling's
    (the CNN's balances are checked on the field itself, above)."""
    for obj, p0 in (_dense(digits_dataset, "linear", depth=3),):
        rtol, atol = 1e-10, 1e-13
        tr = run_flow(obj, p0, rtol=rtol, atol=atol, log_t_min=-2.0, log_t_max=0.0, saves=3)
        assert tr.status == "completed", tr.message
        n, p = tr["solver_steps"][-1], ravel_pytree(p0)[0].size
        bound = 4 * n * (rtol + math.sqrt(p) * atol / tr["rho"].min())
        assert bound < 1e-5  # the bound is tight enough to mean something
        assert np.all(tr["balance_drift"] <= bound), (tr["balance_drift"].max(), bound)
        assert np.all(tr["layer_balance_drift"] <= tr["balance_drift"] + 1e-300)


def test_cnn_balance_drift_converges_to_zero_with_the_step(digits_dataset):
    """A ReLU CNN with max-pooling: tight adaptive tolerances never end here (the flow
    slides along kinks from the start), so fixed-step RK4 integrates it, and through the
    kinks every method is first order: the drift must fall at least 2x when the step
    falls 4x (first order gives 4x), towards 0. The channel-major map, on the same
    trajectory, stays put at a value orders of magnitude larger."""
    obj, p0 = _cnn(digits_dataset)
    structure, _ = balance_structure(obj.graphdef, p0)
    t_end = 0.05
    drifts = []
    for dt in (t_end / 20, t_end / 80):
        tr = run_flow(obj, p0, clock="time", solver="rk4", dt=dt, log_t_min=math.log(t_end),
                      log_t_max=math.log(t_end) + 1e-9, saves=2)  # fmt: skip
        assert tr.status == "completed", tr.message
        drifts.append(tr["balance_drift"][-1])
    assert 0 < drifts[1] <= drifts[0] / 2, drifts
    final = jax.tree.map(jnp.asarray, tr.final_params)
    wrong = [np.abs(np.asarray(a) - np.asarray(b)).sum()
             for a, b in zip(_channel_major(structure, final), _channel_major(structure, p0),
                             strict=True)]  # fmt: skip
    assert drifts[1] * 1e3 < sum(wrong) / tr["rho"][-1] ** 2, (drifts, wrong)


def test_dissipation_defect_shrinks_with_the_tolerance(digits_dataset):
    """On a smooth field (linear activations) log Loss + D is exactly constant; the
    recorded defect falls with rtol and stays within it (the fidelity tolerance; the
    verdict's invariants part: no error estimate, tests/test_error_estimate.py's)."""
    obj, p0 = _dense(digits_dataset, "linear", depth=2)
    worst = []
    for rtol in (1e-4, 1e-6, 1e-8):
        tr = run_flow(obj, p0, **adaptive(rtol, rtol * 1e-3), log_t_max=5.0, saves=6,
                      error_estimate=False)  # fmt: skip
        assert tr.status == "completed"
        worst.append(tr["dissipation_defect"].max())
        assert fidelity(tr).passed is True, fidelity(tr)
    assert worst[0] > worst[1] > worst[2] > 0
    assert all(w <= r for w, r in zip(worst, (1e-4, 1e-6, 1e-8), strict=True)), worst


def test_gd_reports_its_drift_as_a_measurement(digits_dataset):
    obj, p0 = _dense(digits_dataset, depth=2)
    gd = run_gd(obj, p0, schedule="loss-based", log_t_max=6.0, saves=5)
    assert gd["balance_drift"][0] == 0 and gd["dissipation_defect"][0] == 0
    assert gd["balance_drift"][-1] > 1e-4  # GD breaks the balance by O(eta^2) a step
    v = fidelity(gd)
    assert v.passed is None and "GD is not the flow" in v.summary
    assert v.details["balance_drift"]["max"] == gd["balance_drift"].max()


def test_fidelity_fails_on_a_coarse_integration_and_passes_on_the_default(digits_dataset):
    """The default stepping of gflow run (Tsit5 warm-up, then Ralston at 0.14 of its
    stability edge, rtol 3e-5) keeps its invariants within tolerance and is never failed
    (on this small net its error estimate may not settle the accuracy: then
    INCONCLUSIVE); RK4 at 0.9 of its edge, the former default, does not reach the same
    requested accuracy, and the verdict says where."""
    obj, p0 = _dense(digits_dataset, depth=2)
    kw = dict(rtol=3e-5, atol=3e-8, log_t_max=30.0, saves=16)
    good = run_flow(obj, p0, solver="ralston", cfl=0.14, **kw)
    coarse = run_flow(obj, p0, solver="rk4", cfl=0.9, **kw)
    v_good, v_coarse = fidelity(good), fidelity(coarse)
    assert v_good.outcome in (PASS, INCONCLUSIVE), v_good
    tol = v_good.details["tolerance"]
    assert all(v_good.details[c]["max"] <= tol for c in ("balance_drift", "layer_balance_drift"))
    assert v_coarse.passed is False, v_coarse
    assert "exceeds the run's tolerance" in v_coarse.summary
    assert fidelity_tolerance(good) == pytest.approx(3e-5, rel=1e-6)


def test_empty_columns_say_why(digits_dataset):
    """A one-layer (linear) model has no hidden unit, so no balance invariant; SGD's
    mini-batch steps have no dissipation identity: NaN columns and the reason."""
    model = build_model("linear", digits_dataset.input_shape, 1)
    obj, p0 = make_objective(model, digits_dataset, "logistic")
    tr = run_flow(obj, p0, log_t_max=2.0, saves=3)
    assert np.all(np.isnan(tr["balance_drift"])) and np.all(np.isnan(tr["layer_balance_drift"]))
    assert "no hidden units" in tr.config["invariants"]["balance_drift"]
    assert np.all(np.isfinite(tr["dissipation_defect"]))
    obj, p0 = _dense(digits_dataset, depth=2)
    sgd = run_gd(obj, p0, batch_size=8, lr=0.05, max_steps=20, saves=3)
    assert np.all(np.isnan(sgd["dissipation_defect"]))
    assert "mini-batch" in sgd.config["invariants"]["dissipation_defect"]
    assert np.all(np.isfinite(sgd["balance_drift"]))


def test_monitor_columns_come_after_the_required_ones(digits_dataset, tmp_path):
    from gflow.trajectory import CSV_COLUMNS, Trajectory

    obj, p0 = _dense(digits_dataset, depth=2)
    tr = run_flow(obj, p0, log_t_max=1.0, saves=2)
    names = tr.column_names
    assert names[: len(CSV_COLUMNS)] == list(CSV_COLUMNS)
    assert all(c in names[len(CSV_COLUMNS) :] for c in MONITOR_COLUMNS)
    back = Trajectory.load(tr.save(tmp_path / "run"))
    np.testing.assert_array_equal(back["balance_drift"], tr["balance_drift"])
    assert back.config["invariants"] == {}


@pytest.mark.slow
def test_gflow_run_default_flow_is_faithful_to_log_t_30(tmp_path, capsys):
    """Issue 14's target on the default problem, through the command: the default flow
    to log t = 30 keeps the balance drift within 1e-6 of rho^2 at every save point, at
    most 3x the former default's 1,584 gradient evaluations, and the verdict passes.
    (The margin's error against tight references is benchmarks/flow_accuracy.py's job:
    its references take minutes.)"""
    import json

    from gflow.cli import main
    from gflow.trajectory import Trajectory

    out = tmp_path / "run"
    rc = main(["run", "--dynamics", "flow", "--log-t-max", "30", "--no-plot", "--no-progress",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert "flow fidelity" in capsys.readouterr().out
    tr = Trajectory.load(out)
    assert tr.status == "completed"
    assert np.nanmax(tr["balance_drift"]) <= 1e-6
    assert tr["grad_evals"][-1] <= 3 * 1584
    verdicts = json.loads((out / "checks.json").read_text())["verdicts"]
    assert next(v for v in verdicts if v["name"] == "flow fidelity")["passed"] is True
