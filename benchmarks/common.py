"""Shared by the benchmark scripts: the machine tag and the results files."""

from __future__ import annotations

import json
import os
import platform
from datetime import date
from pathlib import Path

import jax

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


def write_result(name: str, record: dict) -> Path:
    """Write ``results/<name>.json`` tagged with the date and machine; returns the path."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"date": date.today().isoformat(), "machine": machine(), **record}
    path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    return path
