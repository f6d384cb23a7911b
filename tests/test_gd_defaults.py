"""``run_gd_seeds`` is K runs of ``run_gd``: with one initialisation and the defaults of
both, it gives ``run_gd``'s trajectory (``log_t_max=None`` in both: save points by
steps)."""

import inspect

import jax
import numpy as np

from gflow import data as D
from gflow.dynamics import run_gd, run_gd_seeds
from gflow.models import build_model
from gflow.objective import make_objective


def test_the_drivers_share_their_defaults():
    one = inspect.signature(run_gd).parameters
    many = inspect.signature(run_gd_seeds).parameters
    shared = (set(one) & set(many)) - {"objective", "params0"}
    assert "log_t_max" in shared
    assert {name: many[name].default for name in shared} == {
        name: one[name].default for name in shared
    }
    assert one["log_t_max"].default is None


def test_one_seed_with_defaults_is_run_gd():
    """Bit for bit: ``run_gd`` is the same driver with K = 1, the same jitted program on a
    batch of one, so no rounding differs."""
    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 20, seed=0), "unit")
    obj, p0 = make_objective(build_model("mlp", ds.input_shape, 1, width=4), ds, "logistic")
    alone = run_gd(obj, p0, max_steps=12, saves=4)
    (together,) = run_gd_seeds(obj, [p0], seeds=[0], max_steps=12, saves=4)
    assert alone.config["log_t_max"] is None and together.config["log_t_max"] is None
    assert (together.status, together.message) == (alone.status, alone.message)
    assert together.column_names == alone.column_names
    assert len(alone) == 5  # the initial point, then steps 1, 4, 8, 12
    for c in alone.column_names:
        a, b = np.asarray(alone[c]), np.asarray(together[c])
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), c
    for a, b in zip(jax.tree.leaves(alone.final_params), jax.tree.leaves(together.final_params),
                    strict=True):  # fmt: skip
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_a_nan_clock_ends_the_run_with_a_message():
    """An optax schedule whose step makes the flow's clock NaN (0 / 0 on it) while the
    loss stays finite used to leave the run neither moving nor ending: the host loop
    spun. Now the step fails as a non-finite loss does, and the run says so."""
    import optax

    from tests.conftest import build_digits

    _, _, obj, p0 = build_digits(40, width=4, seed=1)
    tr = run_gd(obj, p0, seed=1, lr=optax.linear_schedule(0.1, 0.5, 10), max_steps=20,
                saves=3)  # fmt: skip
    assert tr.status == "failed" and "non-finite loss, gradient or clock" in tr.message
    assert np.all(np.isfinite(tr["log_t"][1:]))  # the last good state is what is kept
