"""Time to first result: the default ``gflow run`` in fresh processes, cold and warm.

Each variant runs ``python -m gflow run --no-progress --out DIR`` (the default job) in a
new process, timed from outside (process start to exit):

* ``base``: a reference commit (``--base``, default ``main`` as it was before the
  start-up work) checked out into a temporary folder by ``git worktree``, run with the
  same interpreter; it has no compilation cache, so each of its runs is cold;
* ``cold``: this tree with an empty compilation cache folder (``GFLOW_COMPILATION_CACHE``
  set to a new folder), so everything compiles;
* ``warm``: this tree again with the folder the cold run filled (same shapes).

The three alternate, ``--reps`` times, so that drift of the machine hits all alike;
medians and the ratios ``cold / base`` and ``warm / base`` are reported, with this
tree's per-phase breakdown (``timing.json`` of its runs: wall per phase and JAX's
tracing, lowering and compilation inside each) and ``python -c 'import gflow'``'s time.
Appends to ``results/startup.json``.

    python benchmarks/startup.py [--base REV] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))


def _run(cwd: Path, out: Path, env: dict, args: list[str]) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "gflow", "run", "--no-progress", "--out", str(out), *args]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise RuntimeError(f"gflow run failed in {cwd} ({res.returncode}):\n{res.stderr[-2000:]}")
    return wall


def _import_time(cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import gflow"], cwd=cwd, env=env, check=True)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", default="973506d", help="reference commit (default: main "
                    "before the start-up work)")  # fmt: skip
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--args", default="", help="extra gflow run options (quoted)")
    args = ap.parse_args(argv)
    extra = args.args.split()
    from common import machine, write_result

    tmp = Path(tempfile.mkdtemp(prefix="gflow-startup-"))
    base_dir = tmp / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(base_dir), args.base], cwd=ROOT,
                   check=True, capture_output=True)  # fmt: skip
    env0 = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env_base = {**env0, "PYTHONPATH": str(base_dir)}
    env_here = {**env0, "PYTHONPATH": str(ROOT)}
    walls = {"base": [], "cold": [], "warm": []}
    breakdown = {"cold": [], "warm": []}
    imports = {"base": [], "here": []}
    try:
        for rep in range(args.reps):
            cache = tmp / f"cache{rep}"
            env_cache = {**env_here, "GFLOW_COMPILATION_CACHE": str(cache)}
            walls["base"].append(_run(base_dir, tmp / f"base{rep}", env_base, extra))
            for kind in ("cold", "warm"):
                out = tmp / f"{kind}{rep}"
                walls[kind].append(_run(ROOT, out, env_cache, extra))
                breakdown[kind].append(json.loads((out / "timing.json").read_text()))
            imports["base"].append(
                _import_time(base_dir, {**env_base, "GFLOW_COMPILATION_CACHE": "off"})
            )
            imports["here"].append(
                _import_time(ROOT, {**env_here, "GFLOW_COMPILATION_CACHE": "off"})
            )
            print(f"rep {rep}: base {walls['base'][-1]:.1f} s, cold {walls['cold'][-1]:.1f} s, "
                  f"warm {walls['warm'][-1]:.1f} s", flush=True)  # fmt: skip
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_dir)], cwd=ROOT,
                       capture_output=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in walls.items()}
    record = dict(
        base=args.base, reps=args.reps, args=extra, walls=walls, median=med,
        ratio_cold=med["cold"] / med["base"], ratio_warm=med["warm"] / med["base"],
        import_s={k: statistics.median(v) for k, v in imports.items()},
        breakdown={k: _median_breakdown(v) for k, v in breakdown.items()},
    )  # fmt: skip
    path = write_result("startup", record)
    print(f"machine: {machine()}")
    print(f"default gflow run, median of {args.reps}: base {med['base']:.1f} s, cold "
          f"{med['cold']:.1f} s ({record['ratio_cold']:.2f}x), warm {med['warm']:.1f} s "
          f"({record['ratio_warm']:.2f}x); import gflow: base {record['import_s']['base']:.2f} s, "
          f"here {record['import_s']['here']:.2f} s")  # fmt: skip
    from gflow.timing import table

    for kind in ("cold", "warm"):
        print(f"\n{kind} (median per phase):\n{table(record['breakdown'][kind])}")
    print(f"-> {path}")
    return record


def _median_breakdown(reports: list[dict]) -> dict:
    """Per phase and field, the median over the runs' ``timing.json``."""
    names = list(reports[0]["phases"])
    out = {"total": statistics.median(r["total"] for r in reports), "phases": {}}
    for name in names:
        rows = [r["phases"][name] for r in reports if name in r["phases"]]
        out["phases"][name] = {k: statistics.median(row[k] for row in rows) for k in rows[0]}
    return out


if __name__ == "__main__":
    main()
