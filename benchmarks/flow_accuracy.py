"""Gradient evaluations against accuracy for the flow solvers (one run, one machine).

For one problem and horizon, integrates the gradient flow on the loss clock with a
tight-tolerance reference (Tsit5) and then with each candidate: Tsit5 / Bosh3 / Heun
at several tolerances and fixed-step RK4 at ``c / lambda_max`` (``lambda_max``: top
eigenvalue of the Hessian of log Loss, the largest of those measured along the
reference). Reports gradient evaluations, wall time, and the relative error of the
final parameters and of the final smoothed margin against the reference.

    python benchmarks/flow_accuracy.py --problem default --log-t-max 10
    python benchmarks/flow_accuracy.py --quick
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result  # same folder
from flow_diagnose import PROBLEMS, build
from jax.flatten_util import ravel_pytree

from gflow.dynamics import run_flow
from gflow.spectrum import top_hessian_eigenvalue


def flat(p):
    return np.asarray(ravel_pytree(jax.tree.map(jnp.asarray, p))[0])


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="default")
    ap.add_argument("--log-t-max", type=float, default=10.0)
    ap.add_argument("--ref-rtol", type=float, default=1e-8)
    ap.add_argument("--quick", action="store_true", help="log t = 3, fewer candidates")
    args = ap.parse_args()
    if args.quick:
        args.log_t_max, args.ref_rtol = 3.0, 1e-7
    obj, p0 = build(args.problem)
    common = dict(clock="loss", log_t_max=args.log_t_max, saves=6, save_params=True)

    t = time.perf_counter()
    ref = run_flow(obj, p0, solver="tsit5", rtol=args.ref_rtol, atol=args.ref_rtol * 1e-3, **common)
    ref_s = time.perf_counter() - t
    assert ref.status == "completed", ref.message
    lams = [
        top_hessian_eigenvalue(obj, jax.tree.map(jnp.asarray, s), iters=20, tol=1e-6).value
        for s in ref.snapshots[1:]
    ]
    lam = max(lams)
    theta_ref, margin_ref = flat(ref.final_params), ref["smoothed_margin"][-1]

    cands = [("tsit5", dict(rtol=r, atol=r * 1e-3)) for r in (1e-3, 1e-4, 1e-5, 1e-6)]
    cands += [("bosh3", dict(rtol=r, atol=r * 1e-3)) for r in (1e-3, 1e-4)]
    cands += [("heun", dict(rtol=r, atol=r * 1e-3)) for r in (1e-3, 1e-4)]
    cands += [("rk4", dict(dt=c / lam)) for c in (1.0, 0.25)]
    if args.quick:
        cands = cands[:2] + cands[-2:-1]
    rows = []
    for solver, kw in cands:
        t = time.perf_counter()
        tr = run_flow(obj, p0, solver=solver, **kw, **common)
        wall = time.perf_counter() - t
        th = flat(tr.final_params)
        rows.append(
            dict(
                solver=solver,
                **{k: float(v) for k, v in kw.items()},
                status=tr.status,
                grad_evals=int(tr["grad_evals"][-1]),
                steps=int(tr["solver_steps"][-1]),
                wall_s=wall,
                param_rel_err=float(np.linalg.norm(th - theta_ref) / np.linalg.norm(theta_ref)),
                margin_rel_err=float(abs(tr["smoothed_margin"][-1] - margin_ref) / abs(margin_ref)),
            )
        )
        r = rows[-1]
        setting = f"rtol {kw['rtol']:g}" if "rtol" in kw else f"dt {kw['dt']:.3g}"
        print(
            f"{solver:>6} {setting:>14}: {r['grad_evals']:>8} evals {wall:7.1f} s  "
            f"params {r['param_rel_err']:.2e}  margin {r['margin_rel_err']:.2e}  {tr.status}"
        )
    print(
        f"reference tsit5 rtol {args.ref_rtol:g}: {int(ref['grad_evals'][-1])} evals, "
        f"{ref_s:.1f} s; lambda_max along it: {', '.join(f'{v:.3g}' for v in lams)}"
    )
    out = write_result(
        f"flow_accuracy-{args.problem}",
        dict(
            args=vars(args),
            reference=dict(grad_evals=int(ref["grad_evals"][-1]), wall_s=ref_s),
            lambda_max=lams,
            rows=rows,
        ),
    )
    print(f"-> {out}")


if __name__ == "__main__":
    main()
