"""Known answers: problems whose limit direction is known in closed form or from an
independent convex solver, each with the error of the flow's direction at several log t
and the wall time to get there (issue 18, "a known-answer suite").

* ``svm``: a bias-free linear model (L = 1) on separable data converges to the
  hard-margin SVM without intercept (docs/theory.md item 5); the answer from SciPy's
  SLSQP on the primal QP. Error: ``1 - cos(theta, w_svm)``.
* ``l1``: a depth-2 diagonal linear network ``f(x) = <u*u - v*v, x>`` (L = 2, an own
  ``nnx.Module``) on separable data: ``|theta|^2 = |u|^2 + |v|^2 >= |beta|_1`` for
  ``beta = u*u - v*v``, with equality at a minimiser, so the max-margin problem in theta is
  the L1 max-margin problem in beta (Gunasekar et al. 2018), whose answer comes from an LP
  (SciPy's HiGHS). Error: ``|beta / |beta|_1 - beta_LP / |beta_LP|_1|_1`` and the L1
  normalized margin's gap to the LP's; the gap can never be negative (the LP's margin is
  the maximum), which the script asserts.

Still to come (issue 18): the two-layer leaky-ReLU net on symmetric data (Lyu et al.
2021) and an example of Vardi, Shamir & Srebro (2022) whose KKT point is not a local
optimum.

    python experiments/known_answers.py [--log-t-max 1000]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from common import out_dir, problem, write_json
from flax import nnx
from linear_svm import svm_direction

import gflow
from gflow.dynamics import run_flow


class Diagonal(nnx.Module):
    """``f(x) = <u*u - v*v, x>``: a depth-2 diagonal linear network, 2-homogeneous."""

    def __init__(self, d: int, scale: float, seed: int = 1):
        k1, k2 = jax.random.split(jax.random.key(seed))
        self.u = nnx.Param(scale * (1 + 0.1 * jax.random.uniform(k1, (d,), jnp.float64)))
        self.v = nnx.Param(scale * (1 + 0.1 * jax.random.uniform(k2, (d,), jnp.float64)))

    def __call__(self, x):
        return x @ (self.u[...] ** 2 - self.v[...] ** 2)


def l1_max_margin(X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``min |b|_1 s.t. y_n <b, x_n> >= 1`` as an LP in ``(b+, b-) >= 0`` (HiGHS)."""
    d = X.shape[1]
    a = -(y[:, None] * X)
    res = scipy.optimize.linprog(
        np.ones(2 * d), A_ub=np.hstack([a, -a]), b_ub=-np.ones(len(y)),
        bounds=[(0, None)] * (2 * d), method="highs",
    )  # fmt: skip
    if res.status != 0:
        raise RuntimeError(f"LP failed: {res.message}")
    return res.x[:d] - res.x[d:]


def sparse_data(n: int = 30, d: int = 10, seed: int = 0):
    """Gaussian inputs labelled by a sparse direction, pushed 0.3 apart along it."""
    rng = np.random.default_rng(seed)
    w = np.zeros(d)
    w[:2] = [1.0, -0.5]
    x = rng.standard_normal((n, d))
    y = np.where(x @ w > 0, 1, -1)
    return x + 0.3 * y[:, None] * w / np.linalg.norm(w), y


def _timed_flow(obj, p0, log_t_max: float, saves: int):
    """The flow with a snapshot at each save point, and the wall time to each (a
    progress callback's clock)."""
    walls: list = []
    t = time.perf_counter()

    def tick(row):
        walls.append(time.perf_counter() - t)

    tr = run_flow(obj, p0, rtol=1e-8, atol=1e-11, log_t_min=log_t_max / 100,
                  log_t_max=log_t_max, saves=saves, save_params=True,
                  progress=tick)  # fmt: skip
    return tr, walls


def case_svm(log_t_max: float, saves: int) -> dict:
    ds, _, obj, p0 = problem(data="digits", model="linear", loss="exp", n=200)
    X, y = np.asarray(ds.x).reshape(len(ds), -1), ds.y_signed.astype(float)
    w = svm_direction(X, y)
    w = w / np.linalg.norm(w)
    tr, walls = _timed_flow(obj, p0, log_t_max, saves)
    rows = []
    for lt, p, wall in zip(tr["log_t"], tr.snapshots, walls, strict=True):
        theta = np.asarray(p["layers"][0]["kernel"]).ravel()
        rows.append(dict(log_t=float(lt), wall_s=wall,
                         error=float(1 - theta @ w / np.linalg.norm(theta))))  # fmt: skip
    return dict(answer="hard-margin SVM (SLSQP)", error="1 - cos(theta, w_svm)", rows=rows)


def case_l1(log_t_max: float, saves: int) -> dict:
    x, y = sparse_data()
    b_lp = l1_max_margin(x, y.astype(float))
    gamma_lp = 1 / np.abs(b_lp).sum()
    b_lp = b_lp * gamma_lp
    obj, p0 = gflow.make_objective(Diagonal(x.shape[1], 0.1), (x, y), "exp", order=2)
    tr, walls = _timed_flow(obj, p0, log_t_max, saves)
    rows = []
    for lt, p, wall in zip(tr["log_t"], tr.snapshots, walls, strict=True):
        b = np.asarray(p["u"]) ** 2 - np.asarray(p["v"]) ** 2
        b = b / np.abs(b).sum()
        gap = gamma_lp - float(np.min(y * (x @ b)))
        assert gap >= -1e-9 * gamma_lp, f"a margin above the LP's maximum: {gap}"
        rows.append(dict(log_t=float(lt), wall_s=wall, error=float(np.abs(b - b_lp).sum()),
                         margin_gap=gap / gamma_lp))  # fmt: skip
    return dict(answer="L1 max-margin (LP, HiGHS)", error="|beta - beta_LP|_1 (L1-normalized)",
                rows=rows)  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log-t-max", type=float, default=1000.0)
    ap.add_argument("--saves", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = out_dir("known_answers", args.out)
    summary = {}
    for name, case in (("svm", case_svm), ("l1", case_l1)):
        summary[name] = res = case(args.log_t_max, args.saves)
        print(f"{name}: {res['answer']}; error = {res['error']}")
        shown = {args.log_t_max / 100, args.log_t_max / 10, args.log_t_max}
        for r in [r for r in res["rows"] if min(abs(r["log_t"] / v - 1) for v in shown) < 1e-6]:
            extra = f"  margin gap {r['margin_gap']:.2e}" if "margin_gap" in r else ""
            print(f"  log t {r['log_t']:8.3g}: {r['error']:.3e}{extra}  ({r['wall_s']:.1f} s)")
    write_json(out / "summary.json", summary)
    print(f"-> {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
