"""Experiment (c): the (eps, delta)-KKT residual falls along a long flow run.

gflow run's default problem, flow to ``--log-t-max`` with a parameter snapshot at every
save point; at each snapshot past the data being separated, the KKT residual over all
samples (``gflow.kkt``). Writes the run folder, a JSON and a figure.

    python experiments/kkt_along_flow.py [--log-t-max 1000] [--saves 21]
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import out_dir, problem, save_experiment_figure, write_json  # noqa: E402

from gflow.dynamics import run_flow  # noqa: E402
from gflow.kkt import kkt_residual  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log-t-max", type=float, default=1000.0)
    ap.add_argument("--saves", type=int, default=21)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = out_dir("kkt_along_flow", args.out)
    _, _, obj, p0 = problem()
    t = time.perf_counter()
    tr = run_flow(obj, p0, solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7,
                  log_t_max=args.log_t_max, saves=args.saves, save_params=True)  # fmt: skip
    print(f"flow: {tr.status}, {tr.message}, {time.perf_counter() - t:.0f} s")
    tr.save(out / "flow")
    rows = []
    for i, snap in enumerate(tr.snapshots):
        try:
            k = kkt_residual(obj, snap, gap=None)
        except ValueError:
            continue
        rows.append(dict(log_t=float(tr["log_t"][i]), eps_rel=k.eps_rel, delta=k.delta,
                         support=int((k.lam > 0).sum()), optimality_gap=k.kkt_gap))  # fmt: skip
        r = rows[-1]
        print(f"  log t {r['log_t']:8.3f}: eps/|theta_s| {r['eps_rel']:.4e}  delta "
              f"{r['delta']:.4e}  support {r['support']}")  # fmt: skip
    write_json(out / "kkt.json", rows)
    fig, ax = plt.subplots(figsize=(5.5, 4), constrained_layout=True)
    lt = np.array([r["log_t"] for r in rows])
    ax.semilogy(lt, [r["eps_rel"] for r in rows], "o-", label=r"$\epsilon / \|\theta_s\|$")
    ax.semilogy(lt, np.maximum([r["delta"] for r in rows], 1e-300), "s-", label=r"$\delta$")
    ax.set_xlabel("log t")
    ax.set_title("KKT residual along the flow")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    fig_path = save_experiment_figure(fig, "kkt_along_flow.png")
    print(f"-> {out}, {fig_path}")


if __name__ == "__main__":
    main()
