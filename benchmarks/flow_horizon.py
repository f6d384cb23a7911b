"""Gradient evaluations and wall time to a long horizon, at equal accuracy (one run, one machine).

Integrates the gradient flow of one problem up to ``--log-t-max``, on the loss clock and on
any other clocks of ``--clocks`` (time: ``d theta / dt = -grad Loss``), with

- diffrax Tsit5 at several tolerances (``atol = rtol * 1e-3``);
- fixed-step RK4 at ``dt = 1 / lambda_max`` (the public codes' choice; ``lambda_max``: the
  largest top Hessian eigenvalue of log Loss met along the reference, by Lanczos);
- gflow's stability stepping (``run_flow(..., cfl=...)``): adaptive Tsit5 until the loss
  threshold, then RKC / RK4 at a fraction of their stability edge over ``lambda_max(t)``;

and compares each final state with a reference: RK4 at a fixed step of
``1 / (16 lambda_early)`` up to ``log t = --switch``, then RK4 at ``h * lambda_max(t) =
0.07``. The reference is repeated at half the steps and the difference between the two
is printed: it bounds the reference's own error. The reference is cached under
``benchmarks/.cache``. Wall times are of a second run: the first, to log t = 1, compiles
the jitted solvers, which gflow caches per configuration.

    python benchmarks/flow_horizon.py --problem default --log-t-max 100
    python benchmarks/flow_horizon.py --problem wide --log-t-max 100 --no-ref --tsit5 1e-4,1e-3
    python benchmarks/flow_horizon.py --problem wide --log-t-max 1000 --only-ours
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from common import write_result  # same folder
from flow_diagnose import PROBLEMS, build
from jax.flatten_util import ravel_pytree

from gflow.dynamics import run_flow
from gflow.spectrum import top_hessian_eigenvalue

CACHE = Path(__file__).parent / ".cache"

OURS = [
    ("rkc10", dict(cfl=0.5, rtol=1e-3)),
    ("rkc10", dict(cfl=0.25, rtol=1e-4)),
    ("rkc5", dict(cfl=0.5, rtol=1e-4)),
    ("rk4", dict(cfl=0.9, rtol=1e-4)),
    ("rk4", dict(cfl=0.36, rtol=1e-5)),
]


def flat(p):
    return np.asarray(ravel_pytree(jax.tree.map(jnp.asarray, p))[0])


def lam(obj, params) -> float:
    return top_hessian_eigenvalue(obj, jax.tree.map(jnp.asarray, params), iters=30, tol=1e-6).value


def reference(obj, p0, log_t_max, switch, lam_early, refine):
    """Two-phase RK4 reference; ``refine`` divides both steps."""
    kw = dict(clock="loss", saves=4, save_params=True)
    a = run_flow(obj, p0, solver="rk4", dt=1 / (16 * refine * lam_early), log_t_max=switch, **kw)
    b = run_flow(
        obj, a.final_params, solver="rk4", cfl=0.025 / refine, log_t0=switch,
        log_t_max=log_t_max, **kw,
    )  # fmt: skip
    assert a.status == b.status == "completed", (a.message, b.message)
    lams = [lam(obj, s) for s in a.snapshots[1:] + b.snapshots[1:]]
    evals = int(a["grad_evals"][-1] + b["grad_evals"][-1])
    return flat(b.final_params), float(b["smoothed_margin"][-1]), max(lams), evals


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="default")
    ap.add_argument("--log-t-max", type=float, default=100.0)
    ap.add_argument("--switch", type=float, default=3.0, help="reference's phase switch, log t")
    ap.add_argument("--only-ours", action="store_true", help="no reference, no baselines")
    ap.add_argument(
        "--no-ref",
        action="store_true",
        help="no reference (too costly on big problems): Tsit5 baselines and ours only",
    )
    ap.add_argument("--tsit5", default="1e-3,1e-4,1e-5", help="Tsit5 rtols of the baselines")
    ap.add_argument("--quick", action="store_true", help="fewer candidates")
    ap.add_argument("--smoke", action="store_true", help="a smoke run: write *-quick.json")
    ap.add_argument(
        "--clocks",
        default="loss",
        help="clocks to run every candidate on, comma separated: loss, time, logt (the "
        "reference is on the loss clock; all three follow the same path)",
    )
    ap.add_argument(
        "--ours",
        default=None,
        help="candidates of ours as SOLVER:CFL:RTOL,... (default: the built-in list)",
    )
    args = ap.parse_args()
    obj, p0 = build(args.problem)
    common = dict(log_t_max=args.log_t_max, saves=26)

    ref = None
    if not (args.only_ours or args.no_ref):
        CACHE.mkdir(exist_ok=True)
        path = CACHE / f"flow_horizon-{args.problem}-{args.log_t_max:g}.npz"
        if path.exists():
            z = np.load(path)
            ref = {k: z[k] for k in z.files}
        else:
            probe = run_flow(obj, p0, rtol=1e-3, atol=1e-6, clock="loss", saves=4,
                             log_t_max=args.switch, save_params=True)  # fmt: skip
            lam_early = max(lam(obj, s) for s in probe.snapshots)
            t = time.perf_counter()
            th1, m1, lam_max, ev1 = reference(obj, p0, args.log_t_max, args.switch, lam_early, 1)
            wall1 = time.perf_counter() - t
            th2, m2, _, ev2 = reference(obj, p0, args.log_t_max, args.switch, lam_early, 2)
            ref = dict(
                theta=th2, margin=m2, lam_max=lam_max, lam_early=lam_early,
                evals=[ev1, ev2], wall=wall1,
                self_param=np.linalg.norm(th1 - th2) / np.linalg.norm(th2),
                self_margin=abs(m1 - m2) / abs(m2),
            )  # fmt: skip
            np.savez(path, **ref)
        print(
            f"reference: RK4, {int(ref['evals'][1])} evals; halving its steps changes the "
            f"parameters by {float(ref['self_param']):.1e} and the margin by "
            f"{float(ref['self_margin']):.1e}; lambda_max along it {float(ref['lam_max']):.4g}"
        )

    cands = list(OURS)
    if args.ours:
        cands = []
        for spec in args.ours.split(","):
            solver, cfl, rtol = spec.split(":")
            cands.append((solver, dict(cfl=float(cfl), rtol=float(rtol))))
    tsit5 = [("tsit5", dict(rtol=float(r))) for r in args.tsit5.split(",")]
    if args.no_ref:
        cands = tsit5 + cands
    elif not args.only_ours:
        cands = tsit5 + [("rk4", dict(dt=1 / float(ref["lam_max"])))] + cands
    if args.quick:
        cands = cands[:1] + cands[-5:-3]
    # a fixed step in t cannot reach t = e^100: the fixed-step baseline runs on the others
    cands = [
        (s, dict(kw, clock=c))
        for c in args.clocks.split(",")
        for s, kw in cands
        if not (c == "time" and "dt" in kw)
    ]
    rows = []
    for solver, kw in cands:
        kw = dict(kw)
        if "rtol" in kw:
            kw["atol"] = kw["rtol"] * 1e-3
        # compile first (jitted solvers are cached per configuration), then time the run
        t = time.perf_counter()
        run_flow(obj, p0, solver=solver, **kw, **{**common, "log_t_max": 1.0})
        compile_s = time.perf_counter() - t
        t = time.perf_counter()
        tr = run_flow(obj, p0, solver=solver, **kw, **common)
        wall = time.perf_counter() - t
        r = dict(solver=solver, **kw, status=tr.status, wall_s=wall, warmup_s=compile_s,
                 grad_evals=int(tr["grad_evals"][-1]), steps=int(tr["solver_steps"][-1]),
                 log_t=float(tr["log_t"][-1]), margin=float(tr["smoothed_margin"][-1]))  # fmt: skip
        past = np.nonzero(tr["log_loss"] < obj.loss.log_threshold)[0]
        m = tr["smoothed_margin"][past[0] :] if past.size else np.array([])
        r["margin_drops"] = int(np.sum(np.diff(m) < 0))
        if ref is not None:
            th = flat(tr.final_params)
            scale = np.linalg.norm(ref["theta"])
            r["param_rel_err"] = float(np.linalg.norm(th - ref["theta"]) / scale)
            r["margin_rel_err"] = float(abs(r["margin"] - ref["margin"]) / abs(ref["margin"]))
        rows.append(r)
        setting = ", ".join(
            f"{k} {v:.3g}" if k != "clock" else f"{v} clock" for k, v in kw.items() if k != "atol"
        )
        errs = (
            f"params {r['param_rel_err']:.1e}  margin {r['margin_rel_err']:.1e}"
            if ref is not None else f"margin {r['margin']:.8g}"
        )  # fmt: skip
        print(
            f"{solver:>6} {setting:>36}: {r['grad_evals']:>8} evals {wall:8.1f} s  {errs}  "
            f"drops {r['margin_drops']}  {tr.status} {tr.message}",
            flush=True,
        )
    out = write_result(
        f"flow_horizon-{args.problem}-{args.log_t_max:g}" + ("-quick" if args.smoke else ""),
        dict(
            args=vars(args),
            reference=None if ref is None else {
                k: (np.asarray(v).tolist() if k != "theta" else None) for k, v in ref.items()
            },
            rows=rows,
        ),
    )  # fmt: skip
    print(f"-> {out}")


if __name__ == "__main__":
    main()
