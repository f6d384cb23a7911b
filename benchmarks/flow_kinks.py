"""Accuracy per gradient evaluation of the event-driven integrator (``KinkStepping``)
against the chattering solvers, at every save point (one run, one machine).

The reference is ``KinkStepping`` with Tsit5 at rtol 1e-10; its own error shows in its
invariant drifts (per-unit balance, dissipation), which need no reference. Each
candidate reports gradient evaluations, wall time, the normalized margin's worst error
over all save points against the reference (relative to the margin's scale), the largest
per-unit balance drift (relative to rho^2) and the kink counters.

    python benchmarks/flow_kinks.py                 # default problem to log t = 30
    python benchmarks/flow_kinks.py --quick         # log t = 3, three runs
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from common import write_result  # same folder
from flow_accuracy import margin_errors
from flow_diagnose import PROBLEMS, build

from gflow.dynamics import KinkStepping, StabilityStepping, run_flow
from gflow.theory import fidelity

REFERENCE = "kinks tsit5 rtol 1e-10"
RUNS = {
    REFERENCE: dict(solver="tsit5", stepsize_controller=KinkStepping(rtol=1e-10, atol=1e-13)),
    "kinks bosh3 rtol 1e-7": dict(solver="bosh3",
                                  stepsize_controller=KinkStepping(rtol=1e-7, atol=1e-10)),
    "kinks bosh3 rtol 1e-8": dict(solver="bosh3",
                                  stepsize_controller=KinkStepping(rtol=1e-8, atol=1e-11)),
    "kinks bosh3 rtol 1e-9": dict(solver="bosh3",
                                  stepsize_controller=KinkStepping(rtol=1e-9, atol=1e-12)),
    "kinks tsit5 rtol 1e-8": dict(solver="tsit5",
                                  stepsize_controller=KinkStepping(rtol=1e-8, atol=1e-11)),
    "tsit5 rtol 1e-6": dict(solver="tsit5", rtol=1e-6, atol=1e-9),
    "ralston cfl 0.14 (gflow run)": dict(
        solver="ralston", stepsize_controller=StabilityStepping(cfl=0.14), rtol=3e-5, atol=3e-8
    ),
    # RK4's real stability edge is 2.79: cfl 0.36 is a step of 1 / lambda_max
    "rk4 at 1/lambda_max": dict(solver="rk4", cfl=0.36, rtol=1e-4, atol=1e-7),
}  # fmt: skip
QUICK = (REFERENCE, "kinks bosh3 rtol 1e-8", "tsit5 rtol 1e-6")


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="default")
    ap.add_argument("--log-t-max", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true", help="log t = 3, three runs")
    args = ap.parse_args()
    runs_kw = dict(RUNS)
    if args.quick:
        args.log_t_max = 3.0
        runs_kw = {k: RUNS[k] for k in QUICK}
    obj, p0 = build(args.problem)
    common = dict(clock="loss", log_t_max=args.log_t_max, saves=50)
    runs, rows = {}, []
    for name, kw in runs_kw.items():
        t = time.perf_counter()
        tr = run_flow(obj, p0, **kw, **common)
        wall = time.perf_counter() - t
        runs[name] = tr
        kinks = {
            key: float(tr[key][-1])
            for key in ("crossings", "slide_entries", "slide_exits", "sliding", "events")
            if key in tr.columns
        }
        row = dict(
            name=name, status=tr.status, wall_s=wall, grad_evals=int(tr["grad_evals"][-1]),
            balance_drift=float(np.nanmax(tr["balance_drift"])),
            dissipation_defect=float(np.nanmax(tr["dissipation_defect"])),
            fidelity=fidelity(tr).passed, margin=float(tr["normalized_margin"][-1]), **kinks,
        )  # fmt: skip
        if name != REFERENCE:
            row["error"] = margin_errors(tr, runs[REFERENCE])
        rows.append(row)
        err = row.get("error", {}).get("worst", float("nan"))
        print(
            f"{name:>30}: {row['grad_evals']:>7} evals {wall:7.1f} s  worst margin error "
            f"{err:.2e}  balance drift {row['balance_drift']:.2e}  dissipation "
            f"{row['dissipation_defect']:.2e}  events {kinks.get('events', 0):.0f}",
            flush=True,
        )
    out = write_result(
        f"flow_kinks-{args.problem}" + ("-quick" if args.quick else ""),
        dict(args=vars(args), rows=rows),
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
