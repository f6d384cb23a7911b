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
import numpy as np
import pytest

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


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    """gflow's cache in a folder of this test (and back to the session's afterwards), with
    traced programs kept and the in-process memo of them cleared, as in a new process."""
    from gflow import cache

    before = cache.cache_dir()
    monkeypatch.setenv(cache.TRACED_ENV, "on")  # the suite turns it off (conftest)
    _new_process()
    cache.configure(tmp_path / "cache")
    yield tmp_path / "cache" / "traced"
    _new_process()
    cache.configure(before if before is not None else "off")


def _new_process():
    """Forget the flow's traced programs held in this process (as a new one would)."""
    from gflow.dynamics import segments, stability

    segments.vmapped.cache_clear()
    stability.vmapped_stiffness.cache_clear()


def _flow(activation="relu"):
    from gflow import data as D
    from gflow.dynamics import run_flow
    from gflow.models import build_model
    from gflow.objective import make_objective

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 20, seed=0), "unit")
    model = build_model("mlp", ds.input_shape, 1, width=6, activation=activation)
    obj, p0 = make_objective(model, ds, "logistic")
    return run_flow(obj, p0, solver="ralston", cfl=0.14, rtol=3e-5, atol=3e-8,
                    log_t_max=4.0, saves=4)  # fmt: skip


def _same_columns(a, b):
    assert a.column_names == b.column_names
    for c in a.column_names:
        np.testing.assert_array_equal(a[c], b[c], err_msg=c)


def test_traced_segments_are_kept_and_read_back(own_cache, monkeypatch):
    """The flow's programs (warm-up and stable segments, which the error estimate's
    shadow shares at its own tolerances, Jacobian products, drift bound) are exported once;
    a new process reads them without tracing, bit for bit the same run; a damaged entry
    is traced and written anew."""
    first = _flow()
    kept = sorted(own_cache.glob("*.jaxexport"))
    assert len(kept) == 4
    _new_process()
    with monkeypatch.context() as m:  # read back: no export, so no tracing of the segments
        m.setattr(jax.export, "export", _no_export)
        _same_columns(_flow(), first)
    _new_process()
    for path in kept:
        path.write_bytes(path.read_bytes()[:100])  # truncated
    _same_columns(_flow(), first)
    assert all(p.stat().st_size > 100 for p in kept)  # written whole again
    jax.export.deserialize(bytearray(kept[0].read_bytes()))


def _no_export(*args, **kwargs):
    raise AssertionError("traced again")


def test_another_model_is_another_entry(own_cache):
    """Same shapes, another activation: the key holds the model's static fields."""
    _flow("relu")
    _flow("leaky_relu")
    assert len(list(own_cache.glob("*.jaxexport"))) == 8


def test_a_model_of_ones_own_is_only_jitted(own_cache):
    """A pure-function model's code is not in the key: nothing is kept for it."""
    from gflow import data as D
    from gflow.dynamics import run_flow
    from gflow.models import build_model, split_params
    from gflow.objective import make_objective

    ds = D.normalize(D.sample(D.keep_classes(D.digits(), (0, 1)), 20, seed=0), "unit")
    w = split_params(build_model("mlp", ds.input_shape, 1, width=6))[1]

    def apply_fn(params, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["layers"][0]["kernel"])
        return h @ params["layers"][1]["kernel"]

    obj, _ = make_objective(apply_fn, ds, "logistic", order=2, params=w)
    tr = run_flow(obj, w, solver="ralston", cfl=0.14, rtol=3e-5, atol=3e-8, log_t_max=3.0,
                  saves=3)  # fmt: skip
    assert tr.status == "completed"
    assert not list(own_cache.glob("*.jaxexport"))


def test_gflow_traced_off_keeps_compiling_but_not_tracing(own_cache, monkeypatch):
    """``GFLOW_TRACED=off``: no traced program is written (compiled ones still are)."""
    from gflow import cache

    monkeypatch.setenv(cache.TRACED_ENV, "off")
    assert cache.traced_dir() is None
    _flow()
    assert not own_cache.exists() or not list(own_cache.glob("*.jaxexport"))
    assert any(p.name.endswith("-cache") for p in own_cache.parent.iterdir())


def test_a_kept_program_that_fails_is_dropped_and_traced_anew(own_cache, monkeypatch):
    """A kept program whose first call fails (say, one the libraries here cannot run) is
    removed and the function traced as usual: the run is the same."""
    first = _flow()
    kept = sorted(own_cache.glob("*.jaxexport"))
    _new_process()

    class Broken:
        def call(self, *args):
            raise RuntimeError("cannot run here")

    with monkeypatch.context() as m:
        m.setattr(jax.export, "deserialize", lambda data: Broken())
        _same_columns(_flow(), first)
    assert not any(p.exists() for p in kept)  # dropped


def test_a_cache_folder_under_an_unknown_user_warns_and_runs_uncached(tmp_path):
    """``GFLOW_COMPILATION_CACHE='~nosuchuser/x'``: ``~user`` that does not resolve was a
    traceback on every command and on ``import gflow`` (issue 29 item 4); it is a warning
    and an uncached run."""
    env = {**os.environ, "GFLOW_COMPILATION_CACHE": "~gflow-no-such-user-x/cache"}
    p = subprocess.run([sys.executable, "-c", "import gflow, gflow.cache as c; "
                        "print(c.cache_dir())"], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr and "is not usable" in p.stderr
    assert p.stdout.strip() == "None"
    assert [ln for ln in p.stderr.splitlines() if ln.strip()] == [
        ln for ln in p.stderr.splitlines() if ln.startswith("gflow: warning: ")
    ]  # one line each, no Python warning header pointing into gflow


def _umask_probe(tmp_path, env: dict, mask: int = 0o000) -> subprocess.CompletedProcess:
    """``PROBE`` in a process whose umask is ``mask`` (000: every new file world-writable
    unless gflow says otherwise)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    full.update(PYTHONPATH=str(ROOT), **env)
    # the umask set by a shell that then becomes Python (no preexec_fn: it forks a
    # multithreaded process)
    return subprocess.run(["sh", "-c", f'umask {mask:03o} && exec "$0" -c "$1"',
                           sys.executable, PROBE], env=full, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_the_cache_is_private_whatever_the_umask(tmp_path):
    """Issue 29 item 3: under umask 000 the cache's folders were 777 and its entries 666,
    so another user could plant programs that JAX loads. Folders gflow creates are 0700
    and the entries 0600."""
    res = _umask_probe(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert res.returncode == 0, res.stderr
    jaxdir = tmp_path / "xdg" / "gflow" / "jax"
    assert f"dir {jaxdir}" in res.stdout
    for folder in (tmp_path / "xdg", tmp_path / "xdg" / "gflow", jaxdir):
        assert _mode(folder) == 0o700, folder
    entries = [p for p in jaxdir.iterdir() if p.name.endswith(("-cache", "-atime"))]
    assert entries and all(_mode(p) == 0o600 for p in entries), [
        (p.name, oct(_mode(p))) for p in entries
    ]


@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_cache_others_can_write_is_refused(tmp_path, mode):
    """An existing cache folder writable by group or others is not used: a one-line
    warning naming it and an uncached run (the value still right)."""
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, mode)
    res = _umask_probe(tmp_path, {"GFLOW_COMPILATION_CACHE": str(folder)})
    assert res.returncode == 0, res.stderr
    assert "dir None" in res.stdout
    value = float(res.stdout.split("value ")[1].split()[0])
    assert abs(value - 3 * np.sin(0.5)) <= 4 * np.finfo(float).eps  # a few ulps of sin
    (line,) = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert line.startswith("gflow: warning: ") and str(folder) in line and "writable by" in line
    assert not list(folder.iterdir())  # nothing written into it


def test_a_cache_of_another_user_is_refused(tmp_path, monkeypatch):
    """A cache folder owned by another user is refused (here: this process pretends to be
    another user, as root could not otherwise be one)."""
    from gflow import cache

    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: folder.stat().st_uid + 1)
    assert "owned by another user" in cache._private(folder)


def test_blank_cache_folders_and_bad_switches(tmp_path, capsys):
    """``--compilation-cache ''`` wrote programs into the current folder, a blank
    ``GFLOW_COMPILATION_CACHE`` made a folder named by blanks, ``GFLOW_TRACED=maybe`` was
    taken as on: now an error, a warning and an uncached run, a warning and nothing kept."""
    from gflow.cli import main

    for blank in ("", "   "):
        assert main(["run", "--compilation-cache", blank, "--no-plot", "--no-progress",
                     "--out", str(tmp_path / "r")]) == 2  # fmt: skip
        err = capsys.readouterr().err
        assert err.startswith("gflow: error: the compilation cache folder is blank"), err
    assert not (tmp_path / "r").exists()
    res = _umask_probe(tmp_path, {"GFLOW_COMPILATION_CACHE": "   "}, mask=0o022)
    assert res.returncode == 0 and "dir None" in res.stdout, res.stderr
    assert "is blank" in res.stderr and sorted(os.listdir(tmp_path)) == []
    probe = "import gflow.cache as c; print(c.traced_on())"
    for value, on in (("maybe", False), ("TRUE", True), ("0", False), ("", True)):
        env = {**os.environ, "GFLOW_TRACED": value, "GFLOW_COMPILATION_CACHE": "off"}
        p = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert p.stdout.strip() == str(on), (value, p.stderr)
        assert ("is not one of on, off" in p.stderr) == (value == "maybe"), p.stderr
