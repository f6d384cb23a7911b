"""The default flow stepping with its cfl chosen from the error estimate, on three
problems (issue 31; one machine, one process, runs side by side):

* ``default``: ``gflow run``'s (300 unit-norm MNIST 0/1, width-50 ReLU MLP, logistic),
  to log t = 30;
* ``wide``: 1,000 raw-pixel MNIST 0/1, width 100, exponential loss, to log t = 30, where
  kinks are dense;
* ``linear``: a linear model on sklearn's digits 0/1 (300 unit-norm), exponential loss,
  to log t = 1000: a smooth field (``gflow run --model linear --data digits --classes 0,1
  --loss exp --dynamics flow --log-t-max 1000``).

For each: the default (``StabilityStepping()``: Tsit5 warm-up at rtol 3e-5, then Ralston,
or RKC with 10 stages on the smooth linear field, with the cfl held to the accuracy 2e-4
by the estimate), the same at a quarter of its tolerances (accuracy 5e-5, warm-up rtol
7.5e-6), and Ralston at the fixed cfl 0.14 of before (on ``linear`` also Ralston with the
cfl from the estimate).
Each row: gradient evaluations (and the shadow's), flow wall time, the estimate's worst
value relative to the margin's scale, the difference to the quarter-tolerance run at
every save point (its envelope) and the smallest ratio estimate / difference there, the
cfl's range, what bound the stable steps, and the fidelity verdict. On ``linear`` also a
tight Tsit5 reference (rtol 1e-10; each run's true worst error against it) and plain
Tsit5 at rtol 1e-7, timed in the same process.

    python benchmarks/flow_control.py                       # all three
    python benchmarks/flow_control.py --problem linear      # one
    python benchmarks/flow_control.py --quick               # shorter horizons
"""

from __future__ import annotations

import argparse
import time
import warnings

import diffrax
import numpy as np
from common import write_result  # same folder
from flow_diagnose import build

from gflow.dynamics import StabilityStepping, run_flow
from gflow.dynamics.driver import BOUNDS
from gflow.dynamics.solvers import DEFAULT_ACCURACY, DEFAULT_TOL
from gflow.problem import Problem
from gflow.theory import fidelity

HORIZON = {"default": 30.0, "wide": 30.0, "linear": 1000.0}
QUARTER = dict(
    stepsize_controller=StabilityStepping(rtol=DEFAULT_TOL[0] / 4, atol=DEFAULT_TOL[1] / 4),
    accuracy=DEFAULT_ACCURACY / 4,
)
RUNS = {
    "cfl from the estimate (gflow run)": dict(stepsize_controller=StabilityStepping()),
    "the same at a quarter of its tolerances": QUARTER,
    "ralston, cfl from the estimate": dict(solver="ralston",
                                           stepsize_controller=StabilityStepping()),
    "ralston, cfl 0.14 all along (before)": dict(
        solver="ralston", stepsize_controller=StabilityStepping(cfl=0.14)
    ),
}
# gflow run's solver is Ralston but on a smooth field (RKC with 10 stages): the Ralston
# row repeats it elsewhere
ONLY = {"ralston, cfl from the estimate": ("linear",)}


def _problem(name: str):
    if name == "linear":
        return Problem(data="digits", model="linear", loss="exp").build()[2:]
    return build(name)


def _timed(obj, p0, **kw):
    t = time.perf_counter()
    tr = run_flow(obj, p0, **kw)
    return tr, time.perf_counter() - t


def _worst(tr, other, scale) -> np.ndarray:
    k = min(len(tr), len(other))
    return np.abs(tr["normalized_margin"][:k] - other["normalized_margin"][:k]) / scale


def _row(name, tr, wall, quarter, ref) -> dict:
    scale = float(np.abs(quarter["normalized_margin"]).max())
    est = np.asarray(tr["margin_error"]) / np.abs(tr["normalized_margin"]).max()
    diff = np.maximum.accumulate(_worst(tr, quarter, scale))
    seen = diff > 1e3 * np.finfo(np.float64).eps
    k = min(len(est), len(diff))
    ratio = est[:k][seen[:k]] / diff[:k][seen[:k]]
    row = dict(
        name=name, status=tr.status, grad_evals=int(tr["grad_evals"][-1]),
        shadow_evals=int(tr["shadow_evals"][-1]), wall_s=wall, estimate=float(est.max()),
        diff_quarter=float(diff.max()), ratio_min=float(ratio.min()) if ratio.size else None,
        cfl_min=float(np.min(tr["cfl"])), cfl_max=float(np.max(tr["cfl"])),
        steps={b: int(tr[f"steps_{b}"][-1]) for b in BOUNDS}, redone=int(tr["redone"][-1]),
        fidelity=fidelity(tr).outcome,
    )  # fmt: skip
    if ref is not None:
        row["true"] = float(_worst(tr, ref, float(np.abs(ref["normalized_margin"]).max())).max())
    return row


def run_problem(name: str, log_t_max: float) -> dict:
    obj, p0 = _problem(name)
    common = dict(log_t_max=log_t_max, saves=50)
    ref = None
    extra = []
    if name == "linear":
        tight = diffrax.PIDController(rtol=1e-10, atol=1e-13)
        ref, wall = _timed(obj, p0, solver="tsit5", stepsize_controller=tight,
                           error_estimate=False, **common)  # fmt: skip
        extra.append(dict(name="tsit5 rtol 1e-10 (reference)",
                          grad_evals=int(ref["grad_evals"][-1]), wall_s=wall))  # fmt: skip
    got = {label: _timed(obj, p0, **kw, **common) for label, kw in RUNS.items()
           if name in ONLY.get(label, (name,))}  # fmt: skip
    quarter = got["the same at a quarter of its tolerances"][0]
    rows = [_row(label, tr, wall, quarter, ref) for label, (tr, wall) in got.items()]
    if name == "linear":
        plain = diffrax.PIDController(rtol=1e-7, atol=1e-10)
        for err in (True, False):
            tr, wall = _timed(obj, p0, solver="tsit5", error_estimate=err, **common,
                              stepsize_controller=plain)  # fmt: skip
            extra.append(dict(
                name="tsit5 rtol 1e-7" + ("" if err else ", no estimate"),
                grad_evals=int(tr["grad_evals"][-1]), wall_s=wall,
                true=float(_worst(tr, ref, float(np.abs(ref["normalized_margin"]).max())).max()),
            ))  # fmt: skip
    for r in rows + extra:
        print(f"{name:>8} {r['name']:>58}: {r['grad_evals']:>7} evals {r['wall_s']:6.1f} s "
              + " ".join(f"{k} {r[k]:.2e}" for k in ("estimate", "diff_quarter", "true")
                         if r.get(k) is not None)
              + (f" ratio {r['ratio_min']:.2f}" if r.get("ratio_min") else "")
              + (f" cfl {r['cfl_min']:.3f}-{r['cfl_max']:.3f} redone {r['redone']} "
                 f"{r['fidelity']}" if "cfl_min" in r else ""))  # fmt: skip
    return dict(problem=name, log_t_max=log_t_max, rows=rows, others=extra)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--problem", choices=sorted(HORIZON), action="append")
    ap.add_argument("--quick", action="store_true", help="log t 5 (linear: 100)")
    args = ap.parse_args()
    warnings.simplefilter("error", FutureWarning)  # the objects only
    out = []
    for name in args.problem or ["default", "linear", "wide"]:
        horizon = (100.0 if name == "linear" else 5.0) if args.quick else HORIZON[name]
        out.append(run_problem(name, horizon))
    path = write_result("flow_control" + ("-quick" if args.quick else ""),
                        dict(args=vars(args), problems=out))  # fmt: skip
    print(f"-> {path}")


if __name__ == "__main__":
    main()
