"""Experiment (a): the smoothed margin rises and the rates hold, for all three losses.

Gradient flow (gflow run's default integrator) on MNIST 0/1 (exponential, logistic) and on
MNIST 0/1/2 (cross-entropy, 3 outputs), 300 unit-norm images, 2-layer ReLU MLP of width
50, to log t = 100. Writes one run folder per loss with its checks.json, and a figure of
the smoothed margin and of the two rate ratios against log t.

    python experiments/monotone_rates.py [--log-t-max 100] [--out runs/monotone_rates]
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import out_dir, problem, save_experiment_figure, write_json  # noqa: E402

from gflow.dynamics import StabilityStepping, run_flow  # noqa: E402
from gflow.theory import check_run, checks_json  # noqa: E402

CASES = {"exp": dict(loss="exp"), "logistic": dict(loss="logistic"),
         "ce": dict(loss="ce", classes=(0, 1, 2))}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--log-t-max", type=float, default=100.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = out_dir("monotone_rates", args.out)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    summary = {}
    for name, kw in CASES.items():
        _, _, obj, p0 = problem(**kw)
        t = time.perf_counter()
        tr = run_flow(obj, p0, solver="ralston", stepsize_controller=StabilityStepping(),
                      rtol=3e-5, atol=3e-8, log_t_max=args.log_t_max, saves=51,
                      save_params=True)  # fmt: skip
        wall = time.perf_counter() - t
        tr.save(out / name)
        verdicts = check_run(tr, obj)
        (out / name / "checks.json").write_text(checks_json(verdicts))
        summary[name] = dict(wall_s=wall, verdicts={v.name: v.passed for v in verdicts},
                             summaries={v.name: v.summary for v in verdicts})  # fmt: skip
        print(f"{name}: {tr.status}, {wall:.0f} s")
        for v in verdicts:
            print(f"  {v}")
        lt, L = tr["log_t"], obj.order
        keep = np.isfinite(lt) & (lt > 1)
        axes[0].plot(lt[keep], tr["smoothed_margin"][keep], label=name)
        axes[1].plot(lt[keep], L * np.log(tr["rho"][keep]) - np.log(lt[keep]), label=name)
        r2 = tr["log_loss"][keep] + lt[keep] + (2 - 2 / L) * np.log(lt[keep])
        axes[2].plot(lt[keep], r2, label=name)
    axes[0].set_title(r"smoothed margin $\tilde\gamma$")
    axes[1].set_title(r"$\log(\rho^L / \log t)$")
    axes[2].set_title(r"$\log(Loss\, t\, (\log t)^{2-2/L})$")
    for ax in axes:
        ax.set_xlabel("log t")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig_path = save_experiment_figure(fig, "monotone_rates.png")
    write_json(out / "summary.json", summary)
    print(f"-> {out}, {fig_path}")


if __name__ == "__main__":
    main()
