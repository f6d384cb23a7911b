"""Run by tests/test_sharding.py in a process with 8 simulated CPU devices: every
quantity on the data sharded over 8 devices against the same on one device; prints the
largest relative differences as JSON."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from gflow import data as D  # noqa: E402
from gflow.dynamics import run_flow, run_gd  # noqa: E402
from gflow.dynamics.driver import ESTIMATE_COLUMNS  # noqa: E402
from gflow.invariants import MONITOR_COLUMNS  # noqa: E402
from gflow.kkt import gram_matrix  # noqa: E402
from gflow.models import build_model  # noqa: E402
from gflow.objective import make_objective, shard  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    assert np.array_equal(np.isfinite(a), np.isfinite(b))
    scale = max(float(np.abs(a[ok]).max(initial=0.0)), 1e-300)
    return float(np.abs(a[ok] - b[ok]).max(initial=0.0)) / scale


def col_diff(t1, t8, c):
    """A column's difference: relative, except for the invariant monitors and the error
    estimates, which are already relative errors (of invariants scaled by rho^2, of the
    log-loss change, of the parameters against their shadow's) and near zero, so that
    the rounding of the sharded sums shows up in them as an absolute difference of a
    few ulps times the number of steps."""
    if c in MONITOR_COLUMNS + ESTIMATE_COLUMNS:
        a, b = np.asarray(t1[c]), np.asarray(t8[c])
        return float(np.nanmax(np.abs(a - b), initial=0.0))
    return rel(t1[c], t8[c])


def tree_rel(a, b):
    return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def main():
    assert jax.device_count() == 8, jax.devices()
    out = {}
    binary = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 64, seed=0), "unit")
    many = D.sample(D.digits(), 96, seed=1)
    for name, ds, model, loss in (
        ("mlp", binary, build_model("mlp", binary.input_shape, 1, width=8), "logistic"),
        ("cnn", many, build_model("cnn", many.input_shape, 10, width=4, depth=1), "ce"),
    ):
        obj, p = make_objective(model, ds, loss)
        obj8, _ = make_objective(model, ds, loss, devices=8)
        assert len(obj8.x.sharding.device_set) == 8
        vg1, vg8 = obj.value_and_grad(p), jax.jit(lambda o, p: o.value_and_grad(p))(obj8, p)
        out[f"{name}/log_loss"] = rel(vg1[0], vg8[0])
        out[f"{name}/grad"] = tree_rel(vg1[1], vg8[1])
        out[f"{name}/margins"] = rel(obj.margins(p), jax.jit(lambda o, p: o.margins(p))(obj8, p))
        q1, q8 = obj.quantities(p), jax.jit(lambda o, p: o.quantities(p))(obj8, p)
        out[f"{name}/quantities"] = tree_rel(q1, q8)
        out[f"{name}/gram"] = rel(gram_matrix(obj, p), gram_matrix(obj8, p))
        if name == "mlp":
            gd = dict(schedule="loss-based", log_t_max=8.0, saves=5)
            t1, t8 = run_gd(obj, p, **gd), run_gd(obj8, p, **gd)
            out[f"{name}/gd"] = max(col_diff(t1, t8, c) for c in t1.column_names)
            out[f"{name}/gd_params"] = tree_rel(t1.final_params, t8.final_params)
    # The flow: fixed-step RK4 on the ReLU network; adaptive Tsit5 on a smooth one (on a
    # ReLU network a 1e-16 difference can flip an accept / reject decision at a kink, and
    # the runs then agree only to the solver's tolerance).
    for name, act, fl in (
        ("relu/rk4", "relu", dict(solver="rk4", dt=0.02)),
        ("linear/tsit5", "linear", dict(solver="tsit5", rtol=1e-6, atol=1e-9)),
    ):
        model = build_model("mlp", binary.input_shape, 1, width=8, activation=act)
        obj, p = make_objective(model, binary, "logistic")
        fl = dict(fl, log_t_max=3.0, saves=4)
        f1, f8 = run_flow(obj, p, **fl), run_flow(shard(obj, 8), p, **fl)
        out[f"flow {name}"] = max(col_diff(f1, f8, c) for c in f1.column_names)
        out[f"flow {name} params"] = tree_rel(f1.final_params, f8.final_params)
    try:
        shard(obj, 5)
        out["uneven"] = "accepted"
    except ValueError as e:
        out["uneven"] = str(e)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
