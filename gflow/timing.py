"""Where a run's time goes: named phases by wall clock, and JAX's own work inside each.

``phase(name)`` times a block; JAX's monitoring events that fire inside it are added to
it: tracing to a jaxpr (``trace``), lowering to an MLIR module (``lower``), XLA's
compilation or a persistent-cache read in its place (``compile``), with counts, and the
persistent compilation cache's hits and misses. What no phase covers is ``other``.
Phases nest: an inner phase's time is its own and is not counted again in the outer
one's ``self`` time. Each thread has its own nesting; phases of two threads overlap in
time (their ``self`` times then add up to more than the wall clock). ``report()`` is
JSON-able (``gflow run`` writes it as ``timing.json``); ``table()`` prints it.

    from gflow import timing
    with timing.phase("my step"):
        ...
    print(timing.table())
"""

from __future__ import annotations

import contextlib
import threading
import time

__all__ = ["phase", "record", "elapsed", "report", "table", "reset"]

_EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
    "/jax/core/compile/backend_compile_duration": "compile",
}
_COUNTS = {
    "/jax/compilation_cache/cache_hits": "cache_hits",
    "/jax/compilation_cache/cache_misses": "cache_misses",
}
_lock = threading.Lock()
_start = time.perf_counter()
_phases: dict[str, dict] = {}
_local = threading.local()  # each thread's open phases: [name, nested seconds]
_installed = False


def _stack() -> list:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _current() -> str:
    st = _stack()
    return st[-1][0] if st else "other"


def _row(name: str) -> dict:
    return _phases.setdefault(
        name,
        dict(wall=0.0, self=0.0, calls=0, trace=0.0, traces=0, lower=0.0, compile=0.0,
             compiles=0, cache_hits=0, cache_misses=0),
    )  # fmt: skip


def _on_duration(event: str, duration: float, **_) -> None:
    kind = _EVENTS.get(event)
    if kind is None:
        return
    with _lock:
        row = _row(_current())
        row[kind] += duration
        if kind == "trace":
            row["traces"] += 1
        elif kind == "compile":
            row["compiles"] += 1


def _on_event(event: str, **_) -> None:
    kind = _COUNTS.get(event)
    if kind is not None:
        with _lock:
            _row(_current())[kind] += 1


def _install() -> None:
    global _installed
    if not _installed:
        import jax.monitoring

        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        jax.monitoring.register_event_listener(_on_event)
        _installed = True


@contextlib.contextmanager
def phase(name: str):
    """Time the block as phase ``name`` (added up over repeated uses), with JAX's
    tracing, lowering and compilation inside it (in this thread: phases of different
    threads overlap, each with its own nesting)."""
    _install()
    st = _stack()
    entry = [name, 0.0]
    st.append(entry)
    t = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t
        st.pop()
        if st:
            st[-1][1] += dt
        with _lock:
            row = _row(name)
            row["wall"] += dt
            row["self"] += dt - entry[1]
            row["calls"] += 1


def record(name: str, seconds: float) -> None:
    """Add ``seconds`` of wall time to phase ``name`` (timed by the caller)."""
    with _lock:
        row = _row(name)
        row["wall"] += seconds
        row["self"] += seconds
        row["calls"] += 1


def elapsed() -> float:
    """Seconds since this module was imported (``import gflow`` imports it first)."""
    return time.perf_counter() - _start


def reset() -> None:
    """Forget every phase (and restart the process clock ``total`` counts from)."""
    global _start
    with _lock:
        _phases.clear()
        _start = time.perf_counter()


def report() -> dict:
    """``{"total": seconds since import or reset, "phases": {name: row}}``; a row has
    ``wall`` (including nested phases), ``self`` (excluding them), ``calls``, ``trace``
    / ``traces``, ``lower``, ``compile`` / ``compiles`` (seconds / counts) and
    ``cache_hits`` / ``cache_misses``."""
    with _lock:
        return dict(total=time.perf_counter() - _start,
                    phases={k: dict(v) for k, v in _phases.items()})  # fmt: skip


def table(rep: dict | None = None) -> str:
    """``report()`` as an aligned text table, one phase a line, in order of first use."""
    rep = rep or report()
    head = f"{'phase':<22}{'self s':>8}{'trace s':>9}{'lower s':>9}{'compile s':>10}{'#comp':>7}"
    lines = [head]
    for name, r in rep["phases"].items():
        lines.append(f"{name:<22}{r['self']:>8.2f}{r['trace']:>9.2f}{r['lower']:>9.2f}"
                     f"{r['compile']:>10.2f}{round(r['compiles']):>7d}")  # fmt: skip
    untimed = rep["total"] - sum(r["self"] for r in rep["phases"].values())
    lines.append(f"{'(untimed)':<22}{untimed:>8.2f}")
    lines.append(f"{'total':<22}{rep['total']:>8.2f}")
    return "\n".join(lines)
