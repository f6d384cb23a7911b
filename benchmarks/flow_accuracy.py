"""The flow's error at every save point, for every stepping candidate (one run, one machine).

Integrates the gradient flow of one problem on the loss clock to ``--log-t-max`` with
``gflow run``'s save points (50, evenly spaced in log t from 0), first with three tight
references whose mutual differences show their own error (Tsit5 at rtol 1e-6 all along;
the midpoint method at 0.02 and 0.01 of its stability edge after a Tsit5 rtol-1e-6 warm-up), then
with each candidate. For each run it reports gradient evaluations, wall time, the
normalized margin's worst error over **all** save points against each reference
(relative to the margin's scale, max |gamma_bar| along the reference) and where it is,
the error at the end, and the largest invariant drifts (``gflow.invariants``), which need
no reference, with the flow fidelity verdict.

    python benchmarks/flow_accuracy.py                  # default problem, log t = 30
    python benchmarks/flow_accuracy.py --quick          # log t = 5, fewer runs
"""

from __future__ import annotations

import time

import numpy as np
from common import write_result  # same folder
from flow_diagnose import build, problem_parser

from gflow.dynamics import run_flow
from gflow.theory import fidelity

# the references integrate every parameter (no reduction to the inputs' span): as they
# were before the span, so that both ways of the default are judged against the same runs
REFERENCES = {
    "tsit5 rtol 1e-6": dict(solver="tsit5", rtol=1e-6, atol=1e-9, input_span=False),
    "midpoint cfl 0.02": dict(solver="midpoint", cfl=0.02, rtol=1e-6, atol=1e-9, input_span=False),
    "midpoint cfl 0.01": dict(solver="midpoint", cfl=0.01, rtol=1e-6, atol=1e-9, input_span=False),
}
CANDIDATES = {
    "rk4 cfl 0.9 (former default)": dict(solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7),
    "rk4 cfl 0.45": dict(solver="rk4", cfl=0.45, rtol=1e-4, atol=1e-7),
    "rk4 cfl 0.2": dict(solver="rk4", cfl=0.2, rtol=1e-4, atol=1e-7),
    "tsit5 rtol 1e-4": dict(solver="tsit5", rtol=1e-4, atol=1e-7),
    "midpoint cfl 0.14": dict(solver="midpoint", cfl=0.14, rtol=3e-5, atol=3e-8),
    "ralston cfl 0.14, all parameters (no span)": dict(
        solver="ralston", cfl=0.14, rtol=3e-5, atol=3e-8, input_span=False
    ),
    "ralston cfl 0.14 (default)": dict(solver="ralston", cfl=0.14, rtol=3e-5, atol=3e-8),
}
QUICK = (
    "rk4 cfl 0.9 (former default)",
    "ralston cfl 0.14, all parameters (no span)",
    "ralston cfl 0.14 (default)",
)


def summary(tr, wall: float) -> dict:
    """A run's row: status, wall time, gradient evaluations, the largest invariant drifts
    (``gflow.invariants``, no reference needed), the fidelity verdict, the final margin."""
    return dict(
        status=tr.status, wall_s=wall, grad_evals=int(tr["grad_evals"][-1]),
        balance_drift=float(np.nanmax(tr["balance_drift"])),
        layer_balance_drift=float(np.nanmax(tr["layer_balance_drift"])),
        dissipation_defect=float(np.nanmax(tr["dissipation_defect"])),
        fidelity=fidelity(tr).passed, margin=float(tr["normalized_margin"][-1]),
    )  # fmt: skip


def margin_errors(run, ref) -> dict:
    """Worst and final |gamma_bar - gamma_bar_ref| over the save points both reached,
    relative to the reference margin's scale."""
    a, b = np.asarray(run["normalized_margin"]), np.asarray(ref["normalized_margin"])
    k = min(a.size, b.size)
    err = np.abs(a[:k] - b[:k]) / np.abs(b).max()
    i = int(np.argmax(err))
    return dict(worst=float(err[i]), at_log_t=float(ref["log_t"][i]), end=float(err[k - 1]))


def main():
    ap = problem_parser(__doc__, "log t = 5, two candidates")
    args = ap.parse_args()
    refs, cands = dict(REFERENCES), dict(CANDIDATES)
    if args.quick:
        args.log_t_max = 5.0
        refs = {k: v for k, v in refs.items() if k != "tsit5 rtol 1e-6"}
        cands = {k: cands[k] for k in QUICK}
    obj, p0 = build(args.problem)
    common = dict(clock="loss", log_t_max=args.log_t_max, saves=50)

    def run(kw):
        t = time.perf_counter()
        tr = run_flow(obj, p0, **kw, **common)
        return tr, time.perf_counter() - t

    runs, rows = {}, []
    for name, kw in list(refs.items()) + list(cands.items()):
        tr, wall = run(kw)
        runs[name] = tr
        rows.append(dict(name=name, reference=name in refs, **kw, **summary(tr, wall)))
    for row in rows:
        row["errors"] = {
            r: margin_errors(runs[row["name"]], runs[r]) for r in refs if r != row["name"]
        }
        worst = max(e["worst"] for e in row["errors"].values())
        print(
            f"{row['name']:>28}: {row['grad_evals']:>7} evals {row['wall_s']:6.1f} s  worst "
            f"margin error {worst:.2e}  balance drift {row['balance_drift']:.2e}  "
            f"dissipation {row['dissipation_defect']:.2e}  fidelity {row['fidelity']}"
        )
    out = write_result(
        f"flow_accuracy-{args.problem}" + ("-quick" if args.quick else ""),
        dict(args=vars(args), rows=rows),
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
