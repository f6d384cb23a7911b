"""K gradient flows in one vmapped integration (``run_flow_seeds``) against K sequential
``run_flow`` runs: the default problem (300 MNIST digits 0/1, width-50 ReLU MLP,
logistic loss, float64) and ``gflow run``'s flow (loss clock, Tsit5 warm-up at rtol 1e-4,
then RK4 at 0.9 of its stability edge, 50 save points).

Both sides are compiled first (a run to log t = 3, past the switch to stability
stepping), then timed once each, alternating, best of ``--rounds``. Each seed's
evaluation count must be the same on both sides: the vmapped runs take the same steps.

    python benchmarks/flow_seeds.py             # K = 8 to log t = 100: about 6 minutes on 2 cores
    python benchmarks/flow_seeds.py --quick     # K = 3 to log t = 6, a smoke run
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from common import machine, write_result

from gflow import data as D
from gflow.dynamics import run_flow, run_flow_seeds
from gflow.models import build_model, split_params
from gflow.objective import make_objective

jax.config.update("jax_enable_x64", True)

FLOW = dict(clock="loss", solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7, saves=50)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seeds", type=int, default=None, help="K (default 8; 3 with --quick)")
    ap.add_argument("--log-t-max", type=float, default=None, help="default 100; 6 with --quick")
    ap.add_argument("--rounds", type=int, default=None, help="default 2; 1 with --quick")
    args = ap.parse_args()
    k = args.seeds or (3 if args.quick else 8)
    horizon = args.log_t_max or (6.0 if args.quick else 100.0)
    rounds = args.rounds or (1 if args.quick else 2)
    print(machine())

    ds = D.normalize(D.sample(D.keep_classes(D.mnist5k(), (0, 1)), 300, seed=0), "unit")
    obj, _ = make_objective(build_model("mlp", ds.input_shape, 1, width=50), ds, "logistic")
    seeds = list(range(k))
    inits = [split_params(build_model("mlp", ds.input_shape, 1, width=50, seed=s))[1]
             for s in seeds]  # fmt: skip

    def sequential(log_t_max):
        return [run_flow(obj, p, log_t_max=log_t_max, **FLOW) for p in inits]

    def vmapped(log_t_max):
        return run_flow_seeds(obj, inits, seeds=seeds, log_t_max=log_t_max, **FLOW)

    t = {}
    for name, fn in (("sequential", sequential), ("vmapped", vmapped)):
        start = time.perf_counter()
        fn(3.0)
        t[f"{name}_first_s"] = time.perf_counter() - start
    best = {"sequential": np.inf, "vmapped": np.inf}
    for _ in range(rounds):
        for name, fn in (("sequential", sequential), ("vmapped", vmapped)):
            start = time.perf_counter()
            runs = fn(horizon)
            best[name] = min(best[name], time.perf_counter() - start)
            t[name] = runs
    seq, vec = t.pop("sequential"), t.pop("vmapped")
    evals_seq = [int(r["grad_evals"][-1]) for r in seq]
    evals_vec = [int(r["grad_evals"][-1]) for r in vec]
    margin_diff = max(
        abs(float(a["normalized_margin"][-1]) - float(b["normalized_margin"][-1]))
        for a, b in zip(seq, vec, strict=True)
    )
    record = dict(
        seeds=k, log_t_max=horizon, flow=FLOW, rounds=rounds,
        sequential_s=best["sequential"], vmapped_s=best["vmapped"],
        speedup=best["sequential"] / best["vmapped"],
        sequential_first_s=t["sequential_first_s"], vmapped_first_s=t["vmapped_first_s"],
        grad_evals=evals_seq, same_evals=evals_seq == evals_vec,
        max_final_margin_diff=margin_diff, status=[r.status for r in vec],
    )  # fmt: skip
    for key, v in record.items():
        print(f"{key:<24} {v:.4g}" if isinstance(v, float) else f"{key:<24} {v}")
    out = write_result("flow_seeds" + ("-quick" if args.quick else ""), record)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
