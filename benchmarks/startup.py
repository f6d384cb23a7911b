"""Time to first result: the default ``gflow run`` in fresh processes, cold and warm.

Each variant runs ``python -m gflow run --no-progress --out DIR`` (the default job) in a
new process, timed from outside (process start to exit):

* ``base``: a reference commit (``--base``, default ``main`` as it was before the
  start-up work) checked out into a temporary folder by ``git worktree``, run with the
  same interpreter; it has no compilation cache, so each of its runs is cold;
* ``before``: the first commit with the phase timer (``--before``), with the compilation
  cache off: what ``base`` does, broken down by phase (its ``timing.json``);
* ``cold``: this tree with empty caches (``XDG_CACHE_HOME`` set to a new folder: no
  compiled programs, no parsed data), so everything compiles;
* ``warm``: this tree again with the caches the cold run filled (same shapes).

The four alternate, ``--reps`` times, so that drift of the machine hits all alike;
medians and the ratios ``cold / base`` and ``warm / base`` are reported, with the
per-phase breakdowns (``timing.json``: wall per phase and JAX's tracing, lowering and
compilation inside each) and ``python -c 'import gflow'``'s time. Appends to
``results/startup.json``.

    python benchmarks/startup.py [--base REV] [--before REV] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
    ap.add_argument("--before", default="c69a8a3", help="first commit with gflow.timing")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--args", default="", help="extra gflow run options (quoted)")
    args = ap.parse_args(argv)
    extra = args.args.split()
    from common import machine, write_result

    tmp = Path(tempfile.mkdtemp(prefix="gflow-startup-"))
    trees = {"base": tmp / "base", "before": tmp / "before"}
    for name, rev in (("base", args.base), ("before", args.before)):
        subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev], cwd=ROOT,
                       check=True, capture_output=True)  # fmt: skip
    env0 = {k: v for k, v in os.environ.items()
            if not k.startswith(("JAX_COMPILATION_CACHE", "GFLOW_COMPILATION_CACHE"))}  # fmt: skip
    walls = {"base": [], "before": [], "cold": [], "warm": []}
    breakdown = {"before": [], "cold": [], "warm": []}
    imports = {"base": [], "here": []}
    try:
        for rep in range(args.reps):
            xdg = {"XDG_CACHE_HOME": str(tmp / f"xdg{rep}")}  # empty for the cold run
            runs = (
                ("base", trees["base"], {**env0, **xdg, "PYTHONPATH": str(trees["base"])}),
                ("before", trees["before"], {**env0, **xdg, "PYTHONPATH": str(trees["before"]),
                                             "GFLOW_COMPILATION_CACHE": "off"}),
                ("cold", ROOT, {**env0, **xdg, "PYTHONPATH": str(ROOT)}),
                ("warm", ROOT, {**env0, **xdg, "PYTHONPATH": str(ROOT)}),
            )  # fmt: skip
            for kind, tree, env in runs:
                if kind == "cold":
                    shutil.rmtree(tmp / f"xdg{rep}", ignore_errors=True)
                out = tmp / f"{kind}{rep}"
                walls[kind].append(_run(tree, out, env, extra))
                if kind in breakdown:
                    breakdown[kind].append(json.loads((out / "timing.json").read_text()))
            off = {**env0, "GFLOW_COMPILATION_CACHE": "off"}
            imports["base"].append(
                _import_time(trees["base"], {**off, "PYTHONPATH": str(trees["base"])})
            )
            imports["here"].append(_import_time(ROOT, {**off, "PYTHONPATH": str(ROOT)}))
            print("rep", rep, ", ".join(f"{k} {v[-1]:.1f} s" for k, v in walls.items()), flush=True)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)  # fmt: skip
    med = {k: statistics.median(v) for k, v in walls.items()}
    record = dict(
        base=args.base, before=args.before, reps=args.reps, args=extra, walls=walls, median=med,
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

    for kind in ("before", "cold", "warm"):
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
