"""No option is silently dropped (issue 29 item 5), and Ctrl-C always says how to go on
(item 8).

An option that the chosen run would not read is an error naming it and why (exit 2, one
line, no folder); from a ``--config`` file a warning, with run.json recording what ran.
A Ctrl-C anywhere after the run folder has its run.json ends with the ``--resume``
command and exit code 130."""

from __future__ import annotations

import json

import pytest

from gflow.cli import main

# a linear model on 40 points of 2-d synthetic data: below the loss threshold in seconds
SMALL = ["run", "--data", "synthetic", "--model", "linear", "--n", "40", "--log-t-max", "6",
         "--saves", "6", "--no-plot", "--no-progress", "--checkpoint-every", "0"]  # fmt: skip


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gflow: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--dynamics", "gd", "--kinks"],
         "--kinks applies to the flow; --dynamics gd runs no flow"),
        (["--dynamics", "gd", "--solver", "rk4", "--rtol", "1e-6"],
         "--solver, --rtol apply to the flow"),
        (["--dynamics", "gd", "--input-span", "on"], "--input-span applies to the flow"),
        (["--dynamics", "gd", "--kink-fallback", "5"], "--kink-fallback applies to the flow"),
        (["--dynamics", "flow", "--lr", "0.1"], "--lr applies to GD; --dynamics flow runs no GD"),
        # given at its default value: still given
        (["--dynamics", "flow", "--sharpness-every", "1"], "--sharpness-every applies to GD"),
        (["--kink-fallback", "100"], "--kink-fallback applies under --kinks only"),
        (["--dynamics", "flow", "--kinks", "--input-span", "off"],
         "--input-span applies to the flow's default stepping"),
        (["--lr", "0.1"], "--lr applies to --schedule constant"),
        (["--schedule", "constant", "--alpha0", "0.3"],
         "--alpha0 applies to --schedule loss-based"),
        (["--batch-size", "10", "--schedule", "constant", "--loss-ub", "600"],
         "--loss-ub applies to --schedule loss-based"),
        (["--loss-ub", "600"], "--loss-ub applies to mini-batches"),
        (["--batch-size", "10", "--sharpness-every", "3"],
         "--sharpness-every applies to full-batch GD; --batch-size 10 runs SGD"),
        # 40 points in 2 dimensions: full rank, nothing to leave out
        (["--input-span", "on"], "--input-span on cannot apply: the 40 inputs span all d = 2"),
        (["--data", "digits", "--model", "cnn", "--width", "2", "--depth", "1", "--input-span",
          "on"], "--input-span on cannot apply: --model cnn is not one of gflow's MLPs"),
    ],
)  # fmt: skip
def test_an_option_the_run_would_not_read_is_an_error_naming_it(tmp_path, capsys, extra, needle):
    out = tmp_path / "r"
    assert main([*SMALL, *extra, "--out", str(out)]) == 2
    assert needle in _one_error_line(capsys)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_library_refuses_the_same(tmp_path):
    from gflow.runs import RunOptions, run

    out = tmp_path / "r"
    with pytest.raises(ValueError, match="--kinks applies to the flow; --dynamics gd"):
        run(RunOptions(data="synthetic", model="linear", n=40, dynamics="gd", kinks=True,
                       out=str(out)))  # fmt: skip
    assert not out.exists()


@pytest.mark.parametrize(
    "opts",
    [
        dict(kinks=True),  # --dynamics both: --kinks is the flow part's
        dict(dynamics="flow", kinks=True, kink_fallback=50.0),
        dict(dynamics="gd", schedule="constant", lr=0.1),
        dict(dynamics="gd", batch_size=40, n=40, sharpness_every=3),  # a full batch: GD
        dict(batch_size=10, loss_ub=600.0),
        dict(dynamics="flow", input_span="on"),  # decided on the data (built later)
    ],
)
def test_options_that_apply_pass(opts):
    from gflow.runs import RunOptions, _given, _refuse_dropped

    args = RunOptions(**opts)
    _refuse_dropped(args, _given(args))
    assert {k: getattr(args, k) for k in opts} == opts  # and nothing is changed


def test_input_span_on_where_it_applies_runs_reduced(tmp_path):
    out = tmp_path / "r"
    argv = ["run", "--data", "digits", "--classes", "0,1", "--n", "20", "--model", "linear",
            "--dynamics", "flow", "--input-span", "on", "--log-t-max", "3", "--saves", "3",
            "--no-plot", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(argv) in (0, 1)
    assert json.loads((out / "run.json").read_text())["input_span"] == "on"
    rank = json.loads((out / "config.json").read_text())["config"]["input_span"]
    assert isinstance(rank, int) and 0 < rank <= 20


def test_a_config_file_option_the_run_does_not_read_is_a_warning_and_not_recorded(
    tmp_path, capsys
):
    """A config file is a set of defaults (often shared by GD and flow runs): its options
    that this run does not read are one warning line each, and run.json records them at
    their defaults, not as used."""
    cfg = tmp_path / "c.toml"
    cfg.write_text('kinks = true\nsolver = "rk4"\ninput-span = "on"\n')
    out = tmp_path / "r"
    assert main([*SMALL, "--dynamics", "gd", "--config", str(cfg), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    warned = [line for line in err.splitlines() if line.startswith("gflow: warning: ")]
    assert any("--solver, --kinks, --input-span apply to the flow" in w for w in warned), err
    saved = json.loads((out / "run.json").read_text())
    assert saved["kinks"] is False and saved["input_span"] == "auto"
    assert saved["solver"] is None and saved["dynamics"] == "gd"  # None: the default


def test_input_span_on_from_a_config_file_records_off(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('input-span = "on"\n')
    out = tmp_path / "r"
    argv = [*SMALL, "--dynamics", "flow", "--log-t-max", "2", "--config", str(cfg), "--out",
            str(out)]  # fmt: skip
    assert main(argv) in (0, 1)
    assert "input-span = \"on\"" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["input_span"] == "off"


def test_output_options_that_do_nothing_warn(capsys):
    from gflow.runs import RunOptions, _given, _warn_unused_output

    args = RunOptions(no_checkpoint=True, checkpoint_every=3.0, status_every=2.0)
    _warn_unused_output(args, _given(args), hosts=1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert err[0].startswith("gflow: warning: --checkpoint-every does nothing: --no-checkpoint")
    assert err[1].startswith("gflow: warning: --status-every does nothing without --no-progress")
    args = RunOptions(checkpoint_every=3.0, status_every=2.0, no_progress=True)
    _warn_unused_output(args, _given(args), hosts=1)
    assert capsys.readouterr().err == ""


# --- Ctrl-C between GD and the flow -------------------------------------------------------


def _ctrl_c_once(monkeypatch, module, name):
    """Make ``module.name`` raise KeyboardInterrupt on its first call (as a SIGINT there
    would), then behave as before."""
    real = getattr(module, name)
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    return calls


@pytest.mark.parametrize("where", ["checks after GD", "flow start"])
def test_ctrl_c_between_gd_and_the_flow_says_how_to_resume(tmp_path, capsys, monkeypatch, where):
    import gflow.dynamics
    import gflow.theory

    if where == "flow start":
        calls = _ctrl_c_once(monkeypatch, gflow.dynamics, "run_flow")
    else:
        calls = _ctrl_c_once(monkeypatch, gflow.theory, "check_run")
    out = tmp_path / "r"
    assert main([*SMALL, "--dynamics", "both", "--out", str(out)]) == 130
    assert calls, "the interruption point was not reached"
    err = capsys.readouterr().err
    assert f"gflow: interrupted; go on with: gflow run --resume {out}" in err, err
    assert "Traceback" not in err
    gd = json.loads((out / "gd" / "config.json").read_text())
    assert gd["status"] == "completed"
    assert not (out / "flow" / "config.json").exists()
    monkeypatch.undo()
    # (1: this small flow's fidelity verdict may FAIL at the default tolerance; what
    # matters here is that the resume runs the flow to the end)
    assert main(["run", "--resume", str(out), "--no-plot", "--no-progress"]) in (0, 1)
    text = capsys.readouterr().out
    assert "gd: already completed" in text
    assert json.loads((out / "flow" / "config.json").read_text())["status"] == "completed"
    assert (out / "gd" / "checks.json").is_file()


def test_ctrl_c_reaching_main_with_a_run_folder_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """The command's own handler (a Ctrl-C outside ``gflow.runs.run``'s) names the folder
    too, once it holds a run.json; before that there is nothing to resume."""
    import gflow.runs

    out = tmp_path / "r"

    def claimed_then_interrupted(args):
        folder, _ = gflow.runs.claim(out, unique=False, resume=False)
        (folder / "run.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(gflow.runs, "run", claimed_then_interrupted)
    assert main([*SMALL, "--out", str(out)]) == 130
    assert f"gflow: interrupted; go on with: gflow run --resume {out}" in capsys.readouterr().err

    def interrupted_early(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(gflow.runs, "run", interrupted_early)
    assert main([*SMALL, "--out", str(tmp_path / "s")]) == 130
    assert capsys.readouterr().err.strip() == "gflow: interrupted"
