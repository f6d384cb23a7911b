"""Experiment (b): GD at several constant steps against the gradient flow, and the order.

On gflow run's default problem, GD with constant steps ``--lrs`` runs to time ``--t-end``
and is compared with the flow at the same time: by default the flow through the ReLU
network's kinks event by event (``KinkStepping``, whose own error is ~1e-10, so that even
the smoothed margin's gaps of 1e-6 can be fitted); ``--reference rk4``: RK4 on the time
clock at an eighth of the smallest step, first order at every kink, as before. The gaps
in the parameters, log loss and smoothed margin should shrink like the step (order 1:
GD is Euler on the flow). Also ``eta * lambda_max`` along the largest-step run (GD
tracks the flow only below 2). Writes a figure and a JSON.

    python experiments/gd_vs_flow.py [--t-end 4] [--lrs 0.0025,0.005,0.01,0.02] [--reference rk4]
"""

from __future__ import annotations

import argparse
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import out_dir, problem, save_experiment_figure, write_json  # noqa: E402

from gflow.compare import gd_flow_gap, sharpness_along  # noqa: E402
from gflow.dynamics import run_gd  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--t-end", type=float, default=4.0)
    ap.add_argument("--lrs", default="0.0025,0.005,0.01,0.02")
    ap.add_argument("--ref-substeps", type=int, default=8, help="RK4 steps per smallest GD step")
    ap.add_argument(
        "--reference",
        choices=("auto", "kinks", "rk4"),
        default="auto",
        help="the flow reference (auto: through the kinks for ReLU networks)",
    )
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = out_dir("gd_vs_flow", args.out)
    lrs = [float(v) for v in args.lrs.split(",")]
    _, _, obj, p0 = problem()
    res = gd_flow_gap(obj, p0, lrs, t_end=args.t_end, ref_substeps=args.ref_substeps,
                      reference=args.reference)  # fmt: skip
    print(f"reference: {res['reference']}")
    big = max(lrs)
    k = round(args.t_end / big)
    tr = run_gd(obj, p0, schedule="constant", lr=args.t_end / k, max_steps=k, saves=12,
                save_params=True)  # fmt: skip
    res["eta_lambda_max_largest_step"] = [float(v) for v in sharpness_along(obj, tr)]
    print(f"GD vs flow at t = {args.t_end:g} (log t = {math.log(args.t_end):.3g}):")
    for r in res["rows"]:
        print(f"  lr {r['lr']:.4g}: params {r['param_gap']:.3e}  log loss {r['log_loss_gap']:.3e}"
              f"  margin {r['margin_gap']:.3e}")  # fmt: skip
    print(f"fitted orders: params {res['order_param']:.3f}, log loss {res['order_log_loss']:.3f},"
          f" margin {res['order_margin']:.3f}")  # fmt: skip
    for note in res["notes"]:
        print(f"warning: {note}")
    top = np.nanmax(res["eta_lambda_max_largest_step"])
    print(f"eta * lambda_max along lr {big:g}: max {top:.3g}")
    fig, ax = plt.subplots(figsize=(5, 4), constrained_layout=True)
    h = np.array([r["lr"] for r in res["rows"]])
    for key, label in (("param_gap", "parameters (rel.)"), ("log_loss_gap", "log Loss"),
                       ("margin_gap", "smoothed margin")):  # fmt: skip
        ax.loglog(h, [r[key] for r in res["rows"]], "o-", label=label)
    ax.loglog(h, h / h[0] * res["rows"][0]["param_gap"], "k--", lw=0.8, label="slope 1")
    ax.set_xlabel("GD step size")
    ax.set_ylabel(f"|GD - flow| at t = {args.t_end:g}")
    ax.set_title(f"order {res['order_param']:.2f} (params)")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig_path = save_experiment_figure(fig, "gd_vs_flow.png")
    write_json(out / "gd_vs_flow.json", res)
    print(f"-> {out / 'gd_vs_flow.json'}, {fig_path}")


if __name__ == "__main__":
    main()
