"""Figures from trajectories (reads ``Trajectory`` only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gflow.trajectory import Trajectory, atomic_write  # noqa: E402

__all__ = ["plot_trajectories"]

PANELS = (
    ("log_loss", "log Loss (sum)"),
    ("rho_L", r"$\rho^L$"),
    ("normalized_margin", r"normalized margin $q_{min}/\rho^L$"),
    ("smoothed_margin", r"smoothed margin $\tilde\gamma$"),
)


def _column(tr: Trajectory, name: str) -> np.ndarray:
    if name == "rho_L":
        order = tr.config.get("order") or 1
        return tr["rho"] ** order
    return tr[name]


def plot_trajectories(trajs: dict[str, Trajectory], path: str | Path, title: str = "") -> Path:
    """Log loss, rho^L, normalized and smoothed margin against log t, one line per run."""
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for (name, label), ax in zip(PANELS, axes.ravel(), strict=True):
        for run, tr in trajs.items():
            x = tr["log_t"]
            keep = np.isfinite(x)
            ax.plot(x[keep], _column(tr, name)[keep], marker=".", ms=3, label=run)
        if name.endswith("margin"):
            # the margins start far below zero at t = 0: scale to the part after log t_min
            late = [
                v[(tr["log_t"] >= tr.config.get("log_t_min", 0.0)) & np.isfinite(v)]
                for tr in trajs.values()
                for v in [_column(tr, name)]
            ]
            late = np.concatenate(late) if late else np.array([])
            if late.size:
                lo, hi = late.min(), late.max()
                pad = 0.05 * (hi - lo or abs(hi) or 1.0)
                ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("log t")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        if name == "rho_L":
            ax.set_yscale("log")
    axes[0, 0].legend()
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path
