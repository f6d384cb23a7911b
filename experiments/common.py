"""Shared by the experiment scripts: problems, output folders, figures."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gflow  # noqa: F401  (float64)
from gflow.problem import Problem

FIGURES = Path(__file__).parent / "figures"


def problem(**overrides):
    """``(dataset, model, objective, params0)`` of ``gflow run``'s default, with overrides."""
    return Problem(**overrides).build()


def out_dir(name: str, given: str | None) -> Path:
    out = Path(given or f"runs/{name}")
    out.mkdir(parents=True, exist_ok=True)
    return out


MEAN_LOSS_MARKS = (1e-10, 1e-15, 1e-20, 1e-120)  # the paper's checkpoints


def train_schedule(
    obj,
    p0,
    schedule: str,
    *,
    lr_mean: float,
    alpha0: float,
    batch: int,
    epochs: int,
    saves: int,
    seed: int,
    config: dict,
    loss_ub: float | None = None,
):
    """SGD with the paper's protocol: ``schedule`` "constant" (``lr_mean`` on the
    batch-mean loss, so ``lr_mean / N`` on gflow's sum loss) or "loss-based"; checkpoints
    at the first epochs whose mean loss falls below ``MEAN_LOSS_MARKS``; ``loss_ub``: the
    official code's roll-back bound on a mini-batch's loss over the frame's. Returns
    ``(trajectory, wall seconds)``."""
    import math
    import time

    from gflow.dynamics import run_gd

    n = obj.num_samples
    marks = [math.log(m) + math.log(n) for m in MEAN_LOSS_MARKS]  # on the sum loss
    t = time.perf_counter()
    tr = run_gd(
        obj,
        p0,
        schedule=schedule,
        lr=lr_mean / n,
        alpha0=alpha0,
        loss_ub=loss_ub if schedule == "loss-based" else None,
        batch_size=batch,
        max_steps=epochs * (n // batch),
        log_t_max=None,
        saves=saves,
        seed=seed,
        checkpoint_log_losses=marks,
        config=config,
    )
    return tr, time.perf_counter() - t


def held_out_accuracy(obj, params, ds) -> float:
    """Accuracy of ``params`` on the dataset ``ds`` (the objective's model and dtype)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    x, y = jnp.asarray(ds.x, obj.dtype), jnp.asarray(ds.y, jnp.int32)
    out = eqx.tree_at(lambda o: (o.x, o.y), obj, (x, y)).outputs(jax.tree.map(jnp.asarray, params))
    return float(jnp.mean(jnp.argmax(out, axis=1).astype(y.dtype) == y))


def add_sgd_options(ap: argparse.ArgumentParser, lr: float, loss_ub: float) -> None:
    """The options of the paper's SGD protocol, shared by the MNIST and CIFAR scripts
    (``loss_ub``: the official script's, 600 for MNIST and 500 for CIFAR-10)."""
    ap.add_argument("--lr", type=float, default=lr, help="constant step on the batch-mean loss")
    ap.add_argument("--alpha0", type=float, default=0.1)
    ap.add_argument("--loss-ub", type=float, default=loss_ub,
                    help="loss-based: roll back an epoch once a batch's loss exceeds this "
                    "times the frame's (the official code's bound)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--saves", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)


def save_experiment_figure(fig, name: str) -> Path:
    """Write ``fig`` as ``experiments/figures/<name>`` and return the path."""
    from gflow.plots import save_figure

    FIGURES.mkdir(exist_ok=True)
    return save_figure(fig, FIGURES / name)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, default=float) + "\n")
