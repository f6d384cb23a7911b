"""Every CPU benchmark in one command: each script runs in its own process, prints its table
and appends its machine-tagged results to ``benchmarks/results/<name>.json``.

    python benchmarks/run.py --quick     # a smoke run of everything, about 3 minutes
    python benchmarks/run.py             # the full run behind RESULTS.md (30-45 minutes on 2 cores)
    python benchmarks/run.py --only gd_step,kernels

Sections (RESULTS.md has one part for each):

  gd_step   a. one GD step, paper CNN and default MLP, float32 / float64, against PyTorch
  flow      b. evaluations and wall time to log t = 100 (loss and time clocks) and 1,000
               (loss and log t clocks: t = e^1000 overflows the time clock),
               Tsit5, fixed-step RK4 and stability stepping, against a tight reference
  kernels   c-e. quantities at N = 5,000, the KKT residual on the paper CNN (time, peak
               memory), 16 vmapped seeds against 16 sequential runs, compile times and
               the first ``gflow run``; 8 vmapped gradient flows against 8 sequential ones

The accelerator benchmark is ``benchmarks/gpu.sh`` (``gpu_bench.py``), run on a GPU machine.
A ``--quick`` run writes ``*-quick.json`` files (ignored by git), never the results. A full
run ends with ``report.py``, which rewrites the tables of RESULTS.md from the new results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

FULL = {
    "gd_step": [["gd_step.py", "--reps", "5", "--scan", "5"]],
    "flow": [
        ["flow_horizon.py", "--problem", "default", "--log-t-max", "100", "--clocks",
         "loss,time", "--tsit5", "1e-4,1e-5", "--ours", "rk4:0.9:1e-4,rk4:0.36:1e-5"],
        ["flow_horizon.py", "--problem", "default", "--log-t-max", "1000", "--clocks",
         "loss,logt", "--no-ref", "--tsit5", "1e-4", "--ours", "rk4:0.9:1e-4"],
        ["flow_accuracy.py"],
    ],
    "kernels": [["kernels.py"], ["flow_seeds.py"]],
    "startup": [["startup.py", "--reps", "2"]],
}  # fmt: skip

QUICK = {
    "gd_step": [["gd_step.py", "--quick", "--reps", "2", "--scan", "2"]],
    "flow": [
        ["flow_horizon.py", "--problem", "default", "--log-t-max", "10", "--clocks",
         "loss,time", "--no-ref", "--tsit5", "1e-4", "--ours", "rk4:0.9:1e-4", "--smoke"],
        ["flow_accuracy.py", "--quick"],
    ],
    "kernels": [["kernels.py", "--quick", "--only", "quantities,kkt,seeds"],
                ["flow_seeds.py", "--quick"]],
}  # fmt: skip


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--only", default=None, help="comma-separated sections: " + ",".join(FULL))
    args = ap.parse_args()
    plan = QUICK if args.quick else FULL
    names = args.only.split(",") if args.only else list(plan)
    for name in names:
        if name not in plan:
            ap.error(f"unknown section {name!r}; expected some of {','.join(plan)}")
    failed, t0 = [], time.perf_counter()
    for name in names:
        for cmd in plan[name]:
            print(f"\n=== {name}: python benchmarks/{' '.join(cmd)}", flush=True)
            t = time.perf_counter()
            rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]], cwd=HERE)
            print(f"=== {name}: exit {rc} after {time.perf_counter() - t:.0f} s", flush=True)
            if rc:
                failed.append(" ".join(cmd))
    if not args.quick and not failed:  # the tables of RESULTS.md from the new results
        subprocess.call([sys.executable, str(HERE / "report.py")], cwd=HERE)
    print(f"\nall done in {time.perf_counter() - t0:.0f} s; failed: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
