"""The two dynamics: discrete GD / SGD (``gd``) and the gradient-flow ODE (``flow``)."""

from gflow.dynamics.flow import (
    CLOCKS,
    SOLVERS,
    StabilityStepping,
    run_flow,
    run_flow_seeds,
    stepping,
)
from gflow.dynamics.gd import SCHEDULES, LossBased, run_gd, run_gd_seeds
from gflow.dynamics.sliding import KinkStepping

__all__ = [
    "run_gd", "run_gd_seeds", "run_flow", "run_flow_seeds", "LossBased", "StabilityStepping",
    "KinkStepping", "stepping",
    "SCHEDULES", "CLOCKS", "SOLVERS",
]  # fmt: skip
