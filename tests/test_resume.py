"""Checkpoint / resume: a run cut at any save point and resumed equals the uninterrupted one."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from gflow.checkpoint import Checkpointer
from gflow.dynamics import StabilityStepping, run_flow, run_flow_seeds, run_gd, run_gd_seeds
from tests.conftest import digits_inits


class _Crash(Exception):
    pass


def _crash_after(rows: int):
    seen = []

    def progress(row):
        if "q_min" in row:  # a save point (GD also reports between them)
            seen.append(row)
            if len(seen) > rows:
                raise _Crash

    return progress


def _counter():
    rows = []

    def progress(row):
        if "q_min" in row:
            rows.append(row)

    return rows, progress


def _same(a, b):
    assert a.status == b.status and a.message == b.message
    assert a.column_names == b.column_names and len(a) == len(b)
    for c in a.column_names:
        np.testing.assert_array_equal(a[c], b[c], err_msg=c)
    for x, y in zip(jax.tree.leaves(a.final_params), jax.tree.leaves(b.final_params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert list(a.checkpoints) == list(b.checkpoints)
    for k in a.checkpoints:
        for x, y in zip(
            jax.tree.leaves(a.checkpoints[k]["params"]),
            jax.tree.leaves(b.checkpoints[k]["params"]),
            strict=True,
        ):
            np.testing.assert_array_equal(x, y)


GD_CASES = {
    "loss-based": dict(schedule="loss-based", log_t_max=30.0, saves=12),
    "sgd": dict(schedule="loss-based", batch_size=20, log_t_max=12.0, saves=8, seed=3),
    "steps": dict(schedule="constant", lr=0.5, max_steps=300, saves=10),
}


@pytest.mark.parametrize("case", sorted(GD_CASES))
def test_gd_resumed_after_a_crash_equals_the_uninterrupted_run(case, small, tmp_path):
    obj, p0 = small
    kw = dict(GD_CASES[case], save_params=True, checkpoint_log_losses=(-2.0, -5.0))
    whole = run_gd(obj, p0, **kw)
    ck = Checkpointer(tmp_path)
    with pytest.raises(_Crash):
        run_gd(obj, p0, **kw, checkpoint=ck, progress=_crash_after(5))
    assert ck.exists()
    rows, count = _counter()
    resumed = run_gd(obj, p0, **kw, checkpoint=Checkpointer(tmp_path), resume=True, progress=count)
    _same(resumed, whole)
    assert 0 < len(rows) == len(whole) - 5  # it went on from the 5th save point
    assert len(resumed.snapshots) == len(whole.snapshots) == len(whole)


@pytest.mark.parametrize(
    "kw",
    [
        dict(solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7),  # stability stepping after warm-up
        dict(solver="tsit5", rtol=1e-5, atol=1e-8, clock="time"),
        # in the span of the inputs (60 digits span fewer than their 64 pixels)
        dict(solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7, input_span=True),
        # the cfl chosen from the error estimate (its cfl and peak are checkpointed)
        dict(stepsize_controller=StabilityStepping(), accuracy=1e-3),
    ],
    ids=["stability-stepping", "tsit5-time", "input-span", "cfl-from-estimate"],
)
def test_flow_resumed_after_a_crash_equals_the_uninterrupted_run(kw, small, tmp_path):
    obj, p0 = small
    kw = dict(kw, log_t_max=12.0, saves=10)
    whole = run_flow(obj, p0, **kw)
    assert (whole.config["input_span"] is not None) == ("input_span" in kw)
    for cut in (2, 7):
        ck = Checkpointer(tmp_path / str(cut))
        with pytest.raises(_Crash):
            run_flow(obj, p0, **kw, checkpoint=ck, progress=_crash_after(cut))
        rows, count = _counter()
        resumed = run_flow(obj, p0, **kw, checkpoint=ck, resume=True, progress=count)
        _same(resumed, whole)
        assert 0 < len(rows) == len(whole) - cut


@pytest.fixture(scope="module")
def inits():
    """Three initialisations of ``small``'s model (seeds 3, 4, 5)."""
    return digits_inits((3, 4, 5), 60, width=8)


@pytest.mark.parametrize("dynamics", ["gd", "flow", "flow-span"])
def test_seeds_resumed_after_a_crash_equal_the_uninterrupted_runs(dynamics, small, inits, tmp_path):
    """A crash part-way through recording a save point (some runs' rows written, not the
    checkpoint) resumes from the save point before it, bit for bit."""
    obj, _ = small
    if dynamics == "gd":
        run, kw = run_gd_seeds, dict(schedule="loss-based", log_t_max=20.0, saves=8)
    else:
        run = run_flow_seeds
        kw = dict(solver="rk4", cfl=0.9, rtol=1e-4, atol=1e-7, log_t_max=6.0, saves=6)
        if dynamics == "flow-span":
            kw["input_span"] = True
    seeds = [3, 4, 5]
    whole = run(obj, inits, seeds=seeds, **kw)
    ck = Checkpointer(tmp_path)
    with pytest.raises(_Crash):  # 3 rows per save point: the 14th is mid-way through the 5th
        run(obj, inits, seeds=seeds, **kw, checkpoint=ck, progress=_crash_after(13))
    rows, count = _counter()
    resumed = run(obj, inits, seeds=seeds, **kw, checkpoint=ck, resume=True, progress=count)
    for a, b in zip(resumed, whole, strict=True):
        _same(a, b)
    assert 0 < len(rows) < sum(len(tr) for tr in whole) - 9


def test_resume_without_a_checkpoint_starts_from_the_beginning(small, tmp_path):
    obj, p0 = small
    a = run_gd(obj, p0, max_steps=50, saves=5)
    b = run_gd(obj, p0, max_steps=50, saves=5, checkpoint=Checkpointer(tmp_path), resume=True)
    _same(a, b)


def test_checkpoints_wait_every_seconds(small, tmp_path, monkeypatch):
    """``every``: a checkpoint at the first save point ``every`` seconds after the last
    one, none in between (a clock advanced by hand, 4 s a save point: with every = 10 the
    written save points are at least 3 apart); ``every = 0``: at each save point. A run
    cut part-way resumes from its last checkpoint and equals the uninterrupted one."""
    import time

    obj, p0 = small
    now = [0.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])

    class Counted(Checkpointer):
        def _save(self, index, arrays, meta):
            written.append(index)
            super()._save(index, arrays, meta)

    def tick(rows):
        crash = _crash_after(rows)

        def progress(row):
            if "q_min" in row:
                now[0] += 4.0
            crash(row)

        return progress

    kw = dict(max_steps=80, saves=8)
    whole = run_gd(obj, p0, **kw)
    written: list = []
    with pytest.raises(_Crash):
        run_gd(obj, p0, **kw, checkpoint=Counted(tmp_path / "a", every=10.0), progress=tick(6))
    assert written and min(np.diff([0, *written])) >= 3, written
    rows, count = _counter()
    _same(run_gd(obj, p0, **kw, checkpoint=Checkpointer(tmp_path / "a"), resume=True,
                 progress=count), whole)  # fmt: skip
    assert len(rows) == sum(len(tr) for tr in [whole]) - written[-1]
    written = []
    with pytest.raises(_Crash):
        run_gd(obj, p0, **kw, checkpoint=Counted(tmp_path / "b", every=0.0), progress=tick(6))
    assert np.all(np.diff(written) == 1) and len(written) >= 5, written
    with pytest.raises(ValueError, match="every"):
        Checkpointer(tmp_path, every=-1.0)


def test_a_half_written_checkpoint_is_ignored(small, tmp_path):
    obj, p0 = small
    ck = Checkpointer(tmp_path)
    with pytest.raises(_Crash):
        run_gd(obj, p0, max_steps=80, saves=8, checkpoint=ck, progress=_crash_after(4))
    # a kill during a write leaves orbax's temporary folder: never trusted
    tmp = ck.path / "99.orbax-checkpoint-tmp-12345"
    tmp.mkdir()
    (tmp / "junk").write_bytes(b"\0" * 10)
    resumed = run_gd(obj, p0, max_steps=80, saves=8, checkpoint=Checkpointer(tmp_path), resume=True)
    _same(resumed, run_gd(obj, p0, max_steps=80, saves=8))


def test_a_damaged_checkpoint_is_one_line_naming_it(small, tmp_path):
    """A checkpoint with a file missing (here orbax's meta/metadata): resume stops with
    one line naming the checkpoint, not orbax's traceback."""
    obj, p0 = small
    ck = Checkpointer(tmp_path / "run")
    run_gd(obj, p0, schedule="loss-based", log_t_max=3.0, saves=4, checkpoint=ck)
    step = max(int(p.name) for p in ck.path.iterdir() if p.name.isdigit())
    (ck.path / str(step) / "meta" / "metadata").unlink()
    with pytest.raises(ValueError) as info:
        run_gd(obj, p0, schedule="loss-based", log_t_max=3.0, saves=4,
               checkpoint=Checkpointer(tmp_path / "run"), resume=True)  # fmt: skip
    msg = str(info.value)
    assert "\n" not in msg and "is damaged" in msg and str(ck.path / str(step)) in msg
