"""A run folder is data (issue 29 item 1): opening, checking or attacking a folder
someone sent never runs code from it.

A library run keeps its objective as ``objective.json`` (the model's spec, ``gflow.specs``)
and ``objective.npz``; only a model that has no spec (a pure function, a class of a
script) is kept as ``objective.pkl``, a pickle, which is loaded only with
``--trust-code`` / ``trust_code=True``. The planted pickles here would create a marker
file when unpickled: the marker is the proof that code ran.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from gflow import specs
from gflow.cli import main
from gflow.dynamics import run_gd
from gflow.errors import GflowWarning, UntrustedCode
from gflow.models import build_model, split_params
from gflow.objective import load_objective, make_objective, margins
from gflow.trajectory import Trajectory
from tests.conftest import digits_problem

ROOT = Path(__file__).resolve().parent.parent


class _Plant:
    """Unpickling this opens (so creates) ``path``: code of the pickle's choosing ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# 30 unit-norm digits 0/1, a width-5 ReLU MLP, the exponential loss
PROBLEM = digits_problem(30, width=5, loss="exp")


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    """A library run of one of gflow's models, saved: its objective is data."""
    _, _, obj, p0 = PROBLEM.build()
    tr = run_gd(obj, p0, schedule="loss-based", log_t_max=3.0, saves=4, save_params=True)
    folder = tr.save(tmp_path_factory.mktemp("own") / "run")
    return folder, obj, tr


@pytest.fixture(scope="module")
def code_run(tmp_path_factory):
    """A library run of a pure ``apply_fn``: no spec, so its objective is a pickle."""
    ds = PROBLEM.dataset()
    w = split_params(PROBLEM.make_model(ds))[1]

    def apply_fn(params, x):
        h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["layers"][0]["kernel"])
        return h @ params["layers"][1]["kernel"]

    obj, _ = make_objective(apply_fn, ds, "exp", order=2, params=w)
    tr = run_gd(obj, w, schedule="loss-based", log_t_max=3.0, saves=4, save_params=True)
    return tr.save(tmp_path_factory.mktemp("code") / "run")


def _planted(src: Path, dest: Path) -> Path:
    """A copy of ``src`` whose ``objective.pkl`` creates ``dest/../marker`` when loaded."""
    shutil.copytree(src, dest)
    (dest / "objective.pkl").write_bytes(pickle.dumps(_Plant(dest.parent / "marker")))
    (dest / "objective.json").unlink(missing_ok=True)  # as an older gflow wrote it
    return dest


def test_gflows_own_model_is_kept_as_data_and_rebuilt(own_run):
    folder, obj, tr = own_run
    assert not (folder / "objective.pkl").exists()
    meta = json.loads((folder / "objective.json").read_text())
    assert meta["model"]["factory"] == specs.SEQUENTIAL and meta["loss"] == "exp"
    back = load_objective(folder)
    assert back.graphdef == obj.graphdef and back.order == obj.order
    assert back.family == obj.family and back.smooth == obj.smooth
    # the rebuilt model computes the very same margins (same program, same data)
    np.testing.assert_array_equal(np.asarray(margins(back, tr.final_params)),
                                  np.asarray(margins(obj, tr.final_params)))  # fmt: skip


@pytest.mark.parametrize("name", ["linear", "mlp", "cnn"])
def test_the_spec_of_each_gflow_model_rebuilds_it(name):
    shape = (6, 6, 1) if name == "cnn" else (12,)
    model = build_model(name, shape, 3, width=4, bias="first", activation="leaky_relu"
                        if name != "linear" else "relu")  # fmt: skip
    spec = json.loads(json.dumps(specs.sequential_spec(model)))  # through JSON, as saved
    again = specs.build(spec)
    g1, p1 = split_params(model)
    g2, p2 = split_params(again)
    assert g1 == g2
    assert jax.tree.map(np.shape, p1) == jax.tree.map(np.shape, p2)


def test_a_planted_pickle_does_not_run_on_check_or_attack(code_run, tmp_path, capsys):
    folder = _planted(code_run, tmp_path / "sent")
    marker = tmp_path / "marker"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["check", str(folder)]) in (0, 1)
    err = capsys.readouterr().err
    assert not marker.exists()
    (line,) = [ln for ln in err.splitlines() if ln.startswith("gflow: ")]
    assert line.startswith("gflow: warning: ") and "objective.pkl" in line
    assert "--trust-code" in line
    assert (folder / "checks.json").is_file()  # the rest of the check ran
    assert main(["attack", str(folder), "--n", "4", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert not marker.exists()
    assert err.startswith("gflow: error: ") and "--trust-code" in err and "Traceback" not in err
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "checks.json"}
    assert after == before
    with pytest.raises(UntrustedCode, match="trust_code=True"):
        load_objective(folder)
    assert not marker.exists()


def test_trust_code_loads_the_pickle_after_one_warning(code_run, tmp_path, capsys):
    """The flag is what gates it: with ``--trust-code`` the same file is loaded (so the
    plant runs), after one line naming it."""
    folder = _planted(code_run, tmp_path / "sent")
    with pytest.warns(GflowWarning, match=f"loading code from {folder / 'objective.pkl'}"):
        assert main(["check", "--trust-code", str(folder)]) in (0, 1)
    assert (tmp_path / "marker").exists()
    # printed by itself, the warning is one line
    assert warnings.formatwarning("x", GflowWarning, "f.py", 1) == "gflow: warning: x\n"
    # an honest pickle, trusted, checks with the KKT fit as before
    with pytest.warns(GflowWarning, match="loading code from"):
        assert main(["check", "--trust-code", str(code_run)]) in (0, 1)
    out = capsys.readouterr().out
    assert "KKT" in out


def test_a_spec_naming_code_that_is_not_a_model_is_refused(own_run, tmp_path):
    folder, _, _ = own_run
    for factory in ("os:system", "subprocess:run", "builtins:open", "gflow.models:apply"):
        with pytest.raises(ValueError, match="not an nnx.Module class"):
            specs.resolve(factory)
    with pytest.raises(ValueError, match="not in an installed module"):
        specs.resolve("__main__:Net")
    sent = tmp_path / "sent"
    shutil.copytree(folder, sent)
    meta = json.loads((sent / "objective.json").read_text())
    meta["model"] = {"factory": "os:system", "kwargs": {"command": "touch marker"}}
    (sent / "objective.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="objective.json: model factory 'os:system'"):
        load_objective(sent)


def test_a_module_planted_in_the_folder_is_not_imported(own_run, tmp_path):
    """``python -m gflow check .`` inside a sent folder puts the folder first on
    ``sys.path``: a module the folder carries, named by its spec, is refused, not
    imported (it would create the marker on import)."""
    folder, _, _ = own_run
    sent = tmp_path / "sent"
    shutil.copytree(folder, sent)
    (sent / "gflow_planted_net.py").write_text(
        f"open({str(tmp_path / 'marker')!r}, 'w')\nfrom flax import nnx\n"
        "class Net(nnx.Module):\n    pass\n"
    )
    meta = json.loads((sent / "objective.json").read_text())
    meta["model"] = {"factory": "gflow_planted_net:Net", "kwargs": {}}
    (sent / "objective.json").write_text(json.dumps(meta))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "gflow", "check", "."], cwd=sent, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert not (tmp_path / "marker").exists(), p.stderr
    assert "Traceback" not in p.stderr
    (line,) = [ln for ln in p.stderr.splitlines() if ln.startswith("gflow: ")]
    assert line.startswith("gflow: warning: ") and "is not installed" in line, p.stderr
    assert "gflow_planted_net" in line
    assert p.returncode in (0, 1) and (sent / "checks.json").is_file()


def test_a_folder_without_objective_checks_without_the_model(own_run, tmp_path, capsys):
    folder, _, _ = own_run
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare)
    for name in ("objective.json", "objective.npz"):
        (bare / name).unlink()
    assert load_objective(bare) is None
    assert Trajectory.load(bare).kind == "gd"


def test_a_spec_that_does_not_rebuild_the_model_is_refused():
    """``make_objective(spec=...)`` checks that the spec rebuilds the model given: same
    structure and parameter shapes (else a saved run would rebuild another model)."""
    ds = PROBLEM.dataset()
    model = PROBLEM.make_model(ds)
    wrong = dict(specs.sequential_spec(model))
    wrong["kwargs"] = {**wrong["kwargs"], "plan": [["F", 6]]}
    with pytest.raises(ValueError, match="another structure or other parameter shapes"):
        make_objective(model, ds, "exp", spec=(wrong["factory"], wrong["kwargs"]))
    with pytest.raises(ValueError, match="JSON values"):
        make_objective(model, ds, "exp", spec=(specs.SEQUENTIAL, {"dtype": np.float64}))
    obj, _ = make_objective(model, ds, "exp", spec=specs.sequential_spec(model))
    assert json.loads(obj.spec) == json.loads(json.dumps(specs.sequential_spec(model)))
