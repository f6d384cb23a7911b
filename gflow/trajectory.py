"""One record type for both dynamics, and its files.

A ``Trajectory`` holds, per save point, the clock (``log_t`` always, ``t`` where it is
a finite float64), the step index and the quantities of ``gflow.quantities``, plus the
config that made it, the final parameters, optional parameter snapshots, and how the
run ended. GD and gradient flow both produce it; theory checks, comparisons and plots
read only it.

Files in a run folder (each written atomically: temp file + rename):

* ``config.json``: the config, the run's status and message;
* ``trajectory.npz``: every column, and snapshots as ``snap/<k>/<leaf path>``;
* ``trajectory.csv``: columns ``step, t, log_t, log_loss, rho, q_min,
  normalized_margin, smoothed_margin`` first, extra columns after;
* ``params_final.npz``: one array per parameter leaf, keyed by its pytree path.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gflow.invariants import Monitor
from gflow.quantities import SUPPORT_DECADES, Quantities

__all__ = [
    "CSV_COLUMNS",
    "Trajectory",
    "TrajectoryRecorder",
    "atomic_write",
    "npz_bytes",
    "flatten_params",
    "unflatten_params",
    "load",
]

CSV_COLUMNS = (
    "step",
    "t",
    "log_t",
    "log_loss",
    "rho",
    "q_min",
    "normalized_margin",
    "smoothed_margin",
)


def atomic_write(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` through a temp file in the same folder and a rename.
    ``mode``: the file's permissions (default: as the process's umask gives a new file,
    ``0o666 & ~umask``, like ``open``)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask() if mode is None else mode)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process's umask, read without changing it where the system says it
    (``/proc/self/status``), else by setting it and back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _key_str(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_params(params) -> dict[str, np.ndarray]:
    """``{"layers/0/kernel": array, ...}``: one entry per leaf, keyed by its pytree path."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {_key_str(p): np.asarray(v) for p, v in leaves}


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of ``flatten_params`` (integer path parts become int keys)."""
    out: dict = {}
    for key, val in flat.items():
        node = out
        parts = [int(p) if p.isdigit() else p for p in key.split("/")]
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """``arrays`` as the bytes of an ``.npz`` file (for ``atomic_write``)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@dataclass(eq=False)
class Trajectory:
    """What a run recorded: columns of equal length, one row per save point.

    **Fields:** ``kind`` ("gd" or "flow"), ``columns`` (name -> 1-D float64 array),
    ``config`` (JSON-able dict), ``final_params`` (pytree or None), ``snapshots``
    (list of parameter pytrees, one per save point, or empty), ``status``
    ("completed", "stopped" or "failed"), ``message``, and ``checkpoints``
    (label -> ``{"params", "step", "log_t"}``, e.g. at loss marks).
    """

    kind: str
    columns: dict[str, np.ndarray]
    config: dict[str, Any] = field(default_factory=dict)
    final_params: Any = None
    snapshots: list = field(default_factory=list)
    status: str = "completed"
    message: str = ""
    checkpoints: dict = field(default_factory=dict)
    # the Objective the run trained (set by run_gd / run_flow; not part of the record)
    objective: Any = field(default=None, repr=False)

    def __post_init__(self):
        lengths = {k: len(v) for k, v in self.columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"trajectory columns differ in length: {lengths}")
        for c in CSV_COLUMNS:
            if c not in self.columns:
                raise ValueError(f"trajectory lacks column {c!r}")

    def __len__(self) -> int:
        return len(self.columns["log_t"])

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    @property
    def column_names(self) -> list[str]:
        return list(CSV_COLUMNS) + [c for c in self.columns if c not in CSV_COLUMNS]

    def last(self) -> dict[str, float]:
        return {k: float(v[-1]) for k, v in self.columns.items()} if len(self) else {}

    # ------------------------------------------------------------------ files
    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        names = self.column_names
        w.writerow(names)
        for i in range(len(self)):
            w.writerow([repr(float(self.columns[c][i])) for c in names])
        return buf.getvalue()

    def save(self, folder: str | Path, objective: bool = True) -> Path:
        """Write the run folder's files (creating the folder); returns its path.

        ``objective``: also write the run's objective (``objective.pkl``, ``objective.npz``:
        model structure, loss, order and data; ``gflow.objective.load_objective``), so that
        ``gflow check`` (KKT) and ``gflow attack`` can rebuild any model's problem. ``gflow
        run`` leaves it out: it rebuilds its problems from their options."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if objective and self.objective is not None:
            self.objective.save(folder)
        meta = {
            "kind": self.kind,
            "status": self.status,
            "message": self.message,
            "config": self.config,
            "columns": self.column_names,
            "num_snapshots": len(self.snapshots),
            "checkpoints": {
                k: {"step": v["step"], "log_t": v["log_t"]} for k, v in self.checkpoints.items()
            },
        }
        arrays = {f"col/{k}": np.asarray(v, np.float64) for k, v in self.columns.items()}
        for i, snap in enumerate(self.snapshots):
            arrays.update({f"snap/{i}/{k}": v for k, v in flatten_params(snap).items()})
        atomic_write(folder / "trajectory.npz", npz_bytes(arrays))
        atomic_write(folder / "trajectory.csv", self.to_csv().encode())
        if self.final_params is not None:
            atomic_write(folder / "params_final.npz", npz_bytes(flatten_params(self.final_params)))
        if self.checkpoints:
            ck = {}
            for i, v in enumerate(self.checkpoints.values()):
                ck.update({f"{i}/{k}": a for k, a in flatten_params(v["params"]).items()})
            atomic_write(folder / "checkpoints.npz", npz_bytes(ck))
        atomic_write(folder / "config.json", (json.dumps(meta, indent=2) + "\n").encode())
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Trajectory:
        """Read a run folder; a ``ValueError`` naming the file and what is wrong with it
        when it is not a complete one (truncated, hand-edited, from another program)."""
        folder = Path(folder)
        cfg = folder / "config.json"
        if not cfg.is_file():
            raise ValueError(f"{folder} is not a run folder (no config.json)")
        try:
            meta = json.loads(cfg.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {cfg}: {e}") from None
        _check_meta(cfg, meta)
        arrays = _read_npz(folder / "trajectory.npz")
        columns = {k[4:]: v for k, v in arrays.items() if k.startswith("col/")}
        missing = [k for k in meta["columns"] if k not in columns]
        if missing:
            raise ValueError(f"{folder / 'trajectory.npz'} lacks the columns {missing}")
        columns = _validate_loaded(folder, meta, {k: columns[k] for k in meta["columns"]})
        snaps = []
        for i in range(meta.get("num_snapshots", 0)):
            prefix = f"snap/{i}/"
            snaps.append(
                unflatten_params(
                    {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
                )
            )
        checkpoints = {}
        marks = meta.get("checkpoints", {})
        if marks:
            arrays_ck = _read_npz(folder / "checkpoints.npz")
            for i, (label, info) in enumerate(marks.items()):
                prefix = f"{i}/"
                params = unflatten_params(
                    {k[len(prefix) :]: v for k, v in arrays_ck.items() if k.startswith(prefix)}
                )
                checkpoints[label] = {"params": params, **info}
        final = None
        if (folder / "params_final.npz").is_file():
            final = unflatten_params(_read_npz(folder / "params_final.npz"))
        try:
            return cls(
                kind=meta["kind"],
                columns=columns,
                config=meta["config"],
                final_params=final,
                snapshots=snaps,
                status=meta["status"],
                message=meta["message"],
                checkpoints=checkpoints,
            )
        except ValueError as e:
            raise ValueError(f"{folder}: {e}") from None


_META = {"kind": str, "status": str, "message": str, "config": dict, "columns": list}
_KINDS = ("gd", "flow")  # what TrajectoryRecorder is made with (gflow.dynamics)
# numpy dtype kinds no column may hold, in words (a saved column is float64)
_NOT_NUMBERS = {
    "U": "strings",
    "S": "bytes",
    "O": "objects",
    "b": "booleans",
    "c": "complex numbers",
    "M": "dates",
    "m": "time deltas",
    "V": "records",
}


def _validate_loaded(folder: Path, meta: dict, columns: dict) -> dict[str, np.ndarray]:
    """What a run folder holds beyond its types, which no run writes otherwise (the folder
    may be hand-edited): a known ``kind``; ``config.order`` (and ``declared_order``) an
    integer >= 1 or null, as ``make_objective`` allows; no column named twice; 1-D numeric
    columns and at least one row; a ``log_t`` with no NaN that never decreases. ``log_t``
    may repeat (a run that fails or stops records its last state again) and starts at
    -inf (t = 0) in every run. Returns the columns as float64."""
    cfg, npz = folder / "config.json", folder / "trajectory.npz"
    if meta["kind"] not in _KINDS:
        raise ValueError(f"{cfg}: 'kind' must be one of {_KINDS}, got {meta['kind']!r}")
    for key in ("order", "declared_order"):
        v = meta["config"].get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{cfg}: config {key!r} must be an integer >= 1 or null, got {v!r}")
    seen = set()
    for name in meta["columns"]:
        if name in seen:
            raise ValueError(f"{cfg}: 'columns' names {name!r} twice")
        seen.add(name)
    for name, v in columns.items():
        if v.dtype.kind in _NOT_NUMBERS:
            what = _NOT_NUMBERS[v.dtype.kind]
            raise ValueError(
                f"{npz}: column {name!r} holds {what} (dtype {v.dtype}), expected numbers"
            )
        if v.ndim != 1:
            raise ValueError(f"{npz}: columns must be 1-D, column {name!r} has shape {v.shape}")
    columns = {k: np.asarray(v, np.float64) for k, v in columns.items()}  # no copy if float64
    lt = columns["log_t"]
    if not lt.size:  # every run records its starting point
        raise ValueError(f"{npz} holds no save point")
    if np.isnan(lt).any():
        i = int(np.flatnonzero(np.isnan(lt))[0])
        raise ValueError(f"{npz}: column 'log_t' holds NaN at row {i}")
    down = np.flatnonzero(lt[1:] < lt[:-1])
    if down.size:
        i = int(down[0]) + 1
        a, b = float(lt[i - 1]), float(lt[i])
        raise ValueError(
            f"{npz}: column 'log_t' decreases at row {i} ({a!r} -> {b!r}); "
            "a run's log t never decreases"
        )
    return columns


def _check_meta(path: Path, meta) -> None:
    """config.json holds what ``Trajectory.save`` writes, with the right types."""
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in _META.items():
        if key not in meta:
            raise ValueError(f"{path} lacks {key!r}")
        if not isinstance(meta[key], kind):
            raise ValueError(
                f"{path}: {key!r} must be a {kind.__name__}, got {type(meta[key]).__name__}"
            )
    if not all(isinstance(c, str) for c in meta["columns"]):
        raise ValueError(f"{path}: 'columns' must be a list of names")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` file; a ``ValueError`` naming it when it is missing or
    damaged (a truncated zip raises ``BadZipFile`` or ``EOFError``, not ``OSError``)."""
    import zipfile

    key = None
    try:
        with np.load(path) as z:
            out = {}
            for key in z.files:
                out[key] = z[key]
            return out
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        where = "" if key is None else f" (array {key!r})"  # an object array: which one
        raise ValueError(f"cannot read {path}{where}: {e}") from None


def load(folder: str | Path) -> Trajectory:
    """Load a run folder written by ``Trajectory.save``."""
    return Trajectory.load(folder)


class TrajectoryRecorder:
    """Accumulates save points on the host; ``finish`` makes the ``Trajectory``.

    ``progress``, if given, is called with each recorded row. Every row carries the
    invariant monitors of ``gflow.invariants`` (``MONITOR_COLUMNS``), relative to the
    first row; ``reasons`` (``{column: why}``) names the columns left empty (NaN), and
    goes into the config as ``"invariants"``.
    """

    def __init__(
        self, kind: str, config: dict, save_params: bool = False, progress=None,
        reasons: dict | None = None,
    ):  # fmt: skip
        self.kind = kind
        self.config = config
        self.save_params = save_params
        self.progress = progress
        self.rows: list[dict[str, float]] = []
        self.snapshots: list = []
        self.checkpoints: dict = {}
        self.monitor: Monitor | None = None
        self.config["invariants"] = dict(reasons or {})

    def checkpoint(self, label: str, params, *, step: int, log_t: float) -> None:
        """Keep ``params`` under ``label`` (copied to the host)."""
        self.checkpoints[label] = {
            "params": jax.tree.map(np.asarray, params),
            "step": int(step),
            "log_t": float(log_t),
        }

    def add(
        self, step: int, log_t: float, q: Quantities, params=None, *,
        dissipation: float | None = None, **extra: float,
    ) -> dict:  # fmt: skip
        """Record a save point. ``params``: the parameters there (kept as a snapshot when
        the recorder saves parameters; always used for ``direction_step``).
        ``dissipation``: the run's integral of ``||grad log Loss||^2 d tau`` since its
        first row (None: not tracked)."""
        log_t = float(log_t)
        balances = None if q.balances is None else [np.asarray(b) for b in q.balances]
        if self.monitor is None:
            self.monitor = Monitor(balances, float(q.log_loss))
        row = {
            "step": float(step),
            "t": math.exp(log_t) if log_t < 709.0 else math.nan,
            "log_t": log_t,
            "log_loss": float(q.log_loss),
            "rho": float(q.rho),
            "q_min": float(q.q_min),
            "normalized_margin": float(q.normalized_margin),
            "smoothed_margin": float(q.smoothed_margin),
            "log_loss_mean": float(q.log_loss_mean),
            "layerwise_margin": float(q.layerwise_margin),
            "accuracy": float(q.accuracy),
        }
        support = np.asarray(q.support)
        row.update(
            {f"support_{k}": float(c) for k, c in zip(SUPPORT_DECADES, support, strict=True)}
        )
        row.update(self.monitor.columns(balances, q.rho, q.log_loss, dissipation))
        # the follow-up claims' columns (Ji & Telgarsky 2020): how far theta is from
        # -grad Loss's direction, and how far the direction moved since the last save point
        gap = getattr(q, "alignment_gap", None)
        row["alignment_gap"] = math.nan if gap is None else float(gap)
        row["direction_step"] = self.monitor.direction_step(params)
        for col in self.config.get("invariants", {}):  # a column left empty, with its reason
            if col in row:
                row[col] = math.nan
        row.update({k: float(v) for k, v in extra.items()})
        self.rows.append(row)
        if self.save_params and params is not None:
            self.snapshots.append(jax.tree.map(np.asarray, params))
        if self.progress is not None:
            self.progress(row)
        return row

    def finish(
        self, final_params=None, status: str = "completed", message: str = "", objective=None
    ) -> Trajectory:
        names = list(self.rows[0]) if self.rows else list(CSV_COLUMNS)
        cols = {k: np.asarray([r.get(k, math.nan) for r in self.rows], np.float64) for k in names}
        return Trajectory(
            kind=self.kind,
            columns=cols,
            config=self.config,
            final_params=None if final_params is None else jax.tree.map(np.asarray, final_params),
            snapshots=self.snapshots,
            status=status,
            message=message,
            checkpoints=self.checkpoints,
            objective=objective,
        )
