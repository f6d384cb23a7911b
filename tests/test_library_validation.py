"""Library entry points refuse bad arguments before any work (issue 29 item 7): one
``ValueError`` naming the argument and the value, as ``test_bad_input._lib_cases``; and
the valid neighbours of each bad case still run."""

from __future__ import annotations

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gflow.dynamics import KinkStepping, StabilityStepping, run_flow, run_flow_seeds, run_gd
from gflow.dynamics.solvers import check_tolerances
from gflow.models import build_model, check_finite_params, check_homogeneity, split_params
from gflow.objective import make_objective


def _xy(n=20, d=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), np.arange(n) % 2


@pytest.fixture(scope="module")
def lin():
    """A two-layer linear net on 20 random points: smooth, so a short flow completes."""
    x, y = _xy()
    return make_objective(
        build_model("mlp", (6,), 1, width=4, activation="linear"), (x, y), "logistic"
    )


def _with_nan(params, value=np.nan):
    out = jax.tree.map(lambda a: a, params)
    out["layers"][1]["kernel"] = out["layers"][1]["kernel"].at[0, 0].set(value)
    return out


def _raises(fn, *needles):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, msg
    return msg


# ------------------------------------------------------------------ step-size controllers

PID = diffrax.PIDController


@pytest.mark.parametrize(
    ("controller", "needles"),
    [
        (PID(rtol=-1, atol=-1), ("PIDController", "rtol=-1")),
        (PID(rtol=np.nan, atol=np.nan), ("PIDController", "rtol=nan")),
        (PID(rtol=0.0, atol=1e-6), ("PIDController", "rtol=0.0")),
        (PID(rtol=1e-6, atol=-1e-9), ("PIDController", "atol=-1e-09")),
        (PID(rtol=1e-6, atol=np.inf), ("PIDController", "atol=inf")),
        (PID(rtol=1e-6, atol=1e-9, dtmax=np.nan), ("PIDController", "dtmax=nan")),
        (diffrax.ClipStepSizeController(PID(rtol=np.inf, atol=1e-9)), ("PIDController", "inf")),
        (StabilityStepping(cfl=np.nan), ("StabilityStepping", "cfl=nan")),
        (StabilityStepping(cfl=1.5), ("StabilityStepping", "cfl=1.5")),
        (StabilityStepping(drift=np.inf), ("StabilityStepping", "drift=inf")),
        (StabilityStepping(refresh=0), ("StabilityStepping", "refresh=0")),
        (KinkStepping(rtol=-1.0), ("KinkStepping", "rtol=-1.0")),
        (KinkStepping(atol=np.nan), ("KinkStepping", "atol=nan")),
        (KinkStepping(dt=np.inf), ("KinkStepping", "dt=inf")),
        (KinkStepping(max_sliding=0), ("KinkStepping", "max_sliding")),
    ],
)
def test_bad_controller_is_refused_before_any_work(lin, controller, needles, monkeypatch):
    import gflow.dynamics.flow as flow

    def no_work(*_, **__):
        raise AssertionError("work started before the controller was checked")

    monkeypatch.setattr(flow, "drive", no_work)
    monkeypatch.setattr(flow, "run_flow_kinks", no_work)
    obj, p0 = lin
    _raises(lambda: run_flow(obj, p0, stepsize_controller=controller), *needles)


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(rtol=np.inf), "rtol=inf"),
        (dict(rtol=np.nan), "rtol=nan"),
        (dict(atol=-1.0), "atol=-1.0"),
        (dict(atol=np.nan), "atol=nan"),
        (dict(dt=np.inf, solver="rk4"), "dt=inf"),
        (dict(dt=np.nan, solver="rk4"), "dt=nan"),
        (dict(cfl=np.nan), "cfl=nan"),
        (dict(cfl=0.1, drift=np.inf), "drift=inf"),
        (dict(cfl=0.1, refresh=2.5), "refresh=2.5"),
        (dict(stepsize_controller=StabilityStepping(), cfl=0.1), "cfl=0.1"),
    ],
)
def test_bad_flat_step_arguments(lin, kw, needle):
    obj, p0 = lin
    _raises(lambda: run_flow(obj, p0, **kw), needle)


def test_check_tolerances_rules():
    check_tolerances(1e-6, 0.0)  # pure relative control
    check_tolerances(np.float32(1e-3), jnp.asarray(1e-6))
    for rtol, atol in ((0.0, 0.0), (0.0, 1e-6), (1.0, 1e-6), (1e-6, True), (1e-6, [1e-6])):
        with pytest.raises(ValueError, match="tol"):
            check_tolerances(rtol, atol, "X")


def test_pure_relative_control_runs(lin):
    """``atol = 0`` with ``rtol > 0`` is allowed: a PID controller's and the flat one."""
    obj, p0 = lin
    kw = dict(log_t_max=1.0, saves=2)
    a = run_flow(obj, p0, stepsize_controller=PID(rtol=1e-6, atol=0.0), **kw)
    assert a.status == "completed", a.message
    assert a["log_loss"][-1] < a["log_loss"][0]
    b = run_flow(obj, p0, rtol=1e-6, atol=0.0, **kw)
    assert b.status == "completed", b.message
    np.testing.assert_allclose(b["log_loss"], a["log_loss"], rtol=1e-6)


# ------------------------------------------------------------------ non-finite parameters


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_params0_named_at_entry(lin, value):
    obj, p0 = lin
    bad = _with_nan(p0, value)
    kind = "NaN" if np.isnan(value) else "inf"
    needles = ("params0", kind, "['layers'][1]['kernel']")
    _raises(lambda: run_flow(obj, bad), *needles)
    _raises(lambda: run_gd(obj, bad), *needles)
    _raises(lambda: run_flow_seeds(obj, [p0, bad], seeds=[0, 1]), "params0[1]", kind)


def test_check_homogeneity_names_nan_params():
    x, _ = _xy()
    model = build_model("mlp", (6,), 1, width=4, activation="linear")
    graphdef, params = split_params(model)
    bad = _with_nan(params)
    msg = _raises(
        lambda: check_homogeneity(graphdef, x, order=2, params=bad),
        "NaN", "['layers'][1]['kernel']",
    )  # fmt: skip
    assert "c^" not in msg  # not read as a homogeneity order
    rep = check_homogeneity(graphdef, x, order=2, params=params)
    assert rep.homogeneous and rep.order == 2


def test_make_objective_names_nan_params():
    x, y = _xy()
    model = build_model("mlp", (6,), 1, width=4, activation="linear")
    graphdef, params = split_params(model)
    nnx.update(model, _with_nan(params))
    _raises(lambda: make_objective(model, (x, y), "logistic"), "NaN", "['layers'][1]['kernel']")


def test_check_finite_params_accepts_finite_and_integer_leaves():
    check_finite_params({"w": jnp.ones(3), "n": jnp.arange(3), "s": 2.0})
    _raises(lambda: check_finite_params({"a": {"b": jnp.array([1.0, -np.inf])}}), "['a']['b']")


# ------------------------------------------------------------------ labels


def _mlp(outputs=1):
    return build_model("mlp", (6,), outputs, width=4, activation="linear")


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        (np.where(np.arange(20) % 2, 0.5, 0.0), "label 0.5"),
        ((np.arange(20) % 2) * 2, "label 2"),
        (np.where(np.arange(20) % 2, np.nan, 1.0), "label nan"),
        (np.arange(20) % 3, "label 2"),  # three values for a binary loss
        (np.arange(20) % 3 - 1, "label 0"),  # {-1, 0, 1}: mixes the two conventions
        (np.where(np.arange(20) % 2, 1.0, -np.inf), "label -inf"),
        (np.array(["a", "b"] * 10), "dtype <U1"),
    ],
)
def test_binary_labels_checked_by_value(labels, needle):
    x, _ = _xy()
    _raises(lambda: make_objective(_mlp(), (x, labels), "logistic"), needle)


@pytest.mark.parametrize(
    "labels",
    [
        np.where(np.arange(20) % 2, 1, -1).astype(np.float32),
        np.where(np.arange(20) % 2, 1, -1).astype(np.int8),
        (np.arange(20) % 2).astype(np.int32),
        (np.arange(20) % 2).astype(np.float32),
        (np.arange(20) % 2).astype(np.uint8),
        (np.arange(20) % 2).astype(bool),
    ],
)
def test_binary_labels_any_numeric_dtype(labels):
    """{0, 1} and {-1, +1} in any dtype: class 0 (label 0 or -1) is the signed label -1."""
    x, _ = _xy()
    obj, _ = make_objective(_mlp(), (x, labels), "exp")
    want = np.where(np.arange(20) % 2, 1.0, -1.0)
    np.testing.assert_array_equal(np.asarray(obj.y), want)


@pytest.mark.parametrize(
    ("labels", "needle"),
    [
        (np.arange(20) % 4, "label 3"),  # a class the 3 outputs do not have
        (np.arange(20) % 3 - 1, "label -1"),
        (np.where(np.arange(20) % 3 == 0, 1.5, np.arange(20) % 3), "label 1.5"),
        (np.where(np.arange(20) % 3 == 0, np.nan, np.arange(20) % 3), "label nan"),
    ],
)
def test_cross_entropy_labels_are_class_indices(labels, needle):
    x, _ = _xy()
    _raises(lambda: make_objective(_mlp(3), (x, labels), "ce"), needle)


def test_cross_entropy_labels_valid():
    x, _ = _xy()
    obj, _ = make_objective(_mlp(3), (x, (np.arange(20) % 3).astype(np.float32)), "ce")
    np.testing.assert_array_equal(np.asarray(obj.y), np.arange(20) % 3)
    # a class absent from the data is still one of the model's outputs
    obj, _ = make_objective(_mlp(3), (x, np.arange(20) % 2), "ce")
    np.testing.assert_array_equal(np.asarray(obj.y), np.arange(20) % 2)
    # two classes as -1 / +1 read as 0 / 1, as for binary losses
    obj, _ = make_objective(_mlp(2), (x, np.where(np.arange(20) % 2, 1, -1)), "ce")
    np.testing.assert_array_equal(np.asarray(obj.y), np.arange(20) % 2)


# ------------------------------------------------------------------ input shapes


def test_wrong_input_width_nnx_module():
    x, y = _xy()
    model = nnx.Linear(5, 1, use_bias=False, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    _raises(lambda: make_objective(model, (x, y), "logistic", order=1), "(6,)", "(5,)")


def test_wrong_input_width_apply_function():
    x, y = _xy()

    def apply_fn(p, v):
        return v @ p["w"]

    w5 = {"w": jnp.ones(5)}
    _raises(lambda: make_objective(apply_fn, (x, y), "logistic", order=1, params=w5),
            "(6,)", "(5,)")  # fmt: skip
    obj, _ = make_objective(apply_fn, (x, y), "logistic", order=1, params={"w": jnp.ones(6)})
    assert obj.order == 1


def test_wrong_input_width_gflow_model():
    x, y = _xy()
    _raises(lambda: make_objective(build_model("mlp", (5,), 1, width=4), (x, y), "logistic"),
            "(5,)", "(6,)")  # fmt: skip
