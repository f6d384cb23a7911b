"""Shared by the experiment scripts: problems, output folders, figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gflow  # noqa: F401  (float64)
from gflow.cli import RUN_DEFAULTS, build_problem

FIGURES = Path(__file__).parent / "figures"


def problem(**overrides):
    """``(dataset, model, objective, params0)`` of ``gflow run``'s default, with overrides."""
    cfg = dict(RUN_DEFAULTS, bias="none", activation="relu", seed=0, dtype="float64")
    cfg.update(overrides)
    return build_problem(argparse.Namespace(**cfg))


def out_dir(name: str, given: str | None) -> Path:
    out = Path(given or f"runs/{name}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
