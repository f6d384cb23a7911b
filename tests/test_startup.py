"""Time to first result (issue 19): the persistent compilation cache's switches and its
failure modes, the phase timer, and the status line of ``--no-progress`` runs."""

import io
import os
import subprocess
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import jax
import jax.numpy as jnp

from gflow import timing

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import warnings, gflow, jax, jax.numpy as jnp\n"
    "print('dir', gflow.cache.cache_dir())\n"
    "print('value', float(jax.jit(lambda x: jnp.sin(x) * 3.0)(jnp.float64(0.5))))\n"
)


def _probe(env_cache: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(GFLOW_COMPILATION_CACHE=env_cache, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_cache_fills_a_folder_and_can_be_turned_off(tmp_path):
    folder = tmp_path / "cache"
    res = _probe(str(folder))
    assert res.returncode == 0, res.stderr
    assert f"dir {folder}" in res.stdout
    assert any(p.name.endswith("-cache") for p in folder.iterdir())
    res = _probe("off")
    assert res.returncode == 0, res.stderr
    assert "dir None" in res.stdout


def test_a_damaged_cache_is_ignored_with_a_warning(tmp_path):
    """Every entry overwritten with garbage: the run compiles anew, warns, and computes
    the same value; a cache path that is a file: a warning, no cache, the same value."""
    folder = tmp_path / "cache"
    good = _probe(str(folder))
    assert good.returncode == 0, good.stderr
    entries = [p for p in folder.iterdir() if p.name.endswith("-cache")]
    assert entries
    for p in entries:
        p.write_bytes(b"not an executable")
    res = _probe(str(folder))
    assert res.returncode == 0, res.stderr
    assert "Error reading persistent compilation cache entry" in res.stderr
    value = [line for line in good.stdout.splitlines() if line.startswith("value")]
    assert value and value[0] in res.stdout
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    res = _probe(str(a_file))
    assert res.returncode == 0, res.stderr
    assert "is not usable" in res.stderr and "dir None" in res.stdout
    assert value[0] in res.stdout


def test_phases_nest_and_count_jax_work():
    """An inner phase's time is not the outer one's own; a first jit inside a phase is
    traced and compiled there."""
    timing.reset()
    with timing.phase("outer"):
        time.sleep(0.05)
        with timing.phase("inner"):
            jax.jit(lambda x: jnp.cos(x) + 1.2345)(jnp.ones(7)).block_until_ready()
    rep = timing.report()["phases"]
    outer, inner = rep["outer"], rep["inner"]
    assert outer["wall"] >= inner["wall"] + 0.05
    assert abs(outer["self"] - (outer["wall"] - inner["wall"])) < 1e-9
    assert inner["traces"] >= 1 and inner["compiles"] >= 1 and outer["compiles"] == 0
    assert "inner" in timing.table()


def test_status_line_every_few_seconds_with_the_time_left():
    from gflow.runs import _Progress

    buf = io.StringIO()
    with redirect_stdout(buf):
        bar = _Progress("flow", 100.0, enabled=False, every=0.05)
        time.sleep(0.12)  # no save point yet: "starting"
        bar(dict(log_t=1.0, log_loss=-1.5, step=10))
        time.sleep(0.05)
        bar(dict(log_t=2.0, log_loss=-2.5, step=20))
        time.sleep(0.12)
        bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("flow: starting")
    last = lines[-1]
    assert "log t 2/100" in last and "log Loss -2.5" in last and "step 20" in last
    assert "elapsed" in last and "left" in last and "about ? left" not in last
    n = len(lines)
    time.sleep(0.12)
    assert len(buf.getvalue().splitlines()) == n  # closed: no more lines


def test_a_full_disk_leaves_no_truncated_cache_entry(tmp_path):
    """Writes that fail past 2 kB (RLIMIT_FSIZE, as a full disk fails them): every
    entry in the cache folder is whole afterwards, so the next run reads them all
    without a warning (JAX writes entries in place; gflow.cache renames them in)."""
    folder = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    env.update(GFLOW_COMPILATION_CACHE=str(folder), PYTHONPATH=str(ROOT))
    small = (
        "import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n" + PROBE
    )
    res = subprocess.run([sys.executable, "-c", small], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert not list(folder.glob(".*.tmp"))  # no temporary file left either
    res = _probe(str(folder))
    assert res.returncode == 0, res.stderr
    assert "Error reading persistent compilation cache entry" not in res.stderr
