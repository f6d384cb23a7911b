"""Regenerate the tables of RESULTS.md from the newest run in each ``results/*.json``.

RESULTS.md marks each generated table with ``<!-- table: NAME -->`` ... ``<!-- end -->``;
NAME is a results file's stem. The prose around the tables is written by hand.
``run.py`` calls this after a full run.

    python benchmarks/report.py            # rewrite the tables in place
    python benchmarks/report.py --check    # exit 1 if a table is out of date
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DOC = HERE / "RESULTS.md"


def latest(name: str) -> dict:
    data = json.loads((RESULTS / f"{name}.json").read_text())
    return data[-1] if isinstance(data, list) else data


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _stamp(rec: dict) -> str:
    return f"_{rec['machine']}; {rec['date']}._"


def gd_step(rec: dict) -> str:
    rows = []
    for r in rec["rows"]:
        ratio = f"**{r['ratio_to_torch']:.2f}x**" if r.get("ratio_to_torch") else "n/a"
        torch = f"{r['torch_step_s'] * 1e3:,.4g}" if r.get("torch_step_s") else "n/a"
        rows.append([
            r["model"], r["dtype"], f"{r['batch']:,}", f"{r['flops'] / 1e9:.3g}",
            f"{r['gflow_step_s'] * 1e3:,.4g}", f"{r['gflow_scan_step_s'] * 1e3:,.4g}", torch,
            ratio, f"{100 * r['fraction_of_ceiling']:.0f}%",
        ])  # fmt: skip
    ceil = rec["ceiling_gflops"]
    head = ["model", "dtype", "batch", "GFLOP per step", "gflow step (ms)", "gflow scanned (ms)",
            "PyTorch (ms)", "gflow scanned / PyTorch", "% of ceiling"]  # fmt: skip
    return (
        _table(head, rows)
        + f"\n\nCeiling: {ceil['float32']:.1f} GFLOP/s float32, {ceil['float64']:.1f} GFLOP/s"
        + f" float64. {_stamp(rec)}"
    )


def flow_horizon(rec: dict) -> str:
    rows = []
    for r in rec["rows"]:
        if "dt" in r and r.get("dt"):
            method = f"RK4, fixed dt = {r['dt']:.3g}"
        elif r.get("cfl"):
            method = (
                f"stability stepping, {r['solver'].upper()} at cfl {r['cfl']:g} "
                f"(warm-up rtol {r['rtol']:g})"
            )
        else:
            method = f"Tsit5, rtol {r['rtol']:g}"
        err = [f"{r[k]:.1e}" if k in r else "n/a" for k in ("param_rel_err", "margin_rel_err")]
        rows.append([
            method, r.get("clock", "loss"), f"{r['grad_evals']:,}", f"{r['wall_s']:.1f}", *err,
            f"{r['margin']:.7g}", str(r["margin_drops"]),
        ])  # fmt: skip
    head = ["method", "clock", "gradient evaluations", "wall (s)", "parameters, rel. error",
            "smoothed margin, rel. error", "final smoothed margin", "margin drops"]  # fmt: skip
    return _table(head, rows) + f"\n\n{_stamp(rec)}"


def kernels(rec: dict) -> str:
    rows = []
    for r in rec["rows"]:
        vals = {k: v for k, v in r.items() if k not in ("section", "name", "command")}
        shown = ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v:,}" if isinstance(v, int)
            else f"{k} {v}" for k, v in vals.items()
        )  # fmt: skip
        rows.append([r["section"], r["name"], shown])
    return _table(["section", "what", "measured (seconds unless named)"], rows) + (
        f"\n\n{_stamp(rec)}"
    )


def flow_seeds(rec: dict) -> str:
    k = rec["seeds"]
    rows = [
        [f"{k} x `run_flow`, one after another", f"{rec['sequential_s']:.1f} s",
         f"{rec['sequential_first_s']:.1f} s", ""],
        [f"`run_flow_seeds`, {k} seeds vmapped", f"{rec['vmapped_s']:.1f} s",
         f"{rec['vmapped_first_s']:.1f} s", f"**{rec['speedup']:.2f}x**"],
    ]  # fmt: skip
    same = "the same" if rec["same_evals"] else "**not** the same"
    return (
        _table(["to log t = " + f"{rec['log_t_max']:g}", "time", "first run to log t = 3 "
                "(compiles)", "speedup"], rows)
        + f"\n\nGradient evaluations per seed ({', '.join(map(str, rec['grad_evals']))}): "
        f"{same} on both sides; final normalized margins differ by at most "
        f"{rec['max_final_margin_diff']:.1e}.\n\n{_stamp(rec)}"
    )  # fmt: skip


def flow_accuracy(rec: dict) -> str:
    def tol(x):
        return f"{x:.0e}".replace("e-0", "e-")

    def setting(r):
        if "cfl" in r:
            warm = f"Tsit5 {tol(r['rtol'])} warm-up" if r.get("warmup", "tsit5") else "no warm-up"
            return f"{r['solver']} cfl {r['cfl']:g} ({warm})"
        return f"{r['solver']} rtol {tol(r['rtol'])} throughout"

    rows = []
    for r in rec["rows"]:
        worst = max(r["errors"].items(), key=lambda kv: kv[1]["worst"])[1]
        end = max(e["end"] for e in r["errors"].values())
        name = ("reference: " if r["reference"] else "") + setting(r)
        if not r["reference"] and r.get("input_span") is False:
            name += ", all parameters (no span)"
        if "default" in r["name"]:
            name += " " + r["name"][r["name"].index("(") :]
        verdict = {True: "pass", False: "FAIL", None: "n/a"}[r["fidelity"]]
        rows.append([
            name, f"{r['grad_evals']:,}", f"{r['wall_s']:.1f}",
            f"{worst['worst']:.1e} (log t {worst['at_log_t']:.3g})", f"{end:.1e}",
            f"{r['balance_drift']:.1e}", f"{r['layer_balance_drift']:.1e}",
            f"{r['dissipation_defect']:.1e}", verdict,
        ])  # fmt: skip
    head = ["run", "gradient evaluations", "wall (s)", "worst margin error", "at end",
            "balance drift", "layer drift", "dissipation defect", "fidelity"]  # fmt: skip
    return _table(head, rows) + f"\n\n{_stamp(rec)}"


def flow_kinks(rec: dict) -> str:
    rows = []
    for r in rec["rows"]:
        err = r.get("error")
        worst = f"{err['worst']:.1e} (log t {err['at_log_t']:.3g})" if err else "reference"
        if not err and not r["name"].startswith("kinks tsit5 rtol 1e-10"):
            worst = "no reference"
        switches = r.get("crossings", 0) + r.get("slide_entries", 0)
        located = f"{switches:,.0f}" if "events" in r else "chatters"
        if r.get("fallback"):
            fb = r["fallback"]
            located += f", then Ralston from log t {fb['log_t']:.3g} ({fb['cost_ratio']:.0f}x)"
        wall = "" if r["wall_s"] != r["wall_s"] else f"{r['wall_s']:.0f}"  # NaN: cached
        rows.append([
            r["name"], f"{r['grad_evals']:,}", wall, worst,
            f"{err['end']:.1e}" if err else "", f"{r['balance_drift']:.1e}",
            f"{r['dissipation_defect']:.1e}", located,
        ])  # fmt: skip
    head = ["run", "gradient evaluations", "wall (s)", "worst margin error", "at end",
            "balance drift", "dissipation defect", "switches located"]  # fmt: skip
    return _table(head, rows) + f"\n\n{_stamp(rec)}"


def flow_estimate(rec: dict) -> str:
    rows = []
    for r in rec["rows"]:
        m, p = r["margin"], r["params"]
        rows.append([
            r["name"], f"{r['grad_evals']:,}", f"{r['shadow_evals']:,}", f"{r['wall_s']:.1f}",
            f"{m['true']:.1e}", f"{m['estimate']:.1e}",
            f"{m['ratio_min']:.2f} to {m['ratio_max']:.2f}", f"{p['true']:.1e}",
            f"{p['estimate']:.1e}", f"{p['ratio_min']:.2f} to {p['ratio_max']:.2f}",
            r["fidelity"],
        ])  # fmt: skip
    head = ["run", "gradient evaluations", "shadow's", "wall (s)", "margin error",
            "its estimate", "estimate / error", "parameter error", "its estimate",
            "estimate / error", "fidelity"]  # fmt: skip
    return _table(head, rows) + f"\n\n{_stamp(rec)}"


def flow_control(rec: dict) -> str:
    rows = []
    for prob in rec["problems"]:
        for r in prob["rows"]:
            steps = r["steps"]
            stable = sum(steps[b] for b in ("stability", "accuracy", "drift"))
            binds = ", ".join(f"{b} {100 * steps[b] / stable:.0f}%"
                              for b in ("stability", "accuracy", "drift") if steps[b]) or "-"
            true = f"{r['true']:.1e}" if r.get("true") is not None else "-"
            ratio = f"{r['ratio_min']:.2f}" if r.get("ratio_min") is not None else "-"
            rows.append([
                f"{prob['problem']} (log t {prob['log_t_max']:g})", r["name"],
                f"{r['grad_evals']:,}", f"{r['shadow_evals']:,}", f"{r['wall_s']:.1f}",
                f"{r['estimate']:.1e}",
                "-" if "quarter" in r["name"] else f"{r['diff_quarter']:.1e}", ratio, true,
                f"{r['cfl_min']:.3f} to {r['cfl_max']:.2f}", binds, str(r["redone"]),
                r["fidelity"],
            ])  # fmt: skip
        for r in prob["others"]:
            true = f"{r['true']:.1e}" if r.get("true") is not None else "-"
            rows.append([f"{prob['problem']} (log t {prob['log_t_max']:g})", r["name"],
                         f"{r['grad_evals']:,}", "-", f"{r['wall_s']:.1f}", "-", "-", "-", true,
                         "-", "-", "-", "-"])  # fmt: skip
    head = ["problem", "run", "gradient evaluations", "shadow's", "flow wall (s)",
            "estimate", "difference to a quarter of the tolerances", "estimate / difference",
            "true error", "cfl", "stable steps bound by", "segments redone",
            "fidelity"]  # fmt: skip
    return _table(head, rows) + f"\n\n{_stamp(rec)}"


def startup(rec: dict) -> str:
    med = rec["median"]
    n = rec["reps"]
    rows = [
        [f"`base`: main before the start-up work ({rec['base']})", f"{med['base']:.1f}", "1"],
        ["`cold`: this tree, empty caches", f"{med['cold']:.1f}", f"**{rec['ratio_cold']:.2f}x**"],
        ["`warm`: its second run", f"{med['warm']:.1f}", f"**{rec['ratio_warm']:.2f}x**"],
    ]  # fmt: skip
    first = _table([f"default `gflow run`, new process (median of {n})", "wall (s)", "vs base"],
                   rows)  # fmt: skip
    kinds = ("before", "cold", "warm")
    names: list = []
    for k in kinds:
        names += [p for p in rec["breakdown"][k]["phases"] if p not in names]
    head = ["phase"] + [f"{k}: own s (JAX s)" for k in kinds]
    body = []
    for name in names:
        row = [name]
        for k in kinds:
            r = rec["breakdown"][k]["phases"].get(name)
            jax_s = 0 if r is None else r["trace"] + r["lower"] + r["compile"]
            row.append("" if r is None else f"{r['self']:.2f} ({jax_s:.2f})")
        body.append(row)
    body.append(["total (from gflow's import)"]
                + [f"{rec['breakdown'][k]['total']:.2f}" for k in kinds])  # fmt: skip
    return (first + "\n\n" + _table(head, body)
            + f"\n\nimport gflow: {rec['import_s']['base']:.2f} s (base), "
            f"{rec['import_s']['here']:.2f} s (this tree).\n\n{_stamp(rec)}")  # fmt: skip


RENDER = {
    "startup": startup,
    "gd_step": gd_step, "kernels": kernels, "flow_seeds": flow_seeds,
    "flow_accuracy-default": flow_accuracy, "flow_kinks-default": flow_kinks,
    "flow_kinks-wide": flow_kinks, "flow_estimate-default": flow_estimate,
    "flow_control": flow_control,
}  # fmt: skip


def render(name: str) -> str:
    rec = latest(name)
    fn = RENDER.get(name) or (flow_horizon if name.startswith("flow_horizon") else None)
    if fn is None:
        raise KeyError(f"no table renderer for {name!r}")
    return fn(rec)


# the body may be empty, and never runs past its own end marker into the next table
PATTERN = re.compile(
    r"(<!-- table: (?P<name>[\w.-]+) -->\n)(?P<body>(?:(?!<!-- (?:table:|end -->)).)*?)"
    r"\n?(<!-- end -->)",
    re.S,
)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    args = ap.parse_args()
    text = DOC.read_text()
    new = PATTERN.sub(lambda m: m.group(1) + render(m.group("name")) + "\n" + m.group(4), text)
    names = [m.group("name") for m in PATTERN.finditer(text)]
    if args.check:
        stale = new != text
        print(f"tables {', '.join(names)}: {'out of date' if stale else 'up to date'}")
        sys.exit(1 if stale else 0)
    DOC.write_text(new)
    print(f"rewrote {len(names)} tables in {DOC}: {', '.join(names)}")


if __name__ == "__main__":
    main()
