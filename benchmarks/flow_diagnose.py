"""What limits the gradient-flow solver's step? (issue: a faster flow integrator)

Drives diffrax's solver and PID controller by hand, one attempted step at a time, on the
loss clock (d theta / d tau = -grad log Loss), and records per attempt: the step size,
whether it was kept, and the number of ReLU sign changes (sample, unit) between the
step's start and its candidate end; every ``--eig-every`` accepted steps also the top
eigenvalue of the Hessian of log Loss (Lanczos), so ``h * lambda_max`` can be compared
with the solver's stability edge (about 3.5 for Tsit5).

    python benchmarks/flow_diagnose.py --problem default --log-t-max 30
    python benchmarks/flow_diagnose.py --problem wide --log-t-max 3

Problems: ``default`` (gflow run's: 300 unit-norm MNIST 0/1, width 50, logistic) and
``wide`` (1,000 raw-pixel MNIST 0/1, width 100, exponential loss). Prints a table per
phase (before the loss threshold, after it, and the second half of the run) and writes
``benchmarks/results/flow_diagnose-<problem>.json``.
"""

from __future__ import annotations

import argparse
import math
import time

import diffrax
import equinox as eqx
import jax.numpy as jnp
import numpy as np
from common import write_result  # same folder
from flax import nnx

import gflow  # noqa: F401
from gflow import data as D
from gflow.dynamics.flow import log_t_of_log1p, make_solver, vector_field
from gflow.models import build_model
from gflow.objective import make_objective
from gflow.spectrum import top_hessian_eigenvalue

PROBLEMS = {
    "default": dict(n=300, width=50, scale="unit", loss="logistic"),
    "wide": dict(n=1000, width=100, scale="none", loss="exp"),
}


def problem_parser(doc: str, quick: str) -> argparse.ArgumentParser:
    """The flow benchmarks' command line: ``--problem``, ``--log-t-max`` (30) and
    ``--quick`` (its help: ``quick``)."""
    ap = argparse.ArgumentParser(
        description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="default")
    ap.add_argument("--log-t-max", type=float, default=30.0)
    ap.add_argument("--quick", action="store_true", help=quick)
    return ap


def build(problem: str, seed: int = 0):
    cfg = PROBLEMS[problem]
    ds = D.keep_classes(D.mnist5k(), (0, 1))
    ds = D.normalize(D.sample(ds, cfg["n"], seed=seed), cfg["scale"])
    model = build_model("mlp", ds.input_shape, 1, width=cfg["width"], seed=seed)
    obj, p0 = make_objective(model, ds, cfg["loss"])
    return obj, p0


def diagnose(
    obj,
    p0,
    *,
    solver="tsit5",
    rtol=1e-5,
    atol=1e-8,
    log_t_max=10.0,
    eig_every=50,
    max_attempts=200_000,
):
    solver_ = make_solver(solver)
    field = vector_field("loss")
    term = diffrax.ODETerm(field)
    ctrl = diffrax.PIDController(rtol=rtol, atol=atol)
    order = solver_.order(term)

    def signs(theta):
        model = nnx.merge(obj.graphdef, theta)
        return [a > 0 for a in model.preactivations(obj.x)]

    @eqx.filter_jit
    def attempt(obj, y0, t0, t1, sstate, cstate):
        y1, yerr, _, sstate1, _ = solver_.step(term, t0, t1, y0, obj, sstate, False)
        keep, nt0, nt1, _, cstate1, _ = ctrl.adapt_step_size(
            t0, t1, y0, y1, obj, yerr, order, cstate
        )
        mask = jnp.concatenate(
            [(a != b).ravel() for a, b in zip(signs(y0[0]), signs(y1[0]), strict=True)]
        )
        return keep, nt0, nt1, y1, sstate1, cstate1, mask

    y = (p0, jnp.asarray(0.0, obj.dtype), jnp.asarray(0.0, obj.dtype))  # theta, z, D
    t0 = jnp.asarray(0.0, obj.dtype)
    t1, cstate = ctrl.init(term, t0, t0 + 1.0, y, None, obj, solver_.func, order)
    sstate = solver_.init(term, t0, t1, y, obj)
    rows, eig_rows, flip_counts = [], [], None
    pair_rows = []  # per accepted step: (log t, flips of pairs that had flipped before)
    accepted, attempts = 0, 0
    start = time.perf_counter()
    while attempts < max_attempts:
        keep, nt0, nt1, y1, ss1, cstate, mask = attempt(obj, y, t0, t1, sstate, cstate)
        attempts += 1
        mask = np.asarray(mask)
        flips = int(mask.sum())
        if flip_counts is None:
            flip_counts = np.zeros(mask.size, np.int64)
        h = float(t1 - t0)
        keep = bool(keep)
        log_t = log_t_of_log1p(float((y1 if keep else y)[1]))
        rows.append((h, keep, int(flips), log_t, float(obj.log_loss((y1 if keep else y)[0]))))
        if keep:
            y, sstate = y1, ss1
            accepted += 1
            pair_rows.append((log_t, int((flip_counts[mask] > 0).sum())))
            flip_counts += mask
            if accepted % eig_every == 1:
                e = top_hessian_eigenvalue(obj, y[0], iters=20, tol=1e-6)
                eig_rows.append((accepted, log_t, h, e.value))
            if log_t >= log_t_max:
                break
        t0, t1 = nt0, nt1
    return dict(
        rows=rows,
        eigs=eig_rows,
        seconds=time.perf_counter() - start,
        accepted=accepted,
        attempts=attempts,
        pair_rows=pair_rows,
        pairs=int(flip_counts.size),
        pairs_flipped=int((flip_counts > 0).sum()),
        max_flips_one_pair=int(flip_counts.max()),
        total_flips=int(flip_counts.sum()),
    )


def summarize(res, log_threshold: float, log_t_max: float):
    r = np.array([(h, k, f, lt, ll) for h, k, f, lt, ll in res["rows"]], dtype=float)
    h, keep, flips, log_t, log_loss = r.T
    keep = keep.astype(bool)
    past = np.nonzero(log_loss < log_threshold)[0]
    i_thr = past[0] if past.size else len(r)
    half = np.searchsorted(np.maximum.accumulate(log_t), log_t_max / 2)
    phases = {
        "early fit": slice(0, i_thr),
        "after threshold": slice(i_thr, max(i_thr, half)),
        "late (2nd half)": slice(max(i_thr, half), len(r)),
    }
    eigs = np.array(res["eigs"]) if res["eigs"] else np.zeros((0, 4))
    out = {}
    for name, sl in phases.items():
        k, f, hh, lt = keep[sl], flips[sl], h[sl], log_t[sl]
        if not k.size:
            continue
        span = (
            (lt[k].max() - lt[k].min())
            if k.sum() > 1 and np.isfinite(lt[k]).all()
            else float("nan")
        )
        lo, hi = (lt[0], lt[-1])
        in_phase = (eigs[:, 1] >= lo) & (eigs[:, 1] <= hi) if eigs.size else np.zeros(0, bool)
        hl = eigs[in_phase, 2] * eigs[in_phase, 3] if eigs.size else np.zeros(0)
        out[name] = dict(
            attempts=int(k.size),
            accepted=int(k.sum()),
            rejected_fraction=float(1 - k.mean()),
            log_t_span=float(span),
            steps_per_unit_log_t=float(k.sum() / span) if span and span > 0 else float("nan"),
            median_h=float(np.median(hh[k])) if k.any() else float("nan"),
            median_h_lambda=float(np.median(hl)) if hl.size else float("nan"),
            max_h_lambda=float(np.max(hl)) if hl.size else float("nan"),
            accepted_with_sign_change=float((f[k] > 0).mean()) if k.any() else float("nan"),
            rejected_with_sign_change=float((f[~k] > 0).mean()) if (~k).any() else float("nan"),
            mean_sign_changes_per_accepted=float(f[k].mean()) if k.any() else float("nan"),
        )
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="default")
    ap.add_argument("--solver", default="tsit5")
    ap.add_argument("--rtol", type=float, default=1e-5)
    ap.add_argument("--atol", type=float, default=1e-8)
    ap.add_argument("--log-t-max", type=float, default=10.0)
    ap.add_argument("--eig-every", type=int, default=50)
    ap.add_argument("--max-attempts", type=int, default=200_000)
    args = ap.parse_args()
    obj, p0 = build(args.problem)
    res = diagnose(
        obj,
        p0,
        solver=args.solver,
        rtol=args.rtol,
        atol=args.atol,
        log_t_max=args.log_t_max,
        eig_every=args.eig_every,
        max_attempts=args.max_attempts,
    )
    summary = summarize(res, obj.loss.log_threshold, args.log_t_max)
    print(
        f"problem {args.problem}, {args.solver}, rtol {args.rtol}, loss clock: "
        f"{res['accepted']} accepted / {res['attempts']} attempts in {res['seconds']:.1f} s"
    )
    cols = list(next(iter(summary.values())).keys())
    print(
        f"(sample, unit) pairs: {res['pairs']}, of which flipped at least once: "
        f"{res['pairs_flipped']}; flips in accepted steps: {res['total_flips']}; "
        f"most flips of one pair: {res['max_flips_one_pair']}"
    )
    pr = np.array(res["pair_rows"])
    late = pr[:, 0] >= args.log_t_max / 2
    print(
        f"second half: {pr[late, 1].sum()} of the flips are repeats of a pair that had "
        "flipped before"
    )
    print(f"{'phase':<18}" + "".join(f"{c[:14]:>16}" for c in cols))
    for name, row in summary.items():
        print(f"{name:<18}" + "".join(f"{row[c]:>16.4g}" for c in cols))
    out = write_result(
        f"flow_diagnose-{args.problem}",
        dict(
            args=vars(args),
            summary=summary,
            eigs=res["eigs"],
            accepted=res["accepted"],
            attempts=res["attempts"],
            seconds=res["seconds"],
            pairs=res["pairs"],
            pairs_flipped=res["pairs_flipped"],
            total_flips=res["total_flips"],
            max_flips_one_pair=res["max_flips_one_pair"],
            repeat_flips_second_half=int(pr[late, 1].sum()),
        ),
    )
    print(f"-> {out}")
    if not math.isfinite(res["rows"][-1][3]):
        raise SystemExit("diagnosis ended before t > 0")


if __name__ == "__main__":
    main()
