"""Figures from trajectories (reads ``Trajectory`` only)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gflow.trajectory import Trajectory, atomic_write  # noqa: E402

__all__ = ["plot_trajectories", "plot_seed_bands", "plot_comparison", "save_figure"]

PANELS = (
    ("log_loss", "log Loss (sum)"),
    ("rho_L", r"$\rho^L$"),
    ("normalized_margin", r"normalized margin $q_{min}/\rho^L$"),
    ("smoothed_margin", r"smoothed margin $\tilde\gamma$"),
    ("balance_drift", r"balance drift / $\rho^2$ (0 for the exact flow)"),
    ("dissipation_defect", "dissipation defect (0 for the exact flow)"),
)
LOG_PANELS = ("rho_L", "balance_drift", "dissipation_defect", "step_sharpness")
# GD's eta lambda_max(Hessian of Loss) at each save point (gflow.dynamics.run_gd), shown
# where a run recorded it, against 2 (GD's stability edge, what edge-of-stability studies
# plot) and 1/2 (the largest mu(Loss) of the GD theorem's step condition S5 past t0)
SHARPNESS_PANEL = ("step_sharpness", r"GD: $\eta\,\lambda_{max}$(Hessian of Loss)")


def _panels(trajs) -> tuple:
    """``PANELS``, with GD's sharpness panel where a run recorded it."""
    has = any(np.isfinite(_column(tr, "step_sharpness")).any() for tr in trajs)
    return PANELS + ((SHARPNESS_PANEL,) if has else ())


def _figure(panels: tuple):
    """A figure of two columns for ``panels`` (a spare axis hidden)."""
    rows = -(-len(panels) // 2)
    fig, axes = plt.subplots(rows, 2, figsize=(10, 10 * rows / 3), constrained_layout=True)
    for ax in axes.ravel()[len(panels) :]:
        ax.axis("off")
    return fig, axes


def _sharpness_guides(ax) -> None:
    """The lines 2 and 1/2 on the sharpness panel."""
    ax.axhline(2.0, color="k", ls="--", lw=0.8, label="2: GD's stability edge")
    ax.axhline(0.5, color="r", ls=":", lw=0.8, label=r"1/2 $\geq \mu$(Loss) past t0 (S5)")
    ax.legend(fontsize=7)


def _positive(y: np.ndarray) -> np.ndarray:
    """``y`` with its values <= 0 masked, for a log axis."""
    y = np.asarray(y, np.float64)
    return np.where(y > 0, y, np.nan)


def _column(tr: Trajectory, name: str) -> np.ndarray:
    if name == "rho_L":
        order = tr.config.get("order") or 1
        return tr["rho"] ** order
    if name not in tr.columns:  # a run folder from before the invariant monitors
        return np.full(len(tr), np.nan)
    return tr[name]


def plot_trajectories(trajs: dict[str, Trajectory], path: str | Path, title: str = "") -> Path:
    """Log loss, rho^L, normalized and smoothed margin, and the invariant monitors
    (``gflow.invariants``) against log t, one line per run; for GD runs that recorded it,
    ``eta lambda_max(Hessian of Loss)`` at each save point (the dashed line: its largest
    value over the steps since the previous save point) against 2 and 1/2."""
    panels = _panels(trajs.values())
    fig, axes = _figure(panels)
    for (name, label), ax in zip(panels, axes.ravel(), strict=False):
        for run, tr in trajs.items():
            x = tr["log_t"]
            keep = np.isfinite(x)
            if name == "step_sharpness":
                if not np.isfinite(_column(tr, name)).any():
                    continue
                (line,) = ax.plot(x[keep], _positive(tr[name])[keep], marker=".", ms=3, label=run)
                most = _positive(_column(tr, "step_sharpness_max"))[keep]
                ax.plot(x[keep], most, ls="--", lw=0.8, color=line.get_color(),
                        label=f"{run}: max over the steps since the last save")  # fmt: skip
                continue
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
        _panel(ax, name, label)
    return _finish(fig, axes, title, path)


def seed_bands(runs: list[Trajectory], name: str, grid: np.ndarray):
    """``(mean, min, max)`` of a column over runs, each interpolated in log t onto ``grid``."""
    vals = []
    for tr in runs:
        x, y = tr["log_t"], _column(tr, name)
        keep = np.isfinite(x) & np.isfinite(y)
        vals.append(np.interp(grid, x[keep], y[keep], left=np.nan, right=np.nan))
    v = np.asarray(vals)
    import warnings

    with warnings.catch_warnings():  # grid points no run reaches stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(v, 0), np.nanmin(v, 0), np.nanmax(v, 0)


def plot_seed_bands(groups: dict[str, list[Trajectory]], path: str | Path, title: str = "") -> Path:
    """The panels of ``plot_trajectories`` for several seeds per dynamics: the mean line
    and the min-max band over seeds, on a common log t grid (from 0)."""
    panels = _panels([tr for runs in groups.values() for tr in runs])
    fig, axes = _figure(panels)
    top = max(float(np.nanmax(tr["log_t"])) for runs in groups.values() for tr in runs)
    grid = np.linspace(0.0, top, 200)
    for (name, label), ax in zip(panels, axes.ravel(), strict=False):
        for kind, runs in groups.items():
            if name == "step_sharpness" and not any(
                np.isfinite(_column(tr, name)).any() for tr in runs
            ):
                continue
            mean, lo, hi = seed_bands(runs, name, grid)
            if name == "step_sharpness":
                mean, lo, hi = _positive(mean), _positive(lo), _positive(hi)
            (line,) = ax.plot(grid, mean, label=f"{kind}: mean of {len(runs)} seeds")
            ax.fill_between(grid, lo, hi, color=line.get_color(), alpha=0.25, lw=0)
        _panel(ax, name, label)
    return _finish(fig, axes, title and title + " (band: min to max over seeds)", path)


def _panel(ax, name: str, label: str) -> None:
    ax.set_xlabel("log t")
    ax.set_title(label)
    ax.grid(alpha=0.3)
    if name in LOG_PANELS:
        ax.set_yscale("log")
    if name == "step_sharpness":
        _sharpness_guides(ax)


def _finish(fig, axes, title: str, path) -> Path:
    axes[0, 0].legend()
    if title:
        fig.suptitle(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 90) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    import io

    path = Path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
    return path


def plot_comparison(cmp, path: str | Path, title: str = "") -> Path:
    """The differences of a ``gflow.compare.Comparison`` against log t, one panel each."""
    keys = list(cmp.diffs) + (["param_distance"] if np.isfinite(cmp.param_distance).any() else [])
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3.2), constrained_layout=True)
    for ax, k in zip(np.atleast_1d(axes), keys, strict=True):
        y = cmp.param_distance if k == "param_distance" else cmp.diffs[k]
        ax.plot(cmp.log_t, y, marker=".", ms=3)
        ax.axhline(0.0, color="k", lw=0.5)
        rel = k in ("rho", "param_distance")
        ax.set_title(f"{k}{' (relative)' if rel else ''}", fontsize=9)
        ax.set_xlabel("log t")
        ax.grid(alpha=0.3)
    fig.suptitle(title or f"{cmp.names[0]} - {cmp.names[1]}", fontsize=10)
    return save_figure(fig, path)
