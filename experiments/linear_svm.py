"""Experiment (d): a linear model's flow direction converges to the hard-margin SVM.

A bias-free linear model (L = 1) on separable data (digits 0 vs 1, unit-norm, 200
images), exponential loss, flow to ``--log-t-max``. The limit direction is the hard-margin
SVM without intercept (docs/theory.md item 5), solved independently by SciPy's SLSQP on the
primal QP. Reports, along the run, the angle between theta and the SVM direction and the
normalized margin's relative gap to the SVM margin 1/|w*|.

    python experiments/linear_svm.py [--log-t-max 1000]
"""

from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import out_dir, problem, save_experiment_figure, write_json  # noqa: E402

from gflow.dynamics import run_flow  # noqa: E402
from gflow.known import svm_direction  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log-t-max", type=float, default=1000.0)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = out_dir("linear_svm", args.out)
    ds, _, obj, p0 = problem(data="digits", model="linear", loss="exp", n=args.n)
    X, y = np.asarray(ds.x).reshape(len(ds), -1), ds.y_signed
    w = svm_direction(X, y.astype(float))
    svm_margin = 1 / np.linalg.norm(w)
    # a second, independent solver: liblinear's dual coordinate descent (hinge, no bias)
    from sklearn.svm import LinearSVC

    w2 = LinearSVC(fit_intercept=False, loss="hinge", C=1e6, tol=1e-12, max_iter=10**6)
    w2 = w2.fit(X, y).coef_.ravel()
    w2 = w2 / np.min(y * (X @ w2))
    agree = float(np.linalg.norm(w2 - w) / np.linalg.norm(w))
    print(f"SVM: SLSQP and scikit-learn's LinearSVC agree to {agree:.1e} (relative)")
    tr = run_flow(obj, p0, rtol=1e-8, atol=1e-11, log_t_max=args.log_t_max, saves=41,
                  save_params=True)  # fmt: skip
    print(f"flow: {tr.status}, {tr.message}; SVM margin {svm_margin:.8g}")
    tr.save(out / "flow")
    rows = []
    for i, snap in enumerate(tr.snapshots):
        th = np.asarray(snap["layers"][0]["kernel"]).ravel()
        cos = th @ w / (np.linalg.norm(th) * np.linalg.norm(w))
        angle = math.acos(min(1.0, max(-1.0, cos)))
        gap = (tr["normalized_margin"][i] - svm_margin) / svm_margin
        rows.append(dict(log_t=float(tr["log_t"][i]), angle=angle, margin_gap=float(gap)))
    last = rows[-1]
    print(f"at log t = {last['log_t']:.4g}: angle {last['angle']:.3e} rad, margin gap "
          f"{last['margin_gap']:+.3e}")  # fmt: skip
    write_json(out / "svm.json", dict(svm_margin=svm_margin, solvers_agree=agree, rows=rows))
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    lt = np.array([r["log_t"] for r in rows[1:]])
    ax.loglog(lt, [r["angle"] for r in rows[1:]], "o-", label="angle to SVM (rad)")
    ax.loglog(lt, [abs(r["margin_gap"]) for r in rows[1:]], "s-", label="|margin gap| (rel.)")
    ax.set_xlabel("log t")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig_path = save_experiment_figure(fig, "linear_svm.png")
    print(f"-> {out}, {fig_path}")


if __name__ == "__main__":
    main()
