"""Robust accuracy against training time (the paper's robustness figure).

For each checkpoint of a run made by ``paper_mnist.py`` (the first epochs below each loss
mark, and the end), on training and held-out images: the per-image minimal L2 and
L-infinity perturbation found by PGD with bisection (``gflow.robustness``), and the robust
accuracy against eps. Longer training (lower loss, larger margin) should give higher
robust accuracy at a given eps, mostly on the training set. Writes ``robustness.json``
into the run folder and a figure.

    python experiments/paper_robustness.py runs/paper_mnist/loss-based [--n 200]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from common import save_experiment_figure, write_json  # noqa: E402
from paper_mnist import cnn, split  # noqa: E402

from gflow.models import split_params  # noqa: E402
from gflow.robustness import Attack, minimal_eps, robust_accuracy  # noqa: E402
from gflow.trajectory import Trajectory  # noqa: E402

EPS_MAX = {"l2": 4.0, "linf": 0.3}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=200, help="images per set")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--restarts", type=int, default=1)
    args = ap.parse_args()
    folder = Path(args.run_dir)
    tr = Trajectory.load(folder)
    cfg = tr.config
    train, test = split(cfg["data"], cfg["train"], cfg["test"], 0)
    channels = tuple(int(c) for c in str(cfg["channels"]).split(","))
    kernel = np.asarray(tr.final_params["layers"][0]["kernel"])
    dtype = jnp.float32 if kernel.dtype == np.float32 else jnp.float64
    graphdef, _ = split_params(cnn(channels, dtype, 0))
    # checkpoint labels are log marks on the sum loss: show them as mean-loss marks
    n_train = len(train)
    points = {
        f"loss < {math.exp(float(k) - math.log(n_train)):.0e}": v["params"]
        for k, v in tr.checkpoints.items()
    }
    points[f"end (epoch {int(tr['step'][-1]) // (n_train // 100)})"] = tr.final_params
    sets = {"train": train, "test": test}
    res = {}
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for j, norm in enumerate(("l2", "linf")):
        grid = np.linspace(0, EPS_MAX[norm], 41)
        att = Attack(norm=norm, steps=args.steps, step=0.1, restarts=args.restarts)
        for i, (sname, ds) in enumerate(sets.items()):
            x = jnp.asarray(ds.x[: args.n], dtype)
            y = jnp.asarray(ds.y[: args.n])
            for label, params in points.items():
                me = minimal_eps(graphdef, params, x, y, att, eps_max=EPS_MAX[norm], iters=10)
                acc = robust_accuracy(me, grid)
                res.setdefault(norm, {}).setdefault(sname, {})[label] = dict(
                    grid=grid.tolist(), accuracy=acc.tolist(), median_min_eps=float(np.median(me))
                )
                axes[i, j].plot(grid, acc, label=label)
                print(f"{norm} {sname} {label}: median minimal eps {np.median(me):.4g}")
            axes[i, j].set_title(f"{sname}, {norm}")
            axes[i, j].set_xlabel("eps")
            axes[i, j].set_ylabel("robust accuracy")
            axes[i, j].grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    write_json(folder / "robustness.json", res)
    fig_path = save_experiment_figure(fig, "paper_robustness.png")
    print(json.dumps({k: list(v) for k, v in res.items()}))
    print(f"-> {folder / 'robustness.json'}, {fig_path}")


if __name__ == "__main__":
    main()
