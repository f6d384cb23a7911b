"""Resumable runs: an orbax checkpoint of the whole loop state at save points.

``run_gd`` and ``run_flow`` take ``checkpoint=Checkpointer(folder, every=seconds)``.
After each save point (``every = 0``) or the first one ``every`` seconds after the last
checkpoint (``Checkpointer.due``) they write everything the loop needs to go on: the
dynamics' state (parameters, optimizer and schedule state, RNG key; for the flow the ODE
state, clock, step size and Lanczos vector), the counters, and the trajectory recorded
so far. With
``resume=True`` they start from the latest checkpoint instead of ``params0``. Each
save point's arithmetic depends only on that state, so a resumed run reproduces an
uninterrupted one bit for bit on the same machine.

Checkpoints live in ``<folder>/checkpoint/<index>/``. orbax writes each one into a
temporary folder and renames it when complete, and keeps only the newest; a run killed
mid-write leaves a temporary folder that ``restore`` ignores.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gflow.errors import one_line, summarize
from gflow.trajectory import flatten_params, unflatten_params

__all__ = ["Checkpointer", "pack", "unpack"]


def pack(prefix: str, tree) -> dict[str, np.ndarray]:
    """The leaves of ``tree`` as ``{f"{prefix}{i}": array}`` (PRNG keys as their data)."""
    out = {}
    for i, leaf in enumerate(jax.tree.leaves(tree)):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            leaf = jax.random.key_data(leaf)
        out[f"{prefix}{i}"] = np.asarray(leaf)
    return out


def unpack(prefix: str, template, arrays: dict[str, np.ndarray]):
    """Inverse of ``pack``: ``template``'s structure, dtypes and key types, ``arrays``' values."""
    leaves, treedef = jax.tree.flatten(template)
    new = []
    for i, leaf in enumerate(leaves):
        a = arrays[f"{prefix}{i}"]
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            impl = jax.random.key_impl(leaf)
            new.append(jax.random.wrap_key_data(jax.numpy.asarray(a), impl=impl))
        else:
            new.append(jax.numpy.asarray(a, dtype=getattr(leaf, "dtype", None)))
    return jax.tree.unflatten(treedef, new)


def pack_params_list(prefix: str, trees: list) -> dict[str, np.ndarray]:
    """Parameter pytrees by path (their structure comes back with ``unpack_params_list``)."""
    out = {}
    for i, t in enumerate(trees):
        out.update({f"{prefix}{i}|{k}": v for k, v in flatten_params(t).items()})
    return out


def unpack_params_list(prefix: str, arrays: dict[str, np.ndarray], n: int) -> list:
    out = []
    for i in range(n):
        p = f"{prefix}{i}|"
        out.append(unflatten_params({k[len(p) :]: v for k, v in arrays.items() if k.startswith(p)}))
    return out


class Checkpointer:
    """Save / restore ``(arrays, meta)`` under ``<folder>/checkpoint`` with orbax.

    ``arrays``: a flat ``{name: array}``; ``meta``: JSON-able (floats round-trip exactly,
    infinities included).
    """

    def __init__(self, folder: str | Path, every: float = 0.0):
        if not every >= 0:
            raise ValueError(f"every must be >= 0 seconds, got {every}")
        self.path = Path(folder).resolve() / "checkpoint"
        self.every = float(every)
        self._manager = None
        self._last: float | None = None

    def due(self) -> bool:
        """Whether a save point should write a checkpoint: always with ``every = 0``, else
        once ``every`` seconds have passed since this process's last one (or its first
        save point): a crash then loses at most that much work, and a short run spends
        no time writing (about 40 ms a checkpoint)."""
        now = time.monotonic()
        if self._last is None:
            self._last = now
        return self.every == 0 or now - self._last >= self.every

    def _mgr(self):
        if self._manager is None:
            import orbax.checkpoint as ocp

            # orbax's writer threads log each failure with a traceback, and the same
            # failure reaches ``save`` / ``restore`` as an exception, reported in one line
            logging.getLogger("absl").setLevel(logging.CRITICAL)
            self._manager = ocp.CheckpointManager(
                self.path,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=1, enable_async_checkpointing=False, create=True
                ),
            )
        return self._manager

    def exists(self) -> bool:
        return self.path.is_dir() and self._mgr().latest_step() is not None

    def save(self, index: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Write checkpoint ``index``; an ``OSError`` naming the folder when it cannot be
        written (a full disk), with the previous checkpoint kept for ``resume``."""
        self._last = time.monotonic()
        with _interrupts_deferred():
            try:
                self._save(index, arrays, meta)
            except Exception as e:
                self._abandon()
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                first = one_line(reason, 200)
                raise OSError(
                    getattr(e, "errno", None) or 0,
                    f"could not write checkpoint {index} ({first}); the previous one is kept",
                    str(self.path),
                ) from None

    def _abandon(self) -> None:
        """Let orbax's writer threads end before the error travels up (else they outlive
        the interpreter and print tracebacks at exit), then forget the manager."""
        manager, self._manager = self._manager, None
        if manager is not None:
            with contextlib.suppress(Exception):
                manager.close()
        for thread in threading.enumerate():  # close() leaves the metadata writer running
            if thread is not threading.current_thread() and "orbax" in type(thread).__module__:
                thread.join(timeout=10)

    def _save(self, index: int, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        import orbax.checkpoint as ocp

        names = sorted(arrays)
        state = {f"a{i}": np.asarray(arrays[k]) for i, k in enumerate(names)}
        mgr = self._mgr()
        mgr.save(
            int(index),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({"names": names, **meta}),
            ),
            force=True,
        )
        mgr.wait_until_finished()

    def restore(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The latest complete checkpoint, or None when there is none."""
        import orbax.checkpoint as ocp

        if not self.path.is_dir():
            return None
        mgr = self._mgr()
        step = mgr.latest_step()
        if step is None:
            return None
        try:
            got = mgr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()
                ),
            )
            meta = dict(got["meta"])
            names = meta.pop("names")
            state = got["state"]
            arrays = {k: np.asarray(state[f"a{i}"]) for i, k in enumerate(names)}
        except Exception as e:  # orbax / tensorstore raise many kinds, with long messages
            raise ValueError(
                f"the checkpoint {self.path / str(step)} is damaged ({summarize(e)}); "
                "remove that folder to go on from the previous save point or "
                "start over"
            ) from None
        return arrays, meta

    def clear(self) -> None:
        """Remove the checkpoints (the run finished and its files are written)."""
        import shutil

        self._manager = None
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_deferred():
    """Hold Ctrl-C until the block ends, then raise it: a checkpoint is written whole.
    (Interrupted mid-save, orbax's writer thread went on into interpreter shutdown and
    printed a traceback.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        # (None: a handler not installed from Python; Python's own is the fallback)
        signal.signal(
            signal.SIGINT, previous if previous is not None else signal.default_int_handler
        )
    if got:
        raise KeyboardInterrupt


def recorder_state(rec) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A ``TrajectoryRecorder``'s rows, snapshots and checkpoints as ``(arrays, meta)``."""
    marks = list(rec.checkpoints.items())
    arrays = pack_params_list("snap", rec.snapshots)
    arrays.update(pack_params_list("mark", [v["params"] for _, v in marks]))
    if rec.monitor is not None and rec.monitor.last_unit is not None:
        arrays["unit"] = rec.monitor.last_unit
    meta = {
        "rows": rec.rows,
        "num_snapshots": len(rec.snapshots),
        "marks": [[label, v["step"], v["log_t"]] for label, v in marks],
        "monitor": None if rec.monitor is None else rec.monitor.state(),
    }
    return arrays, meta


def restore_recorder(rec, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Put ``recorder_state``'s output back into ``rec`` (a fresh recorder)."""
    rec.rows = [dict(r) for r in meta["rows"]]
    if meta.get("monitor") is not None:
        from gflow.invariants import Monitor

        rec.monitor = Monitor.from_state(meta["monitor"])
        rec.monitor.last_unit = arrays.get("unit")
    rec.snapshots = unpack_params_list("snap", arrays, meta["num_snapshots"])
    params = unpack_params_list("mark", arrays, len(meta["marks"]))
    rec.checkpoints = {
        label: {"params": p, "step": int(step), "log_t": float(log_t)}
        for (label, step, log_t), p in zip(meta["marks"], params, strict=True)
    }


def recorders_state(recs: list) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """``recorder_state`` of K recorders (a batch of runs): arrays under ``r<k>/``."""
    arrays, metas = {}, []
    for k, rec in enumerate(recs):
        a, m = recorder_state(rec)
        arrays.update({f"r{k}/{name}": v for name, v in a.items()})
        metas.append(m)
    return arrays, metas


def restore_recorders(recs: list, arrays: dict[str, np.ndarray], metas: list) -> None:
    """Inverse of ``recorders_state``."""
    for k, (rec, m) in enumerate(zip(recs, metas, strict=True)):
        p = f"r{k}/"
        restore_recorder(rec, {n[len(p) :]: v for n, v in arrays.items() if n.startswith(p)}, m)
