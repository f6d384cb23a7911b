"""Does the flow's error estimate bound its error? (issue 31; one run, one machine).

Integrates one problem's gradient flow to ``--log-t-max`` with ``gflow run``'s save
points (50, evenly spaced in log t from 0): first a tight reference through the kinks
event by event (``KinkStepping``, Bogacki-Shampine at rtol 1e-9: 6.3e-9 of the margin's
scale from Tsit5 at 1e-10 on the default problem, ``benchmarks/RESULTS.md``), then the
default stepping at several cfl, each with its error estimate (a shadow run at twice the
steps, ``gflow.dynamics.driver``). For each it reports, at every save point, the true
error's envelope (the largest so far) against the reference, for the normalized margin
(relative to its scale) and the parameters (relative to rho), the estimate's, and their
ratio's range; the run's and the shadow's gradient evaluations; the fidelity verdict.

    python benchmarks/flow_estimate.py                 # default problem, log t = 30
    python benchmarks/flow_estimate.py --quick         # log t = 5
    python benchmarks/flow_estimate.py --reference DIR # the reference kept in DIR (made
                                                       # there the first time)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from common import write_result  # same folder
from flow_diagnose import build, problem_parser
from jax.flatten_util import ravel_pytree

from gflow.dynamics import KinkStepping, StabilityStepping, run_flow
from gflow.theory import fidelity
from gflow.trajectory import Trajectory

REFERENCE = dict(solver="bosh3", stepsize_controller=KinkStepping(rtol=1e-9, atol=1e-12))
CANDIDATES = {
    "ralston, cfl from the estimate (gflow run)": dict(
        solver="ralston", stepsize_controller=StabilityStepping()
    ),
    "ralston cfl 0.14 (before)": dict(solver="ralston",
                                      stepsize_controller=StabilityStepping(cfl=0.14)),
    "ralston cfl 0.07": dict(solver="ralston", stepsize_controller=StabilityStepping(cfl=0.07)),
    "ralston cfl 0.035": dict(solver="ralston",
                              stepsize_controller=StabilityStepping(cfl=0.035)),
    "rk4 cfl 0.9 (former default)": dict(
        solver="rk4", stepsize_controller=StabilityStepping(cfl=0.9, rtol=1e-4, atol=1e-7)
    ),
}


def envelopes(tr, ref) -> dict:
    """The true errors' and the estimates' envelopes at every save point both reached."""
    k = min(len(tr), len(ref))
    scale = float(np.abs(ref["normalized_margin"]).max())
    margin = np.abs(tr["normalized_margin"][:k] - ref["normalized_margin"][:k]) / scale
    params = np.array([np.linalg.norm(ravel_pytree(a)[0] - ravel_pytree(b)[0]) / rho
                       for a, b, rho in zip(tr.snapshots[:k], ref.snapshots[:k],
                                            ref["rho"][:k], strict=True)])  # fmt: skip
    out = {}
    for name, true, est in (("margin", margin, tr["margin_error"][:k] / scale),
                            ("params", params, tr["param_error"][:k])):  # fmt: skip
        true = np.maximum.accumulate(true)
        seen = true > 1e3 * np.finfo(np.float64).eps
        ratio = est[seen] / true[seen]
        out[name] = dict(true=float(true.max()), estimate=float(np.max(est)),
                         ratio_min=float(ratio.min()), ratio_max=float(ratio.max()))  # fmt: skip
    return out


def _reference(obj, p0, common, folder):
    """The reference run, or the one kept in ``folder`` (made there if absent)."""
    if folder is not None and Path(folder, "config.json").exists():
        ref = Trajectory.load(folder)
        if ref.config["log_t_max"] == common["log_t_max"]:
            print(f"reference: kept in {folder}")
            return ref
    t = time.perf_counter()
    ref = run_flow(obj, p0, **REFERENCE, **common)
    print(f"reference: {ref['grad_evals'][-1]:.0f} evals, {time.perf_counter() - t:.0f} s")
    if folder is not None:
        ref.save(folder)
    return ref


def main():
    ap = problem_parser(__doc__, "log t = 5")
    ap.add_argument("--reference", default=None,
                    help="a folder to keep the reference in (read from it when there)")
    args = ap.parse_args()
    if args.quick:
        args.log_t_max = 5.0
    obj, p0 = build(args.problem)
    common = dict(log_t_max=args.log_t_max, saves=50, save_params=True)
    ref = _reference(obj, p0, common, args.reference)
    rows = []
    for name, kw in CANDIDATES.items():
        t = time.perf_counter()
        tr = run_flow(obj, p0, **kw, **common)
        wall = time.perf_counter() - t
        kw = {k: (v._asdict() if k == "stepsize_controller" else v) for k, v in kw.items()}
        row = dict(name=name, **kw, status=tr.status, wall_s=wall,
                   grad_evals=int(tr["grad_evals"][-1]),
                   shadow_evals=int(tr["shadow_evals"][-1]),
                   fidelity=fidelity(tr).outcome, **envelopes(tr, ref))  # fmt: skip
        rows.append(row)
        m, p = row["margin"], row["params"]
        print(f"{name:>30}: {row['grad_evals']:>6} + {row['shadow_evals']:>6} evals "
              f"{wall:5.1f} s | margin true {m['true']:.2e} est {m['estimate']:.2e} "
              f"ratio {m['ratio_min']:.2f}-{m['ratio_max']:.2f} | params true "
              f"{p['true']:.2e} est {p['estimate']:.2e} ratio {p['ratio_min']:.2f}-"
              f"{p['ratio_max']:.2f} | fidelity {row['fidelity']}")  # fmt: skip
    out = write_result(f"flow_estimate-{args.problem}" + ("-quick" if args.quick else ""),
                       dict(args=vars(args), rows=rows))  # fmt: skip
    print(f"-> {out}")


if __name__ == "__main__":
    main()
