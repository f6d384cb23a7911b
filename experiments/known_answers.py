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

* ``lyu21``: a two-layer leaky-ReLU net (width 8, initialised at 1e-3 of gflow's scale) on
  symmetric data (the ``l1`` points and their mirrors ``(-x, -y)``): Lyu et al. (2021)
  prove convergence to the linear max-margin classifier. Its linear part ``sum_j a_j w_j``
  against the SVM (SLSQP), ``1 - cos``, and the normalized margin's gap to the maximum
  ``(1 + alpha) gamma_svm / 4`` (``gflow.theory.linear_max_margin``, whose verdict is
  printed).
* ``vardi``: the ``l1`` net with one coordinate at ``u_i = v_i = 0``, which the flow never
  moves: the mechanism of Vardi, Shamir & Srebro (2022) for diagonal networks. The limit
  is the L1 max-margin without coordinate i (an LP), a KKT point of the whole problem
  that is not a local optimum, since using coordinate i raises the L1 margin (the full
  LP's). Error: ``|beta - beta_restricted|_1``; the gap to the full LP's margin stays;
  ``gflow.theory.local_optimality`` must observe a FAIL (a better point within a stated
  ball; printed).

    python experiments/known_answers.py [--log-t-max 1000]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import out_dir, problem, write_json
from flax import nnx

import gflow
from gflow.dynamics import run_flow
from gflow.known import l1_max_margin, svm_direction


class Diagonal(nnx.Module):
    """``f(x) = <u*u - v*v, x>``: a depth-2 diagonal linear network, 2-homogeneous."""

    def __init__(self, d: int, scale: float, seed: int = 1):
        k1, k2 = jax.random.split(jax.random.key(seed))
        self.u = nnx.Param(scale * (1 + 0.1 * jax.random.uniform(k1, (d,), jnp.float64)))
        self.v = nnx.Param(scale * (1 + 0.1 * jax.random.uniform(k2, (d,), jnp.float64)))

    def __call__(self, x):
        return x @ (self.u[...] ** 2 - self.v[...] ** 2)


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


def case_lyu21(log_t_max: float, saves: int) -> dict:
    from gflow.models import LEAKY_SLOPE
    from gflow.theory import linear_max_margin

    x, y = sparse_data(n=20)
    x, y = np.concatenate([x, -x]), np.concatenate([y, -y])
    w = svm_direction(x, y.astype(float))
    gamma = (1 + LEAKY_SLOPE) / 4 * float(np.min(y * (x @ w))) / np.linalg.norm(w)
    w = w / np.linalg.norm(w)
    model = gflow.build_model("mlp", (x.shape[1],), 1, width=8, depth=2,
                              activation="leaky_relu", seed=1)  # fmt: skip
    obj, p0 = gflow.make_objective(model, (x, y), "exp")
    tr, walls = _timed_flow(obj, jax.tree.map(lambda a: 1e-3 * a, p0), log_t_max, saves)
    rows = []
    for lt, p, wall in zip(tr["log_t"], tr.snapshots, walls, strict=True):
        k1, k2 = (np.asarray(p["layers"][i]["kernel"]) for i in (0, 1))
        lin = (k1 @ k2).ravel()
        sq = float(np.sum(k1**2) + np.sum(k2**2))
        margin = float(np.min(np.asarray(obj.margins(p)))) / sq
        assert margin <= gamma * (1 + 1e-6), f"a margin above the maximum: {margin}"
        rows.append(dict(log_t=float(lt), wall_s=wall,
                         error=float(1 - lin @ w / np.linalg.norm(lin)),
                         margin_gap=(gamma - margin) / gamma))  # fmt: skip
    return dict(answer="linear max-margin (SVM by SLSQP; margin (1 + alpha) gamma_svm / 4)",
                error="1 - cos(sum_j a_j w_j, w_svm)", rows=rows,
                verdict=str(linear_max_margin(tr, obj)))  # fmt: skip


def case_vardi(log_t_max: float, saves: int, dead: int = 2) -> dict:
    from gflow.theory import local_optimality

    x, y = sparse_data()
    gamma_lp = 1 / np.abs(l1_max_margin(x, y.astype(float))).sum()
    x_without = x.copy()
    x_without[:, dead] = 0.0
    b_r = l1_max_margin(x_without, y.astype(float))
    b_r = b_r / np.abs(b_r).sum()
    model = Diagonal(x.shape[1], 0.1)
    model.u[...] = model.u[...].at[dead].set(0.0)
    model.v[...] = model.v[...].at[dead].set(0.0)
    obj, p0 = gflow.make_objective(model, (x, y), "exp", order=2)
    tr, walls = _timed_flow(obj, p0, log_t_max, saves)
    rows = []
    for lt, p, wall in zip(tr["log_t"], tr.snapshots, walls, strict=True):
        b = np.asarray(p["u"]) ** 2 - np.asarray(p["v"]) ** 2
        b = b / np.abs(b).sum()
        gap = (gamma_lp - float(np.min(y * (x @ b)))) / gamma_lp
        rows.append(dict(log_t=float(lt), wall_s=wall, error=float(np.abs(b - b_r).sum()),
                         margin_gap=gap))  # fmt: skip
    t = time.perf_counter()
    verdict = str(local_optimality(tr, obj))
    return dict(answer=f"L1 max-margin without coordinate {dead} (LP, HiGHS)",
                error="|beta - beta_restricted|_1 (L1-normalized)", rows=rows,
                verdict=verdict, verdict_wall_s=time.perf_counter() - t)  # fmt: skip


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log-t-max", type=float, default=1000.0)
    ap.add_argument("--saves", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out = out_dir("known_answers", args.out)
    summary = {}
    cases = (("svm", case_svm), ("l1", case_l1), ("lyu21", case_lyu21), ("vardi", case_vardi))
    for name, case in cases:
        summary[name] = res = case(args.log_t_max, args.saves)
        print(f"{name}: {res['answer']}; error = {res['error']}")
        shown = {args.log_t_max / 100, args.log_t_max / 10, args.log_t_max}
        for r in [r for r in res["rows"] if min(abs(r["log_t"] / v - 1) for v in shown) < 1e-6]:
            extra = f"  margin gap {r['margin_gap']:.2e}" if "margin_gap" in r else ""
            print(f"  log t {r['log_t']:8.3g}: {r['error']:.3e}{extra}  ({r['wall_s']:.1f} s)")
        if "verdict" in res:
            print(f"  {res['verdict']}")
    write_json(out / "summary.json", summary)
    print(f"-> {out / 'summary.json'}")
    return summary


if __name__ == "__main__":
    main()
