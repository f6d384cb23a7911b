"""gflow: gradient descent and gradient flow on homogeneous networks.

Checks the theory of Lyu & Li, "Gradient Descent Maximizes the Margin of Homogeneous
Neural Networks" (ICLR 2020). Importing gflow turns on JAX's float64 support
(``jax_enable_x64``): theory work runs in float64 by default; float32 stays selectable
per model and dataset.
"""

from gflow import timing  # first: its clock starts with gflow's import  # isort: skip

import jax  # noqa: E402  # isort: skip

jax.config.update("jax_enable_x64", True)

from gflow import cache  # noqa: E402

cache.configure()  # JAX's persistent compilation cache (gflow.cache: where, how to turn off)

from gflow import data, losses, models, objective, quantities  # noqa: E402
from gflow.data import DataError, Dataset  # noqa: E402
from gflow.dynamics import (  # noqa: E402
    KinkStepping,
    LossBased,
    StabilityStepping,
    run_flow,
    run_flow_seeds,
    run_gd,
    run_gd_seeds,
)
from gflow.kkt import kkt_residual  # noqa: E402
from gflow.losses import CrossEntropy, Exponential, Logistic, get_loss  # noqa: E402
from gflow.models import build_model, check_homogeneity, split_params  # noqa: E402
from gflow.objective import Objective, load_objective, make_objective  # noqa: E402
from gflow.theory import check_run, check_trajectory  # noqa: E402
from gflow.trajectory import Trajectory  # noqa: E402

__version__ = "0.1.0"

timing.record("import gflow", timing.elapsed())


def __getattr__(name: str):
    # gflow.compare (the function) on first use: it imports SciPy's interpolation, a
    # third of a second that a run which compares nothing need not wait for
    if name == "compare":
        from gflow.compare import compare

        globals()["compare"] = compare
        return compare
    raise AttributeError(f"module 'gflow' has no attribute {name!r}")


__all__ = [
    "data",
    "losses",
    "models",
    "objective",
    "quantities",
    "Dataset",
    "DataError",
    "Exponential",
    "Logistic",
    "CrossEntropy",
    "get_loss",
    "build_model",
    "check_homogeneity",
    "split_params",
    "Objective",
    "make_objective",
    "load_objective",
    "Trajectory",
    "run_gd",
    "run_gd_seeds",
    "run_flow",
    "run_flow_seeds",
    "LossBased",
    "KinkStepping",
    "StabilityStepping",
    "check_run",
    "check_trajectory",
    "kkt_residual",
    "compare",
]
