"""Shared by the benchmark scripts: the machine tag and the results files."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import jax
import numpy as np

from gflow import data as D

RESULTS = Path(__file__).parent / "results"


def machine() -> str:
    """CPU model, core count and JAX backend, e.g. for a RESULTS.md line."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = f"{jax.device_count()} {jax.default_backend()} device(s)"
    return f"{model}, {os.cpu_count()} cores, {devices}, jax {jax.__version__}"


def write_result(name: str, record: dict, replace_last: bool = False) -> Path:
    """Append ``record``, tagged with the date and machine, to ``results/<name>.json``
    (``replace_last``: in place of the last record, for a table rewritten as it grows).

    The file holds a JSON list of runs, oldest first (a file from before this format,
    one record, becomes the list's first entry). Written to a temporary file and renamed,
    so an interrupted run never leaves a half-written file. Returns the path.
    """
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    runs = []
    if path.exists():
        old = json.loads(path.read_text())
        runs = old if isinstance(old, list) else [old]
    if replace_last and runs:
        runs.pop()
    runs.append({"date": date.today().isoformat(), "machine": machine(), **record})
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return path


def timeit(fn, *args, reps=5):
    """Median wall time of ``fn(*args)`` (blocked), after one warm-up call."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def flops_of(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    if isinstance(cost, list):
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def classification_data(n, shape, classes, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape)).astype(np.float64)
    y = np.arange(n) % classes
    return D.Dataset(x=x, y=y, num_classes=classes, name=f"random{shape}")
